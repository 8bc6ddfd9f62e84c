"""Source locations and diagnostics: `file:line:col: error[CODE]: message`.

Every AST and IR node carries a `Loc`. Problems are collected as
`Diagnostic`s so that one run can report every error it finds, then raised
together as one `CellError`. The text form follows gcc and clang: the
location, the message, the source line and a caret under the culprit.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from convc.errors import ConvcError


@dataclass(frozen=True)
class Loc:
    """A position in a source file (1-based line and column, like editors)."""

    file: str
    line: int
    col: int
    end_col: int | None = None

    def __str__(self) -> str:
        if self.line < 1:  # a whole file (one that cannot be read, say)
            return self.file
        return f"{self.file}:{self.line}:{self.col}"


NOWHERE = Loc("<builtin>", 0, 0)


def normal_text(text: str) -> str:
    """A spec's text as every stage sees it: no byte-order mark, and every line ending
    (`\\r\\n`, a lone `\\r`) written `\\n`, as Python's universal newlines read a file.

    After this, `\\n` is the only line break: Lark counts lines by it, and
    `split_lines` cuts by it, so a form feed or a U+2028 (which `str.splitlines`
    also breaks at) stays inside its line everywhere.
    """
    if text.startswith("\ufeff"):  # editors on Windows write one; no column counts it
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_lines(text: str) -> list[str]:
    """The lines of a spec, numbered as locations number them (cut at `\\n` only)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the text ends in a newline: no empty line after it
    return lines


def printable(text: str) -> str:
    """`text` with every character a terminal could act on written as an escape.

    ESC, BEL, NUL, a carriage return, bidirectional overrides, ... become `\\x1b`,
    `\\u202e`, so a spec (or a file name) cannot move the cursor, recolour the
    output or draw lines of its own. Tabs are kept (carets line up under them);
    printable non-ASCII letters are kept.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == "\t" else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    n = ord(ch)
    if n < 0x100:
        return f"\\x{n:02x}"
    if n < 0x10000:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


class SourceCache:
    """Text of every source file read in this run, so diagnostics can quote it."""

    def __init__(self) -> None:
        self._text: dict[str, str] = {}

    def add(self, name: str, text: str) -> None:
        self._text[name] = text

    def text(self, name: str) -> str | None:
        return self._text.get(name)

    def line(self, name: str, lineno: int) -> str | None:
        """Line `lineno` of a file, counted as `Loc` counts it (see `split_lines`)."""
        text = self._text.get(name)
        if text is None or lineno < 1:
            return None
        lines = split_lines(text)
        return lines[lineno - 1] if lineno <= len(lines) else None


SOURCES = SourceCache()


@dataclass(frozen=True)
class Diagnostic:
    """One error or warning at one place; `code` is stable and documented."""

    severity: str  # "error" or "warning"
    code: str
    message: str
    loc: Loc
    notes: tuple[str, ...] = ()

    def format(self) -> str:
        """The text form; whatever came from a file or its name goes through `printable`."""
        out = [printable(f"{self.loc}: {self.severity}[{self.code}]: {self.message}")]
        src = SOURCES.line(self.loc.file, self.loc.line)
        if src is not None:
            out.append("    " + printable(src))
            col = max(self.loc.col, 1)
            width = 1
            if self.loc.end_col and self.loc.end_col > col:
                width = self.loc.end_col - col
            # the caret goes under the escaped text: each character before it takes
            # the columns its printed form takes (tabs are kept so tab indents line up)
            pad = "".join(ch if ch == "\t" else " " * len(printable(ch))
                          for ch in src[:col - 1])
            width = max(len(printable(src[col - 1:col - 1 + width])), 1)
            out.append("    " + pad + "^" + "~" * (width - 1))
        for note in self.notes:
            out.append(printable(f"    note: {note}"))
        return "\n".join(out)

    def to_json(self) -> dict:
        """Everything the text form shows: the place, the message, the quoted source line.

        Strings are escaped as in the text form (`printable`), so a tool that prints
        them prints no control characters; `line` and `column` count the file's own
        characters.
        """
        src = SOURCES.line(self.loc.file, self.loc.line)
        return dict(severity=self.severity, code=self.code, message=printable(self.message),
                    file=printable(self.loc.file), line=self.loc.line, column=self.loc.col,
                    end_column=self.loc.end_col,
                    source=None if src is None else printable(src),
                    notes=[printable(n) for n in self.notes])


class CellError(ConvcError):
    """One or more errors found in `.cell` sources."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = list(diagnostics)
        super().__init__(self.format())

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]

    def format(self) -> str:
        return format_diagnostics(self.diagnostics)


def summary_line(diags: list[Diagnostic]) -> str:
    n_err = sum(d.severity == "error" for d in diags)
    n_warn = sum(d.severity == "warning" for d in diags)
    parts = []
    if n_err:
        parts.append(f"{n_err} error{'s' if n_err != 1 else ''}")
    if n_warn:
        parts.append(f"{n_warn} warning{'s' if n_warn != 1 else ''}")
    return ", ".join(parts) if parts else "no problems"


def format_diagnostics(diags: list[Diagnostic], fmt: str = "text") -> str:
    diags = sorted(diags, key=lambda d: (d.loc.file, d.loc.line, d.loc.col, d.code))
    if fmt == "json":
        return json.dumps(dict(diagnostics=[d.to_json() for d in diags],
                               errors=sum(d.severity == "error" for d in diags),
                               warnings=sum(d.severity == "warning" for d in diags),
                               summary=summary_line(diags)),
                          indent=1)
    body = "\n".join(d.format() for d in diags)
    return (body + "\n" if body else "") + summary_line(diags)


@dataclass
class Reporter:
    """Collects diagnostics during one pass; `check()` raises if any is an error."""

    diagnostics: list[Diagnostic] = field(default_factory=list)

    def error(self, code: str, message: str, loc: Loc, *notes: str) -> None:
        self.diagnostics.append(Diagnostic("error", code, message, loc, tuple(notes)))

    def warning(self, code: str, message: str, loc: Loc, *notes: str) -> None:
        self.diagnostics.append(Diagnostic("warning", code, message, loc, tuple(notes)))

    @property
    def has_errors(self) -> bool:
        return any(d.severity == "error" for d in self.diagnostics)

    def check(self) -> None:
        if self.has_errors:
            raise CellError(self.diagnostics)

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "warning"]

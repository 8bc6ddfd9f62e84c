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


class SourceCache:
    """Text of every source file read in this run, so diagnostics can quote it."""

    def __init__(self) -> None:
        self._text: dict[str, str] = {}

    def add(self, name: str, text: str) -> None:
        self._text[name] = text

    def text(self, name: str) -> str | None:
        return self._text.get(name)

    def line(self, name: str, lineno: int) -> str | None:
        text = self._text.get(name)
        if text is None or lineno < 1:
            return None
        lines = text.splitlines()
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
        out = [f"{self.loc}: {self.severity}[{self.code}]: {self.message}"]
        src = SOURCES.line(self.loc.file, self.loc.line)
        if src is not None:
            out.append("    " + src.rstrip("\n"))
            col = max(self.loc.col, 1)
            width = 1
            if self.loc.end_col and self.loc.end_col > col:
                width = self.loc.end_col - col
            # keep tabs so the caret lines up under a tab-indented line
            pad = "".join(ch if ch == "\t" else " " for ch in src[:col - 1])
            out.append("    " + pad + "^" + "~" * (width - 1))
        for note in self.notes:
            out.append(f"    note: {note}")
        return "\n".join(out)

    def to_json(self) -> dict:
        """Everything the text form shows: the place, the message, the quoted source line."""
        return dict(severity=self.severity, code=self.code, message=self.message,
                    file=self.loc.file, line=self.loc.line, column=self.loc.col,
                    end_column=self.loc.end_col,
                    source=SOURCES.line(self.loc.file, self.loc.line),
                    notes=list(self.notes))


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

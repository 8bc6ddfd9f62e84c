"""Print a `.cell` file in its canonical form: `convc fmt`.

The text is printed from the syntax tree, so the layout is always the same:
4-space indentation, one statement per line, spaces around binary operators
and `=` (keyword arguments too: `ConvLSTM(hidden = 8)`), a blank line between
top-level definitions, and blank lines inside a body kept where the source
had them (at most one). Docstrings are kept.

The tree has no comments, so they are taken from the token stream and hung
on the statement lines of the output: a comment on a line of its own goes
before the first statement that follows it (at that statement's indent), a
comment after code stays at the end of that statement's line. Every
statement, every block's `{` line and every closing `}` is such an anchor.
Formatting is idempotent, and it changes no meaning: the tree of the output
equals the tree of the input except for source positions (tests/test_format.py
checks both on every example and on generated specs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from . import ast as A
from .diagnostics import normal_text, split_lines
from .parser import parse, read_spec, tokens

INDENT = "    "
MAX_ALIGN_PAD = 30  # trailing comments are not aligned across lines differing more in length


@dataclass(frozen=True)
class _Comment:
    line: int
    text: str
    trailing: bool  # there is code before it on its line


@dataclass(frozen=True)
class Formatted:
    """What `format_file` did: the canonical text, and whether it differs from the file."""

    path: str
    text: str
    changed: bool


def format_source(text: str, file: str = "<string>") -> str:
    """The canonical form of `text` (raises CellError when it does not parse).

    It is UTF-8 text with `\\n` line ends and no byte-order mark (see normal_text).
    """
    text = normal_text(text)
    module = parse(text, file)
    printer = _Printer(text, _comments(text))
    printer.module(module)
    return printer.result()


def format_file(path, write: bool = False, check: bool = False) -> Formatted:
    """Format one file. With `write`, rewrite it when it changes (never with `check`)."""
    p = Path(path)
    original = read_spec(p)
    text = format_source(original, str(path))
    changed = text != original
    if write and changed and not check:
        from convc.runtime.atomic import write_atomic

        write_atomic(p, text)  # the old text or the new one survives a full disk, never half
    return Formatted(str(path), text, changed)


def _comments(text: str) -> list[_Comment]:
    out = []
    code_lines = set()
    for tok in tokens(text):
        if tok.type == "COMMENT":
            out.append(_Comment(tok.line, str(tok).rstrip(), tok.line in code_lines))
        elif tok.type != "WS":
            # a multi-line token (a docstring) counts as code on its last line
            code_lines.add(tok.end_line)
            code_lines.add(tok.line)
    return out


# ---------------------------------------------------------------- expressions

def _precedence(e) -> int:
    if isinstance(e, A.BinOp):
        return 1 if e.op in "+-" else 2
    if isinstance(e, A.Neg):
        return 3
    return 4  # calls, delayed reads, atoms


def _wrap(e, precedence: int) -> str:
    s = expr(e)
    return f"({s})" if _precedence(e) < precedence else s


def expr(e) -> str:
    """One expression on one line, with the parentheses its tree needs and no others."""
    if isinstance(e, A.Num):
        return number(e.value)
    if isinstance(e, A.Str):
        return string(e.value)
    if isinstance(e, A.Bool):
        return "true" if e.value else "false"
    if isinstance(e, A.Name):
        return e.id
    if isinstance(e, A.Delayed):
        if e.delay == 0:
            return f"{e.name}[{e.var}]"
        sign = "-" if e.delay > 0 else "+"
        return f"{e.name}[{e.var}{sign}{number(abs(e.delay))}]"
    if isinstance(e, A.Call):
        args = [expr(a) for a in e.args] + [f"{k.name} = {expr(k.value)}" for k in e.kwargs]
        return f"{_wrap(e.func, 4)}({', '.join(args)})"
    if isinstance(e, A.BinOp):
        p = _precedence(e)
        # left-associative: a right operand of the same precedence keeps its parentheses
        return f"{_wrap(e.left, p)} {e.op} {_wrap(e.right, p + 1)}"
    if isinstance(e, A.Neg):
        return "-" + _wrap(e.operand, 3)
    if isinstance(e, A.TupleExpr):
        return "(" + ", ".join(expr(i) for i in e.items) + ")"
    raise TypeError(f"not an expression: {e!r}")


def number(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "1e999"  # what overflowed to infinity reads back as infinity
    return repr(float(v))


def string(v: str) -> str:
    """A string literal that reads back as `v` (see parser._unquote)."""
    if "\n" not in v and '"' not in v:
        return f'"{v}"'
    # only a triple-quoted string holds a newline or a quote, and its value
    # went through inspect.cleandoc, which leaves such a value as it is
    if v.endswith('"'):
        return f'"""{v}\n"""'
    return f'"""{v}"""'


def docstring(doc: str, indent: str) -> list[str]:
    if "\n" not in doc:
        if '"' not in doc and (not doc or doc[0].isspace() or "\t" in doc):
            return [f'{indent}"{doc}"']
        if not doc.endswith('"'):
            return [f'{indent}"""{doc}"""']
    lines = doc.split("\n")
    out = [f'{indent}"""{lines[0]}']
    out += [indent + line if line else "" for line in lines[1:]]
    out.append(f'{indent}"""')
    return out


# ---------------------------------------------------------------- statements

def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


class _Printer:
    def __init__(self, text: str, comments: list[_Comment]):
        self.src = split_lines(text)
        self.comments = comments
        self.next_comment = 0
        self.out: list[str] = []
        self.last_code: int | None = None  # index in out of the last line of code
        self.block_start = True  # no blank line right after `{` or at the top of the file
        self.last_line = 0  # the source line of the last anchor or comment
        self.trailing: dict[int, str] = {}  # index in out -> comment at the end of that line

    # -- lines and comments
    def _source_blank(self, line: int) -> bool:
        """Whether a blank source line separates `line` from what was printed before it."""
        return line > self.last_line and 2 <= line <= len(self.src) + 1 and \
            not self.src[line - 2].strip()

    def _blank(self) -> None:
        if self.out and self.out[-1] != "" and not self.block_start:
            self.out.append("")

    def _comments_before(self, line: int, indent: str, blank_first: bool = False) -> None:
        """Emit the comments above source line `line`, at the indent of what follows."""
        first = True
        while self.next_comment < len(self.comments) and \
                self.comments[self.next_comment].line < line:
            c = self.comments[self.next_comment]
            self.next_comment += 1
            if c.trailing and self.last_code is not None:
                old = self.trailing.get(self.last_code)
                self.trailing[self.last_code] = c.text if old is None else f"{old}  {c.text}"
                continue
            if (blank_first and first) or self._source_blank(c.line):
                self._blank()
            first = False
            self.out.append(indent + c.text)
            self.block_start = False
            self.last_line = c.line
        if blank_first and first:
            self._blank()

    def anchor(self, line: int, indent: str, text: str, blank: bool | None = None) -> None:
        """Emit one line of code that stands for source line `line`.

        `blank`: True forces a blank line before it (and before the comments
        above it), False forbids one, None keeps the source's.
        """
        self._comments_before(line, indent, blank_first=bool(blank))
        if blank is not False and self._source_blank(line):
            self._blank()
        self.out.append(indent + text)
        self.last_code = len(self.out) - 1
        self.block_start = False
        self.last_line = max(self.last_line, line)

    def opened(self) -> None:
        self.block_start = True

    def result(self) -> str:
        self._comments_before(10 ** 9, "")
        while self.out and self.out[-1] == "":
            self.out.pop()
        out = list(self.out)
        # trailing comments on consecutive lines of one indent start in one column,
        # as gofmt does, unless the lines differ so much in length that it looks odd
        i = 0
        while i < len(out):
            if i not in self.trailing:
                i += 1
                continue
            j = i
            while j + 1 in self.trailing and _indent(out[j + 1]) == _indent(out[i]):
                j += 1
            widths = {k: len(out[k].rsplit("\n", 1)[-1]) for k in range(i, j + 1)}
            aligned = max(widths.values()) - min(widths.values()) <= MAX_ALIGN_PAD
            for k in range(i, j + 1):
                pad = max(widths.values()) - widths[k] + 2 if aligned else 2
                out[k] += " " * pad + self.trailing[k]
            i = j + 1
        return "\n".join(out) + "\n" if out else ""

    # -- the tree
    def module(self, mod: A.Module) -> None:
        prev = None
        for item in mod.items:
            blank = None
            if prev is not None and not (isinstance(item, A.Import) and
                                         isinstance(prev, A.Import)):
                blank = True
            if isinstance(item, A.Import):
                target = string(item.target) if item.is_path else item.target
                self.anchor(item.loc.line, "", f"import {target}", blank)
            elif isinstance(item, A.CellDef):
                params = ", ".join(p.name if p.default is None else
                                   f"{p.name} = {expr(p.default)}" for p in item.params)
                self.definition(item, f"cell {item.name}({params}) {{", blank)
            else:
                self.definition(item, f"model {item.name} {{", blank)
            prev = item

    def definition(self, d, header: str, blank) -> None:
        self.anchor(d.loc.line, "", header, blank)
        self.opened()
        if d.doc is not None:
            self._comments_before(d.loc.line + 1, INDENT)  # `{  # ...` stays on the `{` line
            self.out.extend(docstring(d.doc, INDENT))
            self.last_code = len(self.out) - 1
        self.body(d.body, INDENT)
        self.close(d.end, "")

    def close(self, end: A.Loc | None, indent: str, text: str = "}") -> None:
        """The `}` of a block; the comments above it stay inside the block."""
        line = end.line if end is not None else 0
        self._comments_before(line, indent + INDENT)
        self.anchor(line, indent, text, blank=False)

    def body(self, stmts, indent: str) -> None:
        for st in stmts:
            self.statement(st, indent)

    def statement(self, st, indent: str) -> None:
        line = st.loc.line
        if isinstance(st, A.InputDecl):
            self.anchor(line, indent, "input " + ", ".join(st.names))
        elif isinstance(st, A.OutputDecl):
            self.anchor(line, indent, "output " + ", ".join(st.names))
        elif isinstance(st, A.StateDecl):
            self.anchor(line, indent, f"state {st.name} = {st.init}")
        elif isinstance(st, A.WeightDecl):
            self.anchor(line, indent, f"weight {st.name} = {expr(st.value)}")
        elif isinstance(st, A.Equation):
            self.anchor(line, indent, f"{', '.join(st.targets)} = {expr(st.value)}")
        elif isinstance(st, A.SeqDecl):
            dims = ", ".join(expr(d) for d in st.shape)
            self.anchor(line, indent, f"{st.kind} {st.name}: [{dims}]")
        elif isinstance(st, A.Loss):
            self.anchor(line, indent, f"loss {expr(st.value)}")
        elif isinstance(st, A.Train):
            self.anchor(line, indent, "train {")
            self.opened()
            for s in st.settings:
                self.anchor(s.loc.line, indent + INDENT, f"{s.name} = {expr(s.value)}")
            self.close(st.end, indent)
        elif isinstance(st, A.If):
            self.anchor(line, indent, f"if {expr(st.cond)} {{")
            self.opened()
            self.body(st.then, indent + INDENT)
            if st.orelse:
                self.close(st.then_end, indent, "} else {")
                self.opened()
                self.body(st.orelse, indent + INDENT)
            self.close(st.end, indent)
        else:  # pragma: no cover - every statement kind is printed above
            raise TypeError(f"not a statement: {st!r}")

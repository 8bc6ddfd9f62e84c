"""Parse `.cell` text into `spec.ast` nodes.

The grammar lives in `cell.lark` beside this file and is loaded once, with
the LALR parser, its basic lexer (so keywords are reserved everywhere, not
only where the parser expects them) and `propagate_positions=True`. A
Transformer turns Lark's tree into frozen dataclasses.

Syntax errors are labelled the way `UnexpectedInput.match_examples` does it,
by comparing the parser state of the user's error with the states of small
bad examples (SYNTAX_LABELS; each label has a test in
tests/test_syntax_errors.py). When the whole file does not parse, it is cut
at its top-level `cell` / `model` / `import` lines and each piece is parsed
on its own, so one run reports one syntax error per broken definition.
"""
from __future__ import annotations

import difflib
import inspect
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import lark
from lark import Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from . import ast as A
from .diagnostics import SOURCES, CellError, Diagnostic, Loc, normal_text, split_lines
from .settings import MAX_INT

# Deeper expressions are refused with E112: the Transformer and the compiler
# walk expressions recursively, and this keeps them far from Python's limit.
MAX_DEPTH = 120

# The largest spec read (E002), checked before it is read: parsing keeps the whole
# tree and then the AST, 150 to 350 bytes of memory per byte of text (a 1 MB spec of
# examples/seed.cell copies: 143 MiB, 9 s on one slow core), so a 50 MB file would
# need gigabytes. The examples and the standard library are a few KiB each.
MAX_FILE_BYTES = 1 << 20
MAX_PROGRAM_BYTES = 8 << 20  # one file with everything it imports

KEYWORDS = ("cell", "model", "import", "input", "target", "state", "weight", "output",
            "loss", "train", "if", "else", "true", "false")


@lru_cache(maxsize=1)
def grammar_text() -> str:
    return resources.files(__package__).joinpath("cell.lark").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    return lark.Lark(grammar_text(), parser="lalr", lexer="basic", propagate_positions=True,
                     maybe_placeholders=True)


def lark_parser() -> lark.Lark:
    """The Lark object convc parses with (the fuzz tests generate text from its grammar)."""
    return _parser()


def tokens(text: str) -> list[lark.Token]:
    """Every token of `text`, comments and whitespace included (raises on a bad character)."""
    return list(_parser().lex(text, dont_ignore=True))


# -------------------------------------------------------------- syntax error labels
# Each label maps to bad snippets that end in that error; an error is given the
# label of the snippet whose parser state it matches (see _match_label).

SYNTAX_LABELS: dict[tuple[str, str], list[str]] = {
    ("E101", "missing '}' to close the block"): [
        "cell A() { input x output x",
        "model M { input x: [1, 2, 2]\n",
        "cell A() { if p { a = b }",
        "cell A() { a = b\n",
        "model M { loss bce(a, b)\n",
        "model M { train { lr = 1 }",
        "cell A() { a = b cell",
        "cell A() { a = b model",
        "cell A() { a = b import",
    ],
    ("E102", "missing '='"): [
        "cell A() { a, b split(z, 2) }",
        "cell A() { weight W kernel(1, 3) }",
        "model M { train { lr 1 } }",
        "cell A() { state h zeros }",
    ],
    ("E103", "unknown keyword or statement"): [
        "celll A() { }",
        "modle M { }",
        "cell A() { 1 }",
        "cell A() { (a) }",
        "model M { train { 1 } }",
    ],
    ("E104", "unbalanced parentheses"): [
        "cell A() { a = f(b }",
        "cell A() { a = (b + c }",
        "cell A() { a = f(g(b) }",
        "cell A( { }",
        "model M { a = f(b }",
        "cell A() { a = (b, c }",
        "cell A() { a = f(b, c = d }",
    ],
    ("E107", "missing '{' to open the body"): [
        "cell A() input x }",
        "model M input x",
        "cell A() a = b",
        "model M { train lr = 1 }",
        "cell A() { if p a = b }",
        "cell A() { if p { a = b } else a = b }",
    ],
    ("E109", "missing shape: write `[C, H, W]`"): [
        "model M { input x }",
        "model M { input x: }",
        "model M { target y }",
        "model M { input x: 1 }",
        "model M { input x: [1, 2, 3 }",
    ],
    ("E110", "missing expression"): [
        "cell A() { a = }",
        "cell A() { a = b + }",
        "cell A() { a = b * }",
        "model M { loss }",
        "cell A() { weight W = }",
        "cell A() { a = - }",
        "cell A() { a = f(, b) }",
        "cell A() { a = f(b = ) }",
        "model M { train { lr = } }",
        "cell A() { if { } }",
        "cell A() { a = () }",
    ],
    ("E111", "a time index is written t-1, as in h[t-1]"): [
        "cell A() { a = h[1] }",
        "cell A() { a = h[t - x] }",
        "cell A() { a = h[t * 2] }",
        "cell A() { a = h[t-1 }",
        "cell A() { a = h[] }",
    ],
    ("E113", "missing ',' between arguments"): [
        "cell A() { a = f(b c) }",
        "cell A() { a = f(b 1) }",
        "cell A() { a = f(b, c d) }",
        "cell A() { a = f(b = 1 c) }",
        "cell A(x y) { }",
    ],
    ("E114", "missing name"): [
        "cell A() { input }",
        "cell A() { output }",
        "cell A() { state h = }",
        "cell { }",
        "model { }",
    ],
}

_LABEL_OF = {label: code for (code, label) in SYNTAX_LABELS}
_LABEL = {code: label for (code, label) in SYNTAX_LABELS}
# labels that say something is missing: they point just after the last good token
_MISSING = {"E101", "E102", "E104", "E107", "E109", "E110", "E111", "E113", "E114"}
_EXPR_START = {"NAME", "NUMBER", "STRING", "LPAR", "MINUS", "TRUE", "FALSE"}
_STMT_START = {"INPUT", "STATE", "WEIGHT", "OUTPUT", "IF", "TARGET", "LOSS", "TRAIN", "RBRACE"}
_CLOSERS = {"RPAR": "LPAR", "RBRACE": "LBRACE", "RSQB": "LSQB"}


def _signature(err: UnexpectedInput):
    """The LALR state an error happened in, the token types it accepts, the token found."""
    state = getattr(err, "state", None)
    position = getattr(state, "position", None)
    accepts = frozenset(getattr(err, "accepts", None) or getattr(err, "expected", None) or ())
    token = getattr(getattr(err, "token", None), "type", None)
    return position, accepts, token


@lru_cache(maxsize=1)
def _example_signatures() -> list[tuple[tuple, str]]:
    sigs = []
    for (_, label), examples in SYNTAX_LABELS.items():
        for ex in examples:
            try:
                _parser().parse(ex)
            except UnexpectedToken as e:
                sigs.append((_signature(e), label))
            else:  # pragma: no cover - a label example that parses is a bug in this table
                raise AssertionError(f"syntax label example parses: {ex!r}")
    return sigs


def _match_label(err: UnexpectedInput) -> str | None:
    """Label of an example that failed in the same parser state on the same kind of token.

    This is `UnexpectedInput.match_examples` with the comparison cut down to
    the state on top of the parser stack, so that an example matches the same
    mistake at any nesting depth. Errors no example matches are labelled by
    `_classify`, from the tokens the parser would have accepted.
    """
    pos, _, token = _signature(err)
    for (epos, _, etok), label in _example_signatures():
        if pos is not None and (epos, etok) == (pos, token):
            return label
    return None


def _classify(err: UnexpectedToken, text: str) -> str:
    """The error code for a parser state no example covers, from what it would accept."""
    _, accepts, tok = _signature(err)
    if tok in ("CELL", "MODEL", "IMPORT") and any(
            t.type == "LBRACE" for t in _open_brackets(text, err.token.start_pos)):
        return "E101"  # the next definition starts inside this one
    if "RPAR" in accepts and "COMMA" in accepts:
        prev = _code_tokens(text, err.token.start_pos)
        same_line = bool(prev) and prev[-1].end_line == err.token.line
        return "E113" if same_line and tok in _EXPR_START else "E104"
    if "RSQB" in accepts:
        open_ = [t for t in _open_brackets(text, err.token.start_pos) if t.type == "LSQB"]
        return _bracket_code(text, open_[-1]) if open_ else "E100"
    if accepts and accepts <= {"NAME", "STRING"}:
        return "E114"
    if {"NAME", "NUMBER", "LPAR", "MINUS"} <= accepts and not accepts & _STMT_START:
        return "E110"
    if "EQUAL" in accepts:
        return "E102"
    if "LBRACE" in accepts:
        return "E107"
    if "COLON" in accepts:
        return "E109"
    if accepts & (_STMT_START | {"CELL", "MODEL", "IMPORT"}):
        return "E103"
    return "E100"


# -------------------------------------------------------------- syntax diagnostics

def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _loc_at(text: str, pos: int, file: str, width: int = 1) -> Loc:
    line, col = _line_col(text, pos)
    return Loc(file, line, col, col + width if width > 1 else None)


def _code_tokens(text: str, end: int | None = None) -> list[lark.Token]:
    """The tokens of text[:end] that are code (no whitespace, no comments)."""
    try:
        toks = tokens(text if end is None else text[:end])
    except UnexpectedInput:
        return []
    return [t for t in toks if t.type not in ("WS", "COMMENT")]


def _after_last_token(text: str, end: int, file: str) -> Loc | None:
    """The position just after the last code token before `end` (where a missing token goes)."""
    toks = _code_tokens(text, end)
    if not toks:
        return None
    return _loc_at(text, toks[-1].end_pos, file)


def _open_brackets(text: str, end: int) -> list[lark.Token]:
    """The '(', '{' and '[' still open at `end`, outermost first."""
    stack: list[lark.Token] = []
    for t in _code_tokens(text, end):
        if t.type in _CLOSERS.values():
            stack.append(t)
        elif t.type in _CLOSERS and stack and stack[-1].type == _CLOSERS[t.type]:
            stack.pop()
    return stack


def _next_definition(text: str, pos: int) -> str | None:
    m = _TOP.search(text, pos)
    return m.group(1) if m else None


def _not_closed(text: str, opener: lark.Token) -> str:
    line, col = _line_col(text, opener.start_pos)
    return f"the {opener.value!r} at line {line}, column {col} is not closed"


def _bracket_code(text: str, opener: lark.Token) -> str:
    """E101 for '{', E104 for '(', and for '[' E109 (a shape) or E111 (a time index)."""
    if opener.type == "LBRACE":
        return "E101"
    if opener.type == "LPAR":
        return "E104"
    before = _code_tokens(text, opener.start_pos)
    return "E109" if before and before[-1].type == "COLON" else "E111"


def _syntax_diagnostic(err: UnexpectedInput, text: str, file: str,
                       piece_end: int | None = None) -> Diagnostic:
    """One labelled diagnostic for a Lark error.

    `piece_end` is where the parsed text stops when error recovery parses one
    definition of a longer file: an "end of file" there is really the start of
    the next definition.
    """
    if isinstance(err, UnexpectedCharacters):
        return _bad_character(err, text, file)
    token = getattr(err, "token", None)
    if token is None or token.type == "$END":
        return _end_of_file(text, file, piece_end)
    if token.type == "STRING" and token.value == '""' and \
            text[token.end_pos:token.end_pos + 1] == '"':
        # `"""...` with no closing quotes lexes as "" and then fails at the third quote
        return Diagnostic("error", "E105", 'unterminated docstring: no closing """',
                          _loc_at(text, token.start_pos, file, 3))
    open_ = _open_brackets(text, token.start_pos)
    if token.type in _CLOSERS and not (open_ and open_[-1].type == _CLOSERS[token.type]):
        return _closer(token, open_, text, file)
    words = _two_words(err, text)
    if words is not None:
        return _two_word_diagnostic(words, text, file)
    label = _match_label(err)
    code = _LABEL_OF[label] if label else _classify(err, text)
    if code == "E113":
        prev = _code_tokens(text, token.start_pos)
        if token.type not in _EXPR_START or (prev and prev[-1].end_line < token.line):
            code = "E104"  # `f(a {`, or `f(a` at the end of a line and the next statement below
    label = _LABEL.get(code, "syntax error")
    if code == "E109" and token.type == "LSQB":
        label = "missing ':' between the name and its shape"
    notes = []
    if code in ("E101", "E104") and open_:
        want = "LBRACE" if code == "E101" else "LPAR"
        openers = [t for t in open_ if t.type == want]
        if openers:
            notes.append(_not_closed(text, openers[-1]))
    loc = _token_loc(token, file)
    found = f" (found {_describe(token)})"
    if code == "E100":
        expected = ", ".join(sorted({_pretty(t) for t in err.accepts or err.expected or ()}))
        msg = "syntax error: unexpected " + _describe(token)
        if expected and len(expected) < 100:
            msg += f"; expected {expected}"
        return Diagnostic("error", "E100", msg, loc)
    if code == "E103":
        if token.type == "NAME":
            close = difflib.get_close_matches(str(token.value), KEYWORDS, n=1, cutoff=0.6)
            if close:
                return Diagnostic("error", "E103", f"unknown keyword {token.value!r}; did you "
                                  f"mean {close[0]!r}?", loc)
        if {"CELL", "MODEL"} <= set(err.accepts or ()):
            label = "expected `cell`, `model` or `import`"
        else:
            label = "expected a statement"
    if code in _MISSING:
        after = _after_last_token(text, token.start_pos, file)
        if after is not None and after.line < token.line:
            loc = after
    return Diagnostic("error", code, label + found, loc, tuple(notes))


def _closer(token, open_: list, text: str, file: str) -> Diagnostic:
    """A ')', '}' or ']' the parser did not expect: unmatched, or closing too early."""
    want = _CLOSERS[token.type]
    if not any(t.type == want for t in open_):
        what = {"RPAR": "parentheses", "RBRACE": "braces", "RSQB": "brackets"}[token.type]
        return Diagnostic("error", "E104", f"unbalanced {what}: this {token.value!r} closes "
                          "nothing", _token_loc(token, file))
    inner = open_[-1]
    code = _bracket_code(text, inner)
    closer = {"LPAR": "')'", "LBRACE": "'}'", "LSQB": "']'"}[inner.type]
    label = _LABEL[code] if code != "E101" else "missing '}' to close the block"
    msg = f"{label}: missing {closer} before {token.value!r}" if code in ("E109", "E111") \
        else f"{label} (found {token.value!r})"
    return Diagnostic("error", code, msg, _missing_loc(text, token, file),
                      (_not_closed(text, inner),))


def _missing_loc(text: str, token, file: str) -> Loc:
    """Where a missing token goes: after the last good token if that is on an earlier line."""
    after = _after_last_token(text, token.start_pos, file)
    if after is not None and after.line < token.line:
        return after
    return _token_loc(token, file)


def _end_of_file(text: str, file: str, piece_end: int | None) -> Diagnostic:
    """The text ends too early: at the end of the file, or where the next definition starts."""
    where = "before the end of the file"
    whole = SOURCES.text(file) or ""
    nxt = _next_definition(whole, piece_end) if piece_end is not None else None
    if nxt is not None:
        where = f"before `{nxt}` on line {_line_col(whole, piece_end)[0]}"
    loc = _after_last_token(text, len(text), file) or _end_loc(text, file)
    open_ = _open_brackets(text, len(text))
    if not open_:
        msg = "unexpected end of file" if nxt is None else f"unfinished definition {where}"
        return Diagnostic("error", "E108", msg, loc)
    inner = open_[-1]
    code = _bracket_code(text, inner)
    label = "missing '}' to close the block" if code == "E101" else _LABEL[code]
    return Diagnostic("error", code, f"{label} {where}", loc, (_not_closed(text, inner),))


def _describe(token) -> str:
    if token.type == "$END":
        return "the end of the file"
    value = str(token.value)
    if token.type == "STRING" and len(value) > 20:
        value = value[:17] + "..."
    if token.type.isupper() and token.type not in ("NAME", "NUMBER", "STRING") and \
            value in KEYWORDS:
        return f"keyword {value!r}"
    return repr(value)


def _token_loc(token, file: str) -> Loc:
    line, col = max(token.line or 1, 1), max(token.column or 1, 1)
    end = token.end_column if token.end_line == token.line else None
    return Loc(file, line, col, end)


def _bad_character(err: UnexpectedCharacters, text: str, file: str) -> Diagnostic:
    pos = err.pos_in_stream
    ch = text[pos] if pos < len(text) else ""
    if ch == '"':
        if text[max(pos - 2, 0):pos] == '""':
            # `"""...` with no closing quotes lexes as "" followed by a lone quote
            return Diagnostic("error", "E105", 'unterminated docstring: no closing """',
                              _loc_at(text, pos - 2, file, 3))
        return Diagnostic("error", "E105", "unterminated string: a string ends with '\"' "
                          "on the same line", _loc_at(text, pos, file))
    notes = ("strings are written in double quotes",) if ch == "'" else ()
    return Diagnostic("error", "E106", f"invalid character {ch!r}", _loc_at(text, pos, file),
                      notes)


# words people bring from other languages, and what to write instead
_HINTS = {
    "elif": "write `} else { if ... }`",
    "let": "an equation needs no keyword: write `x = ...`",
    "var": "an equation needs no keyword: write `x = ...`",
    "def": "define a cell with `cell Name(params) { ... }`",
    "return": "name a cell's results with `output`",
    "inputs": "did you mean 'input'?",
    "outputs": "did you mean 'output'?",
    "states": "did you mean 'state'?",
    "weights": "did you mean 'weight'?",
}


def _two_words(err, text: str):
    """(first, position, token) when a statement is a lone name followed by something
    other than '=' or ',': `inptu x`, `a b`, `elif {`."""
    if not isinstance(err, UnexpectedToken) or err.token.type == "$END":
        return None
    if set(err.accepts or ()) != {"EQUAL", "COMMA"}:
        return None
    toks = _code_tokens(text, err.token.start_pos)
    if len(toks) < 2 or toks[-1].type != "NAME" or toks[-2].type == "COMMA":
        return None
    first = toks[-1]
    return str(first), first.start_pos, err.token


def _two_word_diagnostic(words, text: str, file: str) -> Diagnostic:
    first, first_pos, second = words
    loc = _loc_at(text, first_pos, file, len(first))
    if first in _HINTS:
        return Diagnostic("error", "E103", f"unknown keyword {first!r}; {_HINTS[first]}", loc)
    close = difflib.get_close_matches(first, KEYWORDS, n=1, cutoff=0.6)
    if close:
        return Diagnostic("error", "E103", f"unknown keyword {first!r}; did you mean "
                          f"{close[0]!r}?", loc)
    if second.line > loc.line:
        # `a` alone on a line, then the next statement: the `= ...` is missing
        return Diagnostic("error", "E102", f"missing '=' after {first!r}",
                          _loc_at(text, first_pos + len(first), file))
    return Diagnostic("error", "E102", f"missing '=' after {first!r} (found "
                      f"{_describe(second)})", _token_loc(second, file))


_TERMINAL_NAMES = {"RBRACE": "'}'", "LBRACE": "'{'", "RPAR": "')'", "LPAR": "'('",
                   "EQUAL": "'='", "COMMA": "','", "COLON": "':'", "NAME": "a name",
                   "NUMBER": "a number", "STRING": "a string", "LSQB": "'['", "RSQB": "']'",
                   "SEMICOLON": "';'", "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'",
                   "SLASH": "'/'", "$END": "the end of the file"}


def _pretty(term: str) -> str:
    if term in _TERMINAL_NAMES:
        return _TERMINAL_NAMES[term]
    if term.isupper():
        return repr(term.lower())
    return term


def _end_loc(text: str, file: str) -> Loc:
    lines = split_lines(text) or [""]
    return Loc(file, len(lines), len(lines[-1]) + 1)


_EXPR_RULES = {"add", "sub", "mul", "div", "neg", "call", "args", "kwarg", "tuple",
               "delayed", "delayed_ahead", "delayed_now", "number", "string", "true", "false",
               "name"}


def _check_depth(tree: lark.Tree, file: str) -> Diagnostic | None:
    """E112 for an expression nested deeper than MAX_DEPTH (checked without recursion)."""
    stack = [(tree, 0, None)]
    while stack:
        node, depth, root = stack.pop()
        if node.data in _EXPR_RULES and root is None:
            root, depth = node, 0
        if depth > MAX_DEPTH:
            meta = root.meta
            loc = Loc(file, getattr(meta, "line", 1) or 1, getattr(meta, "column", 1) or 1)
            return Diagnostic("error", "E112", f"expression nested too deeply (more than "
                              f"{MAX_DEPTH} levels); split it into several equations", loc)
        for child in node.children:
            if isinstance(child, lark.Tree):
                stack.append((child, depth + 1, root))
    return None


# -------------------------------------------------------------- tree -> AST

def _unquote(s: str) -> str:
    if s.startswith('"""') and len(s) >= 6:
        # dedent docstrings the way Python's inspect.cleandoc does
        return inspect.cleandoc(s[3:-3])
    return s[1:-1]


@dataclass(frozen=True)
class _Doc:
    text: str


@dataclass(frozen=True)
class _Block:
    body: tuple
    end: Loc


@v_args(meta=True)
class _ToAST(Transformer):
    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def _loc(self, meta) -> Loc:
        line = getattr(meta, "line", None) or 0
        col = getattr(meta, "column", None) or 0
        end = getattr(meta, "end_column", None) if getattr(meta, "end_line", None) == line \
            else None
        return Loc(self.file, line, col, end)

    def _tloc(self, tok) -> Loc:
        return _token_loc(tok, self.file)

    def _end(self, meta) -> Loc:
        """The position of the last character of a rule (its closing brace)."""
        line = getattr(meta, "end_line", None) or 0
        col = (getattr(meta, "end_column", None) or 1) - 1
        return Loc(self.file, line, max(col, 1))

    # expressions
    def number(self, meta, c):
        text = str(c[0])
        if text.isdigit() and len(text.lstrip("0")) >= len(str(MAX_INT)) and \
                (len(text.lstrip("0")) > len(str(MAX_INT)) or int(text) > MAX_INT):
            # before int(): Python refuses to convert more than 4300 digits at all
            raise CellError([Diagnostic(
                "error", "E205", f"the integer {_shorten(text)} is too large: numbers in a "
                f"spec are at most {MAX_INT} (2**63 - 1, what an array dimension can hold)",
                self._loc(meta))])
        return A.Num(_number(text), self._loc(meta))

    def string(self, meta, c):
        return A.Str(_unquote(str(c[0])), self._loc(meta))

    def true(self, meta, c):
        return A.Bool(True, self._loc(meta))

    def false(self, meta, c):
        return A.Bool(False, self._loc(meta))

    def name(self, meta, c):
        return A.Name(str(c[0]), self._tloc(c[0]))

    def delayed(self, meta, c):
        return A.Delayed(str(c[0]), str(c[1]), _number(str(c[2])), self._loc(meta))

    def delayed_ahead(self, meta, c):
        return A.Delayed(str(c[0]), str(c[1]), -_number(str(c[2])), self._loc(meta))

    def delayed_now(self, meta, c):
        return A.Delayed(str(c[0]), str(c[1]), 0, self._loc(meta))

    def tuple(self, meta, c):
        return A.TupleExpr(tuple(c), self._loc(meta))

    def add(self, meta, c):
        return A.BinOp("+", c[0], c[1], self._loc(meta))

    def sub(self, meta, c):
        return A.BinOp("-", c[0], c[1], self._loc(meta))

    def mul(self, meta, c):
        return A.BinOp("*", c[0], c[1], self._loc(meta))

    def div(self, meta, c):
        return A.BinOp("/", c[0], c[1], self._loc(meta))

    def neg(self, meta, c):
        return A.Neg(c[0], self._loc(meta))

    def kwarg(self, meta, c):
        return A.KwArg(str(c[0]), c[1], self._loc(meta))

    def args(self, meta, c):
        return list(c)

    def call(self, meta, c):
        func, args = c[0], c[1] or []
        pos = tuple(a for a in args if not isinstance(a, A.KwArg))
        kws = tuple(a for a in args if isinstance(a, A.KwArg))
        return A.Call(func, pos, kws, self._loc(meta))

    # statements
    def docstring(self, meta, c):
        return _Doc(_unquote(str(c[0])))

    def input_decl(self, meta, c):
        return A.InputDecl(tuple(str(t) for t in c), tuple(self._tloc(t) for t in c),
                           self._loc(meta))

    def output_decl(self, meta, c):
        return A.OutputDecl(tuple(str(t) for t in c), tuple(self._tloc(t) for t in c),
                            self._loc(meta))

    def state_decl(self, meta, c):
        init = str(c[1]) if c[1] is not None else "zeros"
        init_loc = self._tloc(c[1]) if c[1] is not None else None
        return A.StateDecl(str(c[0]), init, self._tloc(c[0]), init_loc)

    def weight_decl(self, meta, c):
        return A.WeightDecl(str(c[0]), c[1], self._tloc(c[0]))

    def targets(self, meta, c):
        return c

    def equation(self, meta, c):
        toks = c[0]
        return A.Equation(tuple(str(t) for t in toks), c[1], self._tloc(toks[0]),
                          tuple(self._tloc(t) for t in toks))

    def block(self, meta, c):
        return _Block(tuple(c), self._end(meta))

    def if_stmt(self, meta, c):
        then, orelse = c[1], c[2]
        return A.If(c[0], then.body, orelse.body if orelse is not None else (), self._loc(meta),
                    then_end=then.end, end=(orelse or then).end)

    def shape(self, meta, c):
        return tuple(c)

    def input_seq(self, meta, c):
        return A.SeqDecl("input", str(c[0]), c[1], self._tloc(c[0]))

    def target_seq(self, meta, c):
        return A.SeqDecl("target", str(c[0]), c[1], self._tloc(c[0]))

    def loss_stmt(self, meta, c):
        return A.Loss(c[0], self._loc(meta))

    def setting(self, meta, c):
        return A.Setting(str(c[0]), c[1], self._tloc(c[0]))

    def train_block(self, meta, c):
        return A.Train(tuple(c), self._loc(meta), end=self._end(meta))

    # definitions
    def param(self, meta, c):
        return A.Param(str(c[0]), c[1], self._tloc(c[0]))

    def params(self, meta, c):
        return tuple(c)

    @staticmethod
    def _split_doc(items):
        items = list(items)
        if items and isinstance(items[0], _Doc):
            return items[0].text, tuple(items[1:])
        return None, tuple(items)

    def cell_def(self, meta, c):
        name, params = c[0], c[1] or ()
        doc, body = self._split_doc(c[2:])
        return A.CellDef(str(name), params, doc, body, self._tloc(name), end=self._end(meta))

    def model_def(self, meta, c):
        doc, body = self._split_doc(c[1:])
        return A.ModelDef(str(c[0]), doc, body, self._tloc(c[0]), end=self._end(meta))

    def import_stmt(self, meta, c):
        tok = c[0]
        if tok.type == "STRING":
            return A.Import(_unquote(str(tok)), True, self._tloc(tok))
        return A.Import(str(tok), False, self._tloc(tok))

    def start(self, meta, c):
        return list(c)


def _shorten(digits: str) -> str:
    digits = digits.lstrip("0")
    return digits if len(digits) <= 24 else f"{digits[:10]}...({len(digits)} digits)"


def _number(text: str) -> int | float:
    return int(text) if re.fullmatch(r"[0-9]+", text) else float(text)


_TOP = re.compile(r"^(cell|model|import)\b", re.M)


def _parse_items(text: str, file: str) -> list:
    tree = _parser().parse(text)
    deep = _check_depth(tree, file)
    if deep is not None:
        raise CellError([deep])
    try:
        return _ToAST(file).transform(tree)
    except VisitError as e:  # pragma: no cover - a Transformer bug, not the user's
        raise e.orig_exc from None


def parse(text: str, file: str = "<string>") -> A.Module:
    """Parse one file's text; raises CellError listing every syntax error found."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_FILE_BYTES:
        raise CellError([_too_large(file, size)])
    text = normal_text(text)  # a BOM, Windows line ends: see normal_text
    SOURCES.add(file, text)
    try:
        return A.Module(file, tuple(_parse_items(text, file)))
    except UnexpectedInput as first:
        diags = _recover(text, file, first)
        raise CellError(diags) from None


def _recover(text: str, file: str, first: UnexpectedInput) -> list[Diagnostic]:
    """Parse each top-level definition on its own to report one error per broken one."""
    starts = [m.start() for m in _TOP.finditer(text)]
    if len(starts) <= 1:
        return [_syntax_diagnostic(first, text, file)]
    starts.append(len(text))
    if starts[0] > 0 and text[:starts[0]].strip():
        starts.insert(0, 0)
    diags = []
    for a, b in zip(starts, starts[1:]):
        # pad with the text before the piece, blanked, so lines and columns stay right
        piece = re.sub(r"[^\n]", " ", text[:a]) + text[a:b]
        try:
            _parse_items(piece, file)
        except UnexpectedInput as err:
            diags.append(_syntax_diagnostic(err, piece, file, piece_end=b))
        except CellError as err:
            diags.extend(err.diagnostics)
    return diags or [_syntax_diagnostic(first, text, file)]


def _too_large(file: str, size: int) -> Diagnostic:
    return Diagnostic("error", "E002", f"{file} is {size} bytes; a spec file may have at most "
                      f"{MAX_FILE_BYTES} bytes (1 MiB)", Loc(file, 0, 0))


def read_spec(path) -> str:
    """The text of a spec file (`normal_text`), or CellError: E001 when it is missing,
    not a regular file, unreadable or not UTF-8 text, E002 when it is too large.

    Its size is checked before it is read, and at most one byte more than the limit
    is read, so neither a huge file nor one whose size the system does not report
    (a pipe, /proc) is ever held in memory. The messages quote nothing from it.
    """
    p = Path(path)

    def error(code: str, message: str) -> CellError:
        return CellError([Diagnostic("error", code, message, Loc(str(p), 0, 0))])

    try:
        if not p.exists():
            raise error("E001", f"no such file: {p}")
        if not p.is_file():  # a folder, a pipe or a device: reading it may never end
            raise error("E001", f"not a regular file: {p}")
        with p.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise error("E001", f"cannot read {p}: {e.strerror or e.__class__.__name__}") from None
    except ValueError:  # a NUL byte in the name
        raise error("E001", f"no such file: {p}") from None
    if len(data) > MAX_FILE_BYTES:
        raise CellError([_too_large(str(p), max(len(data), _size(p)))])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error("E001", f"cannot read {p}: not UTF-8 text (byte 0x{data[e.start]:02x} "
                    f"at offset {e.start})") from None
    return normal_text(text)


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def parse_file(path) -> A.Module:
    return parse(read_spec(path), str(path))

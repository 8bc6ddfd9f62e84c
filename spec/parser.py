"""Parse `.cell` text into `spec.ast` nodes.

The grammar lives in `cell.lark` beside this file and is loaded once, with
the LALR parser and `propagate_positions=True`. A Transformer turns Lark's
tree into frozen dataclasses. Syntax errors are labelled with
`UnexpectedInput.match_examples` (each label has a test in
tests/test_syntax_errors.py). When the whole file does not parse, it is cut
at its top-level `cell` / `model` / `import` lines and each piece is parsed
on its own, so one run reports one syntax error per broken definition.
"""
from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

import lark
from lark import Transformer, v_args

from . import ast as A
from .diagnostics import SOURCES, CellError, Diagnostic, Loc


@lru_cache(maxsize=1)
def grammar_text() -> str:
    return resources.files(__package__).joinpath("cell.lark").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    return lark.Lark(grammar_text(), parser="lalr", propagate_positions=True,
                     maybe_placeholders=True)


# -------------------------------------------------------------- syntax error labels
# Each label maps to bad snippets that end in that error; match_examples
# compares the parser state of the user's error with the states of these.

SYNTAX_LABELS: dict[tuple[str, str], list[str]] = {
    ("E101", "missing '}' to close the block"): [
        "cell A() { input x output x",
        "cell A() { input x\n",
        "model M { input x: [1, 2, 2]\n",
        "cell A() { if p { a = b }",
        "cell A() { a = b\n",
        "model M { loss bce(a, b)\n",
    ],
    ("E102", "missing '=' in an equation"): [
        "cell A() { a, b split(z, 2) }",
        "cell A() { weight W kernel(1, 3) }",
    ],
    ("E103", "unknown keyword or statement"): [
        "celll A() { }",
        "cel A() { }",
        "modle M { }",
    ],
    ("E104", "unbalanced parentheses"): [
        "cell A() { a = f(b }",
        "cell A() { a = (b + c }",
        "cell A() { a = f(g(b) }",
        "cell A() { a = b) }",
        "cell A() { a = f(b)) }",
        "cell A( { }",
        "model M { a = f(b }",
        "cell A() { a = f(b\n c = d }",
        "cell A() { a = f(b, }",
    ],
    ("E107", "missing '{' to open the body"): [
        "cell A() input x }",
        "model M input x",
        "cell A() a = b",
        "cell A(x) input",
    ],
    ("E109", "missing shape: write `[C, H, W]`"): [
        "model M { input x }",
        "model M { input x: }",
        "model M { target y }",
        "model M { input x: 1 }",
    ],
    ("E110", "missing expression"): [
        "cell A() { a = }",
        "cell A() { a = b + }",
        "cell A() { a = b * }",
        "model M { loss }",
        "cell A() { weight W = }",
        "cell A() { a = - }",
    ],
}

_LABEL_OF = {label: code for (code, label) in SYNTAX_LABELS}


def _signature(err: lark.exceptions.UnexpectedInput):
    """The LALR state an error happened in, and the token types it would have accepted.

    `UnexpectedInput.match_examples` compares whole parser stacks, so an example
    only matches errors at the same nesting depth; comparing the state at the
    top of the stack (plus the accepted tokens) lets one example cover a
    mistake wherever it is in a file.
    """
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
            except lark.exceptions.UnexpectedInput as e:
                sigs.append((_signature(e), label))
            else:  # pragma: no cover - a label example that parses is a bug in this table
                raise AssertionError(f"syntax label example parses: {ex!r}")
    return sigs


def _match_label(err: lark.exceptions.UnexpectedInput) -> str | None:
    """Label of the example whose error state matches best (same state and token first)."""
    pos, accepts, token = _signature(err)
    best, best_score = None, 0
    for (epos, eacc, etok), label in _example_signatures():
        score = 0
        if pos is not None and epos == pos:
            score = 2 + (etok == token)
        elif accepts and eacc == accepts:
            score = 1 + (etok == token) * 0.5
        if score > best_score:
            best, best_score = label, score
    return best


def _loc_of(meta_or_tok, file: str) -> Loc:
    line = getattr(meta_or_tok, "line", None) or 0
    col = getattr(meta_or_tok, "column", None) or 0
    end_col = getattr(meta_or_tok, "end_column", None)
    end_line = getattr(meta_or_tok, "end_line", None)
    if end_line != line:
        end_col = None
    return Loc(file, line, col, end_col)


def _syntax_diagnostic(err: lark.exceptions.UnexpectedInput, text: str, file: str) -> Diagnostic:
    line, col = max(err.line, 1), max(err.column, 1)
    if isinstance(err, lark.exceptions.UnexpectedCharacters):
        ch = text[err.pos_in_stream] if err.pos_in_stream < len(text) else ""
        if ch == '"':
            return Diagnostic("error", "E105", "unterminated string", Loc(file, line, col))
        return Diagnostic("error", "E106", f"invalid character {ch!r}", Loc(file, line, col))
    label = _match_label(err)
    word = _two_words(err, text)
    if word is not None:
        return _two_word_diagnostic(word, err, text, file)
    if isinstance(err, lark.exceptions.UnexpectedEOF) or (
            isinstance(err, lark.exceptions.UnexpectedToken) and err.token.type == "$END"):
        loc = _end_loc(text, file)
        if label in ("missing '}' to close the block", "unbalanced parentheses",
                     "missing expression"):
            return Diagnostic("error", _LABEL_OF[label], f"{label} before the end of the file",
                              loc)
        return Diagnostic("error", "E108", "unexpected end of file", loc)
    found = ""
    if isinstance(err, lark.exceptions.UnexpectedToken):
        found = f" (found {err.token.value!r})" if err.token.value else ""
    if label is None:
        expected = ", ".join(sorted(_pretty(t) for t in getattr(err, "expected", ())))[:120]
        msg = "syntax error" + found + (f"; expected one of: {expected}" if expected else "")
        return Diagnostic("error", "E100", msg, Loc(file, line, col))
    return Diagnostic("error", _LABEL_OF[label], label + found, Loc(file, line, col))


KEYWORDS = ("cell", "model", "import", "input", "target", "state", "weight", "output",
            "loss", "train", "if", "else")


def _two_words(err, text: str):
    """(first, second) when a statement starts with two names, as in `a b` or `inputs x`."""
    if not isinstance(err, lark.exceptions.UnexpectedToken) or err.token.type != "NAME":
        return None
    if set(err.accepts or err.expected or ()) != {"EQUAL", "COMMA"}:
        return None
    before = text[:err.token.start_pos].rstrip()
    m = re.search(r"([A-Za-z_][A-Za-z0-9_]*)$", before)
    if not m:
        return None
    return m.group(1), m.start(1), err.token


def _two_word_diagnostic(words, err, text: str, file: str) -> Diagnostic:
    import difflib
    first, first_pos, second = words
    line = text.count("\n", 0, first_pos) + 1
    col = first_pos - (text.rfind("\n", 0, first_pos) + 1) + 1
    if first in ("cell", "model", "import"):
        return Diagnostic("error", "E101", f"missing '}}' to close the block before {first!r}",
                          Loc(file, line, col, col + len(first)))
    close = difflib.get_close_matches(first, KEYWORDS, n=1, cutoff=0.6)
    if close:
        return Diagnostic("error", "E103", f"unknown keyword {first!r}; did you mean "
                          f"{close[0]!r}?", Loc(file, line, col, col + len(first)))
    return Diagnostic("error", "E102", f"missing '=' after {first!r} (found "
                      f"{second.value!r})", Loc(file, second.line, second.column))


_TERMINAL_NAMES = {"RBRACE": "'}'", "LBRACE": "'{'", "RPAR": "')'", "LPAR": "'('",
                   "EQUAL": "'='", "COMMA": "','", "COLON": "':'", "NAME": "a name",
                   "NUMBER": "a number", "STRING": "a string", "LSQB": "'['", "RSQB": "']'",
                   "SEMICOLON": "';'", "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'",
                   "SLASH": "'/'", "INT": "an integer"}


def _pretty(term: str) -> str:
    if term in _TERMINAL_NAMES:
        return _TERMINAL_NAMES[term]
    if term.isupper():
        return repr(term.lower())
    return term


def _end_loc(text: str, file: str) -> Loc:
    lines = text.splitlines() or [""]
    return Loc(file, len(lines), len(lines[-1]) + 1)


# -------------------------------------------------------------- tree -> AST

def _unquote(s: str) -> str:
    if s.startswith('"""'):
        body = s[3:-3]
        # dedent docstrings the way Python's inspect.cleandoc does
        import inspect
        return inspect.cleandoc(body)
    return s[1:-1]


@v_args(meta=True)
class _ToAST(Transformer):
    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def _loc(self, meta) -> Loc:
        return _loc_of(meta, self.file)

    def _tloc(self, tok) -> Loc:
        return _loc_of(tok, self.file)

    # expressions
    def number(self, meta, c):
        text = str(c[0])
        value = int(text) if re.fullmatch(r"[0-9]+", text) else float(text)
        return A.Num(value, self._loc(meta))

    def string(self, meta, c):
        return A.Str(_unquote(str(c[0])), self._loc(meta))

    def true(self, meta, c):
        return A.Bool(True, self._loc(meta))

    def false(self, meta, c):
        return A.Bool(False, self._loc(meta))

    def name(self, meta, c):
        return A.Name(str(c[0]), self._tloc(c[0]))

    def delayed(self, meta, c):
        return A.Delayed(str(c[0]), str(c[1]), int(c[2]), self._loc(meta))

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
        return ("doc", _unquote(str(c[0])))

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
        return tuple(c)

    def if_stmt(self, meta, c):
        return A.If(c[0], c[1], c[2] or (), self._loc(meta))

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
        return A.Train(tuple(c), self._loc(meta))

    # definitions
    def param(self, meta, c):
        return A.Param(str(c[0]), c[1], self._tloc(c[0]))

    def params(self, meta, c):
        return tuple(c)

    def _split_doc(self, items):
        doc = None
        body = []
        for it in items:
            if isinstance(it, tuple) and len(it) == 2 and it[0] == "doc":
                doc = it[1]
            else:
                body.append(it)
        return doc, tuple(body)

    def cell_def(self, meta, c):
        name, params = c[0], c[1] or ()
        doc, body = self._split_doc(c[2:])
        return A.CellDef(str(name), params, doc, body, self._tloc(name))

    def model_def(self, meta, c):
        doc, body = self._split_doc(c[1:])
        return A.ModelDef(str(c[0]), doc, body, self._tloc(c[0]))

    def import_stmt(self, meta, c):
        tok = c[0]
        if tok.type == "STRING":
            return A.Import(_unquote(str(tok)), True, self._tloc(tok))
        return A.Import(str(tok), False, self._tloc(tok))

    def start(self, meta, c):
        return list(c)


_TOP = re.compile(r"^(cell|model|import)\b", re.M)


def _parse_items(text: str, file: str) -> list:
    tree = _parser().parse(text)
    return _ToAST(file).transform(tree)


def parse(text: str, file: str = "<string>") -> A.Module:
    """Parse one file's text; raises CellError listing every syntax error found."""
    SOURCES.add(file, text)
    try:
        return A.Module(file, tuple(_parse_items(text, file)))
    except lark.exceptions.UnexpectedInput as first:
        diags = _recover(text, file, first)
        raise CellError(diags) from None


def _recover(text: str, file: str, first: lark.exceptions.UnexpectedInput) -> list[Diagnostic]:
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
        except lark.exceptions.UnexpectedInput as err:
            diags.append(_syntax_diagnostic(err, piece, file))
    return diags or [_syntax_diagnostic(first, text, file)]


def parse_file(path) -> A.Module:
    from pathlib import Path
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CellError([Diagnostic("error", "E001", f"no such file: {p}",
                                    Loc(str(p), 0, 0))]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise CellError([Diagnostic("error", "E001", f"cannot read {p}: {e}",
                                    Loc(str(p), 0, 0))]) from None
    return parse(text, str(path))

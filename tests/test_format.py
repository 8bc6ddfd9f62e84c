"""`convc fmt`: the canonical form is stable, keeps the meaning, and keeps the comments.

Two properties hold for every file that parses: formatting twice gives what
formatting once gave (idempotence), and the formatted text parses to the same
tree as the original, source positions aside (`spec.ast.without_locs`). They
are checked on the examples, the standard library, the bad-spec catalogue and
on generated programs; the other tests pin down the layout itself.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings

from convc.spec.ast import without_locs
from convc.spec.diagnostics import CellError
from convc.spec.format import format_file, format_source
from convc.spec.parser import parse
from test_fuzz import SETTINGS, examples, grammar_programs, mutants

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "examples").glob("*.cell")) + sorted(
    (ROOT / "spec" / "stdlib").glob("*.cell")) + sorted(
    (ROOT / "tests" / "bad_specs").rglob("*.cell"))


SHIPPED = [p for p in FILES if "bad_specs" not in p.parts]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_files_are_in_canonical_form(path: Path):
    """What a user reads first is what `convc fmt` writes: `convc fmt --check` passes."""
    text = path.read_text(encoding="utf-8")
    assert format_source(text, str(path)) == text, (
        f"{path.relative_to(ROOT)} is not formatted: run `convc fmt --write` on it")


def same_meaning(a: str, b: str) -> bool:
    return without_locs(parse(a, "f.cell")) == without_locs(parse(b, "f.cell"))


def assert_canonical(text: str) -> str:
    once = format_source(text, "f.cell")
    assert format_source(once, "f.cell") == once, "not idempotent"
    assert same_meaning(text, once), "the formatter changed the meaning"
    return once


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_files_format_canonically(path: Path):
    text = path.read_text(encoding="utf-8")
    out = assert_canonical(text)
    comments = [line.strip() for line in text.splitlines() if line.strip().startswith("#")]
    for c in comments:
        assert c in out, f"lost comment {c!r}"


def fmt(text: str) -> str:
    return format_source(textwrap.dedent(text), "f.cell")


def test_layout():
    assert fmt("""\
        import std
        cell   Tiny( hidden,kernel=3 ){input x;state h
        weight W=kernel(4*hidden,kernel) ; weight b = bias(hidden,per_pixel=true)
        h=tanh(conv(concat(x,h[ t - 1 ]),W,padding=same)+b) output h}
        model m{input x:[1,16,16] target y:[1,16,16]
        l=Tiny(hidden=8) h=l(x) loss mse(h,y) train{lr=1e-3;optimizer="adam"}}
        """) == textwrap.dedent("""\
        import std

        cell Tiny(hidden, kernel = 3) {
            input x
            state h = zeros
            weight W = kernel(4 * hidden, kernel)
            weight b = bias(hidden, per_pixel = true)
            h = tanh(conv(concat(x, h[t-1]), W, padding = same) + b)
            output h
        }

        model m {
            input x: [1, 16, 16]
            target y: [1, 16, 16]
            l = Tiny(hidden = 8)
            h = l(x)
            loss mse(h, y)
            train {
                lr = 0.001
                optimizer = "adam"
            }
        }
        """)


def test_comments_are_kept_where_they_were():
    src = """\
        # header comment

        import std  # the standard library

        # about the cell
        cell A(hidden) {  # after the brace
            \"\"\"Doc.\"\"\"
            input x
            # before the weight
            weight W = kernel(hidden, 3)   # trailing
            weight U = kernel(hidden, 1)         # aligned with the line above

            g = tanh(conv(x, W) +
                     # inside an expression
                     conv(x, U))  # at the end of the expression
            output g
            # before the closing brace
        }  # after the closing brace
        # at the end
        """
    assert fmt(src) == textwrap.dedent("""\
        # header comment

        import std  # the standard library

        # about the cell
        cell A(hidden) {  # after the brace
            \"\"\"Doc.\"\"\"
            input x
            # before the weight
            weight W = kernel(hidden, 3)  # trailing
            weight U = kernel(hidden, 1)  # aligned with the line above

            g = tanh(conv(x, W) + conv(x, U))  # at the end of the expression
            # inside an expression
            output g
            # before the closing brace
        }  # after the closing brace
        # at the end
        """)
    assert_canonical(textwrap.dedent(src))


def test_comments_in_if_else_and_train_blocks():
    out = assert_canonical(textwrap.dedent("""\
        cell A(hidden, p = true) {
            input x
            weight W = kernel(hidden, 3)
            if p {  # the peephole path
                # then
                g = sigmoid(conv(x, W))
                # end of then
            } else {  # otherwise
                g = tanh(conv(x, W))
            }  # end of if
            output g
        }

        model m {
            input x: [1, 4, 4]
            target y: [1, 4, 4]
            loss mse(x, y)
            train {
                # optimiser
                lr = 0.1  # step size
                # last
            }
        }
        """))
    assert "    if p {  # the peephole path\n        # then\n" in out
    assert "        # end of then\n    } else {  # otherwise\n" in out
    assert "    }  # end of if\n" in out
    assert "    train {\n        # optimiser\n        lr = 0.1  # step size\n        # last\n" \
        "    }\n" in out


def test_trailing_comments_align_in_a_run_of_lines():
    out = fmt("""\
        cell A(hidden) {
            input x
            weight W = kernel(4 * hidden, 3)  # main
            weight b = bias(hidden, per_pixel = true)  # one value per pixel
            g = conv(x, W)
            output g
        }
        """)
    assert "    weight W = kernel(4 * hidden, 3)           # main\n" in out
    assert "    weight b = bias(hidden, per_pixel = true)  # one value per pixel\n" in out


def test_docstrings():
    out = assert_canonical(textwrap.dedent('''\
        cell A() {
            """First line.

                An indented line.
            Last line."""
        }
        model B {
            "  a plain string keeps its spaces"
            loss mse(x, y)
        }
        model C {
            """One line."""
            loss mse(x, y)
        }
        '''))
    assert '    """First line.\n\n        An indented line.\n    Last line.\n    """\n' in out
    assert '    "  a plain string keeps its spaces"\n' in out
    assert '    """One line."""\n' in out


@pytest.mark.parametrize("src,want", [
    ("a - (b - c)", "a - (b - c)"),
    ("(a - b) - c", "a - b - c"),
    ("(a + b) * c", "(a + b) * c"),
    ("a * (b * c)", "a * (b * c)"),
    ("a / (2 * b)", "a / (2 * b)"),
    ("-(a + b)", "-(a + b)"),
    ("- - a", "--a"),
    ("a * -b", "a * -b"),
    ("((a))", "a"),
    ("(a, (b + c))", "(a, b + c)"),
    ("(f)(x)", "f(x)"),
    ("(a + b)(x)", "(a + b)(x)"),
    ("f(x)(y, init = z)", "f(x)(y, init = z)"),
    ("f(k = 1, x)", "f(x, k = 1)"),
    ("1e-3 + 2. + .5 + 007", "0.001 + 2.0 + 0.5 + 7"),
    ("1e999", "1e999"),
    ('"a#b"', '"a#b"'),
    ("h[t - 1] + h[t] + h[t + 2]", "h[t-1] + h[t] + h[t+2]"),
])
def test_expressions(src, want):
    out = fmt(f"cell A() {{\n    g = {src}\n}}\n")
    assert out == f"cell A() {{\n    g = {want}\n}}\n"
    assert same_meaning(f"cell A() {{ g = {src} }}", out)


def test_blank_lines():
    out = fmt("""\


        import std
        import "other.cell"
        cell A() {

            input x


            output x

        }
        model M {
            loss mse(x, y)
        }


        """)
    assert out == textwrap.dedent("""\
        import std
        import "other.cell"

        cell A() {
            input x

            output x
        }

        model M {
            loss mse(x, y)
        }
        """)


def test_empty_and_comment_only_files():
    assert format_source("") == ""
    assert format_source("\n\n# only a comment\n\n") == "# only a comment\n"


def test_syntax_error_is_a_cell_error():
    with pytest.raises(CellError):
        format_source("cell A( {", "bad.cell")


def test_format_file(tmp_path: Path):
    p = tmp_path / "m.cell"
    p.write_text("cell A(){input x output x}")
    res = format_file(p, check=True)
    assert res.changed and p.read_text() == "cell A(){input x output x}"
    res = format_file(p, write=True)
    assert res.changed and p.read_text() == res.text == \
        "cell A() {\n    input x\n    output x\n}\n"
    assert not format_file(p, check=True).changed


@settings(max_examples=examples(0.3), **SETTINGS)
@given(grammar_programs)
def test_generated_programs_format_canonically(text):
    assert_canonical(text)


@settings(max_examples=examples(0.5), **SETTINGS)
@given(mutants())
def test_mutated_programs_format_canonically(text):
    try:
        parse(text, "f.cell")
    except CellError:
        return  # only text that parses has a canonical form
    assert_canonical(text)

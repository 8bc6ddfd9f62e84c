"""Every syntax error label is triggered, at the exact line and column, in realistic files.

A label is an error code with a message that says what to do (spec/parser.py
SYNTAX_LABELS). Each case below is a small but whole `.cell` file with one
mistake somewhere in its middle; the test checks the code, the line and the
column of the one diagnostic it gives. Further tests: one error per broken
definition, the gcc-style text and the JSON form, and the label table itself.
"""
from __future__ import annotations

import json
import textwrap

import pytest

from convc.compiler.driver import check
from convc.spec.diagnostics import CellError, format_diagnostics
from convc.spec.parser import MAX_DEPTH, SYNTAX_LABELS, parse

GATE = """\
cell Gate(hidden) {{
    input x
    weight W = kernel(hidden, 3)
    {line}
    output g
}}
"""

CASES = [
    # E100: no more specific label: what could come there is listed
    ("E100", 3, 11, """\
        import std

        cell Gate {
            input x
            output x
        }
        """),
    # E101: a block left open; the next definition starts before its '}'
    ("E101", 8, 13, """\
        import std

        cell Elman(hidden) {
            input x
            state h = zeros
            weight W = kernel(hidden, 3)
            h = tanh(conv(concat(x, h[t-1]), W))
            output h

        model m {
            input x: [1, 8, 8]
            target y: [2, 8, 8]
            rnn = Elman(hidden = 2)
            h = rnn(x)
            loss mse(h, y)
        }
        """),
    # E101: an `if` block left open, found at the end of the file
    ("E101", 8, 2, """\
        cell Gated(hidden, peephole = true) {
            input x
            state h = zeros
            weight W = kernel(hidden, 3)
            if peephole {
                h = sigmoid(conv(concat(x, h[t-1]), W))
            output h
        }
        """),
    # E102: two targets, no '='
    ("E102", 4, 14, """\
        cell Gates(hidden) {
            input x
            weight W = kernel(2 * hidden, 3)
            z_i, z_f split(conv(x, W), 2)
            g = sigmoid(z_i) * tanh(z_f)
            output g
        }
        """),
    # E102: a weight without '='
    ("E102", 4, 14, GATE.format(line="weight U kernel(hidden, 1)\n    g = sigmoid(conv(x, W))")),
    # E102: a lone name on its own line
    ("E102", 4, 6, GATE.format(line="g\n    g = sigmoid(conv(x, W))")),
    # E102: a training setting without '='
    ("E102", 6, 12, """\
        model m {
            input x: [1, 8, 8]
            target y: [1, 8, 8]
            loss mse(x, y)
            train {
                lr 0.01
            }
        }
        """),
    # E103: a misspelt keyword in a model
    ("E103", 4, 5, """\
        import std

        model m {
            inputs x: [1, 8, 8]
            target y: [1, 8, 8]
            lstm = ConvLSTM(hidden = 4)
            h = lstm(x)
            loss mse(h, y)
        }
        """),
    # E103: a misspelt keyword at the top level
    ("E103", 3, 1, """\
        import std

        modle m {
            input x: [1, 8, 8]
        }
        """),
    # E103: a keyword from another language
    ("E103", 7, 7, """\
        cell Gated(hidden, peephole = true) {
            input x
            state h = zeros
            weight W = kernel(hidden, 3)
            if peephole {
                h = sigmoid(conv(concat(x, h[t-1]), W))
            } elif {
                h = tanh(conv(x, W))
            }
            output h
        }
        """),
    # E103: something that is not a statement
    ("E103", 4, 5, GATE.format(line="3 = sigmoid(conv(x, W))")),
    # E104: a '(' never closed; the error points after the last token of its line
    ("E104", 5, 31, """\
        cell Gate(hidden) {
            input x
            weight W = kernel(hidden, 3)
            weight b = bias(hidden)
            g = sigmoid(conv(x, W) + b
            output g
        }
        """),
    # E104: a ')' too many
    ("E104", 4, 28, GATE.format(line="g = sigmoid(conv(x, W)))")),
    # E104: a '}' too many
    ("E104", 7, 1, GATE.format(line="g = sigmoid(conv(x, W))") + "}\n"),
    # E105: a string not closed on its line
    ("E105", 8, 21, """\
        model m {
            input x: [1, 8, 8]
            target y: [1, 8, 8]
            weight W = kernel(1, 3)
            pred = sigmoid(conv(x, W))
            loss bce(pred, y)
            train {
                optimizer = "adam
                lr = 0.01
            }
        }
        """),
    # E105: a docstring never closed
    ("E105", 2, 5, """\
        cell Gate(hidden) {
            \"\"\"A gate.

            input x
            weight W = kernel(hidden, 3)
            g = sigmoid(conv(x, W))
            output g
        }
        """),
    # E106: a character the language does not have
    ("E106", 4, 29, GATE.format(line="g = sigmoid(conv(x, W)) @ 2")),
    # E106: a single-quoted string
    ("E106", 7, 21, """\
        model m {
            input x: [1, 8, 8]
            target y: [1, 8, 8]
            weight W = kernel(1, 3)
            loss mse(conv(x, W), y)
            train {
                optimizer = 'adam'
            }
        }
        """),
    # E107: no '{' after the parameters
    ("E107", 1, 18, """\
        cell Gate(hidden)
            input x
            weight W = kernel(hidden, 3)
            g = sigmoid(conv(x, W))
            output g
        }
        """),
    # E107: no '{' after `train`
    ("E107", 5, 10, """\
        model m {
            input x: [1, 8, 8]
            target y: [1, 8, 8]
            loss mse(x, y)
            train
                lr = 0.01
            }
        }
        """),
    # E108: the file ends in the middle of a definition's head
    ("E108", 9, 5, """\
        import std

        model m {
            input x: [1, 8, 8]
            target y: [1, 8, 8]
            loss mse(x, y)
        }

        cell
        """),
    # E109: a sequence without its shape
    ("E109", 4, 12, """\
        import std

        model m {
            input x
            target y: [1, 8, 8]
            loss mse(x, y)
        }
        """),
    # E109: a shape without its commas
    ("E109", 3, 21, """\
        model m {
            input x: [1, 8, 8]
            target y: [1, 8 8]
            loss mse(x, y)
        }
        """),
    # E109: a shape without its ':'
    ("E109", 2, 13, """\
        model m {
            input x [1, 8, 8]
            target y: [1, 8, 8]
            loss mse(x, y)
        }
        """),
    # E110: an operator with nothing after it
    ("E110", 4, 30, GATE.format(line="g = sigmoid(conv(x, W)) *")),
    # E110: a keyword argument without its value
    ("E110", 4, 37, GATE.format(line="g = sigmoid(conv(x, W, stride = ))")),
    # E110: a loss without its expression
    ("E110", 4, 9, """\
        model m {
            input x: [1, 8, 8]
            target y: [1, 8, 8]
            loss
        }
        """),
    # E111: a time index that is not t-1
    ("E111", 5, 31, """\
        cell Elman(hidden) {
            input x
            state h = zeros
            weight W = kernel(hidden, 3)
            h = tanh(conv(concat(x, h[1]), W))
            output h
        }
        """),
    # E111: a time index left open
    ("E111", 5, 34, """\
        cell Elman(hidden) {
            input x
            state h = zeros
            weight W = kernel(hidden, 3)
            h = tanh(conv(concat(x, h[t-1), W))
            output h
        }
        """),
    # E113: two arguments without a comma between them
    ("E113", 3, 30, GATE.format(line="").replace(
        "weight W = kernel(hidden, 3)", "weight W = kernel(hidden 3)").replace(
        "    \n", "    g = sigmoid(conv(x, W))\n")),
    # E113: in a cell's parameter list
    ("E113", 1, 18, """\
        cell Gate(hidden kernel) {
            input x
            weight W = kernel(hidden, kernel)
            g = sigmoid(conv(x, W))
            output g
        }
        """),
    # E114: a declaration without its name
    ("E114", 5, 11, GATE.format(line="g = sigmoid(conv(x, W))").replace("output g", "output")),
    # E114: a model without its name
    ("E114", 1, 7, """\
        model {
            input x: [1, 8, 8]
            target y: [1, 8, 8]
            loss mse(x, y)
        }
        """),
]


def _only_error(text: str, file: str = "case.cell"):
    with pytest.raises(CellError) as info:
        parse(textwrap.dedent(text), file)
    errors = info.value.errors
    assert len(errors) == 1, info.value.format()
    return errors[0], info.value


@pytest.mark.parametrize("code,line,col,text", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_label(code, line, col, text):
    d, err = _only_error(text)
    assert (d.code, d.loc.line, d.loc.col) == (code, line, col), err.format()
    assert d.loc.file == "case.cell"


def test_every_label_has_a_case():
    codes = {code for code, _ in SYNTAX_LABELS} | {"E100", "E105", "E106", "E108", "E112"}
    tested = {c[0] for c in CASES} | {"E112"}  # E112: test_nesting_too_deep
    assert codes <= tested, sorted(codes - tested)


@pytest.mark.parametrize("code,label,example", [
    (code, label, ex) for (code, label), exs in SYNTAX_LABELS.items() for ex in exs])
def test_label_examples_get_their_label(code, label, example):
    """The table's own examples are labelled as the table says (it is not stale)."""
    d, _ = _only_error(example)
    assert d.code == code, d.message


def test_nesting_too_deep():
    deep = " + ".join(["x"] * (MAX_DEPTH + 10))
    d, _ = _only_error(GATE.format(line=f"g = {deep}"))
    assert (d.code, d.loc.line, d.loc.col) == ("E112", 4, 9)


def test_very_deep_nesting_is_an_error_not_a_crash():
    for text in ("tanh(" * 3000 + "x" + ")" * 3000, "-" * 3000 + "x", "(" * 3000 + "x"):
        with pytest.raises(CellError):
            check(text=GATE.format(line=f"g = {text}"), file="deep.cell")


def test_two_broken_definitions_give_two_errors():
    text = textwrap.dedent("""\
        import std

        cell Gate(hidden) {
            input x
            weight W = kernel(hidden, 3)
            g = sigmoid(conv(x, W)
            output g
        }

        cell Fine(hidden) {
            input x
            weight W = kernel(hidden, 3)
            g = tanh(conv(x, W))
            output g
        }

        model m {
            input x [1, 8, 8]
            target y: [1, 8, 8]
            loss mse(x, y)
        }
        """)
    with pytest.raises(CellError) as info:
        check(text=text, file="two.cell")
    got = [(d.code, d.loc.line, d.loc.col) for d in info.value.errors]
    assert got == [("E104", 6, 27), ("E109", 18, 13)]
    assert info.value.format().splitlines()[-1] == "2 errors"


def test_text_form_is_gcc_style():
    with pytest.raises(CellError) as info:
        parse(GATE.format(line="g = sigmoid(conv(x, W)) @ 2"), "gate.cell")
    assert info.value.format().splitlines() == [
        "gate.cell:4:29: error[E106]: invalid character '@'",
        "        g = sigmoid(conv(x, W)) @ 2",
        "                                ^",
        "1 error",
    ]


def test_caret_spans_the_culprit():
    with pytest.raises(CellError) as info:
        parse(GATE.format(line="g = sigmoid(conv(x, W))").replace("input x", "inptu x"),
              "gate.cell")
    lines = info.value.format().splitlines()
    assert lines[0] == "gate.cell:2:5: error[E103]: unknown keyword 'inptu'; did you mean 'input'?"
    assert lines[2] == "        ^~~~~"


def test_json_form():
    with pytest.raises(CellError) as info:
        parse(GATE.format(line="g = sigmoid(conv(x, W)) @ 2"), "gate.cell")
    data = json.loads(format_diagnostics(info.value.diagnostics, fmt="json"))
    assert (data["errors"], data["warnings"], data["summary"]) == (1, 0, "1 error")
    (d,) = data["diagnostics"]
    assert d == {"severity": "error", "code": "E106", "message": "invalid character '@'",
                 "file": "gate.cell", "line": 4, "column": 29, "end_column": None,
                 "source": "    g = sigmoid(conv(x, W)) @ 2", "notes": []}

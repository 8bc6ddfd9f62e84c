"""The language as users write it: the examples and the standard library, imports,
docstrings and training settings, end to end through the compiler.
"""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

import convc.api
from convc.compiler.driver import check, compile_model
from convc.spec import ast as A
from convc.spec.diagnostics import CellError, format_diagnostics
from convc.spec.format import format_source
from convc.spec.loader import load_program, stdlib_dir
from convc.spec.parser import MAX_FILE_BYTES, parse
from test_fuzz import UNUSED_INPUT_BUG

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.cell"))
STDLIB = sorted(stdlib_dir().glob("*.cell"))


def _id(p: Path) -> str:
    return p.name


@pytest.mark.parametrize("path", EXAMPLES + STDLIB, ids=_id)
def test_parses_checks_and_formats(path: Path):
    text = path.read_text(encoding="utf-8")
    parse(text, str(path))
    diags = check(path)
    assert not [d for d in diags if d.severity == "error"]
    once = format_source(text, str(path))
    assert format_source(once, str(path)) == once


def test_there_are_examples():
    names = {p.name for p in EXAMPLES}
    assert {"seed.cell", "stack.cell", "encoder_forecaster.cell"} <= names


def test_stdlib_cells():
    prog = load_program(text="import std\n", file=str(ROOT / "x.cell"))
    cells = prog.cells
    assert {"ConvLSTM", "ConvLSTMFused", "ConvGRU"} <= set(cells)
    params = {name: [(p.name, p.default) for p in c.params] for name, c in cells.items()}
    assert [n for n, _ in params["ConvLSTM"]] == ["hidden", "kernel", "peephole"]
    assert isinstance(params["ConvLSTM"][2][1], A.Bool) and params["ConvLSTM"][2][1].value
    for cell in cells.values():
        assert cell.doc, f"{cell.name} has no docstring"


@pytest.mark.parametrize("path", EXAMPLES, ids=_id)
def test_model_docstring_reaches_the_generated_code(path: Path):
    prog = load_program(path)
    mod = convc.api.load(path)
    model = prog.model()
    assert model.doc
    for line in model.doc.splitlines():
        assert line.rstrip() in mod.source
    for name in mod.MODEL["cells"].values():
        doc = prog.cells[name].doc
        if doc:
            assert doc.strip().splitlines()[0] in mod.source


def test_train_block_reaches_model_meta():
    mod = convc.api.load(ROOT / "examples" / "seed.cell")
    assert mod.MODEL["train"] == {"optimizer": "sgd", "lr": 0.5, "clip": 1.0, "steps": 200,
                                  "batch_size": 8, "size": 16}


def test_every_kind_of_training_value(tmp_path: Path):
    spec = tmp_path / "t.cell"
    spec.write_text(textwrap.dedent("""\
        model m {
            input x: [1, 4, 4]
            target y: [1, 4, 4]
            weight W = kernel(1, 1)
            pred = conv(x, W)
            output pred
            loss mse(pred, y)
            train {
                optimizer = "momentum"
                lr = 1e-2
                momentum = 0.9
                weight_decay = -0.0
                epochs = 3
                stateful = true
                clip_mode = "value"
            }
        }
        """))
    c = compile_model(spec)
    assert c.lowered.train == {"optimizer": "momentum", "lr": 0.01, "momentum": 0.9,
                               "weight_decay": -0.0, "epochs": 3, "stateful": True,
                               "clip_mode": "value"}


def test_relative_and_std_imports(tmp_path: Path):
    (tmp_path / "layers").mkdir()
    (tmp_path / "layers" / "small.cell").write_text(textwrap.dedent("""\
        cell Small(hidden) {
            \"\"\"A tiny recurrent layer.\"\"\"
            input x
            state h = zeros
            weight W = kernel(hidden, 3)
            h = tanh(conv(concat(x, h[t-1]), W))
            output h
        }
        """))
    (tmp_path / "main.cell").write_text(textwrap.dedent("""\
        import std
        import "layers/small.cell"

        model m {
            \"\"\"Two layers from two files.\"\"\"
            input x: [1, 8, 8]
            target y: [1, 8, 8]
            a = Small(hidden = 2)
            b = ConvGRU(hidden = 2)
            h = a(x)
            g = b(h)
            weight W = kernel(1, 1)
            pred = sigmoid(conv(g, W))
            output pred
            loss bce(pred, y)
        }
        """))
    assert not check(tmp_path / "main.cell")
    mod = convc.api.load(tmp_path / "main.cell")
    assert mod.MODEL["cells"] == {"a": "Small", "b": "ConvGRU"}
    assert "Two layers from two files." in mod.source
    assert "A tiny recurrent layer." in mod.source


def test_an_import_is_loaded_once(tmp_path: Path):
    (tmp_path / "a.cell").write_text('import "b.cell"\nimport std\n')
    (tmp_path / "b.cell").write_text("import std\ncell B(k) {\n    input x\n    output x\n}\n")
    (tmp_path / "main.cell").write_text('import "a.cell"\nimport "b.cell"\nimport std\n')
    prog = load_program(tmp_path / "main.cell")
    assert len(prog.modules) == 4  # main, a, b, std
    assert "B" in prog.cells


def test_errors_in_an_imported_file_point_into_it(tmp_path: Path):
    (tmp_path / "bad.cell").write_text("cell B( {\n}\n")
    (tmp_path / "main.cell").write_text('import "bad.cell"\n')
    with pytest.raises(CellError) as info:
        check(tmp_path / "main.cell")
    (d,) = info.value.errors
    assert Path(d.loc.file).name == "bad.cell" and d.loc.line == 1


def test_check_of_text_and_of_a_file_agree(tmp_path: Path):
    text = (ROOT / "examples" / "stack.cell").read_text()
    p = tmp_path / "stack.cell"
    p.write_text(text)
    assert [d.code for d in check(p)] == [d.code for d in check(text=text, file=str(p))]


def test_if_else_on_parameters():
    text = (ROOT / "spec" / "stdlib" / "std.cell").read_text() + textwrap.dedent("""\
        model m {
            input x: [1, 4, 4]
            target y: [1, 4, 4]
            a = ConvLSTM(hidden = 2, peephole = false)
            b = ConvLSTM(hidden = 2)
            h = a(x)
            g = b(h)
            weight W = kernel(1, 1)
            pred = sigmoid(conv(g, W))
            output pred
            loss bce(pred, y)
        }
        """)
    c = compile_model(text=text, file=str(ROOT / "peephole.cell"))
    names = set(c.lowered.params)
    assert "b.w_ci" in names and "a.w_ci" not in names


def test_comments_and_semicolons():
    text = textwrap.dedent("""\
        # a comment line
        cell A(hidden) { input x; weight W = kernel(hidden, 1); g = conv(x, W); output g }
        model m { input x: [1, 4, 4]; target y: [1, 4, 4]  # trailing
          a = A(hidden = 1); g = a(x); loss mse(g, y) }
        """)
    assert check(text=text, file=str(ROOT / "semi.cell")) == []


# ---------------------------------------------------------------- docs/language.md

DOC = ROOT / "docs" / "language.md"
_FENCE = re.compile(r"^```(\S*)(?: file=(\S+))?\n(.*?)^```$", re.M | re.S)


def _doc_blocks():
    return [(m.group(1), m.group(2), m.group(3)) for m in _FENCE.finditer(
        DOC.read_text(encoding="utf-8"))]


def test_doc_programs_check(tmp_path: Path):
    """Every complete program in the reference checks without errors and formats stably."""
    programs = [body for kind, file, body in _doc_blocks() if kind == "cell" and file is None]
    assert len(programs) >= 2
    for body in programs:
        assert not [d for d in check(text=body, file=str(tmp_path / "doc.cell"))
                    if d.severity == "error"]
        once = format_source(body)
        assert format_source(once) == once


def test_doc_error_examples_are_what_convc_prints(tmp_path: Path, monkeypatch):
    """The error catalogue is convc's own output: run every example, compare the text."""
    monkeypatch.chdir(tmp_path)
    pending: dict[str, str] = {}
    compared = set()
    for kind, file, body in _doc_blocks():
        if kind == "cell" and file is not None:
            pending[file] = body
            continue
        if kind not in ("text", "json") or not (pending or body.startswith(("missing.cell:",
                                                                           "big.cell:"))):
            continue
        for f in tmp_path.glob("*.cell"):
            f.unlink()
        for name, text in pending.items():
            (tmp_path / name).write_text(text)
        if body.startswith("big.cell:"):  # E002: a file one byte over the limit
            (tmp_path / "big.cell").write_text("#" * MAX_FILE_BYTES + "\n")
            pending = {"big.cell": ""}
        root = next(iter(pending), "missing.cell")
        # W002's example would also crash the compiler (see tests/test_fuzz.py)
        lower = not (UNUSED_INPUT_BUG and "W002" in body)
        try:
            diags = check(root, lower_models=lower)
        except CellError as e:
            diags = e.diagnostics
        fmt = "json" if kind == "json" else "text"
        assert format_diagnostics(diags, fmt).strip() == body.strip(), root
        compared.update(d.code for d in diags)
        pending = {}
    codes = set(re.findall(r"^### ([EW]\d{3})", DOC.read_text(), re.M))
    assert codes <= compared
    # every code convc can give has an example
    used = set()
    for folder in ("spec", "compiler"):
        for py in (ROOT / folder).glob("*.py"):
            used |= set(re.findall(r'"([EW]\d{3})"', py.read_text()))
    assert used <= codes, sorted(used - codes)


@pytest.mark.parametrize("cell", ["ConvLSTM", "ConvLSTMFused", "ConvGRU"])
def test_stdlib_cells_with_one_hidden_channel(cell: str):
    text = textwrap.dedent(f"""\
        import std
        model m {{
            input x: [1, 8, 8]
            target y: [1, 8, 8]
            l = {cell}(hidden = 1)
            h = l(x)
            loss mse(h, y)
        }}
        """)
    assert check(text=text, file=str(ROOT / "one.cell")) == []


def test_the_training_settings_table_is_the_schema():
    from convc.spec.settings import TRAIN

    doc = (Path(__file__).resolve().parents[1] / "docs" / "language.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[2].strip()
            for line in doc.splitlines() if line.startswith("| `")
            and line.split("|")[1].strip().strip("`") in TRAIN}
    assert set(rows) == set(TRAIN)
    for key, setting in TRAIN.items():
        if setting.kind is str and setting.choices:
            assert rows[key] == "one of " + ", ".join(f'`"{c}"`' for c in setting.choices)
        else:
            assert rows[key] == setting.describe(), key


# ---------------------------------------------------------------- errors inside cells the user did not write

STD = str((stdlib_dir() / "std.cell").resolve())  # as a diagnostic names it, run elsewhere


def _std_model(instance: str, application: str = "h = l(x)", more: str = "") -> str:
    """A model whose line 6 is `l = <instance>` (after `more` lines, when given)."""
    return ("import std\n\nmodel m {\n    input x: [1, 8, 8]\n    target y: [4, 8, 8]\n"
            f"{more}    l = {instance}\n    {application}\n    loss mse(h, y)\n}}\n")


def _std_line(text: str) -> int:
    return STD_LINES.index(text) + 1


STD_LINES = [line.strip() for line in (stdlib_dir() / "std.cell").read_text().splitlines()]


def _errors(tmp_path: Path, text: str, name: str = "main.cell"):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(CellError) as info:
        check(path)
    return path, info.value.errors


@pytest.mark.parametrize("instance, col, message, std_text", [
    # a parameter the user gave: the error is at that argument
    ("ConvLSTM(hidden = 0)", 18, "out must be a positive integer, got 0",
     "weight W_x = kernel(4 * hidden, kernel)"),
    ("ConvGRU(hidden = 1.5)", 17, "out must be a positive integer, got 3.0",
     "weight W_xzr = kernel(2 * hidden, kernel)"),
    ("ConvLSTMFused(hidden = \"big\")", 23, "cannot compute 4 * 'big'",
     "weight W = kernel(4 * hidden, kernel)"),
    ("ConvLSTM(hidden = 4, peephole = 3)", 30, "an if condition is true or false, got 3",
     "if peephole {"),
    ("ConvGRU(hidden = 4, kernel = (3, 3, 3))", 29,
     "size must be a positive integer or a pair (h, w), got (3, 3, 3)",
     "weight W_xzr = kernel(2 * hidden, kernel)"),
    # two arguments size the kernel: the error is at the instance
    ("ConvLSTM(hidden = 4, kernel = 4)", 9, "padding=same needs an odd kernel size, got 4x4",
     "z = conv(x, W_x) + conv(h[t-1], W_h)"),
])
def test_a_wrong_parameter_of_a_std_cell_is_the_users_line(tmp_path: Path, instance, col,
                                                           message, std_text):
    path, errors = _errors(tmp_path, _std_model(instance))
    (d,) = errors  # one error, not one per weight or convolution of the cell
    assert (d.loc.file, d.loc.line, d.loc.col) == (str(path), 6, col), d.format()
    assert message in d.message
    where = f"std.cell:{_std_line(std_text)}:"
    assert len(d.notes) == 1 and where in d.notes[0] and f"`{std_text}`" in d.notes[0]
    assert d.notes[0].startswith(f"in {instance.split('(')[0]}, at ")
    text = d.format().splitlines()
    assert text[0].startswith(f"{path}:6:{col}: error[{d.code}]: ")
    assert text[1] == f"        l = {instance}"  # the user's line is quoted, not std.cell's
    assert text[-1].startswith("    note: in ") and where in text[-1]


def test_a_shape_error_inside_a_std_cell_is_at_the_application(tmp_path: Path):
    text = _std_model("ConvLSTM(hidden = 4)", "h = l(steps = y, init = enc)",
                      more="    enc = ConvLSTM(hidden = 8)\n    e = enc(x)\n")
    path, errors = _errors(tmp_path, text)
    (d,) = errors
    assert (d.code, d.loc.file, d.loc.line, d.loc.col) == ("E300", str(path), 9, 9), d.format()
    assert "state l.h: [4, ?, ?] vs [8, 8, 8]" in d.message
    assert f"std.cell:{_std_line('state h = zeros')}:11" in d.notes[0]
    assert d.notes[1] == f"'l' is defined at {path}:8:9: `l = ConvLSTM(hidden = 4)`"


def test_the_json_form_points_at_the_users_line_with_the_library_line_as_a_note(
        tmp_path: Path, capsys, monkeypatch):
    import json

    from convc import cli

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "main.cell"
    path.write_text(_std_model("ConvLSTM(hidden = 0)"))
    assert cli.main(["check", str(path), "--diagnostics-format", "json"]) == 1
    (d,) = json.loads(capsys.readouterr().out)["diagnostics"]
    assert (d["code"], d["file"], d["line"], d["column"]) == ("E205", str(path), 6, 18)
    assert d["source"] == "    l = ConvLSTM(hidden = 0)"
    line = _std_line("weight W_x = kernel(4 * hidden, kernel)")
    assert d["notes"] == [f"in ConvLSTM, at {STD}:{line}:18: "
                          "`weight W_x = kernel(4 * hidden, kernel)`"]
    # and the text form
    assert cli.main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:6:18: error[E205]: out must be a positive integer, got 0\n"
                          "        l = ConvLSTM(hidden = 0)\n")
    assert f"    note: in ConvLSTM, at {STD}:{line}:18: " in err


def test_every_command_points_at_the_users_line(tmp_path: Path):
    path = tmp_path / "main.cell"
    path.write_text(_std_model("ConvLSTM(hidden = 4, peephole = 3)"))
    with pytest.raises(CellError) as info:
        compile_model(path)
    (d,) = info.value.errors
    assert (d.loc.file, d.loc.line, d.loc.col) == (str(path), 6, 30)


def test_two_instances_of_a_std_cell_each_report_their_own_mistake(tmp_path: Path):
    text = _std_model("ConvLSTM(hidden = 0)", "h = l(x)\n    k = ConvGRU(hidden = 4, kernel = 2)"
                      "\n    g = k(x)\n    loss mse(g, y)")
    path, errors = _errors(tmp_path, text)
    assert [(d.loc.line, d.loc.col) for d in errors] == [(6, 18), (8, 9)], \
        format_diagnostics(errors)


def test_an_error_in_the_users_imported_cell_stays_there_with_the_application_as_a_note(
        tmp_path: Path):
    (tmp_path / "layers.cell").write_text(textwrap.dedent("""\
        cell Shrink(hidden) {
            input x
            weight W = kernel(hidden, 7)
            g = relu(conv(x, W, padding = valid))
            output g
        }
        """))
    path, errors = _errors(tmp_path, textwrap.dedent("""\
        import "layers.cell"

        model m {
            input x: [1, 4, 4]
            target y: [2, 1, 1]
            shrink = Shrink(hidden = 2)
            g = shrink(x)
            loss mse(g, y)
        }
        """))
    (d,) = errors
    assert (Path(d.loc.file).name, d.loc.line, d.loc.col) == ("layers.cell", 4, 14)
    assert d.notes == (f"in 'shrink', applied at {path}:7:9: `g = shrink(x)`",
                       f"'shrink' is defined at {path}:6:14: `shrink = Shrink(hidden = 2)`")


# ---------------------------------------------------------------- every independent error, once

def test_errors_of_every_stage_are_reported_in_source_order(tmp_path: Path, capsys):
    from convc import cli

    path, errors = _errors(tmp_path, textwrap.dedent("""\
        import std

        cell Gate(hidden) {
            input x
            weight W = kernel(hidden, 3)
            g = sigmoid(conv(x, Wx))
            output g
        }

        model m {
            input x: [1, 8, 8]
            target y: [4, 8, 8]
            bad = ConvLSTM(hidden = 0)
            b = bad(x)
            gate = Gate(hidden = 1)
            g = gate(x)
            l = ConvLSTM(hidden = 2)
            h = l(x)
            loss mse(h, y)
            train { optimizer = "adamw" }
        }
        """))
    got = [(d.code, d.loc.line) for d in errors]
    assert got == [("E200", 6), ("E205", 13), ("E300", 19), ("E205", 20)], \
        format_diagnostics(errors)
    assert cli.main(["check", str(path)]) == 1
    heads = [line.split(": error")[0] for line in capsys.readouterr().err.splitlines()
             if ": error[" in line]
    assert heads == [f"{path}:6:25", f"{path}:13:20", f"{path}:19:10", f"{path}:20:25"]
    # the other commands report the same
    with pytest.raises(CellError) as info:
        compile_model(path)
    assert [(d.code, d.loc.line) for d in info.value.errors] == got


def test_what_only_follows_from_an_error_is_not_reported(tmp_path: Path):
    _, errors = _errors(tmp_path, textwrap.dedent("""\
        cell Bad(hidden) {
            input x
            state h = zeros
            weight W = kernel(hidden, 3)
            a = conv(x, W)
            h = tanh(a + conv(h[t-1], Q))
            output h
        }

        model m {
            input x: [1, 8, 8]
            target y: [2, 8, 8]
            bad = Bad(hidden = 3)
            b = bad(x)
            s = b + x
            weight W = kernel(1, 1)
            pred = conv(s, W)
            output pred
            loss mse(pred, y)
        }
        """))
    # b, s and pred follow from h, whose equation names an unknown Q: the 3 against 2
    # channels of the loss is not reported, nor is anything else
    assert [(d.code, d.loc.line) for d in errors] == [("E200", 6)]


def test_a_shape_error_after_a_failed_statement_of_the_same_model(tmp_path: Path):
    _, errors = _errors(tmp_path, textwrap.dedent("""\
        model m {
            input x: [1, 8, 8]
            input z: [2, 8, 8]
            target y: [1, 8, 8]
            a = tanh(x + unknown)
            b = x * z + a
            c = concat(x, z) + z
            loss mse(c, y)
        }
        """))
    assert [(d.code, d.loc.line) for d in errors] == [("E200", 5), ("E300", 7)], \
        format_diagnostics(errors)


def test_a_cell_used_by_two_models_reports_its_error_once(tmp_path: Path):
    _, errors = _errors(tmp_path, textwrap.dedent("""\
        cell Shrink(hidden) {
            input x
            weight W = kernel(hidden, 7)
            g = relu(conv(x, W, padding = valid))
            output g
        }

        model m1 {
            input x: [1, 4, 4]
            target y: [2, 1, 1]
            s = Shrink(hidden = 2)
            g = s(x)
            loss mse(g, y)
        }

        model m2 {
            input x: [1, 4, 4]
            target y: [2, 1, 1]
            s = Shrink(hidden = 2)
            g = s(x)
            loss mse(g, y)
        }
        """))
    assert [(d.code, d.loc.line) for d in errors] == [("E300", 4)]

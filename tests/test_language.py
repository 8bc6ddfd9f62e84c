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

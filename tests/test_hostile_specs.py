"""Specs written to hurt: they may not read other files, draw on the terminal or
exhaust memory, and odd but harmless bytes (a BOM, a form feed) are handled.

Each case was a defect once (issue 21): the test fails on the code before its fix.
"""
import json
import os
import textwrap
from pathlib import Path

import pytest

from convc.compiler.driver import check
from convc.spec.diagnostics import CellError, format_diagnostics
from convc.spec.loader import load_program
from convc.spec.parser import MAX_FILE_BYTES, MAX_PROGRAM_BYTES, parse

ROOT = Path(__file__).resolve().parents[1]
CELL = "cell A() {\n    input x\n    output x\n}\n"
SEED_TEXT = (ROOT / "examples" / "seed.cell").read_text()


def _errors(path) -> list:
    with pytest.raises(CellError) as info:
        check(path)
    return info.value.diagnostics


def _printed(diags) -> str:
    return format_diagnostics(diags) + format_diagnostics(diags, "json")


# ------------------------------------------------------------------ imports (§7)

def test_an_import_of_a_non_spec_file_quotes_nothing_from_it(tmp_path: Path):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    deep = os.path.relpath(secret, tmp_path / "sub")
    (tmp_path / "sub").mkdir()
    main = tmp_path / "sub" / "main.cell"
    main.write_text(f'import "{deep}"\n' + CELL)
    (d,) = _errors(main)
    assert d.code == "E230" and "not a .cell file" in d.message
    assert "root:x" not in _printed([d])


def test_a_link_named_cell_to_a_non_spec_file_is_refused(tmp_path: Path):
    (tmp_path / "secret.txt").write_text("password = hunter2\n")
    (tmp_path / "layers.cell").symlink_to(tmp_path / "secret.txt")
    (tmp_path / "main.cell").write_text('import "layers.cell"\n' + CELL)
    (d,) = _errors(tmp_path / "main.cell")
    assert d.code == "E230" and "hunter2" not in _printed([d])


@pytest.mark.parametrize("target", ["/proc/self/environ", "/etc/passwd", "/tmp/x.cell"])
def test_an_absolute_import_is_refused(tmp_path: Path, target):
    (tmp_path / "main.cell").write_text(f'import "{target}"\n' + CELL)
    (d,) = _errors(tmp_path / "main.cell")
    assert d.code == "E230" and "relative to the importing file" in d.message
    assert "PATH=" not in _printed([d]) and "root:x" not in _printed([d])


def test_system_files_are_refused_also_through_a_relative_path(tmp_path: Path):
    up = "../" * len(tmp_path.parts)
    (tmp_path / "main.cell").write_text(f'import "{up}proc/self/environ"\n'
                                        f'import "{up}dev/null"\n' + CELL)
    diags = _errors(tmp_path / "main.cell")
    assert [d.code for d in diags] == ["E230", "E230"]
    assert all("system file" in d.message for d in diags)
    assert "PATH=" not in _printed(diags)


def test_a_pipe_named_cell_is_refused_without_opening_it(tmp_path: Path):
    os.mkfifo(tmp_path / "pipe.cell")  # opening it would wait for a writer forever
    (tmp_path / "main.cell").write_text('import "pipe.cell"\n' + CELL)
    (d,) = _errors(tmp_path / "main.cell")
    assert d.code == "E230" and "not a regular file" in d.message


def test_imports_up_the_tree_and_the_standard_library_still_load(tmp_path: Path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "gru.cell").write_text(CELL.replace("A()", "B()"))
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "main.cell").write_text('import std\nimport "../shared/gru.cell"\n'
                                                + CELL)
    prog = load_program(tmp_path / "app" / "main.cell")
    assert {"A", "B", "ConvLSTM"} <= set(prog.cells)


# ---------------------------------------------------------- control bytes (§8)

@pytest.mark.parametrize("byte", ["\x1b", "\x07", "\x00", "\x9b", "\u202e", "\x7f"])
def test_control_characters_never_reach_the_output_raw(byte):
    text = f"cell A() {{\n    input x  # {byte}[2K{byte}ok (no problems)\n    g = x {byte} 1\n" \
           "    output g\n}\n"
    with pytest.raises(CellError) as info:
        parse(text, f"evil{byte}.cell")
    printed = _printed(info.value.diagnostics)
    assert byte not in printed
    assert json.loads(format_diagnostics(info.value.diagnostics, "json"))["errors"] >= 1


def test_the_caret_stands_under_the_escaped_character():
    with pytest.raises(CellError) as info:
        parse("cell A() {\n    input x\n    g = \x1b x\n    output g\n}\n", "esc.cell")
    lines = info.value.format().splitlines()
    assert lines[0] == "esc.cell:3:9: error[E106]: invalid character '\\x1b'"
    assert lines[1] == "        g = \\x1b x"
    assert lines[2] == "            ^~~~"


def test_the_caret_counts_escapes_before_the_culprit():
    with pytest.raises(CellError) as info:
        parse('cell A() {\n    input x\n    g = f("\x07\x1b", @)\n    output g\n}\n', "b.cell")
    lines = info.value.format().splitlines()
    assert lines[1] == '        g = f("\\x07\\x1b", @)'
    assert lines[1][lines[2].index("^")] == "@"


def test_a_lone_carriage_return_is_a_line_end_not_a_way_back():
    """`\\r` would let a quoted line overwrite itself; it ends the line, as Python reads it."""
    text = "cell A() {\n    input x\r    g = x @ 1\n    output g\n}\n"
    with pytest.raises(CellError) as info:
        parse(text, "cr.cell")
    (d,) = info.value.diagnostics
    assert (d.loc.line, d.loc.col) == (3, 11) and "\r" not in info.value.format()


# -------------------------------------------------- form feed and BOM (§14, §15)

def test_a_form_feed_keeps_the_quoted_line_and_caret_on_the_error_line():
    text = "cell A() {\x0c\n    input x\n    g = x @ 1\n    output g\n}\n"
    with pytest.raises(CellError) as info:
        parse(text, "ff.cell")
    lines = info.value.format().splitlines()
    assert lines[0].startswith("ff.cell:3:11:")
    assert lines[1] == "        g = x @ 1"
    assert lines[2] == "              ^"


def test_generated_code_names_the_right_line_after_a_form_feed():
    from convc.compiler.driver import compile_model

    text = textwrap.dedent("""\
        model M {
            input x: [1, 4, 4]
            target y: [1, 4, 4]\x0c
            h = sigmoid(x)
            loss bce(h, y)
        }
        """)
    src = compile_model(None, text=text, file="ffm.cell").source
    comments = [ln.strip() for ln in src.splitlines() if ln.strip().startswith("# ffm.cell:")]
    assert comments
    for c in comments:
        lineno, quoted = c[len("# ffm.cell:"):].split("  ", 1)
        assert quoted == text.split("\n")[int(lineno) - 1].strip()


def test_a_byte_order_mark_is_accepted_and_counts_in_no_column(tmp_path: Path):
    p = tmp_path / "bom.cell"
    p.write_bytes(b"\xef\xbb\xbf" + (ROOT / "examples" / "seed.cell").read_bytes())
    assert not [d for d in check(p) if d.severity == "error"]
    p.write_bytes(b"\xef\xbb\xbfcell A() { @ }\n")
    (d,) = _errors(p)
    assert (d.code, d.loc.line, d.loc.col) == ("E106", 1, 12)


def test_fmt_of_a_file_with_a_bom_formats_it():
    from convc.spec.format import format_source

    assert format_source("\ufeff" + CELL) == CELL


# ---------------------------------------------------------------- size (§13)

def test_a_file_over_the_limit_is_refused_before_it_is_parsed(tmp_path: Path, monkeypatch):
    import convc.spec.parser as P

    def no_parse(*_):  # pragma: no cover - reached only when the limit is not checked
        raise AssertionError("parsed a file over the limit")

    monkeypatch.setattr(P, "_parse_items", no_parse)
    big = tmp_path / "big.cell"
    big.write_text("# " + "x" * MAX_FILE_BYTES + "\n")
    (d,) = _errors(big)
    assert d.code == "E002" and str(MAX_FILE_BYTES) in d.message
    with pytest.raises(CellError) as info:
        parse(big.read_text(), "big.cell")
    assert info.value.diagnostics[0].code == "E002"


def test_imports_together_over_the_limit_are_refused(tmp_path: Path):
    n = MAX_PROGRAM_BYTES // (MAX_FILE_BYTES - 100) + 1
    chunk = "# " + "x" * (MAX_FILE_BYTES - 200) + "\n"
    for i in range(n):
        (tmp_path / f"part{i}.cell").write_text(chunk)
    (tmp_path / "main.cell").write_text(
        "".join(f'import "part{i}.cell"\n' for i in range(n)) + CELL)
    diags = _errors(tmp_path / "main.cell")
    assert [d.code for d in diags] == ["E002"] and diags[0].loc.file.endswith("main.cell")


@pytest.mark.parametrize("digits", [20, 400, 5000])
def test_an_integer_no_array_can_hold_is_refused_at_its_line(digits):
    text = SEED_TEXT.replace("hidden = 8", f"hidden = {'9' * digits}")
    with pytest.raises(CellError) as info:
        check(text=text, file="big.cell")
    (d,) = info.value.diagnostics
    assert (d.code, d.loc.line) == ("E205", SEED_TEXT[:SEED_TEXT.index("hidden = 8")]
                                    .count("\n") + 1)
    assert "too large" in d.message and len(d.message) < 200

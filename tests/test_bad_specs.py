"""The catalogue of bad specs: each file says which diagnostics `check` must give, exactly.

tests/bad_specs/*.cell (and */main.cell, for mistakes that need several
files) each start with comment lines

    # expect: E300 12:17            an error (or a W... warning) at line 12, column 17
    # expect: E231 layers.cell:2:8  ... in another file of the spec's folder
    # says: shapes [8, 16, 16]      text that one of the messages must contain

and `convc.compiler.driver.check(path)` must report exactly the expected
diagnostics, no more and no fewer, at those places. Warnings do not fail a
check: a spec whose only expectations are warnings must check without error.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from convc.compiler.driver import check
from convc.spec.diagnostics import CellError, format_diagnostics

FOLDER = Path(__file__).resolve().parent / "bad_specs"
SPECS = sorted(FOLDER.glob("*.cell")) + sorted(FOLDER.glob("*/main.cell"))

_EXPECT = re.compile(r"# expect: ([EW]\d{3}) (?:(\S+?):)?(\d+):(\d+)\s*$")
_SAYS = re.compile(r"# says: (.+?)\s*$")


def _expectations(path: Path):
    expected, says = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        if m := _EXPECT.match(line):
            code, file, ln, col = m.groups()
            expected.append((code, file or path.name, int(ln), int(col)))
        elif m := _SAYS.match(line):
            says.append(m.group(1))
        elif line.startswith("# expect"):
            raise AssertionError(f"{path.name}: malformed expectation {line!r}")
    return sorted(expected), says


def _diagnostics(path: Path):
    try:
        return check(path), False
    except CellError as e:
        return e.diagnostics, True


def _name(spec: Path) -> str:
    return str(spec.relative_to(FOLDER))


def test_the_catalogue_is_big_enough():
    assert len(SPECS) >= 30
    codes = {c for spec in SPECS for c, *_ in _expectations(spec)[0]}
    # every semantic and shape code the issue asks for has a spec
    assert {"E200", "E201", "E202", "E203", "E204", "E205", "E206", "E210", "E220", "E221",
            "E222", "E230", "E231", "E240", "E300", "E302", "E303", "W001"} <= codes


@pytest.mark.parametrize("spec", SPECS, ids=_name)
def test_bad_spec(spec: Path):
    expected, says = _expectations(spec)
    assert expected, f"{spec.name} has no `# expect:` line"
    diags, raised = _diagnostics(spec)
    got = sorted((d.code, Path(d.loc.file).name, d.loc.line, d.loc.col) for d in diags)
    assert got == expected, format_diagnostics(diags)
    assert raised == any(code.startswith("E") for code, *_ in expected)
    messages = " | ".join(d.message for d in diags)
    for text in says:
        assert text in messages, format_diagnostics(diags)


@pytest.mark.parametrize("spec", SPECS, ids=_name)
def test_bad_spec_text_quotes_the_line(spec: Path):
    """Each diagnostic prints its place, its code, the source line and a caret."""
    diags, _ = _diagnostics(spec)
    text = format_diagnostics(diags)
    for d in diags:
        head = f"{d.loc.file}:{d.loc.line}:{d.loc.col}: {d.severity}[{d.code}]: {d.message}"
        assert head in text
        block = d.format().splitlines()
        assert block[1].strip(), "no source line"
        assert block[2].strip().startswith("^")
        assert len(block[2]) - len(block[2].lstrip()) == 4 + d.loc.col - 1
    summary = text.splitlines()[-1]
    assert re.fullmatch(r"(\d+ errors?)?(, )?(\d+ warnings?)?", summary)


def test_warnings_do_not_fail_check():
    diags = check(FOLDER / "unused_weight.cell")
    assert [d.code for d in diags] == ["W001"]

"""Every semantic error (E2xx) is the checker's; lowering reports only shape errors (E3xx).

The checker (spec/checker.py, with spec/elaborate.py for what needs each
instance of a cell: parameter values, `if`s, what an application gives,
init= and steps=, the order equations are evaluated in) reports them, and
lowering (compiler/lower.py) assumes a checked program: where it meets one
of them it fails that statement without a word.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from convc.compiler import lower as lower_module
from convc.compiler.driver import check, model_errors
from convc.spec.checker import check_program
from convc.spec.diagnostics import CellError
from convc.spec.loader import load_program

from test_bad_specs import SPECS, _expectations, _name

LOWER = Path(lower_module.__file__)


def _reported_codes(path: Path) -> list[tuple[int, str]]:
    """(line, code) of each `....error("CODE", ...)` call in a module."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr == "error" and node.args and \
                isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            out.append((node.lineno, node.args[0].value))
    return out


def test_lowering_reports_no_semantic_error():
    codes = _reported_codes(LOWER)
    assert codes, "the scan finds lowering's shape errors"
    assert [c for c in codes if not c[1].startswith("E3")] == []


def test_the_scan_sees_the_checkers_errors():
    from convc.spec import checker, elaborate
    found = {c for _, c in _reported_codes(Path(checker.__file__))} | \
        {c for _, c in _reported_codes(Path(elaborate.__file__))}
    assert {"E200", "E201", "E202", "E203", "E205", "E206", "E210", "E220", "E222"} <= found


SEMANTIC = [s for s in SPECS if any(c.startswith("E2") for c, *_ in _expectations(s)[0])]


@pytest.mark.parametrize("spec", SEMANTIC, ids=_name)
def test_the_checker_alone_reports_each_semantic_error(spec: Path):
    """`check_program`, without lowering, gives every E2xx a bad spec expects, and
    lowering (after it) none."""
    expected = [e for e in _expectations(spec)[0] if e[0].startswith("E2")]
    try:
        prog = load_program(spec)
    except CellError as e:  # the imports' errors (E230, E231...): the loader's, before
        diags, prog = e.diagnostics, None
    else:
        diags = check_program(prog).diagnostics
    got = sorted((d.code, Path(d.loc.file).name, d.loc.line, d.loc.col)
                 for d in diags if d.code.startswith("E2"))
    assert got == expected
    if prog is None:
        return
    for model in prog.root.models:
        assert [d for d in model_errors(prog, model.name) if not d.code.startswith("E3")] == []


def test_check_without_lowering_reports_the_moved_errors():
    """`check(lower_models=False)` (the checker only) already fails on an error that
    needs the parameters' values, an instance's states or the evaluation order."""
    folder = Path(__file__).resolve().parent / "bad_specs"
    for name in ("std_hidden_zero.cell", "init_state_missing.cell", "instantaneous_cycle.cell",
                 "state_in_other_branch.cell", "loss_target_of_weights.cell"):
        with pytest.raises(CellError) as err:
            check(folder / name, lower_models=False)
        assert any(d.code.startswith("E2") for d in err.value.diagnostics), name


def test_lowering_assumes_a_checked_program():
    """Lowering meets a semantic error only where the checker reported one."""
    prog = load_program(text="model m {\n    input x: [1, 4, 4]\n    target y: [1, 4, 4]\n"
                             "    n = 2\n    output n\n    loss mse(x, y)\n}\n", file="m.cell")
    prog.checker_errors = False  # as if the checker had passed it
    with pytest.raises(AssertionError, match="did not report"):
        lower_module.lower(prog, strict=False)

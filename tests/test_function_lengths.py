"""No function of the package grows past MAX_LINES lines; the long ones left can only go.

An `ast` scan of compiler/, spec/, runtime/ and convc/ (their *.py, not
subfolders) measures every function and method, nested ones included, from
its `def` line to its last line (decorators not counted). A function longer
than MAX_LINES must be in ALLOWED, today's remaining long functions: the
set of long functions must be a subset of it, so a new long function fails
the test and the list can only shrink (when one of them is split, take it
off the list).

The lengths in ALLOWED are what each measured when it was listed, for the
reader (which to split next); the test checks names, not those lengths.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("compiler", "spec", "runtime", "convc")
MAX_LINES = 80

# "path:qualified name" -> its length when it was listed (lines, def to last line), measured
# after schedule() and run_forward() were split into steps (the memory planning
# functions of codegen.py went with memplan.py)
ALLOWED = {
    "compiler/lower.py:Lowerer._elaborate": 92,
    "runtime/summary.py:summary_rows": 88,
    "compiler/autodiff.py:differentiate": 82,
}


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, length in lines) of every function under `tree`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = prefix + node.name
            yield name, node.end_lineno - node.lineno + 1
            yield from _functions(node, name + ".")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, prefix + node.name + ".")
        else:
            yield from _functions(node, prefix)


def function_lengths() -> dict[str, int]:
    """"path:qualified name" -> length, for every function of PACKAGES."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for name, length in _functions(tree):
                out[f"{package}/{path.name}:{name}"] = length
    return out


def long_functions() -> dict[str, int]:
    return {k: n for k, n in function_lengths().items() if n > MAX_LINES}


def _longest(lengths: dict[str, int], k: int = 10) -> str:
    ranked = sorted(lengths.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return "\n".join(f"  {n:4d}  {name}" for name, n in ranked)


def test_the_scan_finds_functions():
    lengths = function_lengths()
    assert "compiler/schedule.py:schedule" in lengths
    assert "compiler/interp.py:run_forward" in lengths


def test_no_new_long_functions():
    found = long_functions()
    new = {k: n for k, n in found.items() if k not in ALLOWED}
    assert not new, (
        f"functions longer than {MAX_LINES} lines that are not in ALLOWED (split them into "
        f"named steps):\n{_longest(new)}\nthe longest functions now:\n{_longest(found)}")


def test_schedule_and_interpreter_are_in_steps():
    """schedule() and run_forward() were split into named steps of under 50 lines."""
    lengths = function_lengths()
    for path in ("compiler/schedule.py", "compiler/interp.py"):
        own = {k: n for k, n in lengths.items() if k.startswith(path + ":")}
        assert max(own.values()) < 50, _longest(own)

"""The generated code: safe buffers, golden sources, determinism, imports, source comments.

(a) Buffers. Every name bound to `rt.empty(...)` (and every view of one,
    `h_prev = h_buf[t]`) is never the target of `+=` (nor is a subscript of
    it): a gradient is initialised by its first write, never accumulated
    into an uninitialised buffer. `xp.empty` / `np.empty` are never called
    directly, so poison mode (`rt.set_poison`) sees every buffer.
(b) Golden sources. The generated modules of examples/seed.cell and
    examples/encoder_forecaster.cell equal tests/golden/<name>.py. After a
    deliberate change to the generated code, regenerate them with

        CONVC_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_codegen.py -k golden

    and review the diff of tests/golden/ like any other change.
(c) Determinism. Two compiles give byte-identical source, IR text, DOT and
    JSON, also in fresh interpreters with different PYTHONHASHSEEDs.
(d) The generated module imports only numpy and convc.runtime.
(e) Every statement computed from the `.cell` source sits under a comment
    naming the `.cell` file and line it came from, and that comment quotes
    that line.
(f) The generated forward pass and loss of every example agree with the
    reference interpreter (compiler/interp.py), which shares nothing with
    the generated code but the op table's reference evaluations.
"""
from __future__ import annotations

import ast
import difflib
import hashlib
import json
import linecache
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convc.api as api
from convc.compiler.interp import run_forward
from convc.spec.loader import stdlib_dir
from helpers import one_blas_thread  # noqa: F401  (an autouse fixture)
from helpers import (EXAMPLES, GOLDEN, ROOT, example_ids, load_example, random_batch,
                     random_params, random_state)

GOLDEN_EXAMPLES = ("seed", "encoder_forecaster")

_COMPILED: dict = {}


def compiled(path: Path):
    if path not in _COMPILED:
        _COMPILED[path] = api.compile_file(path)
    return _COMPILED[path]


def example(stem: str) -> Path:
    return next(p for p in EXAMPLES if p.stem == stem)


# ---------------------------------------------------------------- (a) buffers

_EMPTY_FUNCS = {"empty", "empty_like"}


def buffer_violations(source: str) -> list[str]:
    """Where generated code could read a buffer before writing all of it.

    Names bound to rt.empty(...) and names bound to a view of one (a
    subscript, or the name itself) are buffers; `buf += ...`,
    `buf[...] += ...` and `xp.add(buf[t], g, out=buf[t])` are violations, and
    so is any direct xp/np.empty call.
    """
    tree = ast.parse(source)
    problems = []
    buffers: set[str] = set()
    # assignments in source order: buffers and their views
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in _EMPTY_FUNCS and isinstance(node.func.value, ast.Name) and \
                node.func.value.id in ("xp", "np", "numpy", "cupy"):
            problems.append(f"line {node.lineno}: {node.func.value.id}.{node.func.attr}() "
                            "bypasses rt.empty (poison mode would not see it)")
    assigns = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Assign)),
                     key=lambda n: (n.lineno, n.col_offset))
    for node in assigns:
        value = node.value
        is_buffer = (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)
                     and value.func.attr == "empty" and isinstance(value.func.value, ast.Name)
                     and value.func.value.id == "rt")
        base = value
        while isinstance(base, ast.Subscript):
            base = base.value
        is_view = isinstance(base, ast.Name) and base.id in buffers
        for target in node.targets:
            if isinstance(target, ast.Name):
                if is_buffer or is_view:
                    buffers.add(target.id)
    for node in ast.walk(tree):
        if isinstance(node, ast.AugAssign) and _base(node.target) in buffers:
            problems.append(f"line {node.lineno}: {ast.unparse(node.target)} "
                            f"{type(node.op).__name__}= into the buffer {_base(node.target)}")
        # xp.add(buf, g, out=buf) is `buf += g` spelled as a call
        if isinstance(node, ast.Call):
            for out in (k.value for k in node.keywords if k.arg == "out"):
                if _base(out) in buffers and \
                        any(ast.dump(a) == ast.dump(out) for a in node.args):
                    problems.append(f"line {node.lineno}: {ast.unparse(node)} accumulates "
                                    f"into the buffer {_base(out)}")
    return problems


def _base(expr) -> str | None:
    """The name a (possibly subscripted) expression refers to: buf for buf[t][0]."""
    while isinstance(expr, ast.Subscript):
        expr = expr.value
    return expr.id if isinstance(expr, ast.Name) else None


@pytest.mark.parametrize("path", EXAMPLES, ids=example_ids())
def test_buffers_are_written_before_they_are_read(path):
    assert buffer_violations(compiled(path).source) == []


def test_buffers_with_debug_nans():
    c = api.compile_file(example("stack"), debug_nans=True)
    assert "rt.check_finite(" in c.source
    assert buffer_violations(c.source) == []


BAD_SNIPPETS = {
    "augassign": "buf = rt.empty(xp, (3,), dtype)\nbuf += g\n",
    "subscript": "buf = rt.empty(xp, (T, 3), dtype)\nfor t in range(T):\n    buf[t] += g\n",
    "view": "buf = rt.empty(xp, (T, 3), dtype)\nrow = buf[1]\nrow += g\n",
    "view-of-view": "buf = rt.empty(xp, (T, 3), dtype)\na = buf[1:]\nb = a[0]\nb[0] += g\n",
    "out=": "buf = rt.empty(xp, (T, 3), dtype)\nxp.add(buf[0], g, out=buf[0])\n",
    "xp.empty": "buf = xp.empty((3,), dtype)\nbuf[:] = 0\n",
    "np.empty_like": "buf = np.empty_like(g)\n",
}


@pytest.mark.parametrize("name", sorted(BAD_SNIPPETS))
def test_buffer_checker_catches_bad_code(name):
    assert buffer_violations(BAD_SNIPPETS[name])


def test_buffer_checker_accepts_good_code():
    good = ("buf = rt.empty(xp, (T, 3), dtype)\nfor t in range(T):\n    buf[t] = g\n"
            "acc = g\nacc += g\nd = buf[0] + g\nd += g\nxp.add(buf[1], g, out=buf[2])\n"
            "e = xp.tanh(g, out=buf[3])\n")
    assert buffer_violations(good) == []


# ---------------------------------------------------------------- (b) golden sources

def _diff(want: str, got: str, name: str) -> str:
    lines = list(difflib.unified_diff(want.splitlines(True), got.splitlines(True),
                                      f"tests/golden/{name}.py", "generated"))
    return "".join(lines[:80]) + ("\n... (diff truncated)" if len(lines) > 80 else "")


@pytest.mark.parametrize("stem", GOLDEN_EXAMPLES)
def test_golden_source(stem):
    source = compiled(example(stem)).source
    golden = GOLDEN / f"{stem}.py"
    if os.environ.get("CONVC_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        golden.write_text(source, encoding="utf-8")
    assert golden.exists(), f"no {golden}; run with CONVC_UPDATE_GOLDEN=1 to write it"
    want = golden.read_text(encoding="utf-8")
    assert source == want, ("generated source differs from the golden file (regenerate with "
                            "CONVC_UPDATE_GOLDEN=1 if the change is deliberate):\n"
                            + _diff(want, source, stem))


@pytest.mark.parametrize("stem", GOLDEN_EXAMPLES)
def test_golden_source_imports_and_runs(stem):
    """The golden file is a working module, not just text."""
    mod = api.import_generated(GOLDEN / f"{stem}.py")
    assert callable(mod.loss_and_grad) and callable(mod.forward)
    assert mod.MODEL["name"] == stem


# ---------------------------------------------------------------- (c) determinism

def artifacts(c) -> dict[str, str]:
    return {"source": c.source, "ir": c.ir_text(), "dot": c.dot(), "json": c.json()}


def digests(c) -> dict[str, str]:
    return {k: hashlib.sha256(v.encode()).hexdigest() for k, v in artifacts(c).items()}


@pytest.mark.parametrize("path", EXAMPLES, ids=example_ids())
def test_two_compiles_are_identical(path):
    a = artifacts(api.compile_file(path))
    b = artifacts(api.compile_file(path))
    for kind in a:
        assert a[kind] == b[kind], kind
    json.loads(a["json"])  # and the JSON is JSON


_DIGEST_SCRIPT = """
import hashlib, json, sys
import convc.api as api
out = {}
for p in sys.argv[1:]:
    c = api.compile_file(p)
    arts = {"source": c.source, "ir": c.ir_text(), "dot": c.dot(), "json": c.json()}
    out[p] = {k: hashlib.sha256(v.encode()).hexdigest() for k, v in arts.items()}
print(json.dumps(out))
"""


def test_compiles_are_identical_across_processes_and_hash_seeds(tmp_path):
    """Fresh interpreters, different string hashing, another working directory: the
    same bytes (the source, IR and JSON name files without their folders)."""
    paths = [str(Path(p).resolve()) for p in EXAMPLES]
    here = {p: digests(compiled(Path(p))) for p in paths}
    script = tmp_path / "digests.py"
    script.write_text(_DIGEST_SCRIPT, encoding="utf-8")
    for seed, cwd in (("1", os.getcwd()), ("4242", str(tmp_path))):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        run = subprocess.run([sys.executable, str(script), *paths], env=env,
                             capture_output=True, text=True, cwd=cwd, timeout=300)
        assert run.returncode == 0, run.stderr
        there = json.loads(run.stdout.strip().splitlines()[-1])
        for p in paths:
            assert there[p] == here[p], \
                f"{Path(p).name} differs with PYTHONHASHSEED={seed} in {cwd}"


# ---------------------------------------------------------------- (d) imports

ALLOWED_IMPORTS = ("numpy", "convc.runtime")


def imported_modules(source: str) -> list[str]:
    mods = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            mods.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mods.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("__import__", "exec", "eval"):
            mods.append(f"<{node.func.id}>")
    return mods


def _allowed(mod: str) -> bool:
    return any(mod == a or mod.startswith(a + ".") for a in ALLOWED_IMPORTS)


@pytest.mark.parametrize("path", EXAMPLES, ids=example_ids())
def test_generated_module_imports_only_numpy_and_the_runtime(path):
    mods = imported_modules(compiled(path).source)
    assert mods, "no imports found at all"
    assert [m for m in mods if not _allowed(m)] == []


def test_import_checker_catches_other_imports():
    assert not all(_allowed(m) for m in imported_modules("import os\n"))
    assert not all(_allowed(m) for m in imported_modules("from convc.compiler import ops\n"))
    assert not all(_allowed(m) for m in imported_modules("m = __import__('torch')\n"))
    assert all(_allowed(m) for m in imported_modules(
        "import numpy as np\nfrom convc.runtime import kernels as rt\n"))


# ---------------------------------------------------------------- (e) source comments

_LOC_COMMENT = re.compile(r"^\s*# (?P<file>[^\s:]+\.cell):(?P<line>\d+)(?:  (?P<text>.*))?$")
_ASSIGN = re.compile(r"^\s*(?P<name>[A-Za-z_]\w*) = ")
_SOURCE_OPS = ("input", "param", "state", "carry", "carry_out")


def _cell_file(name: str) -> Path:
    for cand in [ROOT / "examples" / name, Path(stdlib_dir()) / name]:
        if cand.exists():
            return cand
    raise AssertionError(f"a comment names {name}, which is neither an example nor stdlib")


def comment_problems(c) -> list[str]:
    """Statements computing a node without the right `.cell` comment above them."""
    g = c.lowered.graph
    lines = c.source.splitlines()
    problems = []
    seen_in_fn: set[str] = set()
    for i, line in enumerate(lines):
        if line.startswith("def "):
            seen_in_fn = set()
            continue
        m = _ASSIGN.match(line)
        if not m or m.group("name") not in g or m.group("name") in seen_in_fn:
            continue
        name = m.group("name")
        node = g.node(name)
        if node.op in _SOURCE_OPS or node.loc.line <= 0:
            continue
        seen_in_fn.add(name)
        found = None
        for j in range(i - 1, -1, -1):
            prev = lines[j]
            lm = _LOC_COMMENT.match(prev)
            if lm:
                found = lm
                break
            stripped = prev.strip()
            if not stripped or stripped.startswith(("def ", "for ", "# ")):
                break
        want = f"{Path(node.loc.file).name}:{node.loc.line}"
        if found is None:
            problems.append(f"line {i + 1}: {name} has no .cell comment (want {want})")
        elif f"{found.group('file')}:{found.group('line')}" != want:
            problems.append(f"line {i + 1}: {name} is under "
                            f"{found.group('file')}:{found.group('line')}, want {want}")
    return problems


def quote_problems(source: str) -> list[str]:
    """`.cell` comments whose quoted text is not the line they name."""
    problems = []
    for i, line in enumerate(source.splitlines()):
        m = _LOC_COMMENT.match(line)
        if not m or m.group("text") is None:
            continue
        actual = _cell_file(m.group("file")).read_text(encoding="utf-8").splitlines()
        n = int(m.group("line"))
        quoted = m.group("text").strip()
        if not (1 <= n <= len(actual)) or not actual[n - 1].strip().startswith(quoted):
            problems.append(f"line {i + 1}: {m.group('file')}:{n} quotes {quoted!r}")
    return problems


@pytest.mark.parametrize("path", EXAMPLES, ids=example_ids())
def test_every_cell_statement_names_its_source_line(path):
    c = compiled(path)
    assert comment_problems(c) == []
    assert quote_problems(c.source) == []


def test_generated_source_is_in_linecache():
    """Tracebacks and pdb show generated lines."""
    mod = api.load(example("seed"))
    first = mod.source.splitlines()[0]
    assert linecache.getline(mod.__file__, 1).rstrip("\n") == first


# ---------------------------------------------------------------- (f) the interpreter

@pytest.mark.parametrize("path", EXAMPLES, ids=example_ids())
@pytest.mark.parametrize("stateful", [False, True], ids=["zeros", "state"])
def test_generated_code_agrees_with_the_interpreter(path, stateful):
    mod = load_example(path)
    params = random_params(mod, seed=3)
    inputs, targets = random_batch(mod, N=2, T=3, T_out=4, seed=3)
    state = random_state(mod, N=2) if stateful else None
    want_out, want_final, want_loss = run_forward(mod.compiled.lowered, params, inputs,
                                                  targets, state=state)
    loss, _, final = mod.loss_and_grad(params, inputs, targets, state=state)
    outputs, final2 = mod.forward(params, inputs, steps=4, state=state)
    assert abs(loss - want_loss) <= 1e-12 * abs(want_loss)
    for k in want_out:
        np.testing.assert_allclose(outputs[k], want_out[k], rtol=1e-12, atol=1e-13)
    assert set(final) == set(want_final) == set(final2)
    for k in want_final:
        np.testing.assert_allclose(final[k], want_final[k], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(final2[k], want_final[k], rtol=1e-12, atol=1e-13)


def test_docstrings_with_backslashes_and_quotes():
    """A .cell docstring reaches the module's docstring unchanged, whatever it holds."""
    import warnings
    doc = r'Paths like C:\data\new, a \"\"\" run of quotes, ends in \\'
    text = ('cell Tiny(hidden) {\n    """Doc of a cell with \\t in it."""\n    input x\n'
            '    state h = zeros\n    weight W = kernel(hidden, 3)\n'
            '    h = tanh(conv(concat(x, h[t-1]), W))\n    output h\n}\n\n'
            f'model tiny {{\n    """{doc}"""\n    input x: [1, 6, 6]\n    target y: [1, 6, 6]\n'
            '    l = Tiny(hidden = 2)\n    h = l(x)\n    weight W = kernel(1, 1)\n'
            '    p = conv(h, W)\n    output p\n    loss mse(p, y)\n}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no invalid escape sequence either
        mod = api.load(ROOT / "tests" / "test_codegen_doc.cell", text=text)
    assert doc in mod.__doc__
    assert "Doc of a cell with \\t in it." in mod.__doc__


@pytest.mark.parametrize("path", EXAMPLES, ids=example_ids())
def test_loss_alone_equals_the_loss_of_loss_and_grad(path):
    mod = load_example(path)
    params = random_params(mod)
    inputs, targets = random_batch(mod, N=2, T=3, T_out=4)
    state = random_state(mod, N=2)
    for kw in ({}, {"state": state}):
        alone = mod.loss(params, inputs, targets, **kw)
        with_grads = mod.loss_and_grad(params, inputs, targets, **kw)[0]
        assert isinstance(alone, float)
        assert abs(alone - with_grads) <= 1e-12 * abs(with_grads)
    assert "def loss(params, inputs, targets" in mod.source

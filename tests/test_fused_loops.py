"""Generated code with fused step kernels (convc.load(..., fuse=True)) against the plain
NumPy path it replaces.

For every example (shrunk), every std-cell model and the 50 random models of the
invariants record, in float64: loss_and_grad's loss, gradients and final states
and forward's outputs agree with the plain module's to 1e-12 of each value's
size, with the C kernels and with the module's ArrayKernels (what runs on a GPU
backend or without a compiler), and two runs give the same bits. The kernels'
Python side refuses bad operands with a message (never a crash); a GPU backend
gets the array kernels; a compiler that fails gives a warning and the array
kernels; without a C toolchain fuse=True says why and the default is the plain
path. Skipped, saying why, where kernels cannot be built (runtime/fused.py
`available`).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import convc.api as api
from convc.runtime.backend import get_backend
from convc.runtime import fused
from convc.runtime.gradcheck import random_problem
from helpers import EXAMPLES, every_model, shrink

OK, WHY = fused.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"fused kernels cannot be built here: {WHY}")

TOL = 1e-12


MODELS = every_model()


def _worst(a: dict, b: dict) -> tuple[float, str]:
    worst, where = 0.0, ""
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        scale = max(float(np.max(np.abs(x))) if x.size else 0.0, 1e-300)
        err = float(np.max(np.abs(x - y))) / scale if x.size else 0.0
        if err > worst:
            worst, where = err, k
    return worst, where


@pytest.mark.parametrize("name, path, text", MODELS, ids=[m[0] for m in MODELS])
def test_fused_kernels_agree_with_the_numpy_path(name, path, text):
    plain = api.load(path, text=text)
    fast = api.load(path, text=text, fuse=True)
    if not name.startswith("random/"):  # (a random model's loops may have no two ops to fuse)
        assert "K.k" in fast.source, f"{name}: no loop of it got a fused kernel"
    params, inputs, targets = random_problem(plain, batch=2, frames=4)
    la, ga, fa = plain.loss_and_grad(params, inputs, targets)
    lb, gb, fb = fast.loss_and_grad(params, inputs, targets)
    assert abs(la - lb) <= TOL * max(abs(la), 1e-300), (name, la, lb)
    for what, a, b in (("gradient", ga, gb), ("final state", fa, fb)):
        assert set(a) == set(b)
        err, where = _worst(a, b)
        assert err <= TOL, f"{name}: {what} {where} differs by {err:.2e} of its size"
    oa, _ = plain.forward(params, inputs, steps=4)
    ob, _ = fast.forward(params, inputs, steps=4)
    err, where = _worst(oa, ob)
    assert err <= TOL, f"{name}: output {where} differs by {err:.2e}"
    # bitwise the same, run to run
    lc, gc, _ = fast.loss_and_grad(params, inputs, targets)
    assert lc == lb and all(np.array_equal(gc[k], gb[k]) for k in gb), name
    # the array kernels (a GPU backend's, or where no compiler works) agree too
    fast.FK = types.SimpleNamespace(of=lambda dtype, backend=None: fast.ArrayKernels)
    ld, gd, _ = fast.loss_and_grad(params, inputs, targets)
    assert abs(la - ld) <= TOL * max(abs(la), 1e-300), (name, la, ld)
    err, where = _worst(ga, gd)
    assert err <= TOL, f"{name}: gradient {where} (array kernels) differs by {err:.2e}"


def test_float32_and_the_vjp_run_fused_too():
    path = next(p for p in EXAMPLES if p.stem == "seed")
    text = shrink(path.read_text(encoding="utf-8"))
    plain = api.load(path, text=text, vjp=True)
    fast = api.load(path, text=text, vjp=True, fuse=True)
    params, inputs, targets = random_problem(plain, batch=3, frames=5)
    p32 = {k: v.astype(np.float32) for k, v in params.items()}
    i32 = {k: v.astype(np.float32) for k, v in inputs.items()}
    t32 = {k: v.astype(np.float32) for k, v in targets.items()}
    la, ga, _ = plain.loss_and_grad(p32, i32, t32)
    lb, gb, _ = fast.loss_and_grad(p32, i32, t32)
    assert all(g.dtype == np.float32 for g in gb.values())
    assert abs(la - lb) <= 1e-5 * abs(la)
    assert _worst(ga, gb)[0] <= 1e-4
    outs, _ = plain.forward(params, inputs, steps=5)
    cts = {k: np.random.default_rng(0).standard_normal(v.shape) for k, v in outs.items()}
    va = plain.vjp(params, inputs, cts)
    vb = fast.vjp(params, inputs, cts)
    for a, b in zip(va, vb):
        assert _worst(a, b)[0] <= TOL


@pytest.fixture(scope="module")
def kernel():
    """One fused kernel of the seed model in float64 and its operands' shapes."""
    path = next(p for p in EXAMPLES if p.stem == "seed")
    mod = api.load(path, text=shrink(path.read_text(encoding="utf-8")), fuse=True)
    name = sorted(mod.KERNELS)[0]
    return mod.FK.of("float64").__dict__[name], mod.KERNELS[name]


def _arity(source: str) -> tuple[int, int]:
    import re

    line = next(ln for ln in source.splitlines() if ln.startswith("enum"))
    nums = dict(re.findall(r"(\w+) = (\d+)", line))
    return int(nums["NOUT"]), int(nums["NIN"])


def test_the_kernels_refuse_bad_operands_with_a_message(kernel):
    fn, source = kernel
    nout, nin = _arity(source)
    dims = [int(x) for x in source.split("DIMS[3] = {")[1].split("}")[0].split(",")]
    good = [np.zeros((2, *dims)) for _ in range(nout + nin)]
    fn(*good)  # well-formed: runs
    with pytest.raises(TypeError, match="takes"):
        fn(*good[:-1])
    with pytest.raises(TypeError, match="not a NumPy array"):
        fn(*good[:-1], 1.0)
    with pytest.raises(TypeError, match="dtype"):
        fn(*good[:-1], good[-1].astype(np.float32))
    with pytest.raises(ValueError, match="length"):
        fn(np.zeros((2, dims[0] + 1, *dims[1:])), *good[1:])
    ro = np.zeros((2, *dims))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fn(ro, *good[1:])


def test_the_backend_chooses_the_kernels(monkeypatch):
    """C for a CPU backend's NumPy arrays; the array kernels for a backend with another
    array module, or everywhere with CONVC_FUSE=array (a GPU backend's CUDA kernels:
    tests/test_fused_gpu.py)."""
    path = next(p for p in EXAMPLES if p.stem == "seed")
    fast = api.load(path, text=shrink(path.read_text(encoding="utf-8")), fuse=True)
    cpu = fast.FK.of(np.float64, get_backend("cpu", "numpy"))
    assert type(cpu.k0).__name__ == "builtin_function_or_method"
    other = types.SimpleNamespace(capabilities=types.SimpleNamespace(device="cpu"), xp=None)
    assert fast.FK.of(np.float64, other) is fast.ArrayKernels
    monkeypatch.setenv("CONVC_FUSE", "array")
    gpu = types.SimpleNamespace(capabilities=types.SimpleNamespace(device="gpu"), xp=None)
    assert fast.FK.of(np.float64, gpu) is fast.ArrayKernels
    assert fast.FK.of(np.float32, get_backend("cpu", "numpy")) is fast.ArrayKernels


def _run(script: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


PROBLEM = (
    "import warnings\n"
    "import convc\n"
    "from convc.runtime.gradcheck import random_problem\n"
    f"path = {str(next(p for p in EXAMPLES if p.stem == 'seed'))!r}\n"
    "plain = convc.load(path, fuse=False)\n"
    "params, inputs, targets = random_problem(plain, batch=1, frames=3)\n"
    "want = plain.loss_and_grad(params, inputs, targets)[0]\n")


@pytest.mark.parametrize("broken", ["compiler", "cache"])
def test_a_build_that_fails_gives_a_warning_and_the_array_kernels(tmp_path, broken):
    """A compiler that fails (CC=false), or a cache folder that cannot be made (under a
    file): the run goes on, with the array kernels, and says why once."""
    script = PROBLEM + (
        "m = convc.load(path, fuse=True)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    got = m.loss_and_grad(params, inputs, targets)[0]\n"
        "print('WARNED', [str(x.message).splitlines()[0][:60] for x in w])\n"
        "print('SAME', abs(got - want) <= 1e-12 * abs(want))\n")
    if broken == "compiler":
        r = _run(script, CC="false", CONVC_CACHE=str(tmp_path), CONVC_FUSE="")
        said = "WARNED ['fused kernels: false"
    else:
        (tmp_path / "file").write_text("")
        r = _run(script, CONVC_CACHE=str(tmp_path / "file" / "cache"), CONVC_FUSE="")
        said = "WARNED ['fused kernels: cannot build into"
    assert said in r.stdout and "SAME True" in r.stdout, r.stdout + r.stderr


def test_without_a_toolchain_fuse_says_why_and_the_default_is_plain(tmp_path):
    script = PROBLEM + (
        "from convc.runtime.fused import KernelBuildError\n"
        "print('DEFAULT FUSED', 'K.k' in convc.load(path).source)\n"
        "try:\n"
        "    convc.load(path, fuse=True)\n"
        "except KernelBuildError as e:\n"
        "    print('REFUSED', e)\n")
    r = _run(script, CC=str(tmp_path / "no-such-cc"), CONVC_FUSE="")
    assert "DEFAULT FUSED False" in r.stdout, r.stdout + r.stderr
    assert "REFUSED fuse=True: fused kernels cannot be built here: no C compiler" in r.stdout, \
        r.stdout + r.stderr


def test_where_kernels_can_be_built_the_default_is_fused():
    r = _run(PROBLEM + "print('DEFAULT FUSED', 'K.k' in convc.load(path).source)\n",
             CONVC_FUSE="")
    assert "DEFAULT FUSED True" in r.stdout, r.stdout + r.stderr


def test_the_plane_loop_of_every_kernel_is_vectorised(tmp_path):
    """The plane loop is where the time goes: gcc must vectorise it (with glibc's vector
    exp and tanh), or a kernel runs its transcendentals one at a time, slower than
    NumPy. Compiled as runtime/fused.py does, with gcc's vectoriser report."""
    import shutil

    cc = fused.compiler()
    if cc is None or "gcc version" not in subprocess.run([cc, "-v"], capture_output=True,
                                                         text=True).stderr:
        pytest.skip("the vectoriser report read here is gcc's")
    kernels = {}
    for p in EXAMPLES:
        mod = api.load(p, fuse=True)
        for k, src in mod.KERNELS.items():
            kernels.setdefault(src, f"{p.stem}.{k}")  # each distinct kernel once
    for src, name in sorted(kernels.items(), key=lambda kv: kv[1]):
        c = tmp_path / f"{name}.c"
        c.write_text(fused.extension_source(src, name, "float32", "convc_probe"))
        r = subprocess.run([cc, *fused.FLAGS, *(f"-I{d}" for d in fused._includes()), str(c),
                            "-o", str(tmp_path / "probe.so"), "-fopt-info-vec-optimized"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        line = next(i for i, ln in enumerate(c.read_text().splitlines(), 1)
                    if ln.strip().startswith("for (long i = 0;"))
        assert f"{c.name}:{line}:" in r.stderr and "loop vectorized" in r.stderr, \
            f"{name}: the plane loop (line {line}) is not vectorised:\n{r.stderr[-2000:]}"
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_convlstm_step_is_one_convolution_and_one_kernel_each_way():
    """bench/calls_per_step.py's count of the peer seed model's general steps: plain, a
    NumPy call per elementwise op; fused, one kernel and one convolution a step."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import calls_per_step as cps
    from convc.runtime.bench import CONFIGS, peer_cell_text

    text = peer_cell_text(dict(CONFIGS["seed"], name="seed"))
    fused_loops = [cps.count(b) for b in cps.loop_bodies(api.load(None, text=text,
                                                                   fuse=True).source)]
    plain_loops = [cps.count(b) for b in cps.loop_bodies(api.load(None, text=text,
                                                                   fuse=False).source)]
    assert len(fused_loops) == len(plain_loops) == 2
    for c in fused_loops:
        assert c == {"elementwise": 0, "fused kernels": 1, "convolutions": 1}, c
    for c in plain_loops:
        assert c["fused kernels"] == 0 and c["elementwise"] >= 8, c


def test_a_compiler_without_the_simd_attribute_builds_scalar_kernels(tmp_path):
    """A C compiler that rejects glibc's vector-math declarations (clang does): the
    kernels are built again without them, and run as C, with no warning."""
    cc = tmp_path / "cc-without-simd"
    cc.write_text("#!/bin/sh\n"
                  "for a in \"$@\"; do case \"$a\" in *.c)\n"
                  "  grep -q '^#define CONVC_NO_LIBMVEC' \"$a\" || "
                  "{ echo 'error: unknown attribute simd' >&2; exit 1; };; esac; done\n"
                  f"exec {fused.compiler()} \"$@\"\n")
    cc.chmod(0o755)
    script = PROBLEM + (
        "m = convc.load(path, fuse=True)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    got = m.loss_and_grad(params, inputs, targets)[0]\n"
        "import numpy as np\n"
        "k = m.FK.of(np.float64, None).k0\n"
        "print('C', type(k).__name__ == 'builtin_function_or_method', 'WARNED', len(w))\n"
        "print('SAME', abs(got - want) <= 1e-12 * abs(want))\n")
    r = _run(script, CC=str(cc), CONVC_CACHE=str(tmp_path / "cache"), CONVC_FUSE="")
    assert "C True WARNED 0" in r.stdout and "SAME True" in r.stdout, r.stdout + r.stderr


def test_the_strided_loop_computes_what_the_plane_loop_does():
    """Operands whose planes are not contiguous (every other column of a wider array,
    a Fortran-ordered array) take the strided loop: the same values as the array
    kernels."""
    path = next(p for p in EXAMPLES if p.stem == "seed")
    fast = api.load(path, text=shrink(path.read_text(encoding="utf-8")), fuse=True)
    K = fast.FK.of(np.float64, get_backend("cpu", "numpy"))
    rng = np.random.default_rng(3)
    for name, (shape, nout, source) in fast.CUDA_KERNELS.items():
        nin = len(re.findall(r"const T \*in\d+", source.split("{")[0]))
        full = (2, *shape)
        wide = full[:-1] + (2 * full[-1],)
        ins = [rng.uniform(-2, 2, wide)[..., ::2] if k % 2 else
               np.asfortranarray(rng.uniform(-2, 2, full)) for k in range(nin)]
        got = [np.full(wide, np.nan)[..., ::2] for _ in range(nout)]  # W stride 2
        want = [np.full(full, np.nan) for _ in range(nout)]
        getattr(K, name)(*got, *ins)
        getattr(fast.ArrayKernels, name)(*want, *ins)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-15)

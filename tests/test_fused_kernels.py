"""Fused step kernels (compiler/fuse.py) and their two renderers (compiler/render.py).

For every example, every std model and the 50 random models of the
invariants record, every variant of every loop of loss_and_grad is grouped
into kernels. The C rendering of all of them, compiled once with the system
C compiler, computes the same values as the op table's reference
evaluations in float64 (1e-13 of each output's size), on random operands
broadcast as the models' are; the CUDA rendering of the same kernels
compiles with nvcc for sm_90 and sm_80, in float32 and float64 (skipped,
saying why, without nvcc).
"""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import numpy as np
import pytest

import convc.api as api
from convc.compiler.fuse import Kernel, model_kernels
from convc.compiler.interp import ref_attrs
from convc.compiler.ops import OPS
from convc.compiler.render import _dims, render_c, render_cuda
from helpers import every_model

N = 2


def _same_code(k: Kernel) -> str:
    """What a kernel computes, whatever its name: its C rendering less the name."""
    return re.sub(r"/\*.*?\*/", "", render_c([Kernel("K", k.shape, k.inputs, k.outputs,
                                                      k.body)]))


@pytest.fixture(scope="module")
def all_kernels() -> list[tuple[str, Kernel]]:
    """Every kernel of every model, one of each that computes the same as another."""
    out, seen = [], set()
    for m, (name, path, text) in enumerate(every_model()):
        mod = api.load(path, text=text)
        for k in model_kernels(mod.compiled):
            key = _same_code(k)
            if key in seen:
                continue
            seen.add(key)
            k.name = f"m{m}_{k.name}"
            out.append((name, k))
    return out


def test_every_model_gets_kernels_of_several_statements(all_kernels):
    for name, k in all_kernels:
        members = {n for n, *_ in k.body}
        assert len(k.body) > 1 and k.outputs, (name, k.name)
        assert set(k.outputs) <= members and not members & {n for n, _ in k.inputs}
        for n, op, args, _ in k.body:  # operands come before their use
            assert all(a in members or a in dict(k.inputs) for a in args), (name, n)
            assert op == "const" or OPS[op].elementwise, (name, n)  # (a literal's statement)
            assert OPS[op].scalar is not None


@pytest.fixture(scope="module")
def c_library(all_kernels, tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc) on PATH")
    d = tmp_path_factory.mktemp("fused")
    (d / "k.c").write_text(render_c([k for _, k in all_kernels], "float64"))
    subprocess.run([cc, "-O0", "-shared", "-fPIC", "-o", str(d / "k.so"), str(d / "k.c"),
                    "-lm"], check=True, capture_output=True)
    return ctypes.CDLL(str(d / "k.so"))


def _operand(arr) -> list:
    return [arr.ctypes.data_as(ctypes.c_void_p)] + \
        [ctypes.c_long(s // arr.itemsize) for s in arr.strides]


def _reference(k: Kernel, ins: dict) -> dict:
    vals = dict(ins)
    for node, op, args, attrs in k.body:
        vals[node] = np.asarray(OPS[op].ref(*[vals[a] for a in args], **ref_attrs(op, attrs)),
                                dtype=np.float64)
    return vals


def test_the_c_kernels_compute_what_the_reference_evaluations_do(all_kernels, c_library):
    rng = np.random.default_rng(0)
    worst = 0.0
    for name, k in all_kernels:
        full = (N,) + _dims(k.shape)
        # every operand with a batch dimension (the kernel is elementwise either way), of
        # its own per-sample shape, broadcast over the rest
        ins = {n: rng.uniform(-2.0, 2.0, (N,) + _dims(s)) for n, s in k.inputs}
        want = _reference(k, ins)
        outs = [np.full(full, np.nan) for _ in k.outputs]
        args = [ctypes.c_long(N)]
        for n, _ in k.inputs:
            args += _operand(np.broadcast_to(ins[n], full))
        for arr in outs:
            args += _operand(arr)
        getattr(c_library, k.name)(*args)
        for n, got in zip(k.outputs, outs):
            expect = np.broadcast_to(want[n], full)
            err = float(np.max(np.abs(got - expect)) / max(np.max(np.abs(expect)), 1e-300))
            assert err <= 1e-13, (name, k.name, n, err)
            worst = max(worst, err)
    print(f"{len(all_kernels)} kernels, worst relative difference {worst:.1e}")


def test_strided_operands_are_read_in_place(all_kernels, c_library):
    """A gate is a channel slice of the fused convolution's output: the kernel reads it
    through its strides, without a copy (here: every operand a slice of a larger array)."""
    name, k = max(all_kernels, key=lambda nk: len(nk[1].inputs))
    rng = np.random.default_rng(1)
    full = (N,) + _dims(k.shape)
    ins = {}
    args = [ctypes.c_long(N)]
    for n, s in k.inputs:
        big = rng.uniform(-2.0, 2.0, (N, 3 * full[1]) + full[2:])
        view = big[:, full[1]:2 * full[1]]  # channels [C, 2C): strides of the parent
        ins[n] = view
        args += _operand(view)
    outs = [np.full(full, np.nan) for _ in k.outputs]
    for arr in outs:
        args += _operand(arr)
    getattr(c_library, k.name)(*args)
    want = _reference(k, ins)
    for n, got in zip(k.outputs, outs):
        np.testing.assert_allclose(got, np.broadcast_to(want[n], full), rtol=1e-13, atol=0)


NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not on PATH")
def test_the_cuda_kernels_compile_with_nvcc(all_kernels, tmp_path):
    """Device code for sm_90 and sm_80 (a fatbin of both), float32 and float64: the two
    compiles run side by side."""
    runs = {}
    for dtype in ("float32", "float64"):
        src = tmp_path / f"k_{dtype}.cu"
        src.write_text(render_cuda([k for _, k in all_kernels], dtype))
        out = tmp_path / f"k_{dtype}.fatbin"
        runs[dtype] = (out, subprocess.Popen(
            [NVCC, "--fatbin", "-gencode", "arch=compute_90,code=sm_90",
             "-gencode", "arch=compute_80,code=sm_80", "-o", str(out), str(src)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for dtype, (out, proc) in runs.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, (dtype, err[-3000:])
        assert out.stat().st_size > 0

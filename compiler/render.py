"""Render fused step kernels (compiler/fuse.py) as source for a target.

One expression source, two renderers (as tinygrad's renderers share one
UOp list): the statements of a `Kernel` become one scalar assignment each,
from the op table's `scalar` templates, inside the loop structure of the
target. A renderer knows its target's prelude, its loop over the elements
and how it reads and writes an operand; it knows no op.

Every operand is addressed through four strides over (N, C, H, W) in
elements (a broadcast dimension has stride 0, a channel slice its parent's
strides), so an operand may be a bias (C, 1, 1), a view of the fused
convolution's output or a row of a (T, N, ...) buffer without a copy.

    C:    void NAME(long n, const T *in0, long in0_s0..s3, ..., T *out0, long ..)
    CUDA: extern "C" __global__ void NAME(the same arguments), one thread an element
"""
from __future__ import annotations

from .fuse import Kernel
from .ops import OPS

CTYPES = {"float64": "double", "float32": "float"}

_MATH = {  # T's functions, as the scalar templates name them
    "double": dict(EXP="exp", TANH="tanh", LOG1P="log1p", FABS="fabs"),
    "float": dict(EXP="expf", TANH="tanhf", LOG1P="log1pf", FABS="fabsf"),
}


def _dims(shape: tuple) -> tuple:
    """A per-sample shape as (C, H, W), padded with ones on the left."""
    shape = tuple(int(d) for d in shape)
    return (1,) * (3 - len(shape)) + shape


def _prelude(ctype: str) -> list[str]:
    lines = [f"typedef {ctype} T;"]
    lines += [f"#define {k} {v}" for k, v in _MATH[ctype].items()]
    lines.append("#define CLIP01(v) ((v) < 0 ? (T)0 : ((v) > 1 ? (T)1 : (v)))")
    return lines


def _signature(k: Kernel) -> str:
    args = ["long n"]
    for j, _ in enumerate(k.inputs):
        args.append(f"const T *in{j}, " + ", ".join(f"long in{j}_s{d}" for d in range(4)))
    for j, _ in enumerate(k.outputs):
        args.append(f"T *out{j}, " + ", ".join(f"long out{j}_s{d}" for d in range(4)))
    return ", ".join(args)


def _element(k: Kernel, indent: str) -> list[str]:
    """The statements of one element at (a, c, h, w): read, compute, write."""
    names = {}
    lines = []
    for j, (node, _) in enumerate(k.inputs):
        names[node] = f"x{j}"
        lines.append(f"T x{j} = in{j}[a * in{j}_s0 + c * in{j}_s1 + h * in{j}_s2 + "
                     f"w * in{j}_s3];")
    for j, (node, op, args, attrs) in enumerate(k.body):
        names[node] = f"t{j}"
        expr = OPS[op].scalar([names[i] for i in args], attrs)
        lines.append(f"T t{j} = {expr};  /* {node} = {op} */")
    for j, node in enumerate(k.outputs):
        lines.append(f"out{j}[a * out{j}_s0 + c * out{j}_s1 + h * out{j}_s2 + "
                     f"w * out{j}_s3] = {names[node]};")
    return [indent + line for line in lines]


def render_c(kernels: list[Kernel], dtype: str = "float64") -> str:
    """The kernels as one C file (compile with -O2 -shared -fPIC, link -lm)."""
    ctype = CTYPES[dtype]
    out = ["#include <math.h>", *_prelude(ctype), ""]
    for k in kernels:
        C, H, W = _dims(k.shape)
        out.append(f"void {k.name}({_signature(k)}) {{")
        out.append("    for (long a = 0; a < n; a++)")
        out.append(f"    for (long c = 0; c < {C}; c++)")
        out.append(f"    for (long h = 0; h < {H}; h++)")
        out.append(f"    for (long w = 0; w < {W}; w++) {{")
        out += _element(k, " " * 8)
        out.append("    }")
        out.append("}")
        out.append("")
    return "\n".join(out)


def render_cuda(kernels: list[Kernel], dtype: str = "float32") -> str:
    """The kernels as one CUDA file: one thread per element (nvcc -c, or CuPy's
    RawModule with its names)."""
    ctype = CTYPES[dtype]
    out = [*_prelude(ctype), ""]
    for k in kernels:
        C, H, W = _dims(k.shape)
        out.append(f'extern "C" __global__ void {k.name}({_signature(k)}) {{')
        out.append("    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;")
        out.append(f"    if (i >= n * {C * H * W}) return;")
        out.append(f"    long w = i % {W}, h = (i / {W}) % {H}, c = (i / {W * H}) % {C}, "
                   f"a = i / {C * H * W};")
        out += _element(k, " " * 4)
        out.append("}")
        out.append("")
    return "\n".join(out)

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

`render_c_kernel` is what generated code runs on the CPU: the same element
statements, which runtime/fused.py compiles inside a CPython wrapper that
takes NumPy arrays, `kernel(out0, ..., in0, ...)`, reads their strides
(NumPy's broadcasting from the right, as the NumPy statements it replaces)
and lets go of the GIL while it runs, so batch shards run side by side.
"""
from __future__ import annotations

import re

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


def _strided(name: str) -> str:
    return f"{name}[a * {name}_s0 + c * {name}_s1 + h * {name}_s2 + w * {name}_s3]"


def _element(k: Kernel, indent: str, read=_strided, write=_strided) -> list[str]:
    """The statements of one element at (a, c, h, w): read, compute, write. `read` and
    `write` give the C lvalue of operand `inJ` / `outJ` at that element."""
    names = {}
    lines = []
    for j, (node, _) in enumerate(k.inputs):
        names[node] = f"x{j}"
        lines.append(f"T x{j} = {read(f'in{j}')};")
    for j, (node, op, args, attrs) in enumerate(k.body):
        names[node] = f"t{j}"
        expr = OPS[op].scalar([names[i] for i in args], attrs)
        lines.append(f"T t{j} = {expr};  /* {node} = {op} */")
    for j, node in enumerate(k.outputs):
        lines.append(f"{write(f'out{j}')} = {names[node]};")
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
        out += _cuda_element(k, f"{k.name}_element")
        out.append(f'extern "C" __global__ void {k.name}({_signature(k)}) {{')
        out += _cuda_launch_body(k, f"{k.name}_element")
        out.append("}")
        out.append("")
    return "\n".join(out)


def _cuda_element(k: Kernel, name: str) -> list[str]:
    """Element i of a kernel as a device function: what one thread computes."""
    C, H, W = _dims(k.shape)
    return [f"static __device__ void {name}(long i, {_signature(k)}) {{",
            f"    long w = i % {W}, h = (i / {W}) % {H}, c = (i / {W * H}) % {C}, "
            f"a = i / {C * H * W};",
            *_element(k, " " * 4), "}"]


def _cuda_launch_body(k: Kernel, element: str) -> list[str]:
    C, H, W = _dims(k.shape)
    return ["    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;",
            f"    if (i < n * {C * H * W}) {element}(i, {_arguments(k)});"]


def _arguments(k: Kernel) -> str:
    """_signature's names, to pass them on."""
    return ", ".join(part.rsplit(" ", 1)[-1].lstrip("*") for part in _signature(k).split(", "))


def render_cuda_kernel(k: Kernel) -> str:
    """One kernel as the CUDA that generated code carries (runtime/fused.py puts the
    dtype's T and functions before it and launches `kernel` through CuPy's RawModule,
    one thread an element): `element(i, ...)`, what thread i computes, and the
    kernel. Its arguments: n, then each input and each output with its four
    element strides over (a, c, h, w)."""
    return "\n".join([*_cuda_element(k, "element"),
                      f'extern "C" __global__ void kernel({_signature(k)}) {{',
                      *_cuda_launch_body(k, "element"), "}"]) + "\n"


# ---------------------------------------------------------------- the CPU module

def render_c_kernel(k: Kernel) -> str:
    """One kernel as the C that generated code carries (runtime/fused.py compiles it
    inside its CPython wrapper, once per dtype: T is float or double there, EXP and
    TANH its functions). It defines what the wrapper calls:

    - NOUT, NIN, RANK and DIMS: the outputs, the inputs, the kernel's rank per
      sample and its (C, H, W);
    - `kernel_strided(n, p, s)`: the loops over (a, c, h, w) with each operand's
      four element strides `s` (any layout NumPy gives; RARE: built with less
      optimisation, as the layouts generated code makes take the plane loop);
    - `kernel_planes(n, p, s)`: the same with one contiguous (vectorised) inner
      loop over a plane, for when `planes_ok(s)`: every operand is whole planes
      of (H, W) with contiguous rows, or constant over them.
    """
    C, H, W = _dims(k.shape)
    nin, nout = len(k.inputs), len(k.outputs)
    order = [f"out{j}" for j in range(nout)] + [f"in{j}" for j in range(nin)]
    what = ", ".join(f"{n} = {op}" for n, op, _, _ in k.body)
    lines = [f"/* {what} */",
             f"enum {{ NOUT = {nout}, NIN = {nin}, RANK = {len(tuple(k.shape))} }};",
             f"static const long DIMS[3] = {{{C}, {H}, {W}}};", ""]
    decl = []
    for j, name in enumerate(order):
        const = "const " if name.startswith("in") else ""
        decl.append(f"    {const}T *{name} = ({const}T *)p[{j}];")
        decl.append("    const long " + ", ".join(f"{name}_s{d} = s[{4 * j + d}]"
                                                     for d in range(4)) + ";")
    lines += ["RARE static void kernel_strided(long n, char **p, const long *s) {", *decl,
              "    for (long a = 0; a < n; a++)", f"    for (long c = 0; c < {C}; c++)",
              f"    for (long h = 0; h < {H}; h++)", f"    for (long w = 0; w < {W}; w++) {{",
              *_element(k, " " * 8), "    }", "}", ""]
    whole = _planes(k)
    if whole is None:
        return "\n".join(lines + [
            "static int planes_ok(const long *s) { return 0; }  /* a row or a column */",
            "static void kernel_planes(long n, char **p, const long *s) {}"]) + "\n"
    # whole planes are contiguous: stride 1 along W and W along H (moot at length 1)
    conds = []
    for j, name in enumerate(order):
        if whole[name]:
            conds += [f"s[{4 * j + 3}] == 1"] if W > 1 else []
            conds += [f"s[{4 * j + 2}] == {W}"] if H > 1 else []
    lines += ["static int planes_ok(const long *s) {",
              f"    return {' && '.join(conds) or '1'};", "}", ""]
    lines += ["static void kernel_planes(long n, char **p, const long *s) {", *decl]
    lines += ["    for (long a = 0; a < n; a++)", f"    for (long c = 0; c < {C}; c++) {{"]
    for name in order:
        const = "const " if name.startswith("in") else ""
        lines.append(f"        {const}T *{name}_r = {name} + a * {name}_s0 + c * {name}_s1;")
    # element i of a plane reads and writes element i only (an output may be an
    # input's buffer, element for element): no dependence between iterations
    lines += ["        #pragma GCC ivdep", f"        for (long i = 0; i < {H * W}; i++) {{"]
    lines += _element(k, " " * 12, read=lambda x: f"{x}_r[i]" if whole[x] else f"{x}_r[0]",
                      write=lambda x: f"{x}_r[i]")
    lines += ["        }", "    }", "}"]
    return "\n".join(lines) + "\n"


def _planes(k: Kernel) -> dict[str, bool] | None:
    """Per operand: whether it is a whole (H, W) plane (else constant over the plane);
    None when some operand is neither (a row (1, W) or a column (H, 1))."""
    _, H, W = _dims(k.shape)
    whole = {f"out{j}": True for j in range(len(k.outputs))}
    for j, (_, shape) in enumerate(k.inputs):
        _, h, w = _dims(shape)
        if (h, w) == (H, W):
            whole[f"in{j}"] = True
        elif (h, w) == (1, 1):
            whole[f"in{j}"] = False
        else:
            return None
    return whole


# ---------------------------------------------------------------- the array fallback

def render_python_kernel(k: Kernel) -> list[str]:
    """The kernel as Python over an array module (NumPy or CuPy), one call a statement:
    what a fused module runs where its C cannot (another device, no compiler), and
    what the C is checked against. Same arguments: outputs, then inputs."""
    outs = [f"out{j}" for j in range(len(k.outputs))]
    names = {node: f"in{j}" for j, (node, _) in enumerate(k.inputs)}
    what = ", ".join(op for _, op, _, _ in k.body if op != "const")
    lines = [f"def {k.name}({', '.join(outs + list(names.values()))}):",
             f'    """{what}"""',
             "    xp = rt.array_module(out0)"]
    for j, (node, op, args, attrs) in enumerate(k.body):
        names[node] = f"t{j}"
        lines.append(f"    t{j} = {OPS[op].code([names[a] for a in args], attrs)}")
    for j, node in enumerate(k.outputs):
        lines.append(f"    xp.copyto(out{j}, {names[node]})")
    return lines


def same_kernel(k: Kernel) -> str:
    """What a kernel computes, whatever its name: its C rendering less name and comments."""
    return re.sub(r"/\*.*?\*/", "", render_c([Kernel("K", k.shape, k.inputs, k.outputs,
                                                      k.body)]))

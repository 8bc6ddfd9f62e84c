"""Build and load the fused step kernels of a generated module (compiler/fuse.py).

A module compiled with `fuse=True` carries each kernel's loops as C
(compiler/render.py `render_c_kernel`) in a dict `KERNELS` and makes
`FK = rt.FusedKernels(KERNELS)`; its functions take `K = FK.of(dtype)` and
call `K.k0(out0, ..., in0, ...)` with NumPy arrays. For each kernel and dtype
this file wraps the C in a small CPython extension (`WRAPPER`: it checks the
arrays, reads their strides and calls the loops without the GIL), compiles
it with the system C compiler and imports it. A dtype's kernels are built the
first time a function runs in that dtype, several compilers at once; each
shared object is kept in a cache folder keyed by its source, the compiler's
command and this CPU, so the next process only imports it, and two models
with the same kernel share it.

The kernels are compiled for this CPU (`-march=native`, vector math from
glibc's libmvec, or scalar libm where glibc is older) without `-ffast-math`: NaN and
infinity pass through as in NumPy (poison mode, --debug-nans), and nothing is
reassociated. The same source, compiler and CPU give the same bits, run to
run; they agree with the NumPy path to rounding (a few ulp of each function).

`available()` says whether kernels can be built here (a C compiler, Python's
headers, NumPy's headers) and, if not, why; `convc doctor` shows it. Models
are compiled with fused kernels by default where they can be built
(`default_on`), for the CPU; the environment variable CONVC_FUSE=0 makes the
plain NumPy path the default again (fuse=True still fuses).

Where the C cannot run (a GPU backend's arrays, a compiler that fails) a
fused module runs its `ArrayKernels` instead: the same kernels in Python over
the array module, one call a statement (CONVC_FUSE=array asks for them
everywhere). A failed build is said once, as a warning, with the compiler's
message.
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import types
import warnings
from pathlib import Path

FLAGS = ["-O2", "-ftree-vectorize", "-march=native", "-fno-math-errno", "-fno-trapping-math",
         "-fPIC", "-shared"]
LIBS = ["-lm"]


class KernelBuildError(RuntimeError):
    """The C compiler refused a module's kernels (its message is in the error)."""


def compiler() -> str | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    return cc if cc and shutil.which(cc) else None


def _includes() -> list[str]:
    import numpy

    return [sysconfig.get_paths()["include"], numpy.get_include()]


def default_on() -> bool:
    """Whether models compile with fused kernels when fuse= is not given."""
    return os.environ.get("CONVC_FUSE", "") != "0" and available()[0]


def available() -> tuple[bool, str]:
    """(True, what builds the kernels) or (False, why they cannot be built here)."""
    cc = compiler()
    if cc is None:
        return False, "no C compiler (cc or gcc) on PATH"
    py, np_inc = _includes()
    if not Path(py, "Python.h").exists():
        return False, f"no Python.h in {py} (install Python's development headers)"
    if not Path(np_inc, "numpy", "arrayobject.h").exists():
        return False, f"no NumPy headers in {np_inc}"
    return True, f"{cc} {' '.join(FLAGS)}"


def cache_dir() -> Path:
    """Where built kernels are kept: $CONVC_CACHE, else $XDG_CACHE_HOME/convc, else
    ~/.cache/convc; `kernels/` inside it."""
    root = os.environ.get("CONVC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "convc")
    return Path(root) / "kernels"


@functools.cache
def _cpu() -> str:
    """What -march=native compiles for: the CPU's model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(lines))


def _key(source: str, cc: str) -> str:
    h = hashlib.sha256()
    for part in (source, cc, " ".join(FLAGS + LIBS), _cpu(), sys.version, *_includes()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


DTYPES = {"float64": ("double", "NPY_DOUBLE", dict(EXP="exp", TANH="tanh", LOG1P="log1p",
                                                   FABS="fabs")),
          "float32": ("float", "NPY_FLOAT", dict(EXP="expf", TANH="tanhf", LOG1P="log1pf",
                                                 FABS="fabsf"))}

_PRELUDE = r"""#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#include <math.h>

#ifndef CONVC_NO_LIBMVEC  /* glibc's vector math: the plane loops call it 4-16 at a time */
__attribute__((simd("notinbranch"))) extern double exp(double);
__attribute__((simd("notinbranch"))) extern float expf(float);
__attribute__((simd("notinbranch"))) extern double tanh(double);
__attribute__((simd("notinbranch"))) extern float tanhf(float);
__attribute__((simd("notinbranch"))) extern double log1p(double);
__attribute__((simd("notinbranch"))) extern float log1pf(float);
#endif

#define CLIP01(v) ((v) < 0 ? (T)0 : ((v) > 1 ? (T)1 : (v)))
#if defined(__GNUC__) && !defined(__clang__)  /* the strided loop: rare, built quickly */
#define RARE __attribute__((optimize("O1")))
#else
#define RARE
#endif
"""

WRAPPER = r"""
/* The Python side of the kernel above: kernel(out0, ..., in0, ...), NumPy arrays of
   dtype T. The loops run over (n, C, H, W): n the outputs' batch, (C, H, W) the
   kernel's DIMS, RANK axes of them per sample. Each array is right-aligned to
   (n, its RANK axes), as NumPy broadcasts: an input of length 1 on an axis, or
   without it, has stride 0 there; an output has the full shape and is writable. */
static PyObject *py_kernel(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    char *p[NOUT + NIN];
    long s[4 * (NOUT + NIN)], n = 0;
    if (nargs != NOUT + NIN)
        return PyErr_Format(PyExc_TypeError, "%s takes %d arrays (%d outputs, then %d "
                            "inputs), not %zd", NAME, NOUT + NIN, NOUT, NIN, nargs);
    for (int j = 0; j < NOUT + NIN; j++) {
        PyArrayObject *x = (PyArrayObject *)args[j];
        if (!PyArray_Check(args[j]))
            return PyErr_Format(PyExc_TypeError, "%s: operand %d is a %s, not a NumPy array",
                                NAME, j, Py_TYPE(args[j])->tp_name);
        if (PyArray_TYPE(x) != TYPENUM)
            return PyErr_Format(PyExc_TypeError, "%s: operand %d is not of the kernel's "
                                "dtype (%s)", NAME, j, DTYPE);
        int nd = PyArray_NDIM(x);
        npy_intp *shape = PyArray_DIMS(x), *st = PyArray_STRIDES(x);
        if ((j < NOUT && nd != RANK + 1) || nd > RANK + 1)
            return PyErr_Format(PyExc_ValueError, "%s: operand %d has %d axes, not %d", NAME,
                                j, nd, RANK + 1);
        if (j == 0) n = (long)shape[0];
        const long want[4] = {n, DIMS[0], DIMS[1], DIMS[2]};
        long *sj = s + 4 * j;
        sj[0] = sj[1] = sj[2] = sj[3] = 0;
        for (int d = 0; d < nd; d++) {
            int target = RANK + 1 - nd + d;                   /* axis of (n, RANK axes) */
            int axis = target == 0 ? 0 : target + 3 - RANK;   /* axis of (a, c, h, w) */
            long len = (long)shape[d];
            if (len == want[axis]) sj[axis] = (long)(st[d] / (npy_intp)sizeof(T));
            else if (len != 1 || j < NOUT)
                return PyErr_Format(PyExc_ValueError, "%s: operand %d has length %ld on "
                                    "axis %d, not %ld", NAME, j, len, d, want[axis]);
        }
        if (j < NOUT && !PyArray_ISWRITEABLE(x))
            return PyErr_Format(PyExc_ValueError, "%s: output %d is read-only", NAME, j);
        p[j] = PyArray_BYTES(x);
    }
    Py_BEGIN_ALLOW_THREADS
    if (planes_ok(s)) kernel_planes(n, p, s); else kernel_strided(n, p, s);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"kernel", (PyCFunction)(void (*)(void))py_kernel, METH_FASTCALL, NAME},
    {NULL, NULL, 0, NULL}};
static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, MODULE, NAME, -1, methods};
PyMODINIT_FUNC INIT(void) {
    import_array();
    return PyModule_Create(&moduledef);
}
"""


def extension_source(kernel: str, name: str, dtype: str, module: str) -> str:
    """The whole C file of one kernel (generated code's KERNELS[name]) in one dtype."""
    ctype, typenum, math = DTYPES[dtype]
    head = [_PRELUDE, f"typedef {ctype} T;", f"#define TYPENUM {typenum}",
            f'#define DTYPE "{dtype}"', f'#define NAME "{name}"', f'#define MODULE "{module}"',
            f"#define INIT PyInit_{module}"]
    head += [f"#define {k} {v}" for k, v in math.items()]
    return "\n".join(head) + "\n\n" + kernel + WRAPPER


_loaded: dict[str, object] = {}


def _why_not() -> str | None:
    ok, why = available()
    return None if ok else why


def load(kernel: str, name: str, dtype: str):
    """The function `kernel(out0, ..., in0, ...)` of one kernel's C in one dtype,
    compiled on first use and cached on disk."""
    why = _why_not()
    if why is not None:
        raise KernelBuildError(f"fused kernels cannot be built here: {why}")
    cc = compiler()
    probe = extension_source(kernel, name, dtype, "convc_k")
    key = _key(probe, cc)
    if key not in _loaded:
        module = f"convc_k{key}"
        so = cache_dir() / f"{module}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
        source = extension_source(kernel, name, dtype, module)
        if not so.exists():
            try:
                try:
                    _build(source, cc, so)
                except KernelBuildError:  # a compiler without gcc's simd attribute (clang)
                    _build("#define CONVC_NO_LIBMVEC\n" + source, cc, so)
            except OSError as exc:  # a cache folder that cannot be written, a full disk
                raise KernelBuildError(f"cannot build into {so.parent}: {exc} (set "
                                       f"CONVC_CACHE to a folder that can be written)") from exc
        try:
            mod = _import(module, so)
        except ImportError:  # an older glibc without these vector functions: scalar ones
            so.unlink(missing_ok=True)
            _build("#define CONVC_NO_LIBMVEC\n" + source, cc, so)
            mod = _import(module, so)
        _loaded[key] = mod.kernel
    return _loaded[key]


def _import(module: str, so: Path):
    spec = importlib.util.spec_from_file_location(
        module, so, loader=importlib.machinery.ExtensionFileLoader(module, str(so)))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class FusedKernels:
    """A generated module's kernels: its KERNELS (name -> C), built per dtype on demand,
    its ArrayKernels (the same over the array module) and its CUDA_KERNELS.

    `of(dtype, backend)` is what the module's functions call `K.k0(...)` on: the C
    kernels for a CPU backend's NumPy arrays (the first call in a dtype builds
    every kernel of the module in it, several compilers at once), the CUDA
    kernels for a GPU backend (CuPy's RawModule compiles them, once per dtype
    and device), else the array kernels."""

    def __init__(self, kernels: dict[str, str], fallback=None, cuda: dict | None = None):
        self.kernels = dict(kernels)
        self.fallback = fallback
        self.cuda = dict(cuda or {})
        self._built: dict[str, object] = {}
        self._lock = threading.Lock()

    def of(self, dtype, backend=None):
        key = _numpy().dtype(dtype).name
        if backend is not None and backend.capabilities.device == "gpu":
            if not self.cuda or os.environ.get("CONVC_FUSE", "") == "array":
                return self.fallback
            key = f"{key}@gpu{_device_id()}"
        elif backend is not None and getattr(backend, "xp", None) is not _numpy():
            return self.fallback
        ns = self._built.get(key)
        if ns is None:
            with self._lock:  # shards of one call start together: build once
                ns = self._built.get(key)
                if ns is None:
                    ns = self._built[key] = self._build(key)
        return ns

    def _build(self, key: str):
        dtype, _, gpu = key.partition("@")
        if gpu:
            return types.SimpleNamespace(**{
                name: CudaKernel(source, name, dtype, shape, nout)
                for name, (shape, nout, source) in self.cuda.items()})
        if os.environ.get("CONVC_FUSE", "") == "array" or dtype not in DTYPES:
            return self.fallback
        jobs = max(1, min(len(self.kernels), os.cpu_count() or 1, 8))
        try:
            with concurrent.futures.ThreadPoolExecutor(jobs) as pool:  # gcc: outside the GIL
                fns = list(pool.map(lambda item: load(item[1], item[0], dtype),
                                    self.kernels.items()))
        except KernelBuildError as exc:
            if self.fallback is None:
                raise
            warnings.warn(f"fused kernels: {exc}\nrunning them as array code instead (slower)",
                          RuntimeWarning, stacklevel=3)
            return self.fallback
        return types.SimpleNamespace(**dict(zip(self.kernels, fns)))


# ---------------------------------------------------------------- on the GPU

CUDA_DTYPES = {"float64": ("double", dict(EXP="exp", TANH="tanh", LOG1P="log1p", FABS="fabs")),
               "float32": ("float", dict(EXP="expf", TANH="tanhf", LOG1P="log1pf",
                                         FABS="fabsf"))}
THREADS = 256  # a block


def cuda_source(kernel: str, dtype: str) -> str:
    """The whole CUDA file of one kernel (generated code's CUDA_KERNELS) in one dtype."""
    ctype, math = CUDA_DTYPES[dtype]
    head = [f"typedef {ctype} T;", *(f"#define {k} {v}" for k, v in math.items()),
            "#define CLIP01(v) ((v) < 0 ? (T)0 : ((v) > 1 ? (T)1 : (v)))"]
    return "\n".join(head) + "\n\n" + kernel


def element_strides(shape, strides, itemsize: int, n: int, kshape: tuple, output: bool,
                    what: str) -> list[int]:
    """An array's element strides over a kernel's (a, c, h, w): the rule of the C
    wrapper (WRAPPER), right-aligned to (n, kshape) as NumPy broadcasts."""
    rank = len(kshape)
    dims = (1,) * (3 - rank) + tuple(kshape)
    nd = len(shape)
    if (output and nd != rank + 1) or nd > rank + 1:
        raise ValueError(f"{what} has {nd} axes, not {rank + 1}")
    want = (n, *dims)
    out = [0, 0, 0, 0]
    for d in range(nd):
        target = rank + 1 - nd + d
        axis = 0 if target == 0 else target + 3 - rank
        if shape[d] == want[axis]:
            out[axis] = strides[d] // itemsize
        elif shape[d] != 1 or output:
            raise ValueError(f"{what} has length {shape[d]} on axis {d}, not {want[axis]}")
    return out


class CudaKernel:
    """One fused kernel on the GPU: `kernel(out0, ..., in0, ...)` with CuPy arrays,
    one launch of one thread an element, on the current stream (no synchronisation)."""

    def __init__(self, source: str, name: str, dtype: str, shape: tuple, nout: int):
        import cupy

        self.name, self.dtype, self.shape, self.nout = name, dtype, tuple(shape), nout
        self.fn = cupy.RawModule(code=cuda_source(source, dtype)).get_function("kernel")
        self.size = 1
        for d in self.shape:
            self.size *= int(d)

    def __call__(self, *arrays):
        outs, ins = arrays[:self.nout], arrays[self.nout:]
        n = int(outs[0].shape[0])
        np = _numpy()
        args = [np.int64(n)]
        for j, a in [(j, a) for j, a in enumerate(ins)] + [(None, a) for a in outs]:
            if str(a.dtype) != self.dtype:
                raise TypeError(f"{self.name}: an operand is {a.dtype}, the kernel "
                                f"{self.dtype}")
            what = f"{self.name}: " + (f"input {j}" if j is not None else "an output")
            s = element_strides(a.shape, a.strides, a.itemsize, n, self.shape, j is None, what)
            args += [a, *(np.int64(v) for v in s)]
        total = n * self.size
        self.fn(((total + THREADS - 1) // THREADS,), (THREADS,), tuple(args))


def _device_id() -> int:
    import cupy

    return int(cupy.cuda.runtime.getDevice())


def _numpy():
    import numpy

    return numpy


def _build(source: str, cc: str, so: Path) -> None:
    """Compile into a temporary folder, then rename into place: a reader never sees a
    half-written file, and two processes building the same kernels both succeed."""
    so.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=so.parent, prefix=".build-") as tmp:
        c = Path(tmp, "kernels.c")
        c.write_text(source, encoding="utf-8")
        out = Path(tmp, so.name)
        cmd = [cc, *FLAGS, *(f"-I{d}" for d in _includes()), str(c), "-o", str(out), *LIBS]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise KernelBuildError(f"{' '.join(cmd)} failed:\n{r.stderr.strip()[-4000:]}")
        os.replace(out, so)

"""oneDNN's CPU convolutions behind convc's backend interface (`--conv onednn`).

PyTorch's CPU convolutions are oneDNN's. This backend calls the same library,
libdnnl.so.3 of oneDNN v3.2 built with GNU OpenMP (the PyPI wheel
`onednn-cpu-gomp==2023.2.0`, `pip install 'convc[onednn]'`), through its C
API with ctypes: the wheel has no headers, so the enum values and signatures
below are copied from the v3.2 headers (include/oneapi/dnnl/dnnl_types.h,
dnnl_common_types.h, dnnl.h) and named after them.

What runs where:

- float32: the forward convolution, the input gradient (oneDNN's backward
  data) and the weight gradient (backward weights) are oneDNN primitives on
  plain memory, NCHW activations and OIHW weights (format tags nchw, oihw),
  with convc's stride, padding and dilation (oneDNN counts dilation from 0:
  it is passed as d - 1). No bias: convc emits bias as a separate add.
  Primitives are made once per (operation, shapes, stride, pad, dilation,
  dtype, threads) and kept by the backend; their scratchpad is a buffer the
  backend owns (scratchpad mode "user"), so two backends in two threads share
  nothing.
- float64: oneDNN has no float64 convolution on the CPU, so float64 calls go
  to NumpyBackend's im2col + GEMM functions unchanged (the results are
  NumpyBackend's to the bit).
- Shapes oneDNN does not win: a fixed rule, `use_onednn`, sends them to
  NumpyBackend's functions as well (bench/onednn_conv.py measured it; see
  there and docs/compiler.md). The rule depends only on the operation, the
  shapes and the thread count, never on a timing taken at run time, so a
  given model on a given thread count runs the same code on every run.

Threads: oneDNN runs on OpenMP threads, as many as the BLAS library is
allowed now (threadpoolctl's count, which `--threads`, `threadpool_limits`
and OMP_NUM_THREADS set; inside a batch shard's thread, where kernels.in_shards
holds BLAS to one thread, one). Without threadpoolctl it is OpenMP's own
default (OMP_NUM_THREADS, else every core). The count is set on the calling
thread (omp_set_num_threads) before each primitive is made or run, and is
part of the primitive's key: oneDNN fixes its work split for the thread
count a primitive is made with, so the same inputs on the same thread count
give the same bits on every run (tests/test_onednn.py checks it, 20 runs of
each operation on fresh primitives, on 1 and 2 threads).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

import numpy

from convc.errors import BackendError
from convc.runtime.backend import Capabilities, Pair, check_conv2d_shapes
from convc.runtime.ops_numpy import NumpyBackend, _check_gy

INSTALL_HINT = "pip install 'convc[onednn]'"

# ---------------------------------------------------------------- oneDNN v3.2 C API values
# dnnl_common_types.h: dnnl_status_t
DNNL_SUCCESS = 0
_STATUS_NAMES = {0: "success", 1: "out_of_memory", 2: "invalid_arguments", 3: "unimplemented",
                 4: "last_impl_reached", 5: "runtime_error", 6: "not_required"}
# dnnl_common_types.h: dnnl_data_type_t
DNNL_F32 = 3
# dnnl_common_types.h: dnnl_engine_kind_t
DNNL_CPU = 1
# dnnl_common_types.h: dnnl_stream_flags_t
DNNL_STREAM_DEFAULT_FLAGS = 0x1  # dnnl_stream_in_order
# dnnl_types.h: dnnl_format_tag_t (undef = 0, any, a, ab, abc, abcd, ...; nchw = oihw = abcd)
DNNL_FORMAT_TAG_NCHW = 5
DNNL_FORMAT_TAG_OIHW = 5
# dnnl_types.h: dnnl_prop_kind_t
DNNL_FORWARD_TRAINING = 64
# dnnl_types.h: dnnl_alg_kind_t
DNNL_CONVOLUTION_DIRECT = 0x1
# dnnl_types.h: dnnl_scratchpad_mode_t
DNNL_SCRATCHPAD_MODE_USER = 1
# dnnl_types.h: dnnl_query_t (impl_info_str = 8; some_md = 128, then src_md, ... scratchpad_md)
DNNL_QUERY_IMPL_INFO_STR = 8
DNNL_QUERY_SCRATCHPAD_MD = 136
# dnnl_types.h: DNNL_ARG_* (#define)
DNNL_ARG_SRC = 1
DNNL_ARG_DST = 17
DNNL_ARG_WEIGHTS = 33
DNNL_ARG_SCRATCHPAD = 80
DNNL_ARG_DIFF_SRC = 129
DNNL_ARG_DIFF_DST = 145
DNNL_ARG_DIFF_WEIGHTS = 161
# dnnl_common_types.h: DNNL_MAX_NDIMS; dnnl_dims_t is int64_t[DNNL_MAX_NDIMS]
DNNL_MAX_NDIMS = 12

_Dims = ctypes.c_int64 * DNNL_MAX_NDIMS


class _ExecArg(ctypes.Structure):
    """dnnl_types.h: dnnl_exec_arg_t {int arg; dnnl_memory_t memory;}."""

    _fields_ = [("arg", ctypes.c_int), ("memory", ctypes.c_void_p)]


class _Version(ctypes.Structure):
    """dnnl_common_types.h: dnnl_version_t."""

    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
                ("hash", ctypes.c_char_p), ("cpu_runtime", ctypes.c_uint),
                ("gpu_runtime", ctypes.c_uint)]


# ---------------------------------------------------------------- the per-shape rule
# Measured with bench/onednn_conv.py on a 2-core AVX2 machine (AMD EPYC, no AVX-512; the
# table is in docs/compiler.md, "The oneDNN backend"). With plain NCHW/OIHW memory oneDNN
# picks its own im2col + GEMM ("x64:gemm:jit"), which is no faster than convc's on one
# thread except where convc's GEMM is degenerate; on two threads its single-call OpenMP
# split of a large weight gradient beats OpenBLAS's threads on convc's one GEMM. The rule
# is fixed, never timed at run time, so a given model on a given thread count runs the
# same code on every run (and gives the same bits).
#
# 1. The input gradient of a pointwise convolution (1x1, stride 1, no padding): convc's
#    is a GEMM with K = O (often 1, a predicting head), oneDNN's was 1.2-17x faster.
# 2. With 2 or more threads, a weight gradient of at least ONEDNN_GRAD_WEIGHT_MACS
#    multiply-adds (1.03-1.8x faster there; below it, and on one thread, it lost).
# 3. Everything else runs NumpyBackend's code (oneDNN was 0.36-1.18x of its speed).
ONEDNN_GRAD_WEIGHT_MACS = 100e6
RULE = ("oneDNN for the input gradient of 1x1 stride-1 unpadded convolutions, and for weight "
        "gradients of >= 1e8 multiply-adds when running on >= 2 threads; NumPy otherwise")


def use_onednn(op: str, x_shape: tuple, w_shape: tuple, stride: Pair, pad: Pair,
               dilation: Pair, nthreads: int) -> bool:
    """Whether the float32 convolution `op` ("fwd", "bwd_data", "bwd_weights") of this
    geometry, on `nthreads` threads, runs on oneDNN (else on NumpyBackend's code)."""
    n, c, _, _ = x_shape
    o, _, kh, kw = w_shape
    if op == "bwd_data":
        return (kh, kw) == (1, 1) and tuple(stride) == (1, 1) and tuple(pad) == (0, 0)
    if op == "bwd_weights" and nthreads >= 2:
        ho, wo = check_conv2d_shapes(tuple(x_shape), tuple(w_shape), stride, pad, dilation)
        return n * o * c * kh * kw * ho * wo >= ONEDNN_GRAD_WEIGHT_MACS
    return False


# ---------------------------------------------------------------- the library

_LIB: dict = {}
_LOCK = threading.Lock()


def _candidates() -> list[str]:
    """Where libdnnl.so.3 may be: the environment's lib/ (where the wheel puts it), then
    the loader's search path."""
    found = []
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix, os.environ.get("CONDA_PREFIX"))):
        if prefix:
            path = os.path.join(prefix, "lib", "libdnnl.so.3")
            if os.path.exists(path):
                found.append(path)
    return found + ["libdnnl.so.3"]


def _declare(lib) -> None:
    c_int, c_void_p, c_size_t = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
    p = ctypes.POINTER
    sigs = {
        # dnnl_common.h
        "dnnl_engine_create": (c_int, [p(c_void_p), c_int, c_size_t]),
        "dnnl_stream_create": (c_int, [p(c_void_p), c_void_p, ctypes.c_uint]),
        "dnnl_stream_wait": (c_int, [c_void_p]),
        "dnnl_version": (p(_Version), []),
        # dnnl.h
        "dnnl_memory_desc_create_with_tag": (c_int, [p(c_void_p), c_int, _Dims, c_int, c_int]),
        "dnnl_memory_desc_destroy": (c_int, [c_void_p]),
        "dnnl_memory_desc_get_size": (c_size_t, [c_void_p]),
        "dnnl_memory_create": (c_int, [p(c_void_p), c_void_p, c_void_p, c_void_p]),
        "dnnl_memory_set_data_handle": (c_int, [c_void_p, c_void_p]),
        "dnnl_memory_destroy": (c_int, [c_void_p]),
        "dnnl_primitive_attr_create": (c_int, [p(c_void_p)]),
        "dnnl_primitive_attr_destroy": (c_int, [c_void_p]),
        "dnnl_primitive_attr_set_scratchpad_mode": (c_int, [c_void_p, c_int]),
        "dnnl_convolution_forward_primitive_desc_create": (
            c_int, [p(c_void_p), c_void_p, c_int, c_int, c_void_p, c_void_p, c_void_p,
                    c_void_p, _Dims, _Dims, _Dims, _Dims, c_void_p]),
        "dnnl_convolution_backward_data_primitive_desc_create": (
            c_int, [p(c_void_p), c_void_p, c_int, c_void_p, c_void_p, c_void_p,
                    _Dims, _Dims, _Dims, _Dims, c_void_p, c_void_p]),
        "dnnl_convolution_backward_weights_primitive_desc_create": (
            c_int, [p(c_void_p), c_void_p, c_int, c_void_p, c_void_p, c_void_p, c_void_p,
                    _Dims, _Dims, _Dims, _Dims, c_void_p, c_void_p]),
        "dnnl_primitive_desc_query": (c_int, [c_void_p, c_int, c_int, c_void_p]),
        "dnnl_primitive_desc_query_md": (c_void_p, [c_void_p, c_int, c_int]),
        "dnnl_primitive_desc_destroy": (c_int, [c_void_p]),
        "dnnl_primitive_create": (c_int, [p(c_void_p), c_void_p]),
        "dnnl_primitive_execute": (c_int, [c_void_p, c_void_p, c_int, p(_ExecArg)]),
        "dnnl_primitive_destroy": (c_int, [c_void_p]),
        # libgomp, which libdnnl links (dlsym on libdnnl's handle finds that one)
        "omp_set_num_threads": (None, [c_int]),
        "omp_get_max_threads": (c_int, []),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args


def _check(status: int, what: str) -> None:
    if status != DNNL_SUCCESS:
        raise BackendError(f"oneDNN: {what} failed with dnnl_status "
                           f"{_STATUS_NAMES.get(status, status)}")


def library():
    """The loaded libdnnl (a ctypes.CDLL) with one CPU engine and stream; BackendError
    naming the install command when it cannot be loaded."""
    with _LOCK:
        if "lib" in _LIB:
            return _LIB["lib"]
        errors = []
        lib = None
        for path in _candidates():
            try:
                lib = ctypes.CDLL(path)
                _declare(lib)
            except (OSError, AttributeError) as exc:
                errors.append(f"{path}: {exc}")
                lib = None
                continue
            break
        if lib is None:
            raise BackendError("the onednn backend needs oneDNN's libdnnl.so.3 (v3.2, GNU "
                               f"OpenMP); {INSTALL_HINT} (tried {'; '.join(errors)})")
        version = lib.dnnl_version().contents
        if version.major != 3:
            raise BackendError(f"the onednn backend needs oneDNN 3.x, found "
                               f"{version.major}.{version.minor}; {INSTALL_HINT}")
        engine, stream = ctypes.c_void_p(), ctypes.c_void_p()
        _check(lib.dnnl_engine_create(ctypes.byref(engine), DNNL_CPU, 0), "dnnl_engine_create")
        _check(lib.dnnl_stream_create(ctypes.byref(stream), engine, DNNL_STREAM_DEFAULT_FLAGS),
               "dnnl_stream_create")
        lib.engine, lib.stream = engine, stream
        lib.path = getattr(lib, "_name", "libdnnl.so.3")
        lib.version = f"{version.major}.{version.minor}.{version.patch}"
        _LIB["lib"] = lib
        return lib


def version() -> str:
    """'3.2.0 (path)' of the libdnnl this backend loads (BackendError when none)."""
    lib = library()
    return f"{lib.version} ({lib.path})"


# ---------------------------------------------------------------- threads

_BLAS: dict = {}


def threads() -> int:
    """How many OpenMP threads oneDNN runs a convolution on, called from this thread now:
    the BLAS library's thread count (threadpoolctl), else OpenMP's default."""
    blas = _BLAS.get("ctl")
    if blas is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            blas = False
        else:
            blas = ThreadpoolController().select(user_api="blas")
            blas = blas if blas.lib_controllers else False
        _BLAS["ctl"] = blas
    if blas:
        return max(1, min(lib.num_threads or 1 for lib in blas.lib_controllers))
    return max(1, int(library().omp_get_max_threads()))


# ---------------------------------------------------------------- primitives


def _dims(values) -> "_Dims":
    d = _Dims()
    for i, v in enumerate(values):
        d[i] = int(v)
    return d


class _Conv:
    """One oneDNN convolution primitive of one geometry, with its memory objects.

    kind: "fwd" (src, weights -> dst), "bwd_data" (diff_dst, weights -> diff_src) or
    "bwd_weights" (src, diff_dst -> diff_weights). Operands are bound by pointer at each
    call; every operand must be a C-contiguous float32 array of its shape.
    """

    def __init__(self, lib, kind: str, x_shape: tuple, w_shape: tuple, y_shape: tuple,
                 stride: Pair, pad: Pair, dilation: Pair):
        self.lib = lib
        self.kind = kind
        self._mds, self._mems = [], []
        self.pd = self.prim = None
        try:
            self._make(x_shape, w_shape, y_shape, stride, pad, dilation)
        except BaseException:
            self.close()
            raise

    def _md(self, shape, tag):
        md = ctypes.c_void_p()
        _check(self.lib.dnnl_memory_desc_create_with_tag(ctypes.byref(md), 4, _dims(shape),
                                                         DNNL_F32, tag),
               "dnnl_memory_desc_create_with_tag")
        self._mds.append(md)
        return md

    def _mem(self, md, arg):
        mem = ctypes.c_void_p()
        _check(self.lib.dnnl_memory_create(ctypes.byref(mem), md, self.lib.engine, None),
               "dnnl_memory_create")
        self._mems.append((arg, mem))
        return mem

    def _make(self, x_shape, w_shape, y_shape, stride, pad, dilation):
        lib = self.lib
        src = self._md(x_shape, DNNL_FORMAT_TAG_NCHW)
        wei = self._md(w_shape, DNNL_FORMAT_TAG_OIHW)
        dst = self._md(y_shape, DNNL_FORMAT_TAG_NCHW)
        strides = _dims(stride)
        dil = _dims([d - 1 for d in dilation])  # oneDNN: 0 means no dilation
        pl = _dims(pad)
        pr = _dims(pad)  # symmetric: Ho = (H + 2p - dk) // s + 1, convc's floor rule
        attr = ctypes.c_void_p()
        _check(lib.dnnl_primitive_attr_create(ctypes.byref(attr)), "dnnl_primitive_attr_create")
        fwd = ctypes.c_void_p()
        pd = ctypes.c_void_p()
        try:
            _check(lib.dnnl_primitive_attr_set_scratchpad_mode(attr, DNNL_SCRATCHPAD_MODE_USER),
                   "dnnl_primitive_attr_set_scratchpad_mode")
            _check(lib.dnnl_convolution_forward_primitive_desc_create(
                ctypes.byref(fwd), lib.engine, DNNL_FORWARD_TRAINING, DNNL_CONVOLUTION_DIRECT,
                src, wei, None, dst, strides, dil, pl, pr, attr),
                "dnnl_convolution_forward_primitive_desc_create")
            if self.kind == "fwd":
                pd, fwd = fwd, ctypes.c_void_p()
                args = ((src, DNNL_ARG_SRC), (wei, DNNL_ARG_WEIGHTS), (dst, DNNL_ARG_DST))
            elif self.kind == "bwd_data":
                _check(lib.dnnl_convolution_backward_data_primitive_desc_create(
                    ctypes.byref(pd), lib.engine, DNNL_CONVOLUTION_DIRECT, src, wei, dst,
                    strides, dil, pl, pr, fwd, attr),
                    "dnnl_convolution_backward_data_primitive_desc_create")
                args = ((dst, DNNL_ARG_DIFF_DST), (wei, DNNL_ARG_WEIGHTS),
                        (src, DNNL_ARG_DIFF_SRC))
            else:
                _check(lib.dnnl_convolution_backward_weights_primitive_desc_create(
                    ctypes.byref(pd), lib.engine, DNNL_CONVOLUTION_DIRECT, src, wei, None, dst,
                    strides, dil, pl, pr, fwd, attr),
                    "dnnl_convolution_backward_weights_primitive_desc_create")
                args = ((src, DNNL_ARG_SRC), (dst, DNNL_ARG_DIFF_DST),
                        (wei, DNNL_ARG_DIFF_WEIGHTS))
        finally:
            lib.dnnl_primitive_attr_destroy(attr)
            if fwd:
                lib.dnnl_primitive_desc_destroy(fwd)
        self.pd = pd
        info = ctypes.c_char_p()
        if lib.dnnl_primitive_desc_query(pd, DNNL_QUERY_IMPL_INFO_STR, 0,
                                         ctypes.byref(info)) == DNNL_SUCCESS and info.value:
            self.impl = info.value.decode()
        else:
            self.impl = "?"
        scratch_md = lib.dnnl_primitive_desc_query_md(pd, DNNL_QUERY_SCRATCHPAD_MD, 0)
        self.scratch_bytes = int(lib.dnnl_memory_desc_get_size(scratch_md)) if scratch_md else 0
        for md, arg in args:
            self._mem(md, arg)
        if self.scratch_bytes:
            self._mem(scratch_md, DNNL_ARG_SCRATCHPAD)
        prim = ctypes.c_void_p()
        _check(lib.dnnl_primitive_create(ctypes.byref(prim), pd), "dnnl_primitive_create")
        self.prim = prim
        self._args = (_ExecArg * len(self._mems))(*[_ExecArg(a, m) for a, m in self._mems])
        self._n = len(self._mems)

    def __call__(self, nthreads: int, scratch, *arrays) -> None:
        """Run on `arrays` (in the order of the primitive's args: inputs, then output)."""
        lib = self.lib
        for (_, mem), a in zip(self._mems, arrays):
            _check(lib.dnnl_memory_set_data_handle(mem, a.ctypes.data),
                   "dnnl_memory_set_data_handle")
        if self.scratch_bytes:
            _check(lib.dnnl_memory_set_data_handle(self._mems[-1][1], scratch.ctypes.data),
                   "dnnl_memory_set_data_handle")
        lib.omp_set_num_threads(nthreads)
        _check(lib.dnnl_primitive_execute(self.prim, lib.stream, self._n, self._args),
               f"dnnl_primitive_execute ({self.kind})")
        _check(lib.dnnl_stream_wait(lib.stream), "dnnl_stream_wait")

    def close(self) -> None:
        lib = self.lib
        if self.prim:
            lib.dnnl_primitive_destroy(self.prim)
            self.prim = None
        for _, mem in self._mems:
            lib.dnnl_memory_destroy(mem)
        self._mems = []
        if self.pd:
            lib.dnnl_primitive_desc_destroy(self.pd)
            self.pd = None
        for md in self._mds:
            lib.dnnl_memory_desc_destroy(md)
        self._mds = []

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _contiguous32(a):
    return a if a.flags.c_contiguous else numpy.ascontiguousarray(a)


def _written(out, shape: tuple, run):
    """run(y) into `out` where it is a contiguous float32 array, else into a new one that
    is then copied into `out` (a strided view) or returned."""
    direct = out is not None and out.flags.c_contiguous and out.dtype == numpy.float32
    y = out if direct else numpy.empty(shape, dtype=numpy.float32)
    run(y)
    if out is not None and not direct:
        out[...] = y
        return out
    return y


class OnednnBackend(NumpyBackend):
    """NumPy arrays on the CPU with oneDNN v3.2's float32 convolutions.

    float32 convolutions whose shape `use_onednn` accepts run as oneDNN
    primitives (forward, backward data, backward weights) on OpenMP threads,
    as many as BLAS is allowed; float64 ones, and the float32 shapes the rule
    leaves out, run NumpyBackend's im2col + GEMM code (oneDNN has no float64
    convolution on the CPU). Everything else (elementwise work on `xp`,
    workspaces, `spawn` for batch shards) is NumpyBackend's.
    """

    name = "onednn"
    # float64=True: computed (by NumpyBackend's code), in float64. Deterministic: per
    # thread count, oneDNN's work split is fixed when a primitive is made (module docstring)
    capabilities = Capabilities(device="cpu", writes_out=True, shards=True,
                                deterministic=True, float64=True,
                                weight_gradient_layout="channel-major")

    def __init__(self) -> None:
        super().__init__()
        self.lib = library()
        self._prims: dict = {}
        self._scratch = numpy.empty(0, dtype=numpy.uint8)

    def _prim(self, kind, x_shape, w_shape, y_shape, stride, pad, dilation, nthreads):
        key = (kind, tuple(x_shape), tuple(w_shape), tuple(stride), tuple(pad),
               tuple(dilation), "float32", nthreads)
        prim = self._prims.get(key)
        if prim is None:
            # oneDNN sizes its work split by the calling thread's OpenMP count when made
            self.lib.omp_set_num_threads(nthreads)
            prim = self._prims[key] = _Conv(self.lib, kind, x_shape, w_shape, y_shape,
                                            tuple(stride), tuple(pad), tuple(dilation))
            if prim.scratch_bytes > self._scratch.size:
                raw = numpy.empty(prim.scratch_bytes + 64, dtype=numpy.uint8)
                skip = -raw.ctypes.data % 64  # a 64-byte aligned start, as oneDNN's own
                self._scratch = raw[skip:skip + prim.scratch_bytes]
        return prim

    def _ours(self, op, nthreads, x_shape, w_shape, stride, pad, dilation, *operands) -> bool:
        """float32 operands, and the rule picks oneDNN for this geometry."""
        return all(a.dtype == numpy.float32 for a in operands) and \
            use_onednn(op, x_shape, w_shape, stride, pad, dilation, nthreads)

    def conv2d(self, x, w, stride: Pair, pad: Pair, dilation: Pair, out=None):
        nthreads = threads()
        if not self._ours("fwd", nthreads, x.shape, w.shape, stride, pad, dilation, x, w):
            return super().conv2d(x, w, stride, pad, dilation, out=out)
        ho, wo = check_conv2d_shapes(x.shape, w.shape, stride, pad, dilation)
        y_shape = (x.shape[0], w.shape[0], ho, wo)
        prim = self._prim("fwd", x.shape, w.shape, y_shape, stride, pad, dilation, nthreads)
        return _written(out, y_shape, lambda y: prim(nthreads, self._scratch, _contiguous32(x),
                                                     _contiguous32(w), y))

    def conv2d_grad_input(self, gy, w, x_shape: tuple, stride: Pair, pad: Pair, dilation: Pair,
                          out=None):
        x_shape = tuple(x_shape)
        nthreads = threads()
        if not self._ours("bwd_data", nthreads, x_shape, w.shape, stride, pad, dilation, gy, w):
            return super().conv2d_grad_input(gy, w, x_shape, stride, pad, dilation, out=out)
        out_hw = check_conv2d_shapes(x_shape, w.shape, stride, pad, dilation)
        _check_gy(gy, x_shape, w.shape, out_hw)
        prim = self._prim("bwd_data", x_shape, w.shape, gy.shape, stride, pad, dilation,
                          nthreads)
        return _written(out, x_shape, lambda dx: prim(nthreads, self._scratch,
                                                      _contiguous32(gy), _contiguous32(w), dx))

    def conv2d_grad_weight(self, x, gy, w_shape: tuple, stride: Pair, pad: Pair,
                           dilation: Pair):
        w_shape = tuple(w_shape)
        nthreads = threads()
        if not self._ours("bwd_weights", nthreads, x.shape, w_shape, stride, pad, dilation,
                          x, gy):
            return super().conv2d_grad_weight(x, gy, w_shape, stride, pad, dilation)
        out_hw = check_conv2d_shapes(x.shape, w_shape, stride, pad, dilation)
        _check_gy(gy, x.shape, w_shape, out_hw)
        prim = self._prim("bwd_weights", x.shape, w_shape, gy.shape, stride, pad, dilation,
                          nthreads)
        dw = numpy.empty(w_shape, dtype=numpy.float32)
        prim(nthreads, self._scratch, _contiguous32(x), _contiguous32(gy), dw)
        return dw

    def implementations(self) -> dict:
        """oneDNN's name for the implementation of every primitive made so far, by key."""
        return {key: prim.impl for key, prim in self._prims.items()}


class OnednnEveryShapeBackend(OnednnBackend):
    """OnednnBackend with the per-shape rule off: oneDNN for every float32 convolution.

    Not registered: bench/onednn_conv.py times oneDNN with it and tests/test_onednn.py
    checks oneDNN's results with it, on shapes the rule would send to NumPy.
    """

    name = "onednn_every_shape"

    def _ours(self, op, nthreads, x_shape, w_shape, stride, pad, dilation, *operands) -> bool:
        return all(a.dtype == numpy.float32 for a in operands)

"""The generated time loops allocate nothing when they run.

tests/test_codegen.py (b3) reads the generated source; this runs it. For every
example (shrunk, float64) and std-cell model (helpers.STD_MODELS) a training
step (`loss_and_grad`, also with bptt=2), the validation loss and a forward
pass run at two sequence lengths T, each after a warm-up call at that length
(the backend keeps arenas and work buffers between calls), while every NumPy
data allocation is counted. The count may
not depend on T: a step of a time loop allocates nothing.

How allocations are counted. tracemalloc (filtered to
np.lib.tracemalloc_domain) sees the blocks that are alive when a snapshot is
taken, not how many were made: a temporary made and freed inside a step never
shows. So the counter wraps NumPy's data allocator instead (NEP 49: a
PyDataMem_Handler installed with PyDataMem_SetHandler, reached through the
C-API table whose slot numbers numpy/__multiarray_api.h gives): every malloc,
calloc and realloc of array data is counted, with the line of the generated
module running at the time. Frees go straight to NumPy's own free, so an
array outliving the count never calls back into Python. The handler is
per-context (a contextvar): shard threads would not be counted, so the
checks run on one BLAS thread, where loss_and_grad runs in this thread.

Allocations of at most SCALAR_BYTES are not counted: they are the 0-d arrays
NumPy makes of the Python scalars given to ufuncs, 8 bytes each call
(rt.sigmoid's `xp.add(out, 1.0, out=out)`, `xp.subtract(c, z, ...)` with the
constant c = 1.0). They do grow with T (a strict xfail below shows it), but
are not buffers.

Two per-step allocations this test found are gone: truncated BPTT's cut
made `xp.zeros_like` of each carried state gradient at every window (it now
hands on zeros made once), and rt.sigmoid_grad / rt.tanh_grad worked in a
new contiguous temporary whenever their out= was strided, as in the ConvGRU
and ConvLSTMFused backward loops (they now reuse a per-thread scratch
array, runtime/kernels.py `_scratch`).
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import convc.api as api
from convc.runtime import kernels as rt
from convc.runtime.gradcheck import random_problem
from helpers import one_blas_thread  # noqa: F401  (an autouse fixture)
from helpers import EXAMPLES, STD_MODELS, load_example, load_text, shrink

LENGTHS = (4, 8)
SCALAR_BYTES = 16

# ---------------------------------------------------------------- the counter

_core = getattr(np, "_core", None) or np.core
_HEADER = Path(np.get_include()) / "numpy" / "__multiarray_api.h"


def _api_slot(name: str) -> int:
    m = re.search(rf"#define {name} \\\s*\([^\n]*\\\s*PyArray_API\[(\d+)\]",
                  _HEADER.read_text(encoding="utf-8"))
    if m is None:
        raise RuntimeError(f"{name} not in {_HEADER}")
    return int(m.group(1))


_MALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_CALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t)
_REALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


class _Allocator(ctypes.Structure):
    _fields_ = [("ctx", ctypes.c_void_p), ("malloc", _MALLOC), ("calloc", _CALLOC),
                ("realloc", _REALLOC), ("free", _FREE)]


class _Handler(ctypes.Structure):  # PyDataMem_Handler, numpy/ndarraytypes.h
    _fields_ = [("name", ctypes.c_char * 127), ("version", ctypes.c_uint8),
                ("allocator", _Allocator)]


class AllocationCounter:
    """Counts NumPy data allocations inside `with counter.counting(code_file) as log:`.

    `log` gets one entry per allocation of more than SCALAR_BYTES: the line of
    `code_file` (a code object's co_filename) running then, or None when no
    frame of that file is on the stack.
    """

    def __init__(self):
        api = ctypes.pythonapi
        api.PyCapsule_GetPointer.restype = ctypes.c_void_p
        api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        api.PyCapsule_New.restype = ctypes.py_object
        api.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        table = ctypes.cast(api.PyCapsule_GetPointer(_core._multiarray_umath._ARRAY_API, None),
                            ctypes.POINTER(ctypes.c_void_p))
        self._set = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.py_object)(
            table[_api_slot("PyDataMem_SetHandler")])
        get = ctypes.PYFUNCTYPE(ctypes.py_object)(table[_api_slot("PyDataMem_GetHandler")])
        self._default = get()
        old = _Handler.from_address(api.PyCapsule_GetPointer(self._default, b"mem_handler"))
        inner = old.allocator
        self._log: list | None = None
        self._file: str | None = None

        def record(size):
            if self._log is not None and size > SCALAR_BYTES:
                self._log.append(self._where())

        def malloc(ctx, size):
            record(size)
            return inner.malloc(inner.ctx, size)

        def calloc(ctx, n, size):
            record(n * size)
            return inner.calloc(inner.ctx, n, size)

        def realloc(ctx, ptr, size):
            record(size)
            return inner.realloc(inner.ctx, ptr, size)

        # kept alive with the counter: arrays allocated while counting call these later
        self._funcs = (_MALLOC(malloc), _CALLOC(calloc), _REALLOC(realloc))
        self._handler = _Handler(b"convc_test_counter", old.version,
                                 _Allocator(inner.ctx, *self._funcs, inner.free))
        self._name = ctypes.create_string_buffer(b"mem_handler")
        self._capsule = api.PyCapsule_New(ctypes.addressof(self._handler),
                                          ctypes.addressof(self._name), None)

    def _where(self):
        frame = sys._getframe(3)  # past _where, record and malloc: what called NumPy
        while frame is not None:
            if frame.f_code.co_filename == self._file:
                return frame.f_lineno
            frame = frame.f_back
        return None

    @contextlib.contextmanager
    def counting(self, code_file: str):
        self._log, self._file = [], code_file
        previous = self._set(self._capsule)
        try:
            assert _core.multiarray.get_handler_name() == "convc_test_counter"
            yield self._log
        finally:
            self._set(previous)
            self._log = None


_COUNTER: list = []


def counter() -> AllocationCounter:
    if not _HEADER.exists():
        pytest.skip(f"NumPy's C headers ({_HEADER}) are not installed: no allocator to wrap")
    if not _COUNTER:
        _COUNTER.append(AllocationCounter())  # one for the session, never freed
    return _COUNTER[0]


# ---------------------------------------------------------------- per-step growth

def growth(run, code_file: str, lengths=LENGTHS) -> dict:
    """Allocations of `run(T)` at each length, after a warm-up call at that length.

    Returns {line: (count at each length)} for the lines (of code_file; None: no
    line of it on the stack) whose count is not the same at every length.
    """
    counts = []
    for T in lengths:
        run(T)  # warm-up: arenas and work buffers for this length
        with counter().counting(code_file) as log:
            run(T)
        counts.append(collections.Counter(log))
    lines = set().union(*counts)
    return {line: tuple(c[line] for c in counts) for line in sorted(lines, key=str)
            if len({c[line] for c in counts}) > 1}


def describe(grown: dict, source_lines: list[str], lengths=LENGTHS) -> str:
    out = []
    for line, ns in grown.items():
        text = source_lines[line - 1].strip() if isinstance(line, int) else "(no generated line)"
        per = ", ".join(f"T={T}: {n}" for T, n in zip(lengths, ns))
        out.append(f"line {line}: {text}  [{per}]")
    return "\n".join(out)


# ---------------------------------------------------------------- the examples

MODELS = sorted([p.stem for p in EXAMPLES] + list(STD_MODELS))
_MODULES: dict = {}


def small_module(model: str):
    """An example shrunk for float64 checks, or a (small already) std-cell model."""
    if model not in _MODULES:
        if model in STD_MODELS:
            _MODULES[model] = load_text(STD_MODELS[model], name=f"{model}.cell")
        else:
            _MODULES[model] = load_example(next(p for p in EXAMPLES if p.stem == model))
    return _MODULES[model]


def _call(mod, call: str, T: int):
    params, inputs, targets = random_problem(mod, batch=2, frames=T)
    if call == "forward":
        return lambda: mod.forward(params, inputs, steps=T)
    if call == "loss":
        return lambda: mod.loss(params, inputs, targets)
    if call == "loss_and_grad":
        return lambda: mod.loss_and_grad(params, inputs, targets)
    if call == "loss_and_grad_bptt2":
        return lambda: mod.loss_and_grad(params, inputs, targets, bptt=2)
    raise ValueError(call)


CALLS = ("forward", "loss", "loss_and_grad", "loss_and_grad_bptt2")

def _cases():
    for model in MODELS:
        for call in CALLS:
            yield pytest.param(model, call, id=f"{model}-{call}")


def _one_thread():
    """loss_and_grad runs in this thread (the counter's handler is this context's)."""
    assert rt.shard_count(None, 2) <= 1, "more than one BLAS thread: shards would not be counted"


@pytest.mark.parametrize("model, call", list(_cases()))
def test_time_loops_allocate_nothing_per_step(model, call):
    mod = small_module(model)
    _one_thread()
    runs = {}

    def run(T):
        if T not in runs:
            runs[T] = _call(mod, call, T)
        runs[T]()

    grown = growth(run, mod.forward.__code__.co_filename)
    assert grown == {}, (f"{model} {call}: allocations grow with T:\n"
                         + describe(grown, mod.source.splitlines()))


_FUSED: dict = {}


@pytest.mark.parametrize("model", MODELS)
def test_fused_time_loops_allocate_nothing_per_step(model):
    """The same with fused step kernels (fuse=True): a kernel writes into the places
    the memory plan gave its outputs."""
    from convc.runtime import fused

    ok, why = fused.available()
    if not ok:
        pytest.skip(f"fused kernels cannot be built here: {why}")
    if model not in _FUSED:
        if model in STD_MODELS:
            _FUSED[model] = load_text(STD_MODELS[model], name=f"{model}.cell", fuse=True)
        else:
            path = next(p for p in EXAMPLES if p.stem == model)
            _FUSED[model] = api.load(path, text=shrink(path.read_text(encoding="utf-8")),
                                     fuse=True)
    mod = _FUSED[model]
    _one_thread()
    runs = {}

    def run(T):
        if T not in runs:
            runs[T] = _call(mod, "loss_and_grad", T)
        runs[T]()

    grown = growth(run, mod.forward.__code__.co_filename)
    assert grown == {}, (f"{model} fused loss_and_grad: allocations grow with T:\n"
                         + describe(grown, mod.source.splitlines()))


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="NumPy makes a 0-d array of each Python scalar given to a ufunc "
                   "(rt.sigmoid's xp.add(out, 1.0, out=out)): 8 bytes a call, per step")
def test_no_scalar_allocations_per_step_either(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "SCALAR_BYTES", 0)
    mod = small_module("seed")
    runs = {T: _call(mod, "forward", T) for T in LENGTHS}
    assert growth(lambda T: runs[T](), mod.forward.__code__.co_filename) == {}


# ---------------------------------------------------------------- the counter catches them

def test_counter_counts_numpy_data_allocations():
    with counter().counting(__file__) as log:
        a = np.empty(1000)
        b = a + 1.0
        c = np.zeros((10, 10))
        np.add(a, b, out=a)  # writes into a: no allocation
        v = a[3:].reshape(-1)  # a view: no allocation
    assert len(log) == 3
    assert _core.multiarray.get_handler_name() != "convc_test_counter"
    del a, b, c, v  # freed through NumPy's own free after the handler is gone


def _planted_loop(xs, out):
    for t in range(len(xs)):
        y = xs[t] * 2.0  # a new array each step
        np.add(y, 1.0, out=out[t])


def _clean_loop(xs, out):
    for t in range(len(xs)):
        np.multiply(xs[t], 2.0, out=out[t])
        np.add(out[t], 1.0, out=out[t])


def test_growth_sees_a_planted_allocation_in_a_loop():
    data = {T: (np.ones((T, 64)), np.empty((T, 64))) for T in LENGTHS}
    grown = growth(lambda T: _planted_loop(*data[T]), __file__)
    assert len(grown) == 1
    (line, counts), = grown.items()
    assert "xs[t] * 2.0" in Path(__file__).read_text().splitlines()[line - 1]
    assert counts == LENGTHS  # one array a step
    assert growth(lambda T: _clean_loop(*data[T]), __file__) == {}


def test_growth_sees_an_allocation_planted_in_a_generated_loop(tmp_path):
    """seed's generated module with a copy added to every forward time loop."""
    mod = small_module("seed")
    loop = "    for t in range(t0, T_x):\n"
    assert mod.source.count(loop) == 3  # forward, loss, loss_and_grad_shard
    planted = mod.source.replace(loop, loop + "        planted = h_lstm_buf[t].copy()\n")
    path = tmp_path / "seed_planted.py"
    path.write_text(planted, encoding="utf-8")
    bad = api.import_generated(path)
    _one_thread()
    for call in ("forward", "loss_and_grad"):
        runs = {T: _call(bad, call, T) for T in LENGTHS}
        grown = growth(lambda T: runs[T](), bad.forward.__code__.co_filename)
        lines = planted.splitlines()
        assert grown and all("planted = h_lstm_buf[t].copy()" in lines[n - 1] for n in grown), \
            describe(grown, lines)
        assert sum(ns[1] - ns[0] for ns in grown.values()) == LENGTHS[1] - LENGTHS[0]

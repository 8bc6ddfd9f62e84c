"""Array kernels that generated modules call as `rt.<name>`.

Every function works on the array module of its arguments (NumPy or CuPy),
on per-step arrays (N, C, H, W) and on time-batched arrays (T, N, C, H, W)
alike. Convolutions go through the backend `B` (runtime/backend.py), which
owns the GEMMs.

The `*_ref` functions are slow, obviously-correct versions used as the op
table's reference evaluations and in tests; generated code never calls them.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np


from .backend import Capabilities
from .fused import FusedKernels  # noqa: F401  (a generated module's FK)
from .calls import check_call  # noqa: F401  (the first call of every generated function)


def array_module(a):
    """numpy for NumPy arrays (without importing CuPy), else CuPy's module."""
    if isinstance(a, np.ndarray) or np.isscalar(a):
        return np
    import cupy  # only reached with a CuPy array in hand
    return cupy.get_array_module(a)


# ---------------------------------------------------------------- activations
# Generated code calls these with `out=`, a buffer planned once per shape, so
# a training step allocates nothing inside its time loops. Each is a few
# in-place ufunc passes over `out`; without `out` they allocate it.

def _errstate(xp):
    """numpy's floating-point warning switch (CuPy does not warn)."""
    return np.errstate(over="ignore") if xp is np else contextlib.nullcontext()


def _out(xp, x, out):
    return xp.empty(xp.shape(x), dtype=xp.result_type(x, np.float32)) if out is None else out


def sigmoid(x, out=None):
    """1/(1+exp(-x)): four passes over `out` (exp overflows to inf for x < -88, giving 0)."""
    xp = array_module(x)
    out = _out(xp, x, out)
    xp.negative(x, out=out)
    with _errstate(xp):
        xp.exp(out, out=out)
    xp.add(out, 1.0, out=out)
    xp.reciprocal(out, out=out)
    return out


def tanh(x, out=None):
    """tanh(x) as 2/(1+exp(-2x)) - 1: one exp and four cheap passes.

    NumPy's float32 tanh took 1.4x as long on the benchmark machine (its exp
    is the faster transcendental). Absolute error: a few ulp of 1. Small
    arrays take NumPy's tanh: one call costs less than five.
    """
    xp = array_module(x)
    if xp.size(x) < 16384:
        return xp.tanh(x, out=out)
    out = _out(xp, x, out)
    xp.multiply(x, -2.0, out=out)
    with _errstate(xp):
        xp.exp(out, out=out)
    xp.add(out, 1.0, out=out)
    xp.divide(2.0, out, out=out)
    return xp.subtract(out, 1.0, out=out)


def hard_sigmoid(x, out=None):
    xp = array_module(x)
    if out is None:
        return xp.clip(0.2 * x + 0.5, 0.0, 1.0)
    xp.multiply(x, 0.2, out=out)
    xp.add(out, 0.5, out=out)
    return xp.clip(out, 0.0, 1.0, out=out)


def _strided(out) -> bool:
    """Whether `out` is a strided view (a slice of a channel-major cotangent): passes that
    read and write it cost twice those over a contiguous array, so the kernels below then
    work in a contiguous scratch array (`_scratch`) and write `out` only in their last
    pass."""
    return not out.flags.c_contiguous


_SCRATCH = threading.local()


def _scratch(xp, shape, dtype):
    """A contiguous work array of `shape`, the calling thread's own, reused call after
    call: kernels run inside time loops must not allocate at every step. (Its contents
    are whatever the last call left: callers write it before reading it.)"""
    cache = getattr(_SCRATCH, "arrays", None)
    if cache is None:
        cache = _SCRATCH.arrays = {}
    key = (xp.__name__, tuple(shape), str(dtype))
    a = cache.get(key)
    if a is None:
        if len(cache) >= 32:  # a bounded cache: shapes of models compiled long ago go
            cache.clear()
        a = cache[key] = xp.empty(tuple(shape), dtype=dtype)
    return a


def sigmoid_grad(y, g, out=None):
    """g*y*(1-y); `out` must not be `y` or `g`."""
    if out is None:
        return g * y * (1.0 - y)
    xp = array_module(out)
    if _strided(out):
        tmp = xp.subtract(1.0, y, out=_scratch(xp, out.shape, out.dtype))
        xp.multiply(tmp, y, out=tmp)
        return xp.multiply(tmp, g, out=out)
    xp.subtract(1.0, y, out=out)
    xp.multiply(out, y, out=out)
    return xp.multiply(out, g, out=out)


def tanh_grad(y, g, out=None):
    """g*(1-y*y); `out` must not be `y` or `g`."""
    if out is None:
        return g * (1.0 - y * y)
    xp = array_module(out)
    if _strided(out):
        tmp = xp.multiply(y, y, out=_scratch(xp, out.shape, out.dtype))
        xp.subtract(1.0, tmp, out=tmp)
        return xp.multiply(tmp, g, out=out)
    xp.multiply(y, y, out=out)
    xp.subtract(1.0, out, out=out)
    return xp.multiply(out, g, out=out)


def relu_grad(y, g, out=None):
    if out is None:
        return g * (y > 0)
    xp = array_module(out)
    xp.greater(y, 0, out=out)
    return xp.multiply(out, g, out=out)


def hard_sigmoid_grad(x, g, out=None):
    if out is None:
        return g * (0.2 * ((x > -2.5) & (x < 2.5)))
    xp = array_module(out)
    xp.less(xp.abs(x), 2.5, out=out)
    xp.multiply(out, 0.2, out=out)
    return xp.multiply(out, g, out=out)


def addn(*xs, out=None):
    """The sum of several values, into `out` (which may be the first operand)."""
    if out is None:
        total = xs[0] + xs[1]
        for x in xs[2:]:
            total = total + x
        return total
    xp = array_module(out)
    xp.add(xs[0], xs[1], out=out)
    for x in xs[2:]:
        xp.add(out, x, out=out)
    return out


# ---------------------------------------------------------------- channels

def concat(xs, out=None):
    """Concatenate along channels (axis -3) of per-step or time-batched values."""
    if out is None:
        xp = array_module(xs[0])
        return xp.concatenate(xs, axis=-3)
    start = 0
    for x in xs:
        c = x.shape[-3]
        out[..., start:start + c, :, :] = x
        start += c
    return out


def kernel_pad(g, start, total):
    """A zero kernel (O, total, kh, kw) with `g` at input channels [start, start + C)."""
    xp = array_module(g)
    out = xp.zeros((g.shape[0], total) + tuple(g.shape[2:]), dtype=g.dtype)
    out[:, start:start + g.shape[1]] = g
    return out


def pad_channels(g, start, total):
    """A zero array with `g` placed at channels [start, start + C): slice's gradient."""
    xp = array_module(g)
    shape = g.shape[:-3] + (total,) + g.shape[-2:]
    out = xp.zeros(shape, dtype=g.dtype)
    out[..., start:start + g.shape[-3], :, :] = g
    return out


def expand(value, ref, shape=None):
    """`value` as a new array of `ref`'s shape, or of ref's leading (time, batch) axes and
    the per-sample `shape`: a value the same at every step (a scalar, a static [C, 1, 1]
    or [C, H, W]) where a state or a cell's output needs a per-step array (a cell run
    without input, whose zeros fold to constants)."""
    xp = array_module(ref)
    full = ref.shape if shape is None else ref.shape[:-3] + tuple(shape)
    out = xp.zeros(full, dtype=ref.dtype)
    out += value
    return out


def sum_to(x, shape, batched=False):
    """Sum `x` down to `shape`.

    For a parameter (`batched=False`) the leading axes that `shape` lacks
    (batch, and time for time-batched stages) are summed away; for a
    per-sample value (`batched=True`) they are kept. Then dimensions that are
    1 in `shape` but not in `x` are summed with keepdims (undoing broadcasting).
    """
    shape = tuple(shape)
    if not batched and x.ndim > len(shape):
        x = x.sum(axis=tuple(range(x.ndim - len(shape))))
    off = x.ndim - len(shape)
    axes = tuple(off + i for i, d in enumerate(shape) if d == 1 and x.shape[off + i] != 1)
    if axes:
        x = x.sum(axis=axes, keepdims=True)
    return x


# ---------------------------------------------------------------- convolution

def _flat(x, rank=4):
    """(T, N, C, H, W) -> (T*N, C, H, W); per-step arrays pass through."""
    if x.ndim == rank:
        return x, None
    return x.reshape((-1,) + x.shape[-3:]), x.shape[:-3]


def _flat_view(out):
    """`out` as (T*N, C, H, W) without copying (a copy would lose what is written into it)."""
    if out.ndim == 4:
        return out
    view = out.view()
    view.shape = (-1,) + out.shape[-3:]  # raises if the layout needs a copy
    return view


def capabilities(B):
    """What backend B declared it can do (runtime/backend.py's Capabilities); None means
    the default backend, and an object that declares nothing gets the safe defaults."""
    if B is None:
        from convc.runtime.model import default_backend

        B = default_backend()
    caps = getattr(B, "capabilities", None)
    return caps if isinstance(caps, Capabilities) else _PLAIN


_PLAIN = Capabilities()  # what a backend that declares nothing is taken to do


def _accepts_out(B) -> bool:
    return capabilities(B).writes_out


def conv2d(B, x, w, stride, pad, dilation, out=None):
    """y = conv(x, w), per step (N, C, H, W) or over a whole sequence (T, N, C, H, W).

    With `out`, the result is written there (the backend writes it directly
    when it can, else it is copied in).
    """
    x2, lead = _flat(x)
    if out is not None and _accepts_out(B):
        B.conv2d(x2, w, stride, pad, dilation, out=_flat_view(out))
        return out
    y = B.conv2d(x2, w, stride, pad, dilation)
    y = y if lead is None else y.reshape(lead + y.shape[1:])
    if out is None:
        return y
    out[...] = y
    return out


def conv2d_grad_input(B, g, w, x_shape, stride, pad, dilation, out=None):
    g2, lead = _flat(g)
    full = (g2.shape[0],) + tuple(x_shape)
    if out is not None and _accepts_out(B):
        B.conv2d_grad_input(g2, w, full, stride, pad, dilation, out=_flat_view(out))
        return out
    dx = B.conv2d_grad_input(g2, w, full, stride, pad, dilation)
    dx = dx if lead is None else dx.reshape(lead + dx.shape[1:])
    if out is None:
        return dx
    out[...] = dx
    return out


def conv2d_grad_weight(B, x, g, w_shape, stride, pad, dilation):
    x2, _ = _flat(x)
    g2, _ = _flat(g)
    return B.conv2d_grad_weight(x2, g2, tuple(w_shape), stride, pad, dilation)


# ---------------------------------------------------------------- losses
# Inputs are (T, N, C, H, W) (or (N, C, H, W) in reference evaluation).
# steps="all" averages over every element; steps="last" over the last step only.

def _select(p, y, steps):
    if steps == "last" and p.ndim == 5:
        return p[-1:], y[-1:]
    return p, y


def _scatter(full_like, part, steps):
    if steps == "last" and full_like.ndim == 5:
        xp = array_module(part)
        out = xp.zeros_like(full_like)
        out[-1:] = part
        return out
    return part


def bce(p, y, steps="all"):
    xp = array_module(p)
    p, y = _select(p, y, steps)
    eps = 1e-12
    return -xp.mean(y * xp.log(xp.maximum(p, eps)) + (1 - y) * xp.log(xp.maximum(1 - p, eps)))


def bce_grad(p, y, steps="all"):
    xp = array_module(p)
    ps, ys = _select(p, y, steps)
    eps = 1e-12
    g = (ps - ys) / xp.maximum(ps * (1 - ps), eps) / ps.size
    return _scatter(p, g, steps)


def bce_logits(a, y, steps="all"):
    """Mean of max(a,0) - a*y + log(1+exp(-|a|)): BCE of sigmoid(a), without overflow."""
    xp = array_module(a)
    a, y = _select(a, y, steps)
    # log(1 + e) with e = exp(-|a|) in (0, 1]: NumPy's float32 log1p is ~10x slower than
    # log, and where they differ (e < 1e-8) both terms are below the mean's rounding
    return xp.mean(xp.maximum(a, 0) - a * y + xp.log(1.0 + xp.exp(-xp.abs(a))))


def bce_logits_grad(a, y, steps="all"):
    as_, ys = _select(a, y, steps)
    g = (sigmoid(as_) - ys) / as_.size
    return _scatter(a, g, steps)


def mse(p, y, steps="all"):
    xp = array_module(p)
    p, y = _select(p, y, steps)
    d = p - y
    return xp.mean(d * d)


def mse_grad(p, y, steps="all"):
    ps, ys = _select(p, y, steps)
    return _scatter(p, (2.0 / ps.size) * (ps - ys), steps)


def _log_softmax(a):
    xp = array_module(a)
    m = a.max(axis=-3, keepdims=True)
    z = a - m
    return z - xp.log(xp.exp(z).sum(axis=-3, keepdims=True))


def xent_logits(a, y, steps="all"):
    """-sum_c y_c log softmax(a)_c, averaged over every pixel (not channel) of every step."""
    a, y = _select(a, y, steps)
    per_pixel = -(y * _log_softmax(a)).sum(axis=-3)
    return per_pixel.mean()


def xent_logits_grad(a, y, steps="all"):
    xp = array_module(a)
    as_, ys = _select(a, y, steps)
    soft = xp.exp(_log_softmax(as_))
    npix = as_.size // as_.shape[-3]
    g = (soft * ys.sum(axis=-3, keepdims=True) - ys) / npix
    return _scatter(a, g, steps)


# ---------------------------------------------------------------- layout and states

def time_major(a, dtype, xp):
    """User arrays are (N, T, C, H, W); loops want (T, N, C, H, W), contiguous per step."""
    a = xp.asarray(a, dtype=dtype)
    if a.ndim != 5:
        from convc.errors import DataError
        raise DataError(f"expected a batch of sequences (N, T, C, H, W), got shape {a.shape}")
    return xp.ascontiguousarray(a.transpose(1, 0, 2, 3, 4))


def batch_major(a):
    """(T, N, ...) -> (N, T, ...), the layout users see."""
    return a.swapaxes(0, 1)


def check_same_length(a, b, name_a, name_b):
    """Kept for modules generated before check_call, which checks the lengths now."""
    if a.shape[0] != b.shape[0]:
        from convc.errors import DataError
        raise DataError(f"{name_a} has {a.shape[0]} steps but {name_b} has {b.shape[0]}; "
                        "they share a time axis in this model")


def initial_state(state, name, default):
    """The given starting state (stateful runs) or the model's own initial value."""
    if state is not None and name in state:
        return state[name]
    return default


# ---------------------------------------------------------------- buffers and checks

_POISON = False


def set_poison(on: bool) -> None:
    """Poison mode: every buffer starts as NaN, so reading it before writing shows."""
    global _POISON
    _POISON = bool(on)


def poison_enabled() -> bool:
    return _POISON


def arena(backend, function: str, size: int, dtype):
    """The memory of a generated function's planned (T, N, ...) buffers, `size` elements.

    The backend keeps it between calls (NumPy: in its workspace), so a training
    step neither allocates nor frees its big buffers: the memory plan places
    each in a range of the arena, sharing memory between buffers whose lives do
    not overlap. Arenas hold only what generated code uses inside one call,
    never what it returns.
    """
    workspace = getattr(backend, "workspace", None)
    xp = backend.xp
    if workspace is not None and hasattr(workspace, "slot"):
        return workspace.slot(xp, ("arena", function), (size,), dtype)
    return xp.empty((size,), dtype=dtype)


def empty(xp, shape, dtype, keep=None, at=None):
    """A buffer every element of which the generated code writes before reading.

    at=(arena, offset): the buffer is that range of an arena (see `arena`).
    keep=(backend, function, name): a small buffer of its own (a loop's work
    buffer) that the backend keeps between calls.
    """
    if at is not None:
        size = 1
        for d in shape:
            size *= int(d)
        out = at[0][at[1]:at[1] + size].reshape(shape)
        if _POISON:
            out.fill(xp.nan)
        return out
    if keep is not None:
        workspace = getattr(keep[0], "workspace", None)
        if workspace is not None and hasattr(workspace, "slot"):
            out = workspace.slot(xp, keep[1:], shape, dtype)
            if _POISON:
                out.fill(xp.nan)
            return out
    if _POISON:
        return xp.full(shape, xp.nan, dtype=dtype)
    return xp.empty(shape, dtype=dtype)


def check_finite(value, node, where, t, direction):
    """Raise NonFiniteError naming the node, its .cell line, step and pass (--debug-nans)."""
    xp = array_module(value)
    ok = bool(xp.isfinite(value).all()) if hasattr(value, "shape") else \
        bool(np.isfinite(value))
    if not ok:
        from convc.errors import NonFiniteError
        step = f" at time step {t}" if t is not None else ""
        raise NonFiniteError(f"{where}: non-finite value in {node}{step} during the "
                             f"{direction} pass", node=node, where=where, step=t,
                             direction=direction)


# ---------------------------------------------------------------- batch shards on the CPU
# NumPy runs each elementwise op and each im2col copy on one core; only the GEMMs use
# the BLAS threads. With T threads allowed, cutting the batch into T shards and running
# each shard's whole training step in its own thread (BLAS single-threaded meanwhile)
# puts every op on every core: the samples of a batch are independent until the
# gradients are summed. NumPy releases the GIL inside ufuncs, copies and matmul.

_SHARDS: dict = {"blas": None, "pool": None, "workers": 0, "backends": {}}


def _blas():
    """threadpoolctl's controller of the BLAS libraries (None without threadpoolctl)."""
    if _SHARDS["blas"] is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _SHARDS["blas"] = False
        else:
            _SHARDS["blas"] = ThreadpoolController().select(user_api="blas")
    return _SHARDS["blas"] or None


# Convolution FLOPs of one step of the whole batch below which a step is too small to
# share: the threads of a shard, or of a GEMM, cost more to wake than they save. (A seed
# ConvLSTM step, 32x72 @ 72x256, ran 1.5x slower on two OpenBLAS threads than on one.)
SMALL_STEP_FLOPS = 40e6


def shard_count(backend, n: int, work: float = float("inf")) -> int:
    """How many shards to run a batch of n in: the BLAS threads allowed now, on a
    backend whose capabilities allow shards (NumPy's; None is the default backend).

    work: convolution FLOPs of one step of one sample (the generated code knows them).
    0 means: too small even for the BLAS threads, run everything on one.
    """
    caps = capabilities(backend)
    if not caps.shards or caps.device != "cpu":
        return 1
    blas = _blas()
    if blas is None or not blas.lib_controllers:
        return 1
    threads = min(lib.num_threads or 1 for lib in blas.lib_controllers)
    if threads < 2:
        return 1
    if n * work < SMALL_STEP_FLOPS:
        return 0
    return max(1, min(threads, n))


class Crew:
    """The threads of one sharded step, sharing the pieces of their weight gradients.

    The shards of a batch do the same work, but on a busy machine one thread
    runs ahead of the other (by 54 ms on average over 18 shi2015 steps, up to
    120), and the step waits for the slowest. A weight gradient (batched
    between the backward loops of two layers, and last) is cut into
    independent pieces (`share`). Its owner takes them from the front; a
    thread that has finished its own pieces of a weight gradient, or its whole
    shard (`help`), takes another shard's open pieces from the back, into its
    own work arrays. The thread ahead so gives time to the one behind at every
    weight gradient, not only at the end: the time a thread waited for the
    other fell from 54 ms to 23 ms a step when only finished threads helped,
    and to 2 ms with this. Every piece writes its own part of the result with
    the same operands whoever runs it, so the result is the same to the bit.
    """

    def __init__(self, threads: int):
        import threading

        self._cond = threading.Condition()
        self._open: list = []  # tasks with pieces nobody has taken yet
        self._busy = threads  # threads still running their own shard

    def share(self, pieces: list, ws) -> None:
        """Run pieces(ws), each a callable taking a workspace; idle threads may take some."""
        import collections

        task = {"todo": collections.deque(pieces), "pending": len(pieces), "error": None}
        with self._cond:
            self._open.append(task)
            self._cond.notify_all()
        while True:
            with self._cond:
                if task["todo"]:
                    of, piece = task, task["todo"].popleft()
                else:
                    # this thread is ahead: the pieces another shard has open now go first
                    if task in self._open:
                        self._open.remove(task)
                    of, piece = self._take()
                    if of is None:
                        break
            self._run(of, piece, ws)
        with self._cond:
            while task["pending"]:
                self._cond.wait()
        if task["error"] is not None:
            raise task["error"]

    def _take(self):
        """(task, piece) from the back of an open task, or (None, None); under the lock."""
        task = next((t for t in self._open if t["todo"]), None)
        return (None, None) if task is None else (task, task["todo"].pop())

    def _run(self, task: dict, piece, ws) -> None:
        try:
            piece(ws)
        except BaseException as e:  # the owner raises it
            task["error"] = task["error"] or e
        finally:
            with self._cond:
                task["pending"] -= 1
                self._cond.notify_all()

    def help(self, ws, leave: bool = False) -> None:
        """This thread's shard is done: run others' pieces until every shard is done
        (or, with leave=True, just stop counting as busy)."""
        with self._cond:
            self._busy -= 1
            self._cond.notify_all()
        while not leave:
            with self._cond:
                task, piece = self._take()
                while task is None:
                    if self._busy == 0:
                        return
                    self._cond.wait()
                    task, piece = self._take()
            self._run(task, piece, ws)


def _shard(crew: Crew, fn, backend, *args, **kwargs):
    """fn on one shard with `backend` in the crew, then help the other shards finish."""
    backend.crew = crew
    try:
        result = fn(*args, backend=backend, **kwargs)
    except BaseException:
        crew.help(None, leave=True)  # no waiting for the others: the step has failed
        raise
    finally:
        backend.crew = None
    crew.help(backend.workspace)
    return result


def shard_bounds(n: int, k: int) -> list[tuple[int, int]]:
    """The rows [a, b) of each of k shards of a batch of n, in order (as even as can be)."""
    return [(i * n // k, (i + 1) * n // k) for i in range(k)]


def shard_weights(bounds: list[tuple[int, int]], n: int) -> list[float]:
    """Each shard's share of the batch: the weight of its (mean) loss and gradients."""
    return [(b - a) / n for a, b in bounds]


def combine_losses(weights, losses) -> float:
    """The batch's loss from its shards' losses: the weighted sum, in shard order."""
    return sum(w * float(v) for w, v in zip(weights, losses))


def weigh(g, w: float):
    """g *= w in place (a shard's gradient scaled by its share), returned."""
    g *= w
    return g


def _split(tree, bounds):
    if tree is None:
        return [None] * len(bounds)
    return [{k: v[a:b] for k, v in tree.items()} for a, b in bounds]


def in_shards(fn, params, inputs, targets, state=None, bptt=None, backend=None,
              work: float = float("inf")):
    """fn(params, inputs, targets, ...) over batch shards in parallel threads, combined.

    fn returns (loss, grads, finals) for the batch it is given. Every loss is a
    mean over the batch (and steps and pixels), so the whole batch's loss and
    gradients are the shards' weighted by their share of the batch; final
    states are the shards' stacked. One shard: fn itself, unchanged (on one
    BLAS thread when the steps are too small to share).
    """
    n = len(next(iter(inputs.values())))
    k = shard_count(backend, n, work)
    if k == 0:
        with _blas().limit(limits=1):
            return fn(params, inputs, targets, state=state, bptt=bptt, backend=backend)
    if k == 1:
        return fn(params, inputs, targets, state=state, bptt=bptt, backend=backend)
    from concurrent.futures import ThreadPoolExecutor

    if backend is None:
        from convc.runtime.model import default_backend

        backend = default_backend()
    bounds = shard_bounds(n, k)
    spawned = _SHARDS["backends"].setdefault(type(backend), [])
    while len(spawned) < k - 1:
        spawned.append(backend.spawn())  # each thread its own work arrays
    if _SHARDS["workers"] != k - 1:
        if _SHARDS["pool"] is not None:
            _SHARDS["pool"].shutdown()
        _SHARDS["pool"] = ThreadPoolExecutor(max_workers=k - 1, thread_name_prefix="convc")
        _SHARDS["workers"] = k - 1
    ins, tgs, sts = _split(inputs, bounds), _split(targets, bounds), _split(state, bounds)
    crew = Crew(k)
    with _blas().limit(limits=1):
        futures = [_SHARDS["pool"].submit(_shard, crew, fn, spawned[i - 1], params,
                                          ins[i], tgs[i], state=sts[i], bptt=bptt)
                   for i in range(1, k)]
        parts = [_shard(crew, fn, backend, params, ins[0], tgs[0], state=sts[0], bptt=bptt)]
        parts += [f.result() for f in futures]
    # The same arithmetic, in the same order, as the shards of `--shards N` and of N
    # MPI ranks (runtime/distributed.py): total = g_0 w_0, then total += g_i w_i.
    weights = shard_weights(bounds, n)
    loss = combine_losses(weights, [p[0] for p in parts])
    grads = {}
    done: dict = {}  # id of a shard-0 array -> the name it was combined under
    for name in parts[0][1]:  # in place: the shards' gradients are theirs to reuse
        total = parts[0][1][name]
        if id(total) in done:  # one array for two names: combined already
            grads[name] = grads[done[id(total)]]
            continue
        done[id(total)] = name
        weigh(total, weights[0])
        for w, p in zip(weights[1:], parts[1:]):
            total += weigh(p[1][name], w)
        grads[name] = total
    xp = array_module(next(iter(parts[0][1].values())))
    finals = {name: xp.concatenate([p[2][name] for p in parts], axis=0) for name in parts[0][2]}
    return loss, grads, finals

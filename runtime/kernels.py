"""Array kernels that generated modules call as `rt.<name>`.

Every function works on the array module of its arguments (NumPy or CuPy),
on per-step arrays (N, C, H, W) and on time-batched arrays (T, N, C, H, W)
alike. Convolutions go through the backend `B` (runtime/backend.py), which
owns the GEMMs.

The `*_ref` functions are slow, obviously-correct versions used as the op
table's reference evaluations and in tests; generated code never calls them.
"""
from __future__ import annotations

import numpy as np


def array_module(a):
    """numpy for NumPy arrays (without importing CuPy), else CuPy's module."""
    if isinstance(a, np.ndarray) or np.isscalar(a):
        return np
    import cupy  # only reached with a CuPy array in hand
    return cupy.get_array_module(a)


# ---------------------------------------------------------------- activations

def sigmoid(x):
    """1/(1+exp(-x)) without overflow warnings: tanh form, exact in float64."""
    xp = array_module(x)
    return 0.5 * (xp.tanh(0.5 * x) + 1.0)


def hard_sigmoid(x):
    xp = array_module(x)
    return xp.clip(0.2 * x + 0.5, 0.0, 1.0)


def sigmoid_grad(y, g):
    return g * y * (1.0 - y)


def tanh_grad(y, g):
    return g * (1.0 - y * y)


def relu_grad(y, g):
    return g * (y > 0)


def hard_sigmoid_grad(x, g):
    return g * (0.2 * ((x > -2.5) & (x < 2.5)))


# ---------------------------------------------------------------- channels

def concat(xs):
    """Concatenate along channels (axis -3) of per-step or time-batched values."""
    xp = array_module(xs[0])
    return xp.concatenate(xs, axis=-3)


def pad_channels(g, start, total):
    """A zero array with `g` placed at channels [start, start + C): slice's gradient."""
    xp = array_module(g)
    shape = g.shape[:-3] + (total,) + g.shape[-2:]
    out = xp.zeros(shape, dtype=g.dtype)
    out[..., start:start + g.shape[-3], :, :] = g
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


def conv2d(B, x, w, stride, pad, dilation):
    x2, lead = _flat(x)
    y = B.conv2d(x2, w, stride, pad, dilation)
    return y if lead is None else y.reshape(lead + y.shape[1:])


def conv2d_grad_input(B, g, w, x_shape, stride, pad, dilation):
    g2, lead = _flat(g)
    dx = B.conv2d_grad_input(g2, w, (g2.shape[0],) + tuple(x_shape), stride, pad, dilation)
    return dx if lead is None else dx.reshape(lead + dx.shape[1:])


def conv2d_grad_weight(B, x, g, w_shape, stride, pad, dilation):
    x2, _ = _flat(x)
    g2, _ = _flat(g)
    return B.conv2d_grad_weight(x2, g2, tuple(w_shape), stride, pad, dilation)


def _pad(x, pad):
    ph, pw = pad
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))


def conv2d_ref(x, w, stride, pad, dilation):
    """Direct definition: out[n,o,i,j] = sum_{c,a,b} xp[n,c,i*s+a*d, j*s+b*d] w[o,c,a,b]."""
    xp_ = _pad(x, pad)
    (sh, sw), (dh, dw) = stride, dilation
    o, c, kh, kw = w.shape
    ho = (xp_.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp_.shape[3] - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((x.shape[0], o, ho, wo), dtype=np.result_type(x, w))
    for a in range(kh):
        for b in range(kw):
            patch = xp_[:, :, a * dh:a * dh + sh * (ho - 1) + 1:sh,
                        b * dw:b * dw + sw * (wo - 1) + 1:sw]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, a, b])
    return out


def conv2d_grad_input_ref(g, w, x_shape, stride, pad, dilation):
    n = g.shape[0]
    c, h, wd = x_shape[-3:]
    (ph, pw), (sh, sw), (dh, dw) = pad, stride, dilation
    dxp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), dtype=np.result_type(g, w))
    o, _, kh, kw = w.shape
    ho, wo = g.shape[2], g.shape[3]
    for a in range(kh):
        for b in range(kw):
            dxp[:, :, a * dh:a * dh + sh * (ho - 1) + 1:sh,
                b * dw:b * dw + sw * (wo - 1) + 1:sw] += np.einsum("nohw,oc->nchw", g,
                                                                    w[:, :, a, b])
    return dxp[:, :, ph:ph + h, pw:pw + wd]


def conv2d_grad_weight_ref(x, g, w_shape, stride, pad, dilation):
    xp_ = _pad(x, pad)
    (sh, sw), (dh, dw) = stride, dilation
    o, c, kh, kw = w_shape
    ho, wo = g.shape[2], g.shape[3]
    dw_ = np.zeros(w_shape, dtype=np.result_type(x, g))
    for a in range(kh):
        for b in range(kw):
            patch = xp_[:, :, a * dh:a * dh + sh * (ho - 1) + 1:sh,
                        b * dw:b * dw + sw * (wo - 1) + 1:sw]
            dw_[:, :, a, b] = np.einsum("nchw,nohw->oc", patch, g)
    return dw_


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
    return xp.mean(xp.maximum(a, 0) - a * y + xp.log1p(xp.exp(-xp.abs(a))))


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


def empty(xp, shape, dtype):
    """A buffer every element of which the generated code writes before reading."""
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

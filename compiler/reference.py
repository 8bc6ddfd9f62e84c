"""Reference evaluations: every primitive as its plain NumPy definition.

The op table (ops.py) points each primitive's `ref` here, and the reference
interpreter (interp.py) evaluates graphs with nothing else. None of this is
the generated code's: no `out=` buffers, no array-module dispatch, no
backend, no fused kernel, nothing from `convc.runtime`. So a test that
compares the generated module with the interpreter compares two
implementations, not one with itself.

Written for clarity first. A convolution stacks what each kernel tap reads
and sums over channels and taps in one `tensordot` (a BLAS product), so a
truncated-BPTT reference of a paper-size model costs a few times the
generated code, not hundreds, and a tiny model's step is not dominated by
one NumPy call per tap.

Shapes: a per-sample value is (..., C, H, W) with any leading (time, batch)
axes; a loss takes (T, N, C, H, W) or, evaluated one step at a time, (N, C, H, W).
"""
from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------- elementwise


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def hard_sigmoid(x):
    return np.clip(0.2 * x + 0.5, 0.0, 1.0)


# ---------------------------------------------------------------- channels and shapes


def pad_channels(g, start, total):
    """Zeros with `total` channels and `g` at channels [start, start + C)."""
    out = np.zeros(g.shape[:-3] + (total,) + g.shape[-2:], dtype=g.dtype)
    out[..., start:start + g.shape[-3], :, :] = g
    return out


def kernel_pad(g, start, total):
    """A zero kernel (O, total, kh, kw) with `g` at input channels [start, start + C)."""
    out = np.zeros((g.shape[0], total) + g.shape[2:], dtype=g.dtype)
    out[:, start:start + g.shape[1]] = g
    return out


def expand(value, ref, shape=None):
    """`value` broadcast to `ref`'s shape, or to ref's leading axes and the per-sample `shape`."""
    full = ref.shape if shape is None else ref.shape[:-3] + tuple(shape)
    return np.broadcast_to(value, full).astype(ref.dtype)


def sum_to(x, shape, batched=False):
    """`x` summed down to `shape`: the leading axes `shape` lacks go unless `batched`
    (a per-sample value keeps its batch axis), then axes where `shape` has 1."""
    shape = tuple(shape)
    if not batched and x.ndim > len(shape):
        x = x.sum(axis=tuple(range(x.ndim - len(shape))))
    off = x.ndim - len(shape)
    axes = tuple(off + i for i, d in enumerate(shape) if d == 1 and x.shape[off + i] != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


# ---------------------------------------------------------------- convolution
# out[n, o, i, j] = sum_{c, a, b} xpad[n, c, i*s + a*d, j*s + b*d] w[o, c, a, b]


def _taps(shape, stride, dilation, out_hw):
    """(a, b, the slices of the padded input that kernel tap (a, b) reads)."""
    (sh, sw), (dh, dw) = stride, dilation
    ho, wo = out_hw
    for a in range(shape[0]):
        for b in range(shape[1]):
            yield a, b, (slice(a * dh, a * dh + sh * (ho - 1) + 1, sh),
                         slice(b * dw, b * dw + sw * (wo - 1) + 1, sw))


def _padded(x, pad):
    """x with `pad` zero rows and columns on each side."""
    (ph, pw) = pad
    out = np.zeros(x.shape[:2] + (x.shape[2] + 2 * ph, x.shape[3] + 2 * pw), dtype=x.dtype)
    out[:, :, ph:ph + x.shape[2], pw:pw + x.shape[3]] = x
    return out


def _patches(xp_, kernel, stride, dilation, out_hw):
    """(N, C, kh*kw, Ho, Wo): for each kernel tap, the input pixels it reads."""
    return np.stack([xp_[:, :, rows, cols]
                     for _, _, (rows, cols) in _taps(kernel, stride, dilation, out_hw)], axis=2)


def conv2d(x, w, stride, pad, dilation):
    xp_ = _padded(x, pad)
    (sh, sw), (dh, dw) = stride, dilation
    o, c, kh, kw = w.shape
    ho = (xp_.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp_.shape[3] - dw * (kw - 1) - 1) // sw + 1
    patches = _patches(xp_, (kh, kw), stride, dilation, (ho, wo))
    # sum over c and the taps: (o, c, k) . (n, c, k, ho, wo) -> (o, n, ho, wo)
    out = np.tensordot(w.reshape(o, c, kh * kw), patches, axes=([1, 2], [1, 2]))
    return out.transpose(1, 0, 2, 3)


def conv2d_grad_input(g, w, x_shape, stride, pad, dilation):
    """The input's cotangent: each tap's weights carry g back to the input pixels it read."""
    n = g.shape[0]
    c, h, wd = x_shape[-3:]
    ph, pw = pad
    o, _, kh, kw = w.shape
    # (o, c, k) . (n, o, ho, wo) over o -> (c, k, n, ho, wo): what each tap sends back
    back = np.tensordot(w.reshape(o, c, kh * kw), g, axes=([0], [1]))
    dxp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), dtype=np.result_type(g, w))
    for k, (_, _, (rows, cols)) in enumerate(_taps((kh, kw), stride, dilation, g.shape[2:])):
        dxp[:, :, rows, cols] += back[:, k].transpose(1, 0, 2, 3)
    return dxp[:, :, ph:ph + h, pw:pw + wd]


def conv2d_grad_weight(x, g, w_shape, stride, pad, dilation):
    """The kernel's cotangent: each tap sums g times the input pixels it read."""
    o, c, kh, kw = w_shape
    patches = _patches(_padded(x, pad), (kh, kw), stride, dilation, g.shape[2:])
    # (n, o, ho, wo) . (n, c, k, ho, wo) over n, ho, wo -> (o, c, k)
    return np.tensordot(g, patches, axes=([0, 2, 3], [0, 3, 4])).reshape(tuple(w_shape))


# ---------------------------------------------------------------- losses
# docs/language.md, "Losses": the mean over every element (per pixel for the
# cross-entropy) of every step, or of the last step only (steps = last).

_FLOOR = 1e-12  # bce: p and 1 - p are held at this or more inside the logarithms


def _steps(p, y, steps):
    if steps == "last" and p.ndim == 5:
        return p[-1:], y[-1:]
    return p, y


def _onto(full, part, steps):
    """A cotangent of the selected steps, as one of `full`'s shape (zeros elsewhere)."""
    if steps == "last" and full.ndim == 5:
        out = np.zeros_like(full)
        out[-1:] = part
        return out
    return part


def bce(p, y, steps="all"):
    p, y = _steps(p, y, steps)
    return -np.mean(y * np.log(np.maximum(p, _FLOOR)) + (1 - y) * np.log(np.maximum(1 - p, _FLOOR)))


def bce_grad(p, y, steps="all"):
    ps, ys = _steps(p, y, steps)
    # d/dp of -(y log p + (1 - y) log(1 - p)) = -y/p + (1 - y)/(1 - p)
    return _onto(p, (-ys / np.maximum(ps, _FLOOR) + (1 - ys) / np.maximum(1 - ps, _FLOOR))
                 / ps.size, steps)


def bce_logits(a, y, steps="all"):
    a, y = _steps(a, y, steps)
    # -(y log s + (1 - y) log(1 - s)), s = sigmoid(a), written without overflow
    return np.mean(np.logaddexp(0.0, a) - a * y)


def bce_logits_grad(a, y, steps="all"):
    as_, ys = _steps(a, y, steps)
    return _onto(a, (sigmoid(as_) - ys) / as_.size, steps)


def mse(p, y, steps="all"):
    p, y = _steps(p, y, steps)
    return np.mean((p - y) ** 2)


def mse_grad(p, y, steps="all"):
    ps, ys = _steps(p, y, steps)
    return _onto(p, 2.0 * (ps - ys) / ps.size, steps)


def _log_softmax(a):
    z = a - a.max(axis=-3, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-3, keepdims=True))


def xent_logits(a, y, steps="all"):
    a, y = _steps(a, y, steps)
    return np.mean(-(y * _log_softmax(a)).sum(axis=-3))


def xent_logits_grad(a, y, steps="all"):
    as_, ys = _steps(a, y, steps)
    pixels = as_.size // as_.shape[-3]
    return _onto(a, (np.exp(_log_softmax(as_)) * ys.sum(axis=-3, keepdims=True) - ys) / pixels,
                 steps)

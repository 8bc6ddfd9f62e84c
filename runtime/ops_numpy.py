"""convc's own convolution: im2col plus one GEMM, written once for NumPy and CuPy.

This is the hot path of training on a small CPU, so the layout is chosen to
copy as little as possible (timed with float32 on 2 cores):

- The im2col matrix is built as (C*kh*kw, N*Ho*Wo): a strided *view* of the
  zero-padded input with the axes (C, kh, kw, N, Ho, Wo), copied once. Its
  innermost axis runs along an image row, so the copy moves runs of Wo
  elements; the transposed layout (N*Ho*Wo, C*kh*kw) moves runs of only kw
  and was 3-8x slower to build.
- Each of the three functions is then one 2-D GEMM. Only the small
  (N, O, Ho, Wo) <-> (O, N*Ho*Wo) reshuffle of the output or its gradient
  needs an extra copy; it is C*kh*kw / O times smaller than the im2col matrix.
- col2im keeps the same (C, ..., N, Ho, Wo) order. A channels-last order
  (runs of C instead of Wo) made the scatter-adds faster for C >= 80 but the
  whole gradient 2-4x slower for C <= 17, as in a ConvLSTM's first layer.
- A 1x1 convolution with stride 1 and no padding is a matmul over channels
  and skips im2col entirely.
- Every call allocates its own buffers. Reusing a cached im2col buffer was
  measured and saved nothing (the allocator hands back the same memory), so
  the backend keeps no state and is safe to share.

Every function takes the array module `xp` as its first argument, so the CuPy
backend (ops_cupy.py) runs this same code on the GPU. Only operations both
libraries share are used: zeros, slicing, matmul, transpose, reshape,
`xp.lib.stride_tricks.as_strided` (called with shape and strides only, the
arguments CuPy accepts).
"""

from __future__ import annotations

import numpy

from convc.runtime.backend import Backend, Pair, check_conv2d_shapes


def _is_pointwise(w_shape: tuple, stride: Pair, pad: Pair) -> bool:
    """A 1x1 kernel at stride 1 without padding: output pixel p only sees input pixel p."""
    return w_shape[2] == 1 and w_shape[3] == 1 and tuple(stride) == (1, 1) and tuple(pad) == (0, 0)


def _pad(xp, x, pad: Pair):
    """A zero-padded copy of x, or x itself when there is no padding."""
    ph, pw = pad
    if ph == 0 and pw == 0:
        return x
    n, c, h, w = x.shape
    padded = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
    padded[:, :, ph:ph + h, pw:pw + w] = x
    return padded


def im2col(xp, x, kernel: Pair, stride: Pair, pad: Pair, dilation: Pair, out_hw: Pair):
    """The (C*kh*kw, N*Ho*Wo) matrix whose column (n, p, q) is the window under output (p, q).

    Row (c, i, j) of column (n, p, q) holds xpad[n, c, sh*p + dh*i, sw*q + dw*j].
    The windows are taken as a strided view of the padded input, which costs
    nothing, and copied into a contiguous matrix once.
    """
    padded = _pad(xp, x, pad)
    n, c = x.shape[:2]
    kh, kw = kernel
    ho, wo = out_hw
    s_n, s_c, s_h, s_w = padded.strides
    windows = xp.lib.stride_tricks.as_strided(
        padded,
        shape=(c, kh, kw, n, ho, wo),
        strides=(s_c, s_h * dilation[0], s_w * dilation[1], s_n, s_h * stride[0],
                 s_w * stride[1]),
    )
    return xp.ascontiguousarray(windows).reshape(c * kh * kw, n * ho * wo)


def col2im(xp, col, x_shape: tuple, kernel: Pair, stride: Pair, pad: Pair, dilation: Pair,
           out_hw: Pair):
    """The adjoint of im2col: add every window in `col` back onto the input it came from.

    Windows overlap, so this is a scatter-add. It is done as one strided
    slice-add per kernel offset (kh*kw of them), each covering all images,
    channels and output pixels at once. The accumulator uses the (C, N, ...)
    axis order of `col` so that those adds walk both arrays in the same order;
    one copy at the end puts the result back in (N, C, H, W).
    """
    n, c, h, w = x_shape
    kh, kw = kernel
    ho, wo = out_hw
    sh, sw = stride
    ph, pw = pad
    col = col.reshape(c, kh, kw, n, ho, wo)
    padded = xp.zeros((c, n, h + 2 * ph, w + 2 * pw), dtype=col.dtype)
    for i in range(kh):
        top = i * dilation[0]
        rows = slice(top, top + sh * (ho - 1) + 1, sh)
        for j in range(kw):
            left = j * dilation[1]
            cols = slice(left, left + sw * (wo - 1) + 1, sw)
            padded[:, :, rows, cols] += col[:, i, j]
    interior = padded[:, :, ph:ph + h, pw:pw + w]
    return xp.ascontiguousarray(interior.transpose(1, 0, 2, 3))


def _to_rows(gy):
    """(N, O, Ho, Wo) -> (O, N*Ho*Wo), the layout the GEMMs against im2col need (copies)."""
    n, o, ho, wo = gy.shape
    return gy.transpose(1, 0, 2, 3).reshape(o, n * ho * wo)


def _from_rows(xp, y, n: int, out_hw: Pair):
    """(O, N*Ho*Wo) -> a contiguous (N, O, Ho, Wo), the inverse of _to_rows."""
    o = y.shape[0]
    return xp.ascontiguousarray(y.reshape(o, n, out_hw[0], out_hw[1]).transpose(1, 0, 2, 3))


def _check_gy(gy, x_shape: tuple, w_shape: tuple, out_hw: Pair) -> None:
    expected = (x_shape[0], w_shape[0], out_hw[0], out_hw[1])
    if tuple(gy.shape) != expected:
        raise ValueError(f"conv2d output gradient has shape {tuple(gy.shape)}, expected "
                         f"{expected} for input {tuple(x_shape)} and weight {tuple(w_shape)}")


def conv2d(xp, x, w, stride: Pair, pad: Pair, dilation: Pair):
    """y = conv2d(x, w): one GEMM, w as (O, C*kh*kw) times im2col(x)."""
    out_hw = check_conv2d_shapes(x.shape, w.shape, stride, pad, dilation)
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    if _is_pointwise(w.shape, stride, pad):
        # (O, C) @ (N, C, H*W) broadcasts to (N, O, H*W): already in output order.
        return xp.matmul(w.reshape(o, c), x.reshape(n, c, h * wd)).reshape(n, o, h, wd)
    col = im2col(xp, x, (kh, kw), stride, pad, dilation, out_hw)
    y = xp.matmul(w.reshape(o, c * kh * kw), col)
    return _from_rows(xp, y, n, out_hw)


def conv2d_grad_input(xp, gy, w, x_shape: tuple, stride: Pair, pad: Pair, dilation: Pair):
    """dx = col2im(w^T @ gy): the transpose of conv2d's GEMM, then the transpose of im2col."""
    x_shape = tuple(x_shape)
    out_hw = check_conv2d_shapes(x_shape, w.shape, stride, pad, dilation)
    _check_gy(gy, x_shape, w.shape, out_hw)
    n, c, h, wd = x_shape
    o, _, kh, kw = w.shape
    if _is_pointwise(w.shape, stride, pad):
        return xp.matmul(w.reshape(o, c).T, gy.reshape(n, o, h * wd)).reshape(x_shape)
    dcol = xp.matmul(w.reshape(o, c * kh * kw).T, _to_rows(gy))
    return col2im(xp, dcol, x_shape, (kh, kw), stride, pad, dilation, out_hw)


def conv2d_grad_weight(xp, x, gy, w_shape: tuple, stride: Pair, pad: Pair, dilation: Pair):
    """dw = gy @ im2col(x)^T: one GEMM summing over images and output pixels together."""
    w_shape = tuple(w_shape)
    out_hw = check_conv2d_shapes(x.shape, w_shape, stride, pad, dilation)
    _check_gy(gy, x.shape, w_shape, out_hw)
    n, c, h, wd = x.shape
    o, _, kh, kw = w_shape
    if _is_pointwise(w_shape, stride, pad):
        # Contract over images and pixels at once: (N, O, HW) x (N, C, HW) -> (O, C).
        dw = xp.tensordot(gy.reshape(n, o, h * wd), x.reshape(n, c, h * wd), axes=([0, 2], [0, 2]))
        return dw.reshape(w_shape)
    col = im2col(xp, x, (kh, kw), stride, pad, dilation, out_hw)
    # col.T is a transposed view; matmul hands it to BLAS as such, without a copy.
    return xp.matmul(_to_rows(gy), col.T).reshape(w_shape)


class NumpyBackend(Backend):
    """NumPy arrays on the CPU with convc's im2col + GEMM convolution."""

    name = "numpy"
    xp = numpy

    def conv2d(self, x, w, stride: Pair, pad: Pair, dilation: Pair):
        return conv2d(self.xp, x, w, stride, pad, dilation)

    def conv2d_grad_input(self, gy, w, x_shape: tuple, stride: Pair, pad: Pair, dilation: Pair):
        return conv2d_grad_input(self.xp, gy, w, x_shape, stride, pad, dilation)

    def conv2d_grad_weight(self, x, gy, w_shape: tuple, stride: Pair, pad: Pair,
                           dilation: Pair):
        return conv2d_grad_weight(self.xp, x, gy, w_shape, stride, pad, dilation)

    def asnumpy(self, a) -> numpy.ndarray:
        return numpy.asarray(a)

    def asarray(self, a) -> numpy.ndarray:
        return numpy.asarray(a)

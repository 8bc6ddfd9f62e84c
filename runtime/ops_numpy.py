"""convc's own convolution: im2col plus GEMMs, written once for NumPy and CuPy.

This is the hot path of training on a small CPU, so the layouts are chosen
to copy as little as possible (timed with float32 on 2 cores):

- Values stay (N, C, H, W). The forward convolution builds im2col per
  image, (N, C*kh*kw, Ho*Wo), a strided *view* of the zero-padded input with
  the axes (N, C, kh, kw, Ho, Wo) copied once (runs of Wo elements), and
  multiplies it by the weight as a stack of GEMMs, (O, CK) @ (CK, HoWo) per
  image: the result lands in (N, O, Ho, Wo) order, so there is no transpose
  of the output, and `out=` writes it straight into the caller's buffer.
- The input gradient is the same stack of GEMMs transposed, then col2im:
  with stride 1 and `same` padding the centre tap covers every pixel, so it
  is *assigned* (no zero fill) and the other taps are added onto the parts
  of the image they reach; otherwise a zero-padded accumulator is used.
- The weight gradient contracts over images and pixels at once: one GEMM
  dW = gy (O, N*HoWo) @ cols^T, with the im2col matrix in the layout
  (C*kh*kw, N*HoWo) (columns ordered image by image). gy is read in the
  (O, N, HoWo) order that GEMM needs; the generated code keeps a cotangent
  that feeds a weight gradient in that channel-major layout, so this is a
  view, not a copy.
- Long sequences are cut into chunks of images whose im2col matrix fits the
  work budget, so a (T*N)-image batch never builds one huge matrix; chunks of
  the weight gradient are accumulated.
- A convolution that keeps the image size (stride 1, `same` padding: every
  ConvLSTM convolution) works on images flattened to H*W values: each kernel
  tap is then a fixed offset, so im2col copies, and col2im adds, runs of H*W
  values instead of runs of Wo (numpy's cost on small images is per run); a
  0/1 mask zeroes what wraps round an image's edge (`same_flat`,
  `im2col_flat`, `col2im_flat`). The small per-step plans (`_SmallConv`,
  `_SmallGradInput`) lay whole images back to back the same way.
- A 1x1 convolution with stride 1 and no padding is a matmul over channels
  and skips im2col entirely.
- Work arrays (padded input, im2col matrix, its gradient) come from a
  `Workspace` the backend keeps: one flat array per purpose, grown to the
  largest need and reused, so a training step allocates no im2col memory
  after the first. Generated code is single-threaded, so one workspace per
  backend object is safe.

Every function takes the array module `xp` as its first argument, so the CuPy
backend (ops_cupy.py) runs this same code on the GPU. Only operations both
libraries share are used: zeros, empty, slicing, matmul (with `out=`),
transpose, reshape, copyto, `xp.lib.stride_tricks.as_strided` (called with
shape and strides only, the arguments CuPy accepts).
"""

from __future__ import annotations

import numpy

from convc.runtime.backend import Backend, Capabilities, Pair, check_conv2d_shapes

# The widest image that im2col/col2im handle flat (`im2col_flat`): on wider images a row
# is long enough already, and the mask's multiply costs more than the runs it saves
# (32x32 images: a training step 8% slower flat; 16x16: 4% faster).
FLAT_MAX_WIDTH = 16
# Bytes of im2col matrix per chunk: big enough for efficient GEMMs, small
# enough to keep the working set (and the step's peak memory) modest.
WORK_BYTES = 4 << 20
# The im2col matrix of a weight gradient over a whole sequence, cut by input channels.
GRAD_WEIGHT_BYTES = WORK_BYTES  # (8 MiB measured no faster on shi2015)
# Below this size of gy's im2col an input gradient is computed as a forward convolution.
FLIP_BYTES = 512 << 10
# From this many im2col rows (C*kh*kw) up, the images of a chunk share one GEMM.
ONE_GEMM_ROWS = 256


class Workspace:
    """Scratch arrays reused across calls: one flat array per purpose, grown as needed."""

    def __init__(self) -> None:
        self._flat: dict = {}
        self._views: dict = {}

    def view(self, key: tuple, make):
        """A view of a kept buffer (the windows of a padded image), made once."""
        v = self._views.get(key)
        if v is None:
            v = self._views[key] = make()
        return v

    def get(self, xp, purpose, shape: tuple, dtype):
        """A scratch buffer of `shape`, kept per purpose (a name, or a tuple) and grown
        when a larger one is asked for."""
        dtype = xp.dtype(dtype)
        size = 1
        for d in shape:
            size *= int(d)
        key = (purpose if isinstance(purpose, tuple) else (purpose,)) + \
            (dtype.str, xp.__name__)
        flat = self._flat.get(key)
        if flat is None or flat.size < size:
            flat = xp.empty(max(size, 1), dtype=dtype)
            self._flat[key] = flat
        return flat[:size].reshape(shape)

    def slot(self, xp, key: tuple, shape: tuple, dtype):
        """A slot of the generated code's memory plan (see kernels.empty), kept and reused."""
        return self.get(xp, ("slot",) + tuple(key), shape, dtype)

    def _zeros(self, xp, key: tuple, shape: tuple, dtype):
        """A kept buffer, zeroed when made: callers write only its middle."""
        key = key + (xp.dtype(dtype).str, xp.__name__)
        a = self._flat.get(key)
        if a is None:
            a = self._flat[key] = xp.zeros(shape, dtype=dtype)
        return a

    def padded(self, xp, shape: tuple, pad: Pair, dtype):
        """A zero-padded buffer for images of one shape and padding, kept: only its
        interior is ever written, so its border is zeroed once."""
        n, c, h, w = shape
        return self._zeros(xp, ("padded", tuple(shape), tuple(pad)),
                           (n, c, h + 2 * pad[0], w + 2 * pad[1]), dtype)

    def flat_padded(self, xp, shape: tuple, slack: int, dtype):
        """A kept (N, C, slack + H*W + slack) buffer whose slack is zeroed once (see
        `im2col_flat`): only the middle is ever written."""
        n, c, h, w = shape
        return self._zeros(xp, ("flat", tuple(shape), int(slack)), (n, c, h * w + 2 * slack),
                           dtype)

    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self._flat.values())


def _scratch(xp, ws: Workspace | None, purpose: str, shape: tuple, dtype):
    if ws is None:
        return xp.empty(shape, dtype=dtype)
    return ws.get(xp, purpose, shape, dtype)


def _is_pointwise(w_shape: tuple, stride: Pair, pad: Pair) -> bool:
    """A 1x1 kernel at stride 1 without padding: output pixel p only sees input pixel p."""
    return w_shape[2] == 1 and w_shape[3] == 1 and tuple(stride) == (1, 1) and tuple(pad) == (0, 0)


def _view(a, shape: tuple):
    """`a` with another shape, never a copy (None when its layout does not allow it)."""
    v = a.view()
    try:
        v.shape = shape
    except AttributeError:
        return None
    return v


def _chunk(n_items: int, bytes_per_item: int) -> int:
    return max(1, min(n_items, WORK_BYTES // max(1, bytes_per_item)))


def _padded(xp, x, pad: Pair, ws: Workspace | None):
    """x with ph zero rows above and below and pw zero columns left and right."""
    ph, pw = pad
    if ph == 0 and pw == 0:
        return x
    n, c, h, w = x.shape
    if ws is None:
        buf = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
    else:  # only the interior is ever written: the border stays zero
        buf = ws.padded(xp, x.shape, pad, x.dtype)
    buf[:, :, ph:ph + h, pw:pw + w] = x
    return buf


def _windows(xp, padded, n: int, c: int, kernel: Pair, stride: Pair, dilation: Pair,
             out_hw: Pair, images_first: bool):
    """The strided view of every window: (N, C, kh, kw, Ho, Wo) or (C, kh, kw, N, Ho, Wo)."""
    s_n, s_c, s_h, s_w = padded.strides
    kh, kw = kernel
    ho, wo = out_hw
    taps = (s_h * dilation[0], s_w * dilation[1])
    moves = (s_h * stride[0], s_w * stride[1])
    if images_first:
        shape = (n, c, kh, kw, ho, wo)
        strides = (s_n, s_c) + taps + moves
    else:
        shape = (c, kh, kw, n, ho, wo)
        strides = (s_c,) + taps + (s_n,) + moves
    if xp is numpy and padded.flags.c_contiguous:
        # the same view as as_strided, built without its Python overhead (a few us a call)
        return numpy.ndarray(shape, padded.dtype, buffer=padded, strides=strides)
    return xp.lib.stride_tricks.as_strided(padded, shape=shape, strides=strides)


def im2col(xp, x, kernel: Pair, stride: Pair, pad: Pair, dilation: Pair, out_hw: Pair,
           ws: Workspace | None = None, images_first: bool = True):
    """The windows of x as a matrix.

    images_first: (N, C*kh*kw, Ho*Wo), one matrix per image (the forward GEMM
    stack); else (C*kh*kw, N*Ho*Wo), one matrix for all images (the weight
    gradient's GEMM). Row (c, i, j) of column (n, p, q) holds
    xpad[n, c, sh*p + dh*i, sw*q + dw*j].
    """
    if x.shape[3] <= FLAT_MAX_WIDTH and same_flat(x.shape, kernel, stride, pad, dilation):
        return im2col_flat(xp, x, kernel, pad, dilation, ws, images_first)
    n, c = x.shape[:2]
    kh, kw = kernel
    ho, wo = out_hw
    padded = _padded(xp, x, pad, ws)
    if padded is x or ws is None:
        win = _windows(xp, padded, n, c, kernel, stride, dilation, out_hw, images_first)
    else:  # the padded buffer is kept, and so is this view of it
        key = (x.shape, tuple(pad), padded.dtype.str, xp.__name__, tuple(kernel),
               tuple(stride), tuple(dilation), images_first)
        win = ws.view(key, lambda: _windows(xp, padded, n, c, kernel, stride, dilation,
                                            out_hw, images_first))
    col = _scratch(xp, ws, "col", win.shape, x.dtype)
    xp.copyto(col, win)
    if images_first:
        return col.reshape(n, c * kh * kw, ho * wo)
    return col.reshape(c * kh * kw, n * ho * wo)


def col2im(xp, dcol, dx, kernel: Pair, stride: Pair, pad: Pair, dilation: Pair,
           out_hw: Pair, ws: Workspace | None = None):
    """The adjoint of im2col: write into dx (N, C, H, W) the sum of every window in dcol.

    dcol is (N, C*kh*kw, Ho*Wo). Windows overlap, so this is a scatter-add,
    done as one strided slice-add per kernel tap (kh*kw of them), each over
    all images, channels and output pixels at once.
    """
    if dx.shape[3] <= FLAT_MAX_WIDTH and same_flat(dx.shape, kernel, stride, pad, dilation):
        return col2im_flat(xp, dcol, dx, kernel, pad, dilation, ws, images_first=True)
    n, c, h, w = dx.shape
    kh, kw = kernel
    ho, wo = out_hw
    sh, sw = stride
    ph, pw = pad
    dh, dw = dilation
    d = dcol.reshape(n, c, kh, kw, ho, wo)
    centre = (ph % dh == 0 and pw % dw == 0 and ph // dh < kh and pw // dw < kw)
    if (sh, sw) == (1, 1) and (ho, wo) == (h, w) and centre:
        # the centre tap reaches every pixel: assign it, add the others where they land
        i0, j0 = ph // dh, pw // dw
        dx[...] = d[:, :, i0, j0]
        for i in range(kh):
            oy = i * dh - ph
            y0, y1 = max(0, oy), min(h, ho + oy)
            for j in range(kw):
                if (i, j) == (i0, j0):
                    continue
                ox = j * dw - pw
                x0, x1 = max(0, ox), min(w, wo + ox)
                if y0 < y1 and x0 < x1:
                    dx[:, :, y0:y1, x0:x1] += d[:, :, i, j, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
        return dx
    acc = _scratch(xp, ws, "col2im", (n, c, h + 2 * ph, w + 2 * pw), dx.dtype)
    acc[...] = 0
    for i in range(kh):
        top = i * dh
        rows = slice(top, top + sh * (ho - 1) + 1, sh)
        for j in range(kw):
            left = j * dw
            cols = slice(left, left + sw * (wo - 1) + 1, sw)
            acc[:, :, rows, cols] += d[:, :, i, j]
    dx[...] = acc[:, :, ph:ph + h, pw:pw + w]
    return dx


def col2im_images_last(xp, dcol, dx, kernel: Pair, stride: Pair, pad: Pair, dilation: Pair,
                       out_hw: Pair, ws: Workspace | None = None):
    """col2im of a (C*kh*kw, N*Ho*Wo) matrix (images after the taps) into dx (N, C, H, W).

    The taps are added in the matrix's own (C, N, ...) order, into a padded
    accumulator, which is then copied into dx image by image.
    """
    if dx.shape[3] <= FLAT_MAX_WIDTH and same_flat(dx.shape, kernel, stride, pad, dilation):
        return col2im_flat(xp, dcol, dx, kernel, pad, dilation, ws, images_first=False)
    n, c, h, w = dx.shape
    kh, kw = kernel
    ho, wo = out_hw
    sh, sw = stride
    ph, pw = pad
    d = dcol.reshape(c, kh, kw, n, ho, wo)
    acc = _scratch(xp, ws, "col2im", (c, n, h + 2 * ph, w + 2 * pw), dx.dtype)
    acc[...] = 0
    for i in range(kh):
        top = i * dilation[0]
        rows = slice(top, top + sh * (ho - 1) + 1, sh)
        for j in range(kw):
            left = j * dilation[1]
            cols = slice(left, left + sw * (wo - 1) + 1, sw)
            acc[:, :, rows, cols] += d[:, i, j]
    dx[...] = acc[:, :, ph:ph + h, pw:pw + w].transpose(1, 0, 2, 3)
    return dx


# ------------------------------------------------ stride 1, output the input's size
# When a convolution keeps the image size (stride 1, pad = dilation*(k-1)/2 on both
# axes: every `same` convolution of a ConvLSTM), window (i, j) of output pixel s of an
# image flattened to H*W values is input pixel s + (i*dh - ph)*W + (j*dw - pw): a
# constant offset. With the image stored flat between two zero runs of
# S = ph*W + pw values, each tap of im2col is then one contiguous run of H*W values
# (per image and channel) instead of Ho runs of Wo, and each tap of col2im one add of
# such a run: numpy's cost on small images is per run, not per value (a 16x16 image:
# 16x fewer runs). The offsets are right vertically (what falls off the top or the
# bottom reads, or lands in, the zero runs) but a horizontal offset wraps round into
# the neighbouring row; those values are multiplied by 0 (a mask over the columns),
# in the same pass that copies (im2col) or before the adds (col2im).


def same_flat(x_shape: tuple, kernel: Pair, stride: Pair, pad: Pair, dilation: Pair) -> bool:
    """Whether a convolution of this geometry can use the flat im2col/col2im."""
    (kh, kw), (ph, pw), (dh, dw) = kernel, pad, dilation
    return (tuple(stride) == (1, 1) and (kh, kw) != (1, 1) and dh * (kh - 1) == 2 * ph
            and dw * (kw - 1) == 2 * pw)


def column_mask(xp, w: int, hw: int, kw: int, pw: int, dw: int, dtype,
                ws: Workspace | None = None):
    """(kw, H*W): 1 where kernel column j of output pixel s reads inside the image's row."""
    def make():
        q = numpy.arange(hw) % w
        m = numpy.stack([(q + (j * dw - pw) >= 0) & (q + (j * dw - pw) < w) for j in range(kw)])
        return xp.asarray(m.astype(dtype))

    if ws is None:
        return make()
    return ws.view(("colmask", w, hw, kw, pw, dw, xp.dtype(dtype).str, xp.__name__), make)


def tap_mask(xp, h: int, w: int, kernel: Pair, pad: Pair, dilation: Pair, dtype):
    """(kh, kw, H*W): 1 where tap (i, j) of output pixel s reads inside the image.

    With it, images (and channels) can lie back to back in one flat buffer with a
    single zero run at each end: what a tap reads across an edge is zeroed by the
    mask, whichever neighbour it wraps into.
    """
    (kh, kw), (ph, pw), (dh, dw) = kernel, pad, dilation
    y, x = numpy.divmod(numpy.arange(h * w), w)
    m = numpy.empty((kh, kw, h * w), dtype=bool)
    for i in range(kh):
        for j in range(kw):
            yy, xx = y + i * dh - ph, x + j * dw - pw
            m[i, j] = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    return xp.asarray(m.astype(dtype))


def _flat_windows(xp, buf, kernel: Pair, dilation: Pair, w: int, hw: int, images_first: bool):
    """Every window of a flat buffer (N, C, L): (N, C, kh, kw, H*W) or (C, kh, kw, N, H*W)."""
    s_n, s_c, s_e = buf.strides
    kh, kw = kernel
    taps = (s_e * w * dilation[0], s_e * dilation[1])
    n, c = buf.shape[:2]
    if images_first:
        shape, strides = (n, c, kh, kw, hw), (s_n, s_c) + taps + (s_e,)
    else:
        shape, strides = (c, kh, kw, n, hw), (s_c,) + taps + (s_n, s_e)
    if xp is numpy and buf.flags.c_contiguous:
        return numpy.ndarray(shape, buf.dtype, buffer=buf, strides=strides)
    return xp.lib.stride_tricks.as_strided(buf, shape=shape, strides=strides)


def im2col_flat(xp, x, kernel: Pair, pad: Pair, dilation: Pair, ws: Workspace | None = None,
                images_first: bool = True):
    """im2col of a `same_flat` convolution: (N, C*kh*kw, H*W) or (C*kh*kw, N*H*W).

    The same matrix as `im2col`, in two passes of long runs: x into the middle of a
    kept flat zero-padded buffer, then every window times the column mask.
    """
    n, c, h, w = x.shape
    kh, kw = kernel
    ph, pw = pad
    hw = h * w
    slack = ph * w + pw
    if not images_first:
        return _im2col_flat_rows(xp, x, kernel, pad, dilation, ws)
    if ws is None:
        buf = xp.zeros((n, c, hw + 2 * slack), dtype=x.dtype)
    else:
        buf = ws.flat_padded(xp, x.shape, slack, x.dtype)
    xp.copyto(buf[:, :, slack:slack + hw].reshape(n, c, h, w), x)
    if ws is None:
        win = _flat_windows(xp, buf, kernel, dilation, w, hw, images_first)
    else:
        key = ("flatwin", x.shape, slack, buf.dtype.str, xp.__name__, tuple(kernel),
               tuple(dilation), images_first)
        win = ws.view(key, lambda: _flat_windows(xp, buf, kernel, dilation, w, hw,
                                                 images_first))
    col = _scratch(xp, ws, "col", win.shape, x.dtype)
    if pw == 0:
        xp.copyto(col, win)
    else:
        mask = column_mask(xp, w, hw, kw, pw, dilation[1], x.dtype, ws)
        xp.multiply(win, mask if images_first else mask.reshape(kw, 1, hw), out=col)
    if images_first:
        return col.reshape(n, c * kh * kw, hw)
    return col.reshape(c * kh * kw, n * hw)


def _row_mask(xp, n: int, h: int, w: int, kernel: Pair, pad: Pair, dilation: Pair, dtype,
              ws: Workspace | None = None):
    """(kh, kw, N*H*W): `tap_mask` tiled over N images that lie back to back."""
    def make():
        m = tap_mask(numpy, h, w, kernel, pad, dilation, numpy.dtype(dtype))
        return xp.asarray(numpy.ascontiguousarray(numpy.tile(m, (1, 1, n))))

    if ws is None:
        return make()
    return ws.view(("rowmask", n, h, w, tuple(kernel), tuple(pad), tuple(dilation),
                    xp.dtype(dtype).str, xp.__name__), make)


def _im2col_flat_rows(xp, x, kernel: Pair, pad: Pair, dilation: Pair,
                      ws: Workspace | None = None):
    """im2col_flat's (C*kh*kw, N*H*W) matrix, a row (c, i, j) one run of N*H*W values.

    x goes channel-major, (C, N, H*W), into the middle of a kept flat buffer with
    one zero run of S = ph*W + pw values at each end (a transposing copy); the
    images of a channel then lie back to back, so row (c, i, j) of the matrix is
    the run of N*H*W values at offset (i*dh - ph)*W + (j*dw - pw) from channel c's
    start, times `tap_mask` tiled over the images (what crosses an edge of an
    image, above, below or sideways, reads a neighbour's value, times 0): one
    multiply of C*kh*kw long runs rather than C*kh*kw*N runs of H*W.
    """
    n, c, h, w = x.shape
    kh, kw = kernel
    hw = h * w
    slack = pad[0] * w + pad[1]
    size = c * n * hw
    if ws is None:
        buf = xp.zeros(size + 2 * slack, dtype=x.dtype)
    else:
        buf = ws.flat_padded(xp, (1, 1, 1, size), slack, x.dtype).reshape(-1)
    xp.copyto(buf[slack:slack + size].reshape(c, n, h, w), x.transpose(1, 0, 2, 3))
    e = buf.itemsize
    shape = (c, kh, kw, n * hw)
    strides = (n * hw * e, dilation[0] * w * e, dilation[1] * e, e)

    def windows():  # slack - ph*W - pw = 0: tap (0, 0) of channel 0 starts at buf[0]
        if xp is numpy:
            return numpy.ndarray(shape, buf.dtype, buffer=buf, strides=strides)
        return xp.lib.stride_tricks.as_strided(buf, shape=shape, strides=strides)

    if ws is None:
        win = windows()
    else:
        key = (x.shape, slack, buf.dtype.str, xp.__name__, tuple(kernel), tuple(dilation))
        win = ws.view(("flatrows",) + key, windows)
    m = _row_mask(xp, n, h, w, kernel, pad, dilation, x.dtype, ws)
    col = _scratch(xp, ws, "col", shape, x.dtype)
    xp.multiply(win, m, out=col)
    return col.reshape(c * kh * kw, n * hw)


def col2im_flat(xp, dcol, dx, kernel: Pair, pad: Pair, dilation: Pair,
                ws: Workspace | None = None, images_first: bool = True):
    """col2im of a `same_flat` convolution into dx (N, C, H, W); dcol is overwritten.

    dcol: (N, C*kh*kw, H*W), or (C*kh*kw, N*H*W) with images_first=False. What
    falls outside the image is zeroed in dcol first (one multiply), then each tap
    is one add of runs into a flat accumulator, at its offset: the centre tap,
    which covers every pixel, is assigned first (no zero fill but the slack), the
    others added in (i, j) order; the accumulator's middle is dx. images_first:
    a run is one image's H*W values and the mask is over columns (what crosses the
    top or the bottom lands in the slack); else a run is a channel's N*H*W values,
    its images back to back as in `_im2col_flat_rows`, and the mask is
    `tap_mask` tiled over them (half the adds' runs: a 16x16 step's input
    gradient went 1.31 -> 1.04 ms).
    """
    n, c, h, w = dx.shape
    kh, kw = kernel
    ph, pw = pad
    dh, dw = dilation
    hw = h * w
    slack = ph * w + pw
    if images_first:
        run = hw
        d = dcol.reshape(n, c, kh, kw, hw)
        acc = _scratch(xp, ws, "col2im", (n, c, hw + 2 * slack), dx.dtype)
        if pw:
            xp.multiply(d, column_mask(xp, w, hw, kw, pw, dw, dx.dtype, ws), out=d)
    else:
        run = n * hw
        d = dcol.reshape(c, kh, kw, run)
        acc = _scratch(xp, ws, "col2im", (c, run + 2 * slack), dx.dtype)
        xp.multiply(d, _row_mask(xp, n, h, w, kernel, pad, dilation, dx.dtype, ws), out=d)
    centre = (ph // dh, pw // dw) if ph % dh == 0 and pw % dw == 0 else None
    if centre is None:
        acc[...] = 0
    else:
        acc[..., :slack] = 0
        acc[..., slack + run:] = 0
        xp.copyto(acc[..., slack:slack + run], d[..., centre[0], centre[1], :])
    for i in range(kh):
        for j in range(kw):
            if (i, j) == centre:
                continue
            at = slack + (i * dh - ph) * w + (j * dw - pw)
            region = acc[..., at:at + run]
            xp.add(region, d[..., i, j, :], out=region)
    middle = acc[..., slack:slack + run]
    if images_first:
        xp.copyto(dx, middle.reshape(n, c, h, w))
    else:
        xp.copyto(dx, middle.reshape(c, n, h, w).transpose(1, 0, 2, 3))
    return dx


def _check_gy(gy, x_shape: tuple, w_shape: tuple, out_hw: Pair) -> None:
    expected = (x_shape[0], w_shape[0], out_hw[0], out_hw[1])
    if tuple(gy.shape) != expected:
        raise ValueError(f"conv2d output gradient has shape {tuple(gy.shape)}, expected "
                         f"{expected} for input {tuple(x_shape)} and weight {tuple(w_shape)}")


def _result(xp, out, shape: tuple, dtype):
    """The array to write a result into, and a (rows, cols) view of it per image."""
    if out is None:
        out = xp.empty(shape, dtype=dtype)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    return out


def conv2d(xp, x, w, stride: Pair, pad: Pair, dilation: Pair, out=None,
           ws: Workspace | None = None):
    """y = conv2d(x, w): per image, the weight (O, C*kh*kw) times the image's im2col."""
    out_hw = check_conv2d_shapes(x.shape, w.shape, stride, pad, dilation)
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho, wo = out_hw
    out = _result(xp, out, (n, o, ho, wo), x.dtype)
    y3 = _view(out, (n, o, ho * wo))
    if y3 is None:  # a strided out: compute, then copy in
        out[...] = conv2d(xp, x, w, stride, pad, dilation, ws=ws)
        return out
    w2 = w.reshape(o, c * kh * kw)  # a view, also of a kernel slice W[:, a:b] (BLAS takes
    # its row stride)
    if _is_pointwise(w.shape, stride, pad):
        x3 = x.reshape(n, c, h * wd)
        xp.matmul(w2, x3, out=y3)
        return out
    step = _chunk(n, c * kh * kw * ho * wo * x.itemsize)
    if n > 1 and c * kh * kw >= ONE_GEMM_ROWS:
        # one GEMM for all images of a chunk: the weight is packed once, not per image;
        # the (O, images*HoWo) result is then put in image order (a copy C*kh*kw times
        # smaller than the im2col matrix)
        for a in range(0, n, step):
            b = min(n, a + step)
            col = im2col(xp, x[a:b], (kh, kw), stride, pad, dilation, out_hw, ws,
                         images_first=False)
            y2 = _scratch(xp, ws, "rows", (o, (b - a) * ho * wo), x.dtype)
            xp.matmul(w2, col, out=y2)
            y3[a:b] = y2.reshape(o, b - a, ho * wo).transpose(1, 0, 2)
        return out
    for a in range(0, n, step):
        b = min(n, a + step)
        col = im2col(xp, x[a:b], (kh, kw), stride, pad, dilation, out_hw, ws)
        xp.matmul(w2, col, out=y3[a:b])
    return out


def conv2d_grad_input(xp, gy, w, x_shape: tuple, stride: Pair, pad: Pair, dilation: Pair,
                      out=None, ws: Workspace | None = None):
    """dx = col2im(w^T @ gy) per image: the transpose of conv2d's GEMMs, then of im2col."""
    x_shape = tuple(x_shape)
    out_hw = check_conv2d_shapes(x_shape, w.shape, stride, pad, dilation)
    _check_gy(gy, x_shape, w.shape, out_hw)
    n, c, h, wd = x_shape
    o, _, kh, kw = w.shape
    ho, wo = out_hw
    out = _result(xp, out, x_shape, gy.dtype)
    if tuple(stride) == (1, 1) and n * o * kh * kw * ho * wo * gy.itemsize <= FLIP_BYTES and \
            not _is_pointwise(w.shape, stride, pad):
        # small: the input gradient as a forward convolution of gy with the kernel turned
        # around (one im2col copy instead of kh*kw slice-adds, which cost more in calls)
        q = (dilation[0] * (kh - 1) - pad[0], dilation[1] * (kw - 1) - pad[1])
        if min(q) >= 0:
            turned = xp.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
            return conv2d(xp, gy, turned, (1, 1), q, dilation, out=out, ws=ws)
    g3 = gy.reshape(n, o, ho * wo)  # a view for the layouts generated code uses
    wt = w.reshape(o, c * kh * kw).T
    if _is_pointwise(w.shape, stride, pad):
        dx3 = _view(out, (n, c, h * wd))
        if dx3 is None:
            out[...] = xp.matmul(wt, g3).reshape(x_shape)
        else:
            xp.matmul(wt, g3, out=dx3)
        return out
    step = _chunk(n, c * kh * kw * ho * wo * gy.itemsize)
    rows = _view(gy.transpose(1, 0, 2, 3), (o, n * ho * wo)) if n > 1 else None
    if rows is not None and c * kh * kw >= ONE_GEMM_ROWS:
        # gy channel-major (as generated code keeps dz): one GEMM for all images of a
        # chunk, col2im in the (C, kh, kw, images, Ho, Wo) order it gives
        for a in range(0, n, step):
            b = min(n, a + step)
            dcol = _scratch(xp, ws, "col", (c * kh * kw, (b - a) * ho * wo), gy.dtype)
            xp.matmul(wt, rows[:, a * ho * wo:b * ho * wo], out=dcol)
            col2im_images_last(xp, dcol, out[a:b], (kh, kw), stride, pad, dilation, out_hw, ws)
        return out
    for a in range(0, n, step):
        b = min(n, a + step)
        # (the forward im2col's buffer: never in use at the same time)
        dcol = _scratch(xp, ws, "col", (b - a, c * kh * kw, ho * wo), gy.dtype)
        xp.matmul(wt, g3[a:b], out=dcol)
        col2im(xp, dcol, out[a:b], (kh, kw), stride, pad, dilation, out_hw, ws)
    return out


def _zero_images(xp, x) -> int:
    """How many leading images of x (N, C, H, W) are all zero (NumPy; 0 for CuPy, which
    would wait for the device to tell)."""
    if xp is not numpy:
        return 0
    s = 0
    while s < len(x) and not x[s].any():
        s += 1
    return s


def conv2d_grad_weight(xp, x, gy, w_shape: tuple, stride: Pair, pad: Pair, dilation: Pair,
                       ws: Workspace | None = None, share=None):
    """dw = gy @ im2col(x)^T: GEMMs summing over images and output pixels together.

    share(pieces, ws), if given, runs the independent pieces of a weight
    gradient cut by input channels (`kernels.Crew.share`: other threads may
    take some); without it they run here in order.
    """
    w_shape = tuple(w_shape)
    out_hw = check_conv2d_shapes(x.shape, w_shape, stride, pad, dilation)
    _check_gy(gy, x.shape, w_shape, out_hw)
    n, c, h, wd = x.shape
    o, _, kh, kw = w_shape
    ho, wo = out_hw
    if _is_pointwise(w_shape, stride, pad):
        # per image (O, HW) @ (HW, C), then summed over images: no transposed copy of x
        # (tensordot makes one, which cost 3x this on a (T*N, C, HW) sequence)
        dw = xp.matmul(gy.reshape(n, o, h * wd), x.reshape(n, c, h * wd).transpose(0, 2, 1))
        return dw.sum(axis=0).reshape(w_shape)
    # (O, N*HoWo): a view when gy is channel-major, as generated code keeps it
    rows = _view(gy.transpose(1, 0, 2, 3), (o, n * ho * wo))
    k = c * kh * kw
    dw = xp.empty((o, k), dtype=x.dtype)
    taps = kh * kw
    group = GRAD_WEIGHT_BYTES // max(1, taps * n * ho * wo * x.itemsize)
    if rows is not None and n * ho * wo >= 4096 and group * taps >= 96:
        # many images: cut the im2col matrix by input channels instead of by images, so
        # every GEMM still runs over all images and pixels (long enough to be efficient)
        # and writes its own columns of dw: no partial sums to add up
        def piece(c0, c1):
            def run(work):
                # leading images whose channels c0:c1 are all zero (a zero initial state
                # h[t-1] at t = 0, first in a (T*N, ...) sequence) add nothing: skipped
                s = _zero_images(xp, x[:, c0:c1])
                if s == n:
                    dw[:, c0 * taps:c1 * taps] = 0
                    return
                col = im2col(xp, x[s:, c0:c1], (kh, kw), stride, pad, dilation, out_hw, work,
                             images_first=False)
                xp.matmul(rows[:, s * ho * wo:], col.T, out=dw[:, c0 * taps:c1 * taps])
            return run

        pieces = [piece(c0, min(c, c0 + group)) for c0 in range(0, c, group)]
        if share is None:
            for run in pieces:
                run(ws)
        else:
            share(pieces, ws)
        return dw.reshape(w_shape)
    step = _chunk(n, k * ho * wo * x.itemsize)
    part = None
    for a in range(0, n, step):
        b = min(n, a + step)
        col = im2col(xp, x[a:b], (kh, kw), stride, pad, dilation, out_hw, ws,
                     images_first=False)
        if rows is not None:
            g = rows[:, a * ho * wo:b * ho * wo]
        else:
            g = xp.ascontiguousarray(gy[a:b].transpose(1, 0, 2, 3)).reshape(o, -1)
        if a == 0:
            xp.matmul(g, col.T, out=dw)
        else:
            if part is None:
                part = xp.empty((o, k), dtype=x.dtype)
            xp.matmul(g, col.T, out=part)
            dw += part
    return dw.reshape(w_shape)


class _SmallConv:
    """A small convolution of one geometry, with its buffers: three NumPy calls a step.

    Inside a time loop the same convolution runs T times on same-shaped
    arrays; when its im2col matrix is small, the call overhead of working
    everything out again (a few tens of us) costs more than the arithmetic.
    This keeps the padded input, the windows view of it and the im2col
    matrix; a call copies x into the padding, the windows into the matrix,
    and runs the GEMM stack.

    A `same_flat` geometry keeps instead every image back to back in one flat
    buffer with a zero run of S = ph*W + pw values at each end: x goes in as
    one run, and each tap of the windows of all images and channels is a
    run of H*W values at a fixed offset, multiplied by `tap_mask` (what
    crosses an edge of an image reads a neighbour's value, times 0). NumPy
    calls cost per run (a few us for a non-contiguous call), not per value,
    at these sizes.
    """

    LIMIT = 1 << 20  # bytes of im2col matrix

    def __init__(self, x_shape: tuple, w_shape: tuple, stride: Pair, pad: Pair, dilation: Pair,
                 dtype):
        n, c, h, w = x_shape
        o, _, kh, kw = w_shape
        self.out_hw = ho, wo = check_conv2d_shapes(x_shape, w_shape, stride, pad, dilation)
        self.out_shape = (n, o, ho, wo)
        self.rows = (o, c * kh * kw)
        ph, pw = pad
        self.mask = None
        if same_flat(x_shape, (kh, kw), stride, pad, dilation):
            hw = h * w
            slack = ph * w + pw
            flat = numpy.zeros(n * c * hw + 2 * slack, dtype=dtype)
            self.padded = flat
            self.interior = flat[slack:slack + n * c * hw].reshape(n, c, h, w)
            e = flat.itemsize
            self.windows = numpy.ndarray((n, c, kh, kw, hw), dtype, buffer=flat,
                                         strides=(c * hw * e, hw * e, dilation[0] * w * e,
                                                  dilation[1] * e, e))
            self.mask = tap_mask(numpy, h, w, (kh, kw), pad, dilation, dtype)
        else:
            self.padded = numpy.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=dtype)
            self.interior = self.padded[:, :, ph:ph + h, pw:pw + w]
            self.windows = _windows(numpy, self.padded, n, c, (kh, kw), stride, dilation,
                                    self.out_hw, True)
        self.col = numpy.empty(self.windows.shape, dtype=dtype)
        self.col3 = self.col.reshape(n, c * kh * kw, ho * wo)
        # the (O, C*kh*kw) view of the last weight and the (N, O, Ho*Wo) view of the last
        # `out`, kept: a time loop passes the same two arrays every step (views of them
        # never go stale, whatever is written into them)
        self._w = self._w2 = self._out = self._y3 = None

    def __call__(self, x, w, out):
        numpy.copyto(self.interior, x)
        if self.mask is None:
            numpy.copyto(self.col, self.windows)
        else:
            numpy.multiply(self.windows, self.mask, out=self.col)
        if w is not self._w:
            self._w2 = w.reshape(self.rows)
            self._w = w
        if out is None:
            out = numpy.empty(self.out_shape, dtype=x.dtype)
        elif out is self._out:
            numpy.matmul(self._w2, self.col3, out=self._y3)
            return out
        y3 = _view(out, (self.out_shape[0], self.out_shape[1], -1))
        if y3 is None:
            out[...] = numpy.matmul(self._w2, self.col3).reshape(self.out_shape)
        else:
            numpy.matmul(self._w2, self.col3, out=y3)
            self._out, self._y3 = out, y3
        return out


class _SmallGradInput:
    """dx = col2im(W^T @ gy) of a small stride-1 `same` convolution, taps worked out once.

    The flat layout of `_SmallConv`, transposed: the kernel is copied with its
    rows in (kh, kw, C) order, so that the GEMM's (N, kh*kw*C, H*W) result
    holds each tap as one run of C*H*W values per image. Each tap's run, times
    `tap_mask` (what would cross an edge of an image), goes into a segment of
    its own of a kept buffer (N, kh*kw, R), R = C*H*W + 2*slack, shifted by the
    tap's offset off = (i*dh - ph)*W + (j*dw - pw): dx[n, q] is then the sum
    over segments k of buf[n, k, slack + q], one reduction straight into `out`.
    The segments' zero margins are never written. The segments are in the order
    that `col2im_flat` adds the taps in (the centre tap, which reaches every
    pixel, first, then the others in (i, j) order), so the sums are the same to
    the bit; the offsets being linear in i and j, the taps above, left of,
    right of and below the centre each go in with one multiply through a strided
    view. kh = kw = 3: eight NumPy calls, no Python arithmetic.
    """

    def __init__(self, gy_shape: tuple, w_shape: tuple, pad: Pair, dilation: Pair, dtype):
        n, o, ho, wo = gy_shape
        _, c, kh, kw = w_shape
        ph, pw = pad
        dh, dw = dilation
        hw = ho * wo
        slack = ph * wo + pw
        size = c * hw
        seg = size + 2 * slack
        self.wt = numpy.empty((kh, kw, c, o), dtype=dtype)  # W^T, rows in (kh, kw, C) order
        self.wt2 = self.wt.reshape(kh * kw * c, o)
        self.dcol = numpy.empty((n, kh * kw * c, hw), dtype=dtype)
        d = self.dcol.reshape(n, kh, kw, size)
        self.g3 = (n, o, hw)
        # the mask repeated over channels, so that one contiguous operand applies it
        mask = tap_mask(numpy, ho, wo, (kh, kw), pad, dilation, dtype).reshape(kh, kw, 1, hw)
        mask = numpy.ascontiguousarray(
            numpy.broadcast_to(mask, (kh, kw, c, hw))).reshape(kh, kw, size)
        buf = numpy.zeros(n * kh * kw * seg, dtype=dtype)
        e = buf.itemsize
        i0, j0 = ph // dh, pw // dw
        centre = i0 * kw + j0

        def segment(i, j):  # the segment of tap (i, j): the centre's first, then (i, j) order
            r = i * kw + j
            return 0 if r == centre else r + 1 if r < centre else r

        self.parts = []  # (taps of dcol, their mask, where they go): one multiply each
        for rows, cols in (((i0, i0 + 1), (j0, j0 + 1)), ((0, i0), (0, kw)),
                           ((i0, i0 + 1), (0, j0)), ((i0, i0 + 1), (j0 + 1, kw)),
                           ((i0 + 1, kh), (0, kw))):
            (ia, ib), (ja, jb) = rows, cols
            if ia >= ib or ja >= jb:
                continue
            at = segment(ia, ja) * seg + slack + (ia * dh - ph) * wo + (ja * dw - pw)
            to = numpy.ndarray((n, ib - ia, jb - ja, size), dtype, buffer=buf, offset=at * e,
                               strides=(kh * kw * seg * e, (kw * seg + dh * wo) * e,
                                        (seg + dw) * e, e))
            self.parts.append((d[:, ia:ib, ja:jb], mask[ia:ib, ja:jb], to))
        # what every tap adds to pixel q of an image, in the order above
        self.taps = numpy.ndarray((n, kh * kw, size), dtype, buffer=buf, offset=slack * e,
                                  strides=(kh * kw * seg * e, seg * e, e))
        self.x_shape = (n, c, ho, wo)
        self.dx2 = (n, size)
        self._out = self._o2 = None  # the last `out` and its (N, C*H*W) view (see _SmallConv)

    @staticmethod
    def fits(gy_shape, w_shape, x_shape, stride, pad, dilation) -> bool:
        n, o, ho, wo = gy_shape
        _, c, kh, kw = w_shape
        ph, pw = pad
        dh, dw = dilation
        return (tuple(stride) == (1, 1) and (ho, wo) == tuple(x_shape[2:]) and ph % dh == 0
                and pw % dw == 0 and ph // dh < kh and pw // dw < kw
                and n * c * kh * kw * ho * wo * 4 <= _SmallConv.LIMIT and (kh, kw) != (1, 1))

    def __call__(self, gy, w, out):
        numpy.copyto(self.wt, w.transpose(2, 3, 1, 0))
        numpy.matmul(self.wt2, gy.reshape(self.g3), out=self.dcol)
        for taps, mask, to in self.parts:
            numpy.multiply(taps, mask, out=to)
        if out is None:
            out = numpy.empty(self.x_shape, dtype=self.dcol.dtype)
        elif out is self._out:
            numpy.add.reduce(self.taps, axis=1, out=self._o2)
            return out
        dx2 = _view(out, self.dx2)
        if dx2 is None:
            out[...] = numpy.add.reduce(self.taps, axis=1).reshape(self.x_shape)
        else:
            numpy.add.reduce(self.taps, axis=1, out=dx2)
            self._out, self._o2 = out, dx2
        return out


class NumpyBackend(Backend):
    """NumPy arrays on the CPU with convc's im2col + GEMM convolution."""

    name = "numpy"
    xp = numpy
    # out= straight into the caller's buffer; batch shards in threads (NumPy releases the
    # GIL in ufuncs, copies and matmul); gy read channel-major by the weight gradient's GEMM
    capabilities = Capabilities(device="cpu", writes_out=True, shards=True,
                                deterministic=True, float64=True,
                                weight_gradient_layout="channel-major")

    def __init__(self) -> None:
        self.workspace = Workspace()
        self._small: dict = {}
        self.crew = None  # the kernels.Crew of a sharded step this backend runs a shard of

    def _small_conv(self, x, w, stride, pad, dilation):
        """The kept plan of a small, padded convolution of x's geometry (None if not small)."""
        key = (x.shape, w.shape, stride, pad, dilation, x.dtype)
        plan = self._small.get(key)
        if plan is None:
            n, c, h, wd = x.shape
            o, _, kh, kw = w.shape
            small = n * c * kh * kw * h * wd * x.itemsize <= _SmallConv.LIMIT
            if not small or _is_pointwise(w.shape, stride, pad) or pad == (0, 0) or \
                    pad == [0, 0]:
                plan = False
            else:
                plan = _SmallConv(x.shape, w.shape, tuple(stride), tuple(pad), tuple(dilation),
                                  x.dtype)
            self._small[key] = plan
        return plan or None

    def conv2d(self, x, w, stride: Pair, pad: Pair, dilation: Pair, out=None):
        plan = self._small_conv(x, w, stride, pad, dilation)
        if plan is not None:
            return plan(x, w, out)
        return conv2d(self.xp, x, w, stride, pad, dilation, out=out, ws=self.workspace)

    def conv2d_grad_input(self, gy, w, x_shape: tuple, stride: Pair, pad: Pair, dilation: Pair,
                          out=None):
        key = ("dx", gy.shape, w.shape, tuple(x_shape), stride, pad, dilation, gy.dtype)
        plan = self._small.get(key)
        if plan is None:
            plan = self._small[key] = (
                _SmallGradInput(gy.shape, w.shape, tuple(pad), tuple(dilation), gy.dtype)
                if _SmallGradInput.fits(gy.shape, w.shape, x_shape, stride, pad, dilation)
                else False)
        if plan:
            return plan(gy, w, out)
        if tuple(stride) == (1, 1) and gy.size * w.shape[2] * w.shape[3] * gy.itemsize \
                <= FLIP_BYTES:
            kh, kw = w.shape[2], w.shape[3]
            q = (dilation[0] * (kh - 1) - pad[0], dilation[1] * (kw - 1) - pad[1])
            if min(q) >= 0 and q != (0, 0) and tuple(x_shape)[2:] == \
                    tuple(d + 2 * qq - dd * (k - 1) for d, qq, dd, k in
                          zip(gy.shape[2:], q, dilation, (kh, kw))):
                # see conv2d_grad_input: a forward convolution with the kernel turned round
                turned = numpy.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
                return self.conv2d(gy, turned, (1, 1), q, tuple(dilation), out=out)
        return conv2d_grad_input(self.xp, gy, w, x_shape, stride, pad, dilation, out=out,
                                 ws=self.workspace)

    def conv2d_grad_weight(self, x, gy, w_shape: tuple, stride: Pair, pad: Pair,
                           dilation: Pair):
        return conv2d_grad_weight(self.xp, x, gy, w_shape, stride, pad, dilation,
                                  ws=self.workspace,
                                  share=None if self.crew is None else self.crew.share)

    def asnumpy(self, a) -> numpy.ndarray:
        return numpy.asarray(a)

    def asarray(self, a) -> numpy.ndarray:
        return numpy.asarray(a)

    def spawn(self) -> "NumpyBackend":
        """A fresh backend of this class (its own workspace) for a shard's thread; a
        subclass whose __init__ takes settings overrides this to pass them on."""
        return type(self)()

"""A reference backend: the convolution straight from its definition, in plain NumPy.

Slow and simple on purpose. Each of the three functions is a loop over the
kernel taps (i, j); at each tap the strided slice of the zero-padded input
that the tap reads, (N, C, Ho, Wo), is contracted with the tap's weights
(O, C) by one `tensordot`. Nothing is shared with ops_numpy.py's im2col,
so a model trained or checked on it is an independent check of convc's own
kernels, in float64 as well as float32.

It declares the plainest capabilities: no `out=` (kernels.conv2d copies its
fresh result into place), never cut into batch shards, deterministic, CPU.

It is also the worked example of docs/compiler.md's "Adding a backend": this
file plus its `register_backend` line in runtime/backend.py is all it took.
"""

from __future__ import annotations

import numpy

from convc.runtime.backend import Backend, Capabilities, Pair, check_conv2d_shapes


def _taps(kernel: Pair, stride: Pair, dilation: Pair, out_hw: Pair):
    """(i, j, rows, cols): each kernel tap and the slices of the padded input it reads."""
    for i in range(kernel[0]):
        r0 = dilation[0] * i
        rows = slice(r0, r0 + stride[0] * (out_hw[0] - 1) + 1, stride[0])
        for j in range(kernel[1]):
            c0 = dilation[1] * j
            yield i, j, rows, slice(c0, c0 + stride[1] * (out_hw[1] - 1) + 1, stride[1])


def _padded(x, pad: Pair):
    return numpy.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))


class ReferenceBackend(Backend):
    """NumPy arrays, the convolution and its two VJPs as sums over kernel taps."""

    name = "reference"
    xp = numpy
    capabilities = Capabilities(device="cpu", writes_out=False, shards=False,
                                deterministic=True, float64=True)

    def conv2d(self, x, w, stride: Pair, pad: Pair, dilation: Pair):
        out_hw = check_conv2d_shapes(x.shape, w.shape, stride, pad, dilation)
        xpad = _padded(x, pad)
        y = numpy.zeros((x.shape[0], w.shape[0]) + out_hw, dtype=numpy.result_type(x, w))
        for i, j, rows, cols in _taps(w.shape[2:], stride, dilation, out_hw):
            # (O, C) . (N, C, Ho, Wo) over C -> (O, N, Ho, Wo)
            y += numpy.tensordot(w[:, :, i, j], xpad[:, :, rows, cols],
                                 axes=([1], [1])).transpose(1, 0, 2, 3)
        return y

    def conv2d_grad_input(self, gy, w, x_shape: tuple, stride: Pair, pad: Pair, dilation: Pair):
        n, c, h, wd = x_shape = tuple(x_shape)
        out_hw = check_conv2d_shapes(x_shape, w.shape, stride, pad, dilation)
        dxpad = numpy.zeros((n, c, h + 2 * pad[0], wd + 2 * pad[1]),
                            dtype=numpy.result_type(gy, w))
        for i, j, rows, cols in _taps(w.shape[2:], stride, dilation, out_hw):
            # (N, O, Ho, Wo) . (O, C) over O -> (N, Ho, Wo, C)
            dxpad[:, :, rows, cols] += numpy.tensordot(gy, w[:, :, i, j],
                                                       axes=([1], [0])).transpose(0, 3, 1, 2)
        return numpy.ascontiguousarray(dxpad[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + wd])

    def conv2d_grad_weight(self, x, gy, w_shape: tuple, stride: Pair, pad: Pair,
                           dilation: Pair):
        w_shape = tuple(w_shape)
        out_hw = check_conv2d_shapes(x.shape, w_shape, stride, pad, dilation)
        xpad = _padded(x, pad)
        dw = numpy.zeros(w_shape, dtype=numpy.result_type(x, gy))
        for i, j, rows, cols in _taps(w_shape[2:], stride, dilation, out_hw):
            # (N, O, Ho, Wo) . (N, C, Ho, Wo) over N, Ho, Wo -> (O, C)
            dw[:, :, i, j] = numpy.tensordot(gy, xpad[:, :, rows, cols],
                                             axes=([0, 2, 3], [0, 2, 3]))
        return dw

    def asnumpy(self, a) -> numpy.ndarray:
        return numpy.asarray(a)

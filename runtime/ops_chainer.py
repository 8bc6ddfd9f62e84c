"""Chainer's convolution behind convc's backend interface.

Chainer is an independent, long-tested implementation of the same
cross-correlation, so this backend is mainly a reference: the tests check
convc's own convolution against it, and `--conv chainer` lets a user rule
out convc's kernels when a model misbehaves. Arrays stay plain NumPy (or
CuPy) arrays; Chainer's functions are called on them without building a
computational graph.

The three functions map onto Chainer's as its own backward pass does:
the forward is `convolution_2d`, the input gradient is `deconvolution_2d`
(the transposed convolution, given the input size to resolve the ambiguity
of strides > 1), and the weight gradient is `Convolution2DGradW`, the node
Chainer's `convolution_2d` uses for its own weight gradient.

On the GPU Chainer uses cuDNN where it can, so unlike convc's CuPy backend
this one is not bit-for-bit deterministic there.
"""

from __future__ import annotations

import numpy

from convc.errors import BackendError
from convc.runtime._chainer_compat import import_chainer
from convc.runtime.backend import Backend, Capabilities, Pair, check_conv2d_shapes


class ChainerBackend(Backend):
    """NumPy (or, with gpu=True, CuPy) arrays with Chainer 7.8.1's convolution."""

    name = "chainer"
    capabilities = Capabilities(device="cpu", writes_out=False, shards=False,
                                deterministic=True, float64=True)

    def __init__(self, gpu: bool = False) -> None:
        chainer = import_chainer()
        # Imported only after import_chainer() has patched NumPy for Chainer.
        from chainer.functions.connection import convolution_2d

        self._chainer = chainer
        self._conv_module = convolution_2d
        self.gpu = gpu
        if gpu:
            from convc.runtime.ops_cupy import import_cupy

            self.xp = import_cupy()
            if not chainer.backends.cuda.available:
                raise BackendError("Chainer cannot use this CuPy installation; Chainer 7.8.1 "
                                   "was built for CuPy 7, so use --conv numpy on the GPU")
        else:
            self.xp = numpy

    def conv2d(self, x, w, stride: Pair, pad: Pair, dilation: Pair):
        check_conv2d_shapes(x.shape, w.shape, stride, pad, dilation)
        F = self._chainer.functions
        with self._chainer.no_backprop_mode():
            y = F.convolution_2d(x, w, stride=tuple(stride), pad=tuple(pad),
                                 dilate=tuple(dilation))
        return self.xp.ascontiguousarray(y.array)

    def conv2d_grad_input(self, gy, w, x_shape: tuple, stride: Pair, pad: Pair, dilation: Pair):
        check_conv2d_shapes(tuple(x_shape), w.shape, stride, pad, dilation)
        F = self._chainer.functions
        with self._chainer.no_backprop_mode():
            dx = F.deconvolution_2d(gy, w, stride=tuple(stride), pad=tuple(pad),
                                    outsize=tuple(x_shape[2:]), dilate=tuple(dilation))
        return self.xp.ascontiguousarray(dx.array)

    def conv2d_grad_weight(self, x, gy, w_shape: tuple, stride: Pair, pad: Pair,
                           dilation: Pair):
        check_conv2d_shapes(x.shape, tuple(w_shape), stride, pad, dilation)
        # Convolution2DGradW reads stride, pad and dilation off a forward node.
        forward = self._conv_module.Convolution2DFunction(
            stride=tuple(stride), pad=tuple(pad), dilate=tuple(dilation))
        grad_w = self._conv_module.Convolution2DGradW(forward, tuple(w_shape), x.dtype, None)
        with self._chainer.no_backprop_mode():
            dw, = grad_w.apply((x, gy))
        return self.xp.ascontiguousarray(dw.array)

    def asnumpy(self, a) -> numpy.ndarray:
        if self.gpu:
            return self.xp.asnumpy(a)
        return numpy.asarray(a)

    def asarray(self, a):
        return self.xp.asarray(a)


class ChainerGpuBackend(ChainerBackend):
    """Chainer's convolution on CuPy arrays: cuDNN picks its algorithms, some of which
    accumulate with atomics, so it is not declared deterministic."""

    capabilities = Capabilities(device="gpu", writes_out=False, shards=False,
                                deterministic=False, float64=True)

    def __init__(self) -> None:
        super().__init__(gpu=True)

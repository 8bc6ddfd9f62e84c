"""CuPy arrays on an NVIDIA GPU, with the same im2col + GEMM convolution as the CPU.

The math is not repeated here: the functions in ops_numpy.py take the array
module as a parameter, and this backend passes `cupy`. The GEMMs then run in
cuBLAS, and im2col/col2im become a few element-wise CuPy kernels.

cuDNN is deliberately not used. cuDNN picks its convolution algorithm per
shape, and several of its backward algorithms accumulate with atomics, so
two runs can differ in the last bits. A plain cuBLAS GEMM on one stream plus
col2im's fixed sequence of slice-adds gives the same bits on every run of the
same GPU, which is what convc's deterministic GPU mode relies on.

CuPy is imported when the backend is created, not when this file is
imported, so that `get_backend("gpu")` can turn a missing CuPy into a
BackendError that says what to install.
"""

from __future__ import annotations

import numpy

from convc.errors import BackendError
from convc.runtime import ops_numpy
from convc.runtime.backend import Backend, Pair


def import_cupy():
    """Import and return cupy, or raise BackendError saying how to install it."""
    try:
        import cupy
    except ImportError as exc:
        raise BackendError(
            "the GPU backend needs CuPy, which is not installed; install it with "
            "`pip install convc[gpu]` (CuPy for CUDA 12)"
        ) from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CuPy raises its own CUDARuntimeError without a driver.
        raise BackendError(f"CuPy is installed but cannot reach a GPU: {exc}") from exc
    if count == 0:
        raise BackendError("CuPy is installed but no GPU is visible")
    return cupy


class CupyBackend(Backend):
    """CuPy arrays on the current GPU with convc's im2col + cuBLAS GEMM convolution.

    Deterministic: no cuDNN, no atomics (see the module docstring).
    """

    name = "cupy"

    def __init__(self) -> None:
        self.xp = import_cupy()

    def conv2d(self, x, w, stride: Pair, pad: Pair, dilation: Pair):
        return ops_numpy.conv2d(self.xp, x, w, stride, pad, dilation)

    def conv2d_grad_input(self, gy, w, x_shape: tuple, stride: Pair, pad: Pair, dilation: Pair):
        return ops_numpy.conv2d_grad_input(self.xp, gy, w, x_shape, stride, pad, dilation)

    def conv2d_grad_weight(self, x, gy, w_shape: tuple, stride: Pair, pad: Pair,
                           dilation: Pair):
        return ops_numpy.conv2d_grad_weight(self.xp, x, gy, w_shape, stride, pad, dilation)

    def asnumpy(self, a) -> numpy.ndarray:
        return self.xp.asnumpy(a)

    def asarray(self, a):
        return self.xp.asarray(a)

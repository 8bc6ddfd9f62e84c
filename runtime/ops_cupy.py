"""CuPy arrays on an NVIDIA GPU, with the same im2col + GEMM convolution as the CPU.

The math is not repeated here: the functions in ops_numpy.py take the array
module as a parameter, and this backend passes `cupy`. The GEMMs then run in
cuBLAS, and im2col/col2im become a few element-wise CuPy kernels.

cuDNN is deliberately not used. cuDNN picks its convolution algorithm per
shape, and several of its backward algorithms accumulate with atomics, so
two runs can differ in the last bits. A plain cuBLAS GEMM on one stream plus
col2im's fixed sequence of slice-adds gives the same bits on every run of the
same GPU, which is what convc's deterministic GPU mode relies on.

Deterministic mode (`convc train --deterministic`, `train(deterministic=True)`)
removes the rest of CuPy's room for run-to-run differences:

- TF32 stays off: `CUPY_TF32=0` and `NVIDIA_TF32_OVERRIDE=0` in the
  environment, and the float32 GEMM compute type pinned to CuPy's default
  (plain FP32) in case CuPy had already chosen one. TF32 is not random, but it
  rounds float32 GEMM inputs to 10 mantissa bits, so results would depend on
  the GPU generation and on an environment variable.
- No accelerated reductions: `CUPY_ACCELERATORS=""` and, for a CuPy that is
  already imported, its elementwise, reduction and routine accelerator lists
  emptied. CuPy then reduces (sums for bias gradients, losses, the clipping
  norm) with its own kernels, whose summation tree depends only on the shape;
  CUB and cuTENSOR choose their decomposition per device and size.
- `CUBLAS_WORKSPACE_CONFIG=:4096:8`, cuBLAS's documented requirement for
  reproducible GEMMs when a handle is used from more than one stream.

What stays: results are reproducible on the same GPU model, driver, CUDA
and CuPy versions; not across them (cuBLAS picks GEMM kernels per
architecture and SM count). This path has been exercised with a NumPy-backed
stand-in for CuPy (tests/test_reliability.py), not yet on a GPU.

CuPy is imported when the backend is created, not when this file is
imported, so that `get_backend("gpu")` can turn a missing CuPy into a
BackendError that says what to install.
"""

from __future__ import annotations

import os

import numpy

from convc.errors import BackendError
from convc.runtime import ops_numpy
from convc.runtime.backend import Backend, Capabilities, Pair


# Read by CuPy and the CUDA libraries when they load or first need them, so they
# are set before `import cupy` where possible (runtime/train.py does).
DETERMINISTIC_ENVIRONMENT = {
    "CUPY_TF32": "0",
    "NVIDIA_TF32_OVERRIDE": "0",
    "CUPY_ACCELERATORS": "",
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}


def set_deterministic_environment(environ=None) -> dict[str, str | None]:
    """Put DETERMINISTIC_ENVIRONMENT into `environ` (default os.environ).

    Returns the previous values (None where unset), so a caller can undo it.
    """
    environ = os.environ if environ is None else environ
    previous = {key: environ.get(key) for key in sorted(DETERMINISTIC_ENVIRONMENT)}
    environ.update(DETERMINISTIC_ENVIRONMENT)
    return previous


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
    # the same im2col + GEMM code as the CPU, but called without out= and never sharded
    # (one stream); deterministic by construction (no cuDNN, no atomics)
    capabilities = Capabilities(device="gpu", writes_out=False, shards=False,
                                deterministic=True, float64=True,
                                weight_gradient_layout="channel-major")

    def __init__(self) -> None:
        self.xp = import_cupy()
        self.deterministic = False

    def conv2d(self, x, w, stride: Pair, pad: Pair, dilation: Pair):
        return ops_numpy.conv2d(self.xp, x, w, stride, pad, dilation)

    def conv2d_grad_input(self, gy, w, x_shape: tuple, stride: Pair, pad: Pair, dilation: Pair):
        return ops_numpy.conv2d_grad_input(self.xp, gy, w, x_shape, stride, pad, dilation)

    def conv2d_grad_weight(self, x, gy, w_shape: tuple, stride: Pair, pad: Pair,
                           dilation: Pair):
        return ops_numpy.conv2d_grad_weight(self.xp, x, gy, w_shape, stride, pad, dilation)

    def make_deterministic(self) -> list[str]:
        """Apply deterministic mode to the imported CuPy; returns warnings (usually none).

        The environment variables are set again here for the libraries that
        read them lazily (cuBLAS reads CUBLAS_WORKSPACE_CONFIG when its
        handle is made, on the first GEMM), and CuPy's own switches are set
        through its API because CuPy read CUPY_ACCELERATORS at import.
        """
        set_deterministic_environment()
        warnings: list[str] = []
        core = getattr(self.xp, "_core", None)
        for name in ("set_elementwise_accelerators", "set_reduction_accelerators",
                     "set_routine_accelerators"):
            setter = getattr(core, name, None)
            if setter is None:
                warnings.append(f"this CuPy has no cupy._core.{name}; accelerated "
                                f"reductions stay as CUPY_ACCELERATORS set them at import")
                continue
            setter([])
        linalg = getattr(core, "_routines_linalg", None)
        set_compute_type = getattr(linalg, "set_compute_type", None)
        default = getattr(linalg, "COMPUTE_TYPE_DEFAULT", None)
        if set_compute_type is None or default is None:
            warnings.append("this CuPy does not expose its GEMM compute type; TF32 is off "
                            "only through CUPY_TF32=0")
        else:
            set_compute_type(numpy.float32, default)  # complex64 shares the setting
        self.deterministic = True
        return warnings

    def asnumpy(self, a) -> numpy.ndarray:
        return self.xp.asnumpy(a)

    def asarray(self, a):
        return self.xp.asarray(a)

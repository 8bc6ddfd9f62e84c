"""The small interface every convolution backend implements, and how to pick one.

Generated code sees exactly one object, a `Backend`: its array module `xp`
(numpy or cupy) for elementwise work, and three convolution functions for the
only op that is too slow to write with `xp` alone. The forward convolution and
its two vector-Jacobian products are separate functions, one per operand,
because the compiler's gradient rule for conv is bilinear: the rule for the
input and the rule for the weight are emitted independently, and often only
one of them is needed (a frozen weight, an input that is data).

Each backend lives in its own `ops_*.py` file and imports its optional
dependency (CuPy, Chainer) only there, so `import convc` never needs them.
"""

from __future__ import annotations

from typing import Any

from convc.errors import BackendError

Pair = tuple[int, int]

DEVICES = ("cpu", "gpu")
CONV_IMPLEMENTATIONS = ("numpy", "chainer")


def conv2d_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """Length of one spatial axis of a convolution's output.

    This is the floor rule of PyTorch and Chainer (Chainer's `cover_all=False`):
    input positions past the last full window are ignored, not padded further.
    """
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def check_conv2d_shapes(x_shape: tuple, w_shape: tuple, stride: Pair, pad: Pair,
                        dilation: Pair) -> tuple[int, int]:
    """Validate the shapes of one convolution and return its output (Ho, Wo).

    The compiler checks shapes before it emits code, so a failure here means a
    bug in convc or a hand-written call; a ValueError with the shapes in it is
    more useful then than a broadcasting error from deep inside a GEMM.
    """
    if len(x_shape) != 4 or len(w_shape) != 4:
        raise ValueError(f"conv2d expects 4-D input and weight, got input {tuple(x_shape)} "
                         f"and weight {tuple(w_shape)}")
    if x_shape[1] != w_shape[1]:
        raise ValueError(f"conv2d input has {x_shape[1]} channels but the weight "
                         f"{tuple(w_shape)} expects {w_shape[1]}")
    if min(stride) < 1 or min(dilation) < 1 or min(pad) < 0:
        raise ValueError(f"conv2d needs stride >= 1, dilation >= 1 and pad >= 0, got "
                         f"stride={stride}, dilation={dilation}, pad={pad}")
    ho = conv2d_output_size(x_shape[2], w_shape[2], stride[0], pad[0], dilation[0])
    wo = conv2d_output_size(x_shape[3], w_shape[3], stride[1], pad[1], dilation[1])
    if ho < 1 or wo < 1:
        raise ValueError(f"conv2d of input {tuple(x_shape)} with weight {tuple(w_shape)}, "
                         f"stride={stride}, pad={pad}, dilation={dilation} has an empty "
                         f"output ({ho}, {wo})")
    return ho, wo


class Backend:
    """An array module plus a 2-D convolution and its two gradients.

    Conventions shared by every backend:

    - `x` is (N, C, H, W), the weight `w` is (O, C, kh, kw), the output is
      (N, O, Ho, Wo). There is no bias: the compiler emits bias as an add.
    - The convolution is a cross-correlation (the kernel is not flipped), as
      in PyTorch and Chainer, so weights can be compared with theirs directly.
    - `pad=(ph, pw)` adds ph zero rows above and below and pw zero columns
      left and right. `stride` and `dilation` are (vertical, horizontal).
      Ho = (H + 2*ph - dh*(kh-1) - 1) // sh + 1, and likewise for Wo.
    - Results have the dtype of the inputs: float32 stays float32.
    - Results are fresh arrays; the caller may write into them.
    """

    name: str = "base"
    xp: Any = None

    def conv2d(self, x, w, stride: Pair, pad: Pair, dilation: Pair):
        """y[n, o] = sum over c, i, j of w[o, c, i, j] * xpad[n, c, sh*p + dh*i, sw*q + dw*j]."""
        raise NotImplementedError

    def conv2d_grad_input(self, gy, w, x_shape: tuple, stride: Pair, pad: Pair, dilation: Pair):
        """The VJP of conv2d with respect to x: returns dx of shape `x_shape`.

        `x_shape` is needed because with a stride > 1 several input sizes give
        the same output size; the rows and columns no window reached get zero.
        """
        raise NotImplementedError

    def conv2d_grad_weight(self, x, gy, w_shape: tuple, stride: Pair, pad: Pair,
                           dilation: Pair):
        """The VJP of conv2d with respect to w: returns dw of shape `w_shape`."""
        raise NotImplementedError

    def asnumpy(self, a):
        """Copy an array to host memory as a numpy array (a no-op on the CPU)."""
        raise NotImplementedError

    def asarray(self, a):
        """Move a host array (or anything array-like) onto this backend's device."""
        return self.xp.asarray(a)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def get_backend(device: str = "cpu", conv: str = "numpy") -> Backend:
    """Return the backend for a device and a convolution implementation.

    device: "cpu" (NumPy arrays) or "gpu" (CuPy arrays).
    conv: "numpy" for convc's own im2col + GEMM convolution (on the GPU the
    same code runs on CuPy), or "chainer" to delegate the three convolution
    functions to Chainer, which is useful as an independent reference.

    Raises BackendError for an unknown name or a missing optional package.
    """
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if conv not in CONV_IMPLEMENTATIONS:
        raise BackendError(f"unknown convolution implementation {conv!r}; choose one of "
                           f"{', '.join(CONV_IMPLEMENTATIONS)}")

    # Imported here, not at the top, so that an optional backend's file is
    # only loaded when it is asked for.
    if conv == "chainer":
        from convc.runtime.ops_chainer import ChainerBackend

        return ChainerBackend(gpu=(device == "gpu"))
    if device == "gpu":
        from convc.runtime.ops_cupy import CupyBackend

        return CupyBackend()
    from convc.runtime.ops_numpy import NumpyBackend

    return NumpyBackend()

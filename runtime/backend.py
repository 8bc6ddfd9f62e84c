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

A backend also declares what it can do, a `Capabilities` value (`out=`
writes, batch shards in threads, device, determinism, float64, the layout
its weight gradient reads without a copy); the runtime reads those instead
of testing which backend it has. Backends are found by name in a registry
(`register_backend`, `get_backend`, `available_backends`): the built-in ones
are the `register_backend` lines at the end of this file, and adding one is
a file with its class plus one such line (docs/compiler.md, "Adding a
backend"; runtime/backend_reference.py is the small worked example).
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import inspect
from typing import Any, Callable, Union

from convc.errors import BackendError

Pair = tuple[int, int]

DEVICES = ("cpu", "gpu")


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



# ---------------------------------------------------------------- what a backend can do

WEIGHT_GRADIENT_LAYOUTS = (None, "channel-major")


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend declares it can do; the runtime reads this, never the class.

    The defaults are the safe ones, so a new backend that declares nothing is
    called in the plainest way: fresh results copied into place, one thread.

    device: "cpu" or "gpu", where its arrays live.
    writes_out: conv2d and conv2d_grad_input take `out=` and write the result
      into that array (which may be a strided view of a larger buffer);
      without it kernels.conv2d copies a fresh result in.
    shards: kernels.in_shards may cut a batch into shards that run at once in
      threads, each on a `spawn()`ed backend, with the BLAS libraries held to
      one thread meanwhile. Only for a backend whose work releases the GIL
      and whose `spawn()` gives an independent copy.
    deterministic: the same operands give the same bits on every run on the
      same machine and library versions (no atomics, no per-run algorithm
      choice); deterministic GPU training requires it.
    float64: it computes in float64 as well as float32 (results always have
      the inputs' dtype).
    weight_gradient_layout: the layout of the output gradient gy (N, O, Ho, Wo)
      its conv2d_grad_weight reads without a copy: "channel-major" when gy's
      memory is (O, N, Ho, Wo) (what generated code keeps today), None when
      it has no preference.
    """

    device: str = "cpu"
    writes_out: bool = False
    shards: bool = False
    deterministic: bool = True
    float64: bool = True
    weight_gradient_layout: str | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"Capabilities.device is {self.device!r}; choose one of "
                             f"{', '.join(DEVICES)}")
        if self.weight_gradient_layout not in WEIGHT_GRADIENT_LAYOUTS:
            raise ValueError(f"Capabilities.weight_gradient_layout is "
                             f"{self.weight_gradient_layout!r}; choose one of "
                             f"{', '.join(map(repr, WEIGHT_GRADIENT_LAYOUTS))}")


# ---------------------------------------------------------------- the protocol

class Backend(abc.ABC):
    """An array module plus a 2-D convolution and its two gradients.

    Every backend provides: `name`, `xp` (the array module: numpy, or a module
    with its interface such as cupy), `capabilities` (a `Capabilities`), the
    three convolution functions below, `asnumpy` and `asarray`. conv2d and
    conv2d_grad_input take an `out=` keyword exactly when `capabilities.writes_out`
    says so; `spawn()` is needed only with `capabilities.shards`.

    Conventions shared by every backend:

    - `x` is (N, C, H, W), the weight `w` is (O, C, kh, kw), the output is
      (N, O, Ho, Wo). There is no bias: the compiler emits bias as an add.
    - The convolution is a cross-correlation (the kernel is not flipped), as
      in PyTorch and Chainer, so weights can be compared with theirs directly.
    - `pad=(ph, pw)` adds ph zero rows above and below and pw zero columns
      left and right. `stride` and `dilation` are (vertical, horizontal).
      Ho = (H + 2*ph - dh*(kh-1) - 1) // sh + 1, and likewise for Wo.
    - Results have the dtype of the inputs: float32 stays float32 (and
      float64 stays float64 where `capabilities.float64`).
    - Results are fresh arrays (or `out`); the caller may write into them.
    - Operands may be strided views (gy is often a transposed, channel-major
      array); a backend that needs contiguous memory copies.
    """

    name: str = "base"
    xp: Any = None
    capabilities: Capabilities = Capabilities()

    @abc.abstractmethod
    def conv2d(self, x, w, stride: Pair, pad: Pair, dilation: Pair):
        """y[n, o] = sum over c, i, j of w[o, c, i, j] * xpad[n, c, sh*p + dh*i, sw*q + dw*j]."""

    @abc.abstractmethod
    def conv2d_grad_input(self, gy, w, x_shape: tuple, stride: Pair, pad: Pair, dilation: Pair):
        """The VJP of conv2d with respect to x: returns dx of shape `x_shape`.

        `x_shape` is needed because with a stride > 1 several input sizes give
        the same output size; the rows and columns no window reached get zero.
        """

    @abc.abstractmethod
    def conv2d_grad_weight(self, x, gy, w_shape: tuple, stride: Pair, pad: Pair,
                           dilation: Pair):
        """The VJP of conv2d with respect to w: returns dw of shape `w_shape`."""

    @abc.abstractmethod
    def asnumpy(self, a):
        """Copy an array to host memory as a numpy array (a no-op on the CPU)."""

    def asarray(self, a):
        """Move a host array (or anything array-like) onto this backend's device."""
        return self.xp.asarray(a)

    def spawn(self) -> "Backend":
        """Another backend like this one, with its own work arrays, for another thread
        of a sharded step (used only when `capabilities.shards`)."""
        raise BackendError(f"backend {self.name!r} cannot run batch shards "
                           f"(its capabilities say shards={self.capabilities.shards})")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


REQUIRED_METHODS = ("conv2d", "conv2d_grad_input", "conv2d_grad_weight", "asnumpy", "asarray")


def protocol_problems(backend) -> list[str]:
    """What a backend class (or instance) lacks of the protocol; [] when it has it all.

    A class is checked for its methods, its `capabilities` and, when it
    declares `writes_out`, conv2d's and conv2d_grad_input's `out=`; an
    instance also for its `xp` (often set in __init__).
    """
    cls = backend if isinstance(backend, type) else type(backend)
    problems = []
    abstract = getattr(cls, "__abstractmethods__", frozenset())
    for name in REQUIRED_METHODS:
        if not callable(getattr(cls, name, None)) or name in abstract:
            problems.append(f"it has no method {name}()")
    caps = getattr(backend, "capabilities", None)
    if not isinstance(caps, Capabilities):
        problems.append(f"its `capabilities` is {caps!r}, not a Capabilities")
    elif caps.writes_out:
        for name in ("conv2d", "conv2d_grad_input"):
            fn = getattr(cls, name, None)
            if callable(fn) and "out" not in inspect.signature(fn).parameters:
                problems.append(f"it declares writes_out but {name}() takes no out=")
    if caps is not None and getattr(caps, "shards", False) and \
            getattr(cls, "spawn", Backend.spawn) is Backend.spawn:
        problems.append("it declares shards but has no method spawn()")
    if not isinstance(backend, type) and getattr(backend, "xp", None) is None:
        problems.append("it has no array module `xp`")
    return problems


def check_backend(backend, name: str | None = None):
    """Raise BackendError naming what `backend` (class or instance) lacks; else return it."""
    problems = protocol_problems(backend)
    if problems:
        what = name or getattr(backend, "__name__", None) or type(backend).__name__
        raise BackendError(f"backend {what!r} does not implement the backend protocol "
                           f"(runtime/backend.py): " + "; ".join(problems))
    return backend


# ---------------------------------------------------------------- the registry

# A factory makes a backend with no arguments: a class, any callable, or
# "module:attribute", imported only when the backend is first asked for (so that
# registering CuPy's backend does not import CuPy, or even its file).
Factory = Union[str, Callable[[], Backend]]

_REGISTRY: dict[tuple[str, str], Factory] = {}


def register_backend(name: str, factory: Factory, device: str = "cpu") -> None:
    """Make `get_backend(device, name)` return `factory()`.

    A class is checked against the protocol now (BackendError naming what is
    missing); a "module:attribute" factory when it is first imported; what any
    factory returns, when it is made. Registering a name again replaces it.
    """
    if device not in DEVICES:
        raise BackendError(f"cannot register backend {name!r} on device {device!r}; "
                           f"choose one of {', '.join(DEVICES)}")
    if not isinstance(name, str) or not name.isidentifier():
        raise BackendError(f"a backend name must be an identifier, got {name!r}")
    if isinstance(factory, type):
        check_backend(factory, name)
    elif not isinstance(factory, str) and not callable(factory):
        raise BackendError(f"backend {name!r}: the factory {factory!r} is neither callable "
                           f"nor 'module:attribute'")
    _REGISTRY[(device, name)] = factory


def unregister_backend(name: str, device: str = "cpu") -> None:
    """Remove a registered backend (tests register throwaway ones)."""
    _REGISTRY.pop((device, name), None)


def backend_names(device: str | None = None) -> list[str]:
    """The registered convolution names (on one device, or on any), sorted."""
    return sorted({n for d, n in _REGISTRY if device is None or d == device})


def _resolve(device: str, conv: str) -> Callable[[], Backend]:
    """The factory registered for (device, conv), imported if it is a string."""
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    factory = _REGISTRY.get((device, conv))
    if factory is None:
        names = backend_names(device)
        elsewhere = [d for d in DEVICES if (d, conv) in _REGISTRY]
        hint = f" (it runs on {', '.join(elsewhere)})" if elsewhere else ""
        raise BackendError(f"unknown convolution implementation {conv!r} on {device}{hint}; "
                           f"choose one of {', '.join(names) or '(none registered)'}")
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, type):
            check_backend(obj, conv)
        factory = _REGISTRY[(device, conv)] = obj
    return factory


def declared_capabilities(device: str = "cpu", conv: str = "numpy") -> Capabilities:
    """A registered backend's capabilities, without making one where its factory is a
    class (so without importing CuPy or Chainer)."""
    factory = _resolve(device, conv)
    if isinstance(factory, type):
        return factory.capabilities
    return get_backend(device, conv).capabilities


def get_backend(device: str = "cpu", conv: str = "numpy") -> Backend:
    """Return the backend registered for a device and a convolution implementation.

    device: "cpu" (NumPy arrays) or "gpu" (CuPy arrays).
    conv: "numpy" for convc's own im2col + GEMM convolution (on the GPU the
    same code runs on CuPy), "chainer" to delegate the three convolution
    functions to Chainer, "reference" for the direct definition in plain
    NumPy (slow; a check of the others), or any name registered since.

    Raises BackendError for an unknown name (naming the registered ones), a
    missing optional package, or a factory whose backend breaks the protocol.
    """
    backend = _resolve(device, conv)()
    check_backend(backend, conv)
    if backend.capabilities.device != device:
        raise BackendError(f"backend {conv!r} registered for {device} declares device "
                           f"{backend.capabilities.device!r}")
    return backend


@dataclasses.dataclass(frozen=True)
class Availability:
    """One registered backend and whether it can be made here (`reason` says why not)."""

    device: str
    conv: str
    available: bool
    reason: str | None = None


def available_backends() -> list[Availability]:
    """Every registered backend, tried: made where it can be, else the reason it cannot
    (CuPy or Chainer not installed, no GPU visible)."""
    found = []
    for device, conv in sorted(_REGISTRY):
        try:
            get_backend(device, conv)
        except BackendError as exc:
            found.append(Availability(device, conv, False, str(exc)))
        else:
            found.append(Availability(device, conv, True))
    return found


# ---------------------------------------------------------------- the built-in backends
# One line each: name, where its class lives (imported when first asked for), device.
register_backend("numpy", "convc.runtime.ops_numpy:NumpyBackend")
register_backend("numpy", "convc.runtime.ops_cupy:CupyBackend", device="gpu")
register_backend("chainer", "convc.runtime.ops_chainer:ChainerBackend")
register_backend("chainer", "convc.runtime.ops_chainer:ChainerGpuBackend", device="gpu")
register_backend("reference", "convc.runtime.backend_reference:ReferenceBackend")
register_backend("onednn", "convc.runtime.ops_onednn:OnednnBackend")

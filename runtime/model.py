"""What every generated module shares: the default backend and parameter initialisation.

Kept here, not in the generated code, so that a compiled module stays short
and every model initialises its parameters the same, documented way.
"""
from __future__ import annotations

import numpy as np

from .backend import Backend, get_backend

_DEFAULT: Backend | None = None


def default_backend() -> Backend:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = get_backend("cpu", "numpy")
    return _DEFAULT


def _fans(shape: tuple) -> tuple[int, int]:
    if len(shape) == 4:  # conv kernel (out, in, kh, kw)
        rf = shape[2] * shape[3]
        return shape[1] * rf, shape[0] * rf
    return shape[0], shape[0]


def init_value(spec: dict, rng: np.random.Generator) -> np.ndarray:
    """One parameter from its spec (shape, kind, init), in float64.

    glorot: uniform(-a, a) with a = sqrt(6 / (fan_in + fan_out)), fan counted
    over the kernel window (Glorot and Bengio 2010; PyTorch and Keras agree).
    A number: that constant. uniform(a) / normal(std): as named.
    """
    shape = tuple(spec["shape"])
    init = spec.get("init")
    if init is None:
        init = "glorot" if spec["kind"] == "kernel" else 0.0
    if isinstance(init, (list, tuple)):
        kind, arg = init
        if kind == "uniform":
            return rng.uniform(-arg, arg, shape)
        return rng.normal(0.0, arg, shape)
    if init == "glorot":
        fan_in, fan_out = _fans(shape)
        a = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-a, a, shape)
    if init == "zeros":
        return np.zeros(shape)
    if init == "ones":
        return np.ones(shape)
    return np.full(shape, float(init))


def init_params(specs: dict, seed: int = 0, dtype="float32", backend: Backend | None = None
                ) -> dict:
    """Every parameter, drawn in sorted-name order from one seeded generator."""
    rng = np.random.default_rng(seed)
    B = backend or default_backend()
    out = {}
    for name in sorted(specs):
        value = init_value(specs[name], rng).astype(dtype)
        out[name] = B.asarray(value) if B.xp is not np else value
    return out


def not_compiled(function: str, model: dict) -> Exception:
    """The error a generated module raises for an entry point it was compiled without."""
    from convc.errors import ConvcError

    return ConvcError(f"{model['name']}: {function}() was not compiled into this module; "
                      f"compile it with {function}=True (convc.load(path, {function}=True), "
                      f"`convc compile --{function}`)")


def no_loss(function: str, model: dict) -> Exception:
    """The error a generated module without a loss raises for loss() and loss_and_grad()."""
    from convc.errors import ConvcError

    return ConvcError(f"{model['name']}: the model has no loss, so it has no {function}(); "
                      "add a `loss` statement to train it with convc, or train it inside "
                      "another framework through vjp() (convc.load(path, vjp=True))")

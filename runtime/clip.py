"""Gradient clipping.

Recurrent nets trained by BPTT now and then produce a gradient that is far
larger than usual (the "exploding gradient"). Clipping limits the size of
that one step. What people almost always mean by "clip the gradient to N" is
*global-norm* clipping: treat all gradients together as one long vector and,
if its length is above N, shrink the whole vector to length N. That keeps the
direction of the step and only shortens it.

All functions work on ``dict[str, array]`` (NumPy or CuPy), modify the arrays
in place, and walk the dict in sorted-key order so the result is bitwise
reproducible.
"""

from __future__ import annotations

import math
from typing import Any

from convc.errors import ConvcError
from convc.runtime.optim import array_module

ArrayDict = dict[str, Any]

CLIP_METHODS = (None, "global_norm", "value", "per_tensor_norm")


def _check_limit(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConvcError(f"{name} must be a number, got {value!r}") from None
    if not value > 0.0 or math.isinf(value):
        raise ConvcError(f"{name} must be a positive finite number, got {value}")
    return value


def _sum_of_squares(g: Any) -> float:
    """Sum of squares of one tensor, computed in float64.

    float32 gradients of a large model can have a sum of squares that loses
    most of its digits (or overflows) in float32, so every tensor is widened
    first. NumPy's pairwise summation gives the same bits on every run.
    """
    xp = array_module(g)
    wide = g.astype(xp.float64, copy=False)
    return float(xp.sum(wide * wide))


def global_norm(grads: ArrayDict) -> float:
    """The L2 norm of all gradients taken together as one vector.

    The per-tensor sums are added in sorted-name order in a Python float
    (float64). Returns inf or nan if any gradient is not finite.
    """
    total = 0.0
    for name in sorted(grads):
        total += _sum_of_squares(grads[name])
    return math.sqrt(total)


def clip_by_global_norm(grads: ArrayDict, max_norm: float) -> tuple[ArrayDict, float]:
    """Scale all gradients by one factor so their global norm is at most ``max_norm``.

    When the norm is above the limit every tensor is multiplied in place by
    ``max_norm / norm``: the direction is unchanged and the new global norm
    is ``max_norm`` (up to rounding). Returns the gradients and the norm
    *before* clipping, which is what is worth logging.

    A non-finite norm leaves the gradients untouched: scaling by
    ``max_norm / inf`` would quietly zero the step and hide the problem that
    the trainer's NaN/Inf check should report.
    """
    max_norm = _check_limit("max_norm", max_norm)
    norm = global_norm(grads)
    if math.isfinite(norm) and norm > max_norm:
        scale = max_norm / norm
        for name in sorted(grads):
            grads[name] *= scale
    return grads, norm


def clip_by_value(grads: ArrayDict, limit: float) -> ArrayDict:
    """Clamp every gradient element into ``[-limit, limit]``, in place.

    This changes the direction of the step whenever some elements are
    clamped and others are not; it is here because some published recipes
    use it.
    """
    limit = _check_limit("limit", limit)
    for name in sorted(grads):
        g = grads[name]
        array_module(g).clip(g, -limit, limit, out=g)
    return grads


def clip_per_tensor_norm(grads: ArrayDict, max_norm: float) -> ArrayDict:
    """Scale each gradient tensor on its own so that its norm is at most ``max_norm``.

    Usually not what you want. Each tensor gets its own factor, so a tensor
    with a large gradient is shrunk while a small one is not; the combined
    step then points in a different direction from the true gradient, not
    just a shorter one. The hand-written ConvLSTM that convc grew out of
    clipped this way by accident, which biased training towards whichever
    weights happened to have small gradients. Use ``clip_by_global_norm``
    unless you have asked for this behaviour by name.
    """
    max_norm = _check_limit("max_norm", max_norm)
    for name in sorted(grads):
        g = grads[name]
        norm = math.sqrt(_sum_of_squares(g))
        if math.isfinite(norm) and norm > max_norm:
            g *= max_norm / norm
    return grads


def clip_grads(grads: ArrayDict, method: str | None, value: float | None = None
               ) -> tuple[ArrayDict, float]:
    """Clip with the method named in the config; return the grads and their global norm.

    The returned norm is always the global norm *before* clipping, whatever
    the method, so the trainer can log it and check it for NaN/Inf the same
    way every time. ``method=None`` only measures.
    """
    if method not in CLIP_METHODS:
        raise ConvcError(
            f"unknown gradient clipping method {method!r}; valid methods are {list(CLIP_METHODS)}")
    if method is None:
        return grads, global_norm(grads)
    if value is None:
        raise ConvcError(f"gradient clipping {method!r} needs a limit value")
    if method == "global_norm":
        return clip_by_global_norm(grads, value)
    norm = global_norm(grads)
    if method == "value":
        clip_by_value(grads, value)
    else:
        clip_per_tensor_norm(grads, value)
    return grads, norm

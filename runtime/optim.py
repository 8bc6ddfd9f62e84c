"""Optimizers and learning-rate schedules for training compiled models.

Parameters and gradients are plain ``dict[str, array]`` where an array is a
NumPy or a CuPy array. An optimizer updates the parameter arrays in place, so
the compiled model, which holds references to those same arrays, sees the new
values without any copying back.

Three rules keep training bitwise reproducible and resumable:

* Every loop over a dict runs in sorted-key order, so the sequence of floating
  point operations never depends on insertion order.
* All optimizer state (moment buffers, step count) comes out of
  ``state_dict()`` as flat NumPy arrays with names like ``"m/enc.W"``, ready to
  be written into a checkpoint; ``load_state_dict`` puts it back so that the
  continued run performs exactly the updates it would have performed without
  the interruption.
* The update formulas are the ones PyTorch's ``torch.optim`` uses (including
  where each rounding happens as far as NumPy allows), so results can be
  compared against PyTorch in float64.

Hyperparameters (lr, betas, ...) are configuration, not state: they are not
stored in ``state_dict``. A resumed run takes them from its configuration and
its schedule, so changing them on resume does what the user asked.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from convc.errors import ConvcError

Array = Any  # numpy.ndarray or cupy.ndarray
ArrayDict = dict[str, Array]


@functools.cache
def _cupy_or_none() -> Any:
    """Import CuPy once if it is installed.

    Imported here, not at module top, so the NumPy-only install never needs
    it; cached because a failed import is not remembered by Python and would
    search sys.path again for every parameter on every step.
    """
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def array_module(x: Array) -> Any:
    """Return ``cupy`` for a CuPy array and ``numpy`` for anything else."""
    if isinstance(x, np.ndarray):
        return np
    cupy = _cupy_or_none()
    if cupy is None:
        return np
    return cupy.get_array_module(x)


def to_numpy(x: Array) -> np.ndarray:
    """Copy an array to host memory as a NumPy array (a copy even for NumPy input).

    The copy matters: a state dict must not alias buffers that the next
    ``step`` updates in place.
    """
    xp = array_module(x)
    if xp is np:
        return np.array(x, copy=True)
    return xp.asnumpy(x)


def _check_hyper(name: str, value: float, low: float, high: float = math.inf,
                 low_inclusive: bool = True, high_inclusive: bool = False) -> float:
    """Validate one hyperparameter and return it as a float.

    A bad value is a user mistake in a config file, so it is a ConvcError
    naming the option, not a bare ValueError from deep inside numpy.
    """
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConvcError(f"{name} must be a number, got {value!r}") from None
    above = value >= low if low_inclusive else value > low
    below = value <= high if high_inclusive else value < high
    if not (above and below) or math.isnan(value):
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        raise ConvcError(f"{name} must be in {left}{low}, {high}{right}, got {value}")
    return value


def _check_same_names(params: ArrayDict, grads: ArrayDict) -> None:
    """Require one gradient per parameter.

    A missing gradient would silently freeze a parameter, and with a shared
    step count Adam's bias correction would then be wrong for it when it
    resumes; an extra gradient usually means two models were mixed up.
    """
    if params.keys() != grads.keys():
        missing = sorted(set(params) - set(grads))
        extra = sorted(set(grads) - set(params))
        parts = []
        if missing:
            parts.append(f"no gradient for {missing}")
        if extra:
            parts.append(f"gradient for unknown parameters {extra}")
        raise ConvcError("optimizer step: " + "; ".join(parts))


class Optimizer:
    """Base class: bookkeeping for per-parameter state buffers ("slots").

    Subclasses list their slot names in ``slot_names`` and implement
    ``_update(name, p, g)`` for one parameter. The base class owns the step
    count ``t``, the sorted iteration order, state (de)serialisation and
    moving loaded NumPy state onto the device the parameters live on.
    """

    slot_names: tuple[str, ...] = ()

    def __init__(self, lr: float) -> None:
        # lr is a plain attribute: schedules assign to it before every step.
        self.lr = _check_hyper("lr", lr, 0.0)
        self.t = 0
        self.slots: dict[str, ArrayDict] = {slot: {} for slot in self.slot_names}
        # One work buffer per parameter, so the hot path does not allocate a
        # fresh temporary for every intermediate. Not part of the state.
        self._scratch: ArrayDict = {}

    def step(self, params: ArrayDict, grads: ArrayDict) -> None:
        """Apply one update to every parameter, in place. ``grads`` is not modified."""
        _check_same_names(params, grads)
        self.t += 1
        for name in sorted(params):
            self._update(name, params[name], grads[name])

    def _update(self, name: str, p: Array, g: Array) -> None:
        raise NotImplementedError

    # -- slots and scratch -------------------------------------------------

    def _slot(self, slot: str, name: str, like: Array) -> Array | None:
        """Return the state buffer ``slot/name`` on ``like``'s device, or None if absent.

        State loaded from a checkpoint arrives as NumPy arrays; the first step
        moves it to wherever the parameter lives (e.g. a CuPy array).
        """
        buf = self.slots[slot].get(name)
        if buf is None:
            return None
        if buf.shape != like.shape:
            raise ConvcError(
                f"optimizer state {slot}/{name} has shape {buf.shape}, "
                f"but the parameter has shape {like.shape}")
        xp = array_module(like)
        if array_module(buf) is not xp or buf.dtype != like.dtype:
            buf = xp.asarray(buf, dtype=like.dtype)
            self.slots[slot][name] = buf
        return buf

    def _zeros_slot(self, slot: str, name: str, like: Array) -> Array:
        """Return the state buffer, creating it as zeros on first use."""
        buf = self._slot(slot, name, like)
        if buf is None:
            buf = array_module(like).zeros_like(like)
            self.slots[slot][name] = buf
        return buf

    def _work(self, name: str, like: Array) -> Array:
        """Return a reusable work buffer with ``like``'s shape, dtype and device."""
        buf = self._scratch.get(name)
        xp = array_module(like)
        if (buf is None or buf.shape != like.shape or buf.dtype != like.dtype
                or array_module(buf) is not xp):
            buf = xp.empty_like(like)
            self._scratch[name] = buf
        return buf

    def _with_weight_decay(self, p: Array, g: Array, weight_decay: float) -> Array:
        """Return ``g + weight_decay * p`` (coupled L2, as in torch.optim) or ``g`` itself.

        A new array is made so the caller's gradient stays untouched.
        """
        if weight_decay == 0.0:
            return g
        decayed = p * weight_decay
        decayed += g
        return decayed

    # -- state ---------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat NumPy copy of the state: ``"t"`` and ``"<slot>/<param name>"`` entries."""
        state = {"t": np.array(self.t, dtype=np.int64)}
        for slot in self.slot_names:
            for name in sorted(self.slots[slot]):
                state[f"{slot}/{name}"] = to_numpy(self.slots[slot][name])
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the state with a copy of ``state`` (as made by ``state_dict``).

        Unknown entries are an error rather than ignored: they mean the state
        was saved by a different optimizer, and continuing would silently
        restart its moments from zero.
        """
        if "t" not in state:
            raise ConvcError(f"{type(self).__name__} state has no step count 't'")
        slots: dict[str, ArrayDict] = {slot: {} for slot in self.slot_names}
        for key in sorted(state):
            if key == "t":
                continue
            slot, sep, name = key.partition("/")
            if not sep or slot not in slots:
                raise ConvcError(
                    f"{type(self).__name__} state has unexpected entry {key!r} "
                    f"(expected 't' and {list(self.slot_names)} slots); "
                    "was it saved by a different optimizer?")
            slots[slot][name] = to_numpy(state[key])
        self.t = int(np.asarray(state["t"]))
        self.slots = slots
        self._scratch = {}


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, as torch.optim.SGD (dampening 0).

    With ``d = g + weight_decay * p``::

        momentum == 0:  p <- p - lr * d
        otherwise:      b <- d                      on the first step
                        b <- momentum * b + d       afterwards
                        p <- p - lr * b                         (heavy ball)
                        p <- p - lr * (d + momentum * b)        (nesterov)

    The first-step ``b <- d`` (instead of starting from zero) is PyTorch's
    choice; following it makes runs comparable with PyTorch ones.
    """

    slot_names = ("momentum",)

    def __init__(self, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        super().__init__(lr)
        self.momentum = _check_hyper("momentum", momentum, 0.0, 1.0)
        self.nesterov = bool(nesterov)
        self.weight_decay = _check_hyper("weight_decay", weight_decay, 0.0)
        if self.nesterov and self.momentum == 0.0:
            raise ConvcError("nesterov SGD needs momentum > 0")

    def _update(self, name: str, p: Array, g: Array) -> None:
        xp = array_module(p)
        d = self._with_weight_decay(p, g, self.weight_decay)
        work = self._work(name, p)
        if self.momentum == 0.0:
            xp.multiply(d, self.lr, out=work)
            p -= work
            return
        b = self._slot("momentum", name, p)
        if b is None:
            b = xp.array(d, dtype=p.dtype, copy=True)
            self.slots["momentum"][name] = b
        else:
            b *= self.momentum
            b += d
        if self.nesterov:
            xp.multiply(b, self.momentum, out=work)
            work += d
            work *= self.lr
        else:
            xp.multiply(b, self.lr, out=work)
        p -= work


class Adam(Optimizer):
    """Adam with bias correction, as torch.optim.Adam (amsgrad off).

    With ``d = g + weight_decay * p`` (coupled L2, not AdamW) and step count t::

        m <- beta1 * m + (1 - beta1) * d
        v <- beta2 * v + (1 - beta2) * d * d
        p <- p - (lr / (1 - beta1**t)) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    ``m`` and ``v`` start at zero; the bias corrections undo that start for
    the first steps. eps is added after the correction, as PyTorch does.
    """

    slot_names = ("m", "v")

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(lr)
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise ConvcError(f"betas must be a pair of numbers, got {betas!r}") from None
        self.betas = (_check_hyper("betas[0]", beta1, 0.0, 1.0),
                      _check_hyper("betas[1]", beta2, 0.0, 1.0))
        self.eps = _check_hyper("eps", eps, 0.0)
        self.weight_decay = _check_hyper("weight_decay", weight_decay, 0.0)

    def _update(self, name: str, p: Array, g: Array) -> None:
        xp = array_module(p)
        beta1, beta2 = self.betas
        d = self._with_weight_decay(p, g, self.weight_decay)
        m = self._zeros_slot("m", name, p)
        v = self._zeros_slot("v", name, p)
        work = self._work(name, p)

        xp.multiply(d, 1.0 - beta1, out=work)
        m *= beta1
        m += work

        xp.multiply(d, 1.0 - beta2, out=work)
        work *= d
        v *= beta2
        v += work

        step_size = self.lr / (1.0 - beta1 ** self.t)
        correction2_sqrt = math.sqrt(1.0 - beta2 ** self.t)
        xp.sqrt(v, out=work)
        work /= correction2_sqrt
        work += self.eps
        xp.divide(m, work, out=work)
        work *= step_size
        p -= work


class RMSProp(Optimizer):
    """RMSProp, as torch.optim.RMSprop (not centered); ``decay`` is PyTorch's ``alpha``.

    With ``d = g + weight_decay * p``::

        s <- decay * s + (1 - decay) * d * d
        momentum == 0:  p <- p - lr * d / (sqrt(s) + eps)
        otherwise:      b <- momentum * b + d / (sqrt(s) + eps)
                        p <- p - lr * b

    ``s`` and ``b`` start at zero. eps is added outside the square root, as in
    PyTorch (TensorFlow adds it inside, which gives different numbers).
    """

    slot_names = ("sq", "momentum")

    def __init__(self, lr: float, decay: float = 0.9, eps: float = 1e-8,
                 momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__(lr)
        self.decay = _check_hyper("decay", decay, 0.0, 1.0)
        self.eps = _check_hyper("eps", eps, 0.0)
        self.momentum = _check_hyper("momentum", momentum, 0.0, 1.0)
        self.weight_decay = _check_hyper("weight_decay", weight_decay, 0.0)

    def _update(self, name: str, p: Array, g: Array) -> None:
        xp = array_module(p)
        d = self._with_weight_decay(p, g, self.weight_decay)
        s = self._zeros_slot("sq", name, p)
        work = self._work(name, p)

        xp.multiply(d, 1.0 - self.decay, out=work)
        work *= d
        s *= self.decay
        s += work

        xp.sqrt(s, out=work)
        work += self.eps
        xp.divide(d, work, out=work)
        if self.momentum == 0.0:
            work *= self.lr
            p -= work
            return
        b = self._zeros_slot("momentum", name, p)
        b *= self.momentum
        b += work
        xp.multiply(b, self.lr, out=work)
        p -= work


# name -> (class, defaults that the name implies). A user keyword overrides a default.
_OPTIMIZERS: dict[str, tuple[type[Optimizer], dict[str, Any]]] = {
    "sgd": (SGD, {}),
    "momentum": (SGD, {"momentum": 0.9}),
    "nesterov": (SGD, {"momentum": 0.9, "nesterov": True}),
    "adam": (Adam, {}),
    "rmsprop": (RMSProp, {}),
}

_OPTIMIZER_OPTIONS: dict[type[Optimizer], tuple[str, ...]] = {
    SGD: ("momentum", "nesterov", "weight_decay"),
    Adam: ("betas", "eps", "weight_decay"),
    RMSProp: ("decay", "eps", "momentum", "weight_decay"),
}


def make_optimizer(name: str, lr: float, **kw: Any) -> Optimizer:
    """Build an optimizer from its config name.

    Names: "sgd", "momentum" (SGD, momentum 0.9), "nesterov" (SGD, momentum 0.9,
    nesterov), "adam", "rmsprop". Keywords are the class's options and
    override the defaults the name implies.
    """
    if name not in _OPTIMIZERS:
        raise ConvcError(
            f"unknown optimizer {name!r}; valid names are {sorted(_OPTIMIZERS)}")
    cls, defaults = _OPTIMIZERS[name]
    allowed = _OPTIMIZER_OPTIONS[cls]
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ConvcError(
            f"optimizer {name!r} has no option {unknown}; valid options are {list(allowed)}")
    return cls(lr, **{**defaults, **kw})


# -- learning-rate schedules ---------------------------------------------------


class Schedule:
    """A learning rate as a function of the step (and, for plateau, of a metric).

    The trainer calls ``apply(optimizer, step)`` before each step; ``lr_at``
    answers without side effects, ``lr`` is the rate last applied.
    ``observe(metric)`` is a no-op except for ReduceOnPlateau, so a trainer can
    feed every schedule its validation metric without asking which one it has.
    """

    def __init__(self, base_lr: float) -> None:
        self.base_lr = _check_hyper("base_lr", base_lr, 0.0)
        self.last_step = 0

    def lr_at(self, step: int) -> float:
        raise NotImplementedError

    @property
    def lr(self) -> float:
        return self.lr_at(self.last_step)

    def apply(self, optimizer: Optimizer, step: int) -> float:
        """Set ``optimizer.lr`` for ``step`` and return it."""
        self.last_step = int(step)
        optimizer.lr = self.lr_at(step)
        return optimizer.lr

    def observe(self, metric: float) -> bool:
        """Take a validation metric; return True when this changed the rate."""
        return False

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"last_step": np.array(self.last_step, dtype=np.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(np.asarray(state["last_step"]))


class ConstantLR(Schedule):
    """``lr = base_lr`` at every step."""

    def lr_at(self, step: int) -> float:
        return self.base_lr


class StepLR(Schedule):
    """``lr = base_lr * gamma ** (step // step_size)``: a drop every step_size steps."""

    def __init__(self, base_lr: float, step_size: int, gamma: float = 0.1) -> None:
        super().__init__(base_lr)
        if int(step_size) != step_size or step_size < 1:
            raise ConvcError(f"step_size must be a positive integer, got {step_size!r}")
        self.step_size = int(step_size)
        self.gamma = _check_hyper("gamma", gamma, 0.0, low_inclusive=False)

    def lr_at(self, step: int) -> float:
        return self.base_lr * self.gamma ** (step // self.step_size)


class CosineLR(Schedule):
    """Cosine decay from base_lr at step 0 to min_lr at total_steps, then flat::

        lr = min_lr + (base_lr - min_lr) * (1 + cos(pi * min(step, total_steps) / total_steps)) / 2
    """

    def __init__(self, base_lr: float, total_steps: int, min_lr: float = 0.0) -> None:
        super().__init__(base_lr)
        if int(total_steps) != total_steps or total_steps < 1:
            raise ConvcError(f"total_steps must be a positive integer, got {total_steps!r}")
        self.total_steps = int(total_steps)
        self.min_lr = _check_hyper("min_lr", min_lr, 0.0, self.base_lr, high_inclusive=True)

    def lr_at(self, step: int) -> float:
        progress = min(max(step, 0), self.total_steps) / self.total_steps
        cosine = (1.0 + math.cos(math.pi * progress)) / 2.0
        return self.min_lr + (self.base_lr - self.min_lr) * cosine


class ReduceOnPlateau(Schedule):
    """Multiply the rate by ``factor`` when the metric (lower is better) stops improving.

    As torch's ReduceLROnPlateau in "min" mode with threshold 0 and no
    cooldown: a metric counts as an improvement only if it is strictly below
    the best seen; after more than ``patience`` observations in a row without
    one, ``lr <- max(lr * factor, min_lr)`` and the count restarts. A NaN
    metric is never an improvement. The rate does not depend on the step, so
    ``lr_at`` returns the current rate for any step.
    """

    def __init__(self, base_lr: float, factor: float = 0.1, patience: int = 10,
                 min_lr: float = 0.0) -> None:
        super().__init__(base_lr)
        self.factor = _check_hyper("factor", factor, 0.0, 1.0, low_inclusive=False)
        if int(patience) != patience or patience < 0:
            raise ConvcError(f"patience must be a non-negative integer, got {patience!r}")
        self.patience = int(patience)
        self.min_lr = _check_hyper("min_lr", min_lr, 0.0, self.base_lr, high_inclusive=True)
        self.current_lr = self.base_lr
        self.best = math.inf
        self.num_bad = 0

    def lr_at(self, step: int) -> float:
        return self.current_lr

    def observe(self, metric: float) -> bool:
        metric = float(metric)
        if metric < self.best:
            self.best = metric
            self.num_bad = 0
            return False
        self.num_bad += 1
        if self.num_bad <= self.patience:
            return False
        self.num_bad = 0
        new_lr = max(self.current_lr * self.factor, self.min_lr)
        changed = new_lr != self.current_lr
        self.current_lr = new_lr
        return changed

    def state_dict(self) -> dict[str, np.ndarray]:
        state = super().state_dict()
        state["lr"] = np.array(self.current_lr, dtype=np.float64)
        state["best"] = np.array(self.best, dtype=np.float64)
        state["num_bad"] = np.array(self.num_bad, dtype=np.int64)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.current_lr = float(np.asarray(state["lr"]))
        self.best = float(np.asarray(state["best"]))
        self.num_bad = int(np.asarray(state["num_bad"]))


_SCHEDULES: dict[str, type[Schedule]] = {
    "constant": ConstantLR,
    "step": StepLR,
    "cosine": CosineLR,
    "plateau": ReduceOnPlateau,
}

_SCHEDULE_OPTIONS: dict[str, tuple[str, ...]] = {
    "constant": (),
    "step": ("step_size", "gamma"),
    "cosine": ("total_steps", "min_lr"),
    "plateau": ("factor", "patience", "min_lr"),
}


def make_schedule(name: str, base_lr: float, **kw: Any) -> Schedule:
    """Build a schedule from its config name ("constant", "step", "cosine", "plateau")."""
    if name not in _SCHEDULES:
        raise ConvcError(
            f"unknown learning-rate schedule {name!r}; valid names are {sorted(_SCHEDULES)}")
    allowed = _SCHEDULE_OPTIONS[name]
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ConvcError(
            f"schedule {name!r} has no option {unknown}; valid options are {list(allowed)}")
    try:
        return _SCHEDULES[name](base_lr, **kw)
    except TypeError as exc:  # a required option such as step_size is missing
        raise ConvcError(f"schedule {name!r}: {exc}; options are {list(allowed)}") from None

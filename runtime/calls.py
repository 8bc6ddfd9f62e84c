"""The argument check every generated function makes before it runs (`rt.check_call`).

A generated module's `forward`, `loss`, `loss_and_grad` and
`loss_and_grad_shard` call `rt.check_call(MODEL, name, ...)` once, as their
first statement: the module's own MODEL table says what the model expects,
so the check is the same code for every model and each generated function
gets one line. Without it a frame of the wrong size reached a GEMM
(a NumPy matmul error naming no argument), a missing input stopped in
`in_shards` (StopIteration), and a typo in `state=` was ignored, so the run
started from zeros.

What is checked, each error naming the function, the argument, what the
model expects and what it was given:

- params: a dict holding every parameter of MODEL["params"], each an array
  of floating point numbers of its shape (names the model does not have are
  allowed: the optimizer's dict may hold more; they are only named when a
  parameter is missing, as a likely typo);
- inputs (and targets): a dict with exactly the model's names, each an
  array (N, T, C, H, W) of numbers (any float or integer dtype: the
  generated code converts it to the parameters' dtype) with the model's
  frame shape (C, H, W), one batch size N for all, at least one step, and
  one length T for the sequences of one time axis;
- state: a dict naming states of the model only, each (N, C, H, W);
- steps (forward): a whole number >= 1, or {axis: number}, for every loop
  over an axis no input gives (a forecast model's prediction).

It runs once per call, never per time step (tests/test_call_checks.py checks
where the generated code calls it); on examples/seed.cell (7 parameters, one
input, one target) it takes about 3 microseconds, a usual call screened fast
and only a failing one diagnosed in full.
"""
from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral

from convc.errors import CallError, CallTypeError

_ABSENT = object()  # the function takes no targets (forward)


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _names(names) -> str:
    names = [str(n) for n in names]
    return ", ".join(names) if names else "none"


def _kind(value) -> str:
    """'a list', 'a numpy.ndarray': what a value is, for a message."""
    kind = type(value)
    name = kind.__name__
    if kind.__module__ != "builtins":
        name = kind.__module__.split(".")[0] + "." + name
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


def check_call(model: dict, function: str, params, inputs, targets=_ABSENT, state=None,
               steps=None, cotangents=_ABSENT, state_cotangents=None) -> None:
    """Raise CallError (a ValueError) or CallTypeError (a TypeError) for arguments that do
    not fit the model described by `model` (a generated module's MODEL); else nothing.

    `targets` left out: the function takes none (forward), and `steps` is checked,
    unless `cotangents` (vjp's: one per output, on the output's time axis) give
    the lengths of the axes no input has.
    """
    _check_params(model["params"], function, params)
    sizes: list = []  # (N, who) of every sequence
    lengths: dict = {}  # time axis -> (T, who) of its first sequence
    _check_sequences(model, function, "input", inputs, model["inputs"], sizes, lengths)
    if targets is not _ABSENT:
        _check_sequences(model, function, "target", targets, model["targets"], sizes, lengths)
    if cotangents is not _ABSENT:
        axes = dict(model["axes"], **model["vjp"]["output_axes"])
        _check_sequences(dict(model, axes=axes), function, "cotangent", cotangents,
                         model["outputs"], sizes, lengths)
    n = sizes[0][0] if sizes else None
    if state is not None:
        _check_state(model["states"], function, state, n, sizes[0][1] if sizes else None)
    if state_cotangents is not None:
        _check_state(model["states"], function, state_cotangents, n,
                     sizes[0][1] if sizes else None, arg="state_cotangents=")
    if targets is _ABSENT and cotangents is _ABSENT:
        for loop in model["loops"]:
            if loop["axis"] not in lengths:
                _check_steps(model, function, steps, loop["axis"])


def _check_params(specs: dict, function: str, params) -> None:
    if isinstance(params, Mapping):
        try:  # the usual case, screened fast: every parameter there, of its shape, floating
            for name, spec in specs.items():
                value = params[name]
                if value.shape != spec["shape"] or value.dtype.kind != "f":
                    break
            else:
                return
        except (KeyError, AttributeError, TypeError):
            pass
    _diagnose_params(specs, function, params)


def _diagnose_params(specs: dict, function: str, params) -> None:
    """What is wrong with params, as an error (nothing, if the fast screen was too strict)."""
    if not isinstance(params, Mapping):
        raise CallTypeError(f"{function}: params is {_kind(params)}; the model expects a dict "
                            "{name: array}, as init_params() returns")
    missing = [name for name in specs if name not in params]
    if missing:
        listed = ", ".join(f"{name!r} (shape {_shape(specs[name]['shape'])})"
                           for name in missing)
        what = (f"params has no {listed}" if len(missing) == 1 else
                f"params lacks {len(missing)} of the model's {len(specs)} parameters: {listed}")
        unknown = [name for name in params if name not in specs]
        if unknown:
            what += f"; it has {_names(repr(n) for n in unknown)}, which the model does not have"
        raise CallError(f"{function}: {what}")
    for name, spec in specs.items():
        value = params[name]
        shape = getattr(value, "shape", None)
        if shape is None or not hasattr(value, "dtype"):
            raise CallTypeError(f"{function}: parameter {name!r} is {_kind(value)}; the model "
                                f"expects an array of shape {_shape(spec['shape'])}")
        if tuple(shape) != tuple(spec["shape"]):
            raise CallError(f"{function}: parameter {name!r} has shape {_shape(shape)}; the "
                            f"model expects {_shape(spec['shape'])}")
        kind = getattr(value.dtype, "kind", "f")
        if kind != "f":
            raise CallTypeError(f"{function}: parameter {name!r} has dtype {value.dtype}; the "
                                "model expects floating point numbers (float32 or float64)")


def _check_sequences(model: dict, function: str, role: str, given, expected: dict,
                     sizes: list, lengths: dict) -> None:
    """inputs or targets: the model's names, each (N, T, C, H, W) of its frame shape."""
    arg = role + "s"
    if not isinstance(given, Mapping):
        raise CallTypeError(f"{function}: {arg} is {_kind(given)}; the model expects a dict "
                            f"{{name: array (N, T, C, H, W)}} with its {arg}: "
                            f"{_names(expected)}")
    for name in expected:
        if name not in given:
            raise CallError(f"{function}: {arg} has no {name!r} (it has: "
                            f"{_names(given)}); the model's {arg}: {_names(expected)}")
    if len(given) != len(expected):
        unknown = next(name for name in given if name not in expected)
        raise CallError(f"{function}: {arg} names {unknown!r}, which the model does not have "
                        f"(its {arg}: {_names(expected)})")
    axes = model["axes"]
    for name, frame in expected.items():
        a = given[name]
        shape = getattr(a, "shape", None)
        if shape is None or not hasattr(a, "dtype"):
            raise CallTypeError(f"{function}: {role} {name!r} is {_kind(a)}; the model expects "
                                f"an array (N, T, C, H, W) = (N, T, {', '.join(map(str, frame))})")
        if len(shape) != 5:
            raise CallError(f"{function}: {role} {name!r} has shape {_shape(shape)}, "
                            f"{len(shape)} dimensions; the model expects 5: (N, T, C, H, W) = "
                            f"(N, T, {', '.join(map(str, frame))})")
        if tuple(shape[2:]) != tuple(frame):
            raise CallError(f"{function}: {role} {name!r} has frames of shape "
                            f"{_shape(shape[2:])}; the model expects {_shape(frame)} "
                            "(channels, height, width)")
        kind = getattr(a.dtype, "kind", "f")
        if kind not in "biuf":
            raise CallTypeError(f"{function}: {role} {name!r} has dtype {a.dtype}; the model "
                                "expects numbers (float32 or float64)")
        who = f"{role} {name!r}"
        n, t = shape[0], shape[1]
        if sizes and n != sizes[0][0]:
            raise CallError(f"{function}: {who} has a batch of {n}; {sizes[0][1]} has "
                            f"{sizes[0][0]} (N, the first dimension, must agree)")
        if n < 1:
            raise CallError(f"{function}: {who} has shape {_shape(shape)}, a batch of 0; the "
                            "model expects at least one sequence (N >= 1)")
        if t < 1:
            raise CallError(f"{function}: {who} has shape {_shape(shape)}, 0 steps; the model "
                            "expects at least one (T >= 1)")
        sizes.append((n, who))
        axis = axes[name]
        if axis in lengths and lengths[axis][0] != t:
            raise CallError(f"{function}: {who} has {t} steps but {lengths[axis][1]} has "
                            f"{lengths[axis][0]}; they share a time axis in this model")
        lengths.setdefault(axis, (t, who))


def _check_state(specs: dict, function: str, state, n, who, arg: str = "state=") -> None:
    if not isinstance(state, Mapping):
        raise CallTypeError(f"{function}: {arg} is {_kind(state)}; the model expects a dict "
                            f"{{state name: array (N, C, H, W)}} (its states: {_names(specs)})")
    for name, value in state.items():
        spec = specs.get(name)
        if spec is None:
            raise CallError(f"{function}: {arg} names {name!r}, which the model does not have "
                            f"(its states: {_names(specs)})")
        shape = getattr(value, "shape", None)
        want = ("N" if n is None else n,) + tuple(spec["shape"])
        if shape is None:
            raise CallTypeError(f"{function}: state {name!r} is {_kind(value)}; the model "
                                f"expects an array of shape {_shape(want)}")
        if len(shape) != len(want) or tuple(shape[1:]) != want[1:] or \
                (n is not None and shape[0] != n):
            batch = f"batch as in {who}" if who else "batch"
            raise CallError(f"{function}: state {name!r} has shape {_shape(shape)}; the model "
                            f"expects {_shape(want)} ({batch}, channels, height, width)")


def _check_steps(model: dict, function: str, steps, axis: str) -> None:
    """steps= for a loop over an axis no input gives: a whole number >= 1 (or {axis: ...})."""
    if steps is None:
        if model.get("task") == "forecast":
            raise CallError(f"{function}: a forecast model needs steps= (the number of frames "
                            "to predict)")
        raise CallError(f"{function}: the model's loop over axis {axis!r} needs steps= (the "
                        "number of steps to run it)")
    value, what = steps, "steps="
    if isinstance(steps, Mapping):
        if axis not in steps:
            raise CallError(f"{function}: steps= has no entry for axis {axis!r} (it has: "
                            f"{_names(steps)}); the model's loop over {axis!r} needs one")
        value, what = steps[axis], f"steps[{axis!r}]"
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise CallTypeError(f"{function}: {what} is {value!r}; the model expects a whole number "
                            "of steps >= 1")
    if value < 1:
        raise CallError(f"{function}: {what} is {value}; the model expects a whole number of "
                        "steps >= 1")

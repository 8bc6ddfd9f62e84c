"""Generated functions check their arguments once per call (rt.check_call, issue 15 s4).

Each wrong call gets a CallError (a ValueError; CallTypeError, also a TypeError,
for an argument of the wrong kind) that names the function, the argument, what
the model expects and what it was given; before, a wrong frame size was a raw
NumPy matmul error, a missing input a StopIteration, and a typo in state= was
ignored. A correct call computes bitwise what the code without the check does.
"""
from __future__ import annotations

import ast
import re

import numpy as np
import pytest

import convc.api as api
from convc.errors import CallError, CallTypeError, ConvcError, DataError
from convc.runtime import kernels as rt

from helpers import ROOT, load_example, one_blas_thread  # noqa: F401

SEED = ROOT / "examples" / "seed.cell"
FORECASTER = ROOT / "examples" / "encoder_forecaster.cell"
ENTRY_POINTS = ("forward", "loss", "loss_and_grad", "loss_and_grad_shard")


@pytest.fixture(scope="module")
def seed():
    return api.load(SEED)  # frames (1, 16, 16), states lstm.h and lstm.c (8, 16, 16)


@pytest.fixture(scope="module")
def forecaster():
    return load_example(FORECASTER)


def batch(mod, N=2, T=3, T_out=None, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    meta = mod.MODEL
    in_axes = {meta["axes"][n] for n in meta["inputs"]}

    def seqs(table):
        return {n: rng.uniform(0, 1, (N, T if meta["axes"][n] in in_axes else T_out or T)
                               + tuple(s)).astype(dtype) for n, s in table.items()}
    return seqs(meta["inputs"]), seqs(meta["targets"])


def call(mod, function, params, inputs, targets=None, **kw):
    """One entry point with the arguments it takes."""
    fn = getattr(mod, function)
    if function == "forward":
        return fn(params, inputs, **kw)
    return fn(params, inputs, targets, **kw)


def raises(cls, *pieces, f):
    """f() raises cls with a message holding every piece; the error is returned."""
    with pytest.raises(cls) as info:
        f()
    msg = str(info.value)
    for piece in pieces:
        assert piece in msg, f"{piece!r} not in {msg!r}"
    return info.value


# ---------------------------------------------------------------- inputs and targets

@pytest.mark.parametrize("function", ENTRY_POINTS)
def test_wrong_frame_size(seed, function):
    p = seed.init_params()
    x, y = batch(seed)
    x8 = {"x": np.zeros((2, 3, 1, 8, 8), np.float32)}
    e = raises(CallError, f"{function}: input 'x' has frames of shape (1, 8, 8); the model "
               "expects (1, 16, 16) (channels, height, width)",
               f=lambda: call(seed, function, p, x8, y))
    assert isinstance(e, ValueError) and isinstance(e, DataError) and isinstance(e, ConvcError)


@pytest.mark.parametrize("function", ["loss", "loss_and_grad", "loss_and_grad_shard"])
def test_wrong_channel_count_of_a_target(seed, function):
    p = seed.init_params()
    x, _ = batch(seed)
    y3 = {"y": np.zeros((2, 3, 3, 16, 16), np.float32)}
    raises(CallError, f"{function}: target 'y' has frames of shape (3, 16, 16); the model "
           "expects (1, 16, 16)", f=lambda: call(seed, function, p, x, y3))


def test_wrong_number_of_dimensions(seed):
    p = seed.init_params()
    raises(CallError, "forward: input 'x' has shape (3, 1, 16, 16), 4 dimensions; the model "
           "expects 5: (N, T, C, H, W) = (N, T, 1, 16, 16)",
           f=lambda: seed.forward(p, {"x": np.zeros((3, 1, 16, 16))}))


def test_batch_sizes_disagree(seed):
    p = seed.init_params()
    x, y = batch(seed, N=2)
    y1 = {"y": y["y"][:1]}
    raises(CallError, "loss_and_grad: target 'y' has a batch of 1; input 'x' has 2",
           f=lambda: seed.loss_and_grad(p, x, y1))


def test_time_lengths_disagree(seed):
    p = seed.init_params()
    x, y = batch(seed, T=3)
    y2 = {"y": y["y"][:, :2]}
    raises(CallError, "loss: target 'y' has 2 steps but input 'x' has 3; they share a time "
           "axis", f=lambda: seed.loss(p, x, y2))


@pytest.mark.parametrize("which", ["zero batch", "zero steps"])
def test_empty_sequences(seed, which):
    p = seed.init_params()
    shape = (0, 3, 1, 16, 16) if which == "zero batch" else (2, 0, 1, 16, 16)
    raises(CallError, f"forward: input 'x' has shape {shape}",
           "at least one", f=lambda: seed.forward(p, {"x": np.zeros(shape)}))


def test_input_that_is_not_an_array(seed):
    p = seed.init_params()
    x, _ = batch(seed)
    e = raises(CallTypeError, "forward: input 'x' is a list; the model expects an array "
               "(N, T, C, H, W) = (N, T, 1, 16, 16)",
               f=lambda: seed.forward(p, {"x": x["x"].tolist()}))
    assert isinstance(e, TypeError) and isinstance(e, ValueError)


def test_inputs_that_are_not_a_dict(seed):
    p = seed.init_params()
    x, _ = batch(seed)
    raises(CallTypeError, "forward: inputs is a numpy.ndarray; the model expects a dict",
           "its inputs: x", f=lambda: seed.forward(p, x["x"]))


def test_input_of_strings(seed):
    p = seed.init_params()
    raises(CallTypeError, "forward: input 'x' has dtype <U1; the model expects numbers",
           f=lambda: seed.forward(p, {"x": np.full((2, 3, 1, 16, 16), "a")}))


@pytest.mark.parametrize("function", ENTRY_POINTS)
def test_missing_input(seed, function):
    p = seed.init_params()
    _, y = batch(seed)
    raises(CallError, f"{function}: inputs has no 'x' (it has: X); the model's inputs: x",
           f=lambda: call(seed, function, p, {"X": y["y"]}, y))


@pytest.mark.parametrize("function", ["loss", "loss_and_grad", "loss_and_grad_shard"])
def test_missing_target(seed, function):
    p = seed.init_params()
    x, _ = batch(seed)
    raises(CallError, f"{function}: targets has no 'y' (it has: none); the model's targets: y",
           f=lambda: call(seed, function, p, x, {}))


def test_unknown_extra_input(seed):
    p = seed.init_params()
    x, y = batch(seed)
    raises(CallError, "forward: inputs names 'z', which the model does not have (its inputs: x)",
           f=lambda: seed.forward(p, dict(x, z=x["x"])))
    raises(CallError, "loss_and_grad: targets names 'x', which the model does not have "
           "(its targets: y)", f=lambda: seed.loss_and_grad(p, x, dict(y, x=x["x"])))


# ---------------------------------------------------------------- state=

@pytest.mark.parametrize("function", ENTRY_POINTS)
def test_state_name_the_model_does_not_have(seed, function):
    p = seed.init_params()
    x, y = batch(seed)
    typo = {"lstm.hh": np.zeros((2, 8, 16, 16), np.float32)}
    raises(CallError, f"{function}: state= names 'lstm.hh', which the model does not have "
           "(its states: lstm.h, lstm.c)", f=lambda: call(seed, function, p, x, y, state=typo))


@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (3, 8, 16, 16), (8, 16, 16)])
def test_state_of_the_wrong_shape(seed, shape):
    p = seed.init_params()
    x, y = batch(seed, N=2)
    bad = {"lstm.c": np.zeros(shape, np.float32)}
    raises(CallError, f"loss_and_grad: state 'lstm.c' has shape {shape}; the model expects "
           "(2, 8, 16, 16) (batch as in input 'x', channels, height, width)",
           f=lambda: seed.loss_and_grad(p, x, y, state=bad))


def test_state_that_is_not_a_dict(seed):
    p = seed.init_params()
    x, _ = batch(seed)
    raises(CallTypeError, "forward: state= is a list; the model expects a dict",
           "its states: lstm.h, lstm.c", f=lambda: seed.forward(p, x, state=[]))


# ---------------------------------------------------------------- steps=

def test_forecast_without_steps(forecaster):
    p = forecaster.init_params()
    x, _ = batch(forecaster)
    raises(CallError, "forward: a forecast model needs steps= (the number of frames to predict)",
           f=lambda: forecaster.forward(p, x))


@pytest.mark.parametrize("steps, message", [
    (0, "forward: steps= is 0; the model expects a whole number of steps >= 1"),
    (2.5, "forward: steps= is 2.5; the model expects a whole number"),
    ({"x": 3}, "forward: steps= has no entry for axis 'y' (it has: x)"),
    ({"y": -1}, "forward: steps['y'] is -1; the model expects a whole number"),
])
def test_forecast_with_bad_steps(forecaster, steps, message):
    p = forecaster.init_params()
    x, _ = batch(forecaster)
    raises(CallError, message, f=lambda: forecaster.forward(p, x, steps=steps))


def test_forecast_steps_as_int_or_dict(forecaster):
    p = forecaster.init_params()
    x, _ = batch(forecaster)
    a, _ = forecaster.forward(p, x, steps=np.int64(4))
    b, _ = forecaster.forward(p, x, steps={"y": 4})
    assert a["pred"].shape[1] == 4
    assert a["pred"].tobytes() == b["pred"].tobytes()


def test_next_frame_model_ignores_steps(seed):
    """As before: steps= only matters to a loop no input gives the length of."""
    p = seed.init_params()
    x, _ = batch(seed)
    assert seed.forward(p, x, steps=4)[0]["pred"].tobytes() == \
        seed.forward(p, x)[0]["pred"].tobytes()


# ---------------------------------------------------------------- params

@pytest.mark.parametrize("function", ENTRY_POINTS)
def test_missing_parameter(seed, function):
    p = seed.init_params()
    p["lstm.w"] = p.pop("lstm.W")
    x, y = batch(seed)
    raises(CallError, f"{function}: params has no 'lstm.W' (shape (32, 9, 3, 3)); it has "
           "'lstm.w', which the model does not have", f=lambda: call(seed, function, p, x, y))


def test_several_missing_parameters(seed):
    p = seed.init_params()
    x, _ = batch(seed)
    del p["W_y"], p["b_y"]
    raises(CallError, "forward: params lacks 2 of the model's 7 parameters: 'W_y' (shape "
           "(1, 8, 1, 1)), 'b_y' (shape (1, 16, 16))", f=lambda: seed.forward(p, x))


@pytest.mark.parametrize("function", ENTRY_POINTS)
def test_parameter_of_the_wrong_shape(seed, function):
    p = seed.init_params()
    p["lstm.W"] = p["lstm.W"][:16]
    x, y = batch(seed)
    raises(CallError, f"{function}: parameter 'lstm.W' has shape (16, 9, 3, 3); the model "
           "expects (32, 9, 3, 3)", f=lambda: call(seed, function, p, x, y))


def test_parameter_that_is_not_a_float_array(seed):
    p = seed.init_params()
    x, _ = batch(seed)
    raises(CallTypeError, "forward: parameter 'b_y' is a list; the model expects an array of "
           "shape (1, 16, 16)", f=lambda: seed.forward(dict(p, b_y=p["b_y"].tolist()), x))
    raises(CallTypeError, "forward: parameter 'b_y' has dtype int64; the model expects floating",
           f=lambda: seed.forward(dict(p, b_y=p["b_y"].astype(np.int64)), x))
    raises(CallTypeError, "forward: params is a list; the model expects a dict",
           f=lambda: seed.forward(list(p.values()), x))


def test_extra_parameters_are_allowed(seed):
    p = seed.init_params()
    x, _ = batch(seed)
    want = seed.forward(p, x)[0]["pred"]
    got = seed.forward(dict(p, momentum=np.zeros(3)), x)[0]["pred"]
    assert got.tobytes() == want.tobytes()


# ---------------------------------------------------------------- correct calls

def unchecked(mod):
    """The same module without its rt.check_call lines: the code as it was before."""
    source = "".join(line for line in mod.source.splitlines(True)
                     if not line.lstrip().startswith("rt.check_call("))
    assert source != mod.source
    return api.module_from_source(source, mod.MODEL["name"] + "_unchecked")


def results(mod, params, inputs, targets, state=None, steps=None):
    loss, grads, finals = mod.loss_and_grad(params, inputs, targets, state=state)
    outputs, finals2 = mod.forward(params, inputs, steps=steps, state=state)
    alone = mod.loss(params, inputs, targets, state=state)
    arrays = [np.float64(loss), np.float64(alone)]
    arrays += [grads[k] for k in sorted(grads)] + [finals[k] for k in sorted(finals)]
    arrays += [outputs[k] for k in sorted(outputs)] + [finals2[k] for k in sorted(finals2)]
    return [(a.dtype.str, a.shape, a.tobytes()) for a in map(np.asarray, arrays)]


@pytest.mark.parametrize("path", [SEED, FORECASTER], ids=["seed", "encoder_forecaster"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("stateful", [False, True], ids=["zeros", "state"])
def test_correct_call_is_bitwise_unchanged(path, dtype, stateful):
    """float32 and float64 inputs (parameters float32), with and without state=: the loss,
    gradients, outputs and final states are those of the code without the check."""
    mod = load_example(path)
    plain = unchecked(mod)
    params = mod.init_params(seed=1)
    inputs, targets = batch(mod, N=2, T=3, T_out=2, dtype=dtype, seed=1)
    state = None
    if stateful:  # every state, those a forecaster's loop starts from the encoder too
        rng = np.random.default_rng(2)
        state = {n: rng.normal(0, 0.5, (2,) + tuple(s["shape"])).astype(np.float32)
                 for n, s in mod.MODEL["states"].items()}
    steps = 2 if mod.MODEL["task"] == "forecast" else None
    assert results(mod, params, inputs, targets, state, steps) == \
        results(plain, params, inputs, targets, state, steps)


def test_integer_inputs_still_accepted(seed):
    p = seed.init_params()
    x = {"x": np.ones((2, 3, 1, 16, 16), np.uint8)}
    got = seed.forward(p, x)[0]["pred"]
    assert got.tobytes() == seed.forward(p, {"x": x["x"].astype(np.float32)})[0]["pred"].tobytes()


def test_sharded_call_is_bitwise_unchanged(seed, monkeypatch):
    """loss_and_grad cut into two shards (checked as a whole, then each shard) still agrees
    with the unchecked code cut the same way."""
    pytest.importorskip("threadpoolctl")
    monkeypatch.setattr(rt, "shard_count", lambda backend, n, work=0: 2)
    plain = unchecked(seed)
    p = seed.init_params(seed=3)
    x, y = batch(seed, N=4, T=3, seed=3)
    shard, seen = seed.loss_and_grad_shard, []

    def counted(params, inputs, *args, **kw):
        seen.append(len(inputs["x"]))
        return shard(params, inputs, *args, **kw)
    monkeypatch.setattr(seed, "loss_and_grad_shard", counted)
    a = seed.loss_and_grad(p, x, y)
    assert seen == [2, 2]
    b = plain.loss_and_grad(p, x, y)
    assert a[0] == b[0]
    for k in a[1]:
        assert a[1][k].tobytes() == b[1][k].tobytes()


def test_recompute_module_checks_too():
    mod = api.load(SEED, recompute=2)
    plain = unchecked(mod)
    p = mod.init_params(seed=4)
    x, y = batch(mod, N=2, T=5, seed=4)
    a, b = mod.loss_and_grad(p, x, y), plain.loss_and_grad(p, x, y)
    assert a[0] == b[0] and all(a[1][k].tobytes() == b[1][k].tobytes() for k in a[1])
    raises(CallError, "loss_and_grad: input 'x' has frames of shape (1, 8, 8)",
           f=lambda: mod.loss_and_grad(p, {"x": np.zeros((2, 5, 1, 8, 8))}, y))


# ---------------------------------------------------------------- where the check is

def _functions(source: str) -> dict:
    return {f.name: f for f in ast.parse(source).body if isinstance(f, ast.FunctionDef)}


def _is_check(stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) and \
        ast.unparse(stmt.value.func) == "rt.check_call"


@pytest.mark.parametrize("path", [SEED, FORECASTER], ids=["seed", "encoder_forecaster"])
def test_one_check_per_call_before_anything_else(path):
    """Each entry point checks once, as its first statement (after the docstring): never
    inside a time loop, so the check costs one call's worth, not a step's."""
    mod = api.load(path, recompute=2)
    fns = _functions(mod.source)
    for name in ENTRY_POINTS:
        body = fns[name].body
        assert isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
        assert _is_check(body[1]), name
        assert ast.unparse(body[1].value.args[1]) == repr(name)
        assert sum(_is_check(s) for s in ast.walk(fns[name]) if isinstance(s, ast.stmt)) == 1
    assert len(re.findall(r"rt\.check_call\(", mod.source)) == len(ENTRY_POINTS)
    assert "check_same_length" not in mod.source  # check_call checks the lengths

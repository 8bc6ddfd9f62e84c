"""The generated vector-Jacobian product (`convc.load(path, vjp=True)`, runtime/vjp.py).

`vjp(params, inputs, cotangents, state=, state_cotangents=)` must give the
cotangents of the parameters, the inputs and the initial states of
f = <outputs, C> + <final states, S>: checked against central finite
differences of forward() in float64 on every example and std model, in a
random direction of each; it must be `loss_and_grad` where the cotangent is
the loss's (also truncated, bptt=2, and with recompute=2), agree across
batch shards, and be bitwise the same run after run.
"""
from __future__ import annotations

import numpy as np
import pytest

import convc.api as api
from convc.errors import CallError, ConvcError
from convc.runtime import kernels
from helpers import (EXAMPLES, STD_MODELS, one_blas_thread, random_batch,  # noqa: F401
                     random_params, random_state, shrink, std_model_path, tree_bytes)

N, T = 2, 3


def _load(name: str, **kw):
    if name in STD_MODELS:
        return api.load(std_model_path(name), text=STD_MODELS[name], vjp=True, **kw)
    path = next(p for p in EXAMPLES if p.stem == name)
    return api.load(path, text=shrink(path.read_text(encoding="utf-8")), vjp=True, **kw)


MODELS = [p.stem for p in EXAMPLES] + sorted(STD_MODELS)

# a state learned as a parameter, and a model without a given input axis for its output
LEARNED = """
cell G(hidden) {
    \"\"\"A ConvGRU-like cell whose state starts from a learned value.\"\"\"
    input x
    state h = learned
    weight W = kernel(2 * hidden, 3)
    weight U = kernel(hidden, 3)
    z, r = split(sigmoid(conv(concat(x, h[t-1]), W, padding = same)), 2)
    h = (1 - z) * h[t-1] + z * tanh(conv(concat(x, r * h[t-1]), U, padding = same))
    output h
}

model learned_start {
    input x: [1, 6, 6]
    target y: [1, 6, 6]
    g = G(hidden = 2)
    h = g(x)
    weight W_o = kernel(1, 1)
    pred = conv(h, W_o)
    output pred
    loss mse(pred, y)
}
"""


def _functional(mod, C, S, steps):
    """f(params, inputs, state) = <outputs, C> + <final states, S>, by forward()."""
    def f(params, inputs, state=None):
        out, fin = mod.forward(params, inputs, steps=steps, state=state)
        return sum(float(np.sum(out[k] * C[k])) for k in C) + \
            sum(float(np.sum(fin[k] * S[k])) for k in S)
    return f


def _directional(f, point: dict, direction: dict, where: str, eps: float = 1e-6) -> float:
    """(f(x + eps u) - f(x - eps u)) / 2 eps, x the `where` argument of f."""
    def at(sign):
        moved = {k: point[where][k] + sign * eps * direction[k] for k in direction}
        return f(**dict(point, **{where: moved}))
    return (at(1) - at(-1)) / (2 * eps)


def _dot(a: dict, b: dict) -> float:
    return sum(float(np.sum(a[k] * b[k])) for k in b)


def _cotangents(mod, params, inputs, steps, seed=7):
    out, fin = mod.forward(params, inputs, steps=steps)
    rng = np.random.default_rng(seed)
    C = {k: rng.standard_normal(v.shape) for k, v in out.items()}
    S = {k: rng.standard_normal(v.shape) for k, v in fin.items()}
    return C, S


@pytest.mark.parametrize("name", MODELS)
def test_vjp_equals_finite_differences_of_forward(name):
    mod = _load(name)
    params = random_params(mod, seed=1)
    inputs, _ = random_batch(mod, N=N, T=T, seed=1)
    C, S = _cotangents(mod, params, inputs, steps=T)
    state = random_state(mod, N=N, seed=1)
    f = _functional(mod, C, S, steps=T)
    pc, ic, sc = mod.vjp(params, inputs, C, state=state, state_cotangents=S)
    assert set(pc) == set(params) and set(ic) == set(inputs)
    assert set(sc) == {k for k, s in mod.MODEL["states"].items() if s["init"] != "final"}
    rng = np.random.default_rng(11)
    point = dict(params=params, inputs=inputs, state=state)
    for where, got in (("params", pc), ("inputs", ic), ("state", sc)):
        if not got:
            continue
        u = {k: rng.standard_normal(np.shape(point[where][k])) for k in got}
        fd = _directional(f, point, u, where)
        an = _dot(got, u)
        assert abs(fd - an) <= 1e-6 * max(abs(an), 1.0), (where, fd, an)
        for k, v in got.items():
            assert v.shape == np.shape(point[where][k]) and v.dtype == np.float64, (where, k)


def test_a_learned_initial_state_gets_its_cotangent_given_or_not():
    mod = api.load(None, text=LEARNED, vjp=True)
    params = random_params(mod, seed=2)
    inputs, _ = random_batch(mod, N=N, T=T, seed=2)
    C, S = _cotangents(mod, params, inputs, steps=T)
    f = _functional(mod, C, S, steps=T)
    pc, _, sc = mod.vjp(params, inputs, C, state_cotangents=S)  # from the learned value
    init = "g.h0"  # the learned start, a parameter
    # the learned start is one (C, H, W) value shared by the batch: its cotangent is the sum
    assert np.allclose(pc[init], sc["g.h"].sum(axis=0), rtol=1e-12, atol=1e-14)
    state = random_state(mod, N=N, seed=2)
    pc2, _, sc2 = mod.vjp(params, inputs, C, state=state, state_cotangents=S)
    u = {"g.h": np.random.default_rng(3).standard_normal(state["g.h"].shape)}
    fd = _directional(f, dict(params=params, inputs=inputs, state=state), u, "state")
    assert abs(fd - _dot(sc2, u)) <= 1e-6 * max(abs(fd), 1.0)
    assert not np.any(pc2[init])  # started from a given state: none for the learned one


def _mse_cotangent(mod, params, inputs, targets):
    """The cotangent mse(pred, y) hands to pred: 2 (pred - y) / size."""
    out, _ = mod.forward(params, inputs)
    return {"pred": 2.0 * (out["pred"] - targets["y"]) / out["pred"].size}


@pytest.mark.parametrize("options", [{}, {"bptt": 2}], ids=["full", "bptt2"])
@pytest.mark.parametrize("name", ["std_convlstm", "std_convgru"])
def test_vjp_of_the_loss_cotangent_is_loss_and_grad(name, options):
    mod = _load(name)
    params = random_params(mod, seed=4)
    inputs, targets = random_batch(mod, N=N, T=4, seed=4)
    loss, grads, _ = mod.loss_and_grad(params, inputs, targets, **options)
    pc, _, _ = mod.vjp(params, inputs, _mse_cotangent(mod, params, inputs, targets), **options)
    for k in grads:
        np.testing.assert_allclose(pc[k], grads[k], rtol=1e-11, atol=1e-14, err_msg=k)


def test_recompute_keeps_the_vjp():
    plain, windowed = _load("stack"), _load("stack", recompute=2)
    params = random_params(plain, seed=5)
    inputs, _ = random_batch(plain, N=N, T=5, seed=5)
    C, S = _cotangents(plain, params, inputs, steps=5)
    a = plain.vjp(params, inputs, C, state_cotangents=S)
    b = windowed.vjp(params, inputs, C, state_cotangents=S)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_allclose(y[k], x[k], rtol=1e-12, atol=1e-15, err_msg=k)


def test_vjp_is_bitwise_reproducible_and_agrees_across_shards(monkeypatch):
    mod = _load("encoder_forecaster")
    params = random_params(mod, seed=6)
    inputs, _ = random_batch(mod, N=4, T=T, seed=6)
    C, S = _cotangents(mod, params, inputs, steps=T)
    runs = [mod.vjp(params, inputs, C, state_cotangents=S) for _ in range(2)]
    assert all(tree_bytes(x) == tree_bytes(y) for x, y in zip(*runs))
    monkeypatch.setattr(kernels, "shard_count", lambda backend, n, work: 2)
    sharded = [mod.vjp(params, inputs, C, state_cotangents=S) for _ in range(2)]
    assert all(tree_bytes(x) == tree_bytes(y) for x, y in zip(*sharded))
    for x, y in zip(runs[0], sharded[0]):
        assert set(x) == set(y)
        for k in x:  # sums in another order: to round-off of the array's size
            assert np.max(np.abs(y[k] - x[k])) <= 1e-12 * np.max(np.abs(x[k])), k


def test_vjp_checks_its_cotangents():
    mod = _load("seed")
    params = random_params(mod)
    inputs, _ = random_batch(mod, N=N, T=T)
    C, _ = _cotangents(mod, params, inputs, steps=T)
    with pytest.raises(CallError, match="cotangents has no 'pred'"):
        mod.vjp(params, inputs, {})
    with pytest.raises(CallError, match="cotangent 'pred' has 2 steps but input 'x' has 3"):
        mod.vjp(params, inputs, {"pred": C["pred"][:, :2]})
    with pytest.raises(CallError, match="state_cotangents= names 'nope'"):
        mod.vjp(params, inputs, C, state_cotangents={"nope": np.zeros((N, 8, 16, 16))})


def test_a_module_compiled_without_vjp_says_how_to_get_one():
    path = next(p for p in EXAMPLES if p.stem == "seed")
    mod = api.load(path)
    with pytest.raises(ConvcError, match=r"vjp\(\) was not compiled.*vjp=True"):
        mod.vjp({}, {}, {})


# ---------------------------------------------------------------- vjp_start: two phases

@pytest.mark.parametrize("name", ["encoder_forecaster", "stack", "std_convlstm"])
def test_vjp_start_gives_forward_and_then_vjp_bit_for_bit(name):
    mod = _load(name)
    params = random_params(mod, seed=8)
    inputs, _ = random_batch(mod, N=N, T=T, seed=8)
    C, S = _cotangents(mod, params, inputs, steps=T)
    out, fin = mod.forward(params, inputs, steps=T)
    outputs, final, pullback = mod.vjp_start(params, inputs, steps=T)
    assert tree_bytes(outputs) == tree_bytes(out) and tree_bytes(final) == tree_bytes(fin)
    # two calls in flight at once keep their own forward values
    other = mod.vjp_start({k: 2 * v for k, v in params.items()}, inputs, steps=T)
    got = pullback(C, state_cotangents=S)
    want = mod.vjp(params, inputs, C, state_cotangents=S)
    assert all(tree_bytes(a) == tree_bytes(b) for a, b in zip(got, want))
    other[2].close()
    with pytest.raises(RuntimeError, match="has run"):
        pullback(C)


def test_vjp_start_reuses_its_memory_step_after_step():
    from convc.runtime import vjp as runtime_vjp
    from convc.runtime.model import default_backend

    mod = _load("seed")
    params = random_params(mod, seed=9)
    inputs, _ = random_batch(mod, N=N, T=T, seed=9)
    C, _ = _cotangents(mod, params, inputs, steps=T)
    _, _, pullback = mod.vjp_start(params, inputs)
    pullback(C)
    idle = runtime_vjp._IDLE[id(default_backend())]
    clones = {id(b) for b in idle}
    for _ in range(3):
        _, _, pullback = mod.vjp_start(params, inputs)
        assert len(idle) == len(clones) - 1  # one leased while the pullback waits
        pullback(C)
    assert {id(b) for b in idle} == clones  # no new clone: the same memory, step after step


# ---------------------------------------------------------------- a model without a loss

NO_LOSS = '''
import std

model m {
    """A ConvLSTM and a 1x1 head, without a loss: for forward and vjp."""
    input x: [1, 6, 6]
    lstm = ConvLSTM(hidden = 2)
    h = lstm(x)
    weight W_y = kernel(1, 1)
    pred = sigmoid(conv(h, W_y))
    output pred
}
'''


def test_a_model_without_a_loss_compiles_for_forward_and_vjp():
    mod = api.load(std_model_path("no_loss"), text=NO_LOSS, vjp=True)
    assert mod.MODEL["loss"] == [] and mod.MODEL["targets"] == {}
    params = random_params(mod, seed=10)
    inputs, _ = random_batch(mod, N=N, T=T, seed=10)
    C, S = _cotangents(mod, params, inputs, steps=T)
    f = _functional(mod, C, S, steps=T)
    pc, ic, _ = mod.vjp(params, inputs, C, state_cotangents=S)
    u = {k: np.random.default_rng(1).standard_normal(v.shape) for k, v in params.items()}
    fd = _directional(f, dict(params=params, inputs=inputs), u, "params")
    assert abs(fd - _dot(pc, u)) <= 1e-6 * max(abs(fd), 1.0)
    for call in (mod.loss, mod.loss_and_grad):
        with pytest.raises(ConvcError, match="has no loss"):
            call(params, inputs, {})


@pytest.mark.parametrize("name", ["encoder_forecaster", "std_convlstm"])
def test_vjp_start_for_the_parameters_only_skips_the_rest(name):
    mod = _load(name)
    params = random_params(mod, seed=12)
    inputs, _ = random_batch(mod, N=N, T=T, seed=12)
    C, S = _cotangents(mod, params, inputs, steps=T)
    full = mod.vjp_start(params, inputs, steps=T)[2](C, state_cotangents=S)
    outputs, final, pullback = mod.vjp_start(params, inputs, steps=T, wrt="params")
    pc, ic, sc = pullback(C, state_cotangents=S)
    assert ic == {} and sc == {} and set(pc) == set(params)
    for k in pc:
        np.testing.assert_allclose(pc[k], full[0][k], rtol=1e-13, atol=1e-15, err_msg=k)
    # the parameters-only backward pass has less to do: no input convolution's gradient
    src = mod.source
    body = src[src.index("def _vjp_steps_params"):]
    assert body.count("conv2d_grad_input") < \
        src[src.index("def _vjp_steps("):src.index("def _vjp_steps_params")].count(
            "conv2d_grad_input")
    with pytest.raises(ValueError, match="wrt="):
        mod.vjp_start(params, inputs, steps=T, wrt="inputs")

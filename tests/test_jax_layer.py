"""convc.jax.layer: a compiled model as a jax.custom_vjp function (docs/jax.md).

In float64: the layer's outputs and final states are the module's forward();
jax.grad of a scalar function of them (eager and under jax.jit) equals
central finite differences of forward() in the parameters, the inputs and the
initial states, and passes jax.test_util.check_grads in reverse mode; and a
JAX encoder, the layer and a JAX head train under Adam to the losses and
parameters (1e-10 relative) of the same model written in jax.numpy and
jax.lax.conv_general_dilated alone. The page's example must run.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from helpers import (EXAMPLES, ROOT, STD_MODELS, assert_convc_leaves_out, one_blas_thread,  # noqa: F401
                     random_batch, run_docs_python,
                     random_params, random_state, shrink, std_model_path)
from test_vjp import LEARNED

jax = pytest.importorskip("jax", reason="convc.jax needs JAX (pip install 'convc[jax]')")
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import convc.api as api  # noqa: E402
import convc.jax as cjax  # noqa: E402
from convc.runtime import layouts  # noqa: E402

N, T = 2, 3


@pytest.fixture(autouse=True, scope="module")
def float64():
    """JAX in float64 for this module's tests only."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


def _load(name: str):
    if name == "learned_start":  # a state whose start is a parameter
        return api.load(None, text=LEARNED, vjp=True)
    if name in STD_MODELS:
        return api.load(std_model_path(name), text=STD_MODELS[name], vjp=True)
    path = next(p for p in EXAMPLES if p.stem == name)
    return api.load(path, text=shrink(path.read_text(encoding="utf-8")), vjp=True)


def _steps(mod):
    in_axes = {mod.MODEL["axes"][n] for n in mod.MODEL["inputs"]}
    return T if set(mod.MODEL["vjp"]["output_axes"].values()) - in_axes else None


def _point(name: str, seed: int = 1):
    mod = _load(name)
    params = random_params(mod, seed=seed)
    inputs, _ = random_batch(mod, N=N, T=T, seed=seed)
    state = {k: v for k, v in random_state(mod, N=N, seed=seed).items()
             if mod.MODEL["states"][k]["init"] != "final"}
    return mod, params, inputs, state


def _weights(mod, params, inputs, state, steps, seed=2):
    out, fin = mod.forward(params, inputs, state=state, steps=steps)
    rng = np.random.default_rng(seed)
    return ({k: rng.standard_normal(v.shape) for k, v in out.items()},
            {k: rng.standard_normal(v.shape) for k, v in fin.items()})


@pytest.mark.parametrize("name", ["encoder_forecaster", "stack", "std_convgru", "seed",
                                  "learned_start"])
def test_grad_equals_finite_differences_eager_and_jitted(name):
    mod, params, inputs, state = _point(name)
    steps = _steps(mod)
    f = cjax.layer(mod)
    C, S = _weights(mod, params, inputs, state, steps)

    def scalar(params, inputs, state):
        out, fin = f(params, inputs, state, steps=steps)
        return sum(jnp.sum(out[k] * C[k]) for k in C) + sum(jnp.sum(fin[k] * S[k]) for k in S)

    def numpy_scalar(params, inputs, state):
        out, fin = mod.forward(params, inputs, state=state, steps=steps)
        return sum(float(np.sum(out[k] * C[k])) for k in C) + \
            sum(float(np.sum(fin[k] * S[k])) for k in S)

    out, fin = f(params, inputs, state, steps=steps)
    want, wfin = mod.forward(params, inputs, state=state, steps=steps)
    assert set(fin) == set(wfin) and all(np.array_equal(out[k], want[k]) for k in want)
    assert all(np.array_equal(fin[k], wfin[k]) for k in wfin)
    grad = jax.grad(scalar, argnums=(0, 1, 2))
    eager = grad(params, inputs, state)
    jitted = jax.jit(grad)(params, inputs, state)
    rng = np.random.default_rng(3)
    point = dict(params=params, inputs=inputs, state=state)
    eps = 1e-6
    for j, where in enumerate(("params", "inputs", "state")):
        assert set(eager[j]) == set(point[where])
        for k in eager[j]:  # the same callbacks under jit: the same numbers
            assert eager[j][k].dtype == jnp.float64 and eager[j][k].shape == point[where][k].shape
            np.testing.assert_allclose(jitted[j][k], eager[j][k], rtol=1e-13, atol=1e-15)
        if not point[where]:
            continue
        u = {k: rng.standard_normal(np.shape(v)) for k, v in point[where].items()}

        def at(sign):
            moved = {k: point[where][k] + sign * eps * u[k] for k in u}
            return numpy_scalar(**dict(point, **{where: moved}))
        fd = (at(1) - at(-1)) / (2 * eps)
        an = sum(float(np.sum(np.asarray(eager[j][k]) * u[k])) for k in u)
        assert abs(fd - an) <= 1e-6 * max(abs(an), 1.0), (where, fd, an)


def test_check_grads_in_reverse_mode():
    from jax.test_util import check_grads

    mod, params, inputs, state = _point("std_convlstm", seed=4)
    f = cjax.layer(mod)
    C, S = _weights(mod, params, inputs, state, None)

    def scalar(params, inputs, state):
        out, fin = f(params, inputs, state)
        return jnp.sum(out["pred"] * C["pred"]) + jnp.sum(fin["l.c"] * S["l.c"])
    check_grads(scalar, (params, inputs, state), order=1, modes=["rev"])
    check_grads(jax.jit(scalar), (params, inputs, state), order=1, modes=["rev"])

    def wrong(params, inputs, state):  # and it would see a wrong gradient
        return scalar(params, inputs, state) + lax.stop_gradient(jnp.sum(inputs["x"] ** 2))
    with pytest.raises(AssertionError):
        check_grads(wrong, (params, inputs, state), order=1, modes=["rev"])


def test_vmap_and_what_is_refused():
    mod, params, inputs, state = _point("encoder_forecaster", seed=5)
    f = cjax.layer(mod)
    stacked = {"x": np.stack([inputs["x"], 2 * inputs["x"]])}
    out, _ = jax.vmap(lambda x: f(params, x, steps=T))(stacked)
    for j in range(2):
        want, _ = mod.forward(params, {"x": stacked["x"][j]}, steps=T)
        np.testing.assert_array_equal(out["pred"][j], want["pred"])
    with pytest.raises(ValueError, match="give steps="):
        f(params, inputs)
    with pytest.raises(ValueError, match="fc1.h starts from another loop"):
        f(params, inputs, {"fc1.h": np.zeros((N, 3, 8, 8))}, steps=T)
    with pytest.raises(KeyError, match="params has no W_out"):
        f({k: v for k, v in params.items() if k != "W_out"}, inputs, steps=T)


# ----------------------------------------------- a JAX encoder + convc + head, under Adam

CORE = '''
import std

model core {
    """The recurrent core of a JAX model: one std ConvLSTM, with peepholes."""
    input x: [2, 8, 8]
    lstm = ConvLSTM(hidden = 3, kernel = 3)
    h = lstm(x)
    output h
}
'''


def _conv(x, w, pad):
    return lax.conv_general_dilated(x, w, (1, 1), [(pad, pad), (pad, pad)],
                                    dimension_numbers=("NCHW", "OIHW", "NCHW"))


def _per_frame(x, w, b, pad):
    n, t = x.shape[:2]
    y = _conv(x.reshape((n * t,) + x.shape[2:]), w, pad) + b[None, :, None, None]
    return y.reshape((n, t) + y.shape[1:])


def _convlstm(sd, x):
    """Shi et al.'s ConvLSTM in jax.numpy: one convolution over concat(x, h), gate order
    i, f, o, g, peepholes wci, wcf on c[t-1] and wco on the new c."""
    hidden = sd["wci"].shape[1]

    def step(carry, x_t):
        h, c = carry
        z = _conv(jnp.concatenate([x_t, h], axis=1), sd["conv.weight"], 1) + \
            sd["conv.bias"][None, :, None, None]
        zi, zf, zo, zg = jnp.split(z, 4, axis=1)
        i = jax.nn.sigmoid(zi + sd["wci"] * c)
        f = jax.nn.sigmoid(zf + sd["wcf"] * c)
        c = f * c + i * jnp.tanh(zg)
        h = jax.nn.sigmoid(zo + sd["wco"] * c) * jnp.tanh(c)
        return (h, c), h
    zeros = jnp.zeros((x.shape[0], hidden) + x.shape[3:])
    _, hs = lax.scan(step, (zeros, zeros), jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(hs, 0, 1)


def _loss(core):
    def loss(theta, x, y):
        h = core(theta["core"], _per_frame(x, theta["enc_W"], theta["enc_b"], 1))
        return jnp.mean((_per_frame(h, theta["head_W"], theta["head_b"], 0) - y) ** 2)
    return loss


@jax.jit
def _adam(theta, grads, m, v, step, lr=0.01, b1=0.9, b2=0.999, eps=1e-8):
    tm = jax.tree_util.tree_map
    m = tm(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
    v = tm(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
    scale = lr * jnp.sqrt(1 - b2 ** step) / (1 - b1 ** step)
    theta = tm(lambda p, m, v: p - scale * m / (jnp.sqrt(v) + eps), theta, m, v)
    return theta, m, v


def _close(a, b) -> bool:
    """Equal to 1e-10 relative to the larger magnitude in b."""
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b)) <= 1e-10 * max(np.max(np.abs(b)), 1e-300)


def test_a_jax_model_with_the_layer_trains_like_one_written_in_jax():
    mod = api.load(std_model_path("core"), text=CORE, vjp=True)
    layer = cjax.layer(mod)
    start = random_params(mod, seed=3)
    rng = np.random.default_rng(1)
    rest = {"enc_W": rng.normal(0, 0.5, (2, 1, 3, 3)), "enc_b": rng.normal(0, 0.1, 2),
            "head_W": rng.normal(0, 0.5, (1, 3, 1, 1)), "head_b": np.zeros(1)}
    models = {
        "convc": (_loss(lambda p, x: layer(p, {"x": x})[0]["h"]), dict(rest, core=start)),
        "jax": (_loss(_convlstm), dict(rest, core=layouts.to_torch_convlstm(start, mod, "lstm"))),
    }
    data = np.random.default_rng(0)
    batches = [(data.uniform(0, 1, (2, 3, 1, 8, 8)), data.uniform(0, 1, (2, 3, 1, 8, 8)))
               for _ in range(20)]
    losses, final = {}, {}
    for key, (loss, theta) in models.items():
        step = jax.jit(jax.value_and_grad(loss))
        theta = jax.tree_util.tree_map(jnp.asarray, theta)
        m = jax.tree_util.tree_map(jnp.zeros_like, theta)
        v = jax.tree_util.tree_map(jnp.zeros_like, theta)
        losses[key] = []
        for k, (x, y) in enumerate(batches, start=1):
            value, grads = step(theta, x, y)
            theta, m, v = _adam(theta, grads, m, v, float(k))
            losses[key].append(float(value))
        final[key] = theta
    assert losses["convc"][-1] < 0.7 * losses["convc"][0]  # it learns
    assert _close(losses["convc"], losses["jax"]), (losses["convc"], losses["jax"])
    for k in rest:
        assert _close(final["convc"][k], final["jax"][k]), k
    trained = {k: np.asarray(v) for k, v in final["convc"]["core"].items()}
    mapped = layouts.to_torch_convlstm(trained, mod, "lstm")
    before = layouts.to_torch_convlstm(start, mod, "lstm")
    for k, v in mapped.items():
        assert not _close(v, before[k])  # it trained
        assert _close(v, final["jax"]["core"][k]), k


def test_import_convc_does_not_import_jax():
    assert_convc_leaves_out("jax", "convc.jax", CORE)


# ---------------------------------------------------------------- docs/jax.md

def test_the_docs_example_runs(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    namespace = run_docs_python("jax.md", "convc.jax.layer", tmp_path)
    assert namespace["losses"][-1] < namespace["losses"][0]

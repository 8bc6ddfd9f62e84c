"""convc's generated BPTT against the same models written by hand in Chainer.

The seed model (examples/seed.cell) and a standard-library ConvLSTM with
peepholes are written independently with Chainer's autograd
(chainer.functions: convolution_2d, sigmoid, tanh, concat, split_axis,
sigmoid_cross_entropy, mean_squared_error), given the same float64 weights
and data, and must agree with convc on the loss and on every gradient to
1e-10 (relative to the largest element).

How convc's losses are normalised, which the Chainer code mirrors: the mean
over every element of the steps a loss covers (`steps = last`: the last step
only); `bce` of a sigmoid is computed from the logits, which is what
sigmoid_cross_entropy(normalize=True) computes for 0/1 targets.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from helpers import one_blas_thread  # noqa: F401  (an autouse fixture)
from helpers import EXAMPLES, load_example, load_text, random_batch, random_params

if importlib.util.find_spec("chainer") is None:
    pytest.skip("chainer not installed", allow_module_level=True)

from convc.runtime._chainer_compat import import_chainer  # noqa: E402

chainer = import_chainer()
F = chainer.functions

TOL = 1e-10


def assert_close(got, want, what: str) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, what
    scale = max(float(np.abs(want).max()), 1e-300)
    err = float(np.abs(got - want).max()) / scale
    assert err <= TOL, f"{what}: relative error {err:.2e}"


def variables(params: dict) -> dict:
    return {k: chainer.Variable(np.array(v, dtype=np.float64)) for k, v in params.items()}


def per_channel(b, like):
    """A [C] bias added to (N, C, H, W)."""
    return F.broadcast_to(F.reshape(b, (1, b.shape[0], 1, 1)), like.shape)


def per_pixel(w, like):
    """A [C, H, W] weight against (N, C, H, W)."""
    return F.broadcast_to(F.reshape(w, (1,) + w.shape), like.shape)


# ---------------------------------------------------------------- the seed model

def chainer_seed(p: dict, x: np.ndarray, y: np.ndarray):
    """examples/seed.cell by hand: loss bce(sigmoid(conv(h, W_y) + b_y), y, steps = last)."""
    n, T = x.shape[:2]
    hidden = p["lstm.b_i"].shape[0]
    h = np.zeros((n, hidden) + x.shape[3:])
    c = np.zeros_like(h)
    for t in range(T):
        z = F.convolution_2d(F.concat((x[:, t], h), axis=1), p["lstm.W"], pad=1)
        z_i, z_f, z_c, z_o = F.split_axis(z, 4, axis=1)
        i = F.sigmoid(z_i + per_pixel(p["lstm.b_i"], z_i))
        f = F.sigmoid(z_f + per_pixel(p["lstm.b_f"], z_f))
        a = F.tanh(z_c + per_pixel(p["lstm.b_c"], z_c))
        o = F.sigmoid(z_o + per_pixel(p["lstm.b_o"], z_o))
        c = f * c + i * a
        h = o * F.tanh(c)
    logits = F.convolution_2d(h, p["W_y"]) + per_pixel(p["b_y"], y[:, -1])
    return F.sigmoid_cross_entropy(logits, y[:, -1].astype(np.int32), normalize=True)


def test_seed_matches_chainer():
    path = next(p for p in EXAMPLES if p.stem == "seed")
    mod = load_example(path, small=False)  # the example as written: 16x16, hidden 8
    params = random_params(mod, seed=11)
    inputs, targets = random_batch(mod, N=2, T=4, seed=11)
    targets = {k: (v > 0.5).astype(np.float64) for k, v in targets.items()}  # 0/1 pixels

    loss, grads, _ = mod.loss_and_grad(params, inputs, targets)

    p = variables(params)
    ref = chainer_seed(p, inputs["x"], targets["y"])
    ref.backward()
    assert_close(loss, ref.array, "loss")
    for name in sorted(params):
        assert p[name].grad is not None, name
        assert_close(grads[name], p[name].grad, name)


# ---------------------------------------------------------------- ConvLSTM with peepholes

PEEPHOLE = """import std

model peephole {
    input x: [2, 8, 8]
    target y: [1, 8, 8]
    l = ConvLSTM(hidden = 4, kernel = 3, peephole = true)
    h = l(x)
    weight W_out = kernel(1, 3)
    weight b_out = bias(1)
    pred = conv(h, W_out) + b_out
    output pred
    loss mse(pred, y)
}
"""


def chainer_peephole(p: dict, x: np.ndarray, y: np.ndarray):
    """std.cell's ConvLSTM (Shi et al. 2015) by hand, gate order i, f, g, o; mse over all steps."""
    n, T = x.shape[:2]
    hidden = p["l.b_i"].shape[0]
    h = np.zeros((n, hidden) + x.shape[3:])
    c = np.zeros_like(h)
    preds = []
    for t in range(T):
        z = F.convolution_2d(x[:, t], p["l.W_x"], pad=1) + F.convolution_2d(h, p["l.W_h"], pad=1)
        z_i, z_f, z_g, z_o = F.split_axis(z, 4, axis=1)
        i = F.sigmoid(z_i + per_pixel(p["l.w_ci"], z_i) * c + per_channel(p["l.b_i"], z_i))
        f = F.sigmoid(z_f + per_pixel(p["l.w_cf"], z_f) * c + per_channel(p["l.b_f"], z_f))
        c = f * c + i * F.tanh(z_g + per_channel(p["l.b_g"], z_g))
        o = F.sigmoid(z_o + per_pixel(p["l.w_co"], z_o) * c + per_channel(p["l.b_o"], z_o))
        h = o * F.tanh(c)
        out = F.convolution_2d(h, p["W_out"], pad=1)
        preds.append(out + per_channel(p["b_out"], out))
    return F.mean_squared_error(F.stack(preds, axis=1), y)


def test_peephole_convlstm_matches_chainer():
    mod = load_text(PEEPHOLE, "test_chainer_parity_peephole.cell")
    params = random_params(mod, seed=12)
    inputs, targets = random_batch(mod, N=2, T=5, seed=12)

    loss, grads, _ = mod.loss_and_grad(params, inputs, targets)

    p = variables(params)
    ref = chainer_peephole(p, inputs["x"], targets["y"])
    ref.backward()
    assert_close(loss, ref.array, "loss")
    assert set(grads) == set(p)
    for name in sorted(params):
        assert p[name].grad is not None, name
        assert_close(grads[name], p[name].grad, name)

"""A cell run without input (a forecaster, `fc(steps = y, init = enc)`) sees zeros.

Every cell must work that way, also one that concatenates its input with its
state (std ConvLSTMFused, docs/language.md's Elman): the zeros have the
channels of the frames the cell steps over, so the kernel has the same shape
as the encoder's, and the compiler folds the convolution over them away (the
kernel's columns for the zeros get a zero gradient). Each model compiles,
trains a step, and its gradients match finite differences.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from convc.runtime import train as T
from helpers import one_blas_thread  # noqa: F401  (an autouse fixture)
from helpers import check_gradients, load_text, random_batch, random_params

ELMAN = """
cell Elman(hidden, kernel = 3) {
    input x
    state h = zeros
    weight W = kernel(hidden, kernel)
    weight b = bias(hidden)
    h = tanh(conv(concat(x, h[t-1]), W) + b)
    output h
}
"""

FORECASTER = """
model fc_{cell} {{
    input x: [2, 8, 8]
    target y: [2, 8, 8]
    enc = {cell}(hidden = 3)
    h = enc(x)
    fc = {cell}(hidden = 3)
    g = fc(steps = y, init = enc)
    weight W_out = kernel(2, 1)
    pred = sigmoid(conv(g, W_out))
    output pred
    loss bce(pred, y)
}}
"""

CASES = {
    "ConvLSTMFused": "import std\n" + FORECASTER.format(cell="ConvLSTMFused"),
    "Elman": ELMAN + FORECASTER.format(cell="Elman"),
    # the zeros in the middle of a concat, and split of them
    "middle": """
cell Mid(hidden) {
    input x
    state h = zeros
    weight W = kernel(hidden, 3)
    a, b = split(x, 2)
    h = tanh(conv(concat(h[t-1], a, h[t-1], b), W))
    output h
}
""" + FORECASTER.format(cell="Mid"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def model(request):
    return load_text(CASES[request.param], name=f"forecaster_{request.param}.cell")


def test_the_zeros_have_the_frames_channels_and_their_work_is_folded_away(model):
    g = model.compiled.lowered.graph
    ops = {g.node(n).op for n in g.g.nodes}
    assert "pad_zeros" not in ops
    params = model.init_params(seed=0, dtype="float64")
    assert params["fc.W"].shape == params["enc.W"].shape
    # no convolution of the forecaster reads a value as wide as the encoder's concat
    wide = params["enc.W"].shape[1]
    for n in g.g.nodes:
        node = g.node(n)
        if node.op == "conv" and node.attrs.get("_instance") == "fc":
            assert g.node(node.inputs[0]).shape[0] < wide


def test_gradients_match_finite_differences(model):
    params = random_params(model, seed=4)
    inputs, targets = random_batch(model, N=2, T=3, seed=4)
    check_gradients(model, params, inputs, targets)
    # the kernel's columns that only ever met zeros get no gradient
    _, grads = model.loss_and_grad(params, inputs, targets)[:2]
    dW = np.asarray(grads["fc.W"])
    zero_cols = [c for c in range(dW.shape[1]) if not np.any(dW[:, c])]
    assert len(zero_cols) == 2  # the target's two channels


def test_trains_a_step(model):
    clips = np.random.default_rng(0).uniform(0.0, 1.0, (4, 5, 2, 8, 8))
    result = T.train(model, steps=1, frames_in=3, frames_out=2, clips=clips, batch_size=2,
                     progress=False)
    assert result.steps == 1 and all(math.isfinite(v) for v in result.losses)

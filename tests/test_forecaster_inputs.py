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
from convc.runtime.gradcheck import gradcheck
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


# ---------------------------------------------------------------- every cell as a forecaster
# Cells whose zeros reach more than a concat: a new state that reads only the input (its
# shape then comes from init=), values split from the conv of the zeros (used or not),
# gates of the zeros alone, a conv or concat of what the zeros give (sigmoid(0) = 0.5, a
# bias), an output that is no state. Each is its own encoder's cell, the forecaster run
# over the targets' steps from the encoder's final states; `folded` are the forecaster's
# weights that only ever meet zeros: they must not be parameters of the model.

FORECAST = """
model fc_{name} {{
    input x: [1, 6, 6]
    target y: [1, 6, 6]
    l0 = {call}
    h0 = l0(x)
    f0 = {call}
    g0 = f0(steps = y{init})
    weight W_out = kernel(1, 1)
    weight b_out = bias(1)
    pred = sigmoid(conv(g0, W_out) + b_out)
    output pred
    loss bce(pred, y, steps = {steps})
}}
"""

CELLS = {
    # h reads only its input: tanh(0) = 0 at every step, of the shape init= gives the state
    "input_only": ("""
cell R0(hidden) {
    input x
    state h = zeros
    weight W0 = kernel(hidden, 1)
    h = tanh(conv(x, W0))
    output h
}""", "R0(hidden = 2)", ["f0.W0"]),
    # a value nobody reads, split from the conv of the zeros (2 * hidden channels)
    "unused_split": ("""
cell R0(hidden) {
    input x
    state h = zeros
    weight W0 = kernel(2 * hidden, 1)
    weight W1 = kernel(hidden, 1)
    s0, s1 = split(conv(x, W0), 2)
    h = tanh(conv(concat(x, h[t-1]), W1))
    output h
}""", "R0(hidden = 2)", ["f0.W0"]),
    "split_used": ("""
cell S(hidden) {
    input x
    state h = zeros
    weight W = kernel(2 * hidden, 3)
    weight U = kernel(hidden, 3)
    a, b = split(conv(x, W), 2)
    h = tanh(a + conv(h[t-1], U)) * sigmoid(b)
    output h
}""", "S(hidden = 2)", ["f0.W"]),
    "gate_of_zeros": ("""
cell G(hidden) {
    input x
    state h = zeros
    weight W = kernel(hidden, 3)
    h = sigmoid(conv(x, W)) * h[t-1]
    output h
}""", "G(hidden = 2)", ["f0.W"]),
    # c reads only x (a constant in the forecaster, [hidden, 1, 1] with its bias)
    "c_reads_only_x": ("""
cell C(hidden) {
    input x
    state h = zeros
    state c = zeros
    weight W = kernel(hidden, 3)
    weight U = kernel(hidden, 3)
    weight b = bias(hidden)
    c = tanh(conv(x, W) + b)
    h = tanh(conv(h[t-1], U) + c[t-1])
    output h
}""", "C(hidden = 2)", ["f0.W"]),
    "c_reads_only_x_no_bias": ("""
cell P(hidden) {
    input x
    state h = zeros
    state c = zeros
    weight W = kernel(hidden, 3)
    weight U = kernel(hidden, 3)
    c = tanh(conv(x, W))
    h = tanh(conv(h[t-1], U) + c[t-1])
    output h
}""", "P(hidden = 2)", ["f0.W"]),
    # a conv of sigmoid(conv(0) + b): a constant image, convolved for real (its borders)
    "conv_of_constant": ("""
cell K(hidden) {
    input x
    state h = zeros
    weight W1 = kernel(hidden, 3)
    weight W2 = kernel(hidden, 3)
    weight U = kernel(hidden, 3)
    weight b = bias(hidden)
    e = sigmoid(conv(x, W1) + b)
    h = tanh(conv(e, W2) + conv(h[t-1], U))
    output h
}""", "K(hidden = 2)", ["f0.W1"]),
    "concat_of_constant": ("""
cell Q(hidden) {
    input x
    state h = zeros
    weight W1 = kernel(hidden, 1)
    weight W2 = kernel(hidden, 3)
    weight b = bias(hidden)
    e = relu(conv(x, W1) + b)
    h = tanh(conv(concat(e, h[t-1]), W2))
    output h
}""", "Q(hidden = 2)", ["f0.W1"]),
    # the output is no state: sigmoid(b), as an array of the zeros' conv's shape
    "output_not_a_state": ("""
cell O(hidden) {
    input x
    state h = zeros
    weight W = kernel(hidden, 3)
    weight U = kernel(hidden, 3)
    weight V = kernel(hidden, 3)
    weight b = bias(hidden)
    h = tanh(conv(x, W) + conv(h[t-1], U))
    g = sigmoid(conv(x, V) + b)
    output g
}""", "O(hidden = 2)", ["f0.V", "f0.W"]),
    "ConvLSTM_peephole": ("import std", "ConvLSTM(hidden = 2, peephole = true)", ["f0.W_x"]),
    "ConvLSTM": ("import std", "ConvLSTM(hidden = 2, peephole = false)", ["f0.W_x"]),
    "ConvGRU": ("import std", "ConvGRU(hidden = 2)", ["f0.W_xzr", "f0.W_xn"]),
}


def _forecaster(name: str, init: str = ", init = l0", steps: str = "last"):
    cell, call, _ = CELLS[name]
    text = cell + FORECAST.format(name=name, call=call, init=init, steps=steps)
    return load_text(text, name=f"forecaster_{name}.cell")


@pytest.fixture(scope="module", params=sorted(CELLS))
def forecaster(request):
    return request.param, _forecaster(request.param)


def test_every_cell_compiles_as_a_forecaster_with_its_zero_work_folded(forecaster):
    name, mod = forecaster
    params = mod.MODEL["params"]
    for w in CELLS[name][2]:
        assert w not in params, f"{w} only ever meets zeros"
    g = mod.compiled.lowered.graph
    for n in g.g.nodes:
        node = g.node(n)
        assert node.op != "pad_zeros"
        if node.op == "conv":  # nothing convolves a constant (zeros fold, others expand)
            assert g.node(node.inputs[0]).op != "const", n


@pytest.mark.parametrize("bptt", [None, 2])
def test_every_cell_as_a_forecaster_passes_gradcheck(forecaster, bptt):
    name, mod = forecaster
    r = gradcheck(mod, frames=3, frames_out=3, bptt=bptt)
    assert r.verdict == "PASS", r


def test_every_cell_as_a_forecaster_trains_a_step(forecaster):
    _, mod = forecaster
    clips = np.random.default_rng(0).uniform(0.0, 1.0, (4, 5, 1, 6, 6))
    result = T.train(mod, steps=1, frames_in=3, frames_out=2, clips=clips, batch_size=2,
                     progress=False)
    assert result.steps == 1 and all(math.isfinite(v) for v in result.losses)


def test_a_forecaster_whose_state_reads_only_its_input_outputs_zeros():
    """h = tanh(conv(x, W0)) run without input is 0 at every step, of the encoder's shape
    [hidden, H, W]: the head sees zeros, and the encoder gets no gradient."""
    mod = _forecaster("input_only")
    params = random_params(mod, seed=1)
    inputs, targets = random_batch(mod, N=2, T=3, T_out=2, seed=1)
    (outputs, finals) = mod.forward(params, inputs, steps=2)
    b = params["b_out"][0]
    np.testing.assert_allclose(outputs["pred"], 1 / (1 + np.exp(-b)) * np.ones((2, 2, 1, 6, 6)))
    assert finals["f0.h"].shape == (2, 2, 6, 6) and not np.any(finals["f0.h"])
    _, grads, _ = mod.loss_and_grad(params, inputs, targets)
    assert not np.any(grads["l0.W0"])


def test_a_forecaster_without_init_takes_the_shape_of_the_conv_of_its_zeros():
    """No init=: the state of a cell whose h reads only its input has the shape of
    conv(zeros, W0), the kernel's channels and the frames' height and width."""
    cell = """
cell R(hidden) {
    input x
    state h = zeros
    weight W0 = kernel(hidden, 3)
    weight b = bias(hidden)
    h = tanh(conv(x, W0) + b)
    output h
}"""
    text = cell + FORECAST.format(name="noinit", call="R(hidden = 2)", init="", steps="all")
    mod = load_text(text, name="forecaster_noinit.cell")
    assert "f0.W0" not in mod.MODEL["params"] and "f0.b" in mod.MODEL["params"]
    assert tuple(mod.MODEL["states"]["f0.h"]["shape"]) == (2, 6, 6)
    for bptt in (None, 2):
        assert gradcheck(mod, frames=3, frames_out=3, bptt=bptt).verdict == "PASS"


# ---------------------------------------------------------------- the backward pass between loops

TWO_LAYERS = """
cell Elman(hidden) {
    input x
    state h = zeros
    weight W = kernel(hidden, 1)
    weight U = kernel(hidden, 1)
    h = tanh(conv(x, W) + conv(h[t-1], U))
    output h
}

cell Leaky(hidden) {
    input x
    state h = zeros
    weight W0 = kernel(hidden, 1)
    h = tanh(h[t-1] + conv(x, W0))
    output h
}

model two_layers {
    input x: [1, 6, 6]
    target y: [1, 6, 6]
    l0 = Elman(hidden = 2)
    h0 = l0(x)
    l1 = Leaky(hidden = 2)
    h1 = l1(h0)
    f0 = Elman(hidden = 2)
    g0 = f0(steps = y, init = l0)
    f1 = Leaky(hidden = 2)
    g1 = f1(g0, init = l1)
    weight W_out = kernel(1, 1)
    pred = sigmoid(conv(g1, W_out))
    output pred
    loss bce(pred, y)
}
"""

ENCODER_READS_ONLY_X = """
cell R0(hidden) {
    input x
    state h = zeros
    weight W0 = kernel(hidden, 3)
    h = tanh(conv(x, W0))
    output h
}
""" + ELMAN + """
model mixed {
    input x: [1, 6, 6]
    target y: [1, 6, 6]
    l0 = R0(hidden = 2)
    h0 = l0(x)
    f0 = Elman(hidden = 2)
    g0 = f0(steps = y, init = l0)
    weight W_out = kernel(1, 1)
    pred = sigmoid(conv(g0, W_out))
    output pred
    loss bce(pred, y)
}
"""


@pytest.mark.parametrize("text", [TWO_LAYERS, ENCODER_READS_ONLY_X], ids=["two_layers", "mixed"])
@pytest.mark.parametrize("bptt", [None, 2])
def test_the_gradient_of_an_encoders_final_state_reaches_it(text, bptt):
    """Two layers: the cotangent of f1's start (a row of an arena buffer) is still itself
    when l1's backward loop reads it, after f0's backward loop has had the arena. An
    encoder whose h reads only x: its final state's cotangent enters at the last step,
    and no step before it sees it again."""
    mod = load_text(text, name=f"forecaster_grad_{zlib_name(text)}.cell")
    r = gradcheck(mod, frames=3, frames_out=3, bptt=bptt)
    assert r.verdict == "PASS", r


def zlib_name(text: str) -> str:
    import zlib
    return f"{zlib.crc32(text.encode()):08x}"

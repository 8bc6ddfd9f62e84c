"""Random models: Hypothesis writes `.cell` files, each must compile and pass the checks.

A random cell has a state h (and maybe c) whose equations are random
expression trees over the cell's input and the states at t-1: convolutions
with 1x1, 3x3 or 5x5 kernels (stride 1, padding same, sometimes dilation 2)
of x, h[t-1], c[t-1] or concat(x, h[t-1]); sigmoid, tanh, relu,
hard_sigmoid; +, -, *, scaling by constants; values split from one wide
convolution. One to three layers are stacked, random cells mixed with the
standard library's (ConvLSTM with peepholes on or off, ConvLSTMFused,
ConvGRU), each reading the layer below (or an expression of it, or its
concatenation with the input), under a bce, mse or cross-entropy head, with
full or truncated BPTT, from zero or given states.

Every model must (1) compile, (2) compute the same forward pass and loss as
the reference interpreter (compiler/interp.py) and (3) pass the float64
gradient check of tests/test_gradients.py for every parameter.

relu and hard_sigmoid have kinks where a finite difference is wrong; they
are only applied where their input stays at least 0.5 away from the kinks
(relu(tanh(e) + 1.5), hard_sigmoid(2 * tanh(e)), ...), so both branches of
their gradients are exercised and no finite difference crosses a kink.

Default: 25 examples (well under a minute). Under the "fuzz" profile
(`pytest --hypothesis-profile=fuzz tests/test_random_models.py`, or
`HYPOTHESIS_PROFILE=fuzz`) the profile's max_examples, kept between 300 and
1000 (each example takes about a second).
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from convc.compiler.interp import run_forward
from helpers import one_blas_thread  # noqa: F401  (an autouse fixture)
from helpers import check_gradients, load_text, random_batch, random_params, random_state

# A state whose new value reads no state at t-1 (a one-step delay, c = f(x)), or states
# that only meet across a step: their carries are read after the backward loop
# (test_state_update_without_recurrence has the first reproducers).
STATELESS_UPDATES = True

DEFAULT_EXAMPLES = 25
FUZZ_EXAMPLES = (300, 1000)  # at least, at most: one example takes about a second


def _max_examples() -> int:
    """25 normally; under the "fuzz" profile its max_examples, within FUZZ_EXAMPLES."""
    current = getattr(settings, "get_current_profile_name", lambda: None)()
    profile = os.environ.get("HYPOTHESIS_PROFILE") or current
    if profile != "fuzz":
        return DEFAULT_EXAMPLES
    try:
        wanted = settings.get_profile("fuzz").max_examples
    except Exception:  # tests/conftest.py registers the profile; without it, the minimum
        wanted = FUZZ_EXAMPLES[0]
    return min(max(wanted, FUZZ_EXAMPLES[0]), FUZZ_EXAMPLES[1])


# ---------------------------------------------------------------- writing cells

@dataclass
class CellWriter:
    """Builds one random cell's text while Hypothesis draws its parts."""

    name: str
    draw: object
    states: list[str]
    kinks: bool = False  # also relu and hard_sigmoid where a kink is within reach
    weights: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    values: list[str] = field(default_factory=list)  # named intermediates (split parts)

    def kernel(self, out: str, size: int) -> str:
        w = f"W{len(self.weights)}"
        self.weights.append(f"weight {w} = kernel({out}, {size})")
        return w

    def bias(self) -> str:
        b = f"b{len(self.weights)}"
        self.weights.append(f"weight {b} = bias(hidden)")
        return b

    def conv_of(self, src: str, out: str = "hidden") -> str:
        size = self.draw(st.sampled_from([1, 3, 5]))
        dilated = size > 1 and self.draw(st.booleans())
        w = self.kernel(out, size)
        return f"conv({src}, {w}{', dilation = 2' if dilated else ''})"

    def source(self) -> str:
        options = ["x", "h[t-1]", "concat(x, h[t-1])"] + [f"{s}[t-1]" for s in self.states[1:]]
        return self.draw(st.sampled_from(options))

    def leaf(self) -> str:
        kind = self.draw(st.sampled_from(["conv", "conv", "conv", "state", "value"]))
        if kind == "value" and self.values:
            return self.draw(st.sampled_from(self.values))
        if kind == "state":
            return self.draw(st.sampled_from([f"{s}[t-1]" for s in self.states]))
        return self.conv_of(self.source())

    def expr(self, depth: int) -> str:
        if depth == 0 or self.draw(st.integers(0, 3)) == 0:
            return self.leaf()
        kind = self.draw(st.sampled_from(["act", "add", "sub", "mul", "scale", "bias", "kink"]))
        if kind == "act":
            f = self.draw(st.sampled_from(["sigmoid", "tanh"]))
            return f"{f}({self.expr(depth - 1)})"
        if kind == "kink":
            inner = self.expr(depth - 1)
            return self.draw(st.sampled_from([
                f"relu(tanh({inner}) + 1.5)",  # slope 1
                f"relu(tanh({inner}) - 1.5)",  # flat at 0
                f"hard_sigmoid(2 * tanh({inner}))",  # the linear part
                f"hard_sigmoid(tanh({inner}) + 4)",  # flat at 1
                f"hard_sigmoid(tanh({inner}) - 4)",  # flat at 0
            ] + ([f"relu({inner})", f"hard_sigmoid({inner})"] if self.kinks else [])))
        if kind == "scale":
            c = self.draw(st.sampled_from(["0.5 * ", "-1.5 * ", "", ""]))
            d = self.draw(st.sampled_from(["", " / 2", " * 0.25"]))
            return f"{c}({self.expr(depth - 1)}){d}"
        if kind == "bias":
            return f"({self.expr(depth - 1)} + {self.bias()})"
        op = {"add": "+", "sub": "-", "mul": "*"}[kind]
        return f"({self.expr(depth - 1)} {op} {self.expr(depth - 1)})"

    def text(self) -> str:
        if self.draw(st.booleans()):  # values split from one wide convolution
            parts = self.draw(st.integers(2, 3))
            names = [f"s{i}" for i in range(parts)]
            self.lines.append(f"{', '.join(names)} = split("
                              f"{self.conv_of(self.source(), f'{parts} * hidden')}, {parts})")
            self.values.extend(names)
        depth = self.draw(st.integers(1, 3))
        for s in self.states:
            e = self.expr(depth)
            if s == "h" and "x" not in e:
                e = f"{e} + {self.conv_of('x')}"  # every cell reads its input
            if s != "h" and "x" not in e and "h[t-1]" not in e:
                # a state only ever convolved with itself has no known height and width
                # (E303, by design): tie it to h
                e = f"{e} + {self.conv_of('h[t-1]')}"
            if not STATELESS_UPDATES and "[t-1]" not in e:
                e = f"{e} + {self.conv_of('h[t-1]')}"
            bound = self.draw(st.sampled_from(["tanh", "sigmoid", "none"]))
            if s == "c" and bound == "none":
                self.lines.append(f"c = 0.5 * c[t-1] + tanh({e})")
            else:
                self.lines.append(f"{s} = {bound if bound != 'none' else 'tanh'}({e})")
        states = "\n    ".join(f"state {s} = zeros" for s in self.states)
        body = "\n    ".join(self.weights + self.lines)
        return (f"cell {self.name}(hidden) {{\n    input x\n    {states}\n    {body}\n"
                f"    output h\n}}\n")


STD_CELLS = ["ConvLSTM(hidden = {h}, kernel = {k}, peephole = true)",
             "ConvLSTM(hidden = {h}, kernel = {k}, peephole = false)",
             "ConvLSTMFused(hidden = {h}, kernel = {k})",
             "ConvGRU(hidden = {h}, kernel = {k})"]


@dataclass
class ModelSpec:
    text: str
    bptt: int | None
    stateful: bool
    T: int
    T_out: int | None = None  # a forecaster's steps (its own time axis)


@st.composite
def models(draw, forecasters: bool = False, kinks: bool = False) -> ModelSpec:
    """A random model's text. With `forecasters`, also encoder-forecasters (each
    forecaster layer a new instance of its encoder layer's cell, `init =` that
    layer, the first run without input over the targets' steps) and losses on
    `steps = last`; with `kinks`, relu and hard_sigmoid anywhere in a cell."""
    size = draw(st.sampled_from([6, 8]))
    cin = draw(st.integers(1, 2))
    n_layers = draw(st.integers(1, 3))
    forecast = forecasters and draw(st.booleans())
    cells, layers = [], []
    for i in range(n_layers):
        hidden = draw(st.integers(2, 3))
        if draw(st.integers(0, 2)) == 0:
            cell = draw(st.sampled_from(STD_CELLS)).format(
                h=hidden, k=draw(st.sampled_from([1, 3, 5])))
        else:
            states = ["h", "c"] if draw(st.booleans()) else ["h"]
            cells.append(CellWriter(f"R{i}", draw, states, kinks=kinks).text())
            cell = f"R{i}(hidden = {hidden})"
        layers.append(cell)
    lines = []
    prev = "x"
    for i, cell in enumerate(layers):
        lines.append(f"l{i} = {cell}")
        if i > 0:  # what the layer reads: the layer below, maybe with the input or reshaped
            prev = draw(st.sampled_from([prev, prev, f"concat({prev}, x)", f"tanh({prev})",
                                         f"{prev} * 0.5 + sigmoid({prev})"]))
        lines.append(f"h{i} = l{i}({prev})")
        prev = f"h{i}"
    heads = [f"h{i}" for i in range(n_layers)]
    if forecast:  # the forecaster: the same cells again, each starting where its layer stopped
        for i, cell in enumerate(layers):
            lines.append(f"f{i} = {cell}")
            reads = "steps = y" if i == 0 else f"g{i - 1}"
            lines.append(f"g{i} = f{i}({reads}, init = l{i})")
        heads = [f"g{i}" for i in range(n_layers)]
        prev = heads[-1]
    feat = f"concat({', '.join(heads)})" if n_layers > 1 and draw(st.booleans()) else prev
    loss = draw(st.sampled_from(["bce", "mse", "cross_entropy"]))
    last = forecasters and draw(st.integers(0, 2)) == 0
    cout = 2 if loss == "cross_entropy" else 1
    if loss == "bce":
        head = f"pred = sigmoid(conv({feat}, W_out) + b_out)"
    else:
        head = f"pred = conv({feat}, W_out) + b_out"
    head += f"\n    output pred\n    loss {loss}(pred, y{', steps = last' if last else ''})"
    body = "\n    ".join(lines)
    text = (f"import std\n\n{''.join(cells)}\nmodel random_model {{\n"
            f"    input x: [{cin}, {size}, {size}]\n    target y: [{cout}, {size}, {size}]\n"
            f"    {body}\n    weight W_out = kernel({cout}, 1)\n    weight b_out = bias({cout})\n"
            f"    {head}\n}}\n")
    return ModelSpec(text, draw(st.sampled_from([None, None, 1, 2, 3])), draw(st.booleans()),
                     draw(st.integers(3, 4)), draw(st.integers(2, 4)) if forecast else None)


# ---------------------------------------------------------------- the property

@settings(max_examples=_max_examples(), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=models(forecasters=True))
def test_random_model_compiles_matches_interpreter_and_gradients(spec: ModelSpec,
                                                                   fuzz_counter):
    fuzz_counter["random_models"] += 1
    note(spec.text)
    note(f"bptt={spec.bptt} stateful={spec.stateful} T={spec.T}")
    name = f"random_{zlib.crc32(spec.text.encode()):08x}.cell"
    mod = load_text(spec.text, name)
    params = random_params(mod, seed=0)
    inputs, targets = random_batch(mod, N=2, T=spec.T, T_out=spec.T_out, seed=0)
    state = random_state(mod, N=2) if spec.stateful else None

    # the generated forward pass and loss agree with the reference interpreter
    outputs, finals, loss = run_forward(mod.compiled.lowered, params, inputs, targets,
                                        state=state)
    got_loss, _, got_finals = mod.loss_and_grad(params, inputs, targets, state=state)
    steps = {} if spec.T_out is None else {"steps": spec.T_out}  # a forecaster's frames
    got_outputs, got_finals2 = mod.forward(params, inputs, state=state, **steps)
    assert abs(got_loss - loss) <= 1e-12 * max(1.0, abs(loss))
    for k in outputs:
        np.testing.assert_allclose(got_outputs[k], outputs[k], rtol=1e-11, atol=1e-12)
    for k in finals:
        np.testing.assert_allclose(got_finals[k], finals[k], rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(got_finals2[k], finals[k], rtol=1e-11, atol=1e-12)

    check_gradients(mod, params, inputs, targets, n_dirs=1, bptt=spec.bptt, state=state)


# ---------------------------------------------------------------- what the fuzzer found

DELAY = """
cell Delay(hidden) {
    \"\"\"A state whose new value reads no state: d[t-1] is a one-step delay of x.\"\"\"
    input x
    state d = zeros
    weight W = kernel(hidden, 1)
    d = tanh(conv(x, W))
    h = d[t-1] * d
    output h
}

model delay {
    input x: [1, 4, 4]
    target y: [2, 4, 4]
    l = Delay(hidden = 2)
    h = l(x)
    output h
    loss mse(h, y)
}
"""

CROSSED = """
cell Crossed(hidden) {
    \"\"\"h and c only meet across a step: h reads c[t-1], c reads h[t-1].\"\"\"
    input x
    state h = zeros
    state c = zeros
    weight W3 = kernel(hidden, 3)
    weight W4 = kernel(hidden, 3)
    h = conv(c[t-1], W3)
    c = conv(concat(x, h[t-1]), W4)
    output h
}

model crossed {
    input x: [2, 6, 6]
    target y: [3, 6, 6]
    l = Crossed(hidden = 3)
    h = l(x)
    output h
    loss mse(h, y)
}
"""


@pytest.mark.parametrize("bptt", [None, 2])
@pytest.mark.parametrize("name", ["delay", "crossed"])
def test_state_update_without_recurrence(name, bptt):
    """A carry read after the backward loop (nothing at its step leads back to a state
    read) is kept over all steps; the gradients are right with full and truncated BPTT."""
    mod = load_text({"delay": DELAY, "crossed": CROSSED}[name],
                    f"test_random_models_{name}.cell")
    carry = {"delay": "dd_l_next", "crossed": "dc_l_next"}[name]
    assert f"{carry}_seq[t] = {carry}" in mod.source
    params = random_params(mod)
    inputs, targets = random_batch(mod, N=2, T=5)
    outputs, finals, loss = run_forward(mod.compiled.lowered, params, inputs, targets)
    assert abs(mod.loss_and_grad(params, inputs, targets)[0] - loss) <= 1e-12
    kw = {} if bptt is None else {"bptt": bptt}
    check_gradients(mod, params, inputs, targets, **kw)

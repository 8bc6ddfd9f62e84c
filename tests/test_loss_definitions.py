"""docs/language.md's Losses and Truncated backpropagation sections, checked numerically.

Each loss is computed by hand in NumPy from the formula the reference gives
(what is summed, what is averaged, over which steps) on the prediction the
generated module's own `forward` returns, and compared with the module's
`loss`. The truncation rule is checked where it says something a wrong
alignment would break: windows start at each loop's step 0, so with T = 10
steps a loss on the last step gets the same gradient with k = 3 or 9 as with
k = 1 (step 9 starts a window each time), a different one with k = 2, and
the full gradient with k >= 10; a forecaster's first window passes its
gradient into the encoder it starts from, even with k = 1.
"""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

import convc.api as api

DOC = Path(__file__).resolve().parents[1] / "docs" / "language.md"
N, T, C, H, W = 2, 5, 3, 3, 4


def _section(title: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"\n### {title}")
    end = text.find("\n### ", start + 1)
    return text[start:end]


def _documented_bullet(loss: str) -> str:
    """The Normalisation bullet of `loss` in docs/language.md."""
    losses = _section("Losses")
    assert "**Normalisation.**" in losses
    match = re.search(rf"^- `{loss}\(.*?(?=^- |^\S|\Z)", losses, re.M | re.S)
    assert match, f"docs/language.md gives no normalisation for {loss}"
    return " ".join(match.group(0).split())


def _documented_count(loss: str, a: np.ndarray) -> int:
    """The number the documented formula divides by, for values `a` shaped (N, |S|, C, H,
    W) as forward returns them (every formula of one loss divides by the same)."""
    (letters,) = set(re.findall(r"\|S\|((?: [NCHW])+)", _documented_bullet(loss)))
    size = {"N": a.shape[0], "C": a.shape[2], "H": a.shape[3], "W": a.shape[4]}
    count = a.shape[1]  # |S|: the steps the loss covers
    for letter in letters.split():
        count *= size[letter]
    return count
HEADS = {
    "sigmoid": "sigmoid(conv(x, W) + b)",  # bce is fused into bce_logits here
    "tanh": "0.5 * tanh(conv(x, W) + b) + 0.5",  # bce from probabilities, with its floor
    "linear": "conv(x, W) + b",  # logits, for cross_entropy
}


def _heads_model(tmp_path: Path, losses: list[str], head: str, head2: str | None = None):
    text = textwrap.dedent(f"""\
        model heads {{
            input x: [{C}, {H}, {W}]
            target y: [{C}, {H}, {W}]
            weight W = kernel({C}, 1)
            weight b = bias({C})
            weight W2 = kernel({C}, 1)
            weight b2 = bias({C})
            p = {HEADS[head]}
            q = {HEADS[head2 or head].replace("(x, W) + b", "(x, W2) + b2")}
            output p
            output q
        """) + "".join(f"    loss {loss}\n" for loss in losses) + "}\n"
    path = tmp_path / "heads.cell"
    path.write_text(text)
    return api.load(path)


def _case(mod, seed=0):
    rng = np.random.default_rng(seed)
    params = {k: v + rng.normal(0.0, 0.7, v.shape)
              for k, v in sorted(mod.init_params(seed=seed, dtype="float64").items())}
    x = rng.standard_normal((N, T, C, H, W))
    # targets in [0, 1], not normalised over the channels: the formula takes them as given
    y = rng.uniform(0.0, 1.0, (N, T, C, H, W))
    outputs, _ = mod.forward(params, {"x": x})
    return params, x, y, outputs


def _steps(a, steps):
    return a[:, -1:] if steps == "last" else a


def _mse(p, y):
    return np.sum((p - y) ** 2) / _documented_count("mse", p)


def _bce(p, y):
    floor = 1e-12
    assert "1e-12" in _documented_bullet("bce")
    logs = y * np.log(np.maximum(p, floor)) + (1 - y) * np.log(np.maximum(1 - p, floor))
    return -np.sum(logs) / _documented_count("bce", p)


def _bce_logits(a, y):
    assert "max(a, 0) - a y + log(1 + exp(-|a|))" in _documented_bullet("bce")
    return np.sum(np.maximum(a, 0) - a * y + np.log1p(np.exp(-np.abs(a)))) / \
        _documented_count("bce", a)


def _cross_entropy(a, y):
    z = a - a.max(axis=2, keepdims=True)
    log_softmax = z - np.log(np.exp(z).sum(axis=2, keepdims=True))
    return -np.sum(y * log_softmax) / _documented_count("cross_entropy", a)


def test_the_documented_counts_are_what_the_code_averages_over():
    """Every element for mse and bce; every pixel, not channel, for cross_entropy."""
    a = np.zeros((N, T, C, H, W))
    assert _documented_count("mse", a) == _documented_count("bce", a) == a.size
    assert _documented_count("cross_entropy", a) == a.size // C
    assert "`steps = last` only the last one" in _section("Losses")


@pytest.mark.parametrize("steps", ["all", "last"])
@pytest.mark.parametrize("loss, head", [("mse", "sigmoid"), ("bce", "sigmoid"),
                                        ("bce", "tanh"), ("cross_entropy", "linear")])
def test_each_loss_is_the_documented_formula(tmp_path, loss, head, steps):
    mod = _heads_model(tmp_path, [f"{loss}(p, y, steps = {steps})"], head)
    params, x, y, outputs = _case(mod)
    p, ys = _steps(outputs["p"], steps), _steps(y, steps)
    if loss == "mse":
        expected = _mse(p, ys)
    elif loss == "bce":
        expected = _bce(p, ys)
        if head == "sigmoid":  # computed from the logits: the same value
            a = np.log(p) - np.log1p(-p)
            assert _bce_logits(a, ys) == pytest.approx(expected, rel=1e-9)
    else:
        expected = _cross_entropy(p, ys)
        # averaging over the channels too would be C times smaller
        assert expected != pytest.approx(expected / C)
    got = mod.loss(params, {"x": x}, {"y": y})
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-14)
    # loss_and_grad reports the same value, with or without truncation
    for bptt in (None, 1, 2):
        value, _, _ = mod.loss_and_grad(params, {"x": x}, {"y": y}, bptt=bptt)
        assert value == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_bce_from_probabilities_holds_them_at_1e_12(tmp_path):
    """A probability of exactly 0 or 1 costs -log(1e-12) per wrong element, not infinity."""
    mod = _heads_model(tmp_path, ["bce(p, y)"], "tanh")
    params, x, y, _ = _case(mod)
    params["b"] = params["b"] + 60.0  # tanh saturates at 1.0 exactly: p = 1
    outputs, _ = mod.forward(params, {"x": x})
    assert np.all(outputs["p"] == 1.0)
    got = mod.loss(params, {"x": x}, {"y": y})
    assert np.isfinite(got)
    assert got == pytest.approx(-np.mean((1 - y) * np.log(1e-12)), rel=1e-12)


def test_several_losses_are_added_each_with_its_own_average(tmp_path):
    mod = _heads_model(tmp_path, ["mse(p, y)", "bce(q, y, steps = last)"], "sigmoid")
    params, x, y, outputs = _case(mod, seed=3)
    expected = _mse(outputs["p"], y) + _bce(outputs["q"][:, -1:], y[:, -1:])
    assert mod.loss(params, {"x": x}, {"y": y}) == pytest.approx(expected, rel=1e-12)


RECURRENT = """
import std
model r {
    input x: [1, 4, 4]
    target y: [1, 4, 4]
    l = ConvGRU(hidden = 2, kernel = 3)
    h = l(x)
    weight W_out = kernel(1, 1)
    weight b_out = bias(1)
    p = sigmoid(conv(h, W_out) + b_out)
    output p
    loss mse(p, y, steps = last)
}
"""


def _flat_grads(mod, params, x, y, bptt):
    loss, grads, _ = mod.loss_and_grad(params, {"x": x}, {"y": y}, bptt=bptt)
    return loss, np.concatenate([grads[n].ravel() for n in sorted(grads)])


def test_the_truncation_rule_is_documented():
    rule = " ".join(_section("Truncated backpropagation").split())
    for words in ("t % k == 0 and t > 0", "[0, k), [k, 2k), ... of each loop's own axis",
                  "k * floor((T - 1) / k) to T - 1", "never cut", "init = enc"):
        assert words in rule, words


def test_truncation_windows_start_at_step_0_of_the_loop(tmp_path):
    path = tmp_path / "r.cell"
    path.write_text(RECURRENT)
    mod = api.load(path)
    rng = np.random.default_rng(0)
    params = {k: v + rng.normal(0.0, 0.3, v.shape)
              for k, v in sorted(mod.init_params(seed=0, dtype="float64").items())}
    x = rng.uniform(0, 1, (2, 10, 1, 4, 4))
    y = rng.uniform(0, 1, (2, 10, 1, 4, 4))
    full_loss, full = _flat_grads(mod, params, x, y, None)
    one = _flat_grads(mod, params, x, y, 1)[1]
    for k in (1, 2, 3, 5, 9, 10, 11):
        loss, grad = _flat_grads(mod, params, x, y, k)
        assert loss == full_loss  # truncation never changes the loss
        # the window holding step 9 is [k * floor(9 / k), 10), as documented
        start = 9 // k * k
        if start == 9:
            np.testing.assert_allclose(grad, one, rtol=0, atol=1e-15, err_msg=str(k))
        elif start == 0:
            np.testing.assert_allclose(grad, full, rtol=0, atol=1e-15, err_msg=str(k))
        else:
            assert np.abs(grad - one).max() > 1e-6 and np.abs(grad - full).max() > 1e-6, k


FORECASTER = """
import std
model ef {
    input x: [1, 4, 4]
    target y: [1, 4, 4]
    enc = ConvGRU(hidden = 2, kernel = 3)
    fc = ConvGRU(hidden = 2, kernel = 3)
    h = enc(x)
    g = fc(steps = y, init = enc)
    weight W_out = kernel(1, 1)
    weight b_out = bias(1)
    p = sigmoid(conv(g, W_out) + b_out)
    output p
    loss mse(p, y)
}
"""


def test_init_passes_the_forecasters_gradient_into_the_encoder(tmp_path):
    path = tmp_path / "ef.cell"
    path.write_text(FORECASTER)
    mod = api.load(path)
    rng = np.random.default_rng(1)
    params = {k: v + rng.normal(0.0, 0.3, v.shape)
              for k, v in sorted(mod.init_params(seed=1, dtype="float64").items())}
    x = rng.uniform(0, 1, (2, 6, 1, 4, 4))
    y = rng.uniform(0, 1, (2, 3, 1, 4, 4))
    for k in (1, 2, 4):
        _, grads, _ = mod.loss_and_grad(params, {"x": x}, {"y": y}, bptt=k)
        encoder = [n for n in grads if n.startswith("enc.")]
        assert encoder and all(np.abs(grads[n]).max() > 1e-8 for n in encoder), k

"""examples/shi2015.cell: the paper's encoder-forecaster, its size, its gradients,
and training parity with an independent PyTorch implementation (tests/torch_shi2015.py).

The reduced models used for speed are made from the example's own text by
changing only the layer widths and the frame size, so they keep its
structure (three encoder and three forecaster layers, 5x5 kernels,
peepholes, the 1x1 output convolution over all forecaster states).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import convc.api as api
from convc.runtime import data
from convc.runtime.optim import RMSProp
from helpers import one_blas_thread  # noqa: F401  (a fixture: one BLAS thread per module)
from helpers import check_gradients

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "shi2015.cell"
SMALL = ROOT / "examples" / "shi2015_small.cell"


def _reduced(hidden: tuple[int, int], size: int):
    """shi2015.cell with widths 128 -> hidden[0], 64 -> hidden[1] and a size x size patch grid."""
    text = EXAMPLE.read_text(encoding="utf-8")
    for old, new in (("hidden = 128", f"hidden = {hidden[0]}"),
                     ("hidden = 64", f"hidden = {hidden[1]}"),
                     ("[16, 16, 16]", f"[16, {size}, {size}]")):
        assert old in text, f"shi2015.cell no longer contains {old!r}"
        text = text.replace(old, new)
    return api.load(EXAMPLE, text=text)


def _random_params(mod, seed: int) -> dict[str, np.ndarray]:
    """float64 parameters with every kind away from its initial constant.

    Peepholes start at zero and biases at constants, which would leave their
    gradients (and the gate order) untested; draw them at random instead.
    """
    params = mod.init_params(seed=seed, dtype="float64")
    rng = np.random.default_rng(seed + 1)
    for name in sorted(params):
        if mod.MODEL["params"][name]["kind"] != "kernel":
            params[name] = rng.uniform(-0.5, 0.5, params[name].shape)
    return params


def _patched_batch(n: int, frames_in: int, frames_out: int, size: int, seed: int):
    clips = data.synthetic_clips(n, frames_in + frames_out, size=size * 4, seed=seed,
                                 dtype=np.float64)
    patched = data.patch(clips, 4)
    return patched[:, :frames_in], patched[:, frames_in:]


# -- the paper's model --------------------------------------------------------------


def test_paper_configuration():
    mod = api.load(EXAMPLE)
    meta = mod.MODEL
    assert meta["task"] == "forecast"
    assert meta["inputs"] == {"x": (16, 16, 16)}
    assert meta["targets"] == {"y": (16, 16, 16)}
    assert meta["loss"] == ["bce_logits"]
    train = meta["train"]
    assert (train["optimizer"], train["lr"], train["decay"]) == ("rmsprop", 0.001, 0.9)
    assert (train["frames_in"], train["frames_out"]) == (10, 10)
    assert [loop["cells"] for loop in meta["loops"]] == [["enc1", "enc2", "enc3"],
                                                          ["fc1", "fc2", "fc3"]]
    # Forecaster states start from the encoder's final states; the first
    # forecaster layer has no input convolution.
    for layer in ("fc1", "fc2", "fc3"):
        assert meta["states"][f"{layer}.h"]["init"] == "final"
        assert meta["states"][f"{layer}.c"]["init"] == "final"
    assert "fc1.W_x" not in meta["params"]
    assert meta["params"]["fc2.W_x"]["shape"] == (4 * 64, 128, 5, 5)
    assert meta["params"]["W_out"]["shape"] == (16, 128 + 64 + 64, 1, 1)


def test_parameter_count_matches_the_paper_sizes():
    """Count from the paper's layer sizes, written out, against the compiled parameters."""
    channels, size, kernel, patch_pixels = 16, 16, 5, 16
    hidden = [128, 64, 64]
    encoder_inputs = [channels, 128, 64]
    forecaster_inputs = [0, 128, 64]  # the first forecaster layer has no input

    def layer(c_in: int, h: int) -> int:
        weights = 4 * h * (c_in + h) * kernel * kernel  # W_x (if any) and W_h, four gates
        biases = 4 * h                                  # b_i, b_f, b_c, b_o
        peepholes = 3 * h * size * size                 # w_ci, w_cf, w_co
        return weights + biases + peepholes

    expected = sum(layer(c, h) for c, h in zip(encoder_inputs, hidden))
    expected += sum(layer(c, h) for c, h in zip(forecaster_inputs, hidden))
    expected += patch_pixels * sum(hidden) + patch_pixels  # 1x1 output conv and its bias
    assert expected == 7_976_976

    compiled = sum(int(np.prod(p["shape"])) for p in api.load(EXAMPLE).MODEL["params"].values())
    assert compiled == expected


def test_small_example_keeps_the_structure():
    meta = api.load(SMALL).MODEL
    assert meta["task"] == "forecast"
    assert meta["loss"] == ["bce_logits"]
    assert "fc1.W_x" not in meta["params"]
    assert all(meta["states"][f"fc{k}.{s}"]["init"] == "final" for k in (1, 2) for s in "hc")
    assert (meta["train"]["frames_in"], meta["train"]["frames_out"]) == (10, 10)
    assert meta["train"]["optimizer"] == "rmsprop"


def test_gradient_check_float64():
    mod = _reduced(hidden=(3, 2), size=4)
    params = _random_params(mod, seed=3)
    x, y = _patched_batch(n=2, frames_in=3, frames_out=3, size=4, seed=5)
    check_gradients(mod, params, {"x": x}, {"y": y}, n_dirs=1)


# -- parity with PyTorch ----------------------------------------------------------------

STEPS = 20


def _train_convc(mod, params, batches):
    optimizer = RMSProp(lr=1e-3, decay=0.9)
    losses = []
    for x, y in batches:
        loss, grads, _ = mod.loss_and_grad(params, {"x": x}, {"y": y})
        optimizer.step(params, grads)
        losses.append(loss)
    return losses, params


def _train_torch(params, batches, hidden, size):
    torch = pytest.importorskip("torch", reason="torch is the oracle of the parity test")
    import torch_shi2015

    model = torch_shi2015.EncoderForecaster(16, list(hidden), kernel=5, size=(size, size),
                                            out_channels=16, dtype=torch.float64)
    torch_shi2015.load_convc_params(model, params)
    # torch's RMSprop is the formula runtime/optim.RMSProp follows: alpha is
    # convc's decay, eps 1e-8 added outside the square root, no momentum.
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-8,
                                    momentum=0.0, centered=False, weight_decay=0.0)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only contend on a shared machine
    try:
        for x, y in batches:
            optimizer.zero_grad()
            loss = model.loss(torch.from_numpy(x), torch.from_numpy(y))
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    return losses, torch_shi2015.convc_params(model)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|: a tensor's difference relative to its own scale."""
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.mark.slow
def test_rmsprop_training_matches_pytorch():
    pytest.importorskip("torch", reason="torch is the oracle of the parity test")
    hidden, size, frames = (8, 4), 6, 4
    mod = _reduced(hidden=hidden, size=size)
    params = _random_params(mod, seed=0)
    start = {name: value.copy() for name, value in params.items()}

    x_all, y_all = _patched_batch(n=16, frames_in=frames, frames_out=frames, size=size, seed=1)
    order = data.Batches(len(x_all), batch_size=4, seed=2)
    batches = []
    for _ in range(STEPS):
        index = next(order)
        batches.append((x_all[index], y_all[index]))

    convc_losses, convc_final = _train_convc(mod, params, batches)
    torch_losses, torch_final = _train_torch(start, batches, (hidden[0], hidden[1], hidden[1]),
                                             size)

    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(convc_losses, torch_losses))
    assert loss_diff <= 1e-9, f"losses differ by {loss_diff:.2e} (relative)"
    assert convc_losses[-1] < convc_losses[0]  # it trained
    assert set(convc_final) == set(torch_final)
    param_diff = {name: _relative(convc_final[name], torch_final[name]) for name in convc_final}
    worst = max(param_diff, key=param_diff.get)
    assert param_diff[worst] <= 1e-8, f"{worst} differs by {param_diff[worst]:.2e} (relative)"
    # The parameters moved far more than the tolerance, so the comparison means something.
    moved = min(_relative(convc_final[name], start[name]) for name in convc_final)
    assert moved > 1e-4

"""runtime/layouts.py: ConvLSTM weights to and from Keras, PyTorch and the peer yardstick.

Each mapping is checked by an equal forward pass: the other implementation
is built with random weights, its weights are mapped into a convc model, and
both run on the same input in float64; the outputs agree to 1e-10 of their
size. A deliberately wrong mapping (gates in another order) is shown to fail
the same comparison, so agreement is not an accident of the data. Keras runs
on its torch backend (no TensorFlow); the PyTorch cell is written here, as
ndrplz/ConvLSTM_pytorch's ConvLSTMCell is; the yardstick's torch model is
read from /work/shared/bench/peers. Each part skips, saying why, when its
framework or the yardstick is absent.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import convc
from convc.runtime import layouts
from convc.runtime.layouts import LayoutError

# Keras 3.15 calls np.array on its variables in a way NumPy 2 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("CONVC_PEERS", "/work/shared/bench/peers"))
RTOL = 1e-10
N, T, CIN, SIZE, HIDDEN, K = 2, 5, 2, 6, 3, 3


def spec(cell: str, hidden: int = HIDDEN, kernel: int = K, cin: int = CIN) -> str:
    """A model with one instance `enc` of `cell` whose output is its hidden state."""
    return f"""import std

model one {{
    input x: [{cin}, {SIZE}, {SIZE}]
    target y: [{hidden}, {SIZE}, {SIZE}]
    enc = {cell}
    h = enc(x)
    output h
    loss mse(h, y)
}}
"""


CELLS = {
    "ConvLSTM": f"ConvLSTM(hidden = {HIDDEN}, kernel = {K}, peephole = false)",
    "ConvLSTMFused": f"ConvLSTMFused(hidden = {HIDDEN}, kernel = {K})",
}
PEEPHOLE_CELL = f"ConvLSTM(hidden = {HIDDEN}, kernel = {K}, peephole = true)"


def compile_text(text: str):
    return convc.load(None, text=text)


@pytest.fixture(scope="module", params=sorted(CELLS))
def target(request):
    """A compiled model of each std ConvLSTM without peepholes."""
    return compile_text(spec(CELLS[request.param]))


def x_input(seed: int = 0, cin: int = CIN) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(N, T, cin, SIZE, SIZE))


def convc_h(mod, params: dict, x: np.ndarray) -> np.ndarray:
    outputs, _ = mod.forward({k: np.asarray(v, np.float64) for k, v in params.items()},
                             {"x": x})
    return np.asarray(outputs["h"])


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    """Equal to 1e-10 of b's size, and b not trivially small (so a mistake would show)."""
    assert a.shape == b.shape
    scale = float(np.max(np.abs(b)))
    assert scale > 0.05, scale
    err = float(np.max(np.abs(a - b)))
    assert err <= RTOL * scale, f"max |difference| {err:.3g} for outputs of size {scale:.3g}"


def assert_differs(a: np.ndarray, b: np.ndarray) -> None:
    assert float(np.max(np.abs(a - b))) > 1e-3 * float(np.max(np.abs(b)))


def rng_arrays(shapes: dict, seed: int = 1, scale: float = 0.4) -> dict:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0.0, scale, s) for k, s in shapes.items()}


# ---------------------------------------------------------------------------
# Keras ConvLSTM2D (keras 3 on the torch backend)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras():
    if os.environ.setdefault("KERAS_BACKEND", "torch") != "torch":
        pytest.skip(f"KERAS_BACKEND is {os.environ['KERAS_BACKEND']}; these tests run Keras "
                    f"on torch")
    pytest.importorskip("torch", reason="Keras runs on its torch backend here, and torch "
                                        "is not installed")
    return pytest.importorskip("keras", reason="keras is not installed (pip install keras)")


def keras_layer(keras, seed: int = 1, **options):
    """A float64 ConvLSTM2D (padding same) with random weights, built for CIN channels."""
    layer = keras.layers.ConvLSTM2D(HIDDEN, K, padding="same", return_sequences=True,
                                    dtype="float64", **options)
    layer.build((None, T, SIZE, SIZE, CIN))
    shapes = {w.name: tuple(w.shape) for w in layer.weights}
    weights = rng_arrays(shapes, seed)
    layer.set_weights([weights[w.name] for w in layer.weights])
    return layer


def keras_h(keras, layer, x: np.ndarray) -> np.ndarray:
    """The layer's hidden states on x (N, T, C, H, W), back in convc's layout."""
    y = keras.ops.convert_to_numpy(layer(np.ascontiguousarray(x.transpose(0, 1, 3, 4, 2))))
    return y.transpose(0, 1, 4, 2, 3)


@pytest.mark.parametrize("use_bias", [True, False])
def test_keras_weights_give_keras_forward(keras, target, use_bias):
    layer = keras_layer(keras, use_bias=use_bias)
    x = x_input()
    mapped = layouts.from_keras_convlstm2d(layer, target, "enc")
    assert sorted(mapped) == sorted(target.MODEL["params"])
    assert_same(convc_h(target, mapped, x), keras_h(keras, layer, x))


def test_keras_weights_as_a_dict_and_a_wrong_gate_order_differs(keras):
    mod = compile_text(spec(CELLS["ConvLSTM"]))
    layer = keras_layer(keras, seed=4)
    weights = {w.name: np.array(v) for w, v in zip(layer.weights, layer.get_weights())}
    x = x_input(2)
    expected = keras_h(keras, layer, x)
    mapped = layouts.from_keras_convlstm2d(weights, mod, "enc", config=layer.get_config())
    assert_same(convc_h(mod, mapped, x), expected)
    # the same weights read with PyTorch's gate order (i, f, o, g) compute something else
    wrong = dict(weights)
    for key in ("kernel", "recurrent_kernel", "bias"):
        wrong[key] = layouts.reorder(weights[key], "ifog", "ifgo", axis=-1)
    assert_differs(convc_h(mod, layouts.from_keras_convlstm2d(wrong, mod, "enc"), x), expected)


def test_convc_weights_into_keras(keras, target):
    params = rng_arrays({k: v["shape"] for k, v in target.MODEL["params"].items()}, seed=7)
    weights = layouts.to_keras_convlstm2d(params, target, "enc")
    layer = keras_layer(keras, seed=99)
    assert list(weights) == [w.name for w in layer.weights]
    layer.set_weights(list(weights.values()))
    x = x_input(3)
    assert_same(keras_h(keras, layer, x), convc_h(target, params, x))
    back = layouts.from_keras_convlstm2d(layer, target, "enc")
    assert all(np.array_equal(back[k], params[k]) for k in params)


@pytest.mark.parametrize("option,value", [("padding", "valid"),
                                          ("recurrent_activation", "hard_sigmoid"),
                                          ("activation", "relu"), ("strides", 2),
                                          ("dilation_rate", 2), ("go_backwards", True)])
def test_keras_layers_that_compute_something_else_are_refused(keras, option, value):
    mod = compile_text(spec(CELLS["ConvLSTM"]))
    layer = keras.layers.ConvLSTM2D(HIDDEN, K, dtype="float64", **{"padding": "same",
                                                                   option: value})
    layer.build((None, T, SIZE, SIZE, CIN))
    with pytest.raises(LayoutError, match=option):
        layouts.from_keras_convlstm2d(layer, mod, "enc")


def test_keras_into_a_peephole_cell_needs_zero_peepholes(keras):
    mod = compile_text(spec(PEEPHOLE_CELL))
    layer = keras_layer(keras, seed=5)
    with pytest.raises(LayoutError, match="zero_peepholes=True"):
        layouts.from_keras_convlstm2d(layer, mod, "enc")
    mapped = layouts.from_keras_convlstm2d(layer, mod, "enc", zero_peepholes=True)
    assert all(not mapped[f"enc.w_c{g}"].any() for g in "ifo")
    x = x_input(4)
    assert_same(convc_h(mod, mapped, x), keras_h(keras, layer, x))


def test_peepholes_keras_cannot_hold_are_refused():
    mod = compile_text(spec(PEEPHOLE_CELL))
    params = rng_arrays({k: v["shape"] for k, v in mod.MODEL["params"].items()})
    with pytest.raises(LayoutError, match="peepholes .* non-zero"):
        layouts.to_keras_convlstm2d(params, mod, "enc")
    for g in "ifo":
        params[f"enc.w_c{g}"][...] = 0.0
    assert layouts.to_keras_convlstm2d(params, mod, "enc")["kernel"].shape == (K, K, CIN,
                                                                               4 * HIDDEN)


def test_keras_tensor_of_the_wrong_shape_is_named():
    mod = compile_text(spec(CELLS["ConvLSTM"]))
    weights = rng_arrays({"kernel": (K, K, CIN, 4 * HIDDEN),
                          "recurrent_kernel": (K, K, HIDDEN + 1, 4 * HIDDEN),
                          "bias": (4 * HIDDEN,)})
    with pytest.raises(LayoutError, match=r"recurrent_kernel has shape \(3, 3, 4, 12\), "
                                          r"instance needs \(3, 3, 3, 12\)"):
        layouts.from_keras_convlstm2d(weights, mod, "enc")
    del weights["kernel"]
    with pytest.raises(LayoutError, match="tensor kernel is missing"):
        layouts.from_keras_convlstm2d(weights, mod, "enc")


# ---------------------------------------------------------------------------
# The common PyTorch ConvLSTM cell
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="torch is not installed (make venv installs "
                                               "torch==2.13.0)")


def torch_cell(torch, cin: int = CIN, hidden: int = HIDDEN, kernel: int = K, bias: bool = True,
               seed: int = 1):
    """ConvLSTMCell as ndrplz/ConvLSTM_pytorch writes it: one Conv2d over cat[x, h],
    gates i, f, o, g; float64, random weights."""

    class ConvLSTMCell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden_dim = hidden
            self.conv = torch.nn.Conv2d(cin + hidden, 4 * hidden, kernel, padding=kernel // 2,
                                        bias=bias)

        def forward(self, x, state):
            h_cur, c_cur = state
            combined = self.conv(torch.cat([x, h_cur], dim=1))
            cc_i, cc_f, cc_o, cc_g = torch.split(combined, self.hidden_dim, dim=1)
            i, f = torch.sigmoid(cc_i), torch.sigmoid(cc_f)
            o, g = torch.sigmoid(cc_o), torch.tanh(cc_g)
            c_next = f * c_cur + i * g
            return o * torch.tanh(c_next), c_next

    cell = ConvLSTMCell().double()
    weights = rng_arrays({k: tuple(v.shape) for k, v in cell.state_dict().items()}, seed)
    cell.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    return cell


def torch_h(torch, cell, x: np.ndarray) -> np.ndarray:
    xt = torch.from_numpy(x)
    h = xt.new_zeros(x.shape[0], cell.hidden_dim, *x.shape[3:])
    c = torch.zeros_like(h)
    out = []
    with torch.no_grad():
        for t in range(x.shape[1]):
            h, c = cell(xt[:, t], (h, c))
            out.append(h)
    return torch.stack(out, dim=1).numpy()


@pytest.mark.parametrize("bias", [True, False])
def test_torch_cell_weights_give_its_forward(torch, target, bias):
    cell = torch_cell(torch, bias=bias)
    x = x_input(5)
    expected = torch_h(torch, cell, x)
    mapped = layouts.from_torch_convlstm(cell.state_dict(), target, "enc")
    assert sorted(mapped) == sorted(target.MODEL["params"])
    assert_same(convc_h(target, mapped, x), expected)
    # Keras's gate order (i, f, c, o) read as PyTorch's is another model
    sd = {k: layouts.reorder(v.numpy(), "ifgo", "ifog") for k, v in cell.state_dict().items()}
    assert_differs(convc_h(target, layouts.from_torch_convlstm(sd, target, "enc"), x),
                   expected)


def test_convc_weights_into_the_torch_cell(torch, target):
    params = rng_arrays({k: v["shape"] for k, v in target.MODEL["params"].items()}, seed=8)
    state = layouts.to_torch_convlstm(params, target, "enc", prefix="cell_list.0.")
    assert sorted(state) == ["cell_list.0.conv.bias", "cell_list.0.conv.weight"]
    cell = torch_cell(torch, seed=50)
    cell.load_state_dict({k.replace("cell_list.0.", ""): torch.from_numpy(v)
                          for k, v in state.items()})
    x = x_input(6)
    assert_same(torch_h(torch, cell, x), convc_h(target, params, x))


def test_torch_tensors_of_the_wrong_shape_or_a_cell_without_input_are_refused():
    mod = compile_text(spec(CELLS["ConvLSTMFused"]))
    state = rng_arrays({"conv.weight": (4 * HIDDEN, CIN + HIDDEN, K + 2, K + 2),
                        "conv.bias": (4 * HIDDEN,)})
    with pytest.raises(LayoutError, match=r"conv.weight has shape \(12, 5, 5, 5\)"):
        layouts.from_torch_convlstm(state, mod, "enc")
    forecaster = convc.load(ROOT / "examples" / "encoder_forecaster.cell")
    ok = rng_arrays({"conv.weight": (32, 16, 3, 3), "conv.bias": (32,)})
    with pytest.raises(LayoutError, match="fc1 has no input"):
        layouts.from_torch_convlstm(ok, forecaster, "fc1", zero_peepholes=True)


OWN_CELL = """cell ConvLSTMFused(hidden) {
    input x
    state h = zeros
    state c = zeros
    weight W = kernel(4 * hidden, 3)
    weight b = bias(4 * hidden)
    z_i, z_f, z_o, z_g = split(conv(concat(x, h[t-1]), W) + b, 4)
    c = sigmoid(z_f) * c[t-1] + sigmoid(z_i) * tanh(z_g)
    h = sigmoid(z_i) * tanh(c)
    output h
}
"""


def test_cells_the_layouts_do_not_know_are_refused():
    stack = convc.load(ROOT / "examples" / "stack.cell")
    with pytest.raises(LayoutError, match="l3 of model stack is a ConvGRU"):
        layouts.to_keras_convlstm2d({}, stack, "l3")
    with pytest.raises(LayoutError, match="no cell instance 'l9'"):
        layouts.to_keras_convlstm2d({}, stack, "l9")
    seed = convc.load(ROOT / "examples" / "seed.cell")
    with pytest.raises(LayoutError, match="SeedLSTM"):
        layouts.from_torch_convlstm({}, seed, "lstm")
    # a cell of the user's own, named as std's but computing something else (o is i)
    own = compile_text(spec("ConvLSTMFused(hidden = 3)").replace("import std\n", OWN_CELL))
    with pytest.raises(LayoutError, match="defined outside std"):
        layouts.to_torch_convlstm({}, own, "enc")


# ---------------------------------------------------------------------------
# The peer yardstick (/work/shared/bench/peers)
# ---------------------------------------------------------------------------

TINY = dict(N=2, T=4, Cin=2, H=6, hidden=3, k=3, layers=2, name="tiny")


@pytest.fixture(scope="module")
def peers(torch):
    if not (PEERS / "convlstm_torch.py").is_file():
        pytest.skip(f"the peer yardstick is not at {PEERS} (set CONVC_PEERS)")
    sys.path.insert(0, str(PEERS))
    try:
        found = importlib.util.spec_from_file_location("peer_convlstm_torch",
                                                        PEERS / "convlstm_torch.py")
        module = importlib.util.module_from_spec(found)
        found.loader.exec_module(module)
    finally:
        sys.path.remove(str(PEERS))
    return module


def peer_spec(cfg: dict) -> str:
    """The yardstick's model with std.ConvLSTM layers (with peepholes, as its option)."""
    lines = ["import std", "", "model peer {", f"    input x: [{cfg['Cin']}, {cfg['H']}, "
             f"{cfg['H']}]", f"    target y: [{cfg['Cin']}, {cfg['H']}, {cfg['H']}]"]
    prev = "x"
    for n in range(cfg["layers"]):
        lines += [f"    l{n} = ConvLSTM(hidden = {cfg['hidden']}, kernel = {cfg['k']}, "
                  f"peephole = {'true' if cfg['peephole'] else 'false'})",
                  f"    h{n} = l{n}({prev})"]
        prev = f"h{n}"
    lines += [f"    weight head_W = kernel({cfg['Cin']}, 1)",
              f"    weight head_b = bias({cfg['Cin']})",
              f"    pred = sigmoid(conv({prev}, head_W) + head_b)", "    output pred",
              "    loss bce(pred, y)", "}", ""]
    return "\n".join(lines)


def peer_forward(peers, torch, cfg: dict, params: dict, x: np.ndarray) -> np.ndarray:
    net = peers.ConvLSTMNet(cfg).double()
    net.load_numpy(params)
    with torch.no_grad():
        return torch.sigmoid(net(torch.from_numpy(x))).numpy()


@pytest.mark.parametrize("peephole", [False, True])
def test_the_yardsticks_weights_give_its_torch_forward(peers, torch, peephole):
    from convc.runtime.bench import peer_cell_text

    common = peers.common  # the yardstick's common.py, as convlstm_torch.py imported it
    cfg = dict(TINY, peephole=peephole, loss="bce")
    params = common.make_params(cfg, seed=3, dtype=np.float64)
    if peephole:  # make_params' peepholes are small; make them count
        params.update({k: v * 20 for k, v in params.items() if ".wc" in k})
    x = np.random.default_rng(9).uniform(0, 1, (cfg["N"], cfg["T"], cfg["Cin"], cfg["H"],
                                                cfg["H"]))
    expected = peer_forward(peers, torch, cfg, params, x)
    models = [compile_text(peer_spec(cfg))]
    if not peephole:
        models.append(compile_text(peer_cell_text(cfg)))  # std.ConvLSTMFused, as convc bench
    for mod in models:
        mapped = layouts.from_peer(params, mod)
        outputs, _ = mod.forward(mapped, {"x": x})
        assert_same(np.asarray(outputs["pred"]), expected)
        back = layouts.to_peer(mapped, mod)
        assert sorted(back) == sorted(params)
        assert all(np.array_equal(back[k], params[k]) for k in params)
    # the yardstick's torch state dict, layer by layer, through the PyTorch cell layout
    net = peers.ConvLSTMNet(cfg).double()
    net.load_numpy(params)
    state = net.state_dict()
    mod = models[0]
    mapped = {"head_W": state["head.weight"].numpy(), "head_b": state["head.bias"].numpy()}
    for n in range(cfg["layers"]):
        mapped.update(layouts.from_torch_convlstm(state, mod, f"l{n}", prefix=f"cells.{n}."))
    outputs, _ = mod.forward(mapped, {"x": x})
    assert_same(np.asarray(outputs["pred"]), expected)
    if peephole:
        assert sorted(layouts.to_torch_convlstm(mapped, mod, "l0", prefix="cells.0.")) == [
            "cells.0.conv.bias", "cells.0.conv.weight", "cells.0.wcf", "cells.0.wci",
            "cells.0.wco"]


def test_peer_parameters_that_do_not_fit_are_refused():
    cfg = dict(TINY, peephole=False)
    mod = compile_text(peer_spec(cfg))
    params = rng_arrays({"l0.W": (12, 5, 3, 3), "l0.b": (12,), "l1.W": (12, 6, 3, 3),
                         "l1.b": (12,), "head.W": (2, 3, 1, 1)})
    with pytest.raises(LayoutError, match="no head.b"):
        layouts.from_peer(params, mod)
    params["head.b"] = np.zeros(3)
    with pytest.raises(LayoutError, match=r"head_b has shape \(3,\), model peer needs \(2,\)"):
        layouts.from_peer(params, mod)
    params["head.b"] = np.zeros(2)
    del params["l1.W"], params["l1.b"]
    with pytest.raises(LayoutError, match="leaves parameter l1.W_h"):
        layouts.from_peer(params, mod)

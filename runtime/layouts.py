"""ConvLSTM weights to and from the layouts of other implementations.

Each function maps one ConvLSTM instance of a compiled convc model (an
instance of std's `ConvLSTM` or `ConvLSTMFused`) to or from the tensors of
another implementation, as NumPy arrays; the rest of the model's parameters
(a head, other cells) are the caller's to fill.

    from convc.runtime import layouts
    params.update(layouts.from_keras_convlstm2d(keras_layer, m, "enc"))
    params.update(layouts.from_torch_convlstm(cell.state_dict(), m, "enc"))
    keras_layer.set_weights(list(layouts.to_keras_convlstm2d(params, m, "enc").values()))

Layouts:

- Keras `ConvLSTM2D`: `kernel` (kh, kw, C_in, 4h), `recurrent_kernel`
  (kh, kw, h, 4h), `bias` (4h,), gate order i, f, c, o (c is the
  candidate, convc's g), channels last. Only a layer with padding "same",
  strides 1, dilation 1, tanh and a sigmoid recurrent activation and
  go_backwards off computes what a std cell computes; another is refused.
  Keras has no peepholes.
- PyTorch ConvLSTM cell (ndrplz/ConvLSTM_pytorch's `ConvLSTMCell`, and the
  peer yardstick's torch cell): one `Conv2d` over concat[x, h] with 4h
  output channels, `conv.weight` (4h, C_in + h, kh, kw) and `conv.bias`
  (4h,), gate order i, f, o, g; the yardstick's peepholes `wci`, `wcf`,
  `wco` (1, h, H, W) when the cell has them. `prefix` is what stands before
  `conv.weight` in the state dict ("cell_list.0." in ndrplz's ConvLSTM).
- The peer yardstick's parameter dict (`common.make_params`): `l{n}.W`,
  `l{n}.b` as the PyTorch cell, `l{n}.wci/wcf/wco` (h, H, W), and a 1x1
  head `head.W`, `head.b`; a whole model, mapped onto instances `l{n}` and
  the weights `head_W`, `head_b` (as `convc.runtime.bench.peer_cell_text`
  writes it).

convc's std `ConvLSTM` keeps W_x (4h, C_in, k, k) and W_h (4h, h, k, k) in
gate order i, f, g, o, a bias per gate, and peepholes w_ci, w_cf, w_co
(h, H, W) unless `peephole = false`; an instance with no input (a
forecaster's first layer) has no W_x. `ConvLSTMFused` keeps W (4h, C_in + h,
k, k) and b (4h,) in gate order i, f, o, g.

A mapping that would change what the model computes is refused with a
LayoutError (a ConvcError) that says why: a tensor of the wrong shape (named),
peepholes that a layout has no place for (unless they are all zero), a convc
cell with peepholes and a source without them (unless `zero_peepholes=True`,
which sets them to zero), an instance without input, or a cell that is not
one of std's ConvLSTMs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convc.errors import ConvcError

IFGO = "ifgo"  # std.ConvLSTM's gate order, and Keras's (i, f, c, o)
IFOG = "ifog"  # std.ConvLSTMFused's, the PyTorch ConvLSTM cell's, the yardstick's
PEEPHOLES = ("i", "f", "o")
KNOWN_CELLS = ("ConvLSTM", "ConvLSTMFused")


class LayoutError(ConvcError):
    """Weights that cannot be mapped between convc and another implementation."""


@dataclass(frozen=True)
class Instance:
    """One std ConvLSTM instance of a model, as its parameters describe it."""

    name: str
    cell: str                    # "ConvLSTM" or "ConvLSTMFused"
    hidden: int
    inputs: int | None           # channels of its input; None: it has no input
    kernel: tuple[int, int]
    size: tuple[int, int]        # (H, W) of its states
    peephole: bool

    def param(self, short: str) -> str:
        return f"{self.name}.{short}"


@dataclass
class Gates:
    """A ConvLSTM's weights in one neutral form, gate order i, f, g, o."""

    wx: np.ndarray | None        # (4h, C_in, kh, kw), None without input
    wh: np.ndarray               # (4h, h, kh, kw)
    b: np.ndarray                # (4h,)
    peep: dict | None = None     # {"i", "f", "o": (h, H, W)} or None


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _numpy(value: Any) -> np.ndarray:
    """A NumPy copy of a NumPy, CuPy, torch or Keras tensor (no framework imported)."""
    if hasattr(value, "detach"):  # torch
        value = value.detach().cpu().numpy()
    elif hasattr(value, "get") and hasattr(value, "shape") and not isinstance(value, np.ndarray):
        value = value.get()  # CuPy
    elif not isinstance(value, np.ndarray) and hasattr(value, "numpy"):
        value = value.numpy()  # a Keras variable
    return np.array(value)


def reorder(array: np.ndarray, src: str, dst: str, axis: int = 0) -> np.ndarray:
    """The four gate blocks of `array` along `axis`, from gate order `src` to `dst`."""
    blocks = dict(zip(src, np.split(array, 4, axis=axis)))
    return np.concatenate([blocks[g] for g in dst], axis=axis)


def _tables(model: Any) -> tuple[dict, Any]:
    """(MODEL table, the compiled program or None) of a module or a MODEL dict."""
    if isinstance(model, dict) and "params" in model:
        return model, None
    table = getattr(model, "MODEL", None)
    if not isinstance(table, dict):
        raise TypeError(f"expected a compiled model (convc.load) or its MODEL table, got "
                        f"{type(model).__name__}")
    program = getattr(getattr(model, "compiled", None), "program", None)
    return table, program


def _is_std(program, cell: str) -> bool:
    """Whether the program's cell `cell` is the one in convc's std library."""
    definition = getattr(program, "cells", {}).get(cell)
    where = getattr(getattr(definition, "loc", None), "file", None)
    if where is None:
        return True  # nothing to compare with: trust the name and the parameters
    return Path(where).parts[-2:] == ("stdlib", "std.cell")


def instance(model: Any, name: str) -> Instance:
    """Describe ConvLSTM instance `name` of `model` (a compiled module or MODEL), or
    raise LayoutError saying why it is not one the layouts know."""
    m, program = _tables(model)
    cells = m.get("cells", {})
    if name not in cells:
        raise LayoutError(f"model {m['name']} has no cell instance {name!r} (it has "
                          f"{', '.join(sorted(cells)) or 'none'})")
    cell = cells[name]
    if cell not in KNOWN_CELLS or (program is not None and not _is_std(program, cell)):
        raise LayoutError(f"instance {name} of model {m['name']} is a {cell}"
                          f"{'' if cell not in KNOWN_CELLS else ' defined outside std'}; the "
                          f"layouts map std's {' and '.join(KNOWN_CELLS)} only, whose "
                          f"equations they know")
    specs = {k[len(name) + 1:]: tuple(v["shape"]) for k, v in m["params"].items()
             if k.startswith(name + ".")}
    state = m.get("states", {}).get(f"{name}.h")
    if state is None:
        raise LayoutError(f"instance {name} of model {m['name']} has no state h")
    hidden, size = int(state["shape"][0]), tuple(int(n) for n in state["shape"][1:])
    peep = {f"w_c{g}" for g in PEEPHOLES}
    if cell == "ConvLSTM":
        expected = {"W_h", "b_i", "b_f", "b_g", "b_o"}
        extra = set(specs) - expected - peep - {"W_x"}
        if not expected <= set(specs) or extra or (set(specs) & peep not in (set(), peep)):
            raise LayoutError(f"instance {name}'s parameters {sorted(specs)} are not "
                              f"std.ConvLSTM's")
        inputs = specs["W_x"][1] if "W_x" in specs else None
        return Instance(name, cell, hidden, inputs, specs["W_h"][2:], size, peep <= set(specs))
    if set(specs) != {"W", "b"}:
        raise LayoutError(f"instance {name}'s parameters {sorted(specs)} are not "
                          f"std.ConvLSTMFused's")
    return Instance(name, cell, hidden, specs["W"][1] - hidden, specs["W"][2:], size, False)


def _take(tensors: dict, key: str, shape: tuple, where: str, optional: bool = False):
    """tensors[key] as NumPy, checked to have `shape`; None if optional and absent."""
    if key not in tensors:
        if optional:
            return None
        raise LayoutError(f"{where}: tensor {key} is missing (it has "
                          f"{', '.join(sorted(map(str, tensors))) or 'none'})")
    value = _numpy(tensors[key])
    if tuple(value.shape) != tuple(shape):
        raise LayoutError(f"{where}: tensor {key} has shape {tuple(value.shape)}, instance "
                          f"needs {tuple(shape)}")
    return value


def _no_input(inst: Instance, layout: str) -> LayoutError:
    return LayoutError(f"instance {inst.name} has no input (no W_x: a forecaster's cell "
                       f"that runs on its states alone); a {layout} always reads one, so "
                       f"there is no equal mapping")


def _drop_peepholes(g: Gates, inst: Instance, layout: str) -> None:
    """Leave a layout without peepholes: only exact if they are all zero."""
    if g.peep is None:
        return
    if any(np.any(v != 0) for v in g.peep.values()):
        raise LayoutError(f"instance {inst.name} has peepholes (w_ci, w_cf, w_co) with "
                          f"non-zero values, and a {layout} has no peepholes; use a cell "
                          f"with peephole = false, or ConvLSTMFused")
    g.peep = None


# ---------------------------------------------------------------------------
# convc's own parameters
# ---------------------------------------------------------------------------


def _from_convc(params: dict, inst: Instance) -> Gates:
    p = {k[len(inst.name) + 1:]: _numpy(v) for k, v in params.items()
         if k.startswith(inst.name + ".")}
    if inst.cell == "ConvLSTMFused":
        W, b = p["W"], p["b"]
        return Gates(reorder(W[:, :inst.inputs], IFOG, IFGO), reorder(W[:, inst.inputs:], IFOG,
                     IFGO), reorder(b, IFOG, IFGO))
    b = np.concatenate([p[f"b_{g}"] for g in IFGO])
    peep = {g: p[f"w_c{g}"] for g in PEEPHOLES} if inst.peephole else None
    return Gates(p.get("W_x"), p["W_h"], b, peep)


def _to_convc(g: Gates, inst: Instance, layout: str, zero_peepholes: bool) -> dict:
    if g.wx is None and inst.inputs is not None:
        raise LayoutError(f"a {layout} without input cannot fill instance {inst.name}'s W_x")
    if g.wx is not None and inst.inputs is None:
        raise _no_input(inst, layout)
    if inst.cell == "ConvLSTMFused" or not inst.peephole:
        _drop_peepholes(g, inst, layout)
    elif g.peep is None:
        if not zero_peepholes:
            raise LayoutError(f"instance {inst.name} has peepholes (w_ci, w_cf, w_co) and a "
                              f"{layout} has none; write the cell with peephole = false, or "
                              f"pass zero_peepholes=True to set them to zero (the same "
                              f"forward pass)")
        g.peep = {k: np.zeros((inst.hidden, *inst.size), g.wh.dtype) for k in PEEPHOLES}
    if inst.cell == "ConvLSTMFused":
        W = np.concatenate([reorder(g.wx, IFGO, IFOG, 0), reorder(g.wh, IFGO, IFOG, 0)], axis=1)
        return {inst.param("W"): W, inst.param("b"): reorder(g.b, IFGO, IFOG)}
    out = {inst.param("W_h"): g.wh}
    if g.wx is not None:
        out[inst.param("W_x")] = g.wx
    out.update({inst.param(f"b_{k}"): v for k, v in zip(IFGO, np.split(g.b, 4))})
    if g.peep is not None:
        out.update({inst.param(f"w_c{k}"): g.peep[k] for k in PEEPHOLES})
    return {k: np.ascontiguousarray(v) for k, v in sorted(out.items())}


# ---------------------------------------------------------------------------
# Keras ConvLSTM2D
# ---------------------------------------------------------------------------

KERAS = "Keras ConvLSTM2D"
_KERAS_CONFIG = {"padding": "same", "strides": (1, 1), "dilation_rate": (1, 1),
                 "activation": "tanh", "recurrent_activation": "sigmoid",
                 "go_backwards": False}


def _pair(value):
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def check_keras_config(config: dict) -> None:
    """Refuse a ConvLSTM2D configuration whose forward pass a std cell does not compute."""
    for key, need in _KERAS_CONFIG.items():
        if key not in config:
            continue
        got = config[key]
        if isinstance(need, tuple):
            got = _pair(got)
        if got != need:
            raise LayoutError(f"{KERAS} with {key}={config[key]!r} computes something else "
                              f"than convc's ConvLSTM, which needs {key}={need!r}")


def _keras_tensors(layer_or_weights: Any, config: dict | None) -> dict:
    """{"kernel", "recurrent_kernel", "bias"} of a Keras layer (its config checked) or of
    a dict (checked against `config` when given)."""
    if isinstance(layer_or_weights, dict):
        if config is not None:
            check_keras_config(config)
        return dict(layer_or_weights)
    if not hasattr(layer_or_weights, "get_weights"):
        raise TypeError(f"expected a Keras ConvLSTM2D layer or a dict of its weights, got "
                        f"{type(layer_or_weights).__name__}")
    check_keras_config(config if config is not None else layer_or_weights.get_config())
    names = [str(w.name).split("/")[-1].split(":")[0] for w in layer_or_weights.weights]
    return dict(zip(names, layer_or_weights.get_weights()))


def from_keras_convlstm2d(layer_or_weights: Any, model: Any, name: str, *,
                          config: dict | None = None, zero_peepholes: bool = False) -> dict:
    """convc parameters of instance `name` from a Keras ConvLSTM2D (the layer, or its
    weights as {"kernel", "recurrent_kernel", "bias"}; no bias: use_bias=False)."""
    inst = instance(model, name)
    if inst.inputs is None:
        raise _no_input(inst, KERAS)
    tensors = _keras_tensors(layer_or_weights, config)
    h4, (kh, kw) = 4 * inst.hidden, inst.kernel
    where = f"{KERAS} for instance {name}"
    kernel = _take(tensors, "kernel", (kh, kw, inst.inputs, h4), where)
    recurrent = _take(tensors, "recurrent_kernel", (kh, kw, inst.hidden, h4), where)
    bias = _take(tensors, "bias", (h4,), where, optional=True)
    g = Gates(kernel.transpose(3, 2, 0, 1), recurrent.transpose(3, 2, 0, 1),
              np.zeros(h4, kernel.dtype) if bias is None else bias)
    return _to_convc(g, inst, KERAS, zero_peepholes)


def to_keras_convlstm2d(params: dict, model: Any, name: str) -> dict:
    """{"kernel", "recurrent_kernel", "bias"} of a Keras ConvLSTM2D (filters = hidden,
    padding="same") equal to instance `name`; in the order of `layer.weights`, so
    `layer.set_weights(list(result.values()))` loads it."""
    inst = instance(model, name)
    if inst.inputs is None:
        raise _no_input(inst, KERAS)
    g = _from_convc(params, inst)
    _drop_peepholes(g, inst, KERAS)
    return {"kernel": np.ascontiguousarray(g.wx.transpose(2, 3, 1, 0)),
            "recurrent_kernel": np.ascontiguousarray(g.wh.transpose(2, 3, 1, 0)),
            "bias": np.ascontiguousarray(g.b)}


# ---------------------------------------------------------------------------
# One convolution over concat[x, h], gate order i, f, o, g (PyTorch, the yardstick)
# ---------------------------------------------------------------------------

TORCH = "PyTorch ConvLSTM cell"


def _from_fused(tensors: dict, inst: Instance, keys: dict, layout: str,
                peep_batch: bool) -> Gates:
    """Gates from a fused layout: keys["W"] (4h, C_in + h, kh, kw), keys["b"] (4h,),
    and peepholes keys["wci"...] ((1,) + (h, H, W) with peep_batch) when present."""
    if inst.inputs is None:
        raise _no_input(inst, layout)
    h4, (kh, kw) = 4 * inst.hidden, inst.kernel
    where = f"{layout} for instance {inst.name}"
    W = _take(tensors, keys["W"], (h4, inst.inputs + inst.hidden, kh, kw), where)
    b = _take(tensors, keys["b"], (h4,), where, optional=True)
    b = np.zeros(h4, W.dtype) if b is None else b
    present = [keys[f"wc{g}"] for g in PEEPHOLES if keys[f"wc{g}"] in tensors]
    peep = None
    if present:
        shape = ((1,) if peep_batch else ()) + (inst.hidden, *inst.size)
        peep = {g: _take(tensors, keys[f"wc{g}"], shape, where).reshape(inst.hidden, *inst.size)
                for g in PEEPHOLES}
    return Gates(reorder(W[:, :inst.inputs], IFOG, IFGO), reorder(W[:, inst.inputs:], IFOG, IFGO),
                 reorder(b, IFOG, IFGO), peep)


def _to_fused(g: Gates, inst: Instance, keys: dict, layout: str, peep_batch: bool) -> dict:
    if g.wx is None:
        raise _no_input(inst, layout)
    W = np.concatenate([reorder(g.wx, IFGO, IFOG), reorder(g.wh, IFGO, IFOG)], axis=1)
    out = {keys["W"]: W, keys["b"]: reorder(g.b, IFGO, IFOG)}
    if g.peep is not None:
        for k in PEEPHOLES:
            out[keys[f"wc{k}"]] = g.peep[k][None] if peep_batch else g.peep[k]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _torch_keys(prefix: str) -> dict:
    return {"W": prefix + "conv.weight", "b": prefix + "conv.bias",
            **{f"wc{g}": f"{prefix}wc{g}" for g in PEEPHOLES}}


def from_torch_convlstm(state_dict: dict, model: Any, name: str, *, prefix: str = "",
                        zero_peepholes: bool = False) -> dict:
    """convc parameters of instance `name` from a PyTorch ConvLSTM cell's state dict
    (`{prefix}conv.weight`, `{prefix}conv.bias`, and the yardstick's `{prefix}wci`,
    `wcf`, `wco` if it has them); other keys of the dict are ignored."""
    inst = instance(model, name)
    g = _from_fused(state_dict, inst, _torch_keys(prefix), TORCH, peep_batch=True)
    return _to_convc(g, inst, TORCH, zero_peepholes)


def to_torch_convlstm(params: dict, model: Any, name: str, *, prefix: str = "") -> dict:
    """A PyTorch ConvLSTM cell's state dict (NumPy arrays: wrap them with
    torch.from_numpy) equal to instance `name`: `{prefix}conv.weight`,
    `{prefix}conv.bias`, and `{prefix}wci`, `wcf`, `wco` (1, h, H, W) when the
    instance has peepholes (the yardstick's cell; ndrplz's has none)."""
    inst = instance(model, name)
    return _to_fused(_from_convc(params, inst), inst, _torch_keys(prefix), TORCH,
                     peep_batch=True)


# ---------------------------------------------------------------------------
# The peer yardstick's parameter dict (a whole model)
# ---------------------------------------------------------------------------

PEER = "peer yardstick layer"
PEER_HEAD = {"head.W": "head_W", "head.b": "head_b"}


def _peer_keys(layer: str) -> dict:
    return {"W": f"{layer}.W", "b": f"{layer}.b",
            **{f"wc{g}": f"{layer}.wc{g}" for g in PEEPHOLES}}


def _peer_layers(names) -> list[str]:
    layers = sorted({n.partition(".")[0] for n in names if n not in PEER_HEAD},
                    key=lambda s: (len(s), s))
    for layer in layers:
        if not (layer.startswith("l") and layer[1:].isdigit()):
            raise LayoutError(f"{layer}: the yardstick's layers are named l0, l1, ...")
    return layers


def _check_whole(m: dict, out: dict, layout: str) -> None:
    missing = sorted(set(m["params"]) - set(out))
    if missing:
        raise LayoutError(f"the {layout} leaves parameter {missing[0]} of model "
                          f"{m['name']} without a value")
    for name in sorted(out):
        need = tuple(m["params"][name]["shape"]) if name in m["params"] else None
        if need is None:
            raise LayoutError(f"the {layout} gives {name}, which model {m['name']} has not")
        if tuple(out[name].shape) != need:
            raise LayoutError(f"the {layout}'s value for {name} has shape "
                              f"{tuple(out[name].shape)}, model {m['name']} needs {need}")


def from_peer(peer_params: dict, model: Any, *, zero_peepholes: bool = False) -> dict:
    """All of a model's parameters from the yardstick's dict (common.make_params):
    layer `l{n}` into instance `l{n}` (std ConvLSTM or ConvLSTMFused), `head.W` and
    `head.b` into the weights `head_W` and `head_b`."""
    m, _ = _tables(model)
    out = {}
    for layer in _peer_layers(peer_params):
        inst = instance(model, layer)
        g = _from_fused(peer_params, inst, _peer_keys(layer), PEER, peep_batch=False)
        out.update(_to_convc(g, inst, PEER, zero_peepholes))
    for peer_name, convc_name in PEER_HEAD.items():
        if peer_name not in peer_params:
            raise LayoutError(f"the yardstick's parameters have no {peer_name}")
        out[convc_name] = np.ascontiguousarray(_numpy(peer_params[peer_name]))
    _check_whole(m, out, "yardstick's parameters")
    return dict(sorted(out.items()))


def to_peer(params: dict, model: Any) -> dict:
    """The yardstick's dict (common.make_params' names and shapes) of a model made of
    instances l0, l1, ... and the weights head_W, head_b, as `peer_cell_text` writes it
    (peepholes l{n}.wci/wcf/wco when the instances have them)."""
    m, _ = _tables(model)
    head = set(PEER_HEAD.values())
    others = sorted(set(m["params"]) - head)
    layers = _peer_layers(others)
    out = {}
    for layer in layers:
        inst = instance(model, layer)
        out.update(_to_fused(_from_convc(params, inst), inst, _peer_keys(layer), PEER,
                             peep_batch=False))
    for peer_name, convc_name in PEER_HEAD.items():
        if convc_name not in m["params"]:
            raise LayoutError(f"model {m['name']} has no {convc_name} (the yardstick's "
                              f"{peer_name})")
        out[peer_name] = np.ascontiguousarray(_numpy(params[convc_name]))
    return dict(sorted(out.items()))

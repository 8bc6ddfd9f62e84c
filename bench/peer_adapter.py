"""convc in the peer yardstick (/work/shared/bench/peers, `convlstm_convc.py`).

The harness builds every implementation from the same NumPy weights and data
(its `common.make_params` / `make_data`) and calls

    build_model(cfg, params, data, lr) -> object with .train_step() -> float loss
    versions() -> dict

This file writes the peers' model as a `.cell` program (`cell_text`, which is
`convc.runtime.bench.peer_cell_text`, so `convc bench` times the same model),
compiles it with convc, copies the peers' weights into convc's parameter names and
runs convc's generated forward and BPTT. Nothing here is specific to the
benchmark inside the compiler: the model is plain `std.ConvLSTMFused` layers
and a 1x1 head, exactly as a user would write it.

Peers' model (common.py): per layer z = conv(concat(x_t, h_{t-1}), W) + b
with gate order i, f, o, g; a 1x1 conv head + bias whose sigmoid predicts
frame t+1; BCE from logits (or MSE on the sigmoid), mean over every element
of every step; data (N, T+1, Cin, H, W) gives x = data[:, :-1],
y = data[:, 1:].
"""
from __future__ import annotations

import numpy as np

# the peers' head parameters under convc's names (layers keep theirs: l0.W, l0.b, ...)
_HEAD = {"head.W": "head_W", "head.b": "head_b"}


def cell_text(cfg: dict) -> str:
    """The peers' model for one config, as a `.cell` program (convc bench times the same)."""
    from convc.runtime.bench import peer_cell_text

    return peer_cell_text(cfg)


def convc_name(peer_name: str) -> str:
    """`l0.W` stays `l0.W` (instance l0, weight W); the head is a model-level weight."""
    return _HEAD.get(peer_name, peer_name)


def to_convc_params(params: dict, specs: dict) -> dict:
    """The peers' arrays under convc's names, reshaped to convc's shapes, contiguous."""
    out = {}
    for name, value in params.items():
        cname = convc_name(name)
        if cname not in specs:
            raise KeyError(f"peer parameter {name} has no convc counterpart ({cname})")
        shape = tuple(specs[cname]["shape"])
        out[cname] = np.ascontiguousarray(np.asarray(value).reshape(shape))
    missing = set(specs) - set(out)
    if missing:
        raise KeyError(f"convc parameters without a peer value: {sorted(missing)}")
    return out


class ConvcModel:
    """One compiled model plus its parameters and the fixed batch of the benchmark."""

    def __init__(self, cfg: dict, params: dict, data: np.ndarray, lr: float):
        import convc.api

        self.cfg = cfg
        self.text = cell_text(cfg)
        self.mod = convc.api.load(None, text=self.text)
        self.params = to_convc_params(params, self.mod.PARAMS)
        data = np.asarray(data)
        self.inputs = {"x": np.ascontiguousarray(data[:, :-1])}
        self.targets = {"y": np.ascontiguousarray(data[:, 1:])}
        self.lr = lr

    def train_step(self) -> float:
        """Forward over T, BPTT, one SGD update in place; the loss before the update."""
        return float(self.mod.sgd_step(self.params, self.inputs, self.targets, self.lr))

    def loss_and_grads(self):
        loss, grads, _ = self.mod.loss_and_grad(self.params, self.inputs, self.targets)
        back = {v: k for k, v in _HEAD.items()}
        out = {}
        for cname, g in grads.items():
            name = back.get(cname, cname)
            out[name] = np.array(g)
        return float(loss), out


def build_model(cfg: dict, params: dict, data, lr: float) -> ConvcModel:
    return ConvcModel(cfg, params, data, lr)


def versions() -> dict:
    import convc

    info = {"convc": convc.__version__}
    try:
        from threadpoolctl import threadpool_info

        blas = [d for d in threadpool_info() if d.get("user_api") == "blas"]
        if blas:
            info["convc_blas"] = f"{blas[0].get('internal_api')} {blas[0].get('version')}"
    except ImportError:
        pass
    return info

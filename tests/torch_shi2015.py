"""An independent PyTorch encoder-forecaster of Shi et al. 2015 (arXiv:1506.04214).

Used only as a test oracle for examples/shi2015.cell. It is written from the
paper, not from convc's generated code, so that an error shared by convc's
compiler and its standard library cannot hide in both:

* Equation (3), the ConvLSTM with peepholes (* is a convolution, o a
  Hadamard product):

      i_t = sigmoid(W_xi * X_t + W_hi * H_{t-1} + W_ci o C_{t-1} + b_i)
      f_t = sigmoid(W_xf * X_t + W_hf * H_{t-1} + W_cf o C_{t-1} + b_f)
      C_t = f_t o C_{t-1} + i_t o tanh(W_xc * X_t + W_hc * H_{t-1} + b_c)
      o_t = sigmoid(W_xo * X_t + W_ho * H_{t-1} + W_co o C_t + b_o)
      H_t = o_t o tanh(C_t)

  with every gate's convolutions kept separate here (eight kernels per
  layer, zero "same" padding), where convc fuses them into one W_x and one
  W_h in the gate order i, f, g, o. The mapping below is the only place
  that knows convc's layout.
* Section 3.3 and Figure 3: the encoding network reads the input frames;
  the forecasting network starts from the encoder's final (H, C), layer by
  layer, has no input of its own (its first layer has no W_x), and the
  hidden states of all its layers are concatenated and fed to a 1x1
  convolution that predicts each frame.
* The loss is the per-pixel binary cross-entropy of sigmoid(prediction)
  against the target, averaged over every element (convc's `bce`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

GATES = ("i", "f", "c", "o")  # convc's order i, f, g, o; the paper calls g's kernel W_xc


class PeepholeConvLSTM(torch.nn.Module):
    """One ConvLSTM layer of equation (3); `in_channels=None` for a layer without input."""

    def __init__(self, in_channels: int | None, hidden: int, kernel: int, size: tuple[int, int],
                 dtype=torch.float64):
        super().__init__()
        self.hidden = hidden
        self.padding = kernel // 2

        def param(*shape):
            return torch.nn.Parameter(torch.zeros(*shape, dtype=dtype))

        self.W_x = torch.nn.ParameterDict()
        if in_channels is not None:
            for gate in GATES:
                self.W_x[gate] = param(hidden, in_channels, kernel, kernel)
        self.W_h = torch.nn.ParameterDict({g: param(hidden, hidden, kernel, kernel) for g in GATES})
        self.b = torch.nn.ParameterDict({g: param(hidden) for g in GATES})
        self.W_c = torch.nn.ParameterDict({g: param(hidden, *size) for g in ("i", "f", "o")})

    def _pre(self, gate: str, x: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        """W_x? * X_t + W_h? * H_{t-1} + b_?: the convolutional part of one gate."""
        total = F.conv2d(h, self.W_h[gate], padding=self.padding)
        if x is not None:
            total = total + F.conv2d(x, self.W_x[gate], padding=self.padding)
        return total + self.b[gate].view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor | None, h: torch.Tensor, c: torch.Tensor):
        i = torch.sigmoid(self._pre("i", x, h) + self.W_c["i"] * c)
        f = torch.sigmoid(self._pre("f", x, h) + self.W_c["f"] * c)
        c_new = f * c + i * torch.tanh(self._pre("c", x, h))
        o = torch.sigmoid(self._pre("o", x, h) + self.W_c["o"] * c_new)
        h_new = o * torch.tanh(c_new)
        return h_new, c_new


class EncoderForecaster(torch.nn.Module):
    """Figure 3 of the paper: an encoding stack and a forecasting stack of equal layers."""

    def __init__(self, in_channels: int, hidden: list[int], kernel: int, size: tuple[int, int],
                 out_channels: int, dtype=torch.float64):
        super().__init__()
        below = [in_channels] + hidden[:-1]
        self.encoder = torch.nn.ModuleList(
            PeepholeConvLSTM(below[k], hidden[k], kernel, size, dtype) for k in range(len(hidden)))
        forecaster_in = [None] + hidden[:-1]
        self.forecaster = torch.nn.ModuleList(
            PeepholeConvLSTM(forecaster_in[k], hidden[k], kernel, size, dtype)
            for k in range(len(hidden)))
        self.W_out = torch.nn.Parameter(torch.zeros(out_channels, sum(hidden), 1, 1, dtype=dtype))
        self.b_out = torch.nn.Parameter(torch.zeros(out_channels, dtype=dtype))
        self.size = size

    def forward(self, x: torch.Tensor, frames_out: int) -> torch.Tensor:
        """x: (N, T_in, C, H, W) -> prediction logits (N, frames_out, C_out, H, W)."""
        n = x.shape[0]
        states = [(x.new_zeros(n, layer.hidden, *self.size),
                   x.new_zeros(n, layer.hidden, *self.size)) for layer in self.encoder]
        for t in range(x.shape[1]):
            below = x[:, t]
            for k, layer in enumerate(self.encoder):
                states[k] = layer(below, *states[k])
                below = states[k][0]
        logits = []
        for _ in range(frames_out):
            below = None
            for k, layer in enumerate(self.forecaster):
                states[k] = layer(below, *states[k])
                below = states[k][0]
            everything = torch.cat([h for h, _ in states], dim=1)
            logits.append(F.conv2d(everything, self.W_out) + self.b_out.view(1, -1, 1, 1))
        return torch.stack(logits, dim=1)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self.forward(x, y.shape[1]), y)


# -- convc's parameter names and layout <-> this module -------------------------------


def _layers(model: EncoderForecaster):
    for prefix, stack in (("enc", model.encoder), ("fc", model.forecaster)):
        for k, layer in enumerate(stack):
            yield f"{prefix}{k + 1}", layer


def load_convc_params(model: EncoderForecaster, params: dict[str, np.ndarray]) -> None:
    """Copy convc's parameters (fused W_x, W_h with gates i, f, g, o) into the model."""
    used = set()
    with torch.no_grad():
        for name, layer in _layers(model):
            for fused, parts in (("W_x", layer.W_x), ("W_h", layer.W_h)):
                if not len(parts):
                    continue
                blocks = np.split(params[f"{name}.{fused}"], 4, axis=0)
                for gate, block in zip(GATES, blocks):
                    parts[gate].copy_(torch.from_numpy(block))
                used.add(f"{name}.{fused}")
            for gate, convc_gate in zip(GATES, ("i", "f", "g", "o")):
                layer.b[gate].copy_(torch.from_numpy(params[f"{name}.b_{convc_gate}"]))
                used.add(f"{name}.b_{convc_gate}")
            for gate in ("i", "f", "o"):
                layer.W_c[gate].copy_(torch.from_numpy(params[f"{name}.w_c{gate}"]))
                used.add(f"{name}.w_c{gate}")
        model.W_out.copy_(torch.from_numpy(params["W_out"]))
        model.b_out.copy_(torch.from_numpy(params["b_out"]))
        used |= {"W_out", "b_out"}
    if used != set(params):
        raise ValueError(f"parameters not mapped: {sorted(set(params) ^ used)}")


def convc_params(model: EncoderForecaster) -> dict[str, np.ndarray]:
    """The model's parameters in convc's names and layout (the inverse of load_convc_params)."""
    out = {}
    for name, layer in _layers(model):
        for fused, parts in (("W_x", layer.W_x), ("W_h", layer.W_h)):
            if len(parts):
                out[f"{name}.{fused}"] = torch.cat([parts[g] for g in GATES]).detach().numpy()
        for gate, convc_gate in zip(GATES, ("i", "f", "g", "o")):
            out[f"{name}.b_{convc_gate}"] = layer.b[gate].detach().numpy().copy()
        for gate in ("i", "f", "o"):
            out[f"{name}.w_c{gate}"] = layer.W_c[gate].detach().numpy().copy()
    out["W_out"] = model.W_out.detach().numpy().copy()
    out["b_out"] = model.b_out.detach().numpy().copy()
    return out

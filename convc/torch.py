"""A compiled convc model as a PyTorch module: `convc.torch.Layer` (docs/torch.md).

    import convc.torch
    layer = convc.torch.Layer("examples/seed.cell", dtype=torch.float64)
    pred = layer(x)                       # x: (N, T, C, H, W); pred: (N, T, C, H, W)
    pred, final = layer(x, state=s, return_state=True)

The layer's forward pass is the compiled module's forward pass, its backward
pass the generated vector-Jacobian product (`vjp_start`: the forward's values
are kept for the backward, which runs once, through `torch.autograd.Function`).
It gives the gradients of the parameters, of the inputs and of the initial
states; torch does the rest (a loss, an encoder before, a head after, any
optimizer).

Parameters: every entry of `MODEL["params"]` is an `nn.Parameter` of the
layer, in `layer.params` (an `nn.ParameterDict`). PyTorch does not allow a
dot in a parameter's name, so convc's `lstm.W` is `lstm__W` there (every '.'
becomes '__'; `torch_name`), and its full name in `layer.named_parameters()`
is `params.lstm__W`. `layer.convc_name(p)` gives convc's name of a parameter
(the Parameter or either torch name), `layer.named_convc_parameters()` pairs
convc's names with the Parameters, `layer.convc_params()` copies them out as
NumPy arrays (for `convc.save_params`, the layouts of runtime/layouts.py) and
`layer.load_convc_params(params)` copies such a dict in.

Arrays cross without copies where they can: CPU tensors through
`tensor.detach().numpy()` and `torch.from_numpy`, CUDA tensors through DLPack
to CuPy and back (the module then runs on convc's GPU backend). The only
copies are the generated code's own (its time-major layout) and the initial
states' cotangents, which live in memory the next call reuses.

This module imports torch; `import convc` does not import it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

__all__ = ["Layer", "torch_name"]

SEP = "__"  # what stands for each '.' of a convc parameter name in a torch name
_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def torch_name(name: str) -> str:
    """The name of convc parameter `name` in `Layer.params`: every '.' becomes '__'."""
    return name.replace(".", SEP)


# ---------------------------------------------------------------- arrays <-> tensors

class _CpuBridge:
    """CPU tensors as NumPy arrays and back, sharing their memory."""

    device = "cpu"

    @staticmethod
    def array(t: torch.Tensor):
        return t.detach().numpy()

    @staticmethod
    def tensor(a) -> torch.Tensor:
        return torch.from_numpy(a)

    @staticmethod
    def zeros(shape, dtype):
        return np.zeros(shape, dtype=dtype)

    @staticmethod
    def copy(a):
        return np.array(a, copy=True)

    @staticmethod
    def context():
        return contextlib.nullcontext()


class _CudaBridge:
    """CUDA tensors as CuPy arrays and back through DLPack, sharing their memory.

    The module runs on convc's GPU backend (CuPy), on the tensors' device.
    torch and CuPy both work on their default stream here; a caller that runs
    torch on another stream must synchronise before the layer is called.
    """

    def __init__(self, device: torch.device):
        try:
            import cupy
        except ImportError as e:  # pragma: no cover - needs a GPU
            raise RuntimeError("convc.torch.Layer on CUDA tensors needs CuPy "
                               "(pip install 'convc[gpu]')") from e
        self.cupy, self.device = cupy, device

    def array(self, t: torch.Tensor):  # pragma: no cover - needs a GPU
        return self.cupy.from_dlpack(t.detach())

    @staticmethod
    def tensor(a) -> torch.Tensor:  # pragma: no cover - needs a GPU
        return torch.from_dlpack(a)

    def zeros(self, shape, dtype):  # pragma: no cover - needs a GPU
        return self.cupy.zeros(shape, dtype=dtype)

    def copy(self, a):  # pragma: no cover - needs a GPU
        return self.cupy.array(a, copy=True)

    def context(self):  # pragma: no cover - needs a GPU
        return self.cupy.cuda.Device(self.device.index or 0)


# ---------------------------------------------------------------- one call

class _Call:
    """What one forward call needs besides its tensors: the layer, the names in the
    order of the flat tensor list, the bridge and backend, steps."""

    def __init__(self, layer: "Layer", input_names, state_names, bridge, backend, steps,
                 finals: bool):
        self.layer, self.bridge, self.backend, self.steps = layer, bridge, backend, steps
        self.input_names, self.state_names = list(input_names), list(state_names)
        self.n_params = len(layer._names)
        self.output_names = list(layer.convc_module.MODEL["outputs"])
        # the final states are outputs of the call only when asked for
        self.final_names = list(layer.convc_module.MODEL["states"]) if finals else []

    def split(self, arrays):
        """Flat arrays -> (params, inputs, state) dicts of convc names."""
        p, i = self.n_params, self.n_params + len(self.input_names)
        params = dict(zip(self.layer._names, arrays[:p]))
        inputs = dict(zip(self.input_names, arrays[p:i]))
        state = dict(zip(self.state_names, arrays[i:])) or None
        return params, inputs, state


class _Apply(torch.autograd.Function):
    """The compiled forward pass; its backward is the pullback of `vjp_start`."""

    @staticmethod
    def forward(ctx, call: _Call, *tensors):
        bridge, mod, layer = call.bridge, call.layer.convc_module, call.layer
        params, inputs, state = call.split([bridge.array(t) for t in tensors])
        # no input or state needs a gradient: the parameters-only pullback skips their work
        data = any(ctx.needs_input_grad[1 + call.n_params:])
        with layer._options(bridge):
            outputs, final, pullback = mod.vjp_start(params, inputs, state=state,
                                                     steps=call.steps, bptt=layer.bptt,
                                                     backend=call.backend,
                                                     wrt="all" if data else "params")
        ctx.call, ctx.pullback = call, pullback
        ctx.shapes = {k: v.shape for k, v in outputs.items()}
        ctx.dtype = next(iter(params.values())).dtype
        ctx.save_for_backward(*tensors)  # only so that torch sees them changed in place
        ctx.set_materialize_grads(False)
        return (tuple(bridge.tensor(outputs[k]) for k in call.output_names)
                + tuple(bridge.tensor(final[k]) for k in call.final_names))

    @staticmethod
    def backward(ctx, *grads):
        call, pullback = ctx.call, ctx.pullback
        ctx.pullback = None
        saved = ctx.saved_tensors  # raises if one was changed in place since forward
        bridge = call.bridge
        n_out = len(call.output_names)
        cts = {k: (bridge.zeros(ctx.shapes[k], ctx.dtype) if g is None else bridge.array(g))
               for k, g in zip(call.output_names, grads[:n_out])}
        # a final state's cotangent is read as the last step's carried cotangent: a
        # copy of its own, so nothing torch holds is ever written
        scs = {k: bridge.copy(bridge.array(g).astype(ctx.dtype, copy=False))
               for k, g in zip(call.final_names, grads[n_out:]) if g is not None}
        with call.layer._options(bridge):
            if pullback is not None:
                param_cts, input_cts, state_cts = pullback(cts, state_cotangents=scs or None)
            else:  # a second backward through the graph (retain_graph=True): forward again
                params, inputs, state = call.split([bridge.array(t) for t in saved])
                param_cts, input_cts, state_cts = call.layer.convc_module.vjp(
                    params, inputs, cts, state=state, state_cotangents=scs or None,
                    bptt=call.layer.bptt, backend=call.backend)
        need = ctx.needs_input_grad[1:]
        p, i = call.n_params, call.n_params + len(call.input_names)
        out = [bridge.tensor(param_cts[k]) if need[j] else None
               for j, k in enumerate(call.layer._names)]
        out += [bridge.tensor(input_cts[k]) if need[p + j] else None
                for j, k in enumerate(call.input_names)]
        # the initial states' cotangents live in memory the next call reuses: copied
        out += [bridge.tensor(bridge.copy(state_cts[k])) if need[i + j] and k in state_cts
                else None for j, k in enumerate(call.state_names)]
        return (None, *out)


# ---------------------------------------------------------------- the layer

def _compiled(path_or_module, model, text, recompute, debug_nans):
    """The generated module: the one given, or `convc.load(..., vjp=True)` of a path."""
    from convc.runtime.vjp import module_with_vjp

    return module_with_vjp(path_or_module, model, text=text, recompute=recompute,
                           debug_nans=debug_nans)


class Layer(nn.Module):
    """A compiled convc model as an `nn.Module` (see the module's docstring).

    Layer(path_or_module, model=None, dtype=torch.float32, *, text=None, seed=0,
          bptt=None, recompute=None, debug_nans=False, poison=False)

    path_or_module: a `.cell` path (compiled here, with vjp=True; `model=` picks
    a model of the file, `text=` gives the spec's text for that path, `recompute=K`
    and `debug_nans=True` are compile options) or a module from
    `convc.load(..., vjp=True)`. dtype: torch.float32 or torch.float64, of the
    parameters and of the computation (inputs and states of another dtype are
    converted, their gradients converted back by torch). seed: of
    `init_params(seed=)`, the parameters' initial values. bptt=k truncates the
    backward pass to windows of k steps. poison=True runs every call in poison
    mode (every buffer starts as NaN: a read before a write shows).
    """

    def __init__(self, path_or_module, model: str | None = None, dtype=torch.float32, *,
                 text: str | None = None, seed: int = 0, bptt: int | None = None,
                 recompute: int | None = None, debug_nans: bool = False,
                 poison: bool = False):
        super().__init__()
        if dtype not in _DTYPES:
            raise TypeError(f"convc.torch.Layer computes in torch.float32 or torch.float64, "
                            f"not {dtype}")
        mod = _compiled(path_or_module, model, text, recompute, debug_nans)
        self.convc_module = mod
        self.dtype = dtype
        self.bptt, self.poison = bptt, bool(poison)
        self._names = sorted(mod.MODEL["params"])
        keys = [torch_name(n) for n in self._names]
        if len(set(keys)) != len(keys):
            clash = sorted(k for k in keys if keys.count(k) > 1)[0]
            raise ValueError(f"model {mod.MODEL['name']}: two parameters are both {clash!r} "
                             f"with '.' written as {SEP!r}")
        self._keys = dict(zip(self._names, keys))
        self._key_list = keys
        init = mod.init_params(seed=seed, dtype=np.dtype(_DTYPES[dtype]).name)
        self.params = nn.ParameterDict(
            {self._keys[n]: nn.Parameter(torch.from_numpy(np.ascontiguousarray(init[n])))
             for n in self._names})
        self._backends: dict = {}

    # ------------------------------------------------------------ names

    def convc_name(self, param) -> str:
        """convc's name of a parameter: the Parameter itself, its key in `params`
        ('lstm__W') or its name in `named_parameters()` ('params.lstm__W')."""
        if isinstance(param, str):
            key = param[len("params."):] if param.startswith("params.") else param
            for name, k in self._keys.items():
                if k == key or name == key:
                    return name
            raise KeyError(f"layer {self.model_name} has no parameter {param!r}")
        for name, p in self.named_convc_parameters():
            if p is param:
                return name
        raise KeyError(f"that tensor is not a parameter of layer {self.model_name}")

    def named_convc_parameters(self):
        """(convc name, Parameter) of every parameter, in name order."""
        for name in self._names:
            yield name, self.params[self._keys[name]]

    def convc_params(self) -> dict:
        """The parameters as NumPy arrays (copies) under convc's names."""
        return {n: p.detach().cpu().numpy().copy() for n, p in self.named_convc_parameters()}

    def load_convc_params(self, params: Mapping) -> None:
        """Copy a dict of arrays or tensors under convc's names into the parameters
        (every parameter, each of its shape)."""
        missing = [n for n in self._names if n not in params]
        if missing:
            raise KeyError(f"layer {self.model_name}: no value for parameter {missing[0]}")
        with torch.no_grad():
            for name, p in self.named_convc_parameters():
                value = torch.as_tensor(np.asarray(params[name]) if not
                                        isinstance(params[name], torch.Tensor) else params[name])
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"parameter {name} has shape {tuple(p.shape)}, the value "
                                     f"{tuple(value.shape)}")
                p.copy_(value)

    @property
    def model_name(self) -> str:
        return self.convc_module.MODEL["name"]

    def extra_repr(self) -> str:
        m = self.convc_module.MODEL
        return (f"model={m['name']}, inputs={list(m['inputs'])}, outputs={list(m['outputs'])}, "
                f"states={list(m['states'])}, dtype={self.dtype}")

    # ------------------------------------------------------------ running

    def _options(self, bridge):
        """The context of one call: the bridge's device, and poison mode when asked."""
        return self._poisoned(bridge) if self.poison else bridge.context()

    @contextlib.contextmanager
    def _poisoned(self, bridge):
        from convc.runtime import kernels

        before = kernels.poison_enabled()
        kernels.set_poison(True)
        try:
            with bridge.context():
                yield
        finally:
            kernels.set_poison(before)

    def _bridge(self, device: torch.device):
        if device.type == "cpu":
            return _CpuBridge, None
        if device.type != "cuda":
            raise ValueError(f"convc.torch.Layer runs on CPU and CUDA tensors, not on "
                             f"{device.type}")
        if device not in self._backends:  # pragma: no cover - needs a GPU
            from convc.runtime.backend import get_backend

            bridge = _CudaBridge(device)
            with bridge.context():
                self._backends[device] = (bridge, get_backend("gpu", "numpy"))
        return self._backends[device]  # pragma: no cover - needs a GPU

    def _sequences(self, inputs):
        names = list(self.convc_module.MODEL["inputs"])
        if isinstance(inputs, torch.Tensor):
            if len(names) != 1:
                raise TypeError(f"model {self.model_name} has inputs {', '.join(names)}: give "
                                f"a dict {{name: tensor}}")
            return {names[0]: inputs}
        if inputs is None:
            inputs = {}
        if not isinstance(inputs, Mapping):
            raise TypeError(f"inputs: a tensor (N, T, C, H, W) or a dict of them, not "
                            f"{type(inputs).__name__}")
        extra = sorted(set(inputs) - set(names))
        missing = [n for n in names if n not in inputs]
        if extra or missing:
            raise KeyError(f"model {self.model_name} has inputs {', '.join(names) or 'none'}"
                           f"; {'missing ' + missing[0] if missing else 'no ' + extra[0]}")
        return {n: inputs[n] for n in names}

    def forward(self, inputs, state: Mapping | None = None, steps=None,
                return_state: bool = False):
        """Run the model: its outputs, a tensor (N, T, C, H, W) for a model with one
        output, else a dict {name: tensor}; with return_state=True, (outputs, final
        states {name: tensor (N, C, H, W)}).

        inputs: a tensor for a model with one input, else {name: tensor}; state:
        {state name: tensor (N, C, H, W)} to start from (gradients flow into it);
        steps: the frames to predict, for a forecast model (as `forward(steps=)`).
        """
        mod = self.convc_module
        meta = mod.MODEL
        table = self.params
        params = [getattr(table, k) for k in self._key_list]
        device = params[0].device
        seqs = self._sequences(inputs)
        state = dict(state or {})
        unknown = sorted(set(state) - set(meta["states"]))
        if unknown:
            raise KeyError(f"model {self.model_name} has no state {unknown[0]} (it has "
                           f"{', '.join(meta['states']) or 'none'})")
        for what, table in (("input", seqs), ("state", state)):
            for name, t in table.items():
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{what} {name}: a torch tensor, not {type(t).__name__}")
                if t.device != device:
                    raise ValueError(f"{what} {name} is on {t.device}, the layer's parameters "
                                     f"on {device}")
        dtype = self.dtype
        tensors = params + [t if t.dtype == dtype else t.to(dtype)
                            for t in (*seqs.values(), *state.values())]
        bridge, backend = self._bridge(device)
        call = _Call(self, seqs, state, bridge, backend, steps, return_state)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            flat = _Apply.apply(call, *tensors)
            n_out = len(call.output_names)
            outputs = dict(zip(call.output_names, flat[:n_out]))
            final = dict(zip(call.final_names, flat[n_out:]))
        else:  # nothing to differentiate: the plain forward pass, no values kept
            p, i, s = call.split([bridge.array(t) for t in tensors])
            with self._options(bridge):
                out, fin = mod.forward(p, i, state=s, steps=steps, backend=backend)
            outputs = {k: bridge.tensor(out[k]) for k in call.output_names}
            final = {k: bridge.tensor(fin[k]) for k in call.final_names}
        result = next(iter(outputs.values())) if len(outputs) == 1 else outputs
        return (result, final) if return_state else result

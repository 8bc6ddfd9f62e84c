"""A compiled convc model as a Chainer Link (docs/chainer.md).

    import convc.chainer
    layer = convc.chainer.Link("examples/seed.cell", dtype=numpy.float64)
    outputs, final = layer({"x": x})          # dicts of chainer.Variable
    outputs["pred"]                           # (N, T, C, H, W), differentiable

`Link(path_or_module, model=None, dtype=numpy.float32, params=None, seed=0)` compiles
the `.cell` file (or takes a module `convc.load(..., vjp=True)` made) and holds the
model's parameters as `chainer.Parameter`s, so `chainer.optimizers`, `cleargrads`,
`to_device` and `chainer.serializers` work on it as on any Link. Calling it runs
one `FunctionNode`: its forward is the compiled module's `vjp_start` (the forward
pass, whose values are kept), its backward the pullback vjp_start returned, so
the forward pass runs once per step. Under `chainer.no_backprop_mode()` it runs
the module's plain `forward` and keeps nothing.

Parameter names: Chainer takes an attribute name for a parameter, and convc's
names have dots (`lstm.W`, `enc1.b_f`). Each dot becomes two underscores
(`lstm__W`, `enc1__b_f`); a name that would still clash with an attribute of
the Link gets a trailing underscore. `link.names` is the mapping
{convc name: chainer name}, `link.convc_params()` the arrays under convc's
names (for `convc.save_params`), and `link.load_convc_params(params)` copies
a convc parameter dict in.

Inputs and states: `link(inputs, state=None, steps=None, bptt=None)` takes
{input name: array or Variable (N, T, C, H, W)} (or one array when the model
has one input) and, optionally, initial states {state name: (N, C, H, W)};
`steps=` is the number of frames a forecast model predicts. It returns
(outputs, final): {output name: Variable (N, T, C, H, W)} and {state name:
Variable (N, C, H, W)}, every final state the module returns. Gradients flow
to the parameters, the inputs, the given initial states and from the outputs
and final states. A state that starts from another loop's final state (`init
= enc` in the spec) cannot be given. Gradients are first order: a double
backward (`enable_double_backprop=True`) is refused.

Arrays: NumPy, or CuPy when the Link is on a GPU (`link.to_device("@cupy:0")`):
then the module runs on convc's CuPy backend (`get_backend("gpu")`). float32
or float64, one dtype for the parameters and the inputs. Chainer 7.8.1 is
imported through convc.runtime._chainer_compat, which patches what it misses
on NumPy 2 (`pip install 'convc[chainer]'`).
"""
from __future__ import annotations

import numpy

from convc.runtime._chainer_compat import import_chainer

chainer = import_chainer()

__all__ = ["Link", "chainer_name", "load_module"]

_GPU: dict = {}  # the one CuPy backend every Link shares (vjp_start keeps clones per backend)


def load_module(path_or_module, model: str | None = None, **options):
    """The compiled module: `path_or_module` itself (made with vjp=True) or
    `convc.load(path, model=model, vjp=True, **options)` (runtime/vjp.py)."""
    from convc.runtime.vjp import module_with_vjp

    return module_with_vjp(path_or_module, model, **options)


def chainer_name(name: str, taken=()) -> str:
    """The Chainer attribute name of convc parameter `name`: dots as two underscores,
    then a trailing underscore while it is in `taken` (a Link's attributes)."""
    out = name.replace(".", "__")
    while out in taken:
        out += "_"
    return out


def _backend_for(xp):
    """None (the module's NumPy default) for NumPy arrays, convc's CuPy backend for CuPy."""
    if xp is numpy:
        return None
    if "gpu" not in _GPU:  # pragma: no cover - needs a GPU
        from convc.runtime.backend import get_backend

        _GPU["gpu"] = get_backend("gpu", "numpy")
    return _GPU["gpu"]  # pragma: no cover


class _Apply(chainer.FunctionNode):
    """One run of the compiled model: inputs (params..., inputs..., states...), outputs
    (outputs..., final states...). forward: vjp_start; backward: its pullback."""

    def __init__(self, mod, params: list, inputs: list, states: list, steps=None, bptt=None):
        self.mod, self.steps, self.bptt = mod, steps, bptt
        self.names = (params, inputs, states)
        self._pullback = None

    def _split(self, arrays):
        p, i, s = self.names
        a, b = len(p), len(p) + len(i)
        return (dict(zip(p, arrays[:a])), dict(zip(i, arrays[a:b])),
                dict(zip(s, arrays[b:])) or None)

    def forward(self, arrays):
        params, inputs, state = self._split(arrays)
        self._xp = chainer.backend.get_array_module(*arrays)
        self._backend = _backend_for(self._xp)
        kw = dict(state=state, steps=self.steps, backend=self._backend)
        if chainer.config.enable_backprop:
            self.retain_inputs(tuple(range(len(arrays))))  # for a second backward only
            outputs, final, self._pullback = self.mod.vjp_start(params, inputs, bptt=self.bptt,
                                                                **kw)
        else:
            outputs, final = self.mod.forward(params, inputs, **kw)
        self.out_names, self.final_names = list(outputs), list(final)
        self._like = [(v.shape, v.dtype) for v in list(outputs.values())]
        return tuple(outputs.values()) + tuple(final.values())

    def _product(self, cotangents, state_cotangents):
        pullback, self._pullback = self._pullback, None
        if pullback is not None:
            return pullback(cotangents, state_cotangents=state_cotangents)
        # a second backward over the same graph: the forward's values are gone, recompute
        params, inputs, state = self._split([v.array for v in self.get_retained_inputs()])
        return self.mod.vjp(params, inputs, cotangents, state=state,
                            state_cotangents=state_cotangents, bptt=self.bptt,
                            backend=self._backend)

    def backward(self, indexes, grad_outputs):
        if chainer.config.enable_backprop:
            raise NotImplementedError("convc.chainer.Link gives first-order gradients only; "
                                      "its backward cannot be differentiated again "
                                      "(enable_double_backprop=True)")
        n = len(self.out_names)
        cotangents = {name: (g.array if g is not None else self._xp.zeros(shape, dtype))
                      for name, g, (shape, dtype) in zip(self.out_names, grad_outputs[:n],
                                                         self._like)}
        state_cotangents = {name: g.array for name, g in zip(self.final_names, grad_outputs[n:])
                            if g is not None} or None
        param_cts, input_cts, state_cts = self._product(cotangents, state_cotangents)
        p, i, s = self.names
        found = [param_cts[k] for k in p] + [input_cts[k] for k in i] + \
            [state_cts.get(k) for k in s]
        return tuple(None if found[j] is None else chainer.Variable(found[j]) for j in indexes)


class Link(chainer.Link):
    """A compiled convc model whose parameters are chainer Parameters (see the module's
    docstring): link(inputs, state=None, steps=None, bptt=None) -> (outputs, final)."""

    def __init__(self, path_or_module, model: str | None = None, dtype=numpy.float32,
                 params: dict | None = None, seed: int = 0, **load_options):
        super().__init__()
        self.module = load_module(path_or_module, model, **load_options)
        meta = self.module.MODEL
        dtype = numpy.dtype(dtype)
        if dtype not in (numpy.float32, numpy.float64):
            raise ValueError(f"dtype {dtype}: convc runs float32 or float64")
        if params is None:
            params = self.module.init_params(seed=seed, dtype=dtype.name)
        taken = set(dir(self))
        self.names: dict[str, str] = {}
        with self.init_scope():
            for name in meta["params"]:
                cname = chainer_name(name, taken)
                taken.add(cname)
                self.names[name] = cname
                setattr(self, cname, chainer.Parameter(numpy.array(params[name], dtype=dtype)))

    # ------------------------------------------------------------ parameters by convc name
    def convc_params(self) -> dict:
        """{convc name: the parameter's array} (the arrays themselves, not copies)."""
        return {name: getattr(self, cname).array for name, cname in self.names.items()}

    def load_convc_params(self, params: dict) -> None:
        """Copy {convc name: array} into the parameters (every one must be given)."""
        missing = sorted(set(self.names) - set(params))
        if missing:
            raise KeyError(f"load_convc_params: no value for {', '.join(missing)}")
        for name, cname in self.names.items():
            p = getattr(self, cname)
            value = p.xp.asarray(params[name], dtype=p.dtype)
            if value.shape != p.shape:
                raise ValueError(f"load_convc_params: {name} has shape {value.shape}, the "
                                 f"model needs {p.shape}")
            p.array[...] = value

    # ------------------------------------------------------------------------ forward
    def forward(self, inputs, state: dict | None = None, steps=None, bptt=None):
        """(outputs, final): {output: Variable (N, T, C, H, W)}, {state: Variable (N, C, H, W)}."""
        meta = self.module.MODEL
        if not isinstance(inputs, dict):
            if len(meta["inputs"]) != 1:
                raise TypeError(f"model {meta['name']} has inputs {', '.join(meta['inputs'])}: "
                                "give them as a dict")
            inputs = {next(iter(meta["inputs"])): inputs}
        state = dict(state or {})
        for name in state:
            spec = meta["states"].get(name)
            if spec is not None and spec["init"] == "final":
                raise ValueError(f"state {name} starts from another loop's final state; it "
                                 "cannot be given")
        pnames, inames, snames = list(self.names), list(inputs), list(state)
        node = _Apply(self.module, pnames, inames, snames, steps=steps, bptt=bptt)
        args = [getattr(self, self.names[k]) for k in pnames] + \
            [inputs[k] for k in inames] + [state[k] for k in snames]
        results = node.apply(args)
        n = len(node.out_names)
        return (dict(zip(node.out_names, results[:n])),
                dict(zip(node.final_names, results[n:])))

"""A compiled convc model as a JAX function (docs/jax.md).

    import convc.jax
    f = convc.jax.layer("examples/seed.cell")
    outputs, final = f(params, {"x": x})      # params: {convc name: jax array}
    jax.grad(lambda p: outputs_to_loss(f(p, {"x": x})[0]))(params)

`layer(path_or_module, model=None, bptt=None, backend=None)` compiles the
`.cell` file (or takes a module `convc.load(..., vjp=True)` made) and returns

    f(params, inputs, state=None, steps=None) -> (outputs, final)

params: {convc name, as in MODEL["params"]: array}; inputs: {input name: array
(N, T, C, H, W)}; state: {state name: (N, C, H, W)} initial states instead of the
spec's (a state the spec starts from another loop's final state, `init = enc`,
cannot be given); steps: the number of frames a forecast model predicts, a Python
int (static under jax.jit). It returns the model's outputs {name: (N, T, C, H,
W)} and every final state {name: (N, C, H, W)}, as the module's `forward` does;
both are differentiable, so a loss may use the final states too.

`f` is a `jax.custom_vjp` function that calls the compiled NumPy module through
`jax.pure_callback`, so it works under `jax.grad`, `jax.vjp` and `jax.jit` (and
`jax.vmap`, one call per example). Its forward callback runs the module's
`forward`; its backward callback runs the module's `vjp` (convc's generated
BPTT) for the cotangents of the outputs and final states, and returns those of
the parameters, inputs and given initial states. A pure_callback cannot keep
Python state between the two calls (the forward pass's values cannot wait in
memory for the backward pass, as they do in convc.chainer and convc.torch), so
the backward callback runs the forward pass again inside `vjp`: a training step
costs two forward passes and one backward pass. Gradients are first order: the
backward pass is not itself differentiable.

dtypes: float32 or float64 (one for all arrays; float64 needs
`jax.config.update("jax_enable_x64", True)`). The callbacks run on the host's
NumPy arrays; `backend=` (e.g. convc.runtime.backend.get_backend("gpu")) runs
the module on that backend instead, copying the arrays to it and back.
"""
from __future__ import annotations

import inspect

import numpy

import jax
import jax.numpy as jnp

__all__ = ["layer", "load_module"]


def load_module(path_or_module, model: str | None = None, **options):
    """The compiled module: `path_or_module` itself (made with vjp=True) or
    `convc.load(path, model=model, vjp=True, **options)` (runtime/vjp.py)."""
    from convc.runtime.vjp import module_with_vjp

    return module_with_vjp(path_or_module, model, **options)


def _callback_options() -> dict:
    """vmap_method="sequential" where this JAX's pure_callback takes it (0.4.34+)."""
    if "vmap_method" in inspect.signature(jax.pure_callback).parameters:
        return {"vmap_method": "sequential"}
    return {}  # pragma: no cover - older JAX: its default, no vmap of the callback


def _on(backend, tree):
    """The callback's NumPy arrays as the backend's arrays (unchanged for NumPy)."""
    xp = getattr(backend, "xp", numpy)
    if xp is numpy:
        return tree
    return jax.tree_util.tree_map(xp.asarray, tree)  # pragma: no cover - needs a GPU


def _host(tree, dtype):
    """NumPy arrays of `dtype`, from NumPy or CuPy arrays."""
    def one(a):
        if not isinstance(a, numpy.ndarray) and hasattr(a, "get"):
            a = a.get()  # pragma: no cover - CuPy
        return numpy.asarray(a, dtype=dtype)
    return jax.tree_util.tree_map(one, tree)


def _shapes(meta: dict, params, inputs, steps):
    """The ShapeDtypeStructs of (outputs, final), from the MODEL table: N from the inputs,
    T from the input on an output's axis or, for a forecast axis, from steps."""
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
    in_axes = {meta["axes"][n]: n for n in meta["inputs"]}
    n = next(iter(inputs.values())).shape[0]

    def length(axis):
        if axis in in_axes:
            return inputs[in_axes[axis]].shape[1]
        value = steps.get(axis) if isinstance(steps, dict) else steps
        if value is None:
            raise ValueError(f"model {meta['name']} forecasts over axis {axis!r}: give "
                             "steps= (the number of frames to predict)")
        return int(value)
    out_axes = meta["vjp"]["output_axes"]
    outs = {k: jax.ShapeDtypeStruct((n, length(out_axes[k])) + tuple(s), dtype)
            for k, s in meta["outputs"].items()}
    fins = {k: jax.ShapeDtypeStruct((n,) + tuple(v["shape"]), dtype)
            for k, v in meta["states"].items()}
    return outs, fins


def _callbacks(mod, steps, bptt, backend):
    """(forward_cb, vjp_cb): what pure_callback calls, on NumPy arrays."""
    meta = mod.MODEL
    state_names = list(meta["states"])

    def forward_cb(params, inputs, state):
        out, fin = mod.forward(_on(backend, params), _on(backend, inputs),
                               state=_on(backend, state) or None, steps=steps, backend=backend)
        missing = [k for k in state_names if k not in fin]
        if missing:  # MODEL and forward disagree: a compiler bug, not the caller's
            raise RuntimeError(f"model {meta['name']}: forward gave no final state "
                               f"{', '.join(missing)}")
        dtype = next(iter(params.values())).dtype
        return _host(out, dtype), _host({k: fin[k] for k in state_names}, dtype)

    def vjp_cb(params, inputs, state, out_cts, fin_cts):
        dtype = next(iter(params.values())).dtype
        pc, ic, sc = mod.vjp(_on(backend, params), _on(backend, inputs), _on(backend, out_cts),
                             state=_on(backend, state) or None,
                             state_cotangents=_on(backend, fin_cts), bptt=bptt, backend=backend)
        sc = {k: sc[k] if k in sc else numpy.zeros_like(state[k]) for k in state}
        return (_host({k: pc[k] for k in params}, dtype),
                _host({k: ic[k] for k in inputs}, dtype), _host(sc, dtype))

    return forward_cb, vjp_cb


def _custom_vjp(mod, steps, bptt, backend):
    """run(params, inputs, state) -> (outputs, final), a jax.custom_vjp function whose
    forward and backward are pure_callbacks into the module's forward and vjp."""
    forward_cb, vjp_cb = _callbacks(mod, steps, bptt, backend)
    options = _callback_options()

    def call(params, inputs, state):
        return jax.pure_callback(forward_cb, _shapes(mod.MODEL, params, inputs, steps), params,
                                 inputs, state, **options)

    @jax.custom_vjp
    def run(params, inputs, state):
        return call(params, inputs, state)

    def run_fwd(params, inputs, state):
        return call(params, inputs, state), (params, inputs, state)

    def run_bwd(saved, cts):
        like = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), saved)
        out_cts, fin_cts = cts
        return jax.pure_callback(vjp_cb, like, *saved, out_cts, fin_cts, **options)

    run.defvjp(run_fwd, run_bwd)
    return run


def _check_args(meta: dict, params, state: dict) -> None:
    missing = sorted(set(meta["params"]) - set(params))
    if missing:
        raise KeyError(f"model {meta['name']}: params has no {', '.join(missing)}")
    for name in state:
        spec = meta["states"].get(name)
        if spec is None:
            raise KeyError(f"model {meta['name']} has no state {name!r} (it has "
                           f"{', '.join(meta['states'])})")
        if spec["init"] == "final":
            raise ValueError(f"state {name} starts from another loop's final state; it "
                             "cannot be given")


def layer(path_or_module, model: str | None = None, bptt: int | None = None, backend=None,
          **load_options):
    """f(params, inputs, state=None, steps=None) -> (outputs, final), differentiable by JAX
    (see the module's docstring)."""
    mod = load_module(path_or_module, model, **load_options)
    meta = mod.MODEL
    made: dict = {}  # steps -> its custom_vjp function

    def f(params, inputs, state=None, steps=None):
        """(outputs, final) of the compiled model; differentiable in params, inputs, state."""
        state = dict(state or {})
        _check_args(meta, params, state)
        key = tuple(sorted(steps.items())) if isinstance(steps, dict) else steps
        if key not in made:
            made[key] = _custom_vjp(mod, steps, bptt, backend)
        return made[key]({k: params[k] for k in meta["params"]}, dict(inputs), state)

    f.module = mod
    return f

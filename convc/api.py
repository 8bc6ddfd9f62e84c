"""The Python API: compile a `.cell` file and import the result in one call.

    m = convc.load("model.cell")
    params = m.init_params(seed=0)
    loss, grads, _ = m.loss_and_grad(params, {"x": x}, {"y": y})
    result = m.train(steps=200, out="runs/m")
    preds = m.predict("runs/m", data="synthetic")
    convc.save_params(params, "m.safetensors", m)     # weights out and in (docs/weights.md)
    params = convc.load_params("m.safetensors", m)

Loading is the runtime's (`convc.runtime.loader`, which calls the compiler's
driver); this module adds the conveniences `train` and `predict` and is the
layer above the runtime, which never imports it. The generated source is
registered with `linecache` under a name that says where it came from, so
tracebacks and `pdb` show the generated lines.
"""
from __future__ import annotations

import types
from pathlib import Path

from convc.runtime.loader import module_from_source  # noqa: F401  (part of this API)


def compile_file(path, model: str | None = None, text: str | None = None,
                 debug_nans: bool = False, recompute: int | None = None):
    """Run the compiler; returns a `convc.compiler.driver.Compiled`.

    recompute=K trades compute for memory: see `convc.compiler.driver.compile_program`.
    """
    from convc.compiler.driver import compile_model
    return compile_model(path, text=text, model=model, debug_nans=debug_nans,
                         recompute=recompute)


def load(path, model: str | None = None, text: str | None = None,
         debug_nans: bool = False, recompute: int | None = None,
         snapshots: bool = False, target=("cpu", "numpy"), vjp: bool = False,
         fuse: bool | None = None) -> types.ModuleType:
    """Compile a `.cell` file in memory and import it.

    The returned module has `init_params`, `forward`, `loss_and_grad`,
    `sgd_step`, `MODEL` (metadata), plus `compiled` (every stage of the
    compile), `train(...)` (the training loop of convc.runtime.train) and
    `predict(checkpoint, ...)` (convc.runtime.predict.predict). target: the
    backend the code is planned for, (device, conv) as registered; the module
    runs on every backend. vjp=True also compiles `mod.vjp(params, inputs,
    cotangents, ...)`, the vector-Jacobian product (convc.runtime.vjp).
    """
    from convc.runtime import loader
    from convc.runtime import predict as _predict
    from convc.runtime import train as _train

    mod = loader.load(path, model=model, text=text, debug_nans=debug_nans, recompute=recompute,
                      snapshots=snapshots, target=target, vjp=vjp, fuse=fuse)

    def train(params=None, **options):
        return _train.train(mod, params=params, **options)

    def predict(checkpoint, **options):
        return _predict.predict(mod, checkpoint, **options)

    train.__doc__ = _train.train.__doc__
    predict.__doc__ = _predict.predict.__doc__
    mod.train = train
    mod.predict = predict
    return mod


def import_generated(path) -> types.ModuleType:
    """Import a module written by `convc compile -o model.py`."""
    from convc.runtime import loader

    return loader.import_generated(Path(path))


def save_params(params: dict, path, model, **options):
    """Write parameters as a .safetensors file for `model`; see
    `convc.runtime.weights.save_params` (metadata=, overwrite=)."""
    from convc.runtime.weights import save_params as save

    return save(params, path, model, **options)


def load_params(path, model_or_spec, **options) -> dict:
    """Read a .safetensors file written for `model_or_spec`, refusing one that does not
    fit; see `convc.runtime.weights.load_params` (dtype=, check_fingerprint=,
    allow_nonfinite=)."""
    from convc.runtime.weights import load_params as load_

    return load_(path, model_or_spec, **options)

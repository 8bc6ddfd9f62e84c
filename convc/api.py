"""The Python API: compile a `.cell` file and import the result in one call.

    m = convc.load("model.cell")
    params = m.init_params(seed=0)
    loss, grads, _ = m.loss_and_grad(params, {"x": x}, {"y": y})

The generated source is registered with `linecache` under a name that says
where it came from, so tracebacks and `pdb` show the generated lines.
"""
from __future__ import annotations

import hashlib
import linecache
import sys
import types
from pathlib import Path


def compile_file(path, model: str | None = None, text: str | None = None,
                 debug_nans: bool = False, recompute: int | None = None):
    """Run the compiler; returns a `convc.compiler.driver.Compiled`.

    recompute=K trades compute for memory: see `convc.compiler.driver.compile_program`.
    """
    from convc.compiler.driver import compile_model
    return compile_model(path, text=text, model=model, debug_nans=debug_nans,
                         recompute=recompute)


def module_from_source(source: str, name: str, filename: str | None = None) -> types.ModuleType:
    """Execute generated source as a module, visible to tracebacks and pdb."""
    digest = hashlib.sha1(source.encode()).hexdigest()[:10]
    filename = filename or f"<convc:{name}:{digest}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    mod = types.ModuleType(f"convc_generated_{name}_{digest}")
    mod.__file__ = filename
    code = compile(source, filename, "exec")
    exec(code, mod.__dict__)
    sys.modules[mod.__name__] = mod
    return mod


def load(path, model: str | None = None, text: str | None = None,
         debug_nans: bool = False, recompute: int | None = None) -> types.ModuleType:
    """Compile a `.cell` file in memory and import it.

    The returned module has `init_params`, `forward`, `loss_and_grad`,
    `sgd_step`, `MODEL` (metadata), plus `compiled` (every stage of the
    compile) and `train(...)` (the training loop of convc.runtime.train).
    """
    c = compile_file(path, model=model, text=text, debug_nans=debug_nans, recompute=recompute)
    mod = module_from_source(c.source, c.name)
    mod.compiled = c
    mod.source = c.source
    from convc.runtime import train as _train

    def train(params=None, **options):
        return _train.train(mod, params=params, **options)

    train.__doc__ = _train.train.__doc__
    mod.train = train
    mod.spec_path = str(path) if path is not None else None
    return mod


def import_generated(path) -> types.ModuleType:
    """Import a module written by `convc compile -o model.py`."""
    p = Path(path)
    source = p.read_text(encoding="utf-8")
    return module_from_source(source, p.stem, filename=str(p.resolve()))

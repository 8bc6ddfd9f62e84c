"""Generated source as a Python module: compile a `.cell` file and import it.

    mod = convc.runtime.loader.load("examples/seed.cell")
    mod.MODEL["name"], mod.compiled.warnings

The runtime's own commands that start from a spec (`convc eval`,
`convc bench`) load models through this module, which calls the compiler's
driver and nothing above it: the runtime never imports `convc.api`.
`convc.load` (convc/api.py) is `load` here plus the conveniences
`mod.train(...)` and `mod.predict(...)`.

The generated source is registered with `linecache` under a name that says
where it came from, so tracebacks and `pdb` show the generated lines.
"""
from __future__ import annotations

import hashlib
import linecache
import sys
import types
from pathlib import Path


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
         debug_nans: bool = False, recompute: int | None = None,
         snapshots: bool = False, target=("cpu", "numpy"), vjp: bool = False,
         fuse: bool | None = None) -> types.ModuleType:
    """Compile a `.cell` file (or `text`) in memory and import the generated module.

    The module has what the generated code defines (`init_params`, `forward`,
    `loss`, `loss_and_grad`, `MODEL`, ...) and three attributes besides:
    `compiled` (every stage of the compile, a `convc.compiler.driver.Compiled`),
    `source` (the generated Python) and `spec_path` (`path` as a string, or
    None for `text`). Raises `CellError` with the diagnostics of a spec that
    does not compile; warnings are in `mod.compiled.warnings`. snapshots: keep
    the IR after every compiler stage (`mod.compiled.ir_text(stage)`). target:
    the backend the code is planned for; vjp: also generate `vjp`
    (driver.compile_program, runtime/vjp.py).
    """
    from convc.compiler.driver import compile_model

    if fuse:
        from convc.runtime import fused

        ok, why = fused.available()
        if not ok:
            raise fused.KernelBuildError(f"fuse=True: fused kernels cannot be built here: "
                                         f"{why}")
    c = compile_model(path, text=text, model=model, debug_nans=debug_nans, recompute=recompute,
                      snapshots=snapshots, target=target, vjp=vjp, fuse=fuse)
    mod = module_from_source(c.source, c.name)
    mod.compiled = c
    mod.source = c.source
    mod.spec_path = str(path) if path is not None else None
    return mod


def import_generated(path) -> types.ModuleType:
    """Import a module written by `convc compile -o model.py`."""
    p = Path(path)
    source = p.read_text(encoding="utf-8")
    return module_from_source(source, p.stem, filename=str(p.resolve()))


def sources(mod) -> tuple[str, ...]:
    """The files a loaded module was compiled from: the spec and every file it imports
    (none for a module compiled from text or imported from a model.py)."""
    compiled = getattr(mod, "compiled", None)
    program = getattr(compiled, "program", None)
    found = (getattr(mod, "spec_path", None), *(getattr(program, "modules", None) or ()))
    return tuple(str(p) for p in found if p)

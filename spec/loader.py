"""Load a `.cell` file with its imports into one `Program`.

`import std` finds `std.cell` in the standard library shipped with convc
(spec/stdlib/); `import "layers.cell"` is a path relative to the importing
file. Imports are loaded once each; a cycle is an error naming the chain.

A spec may come from someone else, so what an import can reach is narrow
(docs/language.md, Imports): a relative path, to a regular file whose name,
also after following links, ends in `.cell`, outside /proc, /sys and /dev.
Anything else is refused before it is opened, so no error message can quote
a file that is not a spec.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

from . import ast as A
from .diagnostics import SOURCES, CellError, Diagnostic, Loc, Reporter
from .parser import MAX_PROGRAM_BYTES, parse, read_spec

# what the system shows as files but are not: reading them may leak or never end
_SYSTEM_DIRS = (Path("/proc"), Path("/sys"), Path("/dev"))


def stdlib_dir() -> Path:
    return Path(str(resources.files(__package__).joinpath("stdlib")))


def stdlib_modules() -> list[str]:
    return sorted(p.stem for p in stdlib_dir().glob("*.cell"))


@dataclass
class Program:
    """Every definition visible from the root file, by name."""

    root: A.Module
    modules: dict[str, A.Module] = field(default_factory=dict)
    cells: dict[str, A.CellDef] = field(default_factory=dict)
    models: dict[str, A.ModelDef] = field(default_factory=dict)
    # id() of each statement (or cell) the checker reported an error in: lowering skips them
    broken: set[int] = field(default_factory=set)

    def model(self, name: str | None = None) -> A.ModelDef:
        """The named model, or the root file's only (or last) model."""
        if name is not None:
            if name not in self.models:
                raise CellError([Diagnostic("error", "E202", f"no model named {name!r}; "
                                            f"models here: {', '.join(self.models) or 'none'}",
                                            Loc(self.root.file, 1, 1))])
            return self.models[name]
        own = self.root.models
        if not own:
            raise CellError([Diagnostic("error", "E240", "this file defines no model",
                                        Loc(self.root.file, 1, 1))])
        return own[-1]


def load_program(path: str | Path | None = None, text: str | None = None,
                 file: str | None = None) -> Program:
    """Parse the root file and, recursively, what it imports."""
    rep = Reporter()
    if text is None:
        from .parser import parse_file
        root = parse_file(path)
        root_path = Path(path).resolve()
    else:
        name = file or (str(path) if path else "<string>")
        root = parse(text, name)
        root_path = Path(name).resolve() if path or file else Path.cwd() / "<string>"
    prog = Program(root)
    _load(root, root_path, prog, rep, stack=[str(root_path)])
    _collect(root, prog, rep, seen=set())
    rep.check()
    prog.warnings = rep.warnings  # type: ignore[attr-defined]
    return prog


def _resolve(imp: A.Import, importer: Path) -> Path | None:
    """The file an import names, or None when there is no such (readable) file."""
    try:
        if imp.is_path:
            p = importer.parent / imp.target
        else:
            p = stdlib_dir() / f"{imp.target}.cell"
        return p.resolve() if p.exists() else None
    except (OSError, ValueError):  # a name the OS refuses: too long, a NUL byte, ...
        return None


def _refused(imp: A.Import, target: Path) -> str | None:
    """Why a spec may not import the file `target` (resolved, links followed), or None."""
    if any(target.is_relative_to(d) for d in _SYSTEM_DIRS):
        return f"{target} is a system file, not a spec"
    if not target.is_file():  # a folder, a pipe or a device: reading it may never end
        return f"{_display(target)} is not a regular file"
    if imp.is_path and (target.suffix != ".cell" or not imp.target.endswith(".cell")):
        return f"{_display(target)} is not a .cell file"
    return None


def _not_found(imp: A.Import, importer: Path) -> str:
    if imp.is_path:
        try:
            where = _display(importer.parent / imp.target)
        except (OSError, ValueError):
            where = imp.target
        return f"cannot import {imp.target!r}: no such file {where}"
    known = stdlib_modules()
    msg = (f"cannot import {imp.target!r}: the standard library has "
           f"{', '.join(known)}")
    close = difflib.get_close_matches(imp.target, known, n=1, cutoff=0.5)
    if close:
        msg += f"; did you mean {close[0]!r}?"
    if imp.target.endswith(".cell") or "/" in imp.target:
        msg += f' (a file is imported with quotes: import "{imp.target}")'
    return msg


def _load(mod: A.Module, path: Path, prog: Program, rep: Reporter, stack: list[str],
          size: list[int] | None = None) -> None:
    """Load what `mod` imports; `size` counts the bytes of text read so far, over all files."""
    prog.modules[str(path)] = mod
    if size is None:
        size = [len((SOURCES.text(mod.file) or "").encode("utf-8", "surrogatepass"))]
    for imp in mod.imports:
        if imp.is_path and Path(imp.target).is_absolute():
            rep.error("E230", f"cannot import {imp.target!r}: an import names a file "
                      "relative to the importing file, not an absolute path", imp.loc)
            continue
        target = _resolve(imp, path)
        if target is None:
            rep.error("E230", _not_found(imp, path), imp.loc)
            continue
        why = _refused(imp, target)
        if why is not None:
            rep.error("E230", f"cannot import {imp.target!r}: {why}", imp.loc)
            continue
        key = str(target)
        if key in stack:
            chain = " -> ".join(Path(s).name for s in stack[stack.index(key):] + [key])
            rep.error("E231", f"import cycle: {chain}", imp.loc)
            continue
        if key in prog.modules:
            continue
        try:
            text = read_spec(target)
        except CellError as e:
            (d,) = e.diagnostics
            rep.error("E230" if d.code == "E001" else d.code,
                      f"cannot import {imp.target!r}: {d.message}", imp.loc)
            continue
        size[0] += len(text.encode("utf-8", "surrogatepass"))
        if size[0] > MAX_PROGRAM_BYTES:
            rep.error("E002", f"cannot import {imp.target!r}: a spec with its imports may have "
                      f"at most {MAX_PROGRAM_BYTES} bytes ({MAX_PROGRAM_BYTES >> 20} MiB)",
                      imp.loc)
            return
        try:
            child = _parse_import(text, _display(target))
        except CellError as e:
            rep.diagnostics.extend(e.diagnostics)
            continue
        _load(child, target, prog, rep, stack + [key], size)


@lru_cache(maxsize=64)
def _parse_cached(text: str, name: str) -> A.Module:
    return parse(text, name)


def _parse_import(text: str, name: str) -> A.Module:
    """Parse an imported file, once per content: `import std` in every check is cheap."""
    SOURCES.add(name, text)  # diagnostics quote it, also when the tree comes from the cache
    return _parse_cached(text, name)


def _display(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _collect(mod: A.Module, prog: Program, rep: Reporter, seen: set[str]) -> None:
    """Register definitions: imported ones first, so a clash is reported at the local one."""
    modules = [m for m in prog.modules.values() if m is not mod] + [mod]
    for m in modules:
        for item in m.items:
            if isinstance(item, (A.CellDef, A.ModelDef)):
                table = prog.cells if isinstance(item, A.CellDef) else prog.models
                other = prog.cells.get(item.name) or prog.models.get(item.name)
                if other is not None and other is not item:
                    where = "" if other.loc.file == item.loc.file else \
                        f" (imported from {Path(other.loc.file).name})"
                    rep.error("E201", f"duplicate definition of {item.name!r}{where}", item.loc,
                              f"first defined at {other.loc}")
                    continue
                table[item.name] = item


def source_text(path: str) -> str | None:
    return SOURCES._text.get(path)

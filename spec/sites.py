"""Where an error inside an instantiated cell is reported.

A cell of the standard library (spec/stdlib/) is not the user's to fix, so
an error located there is moved to the user's line that caused it, with the
library line as a note (`Site`, `relocate`): a shape error to the
application `h = l(x)`, where the shapes met, any other to the instance
`l = ConvLSTM(hidden = 0)`, at the argument the failing line reads when that
is clear. An error in a cell of another file the user wrote stays there,
with notes naming the instance and its application.

Used by the checker (spec/checker.py, spec/elaborate.py: the semantic errors
of each instance) and by lowering (compiler/lower.py: its shape errors).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from . import ast as A
from .walk import walk_expr
from .diagnostics import SOURCES, Loc, Reporter
from .loader import stdlib_dir


@dataclass
class Site:
    """Where the user made an instance and applied it: what an error inside the cell is about."""

    name: str  # the instance
    cell: A.CellDef
    defined: Loc  # the call `ConvLSTM(hidden = 0)`
    args: dict  # parameter -> Loc of the argument that gave it (`hidden = 0`)
    applied: Loc | None = None  # the call `l(x)`
    here: object = None  # the cell's statement (or expression) being lowered now


@lru_cache(maxsize=256)
def _in_library(file: str, cwd: str) -> bool:
    try:
        return Path(cwd, file).resolve().is_relative_to(stdlib_dir().resolve())
    except (OSError, ValueError):
        return False


def in_library(file: str) -> bool:
    """Whether `file` (a Loc's file) is one of convc's own, spec/stdlib/*.cell."""
    return _in_library(file, str(Path.cwd()))


def _quote(loc: Loc) -> str:
    src = SOURCES.line(loc.file, loc.line)
    return f": `{src.strip()}`" if src and src.strip() else ""


def relocate(code: str, loc: Loc, site: Site | None) -> tuple[Loc, tuple[str, ...]]:
    """The place to report an error found at `loc` while lowering `site`'s cell, and notes.

    In the user's own file: unchanged. In the standard library: moved to the user's
    line (a shape error, E3xx, to the application; any other to the instance, at
    the argument it is about when that is clear), the library line as a note. In
    another file the user wrote: unchanged, with notes naming the instance.
    """
    if site is None or loc.file == site.defined.file or in_library(site.defined.file):
        return loc, ()
    separate = site.applied is None or site.applied.file != site.defined.file or \
        site.applied.line != site.defined.line
    defined = f"{site.name!r} is defined at {site.defined}{_quote(site.defined)}"
    if in_library(loc.file):
        notes = [f"in {site.cell.name}, at {loc}{_quote(loc)}"]
        if code.startswith("E3") and site.applied is not None:
            if separate:
                notes.append(defined)
            return site.applied, tuple(notes)
        return _blamed_argument(loc, site), tuple(notes)
    notes = []
    if site.applied is not None:
        notes.append(f"in {site.name!r}, applied at {site.applied}{_quote(site.applied)}")
    if separate:
        notes.append(defined)
    return loc, tuple(notes)


def _blamed_argument(loc: Loc, site: Site) -> Loc:
    """The argument of the instance an error at `loc` is about, else the instance's call.

    The names the failing part of the cell's statement reads (and, for a weight it
    reads, the names of the weight's declaration) that the user gave a value for:
    when that is exactly one argument, it is the culprit.
    """
    here = site.here
    if here is None:
        return site.defined
    root = {A.WeightDecl: lambda st: st.value, A.Equation: lambda st: st.value,
            A.If: lambda st: st.cond}.get(type(here), lambda e: e)(here)
    part = next((x for x in walk_expr(root) if getattr(x, "loc", None) == loc), root)
    names = _names(part)
    weights = {st.name: st for st in _statements(site.cell.body) if isinstance(st, A.WeightDecl)}
    for reach in (names, names | {n for w in names & set(weights)
                                  for n in _names(weights[w].value)}):
        given = [p for p in site.args if p in reach]
        if given:
            return site.args[given[0]] if len(given) == 1 else site.defined
    return site.defined


def _names(e) -> set[str]:
    return {x.id for x in walk_expr(e) if isinstance(x, A.Name)}


def _statements(body):
    for st in body:
        yield st
        if isinstance(st, A.If):
            yield from _statements(st.then)
            yield from _statements(st.orelse)


class SiteReporter(Reporter):
    """A Reporter that moves an error inside an instantiated cell to the user's line.

    `owner.site` is the instance whose cell is being gone through, if any.
    """

    def __init__(self, owner) -> None:
        super().__init__()
        self.owner = owner
        self.moved: set[Loc] = set()  # user lines that library errors were moved to

    def error(self, code: str, message: str, loc: Loc, *notes: str) -> None:
        new, more = relocate(code, loc, self.owner.site)
        if new != loc and in_library(loc.file):
            if new in self.moved:  # one mistake of the user's, seen again further in
                return
            self.moved.add(new)
        super().error(code, message, new, *notes, *more)

"""The syntax tree of a `.cell` file: frozen dataclasses, each with its `Loc`.

The parser builds these; the checker and the compiler read them. Nothing
here knows about arrays or shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass

from .diagnostics import Loc

# Where a block's closing brace is. Only the formatter needs it (to keep a
# comment inside or after the block it was written in), so it takes no part
# in equality.
_END = dict(default=None, compare=False, repr=False)


# ---------------------------------------------------------------- expressions

@dataclass(frozen=True)
class Num:
    value: float | int
    loc: Loc


@dataclass(frozen=True)
class Str:
    value: str
    loc: Loc


@dataclass(frozen=True)
class Bool:
    value: bool
    loc: Loc


@dataclass(frozen=True)
class Name:
    id: str
    loc: Loc


@dataclass(frozen=True)
class Delayed:
    """`c[t-1]`: a state's value at an earlier time step.

    `delay` counts steps back: `c[t-1]` is 1, `c[t]` is 0 and `c[t+1]` is -1.
    Only 1 is allowed (the checker says so); the others parse so that the
    error can say what is wrong.
    """

    name: str
    var: str
    delay: int | float
    loc: Loc


@dataclass(frozen=True)
class KwArg:
    name: str
    value: "Expr"
    loc: Loc


@dataclass(frozen=True)
class Call:
    func: "Expr"
    args: tuple["Expr", ...]
    kwargs: tuple[KwArg, ...]
    loc: Loc

    @property
    def func_name(self) -> str | None:
        return self.func.id if isinstance(self.func, Name) else None


@dataclass(frozen=True)
class BinOp:
    op: str  # "+", "-", "*", "/"
    left: "Expr"
    right: "Expr"
    loc: Loc


@dataclass(frozen=True)
class Neg:
    operand: "Expr"
    loc: Loc


@dataclass(frozen=True)
class TupleExpr:
    items: tuple["Expr", ...]
    loc: Loc


Expr = Num | Str | Bool | Name | Delayed | Call | BinOp | Neg | TupleExpr


# ---------------------------------------------------------------- statements

@dataclass(frozen=True)
class InputDecl:
    names: tuple[str, ...]
    locs: tuple[Loc, ...]
    loc: Loc


@dataclass(frozen=True)
class StateDecl:
    name: str
    init: str  # "zeros" or "learned"
    loc: Loc
    init_loc: Loc | None = None


@dataclass(frozen=True)
class WeightDecl:
    name: str
    value: Expr
    loc: Loc


@dataclass(frozen=True)
class OutputDecl:
    names: tuple[str, ...]
    locs: tuple[Loc, ...]
    loc: Loc


@dataclass(frozen=True)
class Equation:
    targets: tuple[str, ...]
    value: Expr
    loc: Loc
    target_locs: tuple[Loc, ...] = ()


@dataclass(frozen=True)
class If:
    cond: Expr
    then: tuple["Stmt", ...]
    orelse: tuple["Stmt", ...]
    loc: Loc
    then_end: Loc | None = field(**_END)  # the `}` that closes the `then` block
    end: Loc | None = field(**_END)  # the last `}`


@dataclass(frozen=True)
class SeqDecl:
    """`input x: [C, H, W]` or `target y: [C, H, W]` in a model (per-step shape)."""

    kind: str  # "input" or "target"
    name: str
    shape: tuple[Expr, ...]
    loc: Loc


@dataclass(frozen=True)
class Loss:
    value: Expr
    loc: Loc


@dataclass(frozen=True)
class Setting:
    name: str
    value: Expr
    loc: Loc


@dataclass(frozen=True)
class Train:
    settings: tuple[Setting, ...]
    loc: Loc
    end: Loc | None = field(**_END)


Stmt = InputDecl | StateDecl | WeightDecl | OutputDecl | Equation | If | SeqDecl | Loss | Train


# ---------------------------------------------------------------- definitions

@dataclass(frozen=True)
class Param:
    name: str
    default: Expr | None
    loc: Loc


@dataclass(frozen=True)
class CellDef:
    name: str
    params: tuple[Param, ...]
    doc: str | None
    body: tuple[Stmt, ...]
    loc: Loc
    end: Loc | None = field(**_END)


@dataclass(frozen=True)
class ModelDef:
    name: str
    doc: str | None
    body: tuple[Stmt, ...]
    loc: Loc
    end: Loc | None = field(**_END)


@dataclass(frozen=True)
class Import:
    target: str
    is_path: bool
    loc: Loc


@dataclass(frozen=True)
class Module:
    file: str
    items: tuple[Import | CellDef | ModelDef, ...]

    @property
    def cells(self) -> list[CellDef]:
        return [i for i in self.items if isinstance(i, CellDef)]

    @property
    def models(self) -> list[ModelDef]:
        return [i for i in self.items if isinstance(i, ModelDef)]

    @property
    def imports(self) -> list[Import]:
        return [i for i in self.items if isinstance(i, Import)]


def without_locs(node):
    """`node` as nested tuples with every source position left out.

    Two parses of one program laid out differently give equal results, so
    this is how tests say "the formatter changed no meaning". Numbers keep
    their type (1 and 1.0 are different programs).
    """
    if isinstance(node, Loc):
        return None
    if is_dataclass(node):
        return (type(node).__name__,) + tuple(without_locs(getattr(node, f.name))
                                              for f in fields(node))
    if isinstance(node, (tuple, list)):
        return tuple(without_locs(x) for x in node)
    if isinstance(node, (bool, int, float)):
        return (type(node).__name__, node)
    return node

"""The graph IR: typed node records in a networkx DiGraph.

A `Node` is one primitive op applied to ordered inputs (`inputs` is a tuple:
a DiGraph cannot hold `mul(h, h)` twice, so edges only record dependencies).
Every node knows its per-sample shape, the `.cell` location it came from,
and its time context:

- `seg` is the time loop (segment) a per-step value belongs to, or None for
  values without time (parameters, constants, losses, gradients);
- state reads (`op == "state"`) stand for a state's value at t-1; the node
  that computes the state's new value is recorded in the read's attrs and
  as an edge of kind "state" (the time recurrence), which the topological
  order ignores.

The order of everything emitted follows `Graph.order()`, a lexicographical
topological sort keyed on creation order, so the same spec always gives
byte-identical output.
"""
from __future__ import annotations

import builtins
import json
import keyword
import os
import re
from dataclasses import dataclass, field

import networkx as nx

from convc.spec.diagnostics import NOWHERE, Loc

Shape = tuple  # tuple[int | None, ...]


# ---------------------------------------------------------------- segment keys
# A node's `seg` is a segment key of one of two types: a `DataSeg` ("@<name>"), the
# sequence of the input or target <name> (read on its own time axis), or a `LoopSeg`
# ("loop<k>"), the k-th time loop lowering made. Both are strings too, so the IR's text,
# dictionaries keyed by them and JSON read as before; this is the one place that spells
# the forms out.
DATA_SEG_PREFIX = "@"
LOOP_SEG_PREFIX = "loop"


class DataSeg(str):
    """The segment key of a data sequence: `DataSeg.of("x") == "@x"`, `.name == "x"`."""

    __slots__ = ()

    @classmethod
    def of(cls, name: str) -> "DataSeg":
        return cls(DATA_SEG_PREFIX + name)

    @property
    def name(self) -> str:
        return self[len(DATA_SEG_PREFIX):]


class LoopSeg(str):
    """The segment key of a time loop: `LoopSeg.of(3) == "loop3"`, `.index == 3`."""

    __slots__ = ()

    @classmethod
    def of(cls, index: int) -> "LoopSeg":
        return cls(f"{LOOP_SEG_PREFIX}{index}")

    @property
    def index(self) -> int:
        return int(self[len(LOOP_SEG_PREFIX):])


def as_seg(seg: str | None) -> DataSeg | LoopSeg | None:
    """A segment key read back as its type (from a plain string, e.g. of a dump)."""
    if seg is None or isinstance(seg, (DataSeg, LoopSeg)):
        return seg
    if seg.startswith(DATA_SEG_PREFIX):
        return DataSeg(seg)
    if seg.startswith(LOOP_SEG_PREFIX) and seg[len(LOOP_SEG_PREFIX):].isdigit():
        return LoopSeg(seg)
    raise ValueError(f"{seg!r} is not a segment key")


def data_seg(name: str) -> DataSeg:
    """The segment key of the data sequence (input or target) `name`."""
    return DataSeg.of(name)


def loop_seg(index: int) -> LoopSeg:
    """The segment key of the time loop numbered `index`."""
    return LoopSeg.of(index)


def is_data_seg(seg: str | None) -> bool:
    """Whether `seg` is a data sequence's key ("@x"); False for a loop's and for None."""
    return seg is not None and isinstance(as_seg(seg), DataSeg)


def data_name(seg: str) -> str:
    """The input's or target's name of a data sequence's key: "@x" -> "x"."""
    key = as_seg(seg)
    if not isinstance(key, DataSeg):
        raise ValueError(f"{seg!r} is not a data sequence's segment key")
    return key.name


def loop_index(seg: str) -> int:
    """The number of a time loop's key: "loop3" -> 3."""
    key = as_seg(seg) if seg is not None else None
    if not isinstance(key, LoopSeg):
        raise ValueError(f"{seg!r} is not a time loop's segment key")
    return key.index


def seg_order(seg: str) -> tuple:
    """A sort key of segment keys: data sequences ("@x", by name) before loops ("loop0",
    "loop1", ..., by number)."""
    return (0, seg) if is_data_seg(seg) else (1, loop_index(seg))


@dataclass
class Node:
    id: str
    op: str
    inputs: tuple[str, ...]
    attrs: dict = field(default_factory=dict)
    shape: Shape | None = None
    loc: Loc = NOWHERE
    seg: str | None = None
    order: int = 0
    grad: bool = False  # True for nodes of the backward pass

    def describe(self) -> str:
        shape = "?" if self.shape is None else "x".join(
            "?" if d is None else str(d) for d in self.shape) or "scalar"
        attrs = ", ".join(f"{k}={_fmt_attr(v)}" for k, v in sorted(self.attrs.items())
                          if not k.startswith("_"))
        args = ", ".join(self.inputs)
        where = f"  @{self.seg}" if self.seg else ""
        return (f"{self.id:<24} = {self.op}({args}{', ' if args and attrs else ''}{attrs})"
                f"  : {shape}{where}  # {_where(self.loc)}")


def _where(loc: Loc) -> str:
    """file:line:col with the file's name alone: dumps do not depend on where they are made
    (the generated module's comments name files the same way)."""
    name = os.path.basename(loc.file)
    return name if loc.line < 1 else f"{name}:{loc.line}:{loc.col}"


def _fmt_attr(v) -> str:
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt_attr(x) for x in v) + ")"
    return str(v)


# Names the generated module uses for itself: the backend and its modules,
# the functions' arguments and locals, the module's globals.
CODE_NAMES = frozenset({
    "B", "MODEL", "N", "PARAMS", "backend", "bptt", "dtype", "final", "forward", "grads",
    "init_params", "inputs", "loss_and_grad", "loss_and_grad_shard", "lr", "name", "np",
    "options", "outputs", "params", "rt", "seed", "sgd_step", "start", "state", "steps",
    "stop", "t", "t0", "targets", "w", "xp", "math", "check_call",
    "vjp", "vjp_shard", "vjp_start", "cotangents", "state_cotangents", "param_cts", "input_cts",
    "state_cts", "wrt", "steps_fn",
})
# ... and the names it derives: work buffers w0, w1, ...; per-axis lengths T_x and
# arenas arena_x; loop helpers; a value's buffers h_buf, h_seq, h_win, h_ckpt, h_final.
_CODE_PATTERN = re.compile(r"w\d+|T_\w*|arena_\w*|loop\w*|_\w*|"
                           r"\w+_(buf|seq|win|ckpt|final|steps|given)")


def reserved(name: str) -> bool:
    """Whether `name` cannot be a value's variable in generated code as it is: a Python
    keyword or builtin, or a name of the generated code's own."""
    return (keyword.iskeyword(name) or keyword.issoftkeyword(name)
            or name in _BUILTINS or name in CODE_NAMES
            or _CODE_PATTERN.fullmatch(name) is not None)


_BUILTINS = frozenset(dir(builtins))


class Graph:
    """A DiGraph of Nodes plus the bookkeeping the passes need."""

    def __init__(self) -> None:
        self.g = nx.DiGraph()  # every edge, with kind "data" or "state"
        self.data = nx.DiGraph()  # data edges only: what the topological order follows
        self._counter = 0
        self._names: dict[str, int] = {}
        self._order: list[str] | None = None

    # ---------------------------------------------------------------- building
    def fresh(self, base: str) -> str:
        """A unique id starting with `base` (`h`, `h_1`, ...).

        Ids are the generated module's variable names, so a base that the
        generated code needs for itself (see `reserved`) gets a `_v` suffix:
        a weight named `xp`, `B`, `range` or `w0` is the node `xp_v`.
        """
        base = base.replace(".", "_")
        if reserved(base):
            base += "_v"
        if base not in self._names and base not in self.g:
            self._names[base] = 0
            return base
        n = self._names.get(base, 0)
        while True:
            n += 1
            cand = f"{base}_{n}"
            if cand not in self.g:
                self._names[base] = n
                return cand

    def add(self, node: Node) -> Node:
        if node.id in self.g:
            raise ValueError(f"duplicate node id {node.id}")
        self._counter += 1
        node.order = self._counter
        self.g.add_node(node.id, node=node)
        self.data.add_node(node.id)
        for i in node.inputs:
            self._add_data_edge(i, node.id)
        self._order = None
        return node

    def _add_data_edge(self, u: str, v: str) -> None:
        self.g.add_edge(u, v, kind="data")
        self.data.add_edge(u, v)

    def relabel(self, old: str, new: str) -> None:
        """Rename a node (ids are the names in generated code)."""
        nx.relabel_nodes(self.g, {old: new}, copy=False)
        nx.relabel_nodes(self.data, {old: new}, copy=False)
        self.node(new).id = new
        self._order = None

    def node(self, nid: str) -> Node:
        return self.g.nodes[nid]["node"]

    def __contains__(self, nid: str) -> bool:
        return nid in self.g

    def nodes(self) -> list[Node]:
        return [self.node(n) for n in self.order()]

    def set_inputs(self, nid: str, inputs: tuple[str, ...]) -> None:
        node = self.node(nid)
        for i in set(node.inputs):
            if self.g.has_edge(i, nid) and self.g[i][nid].get("kind") == "data":
                self.g.remove_edge(i, nid)
                self.data.remove_edge(i, nid)
        node.inputs = tuple(inputs)
        for i in node.inputs:
            self._add_data_edge(i, nid)
        self._order = None

    def link_state(self, read: str, update: str) -> None:
        """Record the time recurrence: `update` at t is what `read` sees at t+1."""
        self.node(read).attrs["update"] = update
        self.g.add_edge(update, read, kind="state")

    def remove(self, nid: str) -> None:
        self.g.remove_node(nid)
        self.data.remove_node(nid)
        self._order = None

    def consumers(self, nid: str) -> list[str]:
        return sorted(self.data.successors(nid), key=lambda v: self.node(v).order)

    def replace_uses(self, old: str, new: str) -> None:
        for user in self.consumers(old):
            node = self.node(user)
            self.set_inputs(user, tuple(new if i == old else i for i in node.inputs))
        for read in list(self.g.nodes):
            n = self.node(read)
            if n.op == "state" and n.attrs.get("update") == old:
                self.g.remove_edge(old, read)
                self.link_state(read, new)

    # ---------------------------------------------------------------- order
    def data_view(self) -> nx.DiGraph:
        return self.data

    def order(self) -> list[str]:
        """Deterministic topological order over data edges (creation order breaks ties)."""
        if self._order is None:
            key = {n: self.node(n).order for n in self.data.nodes}
            self._order = list(nx.lexicographical_topological_sort(self.data,
                                                                   key=key.__getitem__))
        return list(self._order)

    def ancestors(self, nid: str) -> set[str]:
        return nx.ancestors(self.data, nid)

    def descendants(self, nid: str) -> set[str]:
        return nx.descendants(self.data, nid)

    # ---------------------------------------------------------------- looking at it
    def dump(self) -> str:
        """Text form of the IR, one node a line, in schedule order."""
        return "\n".join(self.node(n).describe() for n in self.order())

    # Graphviz reads a colour as an X11 name or #rrggbb / #rrggbbaa: a short #rgb
    # such as "#eef" is "not a known color", drawn black with only a warning.
    DOT_BACKWARD_COLOR = "firebrick"
    DOT_PARAM_FILL = "#eeeeff"
    DOT_STATE_EDGE_COLOR = "blue"

    def to_dot(self, title: str = "convc") -> str:
        lines = [f'digraph "{title}" {{', "  rankdir=TB;",
                 '  node [shape=box, fontname="monospace", fontsize=10];']
        segs: dict[str | None, list[str]] = {}
        for n in self.order():
            segs.setdefault(self.node(n).seg, []).append(n)
        for seg, ids in segs.items():
            if seg is not None:
                lines.append(f'  subgraph "cluster_{seg}" {{ label="loop {seg}"; style=dashed;')
            for n in ids:
                node = self.node(n)
                shape = "x".join("?" if d is None else str(d) for d in (node.shape or ()))
                color = f', color="{self.DOT_BACKWARD_COLOR}"' if node.grad else ""
                fill = (f', style=filled, fillcolor="{self.DOT_PARAM_FILL}"'
                        if node.op == "param" else "")
                lines.append(f'    "{n}" [label="{n}\\n{node.op} {shape}"{color}{fill}];')
            if seg is not None:
                lines.append("  }")
        for u, v, d in sorted(self.g.edges(data=True), key=lambda e: (e[0], e[1])):
            style = (f' [style=dashed, label="t+1", color="{self.DOT_STATE_EDGE_COLOR}"]'
                     if d["kind"] == "state" else "")
            lines.append(f'  "{u}" -> "{v}"{style};')
        lines.append("}")
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        nodes = []
        for n in self.order():
            node = self.node(n)
            nodes.append(dict(id=node.id, op=node.op, inputs=list(node.inputs),
                              attrs={k: _jsonable(v) for k, v in sorted(node.attrs.items())
                                     if not k.startswith("_")},
                              shape=None if node.shape is None else list(node.shape),
                              segment=node.seg, backward=node.grad,
                              loc=dict(file=os.path.basename(node.loc.file), line=node.loc.line,
                                       column=node.loc.col)))
        edges = [dict(source=u, target=v, kind=d["kind"])
                 for u, v, d in sorted(self.g.edges(data=True), key=lambda e: (e[0], e[1]))]
        return json.dumps(dict(nodes=nodes, edges=edges), indent=1) + "\n"


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)

"""Shape inference over the whole graph, to a fixed point.

Lowering computes each node's shape as it is created, but some dimensions
are only known later: a state read's shape is its update's (which is
computed from the read itself one step later), a kernel's input channels
come from what it is applied to, a per-pixel bias or peephole's height and
width from the value it meets. This pass repeats the shape rules in
topological order, writing those dimensions back, until nothing changes; a
mismatch is reported at the `.cell` line of the op that caused it, with
both shapes (or, for an op inside a standard-library cell, at the user's
line that applied the cell: `where`, see lower.relocate).
"""
from __future__ import annotations

from convc.spec.diagnostics import Reporter
from convc.spec.settings import MAX_INT

from .ir import Graph
from .ops import OPS, ShapeError, fmt_shape


def _merge(old, new):
    """Fill unknown dims of `old` from `new`; returns (shape, changed)."""
    if new is None:
        return old, False
    if old is None:
        return tuple(new), True
    if len(old) != len(new):
        raise ShapeError(f"{fmt_shape(old)} vs {fmt_shape(new)}")
    out, changed = [], False
    for a, b in zip(old, new):
        if a is None and b is not None:
            out.append(b)
            changed = True
        elif a is not None and b is not None and a != b:
            raise ShapeError(f"{fmt_shape(old)} vs {fmt_shape(new)}")
        else:
            out.append(a)
    return tuple(out), changed


def _param_of(g: Graph, nid: str):
    """The param node behind `nid` (itself, or the param a reshape views)."""
    node = g.node(nid)
    if node.op == "param":
        return node
    if node.op == "reshape" and g.node(node.inputs[0]).op == "param":
        return g.node(node.inputs[0])
    return None


def _here(code: str, node) -> tuple:
    return node.loc, ()


def _error(rep: Reporter, where, code: str, message: str, node) -> None:
    loc, notes = where(code, node)
    rep.error(code, message, loc, *notes)


def infer_shapes(g: Graph, rep: Reporter, max_rounds: int = 8, where=None,
                 report_unknown: bool = True) -> None:
    """Fill in every shape; `where(code, node)` gives the place and notes to report an
    error at `node` with (default: the node's own line). report_unknown=False says
    nothing of shapes left unknown (after other errors, what is missing may be why)."""
    from . import ops
    where = where or _here
    try:
        _infer(g, rep, max_rounds, where)
        if not rep.has_errors and any(
                g.node(n).shape is None or None in g.node(n).shape for n in g.order()):
            # what is still unknown only ever met dimensions of 1: take them as 1
            ops.UNKNOWN_MEETING_ONE_IS_ONE = True
            _infer(g, rep, max_rounds, where)
    finally:
        ops.UNKNOWN_MEETING_ONE_IS_ONE = False
    if report_unknown:
        _report_unknown(g, rep, where)


def _infer(g: Graph, rep: Reporter, max_rounds: int, where=_here) -> None:
    order = g.order()
    for _ in range(max_rounds):
        changed = False
        for nid in order:
            node = g.node(nid)
            op = OPS[node.op]
            try:
                if node.op == "state":
                    upd = g.node(node.attrs["update"]) if "update" in node.attrs else None
                    if upd is not None:
                        node.shape, c = _merge(node.shape, upd.shape)
                        changed |= c
                    src = node.attrs.get("init_from")
                    if src is not None:
                        s = g.node(src)
                        node.shape, c = _merge(node.shape, s.shape)
                        changed |= c
                        if s.op == "param":
                            s.shape, c2 = _merge(s.shape, node.shape)
                            changed |= c2
                    continue
                if not node.inputs:
                    continue
                shapes = [g.node(i).shape for i in node.inputs]
                if node.op == "conv":
                    x, w = shapes
                    if w is not None and x is not None and w[1] is None and x[0] is not None:
                        p = g.node(node.inputs[1])
                        p.shape = (w[0], x[0], w[2], w[3])
                        changed = True
                        shapes = [g.node(i).shape for i in node.inputs]
                if any(s is None for s in shapes):
                    continue
                new = op.shape(shapes, node.attrs)
                node.shape, c = _merge(node.shape, new)
                changed |= c
                if op.elementwise:
                    # per-pixel weights take their height and width from what they meet
                    for i in node.inputs:
                        p = _param_of(g, i)
                        if p is None or p.shape is None or None not in p.shape:
                            continue
                        s = g.node(i).shape
                        out = node.shape
                        filled = tuple(out[k - len(s) + len(out)] if d is None else d
                                       for k, d in enumerate(s))
                        if filled != s:
                            p.shape = filled
                            g.node(i).shape = filled
                            changed = True
            except ShapeError as e:
                what = {"add": "+", "sub": "-", "mul": "*"}.get(node.op, node.op)
                ins = "operands: " + ", ".join(f"{i} {fmt_shape(g.node(i).shape)}"
                                               for i in node.inputs)
                if node.op == "state":  # its value at t-1 against its new value or its start
                    what = f"state {node.attrs.get('state', nid)}"
                    ins = ", ".join(f"{role} {v} {fmt_shape(g.node(v).shape)}"
                                    for role, v in (("new value", node.attrs.get("update")),
                                                    ("start", node.attrs.get("init_from")))
                                    if v is not None)
                _error(rep, where, "E300", f"shape mismatch in {what}: {e} ({ins})", node)
                return
        if not changed:
            break


def _report_unknown(g: Graph, rep: Reporter, where=_here) -> None:
    if rep.has_errors:
        return
    for nid in g.order():
        node = g.node(nid)
        if node.shape is not None and any(d is not None and d > MAX_INT for d in node.shape):
            label = node.attrs.get("name") or node.attrs.get("state") or nid
            _error(rep, where, "E300", f"{label} would be {fmt_shape(node.shape)}: a "
                   f"dimension above {MAX_INT} (2**63 - 1) cannot be held by an array", node)
            return
        if node.shape is None or any(d is None for d in node.shape):
            label = node.attrs.get("name") or node.attrs.get("state") or nid
            hint = "; a state takes its height and width from the cell's input or from init=" \
                if node.op == "state" else ""
            _error(rep, where, "E303", f"cannot infer the shape of {label} (got "
                   f"{fmt_shape(node.shape)}){hint}", node)
            return

"""Graph passes: constant folding, loss fusion, CSE, dead-code elimination.

Each pass rewrites the graph in place and returns how many nodes it changed,
so `convc compile --timings` and the tests can see that it did something.
They are optimisations over one definition of each op: folding evaluates an
op's reference evaluation; nothing here re-defines an op.
"""
from __future__ import annotations

import numpy as np

from .ir import Graph
from .ops import OPS


def _const_value(g: Graph, nid: str):
    node = g.node(nid)
    return node.attrs["value"] if node.op == "const" else None


def _pinned(g: Graph, nid: str, roots: set[str]) -> bool:
    """Nodes that must stay (roots, state updates, explicit keeps)."""
    node = g.node(nid)
    if nid in roots or node.attrs.get("keep"):
        return True
    return any(g.node(v).op == "state" and g.node(v).attrs.get("update") == nid
               for v in g.g.successors(nid))


def fold_constants(g: Graph, roots: set[str]) -> int:
    """Evaluate ops on constants; drop additions of zero, products with zero and one.

    A cell applied without input (`fc(steps=y)`) sees its input as the
    constant 0, so `conv(x, W_x)` folds to 0 and `0 + conv(h, W_h)` to the
    second term: the forecaster of an encoder-forecaster needs no input path.
    """
    changed = 0
    for nid in g.order():
        if nid not in g:
            continue
        node = g.node(nid)
        op = OPS[node.op]
        if not node.inputs or node.op == "const" or _pinned(g, nid, roots):
            continue
        vals = [_const_value(g, i) for i in node.inputs]
        new = None
        if all(v is not None for v in vals) and op.elementwise and op.ref is not None:
            attrs = {k: v for k, v in node.attrs.items() if not k.startswith("_")}
            value = float(np.asarray(op.ref(*[np.float64(v) for v in vals], **attrs)))
            new = _make_const(g, node, value)
        elif node.op in ("add", "sub") and vals[1] == 0.0 and _same_shape(g, node, 0):
            new = node.inputs[0]
        elif node.op == "add" and vals[0] == 0.0 and _same_shape(g, node, 1):
            new = node.inputs[1]
        elif node.op == "sub" and vals[0] == 0.0:
            g.node(nid).op = "neg"
            g.set_inputs(nid, (node.inputs[1],))
            changed += 1
            continue
        elif node.op == "mul" and 0.0 in vals:
            new = _make_const(g, node, 0.0)
        elif node.op == "mul" and vals[0] == 1.0 and _same_shape(g, node, 1):
            new = node.inputs[1]
        elif node.op == "mul" and vals[1] == 1.0 and _same_shape(g, node, 0):
            new = node.inputs[0]
        elif node.op == "scale" and node.attrs["factor"] == 1.0:
            new = node.inputs[0]
        elif node.op in ("conv", "slice", "neg", "scale") and vals[0] == 0.0:
            new = _make_const(g, node, 0.0)
        if new is not None:
            g.replace_uses(nid, new)
            changed += 1
    return changed


def _same_shape(g: Graph, node, i: int) -> bool:
    return tuple(g.node(node.inputs[i]).shape or ()) == tuple(node.shape or ()) and \
        (g.node(node.inputs[i]).seg is not None or node.seg is None)


def _make_const(g: Graph, like, value: float) -> str:
    from .ir import Node
    nid = g.fresh("c")
    g.add(Node(nid, "const", (), dict(value=float(value)), (), like.loc, None))
    return nid


def fuse_bce_logits(g: Graph) -> int:
    """bce(sigmoid(a), y) -> bce_logits(a, y): the same loss, without log(0) for saturated p."""
    changed = 0
    for nid in g.order():
        node = g.node(nid)
        if node.op == "bce":
            p = g.node(node.inputs[0])
            if p.op == "sigmoid":
                node.op = "bce_logits"
                g.set_inputs(nid, (p.inputs[0], node.inputs[1]))
                changed += 1
    return changed


def cse(g: Graph) -> int:
    """Merge nodes that apply the same op to the same inputs with the same attributes."""
    seen: dict = {}
    changed = 0
    for nid in g.order():
        node = g.node(nid)
        if node.op in ("input", "param", "state") or node.attrs.get("keep"):
            continue
        key = (node.op, node.inputs, node.seg,
               tuple(sorted((k, repr(v)) for k, v in node.attrs.items()
                            if not k.startswith("_"))))
        if key in seen:
            g.replace_uses(nid, seen[key])
            changed += 1
        else:
            seen[key] = nid
    return changed


def live_nodes(g: Graph, roots) -> set[str]:
    """Nodes the roots need, following state recurrences and initial values."""
    live: set[str] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        if n in live:
            continue
        live.add(n)
        node = g.node(n)
        stack.extend(node.inputs)
        if node.op == "state":
            for key in ("update", "init_from"):
                if node.attrs.get(key):
                    stack.append(node.attrs[key])
    return live


def dce(g: Graph, roots) -> int:
    live = live_nodes(g, roots)
    dead = [n for n in list(g.g.nodes) if n not in live]
    for n in dead:
        g.remove(n)
    return len(dead)

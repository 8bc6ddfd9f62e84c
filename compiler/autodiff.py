"""Reverse-mode autodiff through time: one loop over the forward graph.

Walk the forward graph in reverse topological order; for every node that
some parameter influences, its cotangent is the sum of the contributions its
consumers made (the first contribution *is* the cotangent: nothing is ever
added into an uninitialised buffer); then each input's contribution comes
from the op table's VJP rule. The backward nodes join the same graph
(`grad=True`), in the same loops as the values they differentiate.

Time enters through two node kinds:
- `carry` (a source): a state's cotangent arriving from step t+1. It is
  added into the cotangent of the state's update node at step t. At the
  last step it is the cotangent of the state's final value (when another
  loop starts from it) or nothing at all.
- the cotangent of a state read at step t becomes the carry at step t-1;
  after the loop (t = 0) it is the cotangent of the initial value
  (`carry_out`): a learned initial state's gradient, or the final-state
  cotangent of the loop the state started from.

Nothing is differentiated that no parameter depends on: the data inputs,
constants, and (for a cell's first layer) the input-side gradients.

`differentiate(low, vjp=True)` makes the backward pass of a vector-Jacobian
product instead: it starts from a cotangent given for every output (a
`cotangent` source, a sequence like the output) and for every final state
(a `state_cotangent` source, added into the state's carry at the last
step), not from the loss, and also differentiates the inputs
(`Backward.input_cts`) and the initial states (`Backward.init_cts`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .ir import Graph, Node, seg_order
from .lower import Lowered
from .ops import OPS, vjp_rule


@dataclass
class Backward:
    """Where the backward pass put things."""

    grads: dict[str, str] = field(default_factory=dict)  # param name -> grad node
    carries: dict[str, str] = field(default_factory=dict)  # state read -> carry node
    read_cts: dict[str, str] = field(default_factory=dict)  # state read -> its cotangent node
    carry_outs: dict[str, str] = field(default_factory=dict)  # state read -> carry_out node
    needs_grad: set[str] = field(default_factory=set)
    # vjp=True: the cotangent sources, and what the product gives besides the parameters'
    seeds: dict[str, str] = field(default_factory=dict)  # output name -> its cotangent source
    final_seeds: dict[str, str] = field(default_factory=dict)  # state -> final's cotangent
    input_cts: dict[str, str] = field(default_factory=dict)  # input name -> its cotangent
    init_cts: dict[str, str] = field(default_factory=dict)  # state -> initial value's cotangent


class Builder:
    """What VJP rules see: node creation plus shape and time queries."""

    def __init__(self, g: Graph, loc):
        self.g = g
        self.loc = loc

    def shape_of(self, nid: str):
        return self.g.node(nid).shape

    def is_static(self, nid: str) -> bool:
        return self.g.node(nid).seg is None

    def op(self, name: str, *inputs: str, **attrs) -> str:
        op = OPS[name]
        segs = [self.g.node(i).seg for i in inputs]
        loops = [s for s in segs if s is not None]
        seg = max(loops, key=seg_order) if loops else None
        if name == "conv_grad_weight" or (name == "sum_to" and not attrs.get("batched")):
            seg = None  # reductions over batch and time to a parameter's shape
        base = _grad_name(self.g, inputs, name)
        nid = self.g.fresh(base)
        node = Node(nid, name, tuple(inputs), attrs, None, self.loc, seg, grad=True)
        self.g.add(node)
        node.shape = tuple(op.shape([self.g.node(i).shape for i in inputs], attrs))
        return nid


def _grad_name(g: Graph, inputs, op: str) -> str:
    return "d_" + op


def needs_grad(low: Lowered, inputs: bool = False) -> set[str]:
    """Nodes that depend on some parameter (or, with `inputs`, on some input), through
    data edges and time."""
    g = low.graph
    order = g.order()
    ng = {low.params[p].node for p in low.params}
    if inputs:
        ng |= set(low.inputs.values())
    changed = True
    while changed:
        changed = False
        for nid in order:
            if nid in ng:
                continue
            node = g.node(nid)
            # an operand read only for its shape (expand's) does not make it depend on one
            shape_only = OPS[node.op].shape_only
            hit = any(i in ng and k not in shape_only for k, i in enumerate(node.inputs))
            if node.op == "state":
                hit = hit or node.attrs.get("update") in ng or node.attrs.get("init_from") in ng
            if hit:
                ng.add(nid)
                changed = True
    return ng


def differentiate(low: Lowered, vjp: bool = False, data: bool = True) -> Backward:
    """The backward pass (vjp=True: of a vector-Jacobian product; data=False: its
    parameters' cotangents only, none for the inputs and initial states)."""
    g = low.graph
    data = vjp and data
    ng = needs_grad(low, inputs=data)
    bw = Backward(needs_grad=ng)
    parts: dict[str, list[str]] = {}
    if vjp:
        _seed_outputs(low, bw, parts)
    update_of = {}  # update node -> state read
    for nid in g.order():
        node = g.node(nid)
        if node.op == "state" and node.attrs.get("update"):
            update_of.setdefault(node.attrs["update"], []).append(nid)

    # carries: one per state read whose update needs a gradient
    for nid in list(g.order()):
        node = g.node(nid)
        if node.op == "state" and nid in ng:
            cid = g.fresh("d" + nid.removesuffix("_prev") + "_next")
            g.add(Node(cid, "carry", (), dict(read=nid), node.shape, node.loc, node.seg,
                       grad=True))
            bw.carries[nid] = cid

    forward = [n for n in g.order() if not g.node(n).grad]
    # parameters last: a learned initial state's gradient arrives from its state read
    # (after the loop), which no data edge orders before the parameter
    walk = [n for n in reversed(forward) if g.node(n).op != "param"] + \
        [n for n in reversed(forward) if g.node(n).op == "param"]
    for nid in walk:
        if nid not in ng:
            continue
        node = g.node(nid)
        b = Builder(g, node.loc)
        contribs = list(parts.get(nid, []))
        for read in update_of.get(nid, []):
            if read in bw.carries:
                contribs.append(bw.carries[read])
        if OPS[node.op].loss:
            ct = None  # the seed: d loss / d loss = 1, folded into the loss's gradient op
        elif not contribs:
            continue
        else:
            ct = _sum(g, b, contribs, nid)
        if node.op == "param":
            bw.grads[node.attrs["name"]] = ct
            continue
        if node.op == "input":  # (vjp=True: the inputs are differentiated too)
            bw.input_cts[node.attrs["seq"]] = ct
            continue
        if node.op == "state":
            bw.read_cts[nid] = ct
            co = g.fresh("d" + nid.removesuffix("_prev") + "_init")
            g.add(Node(co, "carry_out", (ct,), dict(read=nid), node.shape, node.loc, None,
                       grad=True))
            bw.carry_outs[nid] = co
            if data and node.attrs.get("init") != "final":
                bw.init_cts[node.attrs["state"]] = co
            src = node.attrs.get("init_from")
            if src is not None and src in ng:
                srcnode = g.node(src)
                if srcnode.op == "param":
                    contrib = b.op("sum_to", co, shape=tuple(srcnode.shape), batched=False)
                    parts.setdefault(src, []).append(contrib)
                # a final state (init=enc) is handled by the carry of the loop it came from
            continue
        op = OPS[node.op]
        for i, u in enumerate(node.inputs):
            if u not in ng:
                continue
            if i in op.shape_only:
                continue  # read only for its shape: no gradient flows to it
            rule = vjp_rule(op, i)
            if rule is None:
                raise NotImplementedError(f"op {node.op} has no gradient rule for input {i}")
            contrib = rule(b, node, ct, i)
            parts.setdefault(u, []).append(contrib)

    # a carry's value at the last step: the cotangent of the final state, if a later loop
    # started from it (encoder -> forecaster)
    started_from: dict[str, list[str]] = {}
    for nid in g.order():
        node = g.node(nid)
        if node.op == "state" and node.attrs.get("init") == "final":
            started_from.setdefault(node.attrs["init_from"], []).append(nid)
    for read, cid in bw.carries.items():
        upd = g.node(read).attrs["update"]
        terminal = [bw.carry_outs[r] for r in started_from.get(upd, []) if r in bw.carry_outs]
        seed = bw.final_seeds.get(g.node(read).attrs["state"])
        if seed is not None:
            terminal = [seed] + terminal
        if terminal:
            g.node(cid).attrs["terminal"] = tuple(terminal)
    return bw


def _seed_outputs(low: Lowered, bw: Backward, parts: dict) -> None:
    """The sources of a vector-Jacobian product: a cotangent for every output (a
    sequence on the output's time axis) and for every state's final value."""
    g = low.graph
    for name, out in low.outputs.items():
        node = g.node(out)
        if out not in bw.needs_grad:
            continue  # nothing the product gives depends on it
        seed = g.fresh("d" + out)
        g.add(Node(seed, "input", (), dict(kind="cotangent", seq=name, shape=node.shape),
                   node.shape, node.loc, node.seg, grad=True))
        bw.seeds[name] = seed
        parts.setdefault(out, []).append(seed)
    for nid in g.order():
        node = g.node(nid)
        if node.op != "state" or nid not in bw.needs_grad:
            continue
        state = node.attrs["state"]
        seed = g.fresh("d" + nid.removesuffix("_prev") + "_final")
        g.add(Node(seed, "input", (), dict(kind="state_cotangent", seq=state, shape=node.shape),
                   node.shape, node.loc, None, grad=True))
        bw.final_seeds[state] = seed


def _sum(g: Graph, b: Builder, contribs: list[str], nid: str) -> str:
    """The cotangent of `nid`: its one contribution, or one `addn` of all of them.

    It is named after the value it differentiates (`dh_enc` for `h_enc`), so
    the generated code reads like a hand-written backward pass.
    """
    if len(contribs) == 1:
        c = contribs[0]
        node = g.node(c)
        # only a fresh node made by a rule for this one input may take the name
        if not c.startswith("d_") or not node.grad or g.consumers(c):
            return c
        return _rename(g, c, "d" + nid)
    return _rename(g, b.op("addn", *contribs), "d" + nid)


def _rename(g: Graph, old: str, base: str) -> str:
    new = g.fresh(base)
    g.relabel(old, new)
    return new

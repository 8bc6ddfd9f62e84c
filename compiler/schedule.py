"""Schedule: which nodes run inside a time loop, which run batched over all steps.

For every loop (segment) the nodes that lie on the recurrence, those that
depend on a state read *and* feed a state update, must run step by step.
Everything else in that loop's time context runs once over the whole
sequence, as one batched op on a (T, N, C, H, W) array: before the loop
when the loop needs it (the input-to-hidden convolutions of a whole
sequence: one large GEMM instead of T small ones), after it otherwise (heads,
losses). The backward pass is scheduled the same way, with carries as its
recurrence, which puts the weight gradients after the loop as one reduction
over all steps.

The memory plan follows: a value computed in a loop gets a (T, N, ...)
buffer only when something outside its step reads it (a batched stage, or
the backward pass); everything else stays a temporary of one step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .autodiff import Backward
from .ir import Graph
from .lower import Lowered


@dataclass
class Schedule:
    blocks: list[tuple[str, str | None]]  # (kind, segment)
    members: dict[tuple, list[str]]  # block -> node ids in order
    block_of: dict[str, tuple]
    stored: set[str] = field(default_factory=set)  # loop values that need a (T, ...) buffer
    forward_blocks: list[tuple] = field(default_factory=list)
    backward_blocks: list[tuple] = field(default_factory=list)

    def loop_nodes(self, seg: str, backward: bool = False) -> list[str]:
        return self.members.get(("bloop" if backward else "loop", seg), [])


def _stages(g: Graph, nodes: set[str], sources: set[str], sinks: set[str]):
    """Split one loop's nodes into (pre, loop, post) given the recurrence ends."""
    view = g.data_view()
    dep = set(sources)
    for s in sources:
        dep |= {d for d in _desc(view, s) if d in nodes}
    anc = set(sinks)
    for s in sinks:
        anc |= {a for a in _anc(view, s) if a in nodes}
    loop = (dep & anc) | sources | sinks
    loop = {n for n in loop if n in nodes}
    post = {n for n in nodes if n in dep and n not in loop}
    pre = nodes - loop - post
    return pre, loop, post


def _desc(view, n):
    import networkx as nx
    return nx.descendants(view, n)


def _anc(view, n):
    import networkx as nx
    return nx.ancestors(view, n)


def schedule(low: Lowered, bw: Backward | None) -> Schedule:
    g = low.graph
    segs = [s.id for s in sorted(low.segments, key=lambda s: s.index)]
    fwd_blocks = [("static", None), ("data", None)]
    for s in segs:
        fwd_blocks += [("pre", s), ("loop", s), ("post", s)]
    fwd_blocks.append(("tail", None))
    bwd_blocks = []
    if bw is not None:
        for s in reversed(segs):
            bwd_blocks += [("bpre", s), ("bloop", s), ("bpost", s)]
        bwd_blocks.append(("btail", None))
    blocks = fwd_blocks + bwd_blocks
    index = {b: i for i, b in enumerate(blocks)}
    block_of: dict[str, tuple] = {}

    for s in segs:
        fwd = {n for n in g.g.nodes if g.node(n).seg == s and not g.node(n).grad}
        reads = {n for n in fwd if g.node(n).op == "state"}
        updates = {g.node(r).attrs["update"] for r in reads}
        pre, loop, post = _stages(g, fwd, reads, updates)
        for n in pre:
            block_of[n] = ("pre", s)
        for n in loop:
            block_of[n] = ("loop", s)
        for n in post:
            block_of[n] = ("post", s)
        if bw is not None:
            bnodes = {n for n in g.g.nodes if g.node(n).seg == s and g.node(n).grad}
            carries = {c for r, c in bw.carries.items() if g.node(r).seg == s}
            cts = {bw.read_cts[r] for r in bw.read_cts if g.node(r).seg == s}
            bpre, bloop, bpost = _stages(g, bnodes, carries, cts & bnodes)
            for n in bpre:
                block_of[n] = ("bpre", s)
            for n in bloop:
                block_of[n] = ("bloop", s)
            for n in bpost:
                block_of[n] = ("bpost", s)

    order = g.order()
    for n in order:
        node = g.node(n)
        if n in block_of:
            continue
        if node.seg is not None and node.seg.startswith("@"):
            block_of[n] = ("data", None)
            continue
        # static values and reductions: right after the last block they read from
        ins = [block_of[i] for i in node.inputs if i in block_of]
        if not ins:
            block_of[n] = ("static", None) if not node.grad else ("btail", None)
            continue
        last = max(ins, key=lambda b: index[b])
        kind, s = last
        if kind == "loop":
            last = ("post", s)
        elif kind == "bloop":
            last = ("bpost", s)
        elif kind in ("static", "data") and node.grad:
            last = ("btail", None)
        elif kind in ("static", "data"):
            last = ("tail", None) if any(index[b] > 1 for b in ins) else last
        block_of[n] = last

    members: dict[tuple, list[str]] = {b: [] for b in blocks}
    for n in order:
        members[block_of[n]].append(n)

    # a value must not be read before its block: check the schedule is sound
    for n in order:
        for i in g.node(n).inputs:
            if index[block_of[i]] > index[block_of[n]]:
                raise AssertionError(f"schedule: {n} in {block_of[n]} reads {i} from the later "
                                     f"block {block_of[i]}")

    stored = set()
    for n in order:
        b = block_of[n]
        if b[0] not in ("loop", "bloop"):
            continue
        node = g.node(n)
        if node.op in ("state", "carry"):
            continue
        if b[0] == "loop" and any(g.node(r).attrs.get("update") == n for r in
                                  g.g.successors(n) if g.node(r).op == "state"):
            continue  # state updates live in the state's (T+1, ...) buffer
        for user in g.consumers(n):
            if block_of[user] != b and g.node(user).op != "carry_out":
                stored.add(n)
                break
    return Schedule(blocks, members, block_of, stored, fwd_blocks, bwd_blocks)

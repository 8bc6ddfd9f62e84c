"""Schedule: which nodes run inside a time loop, which run batched over all steps.

For every loop (segment) the nodes that lie on a recurrence, those that
depend on a state read *and* feed a state update, must run step by step.
Everything else in that loop's time context runs once over the whole
sequence, as one batched op on a (T, N, C, H, W) array: before the loop
when the loop needs it (the input-to-hidden convolutions of a whole
sequence: one large GEMM instead of T small ones), after it otherwise (heads,
losses). The backward pass is scheduled the same way, with carries as its
recurrence, which puts the weight gradients after the loop as one reduction
over all steps.

One segment may hold several recurrences: stacked layers step together
over one sequence, but layer 2 never feeds back into layer 1. The nodes of
a loop are split into the strongly connected components of their graph
with the time edges added (a state's update at t feeds its read at t+1; a
read's cotangent at t feeds the carry at t-1); each recurrence becomes a
loop of its own (*loop fission*), in dependency order, and what lies between
two of them (layer 2's input-to-hidden convolution of layer 1's output, or
its gradient) runs batched in a `mid` stage. Blocks are (kind, segment, k)
with k numbering the loops of one segment (`Block`, of a `Kind`).

Before placing anything, the loop-aware rewrites of passes.py have run on
the differentiated graph (the driver's `loop_rewrites` stage): a
convolution over concat(input, state) is split so that its input half can
be hoisted, a cotangent built of slice gradients becomes a concat, gates
of one kind share one activation call.

The memory plan follows: a value computed in a loop gets a (T, N, ...)
buffer only when something outside its step reads it (a batched stage, or
the backward pass); everything else stays a temporary of one step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

import networkx as nx

from .autodiff import Backward
from .ir import Graph, is_data_seg, seg_order
from .lower import Lowered

class Kind(str, Enum):
    """What a block runs: static values, data, batched stages, loops (forward, backward).

    A member equals its value as a string (`Kind.LOOP == "loop"`), so the IR's
    text and old comparisons read the same.
    """

    STATIC = "static"  # parameters and constants
    DATA = "data"  # the input and target sequences
    PRE = "pre"  # a segment's batched values before its loops
    LOOP = "loop"  # a forward loop, step by step
    MID = "mid"  # batched values between two loops of one segment
    POST = "post"  # after a segment's loops, all steps at once
    TAIL = "tail"  # the loss
    BPRE = "bpre"
    BLOOP = "bloop"  # a backward loop, t = T-1 ... 0
    BMID = "bmid"
    BPOST = "bpost"  # gradients summed over all steps
    BTAIL = "btail"

    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__

    @property
    def is_loop(self) -> bool:
        return self in (Kind.LOOP, Kind.BLOOP)

    @property
    def backward(self) -> bool:
        return self.value.startswith("b")


class Block(NamedTuple):
    """One block of the schedule: its kind, its segment (None outside the loops) and k,
    numbering the loops of one segment (a `mid` or `bmid` block has the k of the loop
    before it)."""

    kind: Kind
    seg: str | None = None
    k: int = 0


LOOP_KINDS = (Kind.LOOP, Kind.BLOOP)


@dataclass
class Schedule:
    blocks: list[Block]
    members: dict[Block, list[str]]  # block -> node ids in order
    block_of: dict[str, Block]
    stored: set[str] = field(default_factory=set)  # loop values that need a (T, ...) buffer
    forward_blocks: list[Block] = field(default_factory=list)
    backward_blocks: list[Block] = field(default_factory=list)
    rewrites: dict[str, int] = field(default_factory=dict)  # what the loop-aware passes did

    def loop_nodes(self, seg: str, backward: bool = False) -> list[str]:
        """Every node of a segment's loops (all of its recurrences), in order."""
        kind = Kind.BLOOP if backward else Kind.LOOP
        return [n for b in self.blocks if b.kind == kind and b.seg == seg
                for n in self.members.get(b, [])]


def _stages(g: Graph, nodes: set[str], sources: set[str], sinks: set[str]):
    """Split one loop's nodes into (pre, loop, post) given the recurrence ends."""
    view = g.data_view()
    dep = set(sources)
    # what reads a recurrence end runs at or after it: also a state's new value that reads
    # no state (h = tanh(conv(x, W)), which the loop still writes step by step)
    for s in set(sources) | set(sinks):
        dep |= {d for d in nx.descendants(view, s) if d in nodes}
    anc = set(sinks)
    for s in sinks:
        anc |= {a for a in nx.ancestors(view, s) if a in nodes}
    loop = (dep & anc) | sources | sinks
    loop = {n for n in loop if n in nodes}
    post = {n for n in nodes if n in dep and n not in loop}
    pre = nodes - loop - post
    return pre, loop, post


def recurrences(g: Graph, nodes: set[str], links) -> list[tuple[str, set[str]]]:
    """Split a loop's nodes into recurrences and the batched stages between them.

    `links` are the time edges (a, b): b at the next step reads a (state update
    -> state read, read cotangent -> carry). With them added, both ways so a
    read always stays with its update, every strongly connected component that
    holds a link is one recurrence; the other components depend on one
    recurrence and feed a later one, so they can run over all steps at once in
    between. Returns [("loop", nodes), ("mid", nodes), ("loop", nodes), ...]
    in dependency order (creation order breaks ties, so the result is stable).
    """
    h = nx.DiGraph()
    h.add_nodes_from(nodes)
    for u in nodes:
        for v in g.data.successors(u):
            if v in nodes:
                h.add_edge(u, v)
    ends = set()
    for a, b in links:
        if a in nodes and b in nodes:
            h.add_edge(a, b)
            h.add_edge(b, a)
            ends |= {a, b}
    cond = nx.condensation(h)
    first = {c: min(g.node(n).order for n in cond.nodes[c]["members"]) for c in cond.nodes}
    groups: list[tuple[str, set[str]]] = []
    for c in nx.lexicographical_topological_sort(cond, key=first.__getitem__):
        members = set(cond.nodes[c]["members"])
        if len(members) > 1 or members & ends:
            groups.append(("loop", members))
        elif groups and groups[-1][0] == "mid":
            groups[-1][1].update(members)
        else:
            groups.append(("mid", members))
    # a "mid" group ahead of every loop cannot happen (everything here depends on a
    # read), but keep the result well formed if it does: run it in the first loop
    if groups and groups[0][0] == "mid":
        kind, members = groups.pop(0)
        if groups:
            groups[0][1].update(members)
        else:
            groups.append(("loop", members))
    # merge adjacent loops with no batched stage between them? No: separate loops
    # are what lets the next layer's input convolution be batched.
    return groups


def schedule(low: Lowered, bw: Backward | None, rewrites: dict[str, int] | None = None
             ) -> Schedule:
    """Place every node in a block. The loop-aware rewrites (passes.loop_rewrites) must
    have run on the differentiated graph (the driver runs them: a stage of its own);
    `rewrites` is what they changed, kept in the Schedule for reports.

    The steps: each segment's forward and backward nodes into its loops and batched
    stages; the order of the blocks; every other node after what it reads; then two
    moves that shorten the life of (T, ...) values, a soundness check, and the values
    that need a (T, ...) buffer."""
    g = low.graph
    rewrites = dict(rewrites or {})
    segs = [s.id for s in sorted(low.segments, key=lambda s: s.index)]

    if bw is not None:
        _backward_segments(g, bw)
    block_of: dict[str, Block] = {}
    fwd_groups: dict[str, list] = {}
    bwd_groups: dict[str, list] = {}
    for s in segs:
        fwd_groups[s] = _place_forward_segment(g, s, block_of)
        if bw is not None:
            bwd_groups[s] = _place_backward_segment(g, bw, s, block_of)
    fwd_blocks, bwd_blocks = _block_sequence(segs, fwd_groups, bwd_groups, bw is not None)
    blocks = fwd_blocks + bwd_blocks
    index = {b: i for i, b in enumerate(blocks)}

    order = g.order()
    _place_outside_loops(g, order, block_of, index)
    _backward_reductions_early(g, order, block_of, index)
    _forward_values_late(g, order, block_of, index, set(low.outputs.values()))
    members: dict[Block, list[str]] = {b: [] for b in blocks}
    for n in order:
        members[block_of[n]].append(n)
    _check_sound(g, order, block_of, index)
    stored = through_views(g, _stored(g, order, block_of), block_of)
    return Schedule(blocks, members, block_of, stored, fwd_blocks, bwd_blocks, rewrites)


def _place_forward_segment(g: Graph, seg: str, block_of: dict) -> list[Block]:
    """A segment's forward nodes: on a recurrence (state read to state update) they run
    in a loop, one per recurrence; the rest before the loops (pre) or after them (post).
    Fills `block_of`; returns the loop and in-between blocks in order."""
    fwd = {n for n in g.g.nodes if g.node(n).seg == seg and not g.node(n).grad}
    reads = {n for n in fwd if g.node(n).op == "state"}
    updates = {g.node(r).attrs["update"] for r in reads}
    pre, loop, post = _stages(g, fwd, reads, updates)
    for n in pre:
        block_of[n] = Block(Kind.PRE, seg, 0)
    for n in post:
        block_of[n] = Block(Kind.POST, seg, 0)
    groups = recurrences(g, loop, [(g.node(r).attrs["update"], r) for r in reads])
    return _place(groups, seg, Kind.LOOP, Kind.MID, block_of)


def _place_backward_segment(g: Graph, bw: Backward, seg: str, block_of: dict) -> list[Block]:
    """A segment's backward nodes, as the forward ones: the recurrence runs from the carries
    to the state reads' cotangents (bloop), the rest in bpre and bpost. Fills `block_of`;
    returns the backward loop and in-between blocks in order."""
    bnodes = {n for n in g.g.nodes if g.node(n).seg == seg and g.node(n).grad}
    carries = {c for r, c in bw.carries.items() if g.node(r).seg == seg}
    cts = {bw.read_cts[r] for r in bw.read_cts if g.node(r).seg == seg}
    bpre, bloop, bpost = _stages(g, bnodes, carries, cts & bnodes)
    for n in bpre:
        block_of[n] = Block(Kind.BPRE, seg, 0)
    for n in bpost:
        block_of[n] = Block(Kind.BPOST, seg, 0)
    links = [(bw.read_cts[r], c) for r, c in bw.carries.items()
             if r in bw.read_cts and g.node(r).seg == seg]
    groups = recurrences(g, bloop, links)
    return _place(groups, seg, Kind.BLOOP, Kind.BMID, block_of)


def _block_sequence(segs: list[str], fwd_groups: dict, bwd_groups: dict, backward: bool
                    ) -> tuple[list[Block], list[Block]]:
    """The order blocks run in: static values, data sequences, each segment's forward
    stages in segment order, the tail; then (with a backward pass) each segment's
    backward stages in reverse segment order and the backward tail."""
    fwd_blocks = [Block(Kind.STATIC), Block(Kind.DATA)]
    for s in segs:
        fwd_blocks += [Block(Kind.PRE, s, 0)] + fwd_groups[s] + [Block(Kind.POST, s, 0)]
    fwd_blocks.append(Block(Kind.TAIL))
    bwd_blocks = []
    if backward:
        for s in reversed(segs):
            bwd_blocks += [Block(Kind.BPRE, s, 0)] + bwd_groups[s] + [Block(Kind.BPOST, s, 0)]
        bwd_blocks.append(Block(Kind.BTAIL))
    return fwd_blocks, bwd_blocks


def _place_outside_loops(g: Graph, order: list[str], block_of: dict, index: dict) -> None:
    """Every node no segment placed: a data sequence's in the data block, a static value
    or reduction right after the last block it reads from (see _after_inputs)."""
    for n in order:
        node = g.node(n)
        if n in block_of:
            continue
        if is_data_seg(node.seg):
            block_of[n] = Block(Kind.DATA)
            continue
        ins = [block_of[i] for i in node.inputs if i in block_of]
        if not ins:
            block_of[n] = Block(Kind.BTAIL if node.grad else Kind.STATIC)
            continue
        block_of[n] = _after_inputs(node.grad, ins, index)


def _after_inputs(grad: bool, ins: list[Block], index: dict) -> Block:
    """The block for a value outside the loops that reads from the blocks `ins`: the
    last of them, moved out of a loop to the batched stage after it, and into a tail
    when it reads only static values and data sequences."""
    last = max(ins, key=lambda b: index[b])
    kind, s, _ = last
    if kind in (Kind.LOOP, Kind.MID):
        return Block(Kind.POST, s, 0)
    if kind in (Kind.BLOOP, Kind.BMID):
        # a reduction over a backward loop's steps (a weight gradient) runs right after
        # that loop, so the loop's (T, ...) cotangents can go before the next one runs
        return Block(Kind.BMID, s, last.k)
    if kind in (Kind.STATIC, Kind.DATA) and grad:
        return Block(Kind.BTAIL)
    if kind in (Kind.STATIC, Kind.DATA):
        return Block(Kind.TAIL) if any(index[b] > 1 for b in ins) else last
    return last


def _backward_reductions_early(g: Graph, order: list[str], block_of: dict, index: dict
                               ) -> None:
    """What runs after a segment's backward loops but reads only the first few of them (a
    peephole's or a bias's gradient, summed over the steps of one layer) runs right after
    the last loop it reads, so the (T, ...) cotangents it reads go early."""
    for n in order:
        b = block_of[n]
        if b.kind != Kind.BPOST:
            continue
        last = max((block_of[i] for i in g.node(n).inputs), key=lambda x: index[x])
        if last.kind in (Kind.BLOOP, Kind.BMID) and last.seg == b.seg:
            block_of[n] = Block(Kind.BMID, last.seg, last.k)


def _forward_values_late(g: Graph, order: list[str], block_of: dict, index: dict,
                         outputs: set[str]) -> None:
    """A forward value only the backward pass reads (the concat(x, h[t-1]) a weight
    gradient needs) is made where it is first needed, in a batched backward stage, so it
    does not live through the loops. An output stays in the forward pass (a vector-Jacobian
    product's graph has no loss reading it: vjp_start hands it out before the backward)."""
    batched = (Kind.BPRE, Kind.BMID, Kind.BPOST, Kind.BTAIL)
    for n in reversed(order):
        node = g.node(n)
        users = g.consumers(n)
        if node.grad or block_of[n].kind not in (Kind.PRE, Kind.MID, Kind.POST) or not users or \
                n in outputs or \
                node.op in ("input", "param", "state") or \
                any(g.node(r).op == "state" for r in g.g.successors(n)):
            continue
        if not all(block_of[u].kind.backward for u in users):
            continue
        first = min((block_of[u] for u in users), key=lambda b: index[b])
        if first.kind in batched:
            block_of[n] = first


def _check_sound(g: Graph, order: list[str], block_of: dict, index: dict) -> None:
    """A value must not be read before its block: raises AssertionError if one is."""
    for n in order:
        for i in g.node(n).inputs:
            if index[block_of[i]] > index[block_of[n]]:
                raise AssertionError(f"schedule: {n} in {block_of[n]} reads {i} from the later "
                                     f"block {block_of[i]}")


def _stored(g: Graph, order: list[str], block_of: dict) -> set[str]:
    """The loop values that need a (T, ...) buffer: those read outside their block (but
    for carry_out), less state reads and updates, which have their state's buffer."""
    stored = set()
    for n in order:
        b = block_of[n]
        if not b.kind.is_loop:
            continue
        node = g.node(n)
        if node.op == "state":
            continue  # it has its state's (T + 1, ...) buffer
        if b.kind == Kind.LOOP and any(g.node(r).attrs.get("update") == n for r in
                                  g.g.successors(n) if g.node(r).op == "state"):
            continue  # state updates live in the state's (T+1, ...) buffer
        for user in g.consumers(n):
            if block_of[user] != b and g.node(user).op != "carry_out":
                stored.add(n)
                break
    return stored


def through_views(g: Graph, stored: set[str], block_of: dict) -> set[str]:
    """A slice read outside its step is read through its operand: store the operand instead.

    (The gates of a ConvLSTM are slices of one activation: the activation's
    buffer is kept, not one per gate.) State reads and updates have their
    state's buffer already.
    """
    out = set(stored)
    changed = True
    while changed:
        changed = False
        for n in sorted(out):
            node = g.node(n)
            if node.op != "slice" or block_of.get(node.inputs[0]) != block_of[n]:
                continue
            out.discard(n)
            src = g.node(node.inputs[0])
            is_update = any(g.node(r).op == "state" and g.node(r).attrs.get("update") == src.id
                            for r in g.g.successors(src.id))
            if src.op != "state" and not is_update:
                out.add(src.id)
            changed = True
    return out


def _backward_segments(g: Graph, bw: Backward) -> None:
    """Put every backward node on a loop's recurrence into that loop's segment.

    Autodiff gives a backward node the latest segment of its operands. A
    cotangent that adds a later loop's contribution (the loss reads both
    layers of an encoder whose second layer starts from the first's final
    state) to an earlier loop's carry would land in the later loop, yet it
    must run step by step in the earlier loop's backward pass.
    """
    view = g.data_view()
    fixed = set()
    for read, carry in bw.carries.items():
        seg = g.node(read).seg
        ct = bw.read_cts.get(read)
        if ct is None:
            continue
        dep = nx.descendants(view, carry) | {carry}
        anc = nx.ancestors(view, ct) | {ct}
        for n in dep & anc:
            node = g.node(n)
            if node.grad and node.seg is not None and not is_data_seg(node.seg):
                node.seg = seg
                fixed.add(n)
    # what follows from them: the latest segment of the operands, as autodiff has it
    for n in g.order():
        node = g.node(n)
        if not node.grad or n in fixed or not node.inputs or node.op == "carry_out":
            continue
        if node.op == "conv_grad_weight" or (node.op == "sum_to" and
                                             not node.attrs.get("batched")):
            continue
        segs = [g.node(i).seg for i in node.inputs if g.node(i).seg is not None]
        node.seg = max(segs, key=seg_order) if segs else None


def _place(groups, seg: str, loop_kind: Kind, mid_kind: Kind, block_of: dict) -> list[Block]:
    """Number a segment's recurrences and in-between stages; returns their blocks."""
    blocks = []
    k = 0
    for kind, members in groups:
        if kind == "loop":
            block = Block(loop_kind, seg, k)
            k += 1
        else:
            block = Block(mid_kind, seg, k - 1)
        blocks.append(block)
        for n in members:
            block_of[n] = block
        if kind == "loop":  # every loop is followed by a (maybe empty) batched stage
            blocks.append(Block(mid_kind, seg, k - 1))
    out = []
    for b in blocks:  # one stage between two loops
        if not out or b != out[-1]:
            out.append(b)
    return out

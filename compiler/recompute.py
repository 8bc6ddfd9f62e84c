"""recompute=K: which forward values loss_and_grad keeps for one window of K steps.

A forward loop value (a state, or a value stored for the backward pass)
qualifies when nothing but one backward loop, its partner, reads it outside
its own step: at the last step of each window that backward loop restores
the states checkpointed at the window's start and runs the window's forward
steps again, so only K rows of the value are kept (row t % K). A state
another loop starts from, or that a batched stage or the loss reads (a
layer's output h), keeps all its steps.

The batched forward values that only such a loop reads (its input
convolution over all steps) are made again with each window instead of
being kept for all steps: `window_values`.

`plan_recompute` is a pure function of the graph and the schedule; codegen
renders what it returns (the local `<loop>_steps(start, stop)` functions,
the checkpoints and the recompute calls).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .ir import Graph
from .ops import OPS
from .schedule import Block, Schedule


@dataclass
class Window:
    """A forward loop that its backward partner recomputes a window at a time."""

    partner: Block  # the backward loop that recomputes it
    reads: list[str]  # its state reads kept for one window (checkpointed at each start)


@dataclass
class RecomputePlan:
    K: int | None
    candidates: dict[str, Block] = field(default_factory=dict)  # value -> its loop
    ring: dict[str, int] = field(default_factory=dict)  # value -> K: rows t % K only
    windows: dict[Block, Window] = field(default_factory=dict)
    window_values: dict[str, Block] = field(default_factory=dict)  # batched, per window

    def partner_of(self, block: Block) -> list[tuple[Block, Window]]:
        """The forward loops that backward loop `block` recomputes."""
        return [(L, w) for L, w in self.windows.items() if w.partner == block]


def candidates(g: Graph, s: Schedule) -> tuple[dict[str, Block], dict[Block, Block]]:
    """What recompute=K may keep for one window, loop by loop: ({value: loop block},
    {loop block: its backward partner})."""
    starts = {g.node(n).attrs.get("init_from") for n in g.g.nodes if g.node(n).op == "state"}

    def readers(n, inside):  # blocks reading n outside its step (through views)
        out = set()
        for u in g.consumers(n):
            if g.node(u).op == "carry_out":
                continue
            if u in inside and OPS[g.node(u).op].view and u not in s.stored:
                out |= readers(u, inside)
            elif u not in inside:
                out.add(s.block_of[u])
        return out

    updates = {g.node(r).attrs["update"] for r in g.g.nodes if g.node(r).op == "state"}
    ring, partner_of = {}, {}
    for L in s.forward_blocks:
        if L.kind != "loop":
            continue
        inside = set(s.members.get(L, []))
        cands = {}
        for n in s.members.get(L, []):
            node = g.node(n)
            if node.op == "state":
                if node.attrs["update"] in starts:
                    continue
                cands[n] = readers(n, inside) | readers(node.attrs["update"], inside)
            elif n in s.stored and n not in updates:
                cands[n] = readers(n, inside)
        if any(b.kind != "bloop" for bs in cands.values() for b in bs):
            cands = {n: bs for n, bs in cands.items() if all(b.kind == "bloop" for b in bs)}
        partners = sorted({b for bs in cands.values() for b in bs})
        if len(partners) != 1:
            continue  # no backward loop, or several: keep every step
        partner_of[L] = partners[0]
        for n in cands:
            ring[n] = L
    return ring, partner_of


def window_inputs(g: Graph, s: Schedule, L: Block, keep_always: set[str]) -> set[str]:
    """Batched forward values that only loop L (or others of them) read: with
    recompute=K they are made window by window (what the loop's backward pass
    would otherwise keep alive for the recomputation, all steps of it)."""
    inside = set(s.members.get(L, []))
    out: set[str] = set()
    for n in reversed(g.order()):
        node = g.node(n)
        b = s.block_of[n]
        if node.grad or not OPS[node.op].owned or n in keep_always or not (
                b.kind in ("pre", "mid") and b.seg == L.seg or
                b.kind == "data" and node.seg is not None):  # (of the input alone)
            continue
        users = g.consumers(n)
        if users and all(u in inside or u in out for u in users):
            out.add(n)
    return out


def plan_recompute(g: Graph, s: Schedule, K: int | None, backward: bool,
                   keep_always: set[str]) -> RecomputePlan:
    """The recomputation of loss_and_grad for recompute=K (K None: none; the
    candidates are still reported, for the memory estimate)."""
    if not backward:
        return RecomputePlan(K)
    ring, partner_of = candidates(g, s)
    plan = RecomputePlan(K, candidates=ring)
    if not K:
        return plan
    plan.ring = {n: K for n in ring}
    plan.windows = {L: Window(partner=p, reads=[n for n in s.members[L]
                                                if n in ring and g.node(n).op == "state"])
                    for L, p in partner_of.items()}
    for L in plan.windows:
        for n in window_inputs(g, s, L, keep_always):
            plan.window_values[n] = L
    return plan

"""Peeling: a loop body specialised for sources known to be zero.

A loop's first step reads states that start at zero, and the backward
loop's first step (the last time step) has no cotangent coming from step
t+1. Each such step is emitted as its own copy of the body, a *variant*,
from which what the zeros make vanish has been folded away by the op
table's zero rules (`ops.without_zeros`): a product with a zero is zero,
a zero term drops out of a sum, a sum of one term is that term.

`peel` is a pure function of the graph: codegen's loop plan asks it for a
variant, then gives the variant's live values their buffers
(codegen._LoopPlan) and renders it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .ir import Graph
from .ops import ALIAS, OPS, ZERO, without_zeros

COMPUTE = "compute"


@dataclass
class Variant:
    """One specialised copy of a loop body: what each node is, given some zero sources."""

    status: dict[str, str]  # node -> COMPUTE | ZERO | ALIAS
    alias: dict[str, str]  # an ALIAS node -> the node whose value it has
    args: dict[str, list[str]]  # a COMPUTE node -> the operands it is computed from
    live: set[str]  # the nodes whose values the roots need
    zero_sources: set[str]
    # filled by the loop's memory plan
    dest: dict[str, str] = field(default_factory=dict)
    retargeted: dict[str, str] = field(default_factory=dict)

    def resolve(self, x: str) -> str:
        """The node whose value `x` has (x itself unless it is an alias)."""
        while self.status.get(x) == ALIAS:
            x = self.alias[x]
        return x


def peel(g: Graph, body: list[str], zero_sources: set[str], roots: set[str]) -> Variant:
    """Fold `body` (a loop's nodes in order) for `zero_sources` known to be zero; keep
    what `roots` need."""
    status, alias, args = {}, {}, {}
    zero = set(zero_sources)
    for n in body:
        node = g.node(n)
        ins = list(node.inputs)
        st, use = COMPUTE, ins
        folded = without_zeros(OPS[node.op], [i in zero for i in ins])
        if folded is None:
            pass
        elif folded[0] == ZERO:
            st = ZERO
        elif folded[0] == ALIAS:
            st, alias[n] = ALIAS, ins[folded[1]]
        elif all(sign > 0 for sign in OPS[node.op].terms):  # a sum: zero terms drop out
            use = [ins[k] for k in folded[1]]
        status[n] = st
        args[n] = use
        if st == ZERO:
            zero.add(n)
    inside = set(body)
    live = {r for r in roots if r in inside}
    for n in reversed(body):
        if n not in live:
            continue
        if status[n] == ALIAS:
            live.add(alias[n])
        elif status[n] == COMPUTE:
            live.update(args[n])
    live = {n for n in live if n in inside or n in zero_sources}
    return Variant(status, alias, args, live, set(zero_sources))

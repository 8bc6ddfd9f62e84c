"""Fused step kernels: a loop body's elementwise work grouped into kernels.

A time step of a ConvLSTM is a few convolutions and a few dozen elementwise
operations (the gates' activations, the cell update, and backwards their
cotangents); run one NumPy call each, a small step is bound by call
overhead, not arithmetic. `kernels(g, lm, v)` groups the elementwise nodes
of one variant of a loop body (peel.py) into `Kernel`s, each computing its
members element by element in one pass:

- a member is computed here (not zero, not an alias), elementwise, with a
  `scalar` template in the op table, and of the group's shape (its operands
  broadcast to it: a bias (C, 1, 1), a per-pixel bias (C, H, W), a gate that
  is a channel slice of the fused convolution's output);
- groups are made in the body's order: a node joins the open group when it
  has the group's shape; a node outside the group that reads a member
  closes it (so the kernel can run where its last member was, and nothing
  between its members needs its values), and so does one that writes into
  memory (a place of the memory plan): the kernel reads its inputs where its
  last member was, so no buffer may be overwritten between its members;
- a kernel's outputs are the members something outside the group reads, or
  that have a place of their own in the loop's memory plan (a state's
  update, a stored value, a carried cotangent, a part of a concat).

A `Kernel` is the expression source: its statements are (node, op, operand
names, attrs), the same for every target. compiler/render.py renders it as
C for the CPU and as CUDA for the GPU from the op table's `scalar`
templates; neither renderer knows any op.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from .ir import Graph
from .ops import OPS
from .peel import ALIAS, COMPUTE, Variant

if TYPE_CHECKING:  # memplan plans a fused loop's memory after its kernels
    from .memplan import LoopMemory


@dataclass
class Kernel:
    name: str
    shape: tuple  # the per-sample shape it runs over, (C, H, W): one element each
    inputs: list[tuple[str, tuple]] = field(default_factory=list)  # (node, its shape)
    outputs: list[str] = field(default_factory=list)
    body: list[tuple[str, str, list[str], dict]] = field(default_factory=list)
    # (node, op, operands (nodes: inputs or earlier statements), attrs)


def fusable(g: Graph, v: Variant, n: str) -> bool:
    op = OPS[g.node(n).op]
    return (n in v.live and v.status.get(n) == COMPUTE and op.elementwise
            and op.scalar is not None)


def _broadcasts(shape: tuple, to: tuple) -> bool:
    """Whether a per-sample shape broadcasts to `to` (NumPy's rule, from the right)."""
    if len(shape) > len(to):
        return False
    return all(a in (1, b) for a, b in zip(reversed(shape), reversed(to)))


def kernels(g: Graph, lm: LoopMemory, v: Variant, prefix: str = "k") -> list[Kernel]:
    """The fused kernels of one variant of a loop body (before its memory plan: the
    members only the kernel reads get no buffer)."""
    from .memplan import writes_memory

    groups: list[list[str]] = []
    open_group: list[str] = []
    members: set[str] = set()

    def close():
        nonlocal open_group, members
        if len(open_group) > 1:  # one op alone is one NumPy call already
            groups.append(open_group)
        open_group, members = [], set()

    for n in lm.body:
        if n not in v.live:
            continue
        reads = {v.resolve(i) for i in _operands(v, n)}
        shape = tuple(g.node(n).shape)
        if fusable(g, v, n) and all(_broadcasts(tuple(g.node(i).shape), shape)
                                    for i in reads):
            if open_group and shape != tuple(g.node(open_group[0]).shape):
                close()
            open_group.append(n)
            members.add(n)
        elif reads & members or writes_memory(g, lm, v, n):
            close()
    close()
    return [_kernel(g, lm, v, grp, f"{prefix}{k}") for k, grp in enumerate(groups)]


def _operands(v: Variant, u: str) -> list[str]:
    return [v.alias[u]] if v.status.get(u) == ALIAS else \
        v.args[u] if v.status.get(u) == COMPUTE else []


def _kernel(g: Graph, lm: LoopMemory, v: Variant, group: list[str], name: str) -> Kernel:
    inside = set(group)
    k = Kernel(name, tuple(g.node(group[0]).shape))
    seen: set[str] = set()
    for n in group:
        args = [v.resolve(i) for i in v.args[n]]
        for i in args:
            if i in inside or i in seen:
                continue
            seen.add(i)
            if g.node(i).op == "const":  # a literal of the kernel
                k.body.append((i, "const", [], dict(g.node(i).attrs)))
            else:
                k.inputs.append((i, tuple(g.node(i).shape)))
        k.body.append((n, g.node(n).op, args, dict(g.node(n).attrs)))
    needed = set(lm.fixed) | set(lm.part_of) | set(lm.read_ct_of_carry.values())
    for u in lm.body:
        if u in v.live and u not in inside:
            needed |= {v.resolve(i) for i in _operands(v, u)}
    k.outputs = [n for n in group if n in needed]
    return k


def model_kernels(compiled) -> list[Kernel]:
    """Every fused kernel of a compiled model's loss_and_grad (forward and backward loops,
    every variant), named k<loop>_<variant>_<k>: what its generated code would run."""
    from .plan import plan_module

    c = compiled
    plan = plan_module(c.lowered, c.backward, c.schedule, None, "channel-major")
    fp = plan.functions["loss_and_grad"]
    out = []
    for b, lm in fp.loops.items():
        for key, v in lm.variants.items():
            out += kernels(c.lowered.graph, lm, v, prefix=f"k_{b.kind}{b.seg}_{b.k}_{key}_")
    return out

"""The plan of a generated module: what each of its functions computes, and where.

A generated module has three entry points that run the forward pass:
`forward` (outputs and final states), `loss` (what the loss reads, nothing
the gradients need) and `loss_and_grad` (the forward pass, the loss and the
backward pass). Each is planned on its own, as a `FunctionPlan`:

- which blocks of the schedule it runs and which of their nodes (`members`);
- which loop values it keeps for all steps (`stored`) and which of those are
  kept channel-major, because the backend's weight-gradient GEMM reads them
  that way (`channel_major`, from the backend's declared capabilities);
- for loss_and_grad with recompute=K, what is kept for one window only
  (recompute.py);
- its memory plan (memplan.py): liveness, arenas, and for each loop its
  fixed places, the variants of its body (peel.py) and their work buffers;
- with fuse=True, each variant's fused step kernels (fuse.py).

codegen.py renders a finished `ModulePlan`; it decides nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .autodiff import Backward
from .ir import Graph, data_name, is_data_seg
from .lower import Lowered
from .memplan import FunctionMemory, LoopMemory, add_variant, plan_function, plan_loop
from .passes import live_nodes
from .recompute import RecomputePlan, plan_recompute
from .schedule import Block, Kind, Schedule, through_views

FUNCTIONS = ("forward", "loss", "loss_and_grad", "vjp")


@dataclass
class FunctionPlan:
    name: str  # one of FUNCTIONS
    blocks: list[Block]
    members: dict[Block, list[str]]
    stored: set[str]
    channel_major: set[str]
    recompute: RecomputePlan
    memory: FunctionMemory
    loops: dict[Block, LoopMemory] = field(default_factory=dict)


@dataclass
class ModulePlan:
    state_of_update: dict[str, str]  # state update node -> its state read
    seg_T: dict[str, str]  # loop segment -> its time length's name (T_x)
    recompute: RecomputePlan  # loss_and_grad's (its candidates even without recompute)
    functions: dict[str, FunctionPlan]


def channel_major_values(g: Graph, s: Schedule, stored: set[str], layout: str | None
                         ) -> set[str]:
    """The stored values a weight gradient reads as its output gradient, when the
    backend's conv2d_grad_weight wants that channel-major (capabilities'
    `weight_gradient_layout`), and nothing else reads them outside their loop."""
    if layout != "channel-major":
        return set()
    out = set()
    for n in stored:
        users = g.consumers(n)
        if any(g.node(u).op == "conv_grad_weight" and g.node(u).inputs[1] == n
               for u in users) and all(
                g.node(u).op in ("conv_grad_weight", "sum_to", "conv_grad_input")
                or s.block_of[u] == s.block_of[n] for u in users):
            out.add(n)
    return out


def _stored_forward(g: Graph, s: Schedule, needed: set[str], state_of_update: dict
                    ) -> set[str]:
    """Forward loop values read outside their step, counting forward readers only."""
    out = set()
    for n in needed:
        b = s.block_of[n]
        if b.kind != Kind.LOOP or g.node(n).op == "state" or n in state_of_update:
            continue
        if any(u in needed and s.block_of[u] != b for u in g.consumers(n)):
            out.add(n)
    return through_views(g, out, s.block_of)


def _keep(low: Lowered, bw: Backward | None) -> set[str]:
    """What a function returns (or hands to its caller): never freed or overwritten."""
    g = low.graph
    keep = set(low.losses) | set(low.outputs.values())
    if bw is not None:
        keep |= set(bw.grads.values()) | set(bw.carry_outs.values())
        keep |= set(bw.input_cts.values()) | set(bw.init_cts.values())
    for n in g.g.nodes:
        keep.update(g.node(n).attrs.get("terminal", ()))
    return keep


def _loops(g: Graph, bw: Backward | None, blocks: list[Block], members: dict,
           stored: set[str], state_of_update: dict, fuse: bool = False
           ) -> dict[Block, LoopMemory]:
    """Each loop's memory plan and the variants of its body, in the order they run."""
    loops = {}
    read_cts = bw.read_cts if bw is not None else {}
    for b in blocks:
        nodes = members.get(b, [])
        if b.kind not in (Kind.LOOP, Kind.BLOOP) or not nodes:
            continue
        lm = plan_loop(g, b, nodes, stored, state_of_update, read_cts)
        lm.fuse = fuse
        if b.kind == Kind.LOOP:
            _forward_variants(g, lm, stored, state_of_update)
        else:
            _backward_variants(g, bw, lm, stored)
        loops[b] = lm
    return loops


def _forward_variants(g: Graph, lm: LoopMemory, stored: set[str], state_of_update: dict
                      ) -> None:
    """The general step, and the first one when states start at zero (what they
    multiply or convolve vanishes)."""
    roots = {n for n in lm.body if n in stored or n in state_of_update}
    zero = {r for r in lm.sources if g.node(r).attrs["init"] == "zeros"}
    add_variant(g, lm, "general", set(), roots, main=True)
    if zero:
        add_variant(g, lm, "first", zero, roots)


def _backward_variants(g: Graph, bw: Backward, lm: LoopMemory, stored: set[str]) -> None:
    """The last step (nothing flows back from after it), the middle ones, and the first
    (nothing goes on to t = -1 but the initial states' gradients)."""
    carries = lm.sources
    lm.zero = {c for c in carries if not g.node(c).attrs.get("terminal")}
    lm.never = {c for c in carries if c not in lm.read_ct_of_carry}
    kept = {n for n in lm.body if n in stored}
    cts = set(lm.read_ct_of_carry.values())
    with_out = {ct for c, ct in lm.read_ct_of_carry.items()
                if bw.carry_outs.get(g.node(c).attrs["read"]) in g}
    add_variant(g, lm, "last", lm.zero, kept | cts)
    add_variant(g, lm, "middle", lm.never, kept | cts, main=True)
    add_variant(g, lm, "first", lm.never, kept | with_out)


def plan_module(low: Lowered, bw: Backward | None, s: Schedule, recompute: int | None,
                weight_gradient_layout: str | None, vjp: bool = False,
                fuse: bool = False) -> ModulePlan:
    """Plan forward, loss and loss_and_grad (vjp=True: the one function `vjp` of a
    vector-Jacobian product's graph). `weight_gradient_layout` is what the target
    backend declares (runtime/backend.py's Capabilities); fuse: group each loop
    body's elementwise work into kernels (fuse.py)."""
    g = low.graph
    state_of_update = {g.node(n).attrs["update"]: n for n in g.order()
                       if g.node(n).op == "state"}
    seg_T = {seg.id: f"T_{seg.axis}" for seg in low.segments}

    def time_of(n):  # the time length of a per-step value (T_x), None without time
        seg = g.node(n).seg
        if seg is None:
            return None
        if is_data_seg(seg):
            return f"T_{low.axis_of.get(data_name(seg), data_name(seg))}"
        return seg_T.get(seg)

    keep = _keep(low, bw)
    none = RecomputePlan(recompute)
    functions = {}

    def plan(name, blocks, members, stored, rec):
        cm = channel_major_values(g, s, stored, weight_gradient_layout)
        memory = plan_function(g, s, blocks, members, stored, keep, time_of, rec.ring,
                               rec.windows, rec.window_values)
        loops = _loops(g, bw, blocks, members, stored, state_of_update, fuse)
        functions[name] = FunctionPlan(name, blocks, members, stored, cm, rec, memory, loops)

    states = [g.node(r).attrs["update"] for seg in low.segments for r in seg.states]
    rec = plan_recompute(g, s, recompute, bw is not None,
                         keep_always=set(low.losses) | set(low.outputs.values()))
    if vjp:
        plan("vjp", s.forward_blocks + s.backward_blocks, s.members, set(s.stored), rec)
        return ModulePlan(state_of_update, seg_T, rec, functions)
    for name, roots, blocks in (
            ("forward", list(low.outputs.values()) + states,
             [b for b in s.forward_blocks if b.kind != Kind.TAIL]),
            ("loss", list(low.losses), list(s.forward_blocks))):
        needed = {n for n in live_nodes(g, roots) if not g.node(n).grad}
        members = {b: [n for n in ns if n in needed] for b, ns in s.members.items()}
        plan(name, blocks, members, _stored_forward(g, s, needed, state_of_update), none)
    if bw is not None:
        plan("loss_and_grad", s.forward_blocks + s.backward_blocks, s.members,
             set(s.stored), rec)
    return ModulePlan(state_of_update, seg_T, rec, functions)

"""The memory plan: where every value of a generated function lives.

Nothing is allocated inside a time loop:

- a state has one (T+1, N, ...) buffer, its update writes step t+1 of it
  (`StateRow`);
- a loop value read outside its step (by a batched stage or the backward
  pass) is written straight into its (T, N, ...) buffer (`SeqRow`); one
  that feeds a weight gradient is kept channel-major, (C, T, N, H, W), when
  the backend's weight-gradient GEMM wants it so (plan.py asks);
- every other loop value lives in a work buffer of one step (`Work`),
  allocated before the loop and reused, across steps and between values
  whose lives do not overlap (a linear scan over the loop body; an
  elementwise op may write over an operand that dies there);
- the parts of a concat (the gates' gradients that make up dz) are written
  into their channels of the concat's buffer (`Channels`);
- a cotangent carried to the previous step has a buffer of its own
  (`Carried`).

Outside the loops, (T, N, ...) buffers whose lives do not overlap share one
arena per time axis (`FunctionMemory.place_of`): the backend keeps the
arenas between calls, so a training step allocates none of them.

Everything here is a value computed from the graph and the schedule; the
emitter (codegen.py) renders places as expressions and never decides one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .ir import Graph
from .ops import OPS
from .peel import ALIAS, COMPUTE, Variant, peel
from .schedule import LOOP_KINDS, Block, Kind, Schedule


# ---------------------------------------------------------------- places in a loop
@dataclass(frozen=True)
class StateRow:
    """Row t + 1 of a state's (T + 1, N, ...) buffer (the state read `read`)."""

    read: str


@dataclass(frozen=True)
class SeqRow:
    """Row t of a stored value's (T, N, ...) buffer."""

    node: str


@dataclass(frozen=True)
class Carried:
    """The buffer of a cotangent carried to the previous step."""

    node: str


@dataclass(frozen=True)
class Work:
    """Work buffer number `index` of its loop (named when rendered)."""

    index: int


@dataclass(frozen=True)
class Channels:
    """Channels [a, b) of another place: a part of a concat."""

    parent: object
    a: int
    b: int


Place = StateRow | SeqRow | Carried | Work | Channels


def indexed(place) -> bool:
    """A place that is a row or a slice of a buffer (assigned with `d = ...`)."""
    return isinstance(place, (StateRow, SeqRow, Channels))


# ---------------------------------------------------------------- one function
@dataclass
class FunctionMemory:
    """Liveness and the arenas of one generated function's batched (T, N, ...) values."""

    last_read: dict[str, int]  # value -> index of the last block that reads it
    present: set[str]  # the values this function computes
    keep: set[str]  # what it returns: never freed, never overwritten
    in_place: dict[str, int]  # batched elementwise value -> operand it overwrites
    place_of: dict[str, tuple[str, int]]  # value -> (time length, offset) in its arena
    arena_size: dict[str, int]  # time length -> elements per step and sample


def _size(g: Graph, n: str) -> int:
    size = 1
    for d in g.node(n).shape:
        size *= int(d)
    return size


def _read_through_views(g: Graph, last_read: dict, present: set, i: str, k: int) -> None:
    while i in present:
        last_read[i] = max(last_read.get(i, -1), k)
        if not OPS[g.node(i).op].view:
            break
        i = g.node(i).inputs[0]  # read through a view: its operand is read


def liveness(g: Graph, blocks: list[Block], members: dict, stored: set[str],
             windows: dict, window_values: dict) -> tuple[dict[str, int], set[str]]:
    """Where each value is last read (a block index), so its memory can go after it.

    A loop recomputed window by window in its backward loop (windows: loop ->
    its `recompute.Window`) reads its operands, and writes its stored values,
    until that backward loop ends.
    """
    index = {b: k for k, b in enumerate(blocks)}
    last_read: dict[str, int] = {}
    present = {n for b in blocks for n in members.get(b, [])}
    for b in blocks:
        for n in members.get(b, []):
            for i in g.node(n).inputs:
                _read_through_views(g, last_read, present, i, index[b])
    for L, win in windows.items():
        if L not in index or win.partner not in index:
            continue
        end = index[win.partner]
        inside = set(members.get(L, []))
        inside |= {n for n, L2 in window_values.items() if L2 == L}
        for n in inside:
            reads = [n] if n in stored else []
            reads += [i for i in g.node(n).inputs if i not in inside]
            for i in reads:
                _read_through_views(g, last_read, present, i, end)
    return last_read, present


def overwritable(g: Graph, s: Schedule, n: str, keep: set[str]) -> int | None:
    """An operand of a batched elementwise op that its result may overwrite, if any.

    One made by this function in a batched stage, read by nothing else, of
    the result's shape (a conv's output before the bias add).
    """
    node = g.node(n)
    if node.seg is None or not OPS[node.op].writes_into or n in keep:
        return None  # (what the function returns gets memory of its own)
    for k in OPS[node.op].alias:
        if k >= len(node.inputs):
            continue
        i = node.inputs[k]
        src = g.node(i)
        if src.seg is None or OPS[src.op].view or not OPS[src.op].owned or \
                s.block_of[i].kind in LOOP_KINDS + (Kind.DATA, Kind.STATIC) or \
                i in keep or g.consumers(i) != [n] or tuple(src.shape) != tuple(node.shape):
            continue
        return k
    return None


def plan_function(g: Graph, s: Schedule, blocks: list[Block], members: dict,
                  stored: set[str], keep: set[str], time_of, ring: dict, windows: dict,
                  window_values: dict) -> FunctionMemory:
    """The memory of one function: liveness, in-place batched ops and the arenas.

    Slots: (T, ...) buffers of loop values whose lives do not overlap share
    memory (layer 1's dz, freed after its weight gradient, is layer 0's dz),
    and so do the batched values written with out= (a conv's output over all
    steps: its memory is the backward pass's dz, which only comes to life
    after it is dead). One arena per time axis, T*N*A elements; each buffer a
    range of it: the largest first, each at the lowest offset clear of every
    buffer whose life overlaps its own. `time_of(n)` is a value's time length
    (`T_x`), None for a value without time.
    """
    last_read, present = liveness(g, blocks, members, stored, windows, window_values)
    in_place = {n: k for b in blocks if b.kind not in LOOP_KINDS
                for n in members.get(b, [])
                if (k := overwritable(g, s, n, keep)) is not None}
    root_of: dict[str, str] = {}
    lives: dict[str, list] = {}  # root value -> [(T, elements per step), first, last block]
    for k, b in enumerate(blocks):
        for n in members.get(b, []):
            node = g.node(n)
            if b.kind in LOOP_KINDS:
                if n in stored and n not in ring:
                    root_of[n] = n
                    lives[n] = [(time_of(n), _size(g, n)), k, max(k, last_read.get(n, k))]
                continue
            if time_of(n) is None or not OPS[node.op].owned or OPS[node.op].view \
                    or n in window_values or not OPS[node.op].writes_into or n in keep:
                continue
            over = in_place.get(n)
            if over is not None and node.inputs[over] in root_of:
                r = root_of[node.inputs[over]]  # in place: the operand's memory
                root_of[n] = r
                lives[r][2] = max(lives[r][2], last_read.get(n, k))
            else:
                root_of[n] = n
                lives[n] = [(time_of(n), _size(g, n)), k, max(k, last_read.get(n, k))]
    placed: dict[str, list] = {}
    offset_of: dict[str, tuple] = {}
    for r, ((T, size), start, end) in sorted(lives.items(),
                                             key=lambda kv: (-kv[1][0][1], kv[1][1], kv[0])):
        here = placed.setdefault(T, [])
        busy = sorted((o, o + sz) for o, sz, a, b in here if not (b < start or end < a))
        off = 0
        for lo, hi in busy:
            if off + size <= lo:
                break
            off = max(off, hi)
        here.append((off, size, start, end))
        offset_of[r] = (T, off)
    return FunctionMemory(
        last_read=last_read, present=present, keep=keep, in_place=in_place,
        place_of={n: offset_of[r] for n, r in root_of.items()},
        arena_size={T: max(o + sz for o, sz, _, _ in here) for T, here in placed.items()})


# ---------------------------------------------------------------- one loop
@dataclass
class LoopMemory:
    """The memory plan of one loop block and the variants of its body (peel.py).

    Places are fixed for state updates, stored values, cotangents carried to
    the previous step and the parts of a concat written in place; everything
    else that can be written with `out=` gets a work buffer by a linear scan
    over the body (per variant, over buffers shared by all variants of the
    loop).
    """

    block: Block
    body: list[str]  # the loop's nodes in order, less its sources
    sources: list[str]  # state reads (forward) or carries (backward)
    fixed: dict[str, object]  # node -> StateRow | SeqRow | Carried
    fresh: set[str]  # allocated anew every step
    read_ct_of_carry: dict[str, str]  # carry -> the cotangent of its read, made here
    part_of: dict[str, tuple[str, int, int]]  # concat part -> (concat, a, b)
    buffers: list[tuple[Work, tuple]] = field(default_factory=list)  # (buffer, shape)
    held: dict[Work, list[tuple[bool, str]]] = field(default_factory=dict)  # (main?, value)
    variants: dict[str, Variant] = field(default_factory=dict)  # "first", "general", ...
    zero: set[str] = field(default_factory=set)  # backward: carries nothing arrives at
    never: set[str] = field(default_factory=set)  # backward: carries with no cotangent
    kernels: dict[str, list] = field(default_factory=dict)  # variant -> its fused kernels
    fuse: bool = False  # group each variant's elementwise work into kernels (fuse.py)
    pos: dict[str, int] = field(init=False)  # node -> its place in the body

    def __post_init__(self):
        self.pos = {n: i for i, n in enumerate(self.body)}

    @property
    def parents(self) -> set[str]:
        return {v[0] for v in self.part_of.values()}


def plan_loop(g: Graph, block: Block, nodes: list[str], stored: set[str],
              state_of_update: dict[str, str], read_cts: dict[str, str]) -> LoopMemory:
    """The fixed places of loop block `block` (its variants come from `add_variant`)."""
    backward = block.kind == Kind.BLOOP
    body = [n for n in nodes if g.node(n).op not in ("state", "carry")]
    sources = [n for n in nodes if g.node(n).op in ("state", "carry")]
    pos = {n: i for i, n in enumerate(body)}
    fixed: dict[str, object] = {}
    fresh: set[str] = set()
    read_ct_of_carry: dict[str, str] = {}
    if backward:
        for c in sources:
            ct = read_cts.get(g.node(c).attrs["read"])
            if ct is not None and ct in pos:
                read_ct_of_carry[c] = ct
    for n in body:
        if not backward and n in state_of_update:
            fixed[n] = StateRow(state_of_update[n])
        elif n in stored:
            fixed[n] = SeqRow(n)
    for c, ct in read_ct_of_carry.items():
        if ct in fixed:
            continue  # a (T, ...) slot is not overwritten by the next step
        uses = [pos[u] for u in g.consumers(c) if u in pos]
        op = OPS[g.node(ct).op]
        if op.writes_into and not op.view and (not uses or max(uses) < pos[ct]):
            fixed[ct] = Carried(ct)
        else:
            # the carry is read after its new value is made, or it is a view: a
            # fresh array every step keeps the previous step's value intact
            x = ct
            while x in pos and OPS[g.node(x).op].view:
                x = g.node(x).inputs[0]
            if x in pos and x not in fixed:
                fresh.add(x)
            if ct not in fixed:
                fresh.add(ct)
    part_of: dict[str, tuple[str, int, int]] = {}  # parts written into a concat's channels
    for n in body:
        node = g.node(n)
        if node.op != "concat" or n in fresh or len(set(node.inputs)) != len(node.inputs):
            continue
        parts, start = {}, 0
        for p in node.inputs:
            pn = g.node(p)
            if p not in pos or not OPS[pn.op].writes_into or p in fixed or \
                    p in fresh or g.consumers(p) != [n]:
                parts = None
                break
            parts[p] = (n, start, start + pn.shape[0])
            start += pn.shape[0]
        if parts:
            part_of.update(parts)
    return LoopMemory(block, body, sources, fixed, fresh, read_ct_of_carry, part_of)


def add_variant(g: Graph, lm: LoopMemory, key: str, zero_sources: set[str],
                roots: set[str], main: bool = False) -> Variant:
    """The body peeled for `zero_sources` (peel.py), with its places; `main`: the body
    of the loop's general steps (its work buffers are named for it)."""
    v = peel(g, lm.body, zero_sources, roots)
    v.main = main
    inside = set()  # fused members no one reads outside their kernel: never in memory
    if lm.fuse:
        from .fuse import kernels

        b = lm.block
        lm.kernels[key] = kernels(g, lm, v, prefix=f"k_{b.kind}{b.seg}_{b.k}_{key}_")
        inside = {n for k in lm.kernels[key] for n, op, *_ in k.body
                  if op != "const" and n not in k.outputs}
    v.dest, v.retargeted = _assign(g, lm, v, inside)
    lm.variants[key] = v
    return v


def writes_memory(g: Graph, lm: LoopMemory, v: Variant, n: str) -> bool:
    """Might n write into memory the loop holds (a work buffer or a fixed place)?"""
    op = OPS[g.node(n).op]
    return n in lm.fixed or n in lm.part_of or (
        v.status.get(n) == COMPUTE and not op.view and op.writes_into and n not in lm.fresh)


def _temp(g: Graph, lm: LoopMemory, v: Variant, n: str) -> bool:
    """Does n need a work buffer (computed here, written with out=, no fixed place)?"""
    op = OPS[g.node(n).op]
    return (n in v.live and v.status[n] == COMPUTE and not op.view and op.writes_into
            and n not in lm.fixed and n not in lm.part_of and n not in lm.fresh)


def _operands(v: Variant, u: str) -> list[str]:
    """What node u of variant v reads: its alias, or its arguments."""
    return [v.alias[u]] if v.status[u] == ALIAS else \
        v.args[u] if v.status[u] == COMPUTE else []


def _assign(g: Graph, lm: LoopMemory, v: Variant, inside: set[str] = frozenset()
            ) -> tuple[dict[str, object], set[str]]:
    """Places of one variant: fixed ones, then work buffers by linear scan (none for the
    values `inside` a fused kernel)."""
    pos = lm.pos
    live = [n for n in lm.body if n in v.live]
    temps = [n for n in live if _temp(g, lm, v, n) and n not in inside]
    retarget = _retargets(lm, v, live, temps)
    temps = [n for n in temps if n not in retarget]

    def root(x):
        x = v.resolve(x)
        while x in pos:
            if x in lm.part_of:
                x = lm.part_of[x][0]
            elif OPS[g.node(x).op].view and v.status.get(x) == COMPUTE:
                x = v.resolve(g.node(x).inputs[0])
            else:
                break
        return x

    # a cotangent carried to the previous step must not sit in a work buffer (the next
    # step reuses those before it reads the carry): what it is a view of is allocated
    v.fresh = set(lm.fresh)
    for ct in lm.read_ct_of_carry.values():
        if ct in v.live and ct not in lm.fixed:
            r = root(ct)
            if r in temps and r != ct:
                temps.remove(r)
                v.fresh.add(r)
    last: dict[str, int] = {}
    for u in live:
        for i in _operands(v, u):
            r = root(i)
            last[r] = max(last.get(r, -1), pos[u])
    where = _scan(g, lm, v, temps, last, root)
    dest: dict[str, object] = {n: where[n] for n in temps}
    dest.update(lm.fixed)
    for m, n in retarget.items():  # parents first: a part's place is in its parent's
        if n not in lm.part_of:
            dest[m] = dest[n]
    for p, (parent, a, b) in lm.part_of.items():
        if parent in dest and parent not in v.fresh:
            dest[p] = Channels(dest[parent], a, b)
    for m, n in retarget.items():
        if n in lm.part_of and n in dest:
            dest[m] = dest[n]
    return dest, set(retarget.values())


def _retargets(lm: LoopMemory, v: Variant, live: list[str], temps: list[str]
               ) -> dict[str, str]:
    """A value only seen through a fixed place it equals is made there: {value: the
    alias with the fixed place}."""
    direct: dict[str, set] = {}  # users naming a value itself, not an alias of it
    for u in live:
        for i in _operands(v, u):
            direct.setdefault(i, set()).add(u)
    retarget: dict[str, str] = {}
    for n in live:
        if v.status[n] == ALIAS and (n in lm.fixed or n in lm.part_of):
            m = v.alias[n]
            if m in temps and direct.get(m) == {n} and m not in retarget:
                retarget[m] = n
    return retarget


def _scan(g: Graph, lm: LoopMemory, v: Variant, temps: list[str], last: dict, root
          ) -> dict[str, Work]:
    """Work buffers for `temps` by a linear scan over the body: a value takes over an
    operand's buffer where the operand dies (in place), or a free buffer of its shape,
    or a new one (shared with the loop's other variants)."""
    pos = lm.pos
    start = {n: pos[n] for n in temps}
    for p, (parent, _, _) in lm.part_of.items():
        if parent in start and p in v.live:
            start[parent] = min(start[parent], pos[p])
    owner: dict[Work, str] = {}  # buffer -> the value in it now
    where: dict[str, Work] = {}  # value -> its buffer
    by_start: dict[int, list[str]] = {}
    for n in temps:
        by_start.setdefault(start[n], []).append(n)
    for p, n0 in enumerate(lm.body):
        for n in by_start.get(p, []):
            node = g.node(n)
            shape = tuple(node.shape)
            chosen = None
            if n == n0:  # in place: over an operand that dies here
                for k in OPS[node.op].alias:
                    if k >= len(v.args[n]):
                        continue
                    i = v.resolve(v.args[n][k])
                    if i in where and root(i) == i and last.get(i) == p and \
                            tuple(g.node(i).shape) == shape and owner.get(where[i]) == i:
                        chosen = where[i]
                        break
            if chosen is None:
                free = [b for b, s in lm.buffers if s == shape and b not in owner]
                if free:
                    chosen = free[0]
                else:
                    chosen = Work(len(lm.buffers))
                    lm.buffers.append((chosen, shape))
            owner[chosen] = n
            lm.held.setdefault(chosen, []).append((v.main, n))
            where[n] = chosen
        for b, val in list(owner.items()):
            if last.get(val, start.get(val, p)) <= p:
                del owner[b]
    return where

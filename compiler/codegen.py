"""Emit a readable, standalone Python module from a scheduled graph.

One statement per node, named by compiler/naming.py's fixed patterns (`h_enc`,
`dh_enc`, `add_z_o_enc`, `work_f_enc`), with a comment quoting the `.cell` line
each group of statements comes from. The
module imports only NumPy and `convc.runtime`; the array module and the
convolution come from the backend passed in, so the same code runs on NumPy
and CuPy.

Memory plan. Nothing is allocated inside a time loop:

- a state has one (T+1, N, ...) buffer, its update writes step t+1 of it;
- a loop value read outside its step (by a batched stage or the backward
  pass) is written straight into its (T, N, ...) buffer (`h_seq[t]`); one
  that feeds a weight gradient is kept channel-major, (C, T, N, H, W), so
  the gradient's GEMM reads it without a transpose;
- every other loop value lives in a work buffer of one step, allocated
  before the loop and reused, across steps and between values whose lives do
  not overlap (a linear scan over the loop body; an elementwise op may write
  over an operand that dies there);
- the parts of a concat (the gates' gradients that make up dz) are written
  into their channels of the concat's buffer;
- a cotangent carried to the previous step has a buffer of its own.
Ops write into their buffer with `out=` (`xp.add(a, b, out=buf)`,
`rt.conv2d(..., out=buf)`). Batched stages allocate their results.

Peeling. The first forward step (states start at zero: `f * c[t-1]` and
the recurrent convolution vanish), the last backward step (no cotangent
arrives from after it) and the backward step t = 0 (nothing goes on to
t = -1 except the initial states' gradients) are emitted as their own copies
of the loop body with those zeros folded away and dead work dropped.

recompute=K. loss_and_grad runs a forward loop in windows of K steps (a
local function `<loop>_steps(start, stop)`); what only its backward loop
reads is kept for one window (rows t % K) and each state's value at the start
of every window is checkpointed; the backward loop, at the last step of each
window, restores the checkpoint and runs the window again.

Arguments. Each entry point's first statement is `rt.check_call(MODEL, name, ...)`
(runtime/calls.py): one check of params, inputs, targets, state= and steps=
against the MODEL table, per call and never per step, so a wrong shape is an
error naming the argument rather than a failure deep in a GEMM.

Every buffer comes from `rt.empty`, whose poison mode fills it with NaN, and
is written whole before it is read; gradients are never accumulated into a
buffer that was not first assigned (tests/test_codegen.py walks the
generated code to check).
"""
from __future__ import annotations

import re

from convc import __version__
from convc.spec.diagnostics import SOURCES

from .autodiff import Backward
from .ir import Graph
from .lower import Lowered
from .naming import Names
from .ops import OPS, float_source, node_flops
from .peel import ALIAS, COMPUTE, ZERO, Variant, peel
from .schedule import LOOP_KINDS, Schedule

class _Out:
    def __init__(self):
        self.lines: list[str] = []
        self.level = 0
        self.last_loc = None

    def __call__(self, text: str = "") -> None:
        self.lines.append(("    " * self.level + text) if text else "")

    def indent(self):
        self.level += 1

    def dedent(self):
        self.level -= 1

    def loc_comment(self, node) -> None:
        """A comment with the .cell line, when the line changes."""
        loc = node.loc
        key = (loc.file, loc.line)
        if key == self.last_loc or loc.line <= 0:
            return
        self.last_loc = key
        src = SOURCES.line(loc.file, loc.line)
        text = f"{_short(loc.file)}:{loc.line}"
        if src:
            text += "  " + src.strip()
        self(_comment(text[:96]))


def _short(path: str) -> str:
    import os
    return os.path.basename(path)




def _escaped(c: str) -> str:
    """A character as a string literal writes it: `\\n`, `\\x00`, `\\u2028`."""
    return repr(c)[1:-1]


def _printable(text: str) -> str:
    """Outside text (a file name, a .cell line) with every character that is not
    printable written as its escape: no line break (\\n, \\r, \\f, \\x85, \\u2028 ...),
    NUL or terminal control reaches the generated source raw."""
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


def _comment(text: str) -> str:
    """A `#` comment holding outside text. Python ends a comment only at a line break,
    and _printable leaves none, so the text cannot start a statement."""
    return "# " + _printable(text)


def _in_docstring(text: str) -> str:
    """Outside text (a file name, a spec's docstring) as the body of a line of the
    module's triple-quoted docstring, which reads back as exactly that text.

    Backslashes are doubled, a character that is not printable becomes its escape,
    and in a run of double quotes every quote after the first is escaped (and a
    quote at the end), so the body never holds two quotes in a row: it cannot
    close the docstring, whatever the text is.
    """
    out: list[str] = []
    for c in text:
        if c == "\\":
            out.append("\\\\")
        elif c == '"' and out and out[-1] == '"':
            out.append('\\"')
        elif not c.isprintable():
            out.append(_escaped(c))
        else:
            out.append(c)
    if out and out[-1] == '"':
        out[-1] = '\\"'
    return "".join(out)



class _NonFinite(float):
    """inf or nan in the MODEL table: pprint writes it with float_source."""

    def __repr__(self) -> str:
        return float_source(self)


def _literal(value):
    """The MODEL table with nothing in it but Python literals: strings (pprint writes
    them with repr), numbers, booleans, None and containers of them. Anything else
    would be written with its own repr, which is not a literal, so it is refused."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if value - value == 0 else _NonFinite(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_literal(v) for v in value)
    if isinstance(value, dict):
        return {_literal(k): _literal(v) for k, v in value.items()}
    raise TypeError(f"MODEL holds a {type(value).__name__}, which has no literal: {value!r}")


def _step_shape(shape) -> str:
    """`(N, C, H, W)` for a per-step value of per-sample shape (C, H, W)."""
    return "(" + ", ".join(["N"] + [str(d) for d in shape]) + ")"


def _seq_shape(T: str, shape) -> str:
    return "(" + ", ".join([T, "N"] + [str(d) for d in shape]) + ")"


# ---------------------------------------------------------------- writing into a buffer
def _writes_into(op: str) -> bool:
    return OPS[op].writes_into


def _into(op: str, args: list[str], attrs: dict, out: str) -> str:
    """The statement's right-hand side that computes `op(args)` into `out` (ops.py `into`)."""
    return OPS[op].into_code(args, attrs, out)


def _view(op: str) -> bool:
    return OPS[op].view


def _owned(op: str) -> bool:
    """False for values the function does not own (or keeps for its caller)."""
    return OPS[op].owned


def _sub(dest: str, a: int, b: int) -> str:
    """Channels [a, b) of a per-step buffer expression."""
    if dest.endswith("]"):
        return f"{dest[:-1]}, :, {a}:{b}]"
    return f"{dest}[:, {a}:{b}]"


class Generator:
    def __init__(self, low: Lowered, bw: Backward | None, sched: Schedule,
                 debug_nans: bool = False, recompute: int | None = None):
        self.debug_nans = debug_nans
        if recompute is not None and (not isinstance(recompute, int) or recompute < 1):
            raise ValueError(f"recompute must be a whole number of steps >= 1, not {recompute!r}")
        self.recompute = recompute
        self.ring: dict[str, int] = {}  # in loss_and_grad: values kept for K steps only
        self.windows: dict[tuple, dict] = {}  # loop block -> its recomputation
        self.window_values: dict[str, tuple] = {}  # batched values made window by window
        self.low = low
        self.g: Graph = low.graph
        self.bw = bw
        self.s = sched
        self.state_of_update = {}  # update node -> state read
        for n in self.g.order():
            node = self.g.node(n)
            if node.op == "state":
                self.state_of_update[node.attrs["update"]] = n
        self.seg_T = {seg.id: f"T_{seg.axis}" for seg in low.segments}
        self.stored: set[str] = set(sched.stored)  # of the function being emitted
        self.channel_major: set[str] = set()
        self.names = Names(self.g, low.loc_owner, low.cells)  # every variable's name

    # ------------------------------------------------------------ names
    def v(self, nid: str) -> str:
        """The variable holding node nid's value (naming.py)."""
        return self.names[nid]

    def buf(self, read: str) -> str:
        """The (T+1, N, ...) buffer of a state, named after its update."""
        return self.v(self.g.node(read).attrs["update"]) + "_buf"

    def is_view_of_step(self, nid: str) -> bool:
        """A slice of a loop value, read outside its step through its operand's buffer."""
        node = self.g.node(nid)
        return (node.op == "slice" and self.s.block_of[nid][0] in LOOP_KINDS
                and nid not in self.stored and nid not in self.state_of_update)

    def step_ix(self, nid: str, plus: int = 0) -> str:
        """The row of nid's buffer that holds step t (plus=1: a state's update).

        A value kept for one window of K steps (recompute=K) is in row t % K.
        """
        K = self.ring.get(nid)
        t = "t" if K is None else f"t % {K}"
        return f"{t} + {plus}" if plus else t

    def ckpt(self, read: str) -> str:
        return self.v(self.g.node(read).attrs["update"]) + "_ckpt"

    def batched(self, nid: str) -> str:
        """Expression for a value over all its steps, (T, N, ...) (or static)."""
        node = self.g.node(nid)
        b = self.s.block_of[nid]
        if nid in self.ring or self.state_of_update.get(nid) in self.ring:
            raise AssertionError(f"{nid} is kept for one window of steps only")
        if node.op == "state":
            return f"{self.buf(nid)}[:-1]"
        if b[0] == "loop" and nid in self.state_of_update:
            return f"{self.buf(self.state_of_update[nid])}[1:]"
        if b[0] in LOOP_KINDS:
            if self.is_view_of_step(nid):
                return OPS["slice"].code([self.batched(node.inputs[0])], node.attrs)
            if nid not in self.stored:
                raise AssertionError(f"{nid} is read outside its loop but not stored")
            return f"{self.v(nid)}_seq"
        return self.v(nid)

    def at_step(self, nid: str, ctx: tuple) -> str:
        """Expression for a value at step t, seen from inside loop block `ctx`."""
        node = self.g.node(nid)
        b = self.s.block_of[nid]
        if node.seg is None or b == ctx:
            return self.v(nid)
        if nid in self.window_values:
            return f"{self.v(nid)}[t - start]"
        if node.op == "state":
            return f"{self.buf(nid)}[{self.step_ix(nid)}]"
        if b[0] == "loop" and nid in self.state_of_update:
            read = self.state_of_update[nid]
            return f"{self.buf(read)}[{self.step_ix(read, 1)}]"
        if b[0] in LOOP_KINDS and self.is_view_of_step(nid):
            return OPS["slice"].code([self.at_step(node.inputs[0], ctx)], node.attrs)
        if nid in self.ring:
            return f"{self.v(nid)}_seq[{self.step_ix(nid)}]"
        return f"{self.batched(nid)}[t]"

    def check(self, o: _Out, nid: str, expr: str, step: bool, backward: bool) -> None:
        """With debug_nans: stop at the first non-finite value, saying where it came from."""
        if not self.debug_nans:
            return
        node = self.g.node(nid)
        where = f"{node.loc.file}:{node.loc.line}"
        o(f"rt.check_finite({expr}, {self.v(nid)!r}, {where!r}, {'t' if step else 'None'}, "
          f"{'backward' if backward else 'forward'!r})")

    def keep_arg(self, slot) -> str:
        """rt.empty's `keep=`: the buffer is kept by the backend between calls, in this slot."""
        return f"keep=(B, {self.fn_name!r}, {slot!r})"

    def seq_alloc(self, o: _Out, n: str, T: str) -> None:
        """The (T, N, ...) buffer of a stored loop value (in its place of the memory plan)."""
        shape = tuple(self.g.node(n).shape)
        name = self.v(n)
        if n in self.ring:  # one window of steps, rows t % K
            T = self.seg_T[self.g.node(n).seg]
            o(f"{name}_seq = rt.empty(xp, {_seq_shape(f'min({self.ring[n]}, {T})', shape)}, "
              f"dtype, {self.keep_arg(name + '_seq')})  # steps of one window")
            return
        keep = self.at_arg(n) if n in self.place_of else "keep=None"
        if n in self.channel_major and len(shape) == 3:
            o(f"{name}_buf = rt.empty(xp, ({shape[0]}, {T}, N, {shape[1]}, {shape[2]}), dtype, "
              f"{keep})")
            o(f"{name}_seq = {name}_buf.transpose(1, 2, 0, 3, 4)  # channel-major: feeds a "
              "weight gradient")
        else:
            o(f"{name}_seq = rt.empty(xp, {_seq_shape(T, shape)}, dtype, {keep})")

    # ------------------------------------------------------------ module
    def module(self) -> str:
        self.ring_plan = self.window_plan()
        fns = _Out()  # first: MODEL reports the memory plan they make
        self.forward_fn(fns)
        fns()
        fns()
        self.loss_fn(fns)
        fns()
        fns()
        self.loss_and_grad_fn(fns)
        o = _Out()
        low = self.low
        doc = (low.doc or "").strip()
        o('"""' + _in_docstring(f"{low.name}: generated by convc {__version__} from "
                                f"{_short(low.file)}."))
        o()
        if doc:
            for line in doc.splitlines():
                o(_in_docstring(line.rstrip()))
            o()
        for inst, cell in sorted(low.cells.items()):
            cdoc = (low.cell_docs.get(cell) or "").strip().splitlines()
            o(_in_docstring(f"{inst}: {cell}" + (f" -- {cdoc[0]}" if cdoc else "")))
        o()
        o(_in_docstring(f"Regenerate with `convc compile {_short(low.file)}`; "
                        "edits here are lost."))
        o('"""')
        o("import numpy as np")
        o()
        o("from convc.runtime import kernels as rt")
        o("from convc.runtime import model as _model")
        o()
        import pprint
        for line in ("MODEL = " + pprint.pformat(_literal(self.model_meta()), width=99,
                                                 sort_dicts=False)).splitlines():
            o(line)
        o()
        o("PARAMS = MODEL['params']")
        o()
        o()
        o("def init_params(seed=0, dtype='float32', backend=None):")
        o('    """Initial parameters (glorot kernels, constant biases), seeded."""')
        o("    return _model.init_params(PARAMS, seed=seed, dtype=dtype, backend=backend)")
        o()
        o()
        o.lines.extend(fns.lines)
        o()
        o()
        o("def sgd_step(params, inputs, targets, lr, **options):")
        o('    """One plain SGD step in place; returns the loss before the update."""')
        o("    loss, grads, _ = loss_and_grad(params, inputs, targets, **options)")
        o("    for name in sorted(params):")
        o("        params[name] -= lr * grads[name]")
        o("    return loss")
        return "\n".join(o.lines) + "\n"

    def model_meta(self) -> dict:
        low = self.low
        g = self.g
        params = {}
        for name in sorted(low.params):
            p = low.params[name]
            node = g.node(p.node)
            init = p.init
            params[name] = dict(shape=tuple(node.shape), kind=p.kind,
                                init=list(init) if isinstance(init, tuple) else init)
        states = {}
        for seg in low.segments:
            for r in seg.states:
                node = g.node(r)
                states[node.attrs["state"]] = dict(shape=tuple(node.shape), loop=seg.id,
                                                   init=node.attrs["init"])
        return dict(
            name=low.name, file=_short(low.file), task=low.task,
            inputs={n: tuple(g.node(i).shape) for n, i in low.inputs.items()},
            targets={n: tuple(g.node(i).shape) for n, i in low.targets.items()},
            outputs={n: tuple(g.node(i).shape) for n, i in low.outputs.items()},
            axes=dict(sorted(low.axis_of.items())),
            params=params, states=states, memory=self.memory_meta(),
            loops=[dict(id=s.id, axis=s.axis, cells=list(s.cells)) for s in low.segments],
            train=dict(low.train), loss=[g.node(n).op for n in low.losses],
            cells=dict(low.cells),
        )

    # ------------------------------------------------------------ prologue
    def prologue(self, o: _Out, with_targets: bool) -> None:
        low = self.low
        o("B = backend if backend is not None else _model.default_backend()")
        o("xp = B.xp")
        first = sorted(low.params)[0] if low.params else None
        o(f"dtype = params[{first!r}].dtype" if first else "dtype = np.float32")
        for name in sorted(low.params):
            o(f"{self.v(low.params[name].node)} = params[{name!r}]")
        for name, nid in low.inputs.items():
            o(f"{self.v(nid)} = rt.time_major({'inputs'}[{name!r}], dtype, xp)")
        if with_targets:
            for name, nid in low.targets.items():
                o(f"{self.v(nid)} = rt.time_major(targets[{name!r}], dtype, xp)")
        # time lengths per axis, batch size
        axes = {}
        for name in list(low.inputs) + (list(low.targets) if with_targets else []):
            axes.setdefault(low.axis_of[name], name)
        nodes = dict(low.inputs, **(low.targets if with_targets else {}))
        for ax in sorted({s.axis for s in low.segments} | set(axes)):
            if ax in axes:
                o(f"T_{ax} = {self.v(nodes[axes[ax]])}.shape[0]")
            else:
                o(f"T_{ax} = int(steps[{ax!r}] if isinstance(steps, dict) else steps)")
        src = next(iter(nodes.values()))
        o(f"N = {self.v(src)}.shape[1]")
        # (every shape and time length was checked by rt.check_call, the first statement)

    # ------------------------------------------------------------ blocks
    def emit_block(self, o: _Out, block: tuple, members: dict, state_arg: bool = True) -> None:
        kind, seg, k = block
        nodes = members.get(block, [])
        if kind == "loop":
            if nodes:
                self.emit_loop(o, block, nodes, state_arg)
            return
        if kind == "bloop":
            if nodes:
                self.emit_bloop(o, block, nodes)
            return
        emitted = False
        for n in nodes:
            node = self.g.node(n)
            if node.op in ("input", "param", "state", "carry", "carry_out") or \
                    n in self.window_values:
                continue
            if not emitted:
                o()
                o(f"# {_BLOCK_TITLES[kind]}" + (f" ({seg})" if seg else ""))
                o.last_loc = None
                emitted = True
            o.loc_comment(node)
            args = [self.batched(i) for i in node.inputs]
            over = self.overwritable(n)
            name = self.v(n)
            if over is not None:
                o(f"{name} = {_into(node.op, args, node.attrs, args[over])}  # in place: "
                  f"{self.v(node.inputs[over])} is not read again")
            elif n in self.place_of:
                shape = _seq_shape(self.batched_t(n), node.shape)
                buf = f"rt.empty(xp, {shape}, dtype, {self.at_arg(n)})"
                o(f"{name} = {_into(node.op, args, node.attrs, buf)}")
            else:
                o(f"{name} = {OPS[node.op].code(args, node.attrs)}")
            self.check(o, n, name, step=False, backward=node.grad)

    def overwritable(self, n: str) -> int | None:
        """An operand of a batched elementwise op that its result may overwrite, if any.

        One made by this function in a batched stage, read by nothing else, of
        the result's shape (a conv's output before the bias add).
        """
        g = self.g
        node = g.node(n)
        if node.seg is None or not _writes_into(node.op) or n in self.keep:
            return None  # (what the function returns gets memory of its own)
        for k in OPS[node.op].alias:
            if k >= len(node.inputs):
                continue
            i = node.inputs[k]
            src = g.node(i)
            if src.seg is None or _view(src.op) or not _owned(src.op) or \
                    self.s.block_of[i][0] in LOOP_KINDS + ("data", "static") or \
                    i in self.keep or g.consumers(i) != [n] or \
                    tuple(src.shape) != tuple(node.shape):
                continue
            return k
        return None

    def begin_blocks(self, blocks: list[tuple], members: dict) -> None:
        """Where each value is last read, so its memory can be let go after that block."""
        g = self.g
        index = {b: k for k, b in enumerate(blocks)}
        self.blocks_emitted = blocks
        self.last_read: dict[str, int] = {}
        present = {n for b in blocks for n in members.get(b, [])}
        for b in blocks:
            for n in members.get(b, []):
                for i in g.node(n).inputs:
                    while i in present:
                        self.last_read[i] = max(self.last_read.get(i, -1), index[b])
                        if not _view(g.node(i).op):
                            break
                        i = g.node(i).inputs[0]  # read through a view: its operand is read
        # a loop recomputed window by window in its backward loop reads its operands (and
        # writes its stored values) until that backward loop ends
        for L, win in self.windows.items():
            if L not in index or win["partner"] not in index:
                continue
            end = index[win["partner"]]
            inside = set(members.get(L, []))
            inside |= {n for n, L2 in self.window_values.items() if L2 == L}
            for n in inside:
                reads = [n] if n in self.stored else []
                reads += [i for i in g.node(n).inputs if i not in inside]
                for i in reads:
                    while i in present:
                        self.last_read[i] = max(self.last_read.get(i, -1), end)
                        if not _view(g.node(i).op):
                            break
                        i = g.node(i).inputs[0]
        low = self.low
        keep = set(low.losses) | set(low.outputs.values())
        if self.bw is not None:
            keep |= set(self.bw.grads.values()) | set(self.bw.carry_outs.values())
        for n in g.g.nodes:
            keep.update(g.node(n).attrs.get("terminal", ()))
        self.keep = keep
        self.present = present
        # slots: (T, ...) buffers of loop values whose lives do not overlap share memory
        # (layer 1's dz, freed after its weight gradient, is layer 0's dz); the backend
        # keeps the slots between calls, so a training step allocates none of them
        # (so do the batched values written with out=, a conv's output over all steps: its
        # memory is the backward pass's dz, which only comes to life after it is dead)
        root_of: dict[str, str] = {}
        lives: dict[str, list] = {}  # root value -> [(T, elements per step), first, last block]

        def size_of(n):
            size = 1
            for d in g.node(n).shape:
                size *= int(d)
            return size

        for k, b in enumerate(blocks):
            for n in members.get(b, []):
                node = g.node(n)
                if b[0] in LOOP_KINDS:
                    if n in self.stored and n not in self.ring:
                        root_of[n] = n
                        lives[n] = [(self.seg_T[b[1]], size_of(n)), k,
                                    max(k, self.last_read.get(n, k))]
                    continue
                if self.batched_t(n) is None or not _owned(node.op) or _view(node.op) \
                        or n in self.window_values \
                        or not _writes_into(node.op) or n in keep:
                    continue
                over = self.overwritable(n)
                if over is not None and node.inputs[over] in root_of:
                    r = root_of[node.inputs[over]]  # in place: the operand's memory
                    root_of[n] = r
                    lives[r][2] = max(lives[r][2], self.last_read.get(n, k))
                else:
                    root_of[n] = n
                    lives[n] = [(self.batched_t(n), size_of(n)), k,
                                max(k, self.last_read.get(n, k))]
        # one arena per time axis, T*N*A elements; each buffer a range of it: the largest
        # first, each at the lowest offset clear of every buffer whose life overlaps its own
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
        self.arena_size = {T: max(o + sz for o, sz, _, _ in here) for T, here in placed.items()}
        self.place_of = {n: offset_of[r] for n, r in root_of.items()}

    def arena_name(self, T: str) -> str:
        return "arena" + T[1:]  # T_x -> arena_x

    def emit_arenas(self, o: _Out) -> None:
        """The memory of every (T, N, ...) buffer the plan places, kept by the backend."""
        for T, size in sorted(self.arena_size.items()):
            key = f"{self.fn_name}/{T[2:]}"  # one arena per function and time axis
            o(f"{self.arena_name(T)} = rt.arena(B, {key!r}, {size} * {T} * N, dtype)"
              "  # the memory plan's (T, N, ...) buffers")

    def at_arg(self, n: str) -> str:
        """rt.empty's `at=`: where in its arena the plan put n's buffer."""
        T, off = self.place_of[n]
        return f"at=({self.arena_name(T)}, {off} * {T} * N)"

    def batched_t(self, n: str) -> str | None:
        """The time length of a per-step value (T_x), None for a value without time."""
        seg = self.g.node(n).seg
        if seg is None:
            return None
        if seg.startswith("@"):
            return f"T_{self.low.axis_of.get(seg[1:], seg[1:])}"
        return self.seg_T.get(seg)

    def release(self, o: _Out, k: int) -> None:
        """`del` the big arrays nothing reads after block k (their memory goes back)."""
        g = self.g
        names = []
        for n, last in sorted(self.last_read.items()):
            if last != k or n in self.keep or n in self.window_values:
                continue
            node = g.node(n)
            b = self.s.block_of[n]
            if not _owned(node.op) or _view(node.op) or node.seg is None:
                continue
            if b[0] in LOOP_KINDS:
                if n in self.stored:
                    names.append(f"{self.v(n)}_seq")
                    if n in self.channel_major:
                        names.append(f"{self.v(n)}_buf")
            else:
                names.append(self.v(n))
        if names:
            o(f"del {', '.join(names)}  # not read again: let its memory go")

    def init_expr(self, read: str) -> str:
        node = self.g.node(read)
        kind = node.attrs["init"]
        if kind == "zeros":
            return "0.0"
        if kind == "learned":
            return self.v(node.attrs["init_from"])
        src = node.attrs["init_from"]  # an update node of an earlier loop
        return f"{self.buf(self.state_of_update[src])}[-1]"

    def loop_title(self, block: tuple, sources: list[str]) -> str:
        """`loop1.0: fc1.c, fc1.h`; a backward loop has its forward loop's id and title."""
        kind, seg, k = block
        states = self.loop_states(block, sources)
        forward = [b for b in self.s.blocks if b[0] == "loop" and b[1] == seg]
        several = len(forward) > 1
        if several and kind == "bloop":  # the forward loop of the same states
            k = next((f[2] for f in forward if self.loop_states(f) == states), k)
        name = f"{seg}.{k}" if several else seg
        cells = next(s.cells for s in self.low.segments if s.id == seg)
        what = ", ".join(states) if several else ", ".join(cells)
        return f"{name}: {what}"

    def loop_states(self, block: tuple, sources: list[str] | None = None) -> list[str]:
        """The states a loop block carries (of its state reads or carries)."""
        g = self.g
        if sources is None:
            sources = [n for n in self.s.members.get(block, [])
                       if g.node(n).op in ("state", "carry")]
        return sorted({g.node(r).attrs.get("state") or
                       g.node(g.node(r).attrs["read"]).attrs.get("state", r) for r in sources})

    def emit_loop(self, o: _Out, block: tuple, nodes: list[str], state_arg: bool) -> None:
        g = self.g
        _, seg, _ = block
        T = self.seg_T[seg]
        reads = [n for n in nodes if g.node(n).op == "state"]
        plan = _LoopPlan(self, block, nodes, backward=False)
        win = self.windows.get(block)
        K = self.recompute
        o()
        o(f"# loop {self.loop_title(block, reads)}, step by step over {T} steps")
        if win:
            o(f"# (recompute={K}: the values the backward pass reads are kept for one window "
              f"of {K} steps,")
            o("# the states at the start of each window; the backward loop recomputes the rest)")
        o.last_loc = None
        for r in reads:
            node = g.node(r)
            rows = f"min({K}, {T}) + 1" if r in self.ring else T + " + 1"
            o(f"{self.buf(r)} = rt.empty(xp, {_seq_shape(rows, node.shape)}, dtype, "
              f"{self.keep_arg(self.buf(r))})")
            init = self.init_expr(r)
            if state_arg and node.attrs["init"] != "final":
                o(f"{self.buf(r)}[0] = rt.initial_state(state, {node.attrs['state']!r}, {init})")
            else:
                o(f"{self.buf(r)}[0] = {init}")
            if r in self.ring:
                o(f"{self.ckpt(r)} = rt.empty(xp, "
                  f"{_seq_shape(f'({T} + {K - 1}) // {K}', node.shape)}, dtype, "
                  f"{self.keep_arg(self.ckpt(r))})  # checkpoints: the first state of each window")
        for n in plan.body:
            if n in self.stored:
                self.seq_alloc(o, n, T)
        roots = {n for n in plan.body if n in self.stored or n in self.state_of_update}
        zero = {r for r in reads if g.node(r).attrs["init"] == "zeros"}
        general = plan.variant(set(), roots, main=True)
        first = plan.variant(zero, roots) if zero else None
        plan.emit_buffers(o)
        for n in sorted(self.window_values):
            if self.window_values[n] == block and self.has_window_buffer(n):
                rows = f"min({K}, {self.batched_t(n)})"
                win_buf = self.v(n) + "_win"
                o(f"{win_buf} = rt.empty(xp, {_seq_shape(rows, g.node(n).shape)}, dtype, "
                  f"{self.keep_arg(win_buf)})  # one window of steps")
        start, stop = "0", T
        if win:
            o()
            o(f"def {win['fn']}(start, stop):")
            o.indent()
            o('"""Steps start ... stop - 1 of the loop, from the states in row 0 of their '
              'buffers."""')
            start, stop = "start", "stop"
            self.emit_window_values(o, block)
        if first is not None:
            o(f"t0 = {start}")
            cond = "state is None" if state_arg else "True"
            o(f"if {cond}:" if not win else f"if start == 0 and {cond}:")
            o.indent()
            o("# t = 0: the states start at zero; what they multiply or convolve vanishes")
            o("t = 0")
            for r in reads:
                if r not in zero:
                    o(f"{self.v(r)} = {self.buf(r)}[{self.step_ix(r)}]")
            plan.emit(o, first)
            o(f"t0 = {start} + 1" if win else "t0 = 1")
            o.dedent()
            o(f"for t in range(t0, {stop}):")
        else:
            o(f"for t in range({stop}):" if start == "0" else f"for t in range({start}, {stop}):")
        o.indent()
        o.last_loc = None
        for r in reads:
            o(f"{self.v(r)} = {self.buf(r)}[{self.step_ix(r)}]")
        plan.emit(o, general)
        o.dedent()
        if not win:
            plan.drop_step_names(o)
            return
        o.dedent()
        o()
        ring = [r for r in reads if r in self.ring]
        o(f"for w in range(0, {T}, {K}):")
        o.indent()
        if ring:
            o("if w:  # the window starts where the last one ended")
            for r in ring:
                o(f"    {self.buf(r)}[0] = {self.buf(r)}[{K}]")
            for r in ring:
                o(f"{self.ckpt(r)}[w // {K}] = {self.buf(r)}[0]")
        o(f"{win['fn']}(w, min(w + {K}, {T}))")
        o.dedent()
        for r in ring:
            o(f"{self.buf(r)}_final = {self.buf(r)}[({T} - 1) % {K} + 1].copy()")

    def emit_window_values(self, o: _Out, L: tuple) -> None:
        """The batched values only loop L reads (its input convolution), for steps
        start ... stop - 1: made again with each window instead of kept for all steps."""
        g = self.g
        o.last_loc = None
        for n in g.order():
            if self.window_values.get(n) != L:
                continue
            node = g.node(n)
            o.loc_comment(node)
            args = []
            for i in node.inputs:
                if i in self.window_values or g.node(i).seg is None:
                    args.append(self.v(i))
                else:
                    args.append(f"{self.batched(i)}[start:stop]")
            name = self.v(n)
            if self.has_window_buffer(n):
                o(f"{name} = {_into(node.op, args, node.attrs, f'{name}_win[:stop - start]')}")
            else:
                o(f"{name} = {OPS[node.op].code(args, node.attrs)}")
            self.check(o, n, name, step=False, backward=False)
        o.last_loc = None

    def has_window_buffer(self, n: str) -> bool:
        """A window value written with out= into a kept (K, N, ...) buffer."""
        return n in self.window_values and _writes_into(self.g.node(n).op) and \
            not _view(self.g.node(n).op)

    def window_inputs(self, L: tuple) -> set[str]:
        """Batched forward values that only loop L (or others of them) read: with
        recompute=K they are made window by window (what the loop's backward pass
        would otherwise keep alive for the recomputation, all steps of it)."""
        g, s = self.g, self.s
        seg = L[1]
        inside = set(s.members.get(L, []))
        out: set[str] = set()
        for n in reversed(g.order()):
            node = g.node(n)
            b = s.block_of[n]
            if node.grad or not _owned(node.op) or n in self.keep_always or not (
                    b[0] in ("pre", "mid") and b[1] == seg or
                    b[0] == "data" and node.seg is not None):  # (of the input alone)
                continue
            users = g.consumers(n)
            if users and all(u in inside or u in out for u in users):
                out.add(n)
        return out

    def emit_recompute(self, o: _Out, block: tuple, t: str) -> None:
        """In a backward loop at step t, the last of its window: recompute that window."""
        for L, win in self.windows.items():
            if win["partner"] != block:
                continue
            K = self.recompute
            o(f"# recompute the forward values of steps t - {K - 1} ... t from their "
              "checkpoint" if K > 1 else "# recompute the forward values of step t")
            for r in win["reads"]:
                o(f"{self.buf(r)}[0] = {self.ckpt(r)}[{t} // {K}]")
            o(f"{win['fn']}({t} - {K - 1}, {t} + 1)" if K > 1 else f"{win['fn']}({t}, {t} + 1)")

    def has_recompute(self, block: tuple) -> bool:
        return any(win["partner"] == block for win in self.windows.values())

    def emit_bloop(self, o: _Out, block: tuple, nodes: list[str]) -> None:
        g = self.g
        bw = self.bw
        _, seg, _ = block
        T = self.seg_T[seg]
        carries = [n for n in nodes if g.node(n).op == "carry"]
        plan = _LoopPlan(self, block, nodes, backward=True)
        o()
        o(f"# loop {self.loop_title(block, carries)}, backward through time: t = {T}-1 ... 0")
        o.last_loc = None
        zero = set()
        for c in carries:
            term = g.node(c).attrs.get("terminal")
            if term:
                o(f"{self.v(c)} = {' + '.join(map(self.v, term))}")
            else:
                zero.add(c)
        never = {c for c in carries if c not in plan.read_ct_of_carry}
        for n in carries + plan.body:
            if n in self.stored:
                self.seq_alloc(o, n, T)
        # a carry read after the loop (no update of its state reads a state at the same
        # step, as in a delay h = d[t-1] * d) is kept step by step as the step sees it
        kept = [c for c in carries if c in self.stored]

        def keep_carries(last=False):
            # zero where nothing arrives: at the last step without a terminal, and at the
            # others for a carry whose read has no cotangent (its state is read at t-1 by
            # nothing that needs a gradient, only its final value by a later loop)
            for c in kept:
                nothing = c in zero if last else c in never
                c = self.v(c)
                o(f"{c}_seq[t] = 0" if nothing else f"{c}_seq[t] = {c}")
        stored = {n for n in plan.body if n in self.stored}
        cts = set(plan.read_ct_of_carry.values())
        with_out = {ct for c, ct in plan.read_ct_of_carry.items()
                    if bw.carry_outs.get(g.node(c).attrs["read"]) in g}
        last = plan.variant(zero, stored | cts)
        middle = plan.variant(never, stored | cts, main=True)
        first = plan.variant(never, stored | with_out)
        plan.emit_buffers(o)
        o(f"t = {T} - 1")
        o("# the last step: nothing flows back from after it")
        keep_carries(last=True)
        plan.emit(o, last)
        self.carry_step(o, plan, carries, first=True)
        o(f"for t in range({T} - 2, 0, -1):")
        o.indent()
        o.last_loc = None
        if self.has_recompute(block):
            K = self.recompute
            if K > 1:
                o(f"if t % {K} == {K - 1}:")
                o.indent()
            self.emit_recompute(o, block, "t")
            if K > 1:
                o.dedent()
            o.last_loc = None
        keep_carries()
        plan.emit(o, middle)
        self.carry_step(o, plan, carries)
        o.dedent()
        o(f"if {T} > 1:")
        o.indent()
        o("t = 0")
        o("# the first step: nothing goes on to t = -1 but the initial states' gradients")
        o.last_loc = None
        if self.has_recompute(block) and self.recompute == 1:
            self.emit_recompute(o, block, "t")
            o.last_loc = None
        keep_carries()
        plan.emit(o, first)
        o.dedent()
        # cotangents of the initial states (t = 0)
        for c in carries:
            read = g.node(c).attrs["read"]
            co = bw.carry_outs.get(read)
            if co is None or co not in g:
                continue
            ct = plan.read_ct_of_carry[c]
            # copied unless it is in its own carried buffer: a row (or a view) of an arena
            # buffer goes to other buffers after its last reader here, and the loop it
            # flows to (the encoder's, its terminal carry) runs later
            own = plan.fixed.get(ct, ("",))[0] == "carried" and \
                first.status.get(ct) != ALIAS
            co, ct = self.v(co), self.v(ct)
            o(f"{co} = {ct}" if own else f"{co} = {ct}.copy()")
            if g.node(read).attrs["init"] == "learned":
                o("if state is not None:  # started from a given state: no gradient to it")
                o(f"    {co} = xp.zeros_like({co})")
        plan.drop_step_names(o)

    def carry_step(self, o: _Out, plan: "_LoopPlan", carries: list[str],
                   first: bool = False) -> None:
        """Hand each state's cotangent to the previous step; cut at truncation windows.

        A cut hands on `{carry}_zero`, zeros made once (at the `first` call, before the
        loop) and never written: the loop body does not write into its carries.
        """
        moved = [c for c in carries if c in plan.read_ct_of_carry]
        for c in moved:
            o(f"{self.v(c)} = {self.v(plan.read_ct_of_carry[c])}")
        moved = [self.v(c) for c in moved]
        if moved and first:
            for c in moved:
                o(f"{c}_zero = xp.zeros_like({c}) if bptt else None  # truncated BPTT's cut")
        if moved:
            o("if bptt and t % bptt == 0:")
            o("    # truncated BPTT: no gradient crosses into the previous window")
            for c in moved:
                o(f"    {c} = {c}_zero")

    # ------------------------------------------------------------ functions
    def forward_fn(self, o: _Out) -> None:
        low = self.low
        o("def forward(params, inputs, steps=None, state=None, backend=None):")
        o('    """Run the model forward: returns (outputs, final_states).')
        o("")
        o("    inputs: {name: array (N, T, C, H, W)}; steps: the number of steps to")
        o("    predict when the model forecasts (an int, or {axis: int});")
        o("    state: {state name: array (N, C, H, W)} to start from instead of the")
        o('    initial states (stateful inference)."""')
        o.indent()
        o("rt.check_call(MODEL, 'forward', params, inputs, state=state, steps=steps)")
        self.prologue(o, with_targets=False)
        from .passes import live_nodes
        needed = live_nodes(self.g, list(low.outputs.values()) +
                            [self.g.node(r).attrs["update"] for s in low.segments
                             for r in s.states])
        needed = {n for n in needed if not self.g.node(n).grad}
        self.begin_function(self._stored_fwd(needed))
        members = {b: [n for n in ns if n in needed] for b, ns in self.s.members.items()}
        blocks = [b for b in self.s.forward_blocks if b[0] != "tail"]
        self.fn_name = "forward"
        self.begin_blocks(blocks, members)
        self.keep |= set(low.outputs.values())
        self.emit_arenas(o)
        for k, block in enumerate(blocks):
            self.emit_block(o, block, members, state_arg=True)
            self.release(o, k)
        o()
        def out(i):  # loop values live in buffers the backend reuses: hand out copies
            e = f"rt.batch_major({self.batched(i)})"
            return e + ".copy()" if self.s.block_of[i][0] in LOOP_KINDS else e

        outs = ", ".join(f"{n!r}: {out(i)}" for n, i in low.outputs.items())
        o(f"outputs = {{{outs}}}")
        o(f"final = {{{self.finals()}}}")
        o("return outputs, final")
        o.dedent()

    def loss_fn(self, o: _Out) -> None:
        """loss(): the forward pass and the loss, nothing the gradients need."""
        low = self.low
        o("def loss(params, inputs, targets, state=None, backend=None):")
        o('    """The loss alone, without gradients (validation): the forward pass keeps only')
        o('    what the loss reads."""')
        o.indent()
        o("rt.check_call(MODEL, 'loss', params, inputs, targets, state=state)")
        self.prologue(o, with_targets=True)
        from .passes import live_nodes
        needed = {n for n in live_nodes(self.g, list(low.losses)) if not self.g.node(n).grad}
        self.begin_function(self._stored_fwd(needed))
        members = {b: [n for n in ns if n in needed] for b, ns in self.s.members.items()}
        blocks = list(self.s.forward_blocks)
        self.fn_name = "loss"
        self.begin_blocks(blocks, members)
        self.keep |= set(low.losses)
        self.emit_arenas(o)
        for k, block in enumerate(blocks):
            self.emit_block(o, block, members, state_arg=True)
            self.release(o, k)
        o()
        o(f"return float({' + '.join(map(self.v, low.losses))})")
        o.dedent()

    def step_flops(self) -> int:
        """Multiply-add FLOPs of one forward step of one sample (the ops with a `flops`
        rule: the convolutions): how big a step is."""
        return sum(node_flops(self.g, node) for node in map(self.g.node, self.g.order())
                   if not node.grad and node.seg is not None)

    def begin_function(self, stored: set[str]) -> None:
        """Start emitting one function: its stored values and their layouts."""
        g = self.g
        self.stored = set(stored)
        self.work_count = 0
        self.names.begin_function()
        self.channel_major = set()
        for n in self.stored:
            users = g.consumers(n)
            if any(g.node(u).op == "conv_grad_weight" and g.node(u).inputs[1] == n
                   for u in users) and all(
                    g.node(u).op in ("conv_grad_weight", "sum_to", "conv_grad_input")
                    or self.s.block_of[u] == self.s.block_of[n] for u in users):
                self.channel_major.add(n)

    def _stored_fwd(self, needed: set[str]) -> set[str]:
        """Forward loop values read outside their step, counting forward readers only."""
        g = self.g
        out = set()
        for n in needed:
            b = self.s.block_of[n]
            if b[0] != "loop" or g.node(n).op == "state" or n in self.state_of_update:
                continue
            if any(u in needed and self.s.block_of[u] != b for u in g.consumers(n)):
                out.add(n)
        from .schedule import through_views
        out = through_views(g, out, self.s.block_of)
        return out

    def memory_meta(self) -> dict:
        """The forward loop values loss_and_grad keeps for the backward pass, for reports.

        Per value: its loop, elements per sample and step, whether it is a state
        (T + 1 rows) or a stored value (T rows), and whether recompute=K keeps it
        for one window only (`convc.runtime.summary.recompute_memory` adds it up).
        """
        g, s = self.g, self.s
        ring, _ = self.ring_plan
        values = []
        for b in s.forward_blocks:
            if b[0] != "loop":
                continue
            for n in s.members.get(b, []):
                node = g.node(n)
                if node.op != "state" and (n not in s.stored or n in self.state_of_update):
                    continue
                elements = 1
                for d in node.shape:
                    elements *= int(d)
                values.append(dict(name=self.v(node.attrs["update"] if node.op == "state" else n),
                                   loop=node.seg, elements=elements, state=node.op == "state",
                                   window=n in ring, ring=n in self.ring))
        return dict(recompute=self.recompute, values=values,
                    arena=dict(sorted(self.loss_arena.items())))

    def window_plan(self) -> tuple[dict, dict]:
        """What recompute=K may keep for one window of steps only, loop by loop.

        A forward loop value (a state, or a value stored for the backward pass)
        qualifies when nothing but one backward loop, its partner, reads it
        outside its own step: that backward loop can recompute it a window at a
        time, from the states at the window's start. A state another loop starts
        from, or that a batched stage or the loss reads (a layer's output h),
        keeps all its steps. Returns ({value: loop block}, {loop block: partner}).
        """
        g, s = self.g, self.s
        if self.bw is None:
            return {}, {}
        starts = {g.node(n).attrs.get("init_from") for n in g.g.nodes
                  if g.node(n).op == "state"}

        def readers(n, inside):  # blocks reading n outside its step (through views)
            out = set()
            for u in g.consumers(n):
                if g.node(u).op == "carry_out":
                    continue
                if u in inside and _view(g.node(u).op) and u not in self.stored:
                    out |= readers(u, inside)
                elif u not in inside:
                    out.add(s.block_of[u])
            return out

        ring, partner_of = {}, {}
        for L in s.forward_blocks:
            if L[0] != "loop":
                continue
            inside = set(s.members.get(L, []))
            cands = {}
            for n in s.members.get(L, []):
                node = g.node(n)
                if node.op == "state":
                    if node.attrs["update"] in starts:
                        continue
                    cands[n] = readers(n, inside) | readers(node.attrs["update"], inside)
                elif n in self.stored and n not in self.state_of_update:
                    cands[n] = readers(n, inside)
            if any(b[0] != "bloop" for bs in cands.values() for b in bs):
                cands = {n: bs for n, bs in cands.items() if all(b[0] == "bloop" for b in bs)}
            partners = sorted({b for bs in cands.values() for b in bs})
            if len(partners) != 1:
                continue  # no backward loop, or several: keep every step
            partner_of[L] = partners[0]
            for n in cands:
                ring[n] = L
        return ring, partner_of

    def finals(self) -> str:
        parts = []
        for seg in self.low.segments:
            for r in seg.states:
                # a copy: the state's buffer is the backend's, reused by the next call
                last = f"{self.buf(r)}_final" if r in self.ring else f"{self.buf(r)}[-1].copy()"
                parts.append(f"{self.g.node(r).attrs['state']!r}: {last}")
        return ", ".join(parts)

    def loss_and_grad_fn(self, o: _Out) -> None:
        low = self.low
        o("def loss_and_grad(params, inputs, targets, state=None, bptt=None, backend=None):")
        o('    """Loss and the gradient of every parameter, by backpropagation through time.')
        o("")
        o("    Returns (loss, grads, final_states). bptt=k truncates the backward pass to")
        o("    windows of k steps; state={name: array} starts from given states (the")
        o("    gradient stops there: stateful training). On the CPU with several BLAS")
        o("    threads allowed, the batch is cut into that many shards that run")
        o('    side by side (rt.in_shards), each through loss_and_grad_shard."""')
        o("    rt.check_call(MODEL, 'loss_and_grad', params, inputs, targets, state=state)")
        o("    return rt.in_shards(loss_and_grad_shard, params, inputs, targets, state=state,")
        o(f"                        bptt=bptt, backend=backend, work={self.step_flops()})")
        o()
        o()
        o("def loss_and_grad_shard(params, inputs, targets, state=None, bptt=None, backend=None):")
        o('    """loss_and_grad for one batch (or one shard of it), in this thread."""')
        o.indent()
        o("rt.check_call(MODEL, 'loss_and_grad_shard', params, inputs, targets, state=state)")
        self.prologue(o, with_targets=True)
        self.begin_function(self.s.stored)
        if self.recompute:
            ring, partner_of = self.ring_plan
            self.ring = {n: self.recompute for n in ring}
            self.windows = {
                L: dict(partner=p, fn=f"{L[1]}_steps" if L[2] == 0 else f"{L[1]}_{L[2]}_steps",
                        reads=[n for n in self.s.members[L] if n in ring and
                               self.g.node(n).op == "state"])
                for L, p in partner_of.items()}
            self.keep_always = set(low.losses) | set(low.outputs.values())
            for L in self.windows:
                for n in self.window_inputs(L):
                    self.window_values[n] = L
        blocks = self.s.forward_blocks + self.s.backward_blocks
        self.fn_name = "loss_and_grad"
        self.begin_blocks(blocks, self.s.members)
        self.emit_arenas(o)
        self.loss_arena = {T[2:]: size for T, size in self.arena_size.items()}
        for k, block in enumerate(blocks):
            self.emit_block(o, block, self.s.members, state_arg=True)
            self.release(o, k)
        o()
        losses = " + ".join(map(self.v, low.losses))
        o(f"loss = float({losses})")
        if self.debug_nans:
            o("rt.check_finite(loss, 'loss', " + repr(f"{low.file}") + ", None, 'forward')")
        grads = []
        for name in sorted(low.params):
            gid = self.bw.grads.get(name)
            if gid is None:
                grads.append(f"{name!r}: xp.zeros_like({self.v(low.params[name].node)})")
            else:
                grads.append(f"{name!r}: {self.v(gid)}")
        o("grads = {")
        for gline in grads:
            o(f"    {gline},")
        o("}")
        o(f"final = {{{self.finals()}}}")
        o("return loss, grads, final")
        o.dedent()


_BLOCK_TITLES = {
    "static": "parameters and constants",
    "data": "inputs",
    "pre": "before the loop, all steps at once",
    "mid": "between two loops, all steps at once",
    "post": "after the loop, all steps at once",
    "tail": "loss",
    "bpre": "backward, before the loop, all steps at once",
    "bmid": "backward, between two loops, all steps at once",
    "bpost": "backward, after the loop: gradients summed over all steps",
    "btail": "gradients",
}


_WORK = "\x00"  # brackets a work buffer's placeholder until the buffer has its name
_PLACEHOLDER = re.compile(f"{_WORK}\\d+{_WORK}")


class _LoopPlan:
    """The memory plan of one loop block, and the emission of its body's variants.

    Destinations are fixed for state updates (`h_buf[t + 1]`), stored values
    (`h_seq[t]`), cotangents carried to the previous step (a buffer of their
    own) and the parts of a concat written in place; everything else that
    can be written with `out=` gets a work buffer by a linear scan over the
    body (per variant, over buffers shared by all variants of the loop).
    """

    def __init__(self, gen: Generator, block: tuple, nodes: list[str], backward: bool):
        g = gen.g
        self.gen, self.g, self.block, self.backward = gen, g, block, backward
        self.body = [n for n in nodes if g.node(n).op not in ("state", "carry")]
        self.sources = [n for n in nodes if g.node(n).op in ("state", "carry")]
        self.source_set = set(self.sources)
        self.pos = {n: i for i, n in enumerate(self.body)}
        self.buffers: list[tuple[str, tuple]] = []  # (placeholder, shape): see emit_buffers
        self.held: dict[str, list[str]] = {}  # placeholder -> the values it holds, in order
        self.buffer_names: dict[str, str] = {}  # placeholder -> its name
        self.fixed: dict[str, tuple[str, str]] = {}  # node -> (kind, destination)
        self.fresh: set[str] = set()  # allocated anew every step
        self.read_ct_of_carry: dict[str, str] = {}
        bw = gen.bw
        if backward:
            for c in self.sources:
                ct = bw.read_cts.get(g.node(c).attrs["read"]) if bw is not None else None
                if ct is not None and ct in self.pos:
                    self.read_ct_of_carry[c] = ct
        for n in self.body:
            if not backward and n in gen.state_of_update:
                read = gen.state_of_update[n]
                self.fixed[n] = ("update", f"{gen.buf(read)}[{gen.step_ix(read, 1)}]")
            elif n in gen.stored:
                self.fixed[n] = ("stored", f"{gen.v(n)}_seq[{gen.step_ix(n)}]")
        for c, ct in self.read_ct_of_carry.items():
            if ct in self.fixed:
                continue  # a (T, ...) slot is not overwritten by the next step
            uses = [self.pos[u] for u in g.consumers(c) if u in self.pos]
            if _writes_into(g.node(ct).op) and not _view(g.node(ct).op) and \
                    (not uses or max(uses) < self.pos[ct]):
                self.fixed[ct] = ("carried", f"{gen.v(ct)}_buf")
            else:
                # the carry is read after its new value is made, or it is a view: a
                # fresh array every step keeps the previous step's value intact
                x = ct
                while x in self.pos and _view(g.node(x).op):
                    x = g.node(x).inputs[0]
                if x in self.pos and x not in self.fixed:
                    self.fresh.add(x)
                if ct not in self.fixed:
                    self.fresh.add(ct)
        # parts of a concat written straight into its channels
        self.part_of: dict[str, tuple[str, int, int]] = {}
        for n in self.body:
            node = g.node(n)
            if node.op != "concat" or n in self.fresh or len(set(node.inputs)) != len(node.inputs):
                continue
            parts, start = {}, 0
            for p in node.inputs:
                pn = g.node(p)
                if p not in self.pos or not _writes_into(pn.op) or p in self.fixed or \
                        p in self.fresh or g.consumers(p) != [n]:
                    parts = None
                    break
                parts[p] = (n, start, start + pn.shape[0])
                start += pn.shape[0]
            if parts:
                self.part_of.update(parts)
        self.parents = {v[0] for v in self.part_of.values()}

    # ------------------------------------------------------------ folding
    def variant(self, zero_sources: set[str], roots: set[str], main: bool = False) -> Variant:
        """The body peeled for `zero_sources` (peel.py), with its destinations; `main`:
        the body of the loop's general steps (its work buffers are named for it)."""
        v = peel(self.g, self.body, zero_sources, roots)
        v.main = main
        v.dest, v.retargeted = self._assign(v)
        return v

    def resolve(self, v: Variant, x: str) -> str:
        return v.resolve(x)

    # ------------------------------------------------------------ buffers
    def _temp(self, v: Variant, n: str) -> bool:
        """Does n need a work buffer (computed here, written with out=, no fixed place)?"""
        op = self.g.node(n).op
        return (n in v.live and v.status[n] == COMPUTE and not _view(op)
                and _writes_into(op) and n not in self.fixed and n not in self.part_of
                and n not in self.fresh)

    def _assign(self, v: Variant) -> tuple[dict[str, str], set[str]]:
        """Destinations of one variant: fixed ones, then work buffers by linear scan."""
        g = self.g
        live = [n for n in self.body if n in v.live]
        temps = [n for n in live if self._temp(v, n)]
        dest: dict[str, str] = {}
        retarget: dict[str, str] = {}
        direct: dict[str, set] = {}  # users naming a value itself, not an alias of it
        for u in live:
            used = [v.alias[u]] if v.status[u] == ALIAS else \
                v.args[u] if v.status[u] == COMPUTE else []
            for i in used:
                direct.setdefault(i, set()).add(u)
        for n in live:  # a value only seen through a fixed place it equals is made there
            if v.status[n] == ALIAS and (n in self.fixed or n in self.part_of):
                m = v.alias[n]
                if m in temps and direct.get(m) == {n} and m not in retarget:
                    retarget[m] = n
        temps = [n for n in temps if n not in retarget]

        def root(x):
            x = self.resolve(v, x)
            while x in self.pos:
                if x in self.part_of:
                    x = self.part_of[x][0]
                elif _view(g.node(x).op) and v.status.get(x) == COMPUTE:
                    x = self.resolve(v, g.node(x).inputs[0])
                else:
                    break
            return x

        # a cotangent carried to the previous step must not sit in a work buffer (the next
        # step reuses those before it reads the carry): what it is a view of is allocated
        v.fresh = set(self.fresh)
        for ct in self.read_ct_of_carry.values():
            if ct in v.live and ct not in self.fixed:
                r = root(ct)
                if r in temps and r != ct:
                    temps.remove(r)
                    v.fresh.add(r)

        last: dict[str, int] = {}
        for u in live:
            used = [v.alias[u]] if v.status[u] == ALIAS else \
                v.args[u] if v.status[u] == COMPUTE else []
            for i in used:
                r = root(i)
                last[r] = max(last.get(r, -1), self.pos[u])
        start = {n: self.pos[n] for n in temps}
        for p, (parent, _, _) in self.part_of.items():
            if parent in start and p in v.live:
                start[parent] = min(start[parent], self.pos[p])
        owner: dict[str, str] = {}  # buffer -> the value in it now
        where: dict[str, str] = {}  # value -> its buffer
        by_start: dict[int, list[str]] = {}
        for n in temps:
            by_start.setdefault(start[n], []).append(n)
        for p, n0 in enumerate(self.body):
            for n in by_start.get(p, []):
                node = g.node(n)
                shape = tuple(node.shape)
                chosen = None
                if n == n0:  # in place: over an operand that dies here
                    for k in OPS[node.op].alias:
                        if k >= len(v.args[n]):
                            continue
                        i = self.resolve(v, v.args[n][k])
                        if i in where and root(i) == i and last.get(i) == p and \
                                tuple(g.node(i).shape) == shape and owner.get(where[i]) == i:
                            chosen = where[i]
                            break
                if chosen is None:
                    free = [b for b, s in self.buffers if s == shape and b not in owner]
                    if free:
                        chosen = free[0]
                    else:  # named when all variants are planned (emit_buffers)
                        chosen = f"{_WORK}{self.gen.work_count}{_WORK}"
                        self.gen.work_count += 1
                        self.buffers.append((chosen, shape))
                owner[chosen] = n
                self.held.setdefault(chosen, []).append((v.main, n))
                where[n] = chosen
            for b, val in list(owner.items()):
                if last.get(val, start.get(val, p)) <= p:
                    del owner[b]
        for n in temps:
            dest[n] = where[n]
        for n, (kind, d) in self.fixed.items():
            dest[n] = d
        for m, n in retarget.items():  # parents first: a part's place is in its parent's
            if n not in self.part_of:
                dest[m] = dest[n]
        for p, (parent, a, b) in self.part_of.items():
            if parent in dest and parent not in v.fresh:
                dest[p] = _sub(dest[parent], a, b)
        for m, n in retarget.items():
            if n in self.part_of and n in dest:
                dest[m] = dest[n]
        return dest, set(retarget.values())

    def drop_step_names(self, o: _Out) -> None:
        """After the loop: let go of the last step's names, or the views they hold would
        keep the (T, ...) buffers alive after the code that frees them."""
        names = sorted(self.gen.v(n) for n in set(self.body) | set(self.sources))
        line: list[str] = []
        for n in names + [None]:
            if n is not None and len(" = ".join(line + [n])) < 80:
                line.append(n)
                continue
            if line:
                o(" = ".join(line) + " = None")
            line = [n]

    def emit_buffers(self, o: _Out) -> None:
        """Allocate the work buffers every variant planned, once, before the loop."""
        gen = self.gen
        keep = gen.keep_arg
        for ct in sorted(n for n, (k, _) in self.fixed.items() if k == "carried"):
            o(f"{gen.v(ct)}_buf = rt.empty(xp, {_step_shape(self.g.node(ct).shape)}, dtype, "
              f"{keep(gen.v(ct))})  # carried to the previous step")
        for key, shape in self.buffers:
            # named after what it holds in the loop's main body, then in its peeled steps
            ids = [n for main, n in self.held[key] if main] + \
                [n for main, n in self.held[key] if not main]
            held = list(dict.fromkeys(gen.v(n) for n in ids))
            name = gen.names.work_buffer(ids)
            self.buffer_names[key] = name
            what = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            o(f"{name} = rt.empty(xp, {_step_shape(shape)}, dtype, {keep(name)})  "
              f"# work buffer of one step: {what}")

    def named(self, dest: str) -> str:
        """A destination with its work buffer's placeholder replaced by the buffer's name."""
        return _PLACEHOLDER.sub(lambda m: self.buffer_names[m.group()], dest)

    # ------------------------------------------------------------ emission
    def emit(self, o: _Out, v: Variant) -> None:
        g, gen = self.g, self.gen
        dest = v.dest
        expr: dict[str, str] = {}
        needed_zero = set()  # zero values some computation reads
        for n in self.body:
            if n in v.live and v.status[n] == COMPUTE:
                needed_zero.update(i for i in v.args[n]
                                   if v.status.get(i) == ZERO or i in v.zero_sources)
        dest = {n: self.named(d) for n, d in dest.items()}
        for z in sorted(needed_zero & v.zero_sources):
            node = g.node(z)
            if node.op == "state":
                o(f"{gen.v(z)} = {gen.buf(z)}[{gen.step_ix(z)}]")
            else:
                o(f"{gen.v(z)} = xp.zeros({_step_shape(node.shape)}, dtype)")

        def ex(x):
            x = self.resolve(v, x)
            if x in expr:
                return expr[x]
            if x in self.pos or x in self.source_set:
                return gen.v(x)
            return gen.at_step(x, self.block)

        for n in self.body:
            if n not in v.live:
                continue
            node = g.node(n)
            st = v.status[n]
            name = gen.v(n)
            o.loc_comment(node)
            d = dest.get(n) if (n in self.fixed or n in self.part_of) else None
            if st == ZERO:
                carried = n in self.read_ct_of_carry.values()
                if d is not None:
                    o(f"{d} = 0.0" if d.endswith("]") else f"{d}[...] = 0.0")
                    expr[n] = d
                    if carried:
                        o(f"{name} = {d}")
                        expr[n] = name
                elif n in needed_zero or carried:
                    o(f"{name} = xp.zeros({_step_shape(node.shape)}, dtype)")
                    expr[n] = name
                continue
            if st == ALIAS:
                e = ex(v.alias[n])
                carried = n in self.read_ct_of_carry.values()
                inside = self.resolve(v, n) in self.pos
                if carried and d is None and inside:
                    e = f"{e}.copy()"  # its buffer is reused before the next step reads it
                elif n in v.retargeted or d is None:
                    pass
                elif carried and not inside:
                    pass  # a value from outside the loop: read-only, nothing to copy
                elif d.endswith("]"):
                    o(f"{d} = {e}")
                    e = d if carried else e
                else:
                    o(f"xp.copyto({d}, {e})")
                    e = d
                if carried:
                    o(f"{name} = {e}")
                    e = name
                expr[n] = e
                continue
            args = [ex(i) for i in v.args[n]]
            if n in self.parents and n in dest and n not in v.fresh and \
                    all(p in self.part_of for p in node.inputs):
                o(f"{name} = {dest[n]}  # its parts were written into it above")
            elif n in dest and n not in v.fresh and not _view(node.op) and \
                    _writes_into(node.op):
                o(f"{name} = {_into(node.op, args, node.attrs, dest[n])}")
            else:
                o(f"{name} = {OPS[node.op].code(args, node.attrs)}")
                if n in self.fixed and self.fixed[n][0] in ("update", "stored"):
                    o(f"{self.fixed[n][1]} = {name}")
            expr[n] = name
            gen.check(o, n, name, step=True, backward=self.backward)


def generate(low: Lowered, bw: Backward, sched: Schedule, debug_nans: bool = False,
             recompute: int | None = None) -> str:
    return Generator(low, bw, sched, debug_nans=debug_nans, recompute=recompute).module()

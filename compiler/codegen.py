"""Emit a readable, standalone Python module from a scheduled graph.

One statement per node, named by compiler/naming.py's fixed patterns (`h_enc`,
`dh_enc`, `add_z_o_enc`, `work_f_enc`), with a comment quoting the `.cell` line
each group of statements comes from. The
module imports only NumPy and `convc.runtime`; the array module and the
convolution come from the backend passed in, so the same code runs on NumPy
and CuPy.

It renders a finished plan (plan.py): which blocks and nodes each function
runs, the memory plan (memplan.py: a state's (T+1, N, ...) buffer, a stored
value's row `h_seq[t]`, work buffers of one step reused across steps, the
arenas of the batched values) and the recomputation (recompute.py). Ops
write into their place with `out=` (`xp.add(a, b, out=buf)`,
`rt.conv2d(..., out=buf)`); nothing is allocated inside a time loop.

Peeling. The first forward step (states start at zero: `f * c[t-1]` and
the recurrent convolution vanish), the last backward step (no cotangent
arrives from after it) and the backward step t = 0 (nothing goes on to
t = -1 except the initial states' gradients) are emitted as their own copies
of the loop body (peel.py's variants, planned in plan.py) with those zeros
folded away and dead work dropped.

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

import dataclasses


from convc import __version__
from convc.spec.diagnostics import SOURCES

from .autodiff import Backward
from .ir import Graph, data_name, is_data_seg
from .lower import Lowered
from .memplan import Carried, Channels, LoopMemory, SeqRow, StateRow, Work
from .naming import Names
from .ops import OPS, float_source, node_flops
from .peel import ALIAS, COMPUTE, ZERO, Variant
from .plan import FunctionPlan, ModulePlan, plan_module
from .render import render_c_kernel, render_cuda_kernel, render_python_kernel, same_kernel
from .schedule import Block, Kind, Schedule

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
    """Renders a finished ModulePlan (plan.py) as Python source: names come from
    naming.py, places from the memory plan; nothing is decided here."""

    def __init__(self, low: Lowered, bw: Backward | None, sched: Schedule, plan: ModulePlan,
                 debug_nans: bool = False, vjp: "Generator | None" = None):
        self.debug_nans = debug_nans
        self.vjp = vjp  # the generator of the vector-Jacobian product's graph, if compiled
        self.params_only: Generator | None = None  # (of vjp's: its parameters-only graph)
        self.data = True  # False for that graph: no cotangents of inputs and states
        self.low = low
        self.g: Graph = low.graph
        self.bw = bw
        self.s = sched
        self.plan = plan
        self.recompute = plan.recompute.K
        self.state_of_update = plan.state_of_update  # update node -> state read
        self.seg_T = plan.seg_T
        self.names = Names(self.g, low.loc_owner, low.cells)  # every variable's name
        self.fp: FunctionPlan = next(iter(plan.functions.values()))  # the one being rendered
        self.kernels = _KernelTable()  # the fused kernels rendered (one table per module)

    # the plan of the function being rendered
    @property
    def stored(self) -> set[str]:
        return self.fp.stored

    @property
    def ring(self) -> dict[str, int]:
        return self.fp.recompute.ring

    @property
    def window_values(self) -> dict[str, Block]:
        return self.fp.recompute.window_values

    @property
    def keep(self) -> set[str]:
        return self.fp.memory.keep

    @property
    def fn_name(self) -> str:
        return self.fp.name

    def begin_function(self, name: str) -> None:
        """Render function `name` of the plan next."""
        self.fp = self.plan.functions[name]
        self.names.begin_function()

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
        return (node.op == "slice" and self.s.block_of[nid].kind.is_loop
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
        if b.kind == Kind.LOOP and nid in self.state_of_update:
            return f"{self.buf(self.state_of_update[nid])}[1:]"
        if b.kind.is_loop:
            if self.is_view_of_step(nid):
                return OPS["slice"].code([self.batched(node.inputs[0])], node.attrs)
            if nid not in self.stored:
                raise AssertionError(f"{nid} is read outside its loop but not stored")
            return f"{self.v(nid)}_seq"
        return self.v(nid)

    def at_step(self, nid: str, ctx: Block) -> str:
        """Expression for a value at step t, seen from inside loop block `ctx`."""
        node = self.g.node(nid)
        b = self.s.block_of[nid]
        if node.seg is None or b == ctx:
            return self.v(nid)
        if nid in self.window_values:
            return f"{self.v(nid)}[t - start]"
        if node.op == "state":
            return f"{self.buf(nid)}[{self.step_ix(nid)}]"
        if b.kind == Kind.LOOP and nid in self.state_of_update:
            read = self.state_of_update[nid]
            return f"{self.buf(read)}[{self.step_ix(read, 1)}]"
        if b.kind.is_loop and self.is_view_of_step(nid):
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
        keep = self.at_arg(n) if n in self.fp.memory.place_of else "keep=None"
        if n in self.fp.channel_major and len(shape) == 3:
            o(f"{name}_buf = rt.empty(xp, ({shape[0]}, {T}, N, {shape[1]}, {shape[2]}), dtype, "
              f"{keep})")
            o(f"{name}_seq = {name}_buf.transpose(1, 2, 0, 3, 4)  # channel-major: feeds a "
              "weight gradient")
        else:
            o(f"{name}_seq = rt.empty(xp, {_seq_shape(T, shape)}, dtype, {keep})")

    # ------------------------------------------------------------ module
    def module(self) -> str:
        fns = _Out()  # first: MODEL reports the memory plan they make
        self.forward_fn(fns)
        fns()
        fns()
        if self.low.losses:
            self.loss_fn(fns)
            fns()
            fns()
            self.loss_and_grad_fn(fns)
        else:
            self.no_loss_fns(fns)
        fns()
        fns()
        if self.vjp is not None:
            self.vjp.vjp_fn(fns, self.low)
        else:
            self.no_vjp_fn(fns)
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
        if self.vjp is not None:
            o("from convc.runtime import vjp as _vjp")
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
        self.kernels.emit(o)
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
        vjp = {}
        if self.vjp is not None:  # what vjp's cotangents are checked against
            vjp = dict(vjp=dict(output_axes={n: self.output_axis(n) for n in low.outputs}))
        return dict(
            name=low.name, file=_short(low.file), task=low.task,
            inputs={n: tuple(g.node(i).shape) for n, i in low.inputs.items()},
            targets={n: tuple(g.node(i).shape) for n, i in low.targets.items()},
            outputs={n: tuple(g.node(i).shape) for n, i in low.outputs.items()},
            axes=dict(sorted(low.axis_of.items())),
            params=params, states=states, memory=self.memory_meta(),
            loops=[dict(id=s.id, axis=s.axis, cells=list(s.cells)) for s in low.segments],
            train=dict(low.train), loss=[g.node(n).op for n in low.losses],
            cells=dict(low.cells), **vjp,
        )

    # ------------------------------------------------------------ prologue
    def prologue(self, o: _Out, with_targets: bool, cotangents: bool = False) -> None:
        low = self.low
        o("B = backend if backend is not None else _model.default_backend()")
        o("xp = B.xp")
        first = sorted(low.params)[0] if low.params else None
        o(f"dtype = params[{first!r}].dtype" if first else "dtype = np.float32")
        if any(any(lm.kernels.values()) for lm in self.fp.loops.values()):
            o("K = FK.of(dtype, B)  # the fused kernels for this dtype and backend")
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
        if cotangents:  # the vjp's: a cotangent for each output, on the output's axis
            self.bind_output_cotangents(o)
            for name, seed in self.bw.seeds.items():
                axes.setdefault(self.output_axis(name), f"cotangent {name}")
                nodes[f"cotangent {name}"] = seed
        for ax in sorted({s.axis for s in low.segments} | set(axes)):
            if ax in axes:
                o(f"T_{ax} = {self.v(nodes[axes[ax]])}.shape[0]")
            else:
                o(f"T_{ax} = int(steps[{ax!r}] if isinstance(steps, dict) else steps)")
        src = next(iter(nodes.values()))
        o(f"N = {self.v(src)}.shape[1]")
        if cotangents:
            self.bind_state_cotangents(o)
        # (every shape and time length was checked by rt.check_call, the first statement)

    def bind_state_cotangents(self, o: _Out) -> None:
        """The vjp's cotangents of the final states: given, or zeros."""
        for state, seed in self.bw.final_seeds.items():
            shape = tuple(self.g.node(seed).shape)
            o(f"{self.v(seed)} = _vjp.state_cotangent(state_cotangents, {state!r}, "
              f"{shape}, N, dtype, xp)")

    def output_axis(self, name: str) -> str:
        """The time axis of output `name` (of its loop, or of the sequence it reads)."""
        seg = self.g.node(self.low.outputs[name]).seg
        if is_data_seg(seg):
            return self.low.axis_of.get(data_name(seg), data_name(seg))
        return next(s.axis for s in self.low.segments if s.id == seg)

    # ------------------------------------------------------------ blocks
    def emit_block(self, o: _Out, block: Block, members: dict, state_arg: bool = True) -> None:
        kind, seg, k = block
        nodes = members.get(block, [])
        if kind == Kind.LOOP:
            if nodes:
                self.emit_loop(o, block, nodes, state_arg)
            return
        if kind == Kind.BLOOP:
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
            over = self.fp.memory.in_place.get(n)
            name = self.v(n)
            if over is not None:
                o(f"{name} = {_into(node.op, args, node.attrs, args[over])}  # in place: "
                  f"{self.v(node.inputs[over])} is not read again")
            elif n in self.fp.memory.place_of:
                shape = _seq_shape(self.batched_t(n), node.shape)
                buf = f"rt.empty(xp, {shape}, dtype, {self.at_arg(n)})"
                o(f"{name} = {_into(node.op, args, node.attrs, buf)}")
            else:
                o(f"{name} = {OPS[node.op].code(args, node.attrs)}")
            self.check(o, n, name, step=False, backward=node.grad)

    def arena_name(self, T: str) -> str:
        return "arena" + T[1:]  # T_x -> arena_x

    def emit_arenas(self, o: _Out) -> None:
        """The memory of every (T, N, ...) buffer the plan places, kept by the backend."""
        for T, size in sorted(self.fp.memory.arena_size.items()):
            key = f"{self.fn_name}/{T[2:]}"  # one arena per function and time axis
            o(f"{self.arena_name(T)} = rt.arena(B, {key!r}, {size} * {T} * N, dtype)"
              "  # the memory plan's (T, N, ...) buffers")

    def at_arg(self, n: str) -> str:
        """rt.empty's `at=`: where in its arena the plan put n's buffer."""
        T, off = self.fp.memory.place_of[n]
        return f"at=({self.arena_name(T)}, {off} * {T} * N)"

    def batched_t(self, n: str) -> str | None:
        """The time length of a per-step value (T_x), None for a value without time."""
        seg = self.g.node(n).seg
        if seg is None:
            return None
        if is_data_seg(seg):
            name = data_name(seg)
            return f"T_{self.low.axis_of.get(name, name)}"
        return self.seg_T.get(seg)

    def release(self, o: _Out, k: int) -> None:
        """`del` the big arrays nothing reads after block k (their memory goes back)."""
        g = self.g
        names = []
        for n, last in sorted(self.fp.memory.last_read.items()):
            if last != k or n in self.keep or n in self.window_values:
                continue
            node = g.node(n)
            b = self.s.block_of[n]
            if not _owned(node.op) or _view(node.op) or node.seg is None:
                continue
            if b.kind.is_loop:
                if n in self.stored:
                    names.append(f"{self.v(n)}_seq")
                    if n in self.fp.channel_major:
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

    def loop_title(self, block: Block, sources: list[str]) -> str:
        """`loop1.0: fc1.c, fc1.h`; a backward loop has its forward loop's id and title."""
        kind, seg, k = block
        states = self.loop_states(block, sources)
        forward = [b for b in self.s.blocks if b.kind == Kind.LOOP and b.seg == seg]
        several = len(forward) > 1
        if several and kind == Kind.BLOOP:  # the forward loop of the same states
            k = next((f.k for f in forward if self.loop_states(f) == states), k)
        name = f"{seg}.{k}" if several else seg
        cells = next(s.cells for s in self.low.segments if s.id == seg)
        what = ", ".join(states) if several else ", ".join(cells)
        return f"{name}: {what}"

    def loop_states(self, block: Block, sources: list[str] | None = None) -> list[str]:
        """The states a loop block carries (of its state reads or carries)."""
        g = self.g
        if sources is None:
            sources = [n for n in self.s.members.get(block, [])
                       if g.node(n).op in ("state", "carry")]
        return sorted({g.node(r).attrs.get("state") or
                       g.node(g.node(r).attrs["read"]).attrs.get("state", r) for r in sources})

    def emit_loop(self, o: _Out, block: Block, nodes: list[str], state_arg: bool) -> None:
        g = self.g
        _, seg, _ = block
        T = self.seg_T[seg]
        reads = [n for n in nodes if g.node(n).op == "state"]
        lm = self.fp.loops[block]
        plan = _LoopRender(self, lm)
        win = self.fp.recompute.windows.get(block)
        K = self.recompute
        o()
        o(f"# loop {self.loop_title(block, reads)}, step by step over {T} steps")
        if win:
            o(f"# (recompute={K}: the values the backward pass reads are kept for one window "
              f"of {K} steps,")
            o("# the states at the start of each window; the backward loop recomputes the rest)")
        o.last_loc = None
        self.emit_state_buffers(o, reads, T, state_arg)
        for n in lm.body:
            if n in self.stored:
                self.seq_alloc(o, n, T)
        general, first = lm.variants["general"], lm.variants.get("first")
        zero = first.zero_sources if first is not None else set()
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
            o(f"def {self.window_fn(block)}(start, stop):")
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
        self.emit_windows(o, block, reads, T)

    def emit_state_buffers(self, o: _Out, reads: list[str], T: str, state_arg: bool) -> None:
        """Each state's (T + 1, N, ...) buffer (K + 1 rows when recompute=K keeps one
        window of it, with its checkpoints), row 0 its initial value."""
        K = self.recompute
        for r in reads:
            node = self.g.node(r)
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

    def emit_windows(self, o: _Out, block: Block, reads: list[str], T: str) -> None:
        """recompute=K: run the loop window by window, checkpointing the states at the
        start of each; keep the final states."""
        K = self.recompute
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
        o(f"{self.window_fn(block)}(w, min(w + {K}, {T}))")
        o.dedent()
        for r in ring:
            o(f"{self.buf(r)}_final = {self.buf(r)}[({T} - 1) % {K} + 1].copy()")

    def emit_window_values(self, o: _Out, L: Block) -> None:
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

    def window_fn(self, L: Block) -> str:
        """The local function running steps start ... stop - 1 of forward loop L."""
        return f"{L.seg}_steps" if L.k == 0 else f"{L.seg}_{L.k}_steps"

    def emit_recompute(self, o: _Out, block: Block, t: str) -> None:
        """In a backward loop at step t, the last of its window: recompute that window."""
        for L, win in self.fp.recompute.partner_of(block):
            K = self.recompute
            fn = self.window_fn(L)
            o(f"# recompute the forward values of steps t - {K - 1} ... t from their "
              "checkpoint" if K > 1 else "# recompute the forward values of step t")
            for r in win.reads:
                o(f"{self.buf(r)}[0] = {self.ckpt(r)}[{t} // {K}]")
            o(f"{fn}({t} - {K - 1}, {t} + 1)" if K > 1 else f"{fn}({t}, {t} + 1)")

    def has_recompute(self, block: Block) -> bool:
        return bool(self.fp.recompute.partner_of(block))

    def emit_bloop(self, o: _Out, block: Block, nodes: list[str]) -> None:
        g = self.g
        _, seg, _ = block
        T = self.seg_T[seg]
        carries = [n for n in nodes if g.node(n).op == "carry"]
        lm = self.fp.loops[block]
        plan = _LoopRender(self, lm)
        o()
        o(f"# loop {self.loop_title(block, carries)}, backward through time: t = {T}-1 ... 0")
        o.last_loc = None
        zero, never = lm.zero, lm.never
        for c in carries:
            term = g.node(c).attrs.get("terminal")
            if term:
                o(f"{self.v(c)} = {' + '.join(map(self.v, term))}")
        for n in carries + lm.body:
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
        last, middle, first = (lm.variants[k] for k in ("last", "middle", "first"))
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
        self.emit_initial_cotangents(o, lm, carries)
        plan.drop_step_names(o)

    def emit_initial_cotangents(self, o: _Out, lm: LoopMemory, carries: list[str]) -> None:
        """The cotangents of the initial states: what step t = 0 hands on."""
        g, bw = self.g, self.bw
        first = lm.variants["first"]
        for c in carries:
            read = g.node(c).attrs["read"]
            co = bw.carry_outs.get(read)
            if co is None or co not in g:
                continue
            ct = lm.read_ct_of_carry[c]
            # copied unless it is in its own carried buffer: a row (or a view) of an arena
            # buffer goes to other buffers after its last reader here, and the loop it
            # flows to (the encoder's, its terminal carry) runs later
            own = isinstance(lm.fixed.get(ct), Carried) and first.status.get(ct) != ALIAS
            co, ct = self.v(co), self.v(ct)
            o(f"{co} = {ct}" if own else f"{co} = {ct}.copy()")
            if g.node(read).attrs["init"] == "learned":
                if self.fp.name == "vjp":  # the initial state's cotangent, as vjp returns it
                    o(f"{co}_given = {co}")
                o("if state is not None:  # started from a given state: no gradient to it")
                o(f"    {co} = xp.zeros_like({co})")

    def carry_step(self, o: _Out, plan: "_LoopRender", carries: list[str],
                   first: bool = False) -> None:
        """Hand each state's cotangent to the previous step; cut at truncation windows.

        A cut hands on `{carry}_zero`, zeros made once (at the `first` call, before the
        loop) and never written: the loop body does not write into its carries.
        """
        moved = [c for c in carries if c in plan.lm.read_ct_of_carry]
        for c in moved:
            o(f"{self.v(c)} = {self.v(plan.lm.read_ct_of_carry[c])}")
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
        self.begin_function("forward")
        self.emit_blocks(o)
        o()
        self.emit_outputs(o)
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
        self.begin_function("loss")
        self.emit_blocks(o)
        o()
        o(f"return float({' + '.join(map(self.v, low.losses))})")
        o.dedent()

    def step_flops(self) -> int:
        """Multiply-add FLOPs of one forward step of one sample (the ops with a `flops`
        rule: the convolutions): how big a step is."""
        return sum(node_flops(self.g, node) for node in map(self.g.node, self.g.order())
                   if not node.grad and node.seg is not None)

    def emit_blocks(self, o: _Out) -> None:
        """The function's arenas, then its blocks in order, each followed by the `del` of
        what nothing reads after it."""
        self.emit_arenas(o)
        for k, block in enumerate(self.fp.blocks):
            self.emit_block(o, block, self.fp.members, state_arg=True)
            self.release(o, k)

    def memory_meta(self) -> dict:
        """The forward loop values loss_and_grad keeps for the backward pass, for reports.

        Per value: its loop, elements per sample and step, whether it is a state
        (T + 1 rows) or a stored value (T rows), and whether recompute=K keeps it
        for one window only (`convc.runtime.summary.recompute_memory` adds it up).
        """
        g, s = self.g, self.s
        rec = self.plan.recompute
        values = []
        for b in s.forward_blocks:
            if b.kind != Kind.LOOP:
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
                                   window=n in rec.candidates, ring=n in rec.ring))
        lag = self.plan.functions.get("loss_and_grad")
        arena = {T[2:]: size for T, size in lag.memory.arena_size.items()} if lag else {}
        return dict(recompute=self.recompute, values=values, arena=dict(sorted(arena.items())))

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
        self.begin_function("loss_and_grad")
        self.emit_blocks(o)
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


    # ------------------------------------------------------------ vjp
    def vjp_fn(self, o: _Out, main: Lowered) -> None:
        """vjp() and vjp_shard(), rendered from this generator's graph: the vector-Jacobian
        product's (compile_program(vjp=True)); `main` is the module's own model."""
        args = "params, inputs, cotangents, state=None, state_cotangents=None, bptt=None, " \
            "backend=None"
        o(f"def vjp({args}):")
        o('    """The vector-Jacobian product of the outputs and final states.')
        o("")
        o("    cotangents: {output: array (N, T, C, H, W)}, like the outputs of forward();")
        o("    state_cotangents: {state: array (N, C, H, W)} for final states (zeros where")
        o("    left out). Returns (param_cts, input_cts, state_cts): the cotangents of every")
        o("    parameter, every input (N, T, C, H, W) and every initial state (N, C, H, W), by")
        o("    BPTT (bptt=k truncates it to windows of k steps). The batch may run in shards")
        o('    side by side, as in loss_and_grad (convc.runtime.vjp.in_shards)."""')
        o("    rt.check_call(MODEL, 'vjp', params, inputs, state=state, cotangents=cotangents,")
        o("                  state_cotangents=state_cotangents)")
        o("    return _vjp.in_shards(vjp_shard, params, inputs, cotangents, state=state,")
        o("                          state_cotangents=state_cotangents, bptt=bptt, "
          f"backend=backend, work={self.step_flops()})")
        o()
        o()
        o(f"def vjp_shard({args}):")
        o('    """vjp for one batch (or one shard of it), in this thread."""')
        o.indent()
        o("rt.check_call(MODEL, 'vjp_shard', params, inputs, state=state, cotangents=cotangents,")
        o("              state_cotangents=state_cotangents)")
        self.prologue(o, with_targets=False, cotangents=True)
        self.begin_function("vjp")
        self.emit_blocks(o)
        o()
        self.vjp_results(o, main)
        o("return param_cts, input_cts, state_cts")
        o.dedent()
        o()
        o()
        self.vjp_start_fn(o, main)

    def vjp_start_fn(self, o: _Out, main: Lowered) -> None:
        """vjp_start(): the forward pass now, the product when the pullback is called (a
        generator, _vjp_steps, keeps the forward's values between the two)."""
        o("def vjp_start(params, inputs, state=None, steps=None, bptt=None, backend=None,")
        o("              wrt='all'):")
        o('    """Run forward; return (outputs, final, pullback), where pullback(cotangents,')
        o("    state_cotangents=None) gives vjp's (param_cts, input_cts, state_cts) without")
        o("    running forward again. The forward's values are kept (in memory of this call's")
        o("    own) until the pullback runs or is closed (convc.runtime.vjp.Pullback).")
        o("    wrt='params': the parameters' cotangents only (input_cts and state_cts are")
        o('    empty), without the backward work only the inputs and states need."""')
        o("    rt.check_call(MODEL, 'vjp_start', params, inputs, state=state, steps=steps)")
        o("    steps_fn = _vjp.choose(wrt, all=_vjp_steps, params=" +
          ("_vjp_steps_params" if self.params_only is not None else "None") + ")")
        o("    return _vjp.start(steps_fn, MODEL, params, inputs, state=state, steps=steps,")
        o(f"                      bptt=bptt, backend=backend, work={self.step_flops()})")
        o()
        o()
        self.steps_generator_fn(o, main, "_vjp_steps")
        if self.params_only is not None:
            o()
            o()
            self.params_only.steps_generator_fn(o, main, "_vjp_steps_params")

    def steps_generator_fn(self, o: _Out, main: Lowered, name: str) -> None:
        """The generator vjp_start runs: the forward pass, a pause, the backward pass."""
        o(f"def {name}(params, inputs, state=None, steps=None, bptt=None, backend=None):")
        o('    """vjp_start\'s forward pass; then, sent the cotangents, its backward pass."""')
        o.indent()
        self.prologue(o, with_targets=False)
        self.begin_function("vjp")
        self.emit_arenas(o)
        for k, block in enumerate(self.fp.blocks):
            if block.kind.backward and block == self.s.backward_blocks[0]:
                self.vjp_pause(o)
            self.emit_block(o, block, self.fp.members, state_arg=True)
            self.release(o, k)
        o()
        self.vjp_results(o, main)
        o("yield param_cts, input_cts, state_cts")
        o.dedent()

    def vjp_pause(self, o: _Out) -> None:
        """Between the passes: hand out the outputs and final states, take the cotangents."""
        o()
        self.emit_outputs(o)
        o("cotangents, state_cotangents = yield outputs, final")
        self.bind_output_cotangents(o)
        self.bind_state_cotangents(o)

    def emit_outputs(self, o: _Out) -> None:
        """`outputs` and `final` as forward() returns them: loop values live in buffers
        the backend (or the backward pass) reuses, so they are handed out as copies."""
        def out(i):
            e = f"rt.batch_major({self.batched(i)})"
            return e + ".copy()" if self.s.block_of[i].kind.is_loop else e

        outs = ", ".join(f"{n!r}: {out(i)}" for n, i in self.low.outputs.items())
        o(f"outputs = {{{outs}}}")
        o(f"final = {{{self.finals()}}}")

    def bind_output_cotangents(self, o: _Out) -> None:
        """The vjp's cotangent of each output, time-major like the output."""
        for name, seed in self.bw.seeds.items():
            o(f"{self.v(seed)} = rt.time_major(cotangents[{name!r}], dtype, xp)")

    def vjp_results(self, o: _Out, main: Lowered) -> None:
        """param_cts, input_cts and state_cts, as vjp returns them."""
        bw = self.bw
        o("param_cts = {")
        for name in sorted(main.params):
            gid = bw.grads.get(name)
            o(f"    {name!r}: {self.v(gid)}," if gid is not None else
              f"    {name!r}: xp.zeros_like(params[{name!r}]),")
        o("}")
        if not self.data:  # the parameters-only graph
            o("input_cts, state_cts = {}, {}")
            return
        ins = ", ".join(f"{n!r}: rt.batch_major({self.v(bw.input_cts[n])})" if n in bw.input_cts
                        else f"{n!r}: xp.zeros_like(inputs[{n!r}], dtype=dtype)"
                        for n in main.inputs)
        o(f"input_cts = {{{ins}}}")
        states = []
        for seg in main.segments:
            for r in seg.states:
                node = main.graph.node(r)
                name = node.attrs["state"]
                if node.attrs["init"] == "final":
                    continue  # started from another loop's final state: not an argument
                ct = bw.init_cts.get(name)
                given = "_given" if node.attrs["init"] == "learned" else ""
                states.append(f"{name!r}: {self.v(ct)}{given}" if ct is not None else
                              f"{name!r}: xp.zeros((N,) + {tuple(node.shape)}, dtype)")
        o(f"state_cts = {{{', '.join(states)}}}")

    def no_loss_fns(self, o: _Out) -> None:
        """A model without a loss (its outputs are for forward and vjp) has no loss()."""
        for k, name in enumerate(("loss", "loss_and_grad")):
            if k:
                o()
                o()
            o(f"def {name}(params, inputs, targets=None, **options):")
            o('    """The model has no loss: it runs forward (and vjp, compiled with vjp=True)."""')
            o(f"    raise _model.no_loss({name!r}, MODEL)")

    def no_vjp_fn(self, o: _Out) -> None:
        o("def vjp(params, inputs, cotangents, **options):")
        o('    """Not compiled: compile with vjp=True (convc.load(path, vjp=True), '
          '`convc compile --vjp`)."""')
        o("    raise _model.not_compiled('vjp', MODEL)")


_BLOCK_TITLES = {
    Kind.STATIC: "parameters and constants",
    Kind.DATA: "inputs",
    Kind.PRE: "before the loop, all steps at once",
    Kind.MID: "between two loops, all steps at once",
    Kind.POST: "after the loop, all steps at once",
    Kind.TAIL: "loss",
    Kind.BPRE: "backward, before the loop, all steps at once",
    Kind.BMID: "backward, between two loops, all steps at once",
    Kind.BPOST: "backward, after the loop: gradients summed over all steps",
    Kind.BTAIL: "gradients",
}


class _LoopRender:
    """Renders one loop block's memory plan (memplan.LoopMemory): its buffers, then the
    variants of its body, each place as an expression."""

    def __init__(self, gen: Generator, lm: LoopMemory):
        self.gen, self.g, self.lm = gen, gen.g, lm
        self.block, self.backward = lm.block, lm.block.kind == Kind.BLOOP
        self.body, self.sources = lm.body, lm.sources
        self.source_set = set(lm.sources)
        self.pos, self.fixed, self.part_of = lm.pos, lm.fixed, lm.part_of
        self.read_ct_of_carry = lm.read_ct_of_carry
        self.parents = lm.parents
        self.buffer_names: dict[Work, str] = {}

    def place(self, p) -> str:
        """The expression of a place of the memory plan, at step t."""
        gen = self.gen
        if isinstance(p, StateRow):
            return f"{gen.buf(p.read)}[{gen.step_ix(p.read, 1)}]"
        if isinstance(p, SeqRow):
            return f"{gen.v(p.node)}_seq[{gen.step_ix(p.node)}]"
        if isinstance(p, Carried):
            return f"{gen.v(p.node)}_buf"
        if isinstance(p, Work):
            return self.buffer_names[p]
        if isinstance(p, Channels):
            return _sub(self.place(p.parent), p.a, p.b)
        raise TypeError(f"not a place: {p!r}")

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
        for ct in sorted(n for n, p in self.fixed.items() if isinstance(p, Carried)):
            o(f"{gen.v(ct)}_buf = rt.empty(xp, {_step_shape(self.g.node(ct).shape)}, dtype, "
              f"{keep(gen.v(ct))})  # carried to the previous step")
        for key, shape in self.lm.buffers:
            # named after what it holds in the loop's main body, then in its peeled steps
            held = self.lm.held[key]
            ids = [n for main, n in held if main] + [n for main, n in held if not main]
            held = list(dict.fromkeys(gen.v(n) for n in ids))
            name = gen.names.work_buffer(ids)
            self.buffer_names[key] = name
            what = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            o(f"{name} = rt.empty(xp, {_step_shape(shape)}, dtype, {keep(name)})  "
              f"# work buffer of one step: {what}")

    # ------------------------------------------------------------ emission
    def emit(self, o: _Out, v: Variant) -> None:
        g, gen = self.g, self.gen
        key = next(k for k, x in self.lm.variants.items() if x is v)
        fused = {n: k for k in self.lm.kernels.get(key, []) for n, op, *_ in k.body
                 if op != "const"}  # its members (a literal stays a node of its own too)
        expr: dict[str, str] = {}
        needed_zero = self.emit_zero_sources(o, v)
        dest = {n: self.place(d) for n, d in v.dest.items()}

        def ex(x):
            x = v.resolve(x)
            if x in expr:
                return expr[x]
            if x in self.pos or x in self.source_set:
                return gen.v(x)
            return gen.at_step(x, self.block)

        for n in self.body:
            if n not in v.live:
                continue
            if n in fused:
                if n == fused[n].body[-1][0]:  # it runs where its last member was
                    self.emit_kernel(o, fused[n], dest, ex, expr)
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
                inside = v.resolve(n) in self.pos
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
                if isinstance(self.fixed.get(n), (StateRow, SeqRow)):
                    o(f"{self.place(self.fixed[n])} = {name}")
            expr[n] = name
            gen.check(o, n, name, step=True, backward=self.backward)


    def emit_zero_sources(self, o: _Out, v: Variant) -> set[str]:
        """Name the zero sources some computation reads; returns every zero value read."""
        g, gen = self.g, self.gen
        needed_zero = set()
        for n in self.body:
            if n in v.live and v.status[n] == COMPUTE:
                needed_zero.update(i for i in v.args[n]
                                   if v.status.get(i) == ZERO or i in v.zero_sources)
        for z in sorted(needed_zero & v.zero_sources):
            node = g.node(z)
            if node.op == "state":
                o(f"{gen.v(z)} = {gen.buf(z)}[{gen.step_ix(z)}]")
            else:
                o(f"{gen.v(z)} = xp.zeros({_step_shape(node.shape)}, dtype)")
        return needed_zero

    def emit_kernel(self, o: _Out, k, dest: dict, ex, expr: dict) -> None:
        """One fused kernel: its outputs bound to their places (a fresh array where the
        plan has none), then one call that computes every member."""
        gen, g = self.gen, self.g
        for n, op, *_ in k.body:
            if op != "const":
                o.loc_comment(g.node(n))
        outs = []
        for n in k.outputs:
            name = gen.v(n)
            if n in dest and n not in self.lm.fresh:
                o(f"{name} = {dest[n]}")
            else:
                o(f"{name} = rt.empty(xp, {_step_shape(g.node(n).shape)}, dtype)")
            outs.append(name)
            expr[n] = name
        ins = [ex(i) for i, _ in k.inputs]
        what = ", ".join(op for _, op, _, _ in k.body if op != "const")
        o(f"K.{self.gen.kernels.add(k)}({', '.join(outs + ins)})  # {what}")


class _KernelTable:
    """The fused kernels a module calls, each once (two loops often compute the same),
    named k0, k1, ... in the order they are first called; rendered as C at its end."""

    def __init__(self):
        self.by_code: dict[str, str] = {}
        self.kernels: list = []

    def add(self, k) -> str:
        code = same_kernel(k)
        if code not in self.by_code:
            name = f"k{len(self.kernels)}"
            self.by_code[code] = name
            self.kernels.append(dataclasses.replace(k, name=name))
        return self.by_code[code]

    def emit(self, o: _Out) -> None:
        if not self.kernels:
            return
        o()
        o()
        o("# The fused step kernels the loops above call (K.k0, ...), as C: runtime/fused.py")
        o("# compiles each for this CPU the first time a function runs in a dtype, and caches it.")
        self.emit_sources(o, "KERNELS", render_c_kernel)
        o()
        o()
        o("class ArrayKernels:")
        o('    """The same kernels over the array module (NumPy or CuPy), one call a statement:')
        o('    where the C or CUDA kernels cannot run (no compiler; CONVC_FUSE=array)."""')
        for k in self.kernels:
            o()
            o("    @staticmethod")
            for line in render_python_kernel(k):
                o("    " + line)
        o()
        o()
        o("# The same kernels as CUDA, for a GPU backend (CuPy's RawModule, one thread an")
        o("# element): each kernel's shape per sample, its number of outputs, its source.")
        self.emit_sources(o, "CUDA_KERNELS", render_cuda_kernel,
                          lambda k: f"{tuple(int(d) for d in k.shape)!r}, {len(k.outputs)}")
        o()
        o("FK = rt.FusedKernels(KERNELS, ArrayKernels, CUDA_KERNELS)")

    def emit_sources(self, o: _Out, var: str, render, meta=None) -> None:
        """{name: source} of every kernel, or {name: (meta..., source)}."""
        o(f"{var} = {{")
        for k in self.kernels:
            o(f'    {k.name!r}: {"(" + meta(k) + ", " if meta else ""}r"""')
            o.lines.extend(render(k).rstrip("\n").split("\n"))
            o('"""),' if meta else '""",')
        o("}")


def generate(low: Lowered, bw: Backward, sched: Schedule, debug_nans: bool = False,
             recompute: int | None = None,
             weight_gradient_layout: str | None = None, vjp=None, fuse: bool = False) -> str:
    """Plan the module (plan.py), then render it. `weight_gradient_layout`: what the
    target backend's capabilities declare (runtime/backend.py); `vjp`: the
    vector-Jacobian product's compile (driver.VjpCompiled), rendered as `vjp`."""
    if recompute is not None and (not isinstance(recompute, int) or recompute < 1):
        raise ValueError(f"recompute must be a whole number of steps >= 1, not {recompute!r}")
    fuse = fuse and not debug_nans  # --debug-nans checks every value: one NumPy call each
    plan = plan_module(low, bw, sched, recompute, weight_gradient_layout, fuse=fuse)
    main = Generator(low, bw, sched, plan, debug_nans=debug_nans)

    def vjp_generator(vc):
        vplan = plan_module(vc.lowered, vc.backward, vc.schedule, recompute,
                            weight_gradient_layout, vjp=True, fuse=fuse)
        gen = Generator(vc.lowered, vc.backward, vc.schedule, vplan, debug_nans=debug_nans)
        gen.kernels = main.kernels
        return gen

    vgen = None
    if vjp is not None:
        vgen = vjp_generator(vjp)
        if vjp.params_only is not None:
            vgen.params_only = vjp_generator(vjp.params_only)
            vgen.params_only.data = False
    main.vjp = vgen
    return main.module()

"""Lower a checked model to the graph IR: instantiate cells, inline their equations.

Each cell application becomes nodes of one time loop (a *segment*): layers
applied to the same sequence share a loop and run one after another at every
step; a cell that starts from another cell's final states (`init=enc`, the
encoder-forecaster of Shi et al. 2015) runs in a later loop. Data inputs and
targets are sequences of their own (segment ids starting with "@") with a
time *axis*; axes that meet in an operation must have the same length, which
also tells whether the task is next-frame prediction (the target shares the
input's axis) or forecasting (it has its own).

Equations are lowered on demand, so a cell's equations may come in any
order; a name reached again while it is being lowered is an instantaneous
cycle (a state read without [t-1]), which the checker reported.

Lowering assumes a checked program: every semantic error (E2xx) is the
checker's (spec/checker.py, spec/elaborate.py, which goes through the model
as this does, with abstract values); lowering reports only shape errors
(E3xx). Where it meets a semantic error, the checker reported it there, and
the statement fails quietly (`_reported`; an AssertionError in a program
the checker passed).

After an error lowering goes on: a statement that fails (or that the checker
reported, `Program.broken`) leaves no nodes behind, and the names it would
have defined hold a poison value (`_FAILED`) that fails whatever reads them
without another word, so each independent error is reported once. Inside a
cell the same holds per weight and per equation, and an application whose
state updates or outputs failed fails as a whole (after one weight fails,
the others are not tried: the parameters that sized it would fail them too).

Where an error inside a cell is reported: see spec/sites.py (a shape error
in a cell of the standard library is moved to the user's application of it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from convc.spec import ast as A
from convc.spec.builtins import FUNCTIONS, LOSSES, WEIGHTS
from convc.spec.diagnostics import Loc
from convc.spec.elaborate import WORDS, ConstError, Failed, Opaque, const_value, positive_int
from convc.spec.loader import Program
from convc.spec.sites import Site, SiteReporter, in_library, relocate  # noqa: F401 (in_library: also others')

from .ir import Graph, Node, data_name, data_seg, is_data_seg, loop_seg
from .ops import OPS, ShapeError, broadcast, fmt_shape


@dataclass
class Segment:
    """One time loop: the cells that step together over one sequence."""

    id: str
    axis: str
    index: int
    states: list[str] = field(default_factory=list)  # state-read node ids
    cells: list[str] = field(default_factory=list)  # instance names


@dataclass
class ParamSpec:
    name: str
    node: str
    kind: str  # kernel, bias, hadamard, state
    init: object
    loc: Loc


@dataclass
class Lowered:
    """The model's graph plus what codegen and the runtime need to know about it."""

    name: str
    doc: str | None
    graph: Graph
    segments: list[Segment]
    params: dict[str, ParamSpec]
    inputs: dict[str, str]
    targets: dict[str, str]
    outputs: dict[str, str]
    losses: list[str]
    axis_of: dict[str, str]  # data sequence name -> axis
    train: dict
    cells: dict[str, str]  # instance -> cell name
    cell_docs: dict[str, str | None]
    file: str
    warnings: list = field(default_factory=list)
    sites: dict = field(default_factory=dict)  # instance -> Site
    loc_owner: dict = field(default_factory=dict)  # Loc -> instance that first made a node there
    diagnostics: list = field(default_factory=list)  # what lowering reported (strict=False)

    def locate(self, code: str, node) -> tuple[Loc, tuple[str, ...]]:
        """Where to report an error found later (shape inference) at `node`, and the notes."""
        inst = node.attrs.get("_instance") or self.loc_owner.get(node.loc)
        return relocate(code, node.loc, self.sites.get(inst))

    @property
    def task(self) -> str:
        """next_frame when targets share the inputs' time axis, else forecast."""
        in_axes = {self.axis_of[n] for n in self.inputs}
        t_axes = {self.axis_of[n] for n in self.targets}
        return "next_frame" if t_axes <= in_axes else "forecast"


class Tensor(Opaque):
    __slots__ = ("id",)

    def __init__(self, nid: str):
        self.id = nid

    def __repr__(self):
        return f"Tensor({self.id})"


class Tup(Opaque):
    def __init__(self, items):
        self.items = list(items)


@dataclass
class Instance(Opaque):
    name: str
    cell: A.CellDef
    params: dict
    loc: Loc
    applied: bool = False
    seg: str | None = None
    finals: dict = field(default_factory=dict)  # state name -> update node id
    weights: dict = field(default_factory=dict)  # weight name -> node (shared across uses)
    site: Site | None = None
    failed: bool = False  # its application reported an error: nothing may start from it


class _Fail(Exception):
    """Abort lowering one statement after a diagnostic was recorded."""


_FAILED = object()  # the value of a name whose definition already reported an error


def _defines(st) -> tuple[str, ...]:
    """The names a model or cell statement defines."""
    if isinstance(st, A.Equation):
        return st.targets
    if isinstance(st, (A.SeqDecl, A.WeightDecl)):
        return (st.name,)
    return ()


class Lowerer:
    def __init__(self, prog: Program, model: A.ModelDef):
        self.prog = prog
        self.model = model
        self.g = Graph()
        self.rep = SiteReporter(self)
        self.broken = prog.broken  # statements the checker reported: skipped without a word
        self.checker_errors = getattr(prog, "checker_errors", None)
        self.site: Site | None = None  # the instance whose cell is being lowered, if any
        self.loc_owner: dict[Loc, str] = {}
        self.segments: dict[str, Segment] = {}
        self.axis_parent: dict[str, str] = {}
        self.params: dict[str, ParamSpec] = {}
        self.inputs: dict[str, str] = {}
        self.targets: dict[str, str] = {}
        self.outputs: dict[str, str] = {}
        self.losses: list[str] = []
        self.train: dict = {}
        self.instances: dict[str, Instance] = {}
        self.default_seg: dict[str, str] = {}
        self.cell_docs: dict[str, str | None] = {}
        self.current_instance: str | None = None  # the cell being elaborated, if any
        # in a cell run without input, a per-step value (its first state at t-1) that gives
        # a value computed from its zeros alone its batch and time axes (_expanded)
        self.zero_ref: str | None = None

    # ------------------------------------------------------------ axes and segments
    def axis(self, a: str) -> str:
        while self.axis_parent.get(a, a) != a:
            a = self.axis_parent[a]
        return a

    def unify_axes(self, a: str, b: str) -> None:
        ra, rb = self.axis(a), self.axis(b)
        if ra != rb:
            # the root is the sequence declared first, so T_x names the input's length
            order = list(self.inputs) + list(self.targets)
            ka = order.index(ra) if ra in order else len(order)
            kb = order.index(rb) if rb in order else len(order)
            if kb < ka:
                ra, rb = rb, ra
            self.axis_parent[rb] = ra

    def seg_index(self, seg: str | None) -> int:
        if seg is None:
            return -2
        if is_data_seg(seg):
            return -1
        return self.segments[seg].index

    def seg_axis(self, seg: str) -> str:
        return data_name(seg) if is_data_seg(seg) else self.segments[seg].axis

    def new_segment(self, axis: str) -> str:
        sid = loop_seg(len(self.segments))
        self.segments[sid] = Segment(sid, axis, len(self.segments))
        return sid

    # ------------------------------------------------------------ nodes
    def node(self, op: str, inputs, loc: Loc, base: str | None = None, seg=-1, **attrs) -> str:
        inputs = tuple(inputs)
        folded = self._folded(op, inputs, attrs, loc)
        if folded is not None:
            return folded
        if self.current_instance is not None:
            attrs.setdefault("_instance", self.current_instance)
        if self.site is not None:
            self.loc_owner.setdefault(loc, self.site.name)
        if seg == -1:
            seg = self.join_segments([self.g.node(i).seg for i in inputs], loc)
        nid = self.g.fresh(base or op)
        node = Node(nid, op, inputs, attrs, None, loc, seg)
        self.g.add(node)
        try:
            node.shape = OPS[op].shape([self.g.node(i).shape for i in inputs], attrs)
        except ShapeError as e:
            self.g.remove(nid)  # what stays in the graph has a shape (lowering goes on)
            shapes = [fmt_shape(self.g.node(i).shape) for i in inputs]
            msg = f"{_opname(op)}: {e}"
            if not all(s in msg for s in shapes):  # say what met, when the rule did not
                msg += f" (operands {', '.join(shapes)})"
            self.rep.error("E300", msg, loc)
            raise _Fail() from None
        if seg is None and OPS[op].elementwise:
            self._imply(node)
        return nid

    def _folded(self, op: str, inputs, attrs: dict, loc: Loc) -> str | None:
        """An elementwise op of the zeros of an input not given (or of what they gave), as
        the constant it is, of the shape they stand for: tanh(0), sigmoid(0) = 0.5, and a
        product with zeros, `conv(x, W) * h[t-1]`, is zeros. Folded here, not only in
        passes.fold_constants, so that a state's new value or an output made of them is
        seen to be the same at every step (it then takes the state's shape, _update)."""
        if not OPS[op].elementwise or not inputs:
            return None
        nodes = [self.g.node(i) for i in inputs]
        zeros = [n for n in nodes if n.op == "const" and "_implied" in n.attrs]
        if not zeros:
            return None
        if all(n.op == "const" for n in nodes) and OPS[op].ref is not None:
            public = {k: v for k, v in attrs.items() if not k.startswith("_") and k != "keep"}
            value = float(np.asarray(OPS[op].ref(*[np.float64(n.attrs["value"]) for n in nodes],
                                                 **public)))
        elif op == "mul" and any(n.attrs["value"] == 0.0 for n in zeros):
            value = 0.0
        else:
            return None
        try:
            implied = broadcast([n.attrs.get("_implied") or n.shape or () for n in nodes])
        except ShapeError:
            return None  # the op's own shape rule reports it
        c = self.const(value, loc)
        self.g.node(c).attrs["_implied"] = implied
        return c

    def _imply(self, node: Node) -> None:
        """A value the same at every step computed from the zeros of an input not given
        (`tanh(conv(x, W) + b)` in a forecaster: a scalar or [C, 1, 1] at run time) keeps
        the shape those zeros stand for, `_implied`, as lowering's hint where a state or a
        cell's output needs a per-step array of it (`_expanded`)."""
        implied = [self.g.node(i).attrs.get("_implied") for i in node.inputs]
        if not any(implied):
            return
        try:
            node.attrs["_implied"] = broadcast([
                s or self.g.node(i).shape or () for s, i in zip(implied, node.inputs)])
        except ShapeError:
            pass  # the op's own shape rule says what does not fit

    def join_segments(self, segs, loc: Loc) -> str | None:
        segs = [s for s in segs if s is not None]
        if not segs:
            return None
        best = max(segs, key=self.seg_index)
        for s in segs:
            if s != best:
                self.unify_axes(self.seg_axis(s), self.seg_axis(best))
        return best

    def const(self, value: float, loc: Loc) -> str:
        return self.node("const", (), loc, base="c", seg=None, value=float(value))

    def _reported(self) -> "_Fail":
        """A semantic error here: the checker reported it (spec/elaborate.py goes through
        the model as this does), so this statement fails without a word, like one the
        checker marked broken. Lowering assumes a checked program: in one without errors
        this cannot happen."""
        if self.checker_errors is False:
            raise AssertionError("lowering met a semantic error the checker did not report")
        return _Fail()

    # ------------------------------------------------------------ the model
    def run(self, strict: bool = True) -> Lowered:
        """The lowered model; with strict=False also after errors (in `.diagnostics`)."""
        env: dict[str, object] = {}
        for st in self.model.body:
            if id(st) in self.broken:  # the checker reported it
                for n in _defines(st):
                    env[n] = _FAILED
                continue
            mark = self.g._counter
            try:
                self.model_stmt(st, env)
            except _Fail:
                # names this statement would have defined: quietly unusable from now on
                for n in _defines(st):
                    env[n] = _FAILED
                self._drop_nodes_after(mark)
                continue
        if strict:
            self.rep.check()
        for seg in self.segments.values():
            seg.axis = self.axis(seg.axis)
        return Lowered(self.model.name, self.model.doc, self.g, list(self.segments.values()),
                       self.params, self.inputs, self.targets, self.outputs, self.losses,
                       {n: self.axis(n) for n in list(self.inputs) + list(self.targets)},
                       self.train, {k: v.cell.name for k, v in self.instances.items()},
                       self.cell_docs, self.model.loc.file,
                       sites={k: v.site for k, v in self.instances.items() if v.site},
                       loc_owner=self.loc_owner, diagnostics=list(self.rep.diagnostics))

    def _drop_nodes_after(self, mark: int) -> None:
        """Remove what a failed statement built: the graph stays one of the statements that
        worked, for the checks that follow (parameters and loops of the removed nodes are
        pruned with them, see driver._prune_params)."""
        for nid in [n for n in self.g.g.nodes if self.g.node(n).order > mark]:
            self.g.remove(nid)
        for name in [n for n, p in self.params.items() if p.node not in self.g]:
            del self.params[name]
        for seg in self.segments.values():
            seg.states = [r for r in seg.states if r in self.g]

    def model_stmt(self, st, env) -> None:
        if isinstance(st, A.SeqDecl):
            shape = tuple(int(d.value) for d in st.shape)
            op = "input"
            nid = self.node(op, (), st.loc, base=st.name, seg=data_seg(st.name), shape=shape,
                            kind=st.kind, seq=st.name)
            (self.inputs if st.kind == "input" else self.targets)[st.name] = nid
            env[st.name] = Tensor(nid)
        elif isinstance(st, A.WeightDecl):
            env[st.name] = self.weight(st, env, prefix="")
        elif isinstance(st, A.Equation):
            v = st.value
            if isinstance(v, A.Call) and v.func_name in self.prog.cells and \
                    not isinstance(env.get(v.func_name), Instance):
                inst = self.instantiate(v, self.prog.cells[v.func_name], st.targets[0], env)
                env[st.targets[0]] = inst
                return
            if isinstance(v, A.Call) and isinstance(v.func, A.Call) and \
                    v.func.func_name in self.prog.cells:
                inst = self.instantiate(v.func, self.prog.cells[v.func.func_name],
                                        st.targets[0], env)
                result = self.apply(inst, v, env)
            elif isinstance(v, A.Call) and isinstance(env.get(v.func_name), Instance):
                result = self.apply(env[v.func_name], v, env)
            else:
                result = self.expr(v, env, model=True)
            self.bind(st, result, env)
        elif isinstance(st, A.OutputDecl):
            for n, loc in zip(st.names, st.locs):
                v = env.get(n)
                if v is _FAILED:
                    continue
                if not isinstance(v, Tensor):  # E205, the checker's
                    self._reported()
                    continue
                self.outputs[n] = v.id
        elif isinstance(st, A.Loss):
            self.loss(st, env)
        elif isinstance(st, A.Train):
            for s in st.settings:
                self.train[s.name] = self.const_value(s.value, env)

    def bind(self, st: A.Equation, result, env) -> None:
        locs = st.target_locs or (st.loc,) * len(st.targets)
        if len(st.targets) == 1:
            if isinstance(result, Tup):
                raise self._reported()
            env[st.targets[0]] = result
            self.rename(result, st.targets[0])
            return
        items = result.items if isinstance(result, Tup) else [result]
        if len(items) != len(st.targets):
            raise self._reported()
        for n, v, loc in zip(st.targets, items, locs):
            env[n] = v
            self.rename(v, n)

    def rename(self, v, name: str, prefix: str = "") -> None:
        """Give a node the spec's name (h_enc, not add_3) where it has none yet."""
        if not isinstance(v, Tensor):
            return
        node = self.g.node(v.id)
        if node.attrs.get("_named") or node.op in ("input", "param", "state", "const"):
            return
        base = f"{name}_{prefix}" if prefix else name
        new = self.g.fresh(base)
        self._relabel(v.id, new)
        v.id = new
        self.g.node(new).attrs["_named"] = name  # the spec's name for it

    def _relabel(self, old: str, new: str) -> None:
        self.g.relabel(old, new)
        for n in self.g.g.nodes:
            nd = self.g.node(n)
            if old in nd.inputs:
                nd.inputs = tuple(new if i == old else i for i in nd.inputs)
            if nd.attrs.get("update") == old:
                nd.attrs["update"] = new
            if nd.attrs.get("init_from") == old:
                nd.attrs["init_from"] = new
        for table in (self.inputs, self.targets, self.outputs):
            for k, v in table.items():
                if v == old:
                    table[k] = new
        self.losses = [new if x == old else x for x in self.losses]
        for p in self.params.values():
            if p.node == old:
                p.node = new
        for inst in self.instances.values():
            for k, v in inst.finals.items():
                if v == old:
                    inst.finals[k] = new
        self._renamed[old] = new

    _renamed: dict = {}

    # ------------------------------------------------------------ constants
    def const_value(self, e, env):
        """The value of a constant expression (spec/elaborate.py: the checker's own)."""
        try:
            return const_value(e, env, _FAILED)
        except Failed:
            raise _Fail() from None
        except ConstError:
            raise self._reported() from None

    # ------------------------------------------------------------ weights
    def weight(self, st: A.WeightDecl, env, prefix: str) -> Tensor:
        call = st.value
        sig = WEIGHTS[call.func_name]
        args = dict(zip(sig.positional, (self.const_value(a, env) for a in call.args)))
        kw = dict(sig.keywords)
        for k in call.kwargs:
            kw[k.name] = self.const_value(k.value, env) if k.name != "init" else \
                self._init_value(k.value, env)
        args.update({k: v for k, v in kw.items() if k in sig.positional})
        name = f"{prefix}.{st.name}" if prefix else st.name
        kind = call.func_name
        for key in ("out", "channels"):
            if key in args and not positive_int(args[key]):
                raise self._reported()
        if kind == "kernel":
            size = args["size"]
            if positive_int(size):
                size = (size, size)
            if not (isinstance(size, tuple) and len(size) == 2 and
                    all(positive_int(v) for v in size)):
                raise self._reported()
            kh, kw_ = size
            shape = (args["out"], None, kh, kw_)
        elif kind == "bias" and not kw.get("per_pixel"):
            shape = (args["channels"],)
        else:
            shape = (args["channels"], None, None)
        nid = self.node("param", (), st.loc, base=name.replace(".", "_"), seg=None,
                        shape=shape, name=name)
        self.params[name] = ParamSpec(name, nid, kind if kind != "bias" or not kw.get(
            "per_pixel") else "bias_pixel", kw.get("init"), st.loc)
        if len(shape) == 1:
            # a per-channel bias is stored as [C] and used as [C, 1, 1]
            view = self.node("reshape", (nid,), st.loc, base=name.replace(".", "_") + "_c",
                             seg=None, shape=(shape[0], 1, 1))
            return Tensor(view)
        return Tensor(nid)

    def _init_value(self, e, env):
        if isinstance(e, A.Name):
            return e.id
        return self.const_value(e, env)

    # ------------------------------------------------------------ cells
    def instantiate(self, call: A.Call, cell: A.CellDef, name: str, env) -> Instance:
        if id(cell) in self.broken:  # its parameters or declarations were reported
            raise _Fail()
        values: dict = {}
        names = [p.name for p in cell.params]
        args: dict[str, Loc] = {}
        for p, a in zip(names, call.args):
            values[p] = self.const_value(a, env)
            args[p] = a.loc
        for kw in call.kwargs:
            values[kw.name] = self.const_value(kw.value, env)
            args[kw.name] = kw.loc
        site = Site(name, cell, call.loc, args)
        for p in cell.params:
            if p.name not in values:
                if p.default is None:
                    raise self._reported()
                self.site, site.here = site, p.default
                try:
                    values[p.name] = self.const_value(p.default, values)
                finally:
                    self.site = site.here = None
        inst = Instance(name, cell, values, call.loc, site=site)
        if name in self.instances:
            raise self._reported()
        self.instances[name] = inst
        self.cell_docs[cell.name] = cell.doc
        return inst

    def apply(self, inst: Instance, call: A.Call, env):
        if inst.applied:
            raise self._reported()
        inst.applied = True
        if inst.site is not None:
            inst.site.applied = call.loc
        try:
            return self._apply(inst, call, env)
        except _Fail:
            inst.failed = True
            raise

    def _apply(self, inst: Instance, call: A.Call, env):
        inputs = [self.expr(a, env, model=True) for a in call.args]
        for x, a in zip(inputs, call.args):
            if not isinstance(x, Tensor) or self.g.node(x.id).seg is None:
                raise self._reported()
        kw = {k.name: k for k in call.kwargs}
        init_from = None
        if "init" in kw:
            src = env.get(kw["init"].value.id) if isinstance(kw["init"].value, A.Name) else None
            if src is _FAILED or isinstance(src, Instance) and src.failed:
                raise _Fail()  # reported where it failed
            if not isinstance(src, Instance) or not src.applied or src is inst:
                raise self._reported()
            init_from = src
        steps_axis = None
        if "steps" in kw:
            src = self.expr(kw["steps"].value, env, model=True)
            if not isinstance(src, Tensor) or not is_data_seg(self.g.node(src.id).seg):
                raise self._reported()
            steps_axis = data_name(self.g.node(src.id).seg)
        # which loop runs this cell
        in_segs = [self.g.node(x.id).seg for x in inputs]
        if in_segs:
            cand = self.join_segments(in_segs, call.loc)
        elif steps_axis is not None:
            cand = data_seg(steps_axis)
        else:
            raise self._reported()
        if is_data_seg(cand):
            axis = data_name(cand)
            seg = self.default_seg.get(self.axis(axis))
            if seg is None or (init_from and self.seg_index(init_from.seg) >= self.seg_index(seg)):
                seg = self.new_segment(axis)
                self.default_seg.setdefault(self.axis(axis), seg)
        else:
            seg = cand
            if init_from is not None and self.seg_index(init_from.seg) >= self.seg_index(seg):
                seg = self.new_segment(self.segments[cand].axis)
        if steps_axis is not None:
            self.unify_axes(self.segments[seg].axis, steps_axis)
        inst.seg = seg
        self.segments[seg].cells.append(inst.name)
        # an input not given is zeros of the shape of the frames the cell steps over
        frames = self.g.node(src.id if steps_axis is not None else inputs[0].id).shape
        return self.elaborate(inst, inputs, init_from, seg, call.loc, frames)

    def elaborate(self, inst: Instance, inputs, init_from, seg: str, loc: Loc,
                  zero_shape: tuple | None = None):
        self.current_instance = inst.name
        self.site = inst.site
        if self.site is not None:
            self.site.here = None
        try:
            return self._elaborate(inst, inputs, init_from, seg, loc, zero_shape)
        finally:
            self.current_instance = None
            if self.site is not None:
                self.site.here = None
            self.site = None
            self.zero_ref = None

    def _at(self, here) -> None:
        """Say which statement of the cell is being lowered (for `_blamed_argument`)."""
        if self.site is not None:
            self.site.here = here

    def _elaborate(self, inst: Instance, inputs, init_from, seg: str, loc: Loc,
                   zero_shape: tuple | None):
        cell = inst.cell
        env: dict[str, object] = dict(inst.params)
        body = self.flatten(cell.body, env)
        eqs: dict[str, A.Equation] = {}
        states: dict[str, A.StateDecl] = {}
        outputs: list[tuple[str, Loc]] = []
        input_names: list[str] = []
        # a state update or an output failed: the application fails once all is checked
        # (a weight or an equation they do not read may fail alone)
        failed = False
        bad_weight = False
        for st in body:
            if isinstance(st, A.InputDecl):
                input_names.extend(st.names)
            elif isinstance(st, A.StateDecl):
                states[st.name] = st
            elif isinstance(st, A.WeightDecl):
                self._at(st)
                try:
                    # after one weight the parameters do not fit, the others would say so too
                    if id(st) in self.broken or bad_weight:
                        raise _Fail()
                    env[st.name] = self.weight(st, env, prefix=inst.name)
                except _Fail:
                    env[st.name] = _FAILED
                    bad_weight = True
            elif isinstance(st, A.Equation):
                for i, t in enumerate(st.targets):
                    eqs[t] = (st, i)
            elif isinstance(st, A.OutputDecl):
                failed |= id(st) in self.broken
                outputs.extend(zip(st.names, st.locs))
        if len(inputs) > len(input_names):
            raise self._reported()
        for i, n in enumerate(input_names):
            if i < len(inputs):
                env[n] = inputs[i]
            else:
                # the scalar 0 wherever it broadcasts, which remembers the shape it stands
                # for (`_implied`: what a concat widens by, a split divides, a conv over it
                # gives; see _folded and _imply)
                env[n] = Tensor(self.const(0.0, loc))
                self.g.node(env[n].id).attrs["_implied"] = \
                    tuple(zero_shape) if zero_shape and len(zero_shape) == 3 else (None,) * 3
        # state reads: the value at t-1
        reads: dict[str, str] = {}
        for name, st in states.items():
            init_kind = st.init
            attrs = dict(state=f"{inst.name}.{name}", init=init_kind)
            if init_from is not None:
                if name not in init_from.finals:
                    raise self._reported()
                attrs.update(init="final", init_from=init_from.finals[name])
            rid = self.node("state", (), st.loc, base=f"{name}_{inst.name}_prev", seg=seg,
                            shape=(None, None, None), **attrs)
            if attrs["init"] == "learned":
                pname = f"{inst.name}.{name}0"
                pid = self.node("param", (), st.loc, base=pname.replace(".", "_"), seg=None,
                                shape=(None, None, None), name=pname)
                self.params[pname] = ParamSpec(pname, pid, "state", 0.0, st.loc)
                self.g.node(rid).attrs["init_from"] = pid
            reads[name] = rid
            self.segments[seg].states.append(rid)
        if len(inputs) < len(input_names):
            self.zero_ref = next(iter(reads.values()), None)
        cur: dict[str, Tensor] = {}
        busy: set[str] = set()
        scope = _CellScope(self, inst, env, eqs, reads, cur, busy)
        for name, st in states.items():
            if name not in eqs:
                continue
            try:
                self._update(inst, scope, name, st, reads, cur, seg)
            except _Fail:
                failed = True
        # every equation is lowered, even when no output needs it, to report its errors
        for name in eqs:
            try:
                scope.value(name, eqs[name][0].loc)
            except _Fail:
                pass  # reported; what reads it fails too
        result = []
        for n, oloc in outputs:
            try:
                result.append(self._expanded(scope.value(n, oloc), oloc, seg, f"{n}_{inst.name}"))
            except _Fail:
                failed = True
        if failed:
            raise _Fail()  # each error was reported where it is; what uses the result is not
        return result[0] if len(result) == 1 else Tup(result)

    def _update(self, inst: Instance, scope: "_CellScope", name: str, st: A.StateDecl,
                reads, cur, seg: str) -> None:
        """Lower a state's equation and link it to the state's read at t-1."""
        upd = scope.value(name, st.loc)
        if not isinstance(upd, Tensor):
            raise self._reported()
        upd_node = self.g.node(upd.id)
        if upd_node.seg is None:
            # the same at every step (in a cell run without input, what its zeros fold to):
            # an array of the state's shape, which comes from its start (init=) or else
            # from the shape the zeros stand for
            ident = self.node("expand", (upd.id, reads[name]), st.loc, base=f"{name}_{inst.name}",
                              seg=seg, shape=upd_node.attrs.get("_implied"), like=True,
                              keep=True)
            upd = Tensor(ident)
            cur[name] = upd
        elif upd_node.op in ("state", "param", "const", "input") or upd_node.seg != seg:
            # the state's new value must be a node of this loop that the read can point at
            ident = self.node("scale", (upd.id,), st.loc, base=f"{name}_{inst.name}",
                              seg=seg, factor=1.0, keep=True)
            upd = Tensor(ident)
            cur[name] = upd
        self.g.link_state(reads[name], upd.id)
        inst.finals[name] = upd.id

    def flatten(self, body, env) -> list:
        """Statements with `if` resolved from the cell's parameter values."""
        out = []
        stack = list(reversed(body))
        while stack:
            st = stack.pop()
            if isinstance(st, A.If):
                self._at(st)
                cond = self.const_value(st.cond, env)
                if not isinstance(cond, bool):
                    raise self._reported()
                stack.extend(reversed(st.then if cond else st.orelse))
            else:
                out.append(st)
        return out

    # ------------------------------------------------------------ expressions
    def expr(self, e, env, model=False, scope=None):
        if isinstance(e, (A.Num, A.Str, A.Bool)):
            return e.value
        if isinstance(e, A.Name):
            if scope is not None:
                return scope.value(e.id, e.loc)
            if e.id in env:
                if env[e.id] is _FAILED:
                    raise _Fail()
                return env[e.id]
            if e.id in WORDS:
                return e.id
            raise self._reported()
        if isinstance(e, A.Delayed):
            if scope is None:
                raise self._reported()
            return scope.delayed(e)
        if isinstance(e, A.Neg):
            v = self.expr(e.operand, env, model, scope)
            if isinstance(v, Tensor):
                return Tensor(self.node("neg", (v.id,), e.loc))
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise self._reported()
            return -v
        if isinstance(e, A.BinOp):
            return self.binop(e, self.expr(e.left, env, model, scope),
                              self.expr(e.right, env, model, scope))
        if isinstance(e, A.TupleExpr):
            return tuple(self.expr(x, env, model, scope) for x in e.items)
        if isinstance(e, A.Call):
            return self.call(e, env, model, scope)
        raise AssertionError(e)

    def binop(self, e: A.BinOp, a, b):
        ta, tb = isinstance(a, Tensor), isinstance(b, Tensor)
        num = (int, float)
        if not ta and not tb:
            if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool):
                if e.op == "/" and b == 0:
                    raise self._reported()
                return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b,
                        "/": lambda: a / b}[e.op]()
            raise self._reported()
        for v in (a, b):
            if not isinstance(v, (Tensor, int, float)) or isinstance(v, bool):
                raise self._reported()
        if e.op == "/":
            if tb or b == 0:
                raise self._reported()
            return Tensor(self.node("scale", (a.id,), e.loc, factor=1.0 / b))
        if e.op == "*" and (not ta or not tb):
            t, c = (a, b) if ta else (b, a)
            return Tensor(self.node("scale", (t.id,), e.loc, factor=float(c)))
        ids = [x.id if isinstance(x, Tensor) else self.const(x, e.loc) for x in (a, b)]
        op = {"+": "add", "-": "sub", "*": "mul"}[e.op]
        return Tensor(self.node(op, ids, e.loc))

    def call(self, e: A.Call, env, model, scope):
        fname = e.func_name
        if fname not in FUNCTIONS:
            if env.get(fname) is _FAILED:  # its definition was reported already
                raise _Fail()
            raise self._reported()
        args = [self.expr(a, env, model, scope) for a in e.args]
        kwargs = {k.name: self.expr(k.value, env, model, scope) for k in e.kwargs}
        for a, src in zip(args, e.args):
            if fname != "split" or src is e.args[0]:
                if not isinstance(a, Tensor):
                    raise self._reported()
        if fname == "conv":
            return Tensor(self.conv(e, args, kwargs))
        if fname in OPS and OPS[fname].function:
            return Tensor(self.node(fname, (args[0].id,), e.loc))
        if fname == "concat":
            return self.concat(args, e.loc)
        if fname == "split":
            x, n = args[0], args[1] if len(args) > 1 else kwargs.get("n")
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise self._reported()
            xnode = self.g.node(x.id)
            implied = xnode.attrs.get("_implied")
            shape = xnode.shape
            if implied is not None and not shape:
                # one value in every channel (the zeros of an input not given, or what is
                # computed from them alone): n parts of it, whose channels may stay unknown
                c = implied[0]
                if c is not None and c % n:
                    self.rep.error("E302", f"split into {n} parts does not divide {c} channels "
                                   f"(shape {fmt_shape(implied)})", e.loc)
                    raise _Fail()
                parts = []
                for _ in range(n):
                    p = self.const(xnode.attrs["value"], e.loc) if xnode.op == "const" else \
                        self.node("scale", (x.id,), e.loc, factor=1.0)
                    self.g.node(p).attrs["_implied"] = (None if c is None else c // n,) + \
                        tuple(implied[1:])
                    parts.append(Tensor(p))
                return Tup(parts)
            c = shape[0] if shape else None
            if c is None:
                self.rep.error("E303", "cannot infer the channels of the value to split", e.loc)
                raise _Fail()
            if c % n:
                self.rep.error("E302", f"split into {n} parts does not divide {c} channels "
                               f"(shape {fmt_shape(shape)})", e.loc)
                raise _Fail()
            k = c // n
            parts = [self.node("slice", (x.id,), e.loc, start=i * k, stop=(i + 1) * k)
                     for i in range(n)]
            if implied is not None:
                for p in parts:
                    self.g.node(p).attrs["_implied"] = (k,) + tuple(implied[1:])
            return Tup([Tensor(p) for p in parts])
        raise AssertionError(fname)

    def concat(self, args, loc: Loc):
        """concat, where the zeros of an input not given become zero channels of a neighbour.

        concat(0, h) is pad_zeros(h, before=C0): the channels stay where they
        are (a kernel over them has columns for the zeros), and a conv over it
        later folds to a conv of h with the kernel's other columns
        (passes.fold_zero_channels).
        """
        parts: list[list] = []  # [node id or None (all zeros so far), before, after]
        pending = 0
        for a in args:
            node = self.g.node(a.id)
            if node.op == "const" and node.attrs.get("value") == 0.0 and "_implied" in node.attrs:
                c = node.attrs["_implied"][0]
                if c is None:
                    self.rep.error("E303", "cannot infer the channels of the zeros that stand "
                                   "for an input not given; give the cell its input", loc)
                    raise _Fail()
                if parts:
                    parts[-1][2] += c
                else:
                    pending += c
                continue
            parts.append([a.id, pending if not parts else 0, 0])
            pending = 0
        if not parts:  # only zeros: still the scalar 0, now that many channels wide
            zero = self.const(0.0, loc)
            frame = self.g.node(args[0].id).attrs["_implied"]
            self.g.node(zero).attrs["_implied"] = (pending,) + tuple(frame[1:])
            return Tensor(zero)
        ids = []
        for nid, before, after in parts:
            nid = self._expanded(nid, loc)
            if before or after:
                nid = self.node("pad_zeros", (nid,), loc, before=before, after=after)
            ids.append(nid)
        if len(ids) == 1:
            return Tensor(ids[0])
        return Tensor(self.node("concat", ids, loc))

    def _expanded(self, v, loc: Loc, seg: str | None = None, base: str | None = None):
        """`v` as a per-step array where it is the same at every step and computed from the
        zeros of an input not given (`sigmoid(conv(x, W))` in a forecaster: the scalar 0.5),
        for what needs its every pixel: a cell's output, a concat, a conv (of ones other
        than zeros, which fold away). Anything else is `v` itself."""
        nid = v.id if isinstance(v, Tensor) else v
        node = self.g.node(nid) if isinstance(nid, str) else None
        if node is None or node.seg is not None or self.zero_ref is None or \
                "_implied" not in node.attrs or \
                (node.op == "const" and node.attrs["value"] == 0.0 and seg is None):
            return v
        implied = node.attrs["_implied"]
        if None in implied:
            self.rep.error("E303", f"cannot infer the shape of this value (got "
                           f"{fmt_shape(implied)}): it is computed from the zeros of an input "
                           "not given alone; give the cell its input", loc)
            raise _Fail()
        ref = self.zero_ref
        out = self.node("expand", (nid, ref), loc, base=base, seg=seg or self.g.node(ref).seg,
                        shape=tuple(implied), like=False)
        return Tensor(out) if isinstance(v, Tensor) else out

    def conv(self, e: A.Call, args, kwargs) -> str:
        x, w = args[0], args[1]
        wnode = self.g.node(w.id)
        if wnode.op != "param" or wnode.shape is None or len(wnode.shape) != 4:
            raise self._reported()
        kh, kw = wnode.shape[2], wnode.shape[3]

        def pair(v, what):
            if isinstance(v, int) and not isinstance(v, bool):
                v = (v, v)
            if not (isinstance(v, tuple) and len(v) == 2 and all(isinstance(i, int) for i in v)
                    and min(v) >= (0 if what == "padding" else 1)):
                raise self._reported()
            return v

        stride = pair(kwargs.get("stride", 1), "stride")
        dil = pair(kwargs.get("dilation", 1), "dilation")
        padding = kwargs.get("padding", "same")
        if padding == "same":
            if (dil[0] * (kh - 1)) % 2 or (dil[1] * (kw - 1)) % 2:
                raise self._reported()
            pad = (dil[0] * (kh - 1) // 2, dil[1] * (kw - 1) // 2)
        elif padding == "valid":
            pad = (0, 0)
        else:
            pad = pair(padding, "padding")
        xnode = self.g.node(x.id)
        if xnode.op == "const" and xnode.attrs["value"] == 0.0:
            # a cell run without input: its input convolutions are zeros, of the kernel's
            # output channels and the frames' height and width (whatever the zeros' channels)
            zero = self.const(0.0, e.loc)
            frame = tuple(xnode.attrs.get("_implied") or (None,) * 3)
            try:
                self.g.node(zero).attrs["_implied"] = OPS["conv"].shape(
                    [(None,) + frame[1:], wnode.shape], dict(stride=stride, pad=pad, dilation=dil))
            except ShapeError as err:
                self.rep.error("E300", f"conv: {err}", e.loc)
                raise _Fail() from None
            return zero
        return self.node("conv", (self._expanded(x.id, e.loc), w.id), e.loc, stride=stride,
                         pad=pad, dilation=dil)

    # ------------------------------------------------------------ losses
    def loss(self, st: A.Loss, env) -> None:
        call = st.value
        fname = call.func_name
        sig = LOSSES[fname]
        args = [self.expr(a, env, model=True) for a in call.args]
        kw = {k.name: self.const_value(k.value, env) for k in call.kwargs}
        steps = kw.get("steps", sig.keywords["steps"])
        pred, target = args
        if not isinstance(pred, Tensor) or not isinstance(target, Tensor) or \
                any(self.g.node(v.id).seg is None for v in args) or \
                any(self.g.node(n).op == "param" for n in self.g.ancestors(target.id)):
            # the checker's: two sequences, the target not computed from weights (the
            # losses' VJPs give a cotangent to the prediction only)
            raise self._reported()
        op = {"bce": "bce", "mse": "mse", "cross_entropy": "xent_logits"}[fname]
        nid = self.node(op, (pred.id, target.id), call.loc, base="loss", steps=steps)
        self.g.node(nid).seg = None  # a loss is a scalar over every step
        self.losses.append(nid)


class _CellScope:
    """Name lookup inside one cell application, lowering equations on demand."""

    def __init__(self, low: Lowerer, inst: Instance, env, eqs, reads, cur, busy):
        self.low, self.inst, self.env = low, inst, env
        self.eqs, self.reads, self.cur, self.busy = eqs, reads, cur, busy

    def value(self, name: str, loc: Loc):
        if name in self.cur:
            if self.cur[name] is _FAILED:  # its equation reported an error
                raise _Fail()
            return self.cur[name]
        if name in self.eqs:
            st, idx = self.eqs[name]
            key = st.targets
            if id(st) in self.low.broken:  # the checker reported it
                for t in st.targets:
                    self.cur[t] = _FAILED
                raise _Fail()
            if key in self.busy:  # an instantaneous cycle (E220, the checker's)
                raise self.low._reported()
            self.busy.add(key)
            outer = self.low.site.here if self.low.site else None
            try:
                self.low._at(st)
                self._lower(st, name)
            except _Fail:
                for t in st.targets:  # every read of it fails quietly from now on
                    self.cur[t] = _FAILED
                raise
            finally:
                self.busy.discard(key)
                self.low._at(outer)
            return self.cur[name]
        if name in self.reads:  # E210, the checker's
            raise self.low._reported()
        if name in self.env:
            if self.env[name] is _FAILED:  # a weight whose declaration reported an error
                raise _Fail()
            return self.env[name]
        if name in WORDS:
            return name
        raise self.low._reported()  # E200, the checker's

    def _lower(self, st: A.Equation, name: str) -> None:
        result = self.low.expr(st.value, self.env, scope=self)
        if len(st.targets) == 1:
            self.low.rename(result, st.targets[0], self.inst.name)
            self.cur[name] = result
            return
        items = result.items if isinstance(result, Tup) else [result]
        if len(items) != len(st.targets):
            raise self.low._reported()
        for t, v in zip(st.targets, items):
            self.low.rename(v, t, self.inst.name)
            self.cur[t] = v

    def delayed(self, e: A.Delayed):
        if e.name not in self.reads:
            raise self.low._reported()
        return Tensor(self.reads[e.name])


def _opname(op: str) -> str:
    return {"add": "+", "sub": "-", "mul": "*"}.get(op, op)


def lower(prog: Program, model_name: str | None = None, strict: bool = True) -> Lowered:
    """The model's graph; raises CellError on errors, unless strict=False: then the graph
    holds what lowered without error and `.diagnostics` every error (see the module doc)."""
    model = prog.model(model_name)
    low = Lowerer(prog, model)
    low._renamed = {}
    return low.run(strict)

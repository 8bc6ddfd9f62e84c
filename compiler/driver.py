"""The compiler pipeline: spec -> checked program -> graph -> passes -> BPTT -> code.

`compile_model` runs every stage and keeps what each produced, so every
stage can be looked at (`convc compile --emit ir,dot,json`, `--timings`).
With `snapshots=True` it also keeps the IR's text after each stage of
`IR_STAGES` (`convc compile --emit ir@STAGE`), so a change can be bisected
to the stage whose output moved.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from convc.spec.checker import check_program
from convc.spec.diagnostics import CellError, Diagnostic, Reporter
from convc.spec.loader import Program, load_program

from . import passes
from .autodiff import Backward, differentiate
from .codegen import generate
from .lower import Lowered, lower
from .schedule import Schedule, schedule
from .shapes import infer_shapes


# The stages after which the IR can be looked at, in the order they run.
IR_STAGES = (
    "lower",  # the graph as lowering builds it from the checked program
    "fold",  # constants folded (a forecaster's zero input path vanishes)
    "fuse_bce_logits",  # bce(sigmoid(a)) -> bce_logits(a)
    "cse",  # common subexpressions merged
    "dce",  # dead code removed, unused parameters dropped
    "shapes",  # every shape inferred
    "fold_zero_channels",  # convolutions skip the zero channels of inputs not given
    "autodiff",  # the backward pass added (BPTT), unused backward nodes removed
    "loop_rewrites",  # input convolutions hoisted, sibling activations merged
    "schedule",  # every node placed in a block (forward loops, batched stages, backward loops)
)


@dataclass
class VjpCompiled:
    """The compile of a model's vector-Jacobian product (compile_program(vjp=True)): its
    own graph, seeded by cotangents of the outputs and final states."""

    lowered: Lowered
    backward: Backward
    schedule: Schedule
    params_only: "VjpCompiled | None" = None  # the same without input and state cotangents


@dataclass
class Compiled:
    """Everything one compile produced."""

    program: Program
    lowered: Lowered
    backward: Backward
    schedule: Schedule
    source: str
    warnings: list[Diagnostic] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    pass_counts: dict[str, int] = field(default_factory=dict)
    snapshots: dict[str, str] = field(default_factory=dict)  # stage -> IR text after it
    vjp: "VjpCompiled | None" = None  # with vjp=True: the vector-Jacobian product's compile

    @property
    def name(self) -> str:
        return self.lowered.name

    def ir_text(self, stage: str | None = None) -> str:
        """The IR's text: the final graph, or the graph after `stage` (of IR_STAGES; the
        compile must have kept snapshots)."""
        if stage is None:
            return self.lowered.graph.dump() + "\n"
        if stage not in IR_STAGES:
            raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(IR_STAGES)}")
        if stage not in self.snapshots:
            raise ValueError(f"no snapshot of stage {stage!r}: compile with snapshots=True")
        return self.snapshots[stage]

    def dot(self) -> str:
        return self.lowered.graph.to_dot(self.name)

    def json(self) -> str:
        return self.lowered.graph.to_json()


def check(path: str | Path | None = None, text: str | None = None, file: str | None = None,
          model: str | None = None, lower_models: bool = True) -> list[Diagnostic]:
    """Every diagnostic for a file (raises CellError when there are errors).

    Every model is lowered and its shapes inferred also after errors (of the
    checker, or in another model or statement): what failed is skipped with
    what depends on it (compiler/lower.py), so each independent error is
    reported, once, and none that only follows from another.
    """
    prog = load_program(path, text=text, file=file)
    rep = check_program(prog)
    diags = list(getattr(prog, "warnings", [])) + rep.diagnostics
    if lower_models:
        names = [model] if model else [m.name for m in prog.root.models]
        for name in names:
            try:
                if rep.has_errors:
                    diags.extend(model_errors(prog, name))
                    continue
                c = compile_program(prog, name, checked=True)
            except CellError as e:
                diags.extend(e.diagnostics)
                continue
            diags.extend(c.warnings)
    diags = unique(diags)
    if any(d.severity == "error" for d in diags):
        raise CellError(in_order(diags))
    return diags


def unique(diags: list[Diagnostic]) -> list[Diagnostic]:
    """Each diagnostic once (a cell used by two models, say, reports its error once)."""
    seen, out = set(), []
    for d in diags:
        key = (d.severity, d.code, d.loc, d.message)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def in_order(diags: list[Diagnostic]) -> list[Diagnostic]:
    """In source order, as they are printed (format_diagnostics)."""
    return sorted(diags, key=lambda d: (d.loc.file, d.loc.line, d.loc.col, d.code))


def model_errors(prog: Program, model: str | None, low: Lowered | None = None,
                 ) -> list[Diagnostic]:
    """What lowering and shape inference report for a model after errors elsewhere.

    The graph holds only what lowered without error, so the shapes still to be
    checked are those of the statements that worked; a shape left unknown is
    not reported (what failed may be why).
    """
    if low is None:
        low = lower(prog, model, strict=False)
    rep = Reporter(list(low.diagnostics))
    _run_passes(low)
    infer_shapes(low.graph, rep, where=low.locate, report_unknown=False)
    return rep.diagnostics


DEFAULT_TARGET = ("cpu", "numpy")


def target_capabilities(target):
    """The declared capabilities of a compile target: (device, conv) or Capabilities."""
    if isinstance(target, tuple):
        from convc.runtime.backend import declared_capabilities

        return declared_capabilities(*target)
    return target


def compile_model(path: str | Path | None = None, text: str | None = None,
                  file: str | None = None, model: str | None = None,
                  debug_nans: bool = False, recompute: int | None = None,
                  snapshots: bool = False, target=DEFAULT_TARGET, vjp: bool = False,
                  fuse: bool | None = None) -> Compiled:
    t0 = time.perf_counter()
    prog = load_program(path, text=text, file=file)
    parse_s = time.perf_counter() - t0
    c = compile_program(prog, model, debug_nans=debug_nans, recompute=recompute,
                        snapshots=snapshots, target=target, vjp=vjp, fuse=fuse)
    c.timings = {"parse": parse_s, **c.timings}
    return c


def compile_program(prog: Program, model: str | None = None, checked: bool = False,
                    debug_nans: bool = False, recompute: int | None = None,
                    snapshots: bool = False, target=DEFAULT_TARGET, vjp: bool = False,
                    fuse: bool | None = None) -> Compiled:
    """Check, lower, differentiate, schedule and generate one model.

    recompute=K: loss_and_grad keeps the forward values the backward pass
    reads for one window of K steps (and the states at each window's start),
    recomputing each window in the backward loop: less memory, one more
    forward pass over all but the last window. snapshots: keep the IR's text
    after each stage of IR_STAGES (`Compiled.ir_text(stage)`).

    target: the backend the code is planned for, (device, conv) as registered
    in runtime/backend.py, or its Capabilities. The plan asks it what layouts
    it reads fastest (`weight_gradient_layout`); the module still runs on
    every backend.

    vjp: also generate `vjp(params, inputs, cotangents, ...)`, the VJP of the
    outputs and final states (for other frameworks' autograd): the model
    lowered again without its loss, differentiated from cotangents
    (autodiff's vjp=True) and rendered into the same module.

    fuse: loops' elementwise work in fused C kernels (fuse.py, runtime/fused.py);
    None: where they can be built, for a CPU target; never with debug_nans.
    """
    fuse = _fuse(fuse, target, debug_nans)
    timings, counts, texts = {}, {}, {}

    def snap(name):
        assert name in IR_STAGES, name
        if snapshots:
            texts[name] = low.graph.dump() + "\n"

    def stage(name):
        return _Stage(timings, name)

    warnings: list[Diagnostic] = []
    with stage("check"):
        if not checked:
            rep = check_program(prog)
            rep.diagnostics[:0] = getattr(prog, "warnings", [])
            if rep.has_errors:  # with the shape errors of what is right
                raise CellError(in_order(unique(rep.diagnostics + model_errors(prog, model))))
            warnings = rep.warnings
    with stage("lower"):
        low = lower(prog, model, strict=False)
        if any(d.severity == "error" for d in low.diagnostics):
            raise CellError(in_order(unique(model_errors(prog, model, low))))
    g = low.graph
    snap("lower")
    with stage("passes"):
        counts.update(_run_passes(low, snap))
    rep = Reporter()
    with stage("shapes"):
        infer_shapes(g, rep, where=low.locate)
        rep.check()
    snap("shapes")
    with stage("passes"):
        counts["fold_zero_channels"] = passes.fold_zero_channels(g)
        counts["dce"] += passes.dce(g, _roots(low))
    snap("fold_zero_channels")
    with stage("autodiff"):
        bw = differentiate(low)
        counts["bwd_dce"] = _prune_backward(low, bw)
    snap("autodiff")
    with stage("schedule"):
        rewrites = passes.loop_rewrites(low, bw, fuse=fuse)
        snap("loop_rewrites")
        sched = schedule(low, bw, rewrites)
    snap("schedule")
    layout = target_capabilities(target).weight_gradient_layout
    vc = None
    if vjp:
        with stage("vjp"):
            vc = _compile_vjp(prog, model, fuse=fuse)
            vc.params_only = _compile_vjp(prog, model, data=False, fuse=fuse)
    with stage("codegen"):
        source = generate(low, bw, sched, debug_nans=debug_nans, recompute=recompute,
                          weight_gradient_layout=layout, vjp=vc, fuse=fuse)
    return Compiled(prog, low, bw, sched, source, warnings, timings, counts, texts, vc)


def _fuse(fuse: bool | None, target, debug_nans: bool) -> bool:
    """Whether to fuse: as asked, else where kernels can be built, for a CPU target."""
    if fuse is None:
        from convc.runtime import fused

        fuse = target_capabilities(target).device == "cpu" and fused.default_on()
    return bool(fuse) and not debug_nans


class _Stage:
    """Times one stage of a compile into `timings[name]` (added up over its runs)."""

    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.t


def _compile_vjp(prog: Program, model: str | None, data: bool = True, fuse: bool = False
                 ) -> VjpCompiled:
    """The vector-Jacobian product's graph: the model lowered again, without its loss
    and targets, differentiated from cotangents of its outputs and final states
    (data=False: for the parameters' cotangents only)."""
    low = lower(prog, model, strict=False)
    low.losses = []
    low.targets = {}
    g = low.graph
    _run_passes(low)
    rep = Reporter()
    infer_shapes(g, rep, where=low.locate)
    rep.check()
    passes.fold_zero_channels(g)
    passes.dce(g, _roots(low))
    _prune_params(low)
    bw = differentiate(low, vjp=True, data=data)
    _prune_backward(low, bw)
    sched = schedule(low, bw, passes.loop_rewrites(low, bw, fuse=fuse))
    return VjpCompiled(low, bw, sched)


def _run_passes(low: Lowered, snap=lambda stage: None) -> dict[str, int]:
    """The passes before shape inference; how many rewrites each made. `snap(stage)`
    is called after each."""
    g, roots = low.graph, _roots(low)
    counts = {}
    for name, run in (("fold", lambda: passes.fold_constants(g, roots)),
                      ("fuse_bce_logits", lambda: passes.fuse_bce_logits(g)),
                      ("cse", lambda: passes.cse(g)),
                      ("dce", lambda: passes.dce(g, roots))):
        counts[name] = run()
        if name == "dce":
            _prune_params(low)
        snap(name)
    return counts


def _roots(low: Lowered) -> set[str]:
    # unused inputs and targets stay: the data still has them, and MODEL lists them
    return set(low.losses) | set(low.outputs.values()) | set(low.inputs.values()) | \
        set(low.targets.values())


def _prune_params(low: Lowered) -> None:
    """Drop parameters the model no longer uses (an input path folded away)."""
    for name in list(low.params):
        if low.params[name].node not in low.graph:
            del low.params[name]
    for seg in low.segments:
        seg.states = [r for r in seg.states if r in low.graph]
    low.segments[:] = [s for s in low.segments if s.states]


def _prune_backward(low: Lowered, bw: Backward) -> int:
    """Remove backward nodes no gradient needs."""
    g = low.graph
    roots = set(bw.grads.values()) | set(bw.input_cts.values()) | set(bw.init_cts.values())
    live = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        if n in live:
            continue
        live.add(n)
        node = g.node(n)
        stack.extend(node.inputs)
        if node.op == "carry":
            read = node.attrs["read"]
            if read in bw.read_cts:
                stack.append(bw.read_cts[read])
            stack.extend(node.attrs.get("terminal", ()))
        if node.op == "carry_out" and node.attrs["read"] in bw.carries:
            # the backward loop that hands the read's cotangent on to t = 0 (also where its
            # state's new value needs none: c = tanh(conv(x, W)) run without input)
            stack.append(bw.carries[node.attrs["read"]])
    dead = [n for n in list(g.g.nodes) if g.node(n).grad and n not in live]
    for n in dead:
        g.remove(n)
    for table in (bw.carries, bw.read_cts, bw.carry_outs, bw.seeds, bw.final_seeds,
                  bw.input_cts, bw.init_cts):
        for k in list(table):
            if table[k] not in g:
                del table[k]
    return len(dead)

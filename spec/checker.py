"""Every semantic check (E2xx): what needs names and values, not shapes.

Run after parsing and before lowering: unknown and duplicate names, calls to
unknown functions, wrong arguments, bad delays, states without an equation,
cells without an output, outputs that are never defined, models without a
loss, unknown training settings and values of the wrong kind, unused
weights, inputs and targets (warnings). Then, in spec/elaborate.py, what
needs each instance of a cell: parameter values and `if`s, weight sizes,
conv's and split's arguments, what an application gives, init= and steps=,
a loss's operands, instantaneous cycles. Every problem is collected, so one
run reports them all, and a name whose definition failed is not reported
again where it is used. Only shape checks need the graph and live in the
compiler (compiler/lower.py, compiler/shapes.py), with the same diagnostics;
lowering assumes a checked program.

Lowering runs after errors here too, to find the shape errors in what is
right: `prog.broken` holds the `id()` of every statement an error was
reported in (and of every cell whose parameters or declarations are wrong),
and lowering skips exactly those, and what depends on them, without a word.
"""
from __future__ import annotations

import difflib

from . import ast as A
from .builtins import (APPLY_KEYWORDS, FUNCTIONS, INITS, LOSS_STEPS, LOSSES, STATE_INITS,
                       WEIGHTS, Sig)
from .diagnostics import Loc, Reporter
from .elaborate import WORDS, check_models
from .loader import Program
from .settings import TRAIN
from .walk import walk_expr  # noqa: F401  (also lowering's)

# names other tools use for convc's training settings
_SETTING_ALIASES = {"learning_rate": "lr", "optim": "optimizer", "batch": "batch_size",
                    "grad_clip": "clip", "clip_norm": "clip", "iterations": "steps",
                    "max_steps": "steps", "n_epochs": "epochs", "l2": "weight_decay",
                    "rho": "decay", "epsilon": "eps", "random_seed": "seed"}


def _setting_value(v):
    """The Python value a train-block setting writes (`-1e-3` included), or None."""
    if isinstance(v, (A.Num, A.Str, A.Bool)):
        return v.value
    if isinstance(v, A.Neg) and isinstance(v.operand, A.Num):
        return -v.operand.value
    return None


def _suggest(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.7)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_program(prog: Program) -> Reporter:
    rep = Reporter()
    prog.broken = set()
    for mod in prog.modules.values():
        for item in mod.items:
            if isinstance(item, A.CellDef):
                _CellChecker(item, rep, prog.broken).run()
            elif isinstance(item, A.ModelDef):
                _ModelChecker(item, prog, rep).run()
    # what needs the cells instantiated: parameter values, what an application gives
    check_models(prog, rep)
    prog.checker_errors = rep.has_errors  # lowering meets only what was reported
    return rep


class _Errors:
    """`with _Errors(rep, broken, st):` adds `id(st)` to `broken` if an error is reported inside."""

    def __init__(self, rep: Reporter, broken: set[int], item) -> None:
        self.rep, self.broken, self.item = rep, broken, item

    def __enter__(self):
        self.n = _n_errors(self.rep)

    def __exit__(self, *exc):
        if _n_errors(self.rep) > self.n:
            self.broken.add(id(self.item))


def _n_errors(rep: Reporter) -> int:
    return sum(d.severity == "error" for d in rep.diagnostics)


def _all_statements(body):
    """The statements of a body and of the branches of its `if`s."""
    stack = list(body)
    while stack:
        st = stack.pop()
        yield st
        if isinstance(st, A.If):
            stack.extend(st.then)
            stack.extend(st.orelse)


def check_call_args(call: A.Call, sig: Sig, name: str, rep: Reporter) -> None:
    """Arguments of a built-in: positional ones by position, keywords by name."""
    n = len(call.args)
    if sig.variadic:
        if n == 0:
            rep.error("E203", f"{name}() needs at least one argument", call.loc)
    elif n > len(sig.positional):
        rep.error("E203", f"{name}() takes {len(sig.positional)} positional argument"
                  f"{'s' if len(sig.positional) != 1 else ''} but {n} were given "
                  f"({sig.describe(name)})", call.args[len(sig.positional)].loc)
    elif n < len(sig.positional):
        missing = sig.positional[n:]
        if not any(k.name in missing for k in call.kwargs):  # reported below instead
            rep.error("E203", f"{name}() is missing argument{'s' if len(missing) > 1 else ''} "
                      f"{', '.join(missing)} ({sig.describe(name)})", call.loc)
    seen = set()
    for kw in call.kwargs:
        if kw.name in seen:
            rep.error("E201", f"argument {kw.name!r} given twice", kw.loc)
        seen.add(kw.name)
        if kw.name in sig.positional:
            rep.error("E204", f"{name}() takes {kw.name} by position, not by name "
                      f"({sig.describe(name)})", kw.loc)
        elif kw.name not in sig.keywords:
            valid = list(sig.keywords) + list(sig.positional)
            rep.error("E204", f"{name}() has no argument {kw.name!r}"
                      f"{_suggest(kw.name, valid)} ({sig.describe(name)})", kw.loc)


class _Scope:
    def __init__(self, rep: Reporter, parent: "_Scope | None" = None):
        self.rep = rep
        self.parent = parent
        self.names: dict[str, tuple[str, Loc]] = {}

    def lookup(self, name):
        s = self
        while s is not None:
            if name in s.names:
                return s.names[name]
            s = s.parent
        return None

    def declare(self, name: str, kind: str, loc: Loc) -> None:
        prev = self.lookup(name)
        if prev is not None and not (prev[0] == "state" and kind == "update"):
            self.rep.error("E201", f"{name!r} is already defined", loc,
                           f"previous definition at {prev[1]}")
            return
        if prev is not None:  # a state's update equation
            if self.lookup("=" + name) is not None:
                self.rep.error("E201", f"state {name!r} already has an equation", loc,
                               f"previous equation at {self.lookup('=' + name)[1]}")
                return
            self.names["=" + name] = ("update", loc)
            return
        self.names[name] = (kind, loc)

    def all_names(self):
        s, out = self, set()
        while s is not None:
            out |= {n for n in s.names if not n.startswith("=")}
            s = s.parent
        return out


class _CellChecker:
    def __init__(self, cell: A.CellDef, rep: Reporter, broken: set[int] | None = None):
        self.cell = cell
        self.rep = rep
        self.broken: set[int] = set() if broken is None else broken
        self.used: set[str] = set()
        self.weights: dict[str, Loc] = {}
        self.states: dict[str, Loc] = {}
        self.updated: set[str] = set()

    def run(self) -> None:
        top = _Scope(self.rep)
        # an error in the parameters or the declarations breaks the whole cell, one in an
        # expression its statement (lowering skips it and what depends on it)
        with _Errors(self.rep, self.broken, self.cell):
            for p in self.cell.params:
                if p.default is not None:
                    self._expr(p.default, top, params_only=True)
                top.declare(p.name, "param", p.loc)
            # declarations first (any order inside a body), then the expressions
            self._declare(self.cell.body, top)
        self._exprs(self.cell.body, top)
        with _Errors(self.rep, self.broken, self.cell):
            if not any(isinstance(st, A.OutputDecl) for st in _all_statements(self.cell.body)):
                self.rep.error("E241", f"cell {self.cell.name!r} has no output (add e.g. "
                               "`output h`)", self.cell.loc)
            for name, loc in self.states.items():
                if name not in self.updated:
                    self.rep.error("E210", f"state {name!r} has no equation (write "
                                   f"`{name} = ...`)", loc)
        for name, loc in self.weights.items():
            if name not in self.used:
                self.rep.warning("W001", f"weight {name!r} is never used", loc)

    def _declare(self, body, scope: _Scope) -> None:
        for st in body:
            if isinstance(st, A.InputDecl):
                for n, loc in zip(st.names, st.locs):
                    scope.declare(n, "input", loc)
            elif isinstance(st, A.StateDecl):
                scope.declare(st.name, "state", st.loc)
                self.states[st.name] = st.loc
                if st.init not in STATE_INITS:
                    self.rep.error("E205", f"a state starts as one of {', '.join(STATE_INITS)}, "
                                   f"not {st.init!r}", st.init_loc or st.loc)
            elif isinstance(st, A.WeightDecl):
                scope.declare(st.name, "weight", st.loc)
                self.weights[st.name] = st.loc
            elif isinstance(st, A.Equation):
                for n, loc in zip(st.targets, st.target_locs or (st.loc,) * len(st.targets)):
                    kind = scope.lookup(n)
                    if kind is not None and kind[0] == "state":
                        self.updated.add(n)
                        scope.declare(n, "update", loc)
                    else:
                        scope.declare(n, "value", loc)
            elif isinstance(st, A.If):
                # each branch is its own scope for the names it defines; afterwards
                # the names of both are visible (either branch may be the one that runs)
                subs = []
                for branch in (st.then, st.orelse):
                    sub = _Scope(self.rep, scope)
                    self._declare(branch, sub)
                    subs.append(sub)
                for sub in subs:
                    for n, v in sub.names.items():
                        scope.names.setdefault(n, v)
            elif isinstance(st, (A.SeqDecl, A.Loss, A.Train)):
                self.rep.error("E103", f"`{type(st).__name__.lower()}` belongs in a model, not "
                               "in a cell", st.loc)

    def _exprs(self, body, scope: _Scope) -> None:
        for st in body:
            if isinstance(st, A.If):
                with _Errors(self.rep, self.broken, self.cell):  # no telling which branch runs
                    self._expr(st.cond, scope, params_only=True)
                self._exprs(st.then, scope)
                self._exprs(st.orelse, scope)
                continue
            with _Errors(self.rep, self.broken, st):
                if isinstance(st, A.WeightDecl):
                    self._weight(st, scope)
                elif isinstance(st, A.Equation):
                    self._expr(st.value, scope)
                elif isinstance(st, A.OutputDecl):
                    for n, loc in zip(st.names, st.locs):
                        if scope.lookup(n) is None:
                            self.rep.error("E200", f"output {n!r} is not defined"
                                           f"{_suggest(n, scope.all_names())}", loc)

    def _weight(self, st: A.WeightDecl, scope: _Scope) -> None:
        v = st.value
        if not (isinstance(v, A.Call) and v.func_name in WEIGHTS):
            name = v.func_name if isinstance(v, A.Call) else None
            if name is None:
                self.rep.error("E202", "a weight is declared as kernel(...), bias(...) or "
                               "hadamard(...)", v.loc)
            else:
                self.rep.error("E202", f"unknown weight kind {name!r}; use one of "
                               f"{', '.join(WEIGHTS)}{_suggest(name, WEIGHTS)}", v.loc)
            return
        check_call_args(v, WEIGHTS[v.func_name], v.func_name, self.rep)
        for a in v.args:
            self._expr(a, scope, params_only=True)
        for kw in v.kwargs:
            if kw.name == "init":
                _check_init(kw.value, self.rep)
            elif kw.name == "per_pixel" and not isinstance(kw.value, (A.Bool, A.Name)):
                self.rep.error("E205", "per_pixel is true or false", kw.value.loc)
            else:
                self._expr(kw.value, scope, params_only=True)

    def _expr(self, e, scope: _Scope, params_only: bool = False) -> None:
        judged: set[int] = set()  # names a call's own check already reported
        for x in walk_expr(e):
            if id(x) in judged:
                continue
            if isinstance(x, A.Name):
                if x.id in WORDS or x.id in ("true", "false"):
                    continue
                found = scope.lookup(x.id)
                if found is None:
                    if x.id in FUNCTIONS:
                        self.rep.error("E200", f"{x.id!r} is a function; call it: {x.id}(...)",
                                       x.loc)
                    else:
                        self.rep.error("E200", f"unknown name {x.id!r}"
                                       f"{_suggest(x.id, scope.all_names())}", x.loc)
                    continue
                self.used.add(x.id)
                if params_only and found[0] != "param":
                    self.rep.error("E205", f"{x.id!r} is {_a(found[0])}, but only parameters "
                                   "can be used here", x.loc)
            elif isinstance(x, A.Delayed):
                found = scope.lookup(x.name)
                if found is None:
                    self.rep.error("E200", f"unknown name {x.name!r}"
                                   f"{_suggest(x.name, scope.all_names())}", x.loc)
                elif found[0] != "state":
                    self.rep.error("E222", f"{x.name!r} is not a state, so it has no value at "
                                   f"an earlier step (declare `state {x.name}`)", x.loc)
                _check_delay(x, self.rep)
            elif isinstance(x, A.Call):
                fname = x.func_name
                if fname is None:
                    self.rep.error("E202", "only named functions can be called here", x.loc)
                elif fname in FUNCTIONS:
                    check_call_args(x, FUNCTIONS[fname], fname, self.rep)
                    judged |= _check_conv_kwargs(x, self.rep, scope)
                elif fname in WEIGHTS:
                    self.rep.error("E202", f"{fname}(...) declares a weight: write "
                                   f"`weight W = {fname}(...)`", x.loc)
                else:
                    self.rep.error("E202", f"unknown function {fname!r}"
                                   f"{_suggest(fname, FUNCTIONS)}", x.func.loc)
            elif isinstance(x, A.BinOp) and x.op == "/":
                if not isinstance(x.right, (A.Num, A.Name)) or (
                        isinstance(x.right, A.Name) and (scope.lookup(x.right.id) or ("",))[0]
                        not in ("param",)):
                    self.rep.error("E205", "division only by a constant", x.right.loc)


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _check_delay(x: A.Delayed, rep: Reporter) -> None:
    """Only `name[t-1]` is a delayed read; say what is wrong with any other index."""
    if x.var != "t":
        rep.error("E221", f"the time index is `t`, as in {x.name}[t-1], not {x.var!r}", x.loc)
    elif x.delay == 0:
        rep.error("E221", f"{x.name}[t] is the value at this step: write {x.name}, or "
                  f"{x.name}[t-1] for the previous step", x.loc)
    elif x.delay < 0:
        rep.error("E221", f"{x.name}[t+{_num(-x.delay)}] would read a later step; a state is "
                  f"read one step back, {x.name}[t-1]", x.loc)
    elif x.delay != 1 or not isinstance(x.delay, int):
        rep.error("E221", f"delay t-{_num(x.delay)} is not supported: a state is read one "
                  f"step back, {x.name}[t-1]", x.loc)


def _num(v) -> str:
    return str(v) if isinstance(v, int) else repr(float(v))


def _check_init(v, rep: Reporter) -> None:
    if isinstance(v, A.Num) or (isinstance(v, A.Neg) and isinstance(v.operand, A.Num)):
        return
    if isinstance(v, A.Name) and v.id in INITS:
        return
    if isinstance(v, A.Call) and v.func_name in ("uniform", "normal") and len(v.args) == 1:
        return
    rep.error("E205", "init is a number, glorot, zeros, ones, uniform(a) or normal(std)", v.loc)


def _check_conv_kwargs(call: A.Call, rep: Reporter, scope: "_Scope") -> set[int]:
    """Check conv's padding; returns the ids of the Names it judged (no E200 for them)."""
    judged = set()
    for kw in call.kwargs:
        if kw.name == "padding":
            v = kw.value
            if isinstance(v, A.Name) and v.id not in ("same", "valid") and (
                    v.id in WORDS or scope.lookup(v.id) is None):
                rep.error("E205", f"padding is same, valid, a number or a pair (h, w), not "
                          f"{v.id!r}", v.loc)
                judged.add(id(v))
            elif isinstance(v, (A.Str, A.Bool)):
                rep.error("E205", f"padding is same, valid, a number or a pair (h, w), not "
                          f"{_source_word(v)}", v.loc)
    return judged


def _source_word(v) -> str:
    if isinstance(v, A.Bool):
        return "true" if v.value else "false"
    return repr(v.value)


class _ModelChecker:
    def __init__(self, model: A.ModelDef, prog: Program, rep: Reporter):
        self.model = model
        self.prog = prog
        self.rep = rep

    def run(self) -> None:
        scope = _Scope(self.rep)
        instances: set[str] = set()
        weights: dict[str, Loc] = {}
        sequences: dict[str, A.SeqDecl] = {}
        used: set[str] = set()
        losses = []
        outputs = []
        for st in self.model.body:
            with _Errors(self.rep, self.prog.broken, st):
                if isinstance(st, A.SeqDecl):
                    scope.declare(st.name, st.kind, st.loc)
                    sequences.setdefault(st.name, st)
                    for d in st.shape:
                        if not (isinstance(d, A.Num) and isinstance(d.value, int) and d.value > 0):
                            self.rep.error("E205", "a shape is made of positive integers", d.loc)
                    if len(st.shape) != 3:
                        n = len(st.shape)
                        self.rep.error("E205", f"a per-step shape is [C, H, W], got {n} "
                                       f"dimension{'s' if n != 1 else ''}", st.loc)
                elif isinstance(st, A.WeightDecl):
                    scope.declare(st.name, "weight", st.loc)
                    weights[st.name] = st.loc
                    _CellChecker(A.CellDef("", (), None, (), st.loc), self.rep)._weight(st, scope)
                elif isinstance(st, A.Equation):
                    self._equation(st, scope, instances, used)
                elif isinstance(st, A.OutputDecl):
                    outputs.extend(st.names)
                    for n, loc in zip(st.names, st.locs):
                        if scope.lookup(n) is None:
                            self.rep.error("E200", f"output {n!r} is not defined"
                                           f"{_suggest(n, scope.all_names())}", loc)
                        used.add(n)
                elif isinstance(st, A.Loss):
                    losses.append(st)
                    self._loss(st, scope, used)
                elif isinstance(st, A.Train):
                    self._train(st)
                else:
                    self.rep.error("E103", f"`{type(st).__name__.lower()}` belongs in a cell, "
                                   "not in a model", st.loc)
        if not losses and not outputs:  # (one with outputs only runs forward and vjp)
            self.rep.error("E240", f"model {self.model.name!r} has no loss and no output (add "
                           "e.g. `output pred` and `loss bce(pred, y)`)", self.model.loc)
        for name, loc in weights.items():
            if name not in used:
                self.rep.warning("W001", f"weight {name!r} is never used", loc)
        for name, st in sequences.items():
            if name not in used:
                self.rep.warning("W002", f"{st.kind} {name!r} is never used", st.loc)

    def _names(self, e, scope, used, judged=frozenset()):
        for x in walk_expr(e):
            if id(x) in judged:
                continue
            if isinstance(x, A.Name) and x.id not in WORDS and x.id not in ("true", "false"):
                if scope.lookup(x.id) is None and x.id in FUNCTIONS:
                    self.rep.error("E200", f"{x.id!r} is a function; call it: {x.id}(...)",
                                   x.loc)
                elif scope.lookup(x.id) is None:
                    self.rep.error("E200", f"unknown name {x.id!r}"
                                   f"{_suggest(x.id, scope.all_names())}", x.loc)
                used.add(x.id)
            elif isinstance(x, A.Delayed):
                self.rep.error("E222", "a model has no states of its own; [t-1] is for cells",
                               x.loc)
                used.add(x.name)

    def _equation(self, st: A.Equation, scope, instances, used) -> None:
        v = st.value
        if isinstance(v, A.Call) and v.func_name in self.prog.cells:
            # instantiation: enc = ConvLSTM(hidden=64)
            cell = self.prog.cells[v.func_name]
            self._instantiate(v, cell, scope, used)
            if len(st.targets) > 1:
                self.rep.error("E203", f"an instance of {cell.name} takes one name, not "
                               f"{len(st.targets)}", st.target_locs[1] if st.target_locs
                               else st.loc)
            for n in st.targets:
                scope.declare(n, "instance", st.loc)
                instances.add(n)
            return
        if isinstance(v, A.Call) and v.func_name is not None and v.func_name not in FUNCTIONS \
                and scope.lookup(v.func_name) is None:
            # an unknown cell or function: report it once, not again where its result is used
            self._tensor_expr(v, scope, used)
            for n, loc in zip(st.targets, st.target_locs or (st.loc,) * len(st.targets)):
                scope.declare(n, "broken", loc)
                instances.add(n)
            return
        if isinstance(v, A.Call) and isinstance(v.func, A.Call) and \
                v.func.func_name in self.prog.cells:
            # inline: h = ConvLSTM(hidden=8)(x)
            self._instantiate(v.func, self.prog.cells[v.func.func_name], scope, used)
            self._apply(v, scope, used)
        elif isinstance(v, A.Call) and v.func_name in instances:
            self._apply(v, scope, used)
            used.add(v.func_name)
        else:
            self._tensor_expr(v, scope, used)
        for n, loc in zip(st.targets, st.target_locs or (st.loc,) * len(st.targets)):
            scope.declare(n, "value", loc)

    def _instantiate(self, call: A.Call, cell: A.CellDef, scope, used) -> None:
        names = [p.name for p in cell.params]
        if len(call.args) > len(names):
            self.rep.error("E203", f"{cell.name} takes {len(names)} parameter"
                           f"{'s' if len(names) != 1 else ''} but {len(call.args)} were given",
                           call.loc)
        given = set(names[:len(call.args)])
        for kw in call.kwargs:
            if kw.name not in names:
                self.rep.error("E204", f"{cell.name} has no parameter {kw.name!r}"
                               f"{_suggest(kw.name, names)} (parameters: {', '.join(names)})",
                               kw.loc)
            elif kw.name in given:
                self.rep.error("E201", f"parameter {kw.name!r} given twice", kw.loc)
            given.add(kw.name)
        for p in cell.params:
            if p.default is None and p.name not in given:
                self.rep.error("E206", f"{cell.name} needs a value for parameter {p.name!r}",
                               call.loc)
        for a in list(call.args) + [k.value for k in call.kwargs]:
            found = scope.lookup(a.id) if isinstance(a, A.Name) else None
            if found is not None and found[0] in ("input", "target", "value"):
                self.rep.error("E205", f"{cell.name}(...) takes the cell's parameters, not "
                               f"{_a(found[0])}; make an instance, then apply it: "
                               f"`l = {cell.name}(...)` and `h = l({a.id})`", a.loc)
                used.add(a.id)
                continue
            self._names(a, scope, used)

    def _apply(self, call: A.Call, scope, used) -> None:
        for kw in call.kwargs:
            if kw.name not in APPLY_KEYWORDS:
                self.rep.error("E204", f"a cell is applied with inputs and optionally "
                               f"init=<cell> or steps=<sequence>, not {kw.name!r}", kw.loc)
        for a in list(call.args) + [k.value for k in call.kwargs]:
            self._names(a, scope, used)

    def _tensor_expr(self, e, scope, used) -> None:
        judged: set[int] = set()
        for x in walk_expr(e):
            if isinstance(x, A.Call):
                fname = x.func_name
                if fname is None:
                    self.rep.error("E202", "only named functions can be called here", x.loc)
                elif fname in FUNCTIONS:
                    check_call_args(x, FUNCTIONS[fname], fname, self.rep)
                    judged |= _check_conv_kwargs(x, self.rep, scope)
                elif (scope.lookup(fname) or ("",))[0] == "broken":
                    pass  # its definition was already reported
                elif fname in self.prog.cells or (fname and scope.lookup(fname) and
                                                   scope.lookup(fname)[0] == "instance"):
                    self.rep.error("E202", f"apply a cell on its own line: `h = {fname}(...)`",
                                   x.loc)
                elif fname is not None:
                    self.rep.error("E202", f"unknown function or cell {fname!r}"
                                   f"{_suggest(fname, list(FUNCTIONS) + list(self.prog.cells))}",
                                   x.func.loc)
        self._names(e, scope, used, judged)

    def _loss(self, st: A.Loss, scope, used) -> None:
        v = st.value
        if not (isinstance(v, A.Call) and v.func_name in LOSSES):
            name = v.func_name if isinstance(v, A.Call) else None
            if name is None:
                self.rep.error("E202", f"a loss is one of {', '.join(LOSSES)} applied to the "
                               "prediction and the target: `loss bce(pred, y)`", v.loc)
            else:
                self.rep.error("E202", f"unknown loss {name!r}; use one of "
                               f"{', '.join(LOSSES)}{_suggest(name, LOSSES)}", v.loc)
            for a in list(v.args) if isinstance(v, A.Call) else [v]:
                self._names(a, scope, used)
            return
        check_call_args(v, LOSSES[v.func_name], v.func_name, self.rep)
        for kw in v.kwargs:
            if kw.name == "steps" and not (isinstance(kw.value, A.Name) and
                                           kw.value.id in LOSS_STEPS):
                self.rep.error("E205", f"steps is one of {', '.join(LOSS_STEPS)}", kw.value.loc)
        for a in v.args:
            self._tensor_expr(a, scope, used)

    def _train(self, st: A.Train) -> None:
        seen = {}
        for s in st.settings:
            if s.name in seen:
                self.rep.error("E201", f"setting {s.name!r} given twice", s.loc)
            seen[s.name] = s
            if s.name not in TRAIN:
                hint = f"; did you mean {_SETTING_ALIASES[s.name]!r}?" \
                    if s.name in _SETTING_ALIASES else _suggest(s.name, TRAIN)
                self.rep.error("E204", f"unknown training setting {s.name!r}{hint} (known: "
                               f"{', '.join(sorted(TRAIN))})", s.loc)
                continue
            setting = TRAIN[s.name]
            v = s.value
            if setting.kind is str and isinstance(v, A.Name):
                self.rep.error("E205", f"setting {s.name!r} takes a string: write "
                               f"{s.name} = \"{v.id}\"", v.loc)
                continue
            value = _setting_value(v)
            why = setting.problem(value) if value is not None else \
                f"expected {setting.describe()}"
            if why is not None:
                self.rep.error("E205", f"setting {s.name!r}: {why}", v.loc)

"""The checks that need each instance of a cell: its parameters' values and what it gives.

The checker's first pass (spec/checker.py) looks at names; this one goes through
each model of the root file the way lowering does (compiler/lower.py), statement
by statement, with every cell instantiated and applied, but with abstract values
in place of graph nodes: a constant is its value, a tensor only what the checks
need to know of it (`Value`: which time loop it belongs to, whether it is a
kernel weight, whether it depends on weights, whether it is the folded constant
of an input not given). So it finds, before lowering and at the same places,
the semantic errors (E2xx) that depend on the values of parameters (constant
evaluation, `if`s, weight sizes, conv arguments, split counts), on what a cell
application gives (how many values, whether per step), on init= and steps=
and on the order equations are evaluated in (instantaneous cycles).

Lowering assumes a checked program: it reports only shape errors (E3xx), and
where it meets one of these errors (after the checker reported it) it fails
that statement quietly, as this pass does after reporting it, so what depends
on it is not reported again.

`const_value` (constant evaluation) is shared with lowering.
"""
from __future__ import annotations

import math

from . import ast as A
from .builtins import FUNCTIONS, LOSSES, WEIGHTS
from .diagnostics import Loc, Reporter
from .sites import Site, SiteReporter

# bare words that are values, not names: `padding=same`, `init=glorot`, `steps=last`
WORDS = {"same", "valid", "zeros", "ones", "glorot", "all", "last", "none", "uniform",
         "normal", "learned"}


# ---------------------------------------------------------------- constants (shared)
class Opaque:
    """A value that is not a constant: a tensor, several of them, an instance."""


class ConstError(Exception):
    """A constant expression that has no value; the diagnostic to give."""

    def __init__(self, code: str, message: str, loc: Loc):
        super().__init__(message)
        self.code, self.message, self.loc = code, message, loc


class Failed(Exception):
    """The expression reads a name whose definition already failed (reported there)."""


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def const_value(e, env, failed):
    """The value of a constant expression; `env[name]` is `failed` where its definition
    failed (raises Failed), an Opaque value where it is not a constant (ConstError)."""
    if isinstance(e, (A.Num, A.Str, A.Bool)):
        return e.value
    if isinstance(e, A.Name):
        if env.get(e.id) is failed:
            raise Failed()
        if e.id in env and not isinstance(env[e.id], Opaque):
            return env[e.id]
        if e.id in WORDS:
            return e.id
        raise ConstError("E205", f"{e.id!r} is not a constant here", e.loc)
    if isinstance(e, A.Neg):
        v = const_value(e.operand, env, failed)
        if not _is_number(v):
            raise ConstError("E205", f"cannot negate {v!r}", e.loc)
        return -v
    if isinstance(e, A.BinOp):
        a, b = const_value(e.left, env, failed), const_value(e.right, env, failed)
        if not all(_is_number(x) for x in (a, b)):
            raise ConstError("E205", f"cannot compute {a!r} {e.op} {b!r}", e.loc)
        if e.op == "+":
            return a + b
        if e.op == "-":
            return a - b
        if e.op == "*":
            return a * b
        if b == 0:
            raise ConstError("E205", "division by zero", e.right.loc)
        r = a / b
        return int(r) if isinstance(a, int) and isinstance(b, int) and a % b == 0 else r
    if isinstance(e, A.TupleExpr):
        return tuple(const_value(x, env, failed) for x in e.items)
    if isinstance(e, A.Call) and e.func_name in ("uniform", "normal") and \
            len(e.args) == 1 and not e.kwargs:
        v = const_value(e.args[0], env, failed)
        if not _is_number(v):
            raise ConstError("E205", f"{e.func_name}() takes a number, got {v!r}", e.loc)
        return (e.func_name, float(v))
    raise ConstError("E205", "expected a constant", e.loc)


def positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def weight_argument(call: A.Call, sig, key: str):
    """The expression that gives a weight's argument `key` (for blaming an argument)."""
    i = sig.positional.index(key) if key in sig.positional else len(call.args)
    if i < len(call.args):
        return call.args[i]
    return next((k.value for k in call.kwargs if k.name == key), call)


def defines(st) -> tuple[str, ...]:
    """The names a model or cell statement defines."""
    if isinstance(st, A.Equation):
        return st.targets
    if isinstance(st, (A.SeqDecl, A.WeightDecl)):
        return (st.name,)
    return ()


# ---------------------------------------------------------------- abstract values
_STATIC, _SEQUENCE, _LOOP = 0, 1, 2  # where a tensor lives: like lowering's segments


class Value(Opaque):
    """A tensor, as far as the checks need it (one of lowering's graph nodes)."""

    __slots__ = ("where", "weighted", "kernel", "const", "implied")

    def __init__(self, where=_STATIC, weighted=False, kernel=None, const=None, implied=False):
        self.where = where  # _STATIC: the same at every step; _SEQUENCE: data; _LOOP: a cell's
        self.weighted = weighted  # computed from a weight (its graph ancestors hold a param)
        self.kernel = kernel  # (kh, kw) of a kernel weight itself
        self.const = const  # the value of a folded constant
        self.implied = implied  # stands for (or comes from) the zeros of an input not given

    def __repr__(self):
        return "a tensor"


class Values(Opaque):
    """Several values (a cell's outputs, a split)."""

    def __init__(self, items):
        self.items = list(items)

    def __repr__(self):
        n = len(self.items)
        return f"{n} value{'s' if n != 1 else ''} (name each)"


class Inst(Opaque):
    def __init__(self, name: str, cell: A.CellDef, params: dict, loc: Loc, site: Site):
        self.name, self.cell, self.params, self.loc, self.site = name, cell, params, loc, site
        self.applied = False
        self.failed = False
        self.finals: set[str] = set()  # states whose update lowered

    def __repr__(self):
        return f"instance {self.name!r} of {self.cell.name}"


class _Stop(Exception):
    """Abort one statement after its diagnostic was recorded."""


_FAILED = object()

_REF = {"add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y,
        "neg": lambda x: -x, "scale": lambda x, factor: x * factor,
        "sigmoid": lambda x: 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0,
        "tanh": math.tanh, "relu": lambda x: max(x, 0.0),
        "hard_sigmoid": lambda x: min(max(0.2 * x + 0.5, 0.0), 1.0)}


def _node(op: str, inputs, where=None, **attrs) -> Value:
    """What lowering's `node` makes of an operation: folded where it folds (`_folded`)."""
    if op in _REF and inputs:
        zeros = [v for v in inputs if v.const is not None and v.implied]
        if zeros:
            if all(v.const is not None for v in inputs):
                return Value(const=float(_REF[op](*[v.const for v in inputs], **attrs)),
                             implied=True)
            if op == "mul" and any(v.const == 0.0 for v in zeros):
                return Value(const=0.0, implied=True)
    if where is None:
        where = max((v.where for v in inputs), default=_STATIC)
    implied = where == _STATIC and op in _REF and any(v.implied for v in inputs)
    return Value(where, any(v.weighted for v in inputs), implied=implied)


def check_models(prog, rep: Reporter) -> None:
    """The per-instance checks of every model of the root file, into `rep`."""
    for model in prog.root.models:
        el = _Elaborator(prog, model)
        el.run()
        rep.diagnostics.extend(el.rep.diagnostics)


class _Elaborator:
    def __init__(self, prog, model: A.ModelDef):
        self.prog = prog
        self.model = model
        self.broken = prog.broken
        self.site: Site | None = None
        self.rep = SiteReporter(self)
        self.instances: dict[str, Inst] = {}
        self.zero_ref: Value | None = None

    def error(self, code: str, message: str, loc: Loc) -> _Stop:
        self.rep.error(code, message, loc)
        return _Stop()

    def _at(self, here) -> None:
        if self.site is not None:
            self.site.here = here

    def cv(self, e, env):
        try:
            return const_value(e, env, _FAILED)
        except Failed:
            raise _Stop() from None
        except ConstError as err:
            raise self.error(err.code, err.message, err.loc) from None

    # ------------------------------------------------------------ the model
    def run(self) -> None:
        env: dict = {}
        for st in self.model.body:
            if id(st) in self.broken:  # the first pass reported it
                for n in defines(st):
                    env[n] = _FAILED
                continue
            try:
                self.model_stmt(st, env)
            except _Stop:
                for n in defines(st):
                    env[n] = _FAILED

    def model_stmt(self, st, env) -> None:
        if isinstance(st, A.SeqDecl):
            env[st.name] = Value(_SEQUENCE)
        elif isinstance(st, A.WeightDecl):
            env[st.name] = self.weight(st, env)
        elif isinstance(st, A.Equation):
            v = st.value
            cells = self.prog.cells
            if isinstance(v, A.Call) and v.func_name in cells and \
                    not isinstance(env.get(v.func_name), Inst):
                env[st.targets[0]] = self.instantiate(v, cells[v.func_name], st.targets[0], env)
                return
            if isinstance(v, A.Call) and isinstance(v.func, A.Call) and \
                    v.func.func_name in cells:
                inst = self.instantiate(v.func, cells[v.func.func_name], st.targets[0], env)
                result = self.apply(inst, v, env)
            elif isinstance(v, A.Call) and isinstance(env.get(v.func_name), Inst):
                result = self.apply(env[v.func_name], v, env)
            else:
                result = self.expr(v, env, model=True)
            self.bind(st, result, env)
        elif isinstance(st, A.OutputDecl):
            for n, loc in zip(st.names, st.locs):
                v = env.get(n)
                if v is _FAILED:
                    continue
                if not isinstance(v, Value):
                    self.rep.error("E205", f"output {n!r} is not a tensor", loc)
        elif isinstance(st, A.Loss):
            self.loss(st, env)
        elif isinstance(st, A.Train):
            for s in st.settings:
                self.cv(s.value, env)

    def bind(self, st: A.Equation, result, env) -> None:
        if len(st.targets) == 1:
            if isinstance(result, Values):
                n = len(result.items)
                raise self.error("E203", f"this gives {n} value{'s' if n != 1 else ''}; "
                                 f"name each: {', '.join(f'v{i}' for i in range(n))} = ...",
                                 st.loc)
            env[st.targets[0]] = result
            return
        items = result.items if isinstance(result, Values) else [result]
        if len(items) != len(st.targets):
            raise self.error("E203", f"{len(st.targets)} names on the left but {len(items)} "
                             "value" + ("s" if len(items) != 1 else "") + " on the right",
                             st.loc)
        for n, v in zip(st.targets, items):
            env[n] = v

    # ------------------------------------------------------------ weights
    def weight(self, st: A.WeightDecl, env) -> Value:
        call = st.value
        sig = WEIGHTS[call.func_name]
        args = dict(zip(sig.positional, (self.cv(a, env) for a in call.args)))
        kw = dict(sig.keywords)
        for k in call.kwargs:
            kw[k.name] = self.cv(k.value, env) if k.name != "init" else \
                (k.value.id if isinstance(k.value, A.Name) else self.cv(k.value, env))
        args.update({k: v for k, v in kw.items() if k in sig.positional})
        for key in ("out", "channels"):
            if key in args and not positive_int(args[key]):
                self._at(weight_argument(call, sig, key))
                raise self.error("E205", f"{key} must be a positive integer, got "
                                 f"{args[key]!r}", call.loc)
        if call.func_name == "kernel":
            size = args["size"]
            if positive_int(size):
                size = (size, size)
            if not (isinstance(size, tuple) and len(size) == 2 and
                    all(positive_int(v) for v in size)):
                self._at(weight_argument(call, sig, "size"))
                raise self.error("E205", "size must be a positive integer or a pair (h, w), "
                                 f"got {args['size']!r}", call.loc)
            return Value(weighted=True, kernel=size)
        return Value(weighted=True)

    # ------------------------------------------------------------ cells
    def instantiate(self, call: A.Call, cell: A.CellDef, name: str, env) -> Inst:
        if id(cell) in self.broken:  # its parameters or declarations were reported
            raise _Stop()
        values: dict = {}
        names = [p.name for p in cell.params]
        args: dict[str, Loc] = {}
        for p, a in zip(names, call.args):
            values[p] = self.cv(a, env)
            args[p] = a.loc
        for kw in call.kwargs:
            values[kw.name] = self.cv(kw.value, env)
            args[kw.name] = kw.loc
        site = Site(name, cell, call.loc, args)
        for p in cell.params:
            if p.name not in values:
                if p.default is None:  # E206, reported by the first pass
                    raise _Stop()
                self.site, site.here = site, p.default
                try:
                    values[p.name] = self.cv(p.default, values)
                finally:
                    self.site = site.here = None
        if name in self.instances:  # E201, reported by the first pass
            raise _Stop()
        inst = Inst(name, cell, values, call.loc, site)
        self.instances[name] = inst
        return inst

    def apply(self, inst: Inst, call: A.Call, env):
        if inst.applied:
            raise self.error("E201", f"cell {inst.name!r} is already applied; make another "
                             f"instance to apply it again", call.loc)
        inst.applied = True
        inst.site.applied = call.loc
        try:
            return self._apply(inst, call, env)
        except _Stop:
            inst.failed = True
            raise

    def _apply(self, inst: Inst, call: A.Call, env):
        inputs = [self.expr(a, env, model=True) for a in call.args]
        for x, a in zip(inputs, call.args):
            if not isinstance(x, Value) or x.where == _STATIC:
                raise self.error("E205", "a cell is applied to sequences", a.loc)
        kw = {k.name: k for k in call.kwargs}
        init_from = None
        if "init" in kw:
            src = env.get(kw["init"].value.id) if isinstance(kw["init"].value, A.Name) else None
            if src is _FAILED or isinstance(src, Inst) and src.failed:
                raise _Stop()  # reported where it failed
            if not isinstance(src, Inst) or not src.applied or src is inst:
                raise self.error("E205", "init= names a cell applied earlier",
                                 kw["init"].value.loc)
            init_from = src
        steps = None
        if "steps" in kw:
            steps = self.expr(kw["steps"].value, env, model=True)
            if not isinstance(steps, Value) or steps.where != _SEQUENCE:
                raise self.error("E205", "steps= names an input or target sequence",
                                 kw["steps"].value.loc)
        if not inputs and steps is None:
            raise self.error("E203", f"{inst.name} has no input: give one, or "
                             "steps=<sequence> to run it without input", call.loc)
        self.site = inst.site
        self.site.here = None
        try:
            return self._elaborate(inst, inputs, init_from, call.loc)
        finally:
            self.site.here = None
            self.site = None
            self.zero_ref = None

    def _elaborate(self, inst: Inst, inputs, init_from, loc: Loc):
        cell = inst.cell
        env: dict = dict(inst.params)
        body = self.flatten(cell.body, env)
        eqs: dict = {}
        states: dict[str, A.StateDecl] = {}
        outputs: list[tuple[str, Loc]] = []
        input_names: list[str] = []
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
                        raise _Stop()
                    env[st.name] = self.weight(st, env)
                except _Stop:
                    env[st.name] = _FAILED
                    bad_weight = True
            elif isinstance(st, A.Equation):
                for i, t in enumerate(st.targets):
                    eqs[t] = (st, i)
            elif isinstance(st, A.OutputDecl):
                failed |= id(st) in self.broken
                outputs.extend(zip(st.names, st.locs))
        if len(inputs) > len(input_names):
            raise self.error("E203", f"{cell.name} takes {len(input_names)} input"
                             f"{'s' if len(input_names) != 1 else ''} but {len(inputs)} were "
                             "given", loc)
        for i, n in enumerate(input_names):
            env[n] = inputs[i] if i < len(inputs) else Value(const=0.0, implied=True)
        reads: dict[str, Value] = {}
        for name in states:
            if init_from is not None and name not in init_from.finals:
                raise self.error("E205", f"init={init_from.name}: {init_from.cell.name} has "
                                 f"no state {name!r} to start {inst.cell.name}.{name} from", loc)
            reads[name] = Value(_LOOP)
        if len(inputs) < len(input_names):
            self.zero_ref = next(iter(reads.values()), None)
        scope = _CellScope(self, env, eqs, reads)
        for name, st in states.items():
            if name not in eqs:
                continue
            try:
                self._update(scope, name, st)
                inst.finals.add(name)
            except _Stop:
                failed = True
        for name in eqs:  # every equation, also one no output needs
            try:
                scope.value(name, eqs[name][0].loc)
            except _Stop:
                pass
        result = []
        for n, oloc in outputs:
            try:
                result.append(self._expanded(scope.value(n, oloc), loop=True))
            except _Stop:
                failed = True
        if failed:
            raise _Stop()
        return result[0] if len(result) == 1 else Values(result)

    def _update(self, scope: "_CellScope", name: str, st: A.StateDecl) -> None:
        upd = scope.value(name, st.loc)
        if not isinstance(upd, Value):
            self._at(st)
            raise self.error("E205", f"state {name!r} must be a tensor", st.loc)
        if upd.where != _LOOP or upd.const is not None:
            scope.cur[name] = Value(_LOOP, upd.weighted)

    def flatten(self, body, env) -> list:
        """Statements with `if` resolved from the cell's parameter values."""
        out = []
        stack = list(reversed(body))
        while stack:
            st = stack.pop()
            if isinstance(st, A.If):
                self._at(st)
                cond = self.cv(st.cond, env)
                if not isinstance(cond, bool):
                    raise self.error("E205", f"an if condition is true or false, got {cond!r}",
                                     st.cond.loc)
                stack.extend(reversed(st.then if cond else st.orelse))
            else:
                out.append(st)
        return out

    def _expanded(self, v, loop: bool = False):
        """lowering's `_expanded`: a value the same at every step computed from the zeros
        of an input not given, as a per-step array of the loop."""
        if not isinstance(v, Value) or v.where != _STATIC or self.zero_ref is None or \
                not v.implied or (v.const == 0.0 and not loop):
            return v
        return Value(_LOOP if loop else self.zero_ref.where, v.weighted)

    # ------------------------------------------------------------ expressions
    def expr(self, e, env, model=False, scope=None):
        if isinstance(e, (A.Num, A.Str, A.Bool)):
            return e.value
        if isinstance(e, A.Name):
            if scope is not None:
                return scope.value(e.id, e.loc)
            if e.id in env:
                if env[e.id] is _FAILED:
                    raise _Stop()
                return env[e.id]
            if e.id in WORDS:
                return e.id
            raise _Stop()  # E200, reported by the first pass
        if isinstance(e, A.Delayed):
            if scope is None:  # E222, reported by the first pass
                raise _Stop()
            return scope.delayed(e)
        if isinstance(e, A.Neg):
            v = self.expr(e.operand, env, model, scope)
            if isinstance(v, Value):
                return _node("neg", (v,))
            if not _is_number(v):
                raise self.error("E205", f"cannot negate {v!r}", e.loc)
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
        ta, tb = isinstance(a, Value), isinstance(b, Value)
        num = (int, float)
        if not ta and not tb:
            if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool):
                if e.op == "/" and b == 0:
                    raise self.error("E205", "division by zero", e.right.loc)
                return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b,
                        "/": lambda: a / b}[e.op]()
            raise self.error("E205", f"cannot compute {a!r} {e.op} {b!r}", e.loc)
        for v, side in ((a, e.left), (b, e.right)):
            if not isinstance(v, (Value, int, float)) or isinstance(v, bool):
                raise self.error("E205", f"{e.op} needs tensors or numbers", side.loc)
        if e.op == "/":
            if tb:
                raise self.error("E205", "division only by a constant", e.right.loc)
            if b == 0:
                raise self.error("E205", "division by zero", e.right.loc)
            return _node("scale", (a,), factor=1.0 / b)
        if e.op == "*" and (not ta or not tb):
            t, c = (a, b) if ta else (b, a)
            return _node("scale", (t,), factor=float(c))
        ins = [x if isinstance(x, Value) else Value(const=float(x)) for x in (a, b)]
        return _node({"+": "add", "-": "sub", "*": "mul"}[e.op], ins)

    def call(self, e: A.Call, env, model, scope):
        fname = e.func_name
        if fname not in FUNCTIONS:  # E202, reported by the first pass
            raise _Stop()
        args = [self.expr(a, env, model, scope) for a in e.args]
        kwargs = {k.name: self.expr(k.value, env, model, scope) for k in e.kwargs}
        for a, src in zip(args, e.args):
            if fname != "split" or src is e.args[0]:
                if not isinstance(a, Value):
                    raise self.error("E205", f"{fname}() takes tensors, got {a!r}", src.loc)
        if fname == "conv":
            return self.conv(e, args, kwargs)
        if fname in ("sigmoid", "hard_sigmoid", "tanh", "relu"):
            return _node(fname, (args[0],))
        if fname == "concat":
            return self.concat(args)
        if fname == "split":
            x, n = args[0], args[1] if len(args) > 1 else kwargs.get("n")
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise self.error("E205", "split(x, n) needs a positive integer n", e.loc)
            if x.implied and x.const is not None:
                return Values(Value(const=x.const, implied=True) for _ in range(n))
            return Values(Value(x.where, x.weighted, implied=x.implied) for _ in range(n))
        raise AssertionError(fname)

    def concat(self, args):
        parts = [a for a in args if not (a.const == 0.0 and a.implied)]
        if not parts:
            return Value(const=0.0, implied=True)
        whole = len(parts) == len(args)  # no zero channels padded on
        parts = [self._expanded(a) for a in parts]
        if len(parts) == 1:
            return parts[0] if whole else Value(parts[0].where, parts[0].weighted)
        return Value(max(p.where for p in parts), any(p.weighted for p in parts))

    def conv(self, e: A.Call, args, kwargs) -> Value:
        x, w = args[0], args[1]
        if w.kernel is None:
            raise self.error("E205", "the second argument of conv is a kernel weight "
                             "(`weight W = kernel(out, size)`)", e.args[1].loc)
        kh, kw = w.kernel

        def pair(v, what):
            if isinstance(v, int) and not isinstance(v, bool):
                v = (v, v)
            if not (isinstance(v, tuple) and len(v) == 2 and all(isinstance(i, int) for i in v)
                    and min(v) >= (0 if what == "padding" else 1)):
                raise self.error("E205", f"{what} must be "
                                 f"{'a non-negative' if what == 'padding' else 'a positive'} "
                                 f"integer or a pair, got {v!r}", e.loc)
            return v

        pair(kwargs.get("stride", 1), "stride")
        dil = pair(kwargs.get("dilation", 1), "dilation")
        padding = kwargs.get("padding", "same")
        if isinstance(padding, str) and padding == "same":
            if (dil[0] * (kh - 1)) % 2 or (dil[1] * (kw - 1)) % 2:
                raise self.error("E205", f"padding=same needs an odd kernel size, got "
                                 f"{kh}x{kw}; give the padding as a number", e.loc)
        elif not (isinstance(padding, str) and padding == "valid"):
            pair(padding, "padding")
        if x.const == 0.0:
            # a cell run without input: its input convolutions are zeros
            return Value(const=0.0, implied=True)
        x = self._expanded(x)
        return Value(max(x.where, w.where), True)

    # ------------------------------------------------------------ losses
    def loss(self, st: A.Loss, env) -> None:
        call = st.value
        args = [self.expr(a, env, model=True) for a in call.args]
        for k in call.kwargs:
            self.cv(k.value, env)
        pred, target = args
        if not isinstance(pred, Value) or not isinstance(target, Value):
            raise self.error("E205", "a loss compares two sequences", call.loc)
        for value, a in zip(args, call.args):
            if value.where == _STATIC:
                raise self.error("E205", "a loss compares two sequences; this value is the "
                                 "same at every step (a weight or a constant)", a.loc)
        if target.weighted:
            # the losses' VJPs give a cotangent to the prediction only
            raise self.error("E205", "a loss's target (its second argument) must not depend "
                             "on weights: compare a prediction with data, e.g. a target",
                             call.args[1].loc)
        assert call.func_name in LOSSES


class _CellScope:
    """Name lookup inside one cell application, evaluating equations on demand (in the
    order lowering lowers them, so that a cycle is reported where lowering meets it)."""

    def __init__(self, el: _Elaborator, env, eqs, reads):
        self.el, self.env, self.eqs, self.reads = el, env, eqs, reads
        self.cur: dict = {}
        self.busy: set = set()
        self.path: list[tuple[str, tuple]] = []

    def value(self, name: str, loc: Loc):
        el = self.el
        if name in self.cur:
            if self.cur[name] is _FAILED:
                raise _Stop()
            return self.cur[name]
        if name in self.eqs:
            st, _ = self.eqs[name]
            key = st.targets
            if id(st) in el.broken:  # the first pass reported it
                for t in st.targets:
                    self.cur[t] = _FAILED
                raise _Stop()
            if key in self.busy:
                start = next((i for i, (_, k) in enumerate(self.path) if k == key), 0)
                chain = " -> ".join([n for n, _ in self.path[start:]] + [name])
                raise el.error(
                    "E220", f"{name!r} depends on itself at the same time step ({chain}); "
                    f"read the previous step with {name}[t-1]" if name in self.reads else
                    f"{name!r} depends on itself at the same time step ({chain})", loc)
            self.busy.add(key)
            self.path.append((name, key))
            outer = el.site.here if el.site else None
            try:
                el._at(st)
                self._lower(st, name)
            except _Stop:
                for t in st.targets:
                    self.cur[t] = _FAILED
                raise
            finally:
                self.busy.discard(key)
                self.path.pop()
                el._at(outer)
            return self.cur[name]
        if name in self.reads:  # its equation is in a branch not taken
            raise el.error("E210", f"state {name!r} has no equation", loc)
        if name in self.env:
            if self.env[name] is _FAILED:
                raise _Stop()
            return self.env[name]
        if name in WORDS:
            return name
        # defined only in a branch not taken
        raise el.error("E200", f"unknown name {name!r}", loc)

    def _lower(self, st: A.Equation, name: str) -> None:
        result = self.el.expr(st.value, self.env, scope=self)
        if len(st.targets) == 1:
            self.cur[name] = result
            return
        items = result.items if isinstance(result, Values) else [result]
        if len(items) != len(st.targets):
            raise self.el.error("E203", f"{len(st.targets)} names on the left but "
                                f"{len(items)} values on the right", st.loc)
        for t, v in zip(st.targets, items):
            self.cur[t] = v

    def delayed(self, e: A.Delayed):
        if e.name not in self.reads:  # a state only in a branch not taken
            raise self.el.error("E222", f"{e.name!r} is not a state", e.loc)
        return self.reads[e.name]

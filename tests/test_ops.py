"""Every op of the op table, checked on its own.

For each differentiable op: build the graph `x -> op -> y`, apply the op's
VJP rules through `compiler.autodiff.Builder` for a random cotangent `g`,
evaluate with the reference interpreter (compiler/interp.py), and compare
<VJP(g), d> with <g, J d>, the directional derivative of <g, op(x)> along a
random direction d by Richardson-extrapolated central differences in
float64: relative error < 1e-8. A loss is the seed of the backward pass
(autodiff calls its rule with no cotangent: d loss / d loss = 1), so a
loss's rule is checked against the derivative of the loss itself.

For each op with a code template: the template, evaluated with `rt`, `xp`
and `B` bound as in a generated module, gives the op's reference evaluation,
per step and (for the ops the generated code runs on whole sequences) on
time-batched (T, N, ...) arrays.

Adding an op to the table without adding it here fails
`test_every_differentiable_op_has_a_vjp_case` /
`test_every_code_template_has_a_case`.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import pytest

from convc.compiler.autodiff import Builder
from convc.compiler.interp import evaluate, ref_attrs
from convc.compiler.ir import Graph, Node
from convc.compiler.ops import OPS, vjp_rule
from convc.runtime import kernels as K
from convc.runtime.backend import get_backend
from convc.spec.diagnostics import NOWHERE

N = 2  # batch
T = 3  # steps, for time-batched arrays
LOSSES = ("bce", "bce_logits", "mse", "xent_logits")
RTOL = 1e-8


@dataclass
class Source:
    """An operand: its per-sample shape, its leading axes, and how to draw its values.

    lead: "static" (a parameter: no batch axis), "step" (N, ...) or
    "seq" (T, N, ...), a whole sequence as the generated code batches it.
    draw: normal; away0 (|x| >= 0.1, away from relu's kink); prob (0.25..0.75,
    where log is smooth); unit (0..1); hsig (away from hard_sigmoid's kinks).
    """

    shape: tuple
    lead: str = "step"
    draw: str = "normal"

    def full_shape(self) -> tuple:
        return {"static": (), "step": (N,), "seq": (T, N)}[self.lead] + tuple(self.shape)


@dataclass
class Case:
    op: str
    sources: dict
    args: tuple  # source names, in operand order (a name may repeat: mul(x, x))
    attrs: dict = field(default_factory=dict)
    id: str = ""

    def param(self):
        return pytest.param(self, id=f"{self.op}-{self.id}" if self.id else self.op)


def S(*shape, lead="step", draw="normal") -> Source:
    return Source(tuple(shape), lead, draw)


def draw(src: Source, rng) -> np.ndarray:
    shape = src.full_shape()
    if src.draw == "normal":
        return rng.standard_normal(shape)
    if src.draw == "away0":  # relu's kink at 0
        return rng.choice([-1.0, 1.0], shape) * rng.uniform(0.1, 2.0, shape)
    if src.draw == "prob":
        return rng.uniform(0.25, 0.75, shape)
    if src.draw == "unit":
        return rng.uniform(0.0, 1.0, shape)
    if src.draw == "hsig":  # hard_sigmoid's kinks at +-2.5: both flat parts and the slope
        v = rng.uniform(-4.0, 4.0, shape)
        near = np.abs(np.abs(v) - 2.5) < 0.2
        return np.where(near, v * 0.7, v)
    raise ValueError(src.draw)


def conv_case(x, w, stride=(1, 1), pad=(0, 0), dilation=(1, 1), id=""):
    return Case("conv", {"x": S(*x), "w": S(*w, lead="static")}, ("x", "w"),
                dict(stride=stride, pad=pad, dilation=dilation), id)


def loss_cases(op, pdraw, ydraw):
    out = []
    for steps in ("all", "last"):
        out.append(Case(op, {"p": S(3, 4, 5, draw=pdraw), "y": S(3, 4, 5, draw=ydraw)},
                        ("p", "y"), dict(steps=steps), f"{steps}-step"))
        out.append(Case(op, {"p": S(3, 4, 5, lead="seq", draw=pdraw),
                             "y": S(3, 4, 5, lead="seq", draw=ydraw)},
                        ("p", "y"), dict(steps=steps), f"{steps}-seq"))
    return out


# every differentiable op, with broadcasting, repeated operands, and every conv geometry
VJP_CASES = [
    Case("add", {"x": S(3, 4, 5), "y": S(3, 4, 5)}, ("x", "y"), id="same"),
    Case("add", {"x": S(3, 4, 5), "b": S(3, 1, 1, lead="static")}, ("x", "b"), id="bias"),
    Case("add", {"b": S(3, 4, 5, lead="static"), "x": S(3, 4, 5)}, ("b", "x"), id="pixel-bias"),
    Case("add", {"x": S(3, 4, 5), "y": S(1, 4, 5)}, ("x", "y"), id="broadcast-channels"),
    Case("add", {"x": S(3, 4, 5), "c": S(lead="static")}, ("x", "c"), id="scalar"),
    Case("add", {"x": S(3, 4, 5)}, ("x", "x"), id="x+x"),
    Case("sub", {"x": S(3, 4, 5), "y": S(3, 4, 5)}, ("x", "y"), id="same"),
    Case("sub", {"c": S(lead="static"), "x": S(3, 4, 5)}, ("c", "x"), id="1-z"),
    Case("sub", {"x": S(3, 4, 5), "b": S(3, 1, 1, lead="static")}, ("x", "b"), id="bias"),
    Case("mul", {"x": S(3, 4, 5), "y": S(3, 4, 5)}, ("x", "y"), id="same"),
    Case("mul", {"w": S(3, 4, 5, lead="static"), "c": S(3, 4, 5)}, ("w", "c"), id="peephole"),
    Case("mul", {"x": S(3, 4, 5), "y": S(1, 4, 5)}, ("x", "y"), id="broadcast-channels"),
    Case("mul", {"x": S(3, 4, 5)}, ("x", "x"), id="x*x"),
    Case("addn", {"a": S(3, 4, 5), "b": S(3, 4, 5), "c": S(3, 4, 5)}, ("a", "b", "c"), id="3"),
    Case("addn", {"a": S(3, 4, 5), "b": S(3, 1, 1, lead="static")}, ("a", "b", "a"),
         id="broadcast-repeat"),
    Case("neg", {"x": S(3, 4, 5)}, ("x",)),
    Case("scale", {"x": S(3, 4, 5)}, ("x",), dict(factor=-0.37)),
    Case("sigmoid", {"x": S(3, 4, 5)}, ("x",)),
    Case("tanh", {"x": S(3, 4, 5)}, ("x",)),
    Case("relu", {"x": S(3, 4, 5, draw="away0")}, ("x",)),
    Case("hard_sigmoid", {"x": S(3, 4, 5, draw="hsig")}, ("x",)),
    Case("softplus", {"x": S(3, 4, 5)}, ("x",)),
    conv_case((3, 6, 6), (4, 3, 3, 3), pad=(1, 1), id="3x3-same"),
    conv_case((5, 4, 6), (3, 5, 1, 1), id="1x1"),
    conv_case((3, 5, 5), (2, 3, 5, 5), pad=(2, 2), id="5x5-same"),
    conv_case((3, 7, 5), (4, 3, 2, 4), pad=(1, 2), id="even-kernel"),
    conv_case((2, 6, 6), (3, 2, 2, 2), id="2x2-valid"),
    conv_case((3, 9, 8), (2, 3, 3, 3), stride=(2, 3), pad=(1, 0), id="stride"),
    conv_case((2, 9, 10), (3, 2, 3, 2), pad=(2, 1), dilation=(2, 3), id="dilation"),
    conv_case((3, 8, 8), (2, 3, 3, 3), pad=(2, 2), dilation=(2, 2), id="dilated-same"),
    conv_case((3, 11, 9), (2, 3, 4, 3), stride=(3, 2), pad=(1, 2), dilation=(2, 1), id="all"),
    conv_case((2, 8, 8), (2, 2, 3, 3), stride=(3, 3), id="unreached-rows"),
    Case("concat", {"a": S(2, 4, 5), "b": S(3, 4, 5), "c": S(1, 4, 5)}, ("a", "b", "c"),
         id="3"),
    Case("concat", {"a": S(2, 4, 5)}, ("a", "a"), id="repeat"),
    Case("slice", {"x": S(8, 4, 5)}, ("x",), dict(start=2, stop=6), id="middle"),
    Case("slice", {"x": S(8, 4, 5)}, ("x",), dict(start=0, stop=8), id="all"),
    Case("pad_zeros", {"x": S(3, 4, 5)}, ("x",), dict(before=2, after=1), id="both"),
    Case("pad_zeros", {"x": S(3, 4, 5)}, ("x",), dict(before=0, after=4), id="after"),
    # a constant (of parameters only) as a state's new value, of the state's shape, or as
    # a cell's output, of its own: no gradient to the operand it takes the shape from
    Case("expand", {"b": S(3, 1, 1, lead="static"), "h": S(3, 4, 5)}, ("b", "h"),
         dict(shape=None, like=True), id="state"),
    Case("expand", {"c": S(lead="static"), "h": S(3, 4, 5)}, ("c", "h"),
         dict(shape=(3, 4, 5), like=True), id="scalar"),
    Case("expand", {"w": S(3, 4, 5, lead="static"), "h": S(2, 4, 5)}, ("w", "h"),
         dict(shape=(3, 4, 5), like=False), id="output"),
    Case("reshape", {"b": S(4, lead="static")}, ("b",), dict(shape=(4, 1, 1)), id="bias"),
    Case("kernel_slice", {"w": S(4, 5, 3, 3, lead="static")}, ("w",), dict(start=1, stop=3)),
    Case("kernel_slice", {"w": S(4, 5, 3, 3, lead="static")}, ("w",), dict(start=0, stop=5),
         id="all"),
    Case("kernel_pad", {"g": S(4, 2, 3, 3, lead="static")}, ("g",), dict(start=1, total=5)),
    *loss_cases("bce", "prob", "unit"),
    *loss_cases("bce_logits", "normal", "unit"),
    *loss_cases("mse", "normal", "unit"),
    *loss_cases("xent_logits", "normal", "unit"),
]


def _seg(src: Source):
    return None if src.lead == "static" else "@x"


def build(case: Case):
    """The graph sources -> out = op(args), its cotangent `ct`, and the VJP contributions."""
    g = Graph()
    for name, src in case.sources.items():
        op = "param" if src.lead == "static" else "input"
        g.add(Node(name, op, (), dict(shape=src.shape), src.shape, NOWHERE, _seg(src)))
    in_shapes = [case.sources[a].shape for a in case.args]
    shape = tuple(OPS[case.op].shape(in_shapes, case.attrs))
    segs = [_seg(case.sources[a]) for a in case.args]
    seg = None if case.op in LOSSES or all(s is None for s in segs) else "@x"
    y = Node("out", case.op, tuple(case.args), dict(case.attrs), shape, NOWHERE, seg)
    g.add(y)
    ct = None
    if case.op not in LOSSES:
        ct = "ct"
        g.add(Node("ct", "input", (), dict(shape=shape), shape, NOWHERE, seg))
    b = Builder(g, NOWHERE)
    contribs: dict[str, list[str]] = {}
    for i, name in enumerate(case.args):
        rule = vjp_rule(OPS[case.op], i)
        if rule is not None:
            contribs.setdefault(name, []).append(rule(b, y, ct, i))
    return g, contribs


def lead_of(case: Case) -> tuple:
    leads = {case.sources[a].lead for a in case.args}
    return (T, N) if "seq" in leads else (N,) if "step" in leads else ()


def _directional(f, h: float) -> float:
    """Richardson-extrapolated central difference of f at 0: error O(h^4)."""
    def central(s):
        return (f(s) - f(-s)) / (2 * s)
    return (4 * central(h / 2) - central(h)) / 3


@pytest.mark.parametrize("case", [c.param() for c in VJP_CASES])
def test_vjp_matches_finite_differences(case: Case):
    rng = np.random.default_rng(zlib.crc32(f"{case.op}-{case.id}".encode()))
    graph, contribs = build(case)
    env = {name: draw(src, rng) for name, src in case.sources.items()}
    y_shape = lead_of(case) + tuple(graph.node("out").shape) if case.op not in LOSSES else ()
    if case.op not in LOSSES:
        env["ct"] = rng.standard_normal(y_shape)
    values = evaluate(graph, env)

    # the shape rule agrees with the reference evaluation
    assert np.shape(values["out"]) == y_shape
    # every contribution has its input's shape (broadcasting undone by sum_to)
    for name, ids in contribs.items():
        for c in ids:
            assert np.shape(values[c]) == case.sources[name].full_shape(), (name, c)
    assert contribs, "the op has no VJP rule for any operand"

    dirs = {name: rng.standard_normal(case.sources[name].full_shape()) for name in contribs}
    analytic = sum(float(np.sum(values[c] * dirs[name]))
                   for name, ids in contribs.items() for c in ids)

    def f(h):
        shifted = {n: v + h * dirs[n] if n in dirs else v for n, v in env.items()}
        out = evaluate(graph, shifted, wanted=["out"])["out"]
        return float(np.sum(out * env["ct"])) if "ct" in env else float(out)

    numeric = _directional(f, 1e-3)
    scale = max(abs(numeric), abs(analytic))
    assert scale > 1e-3, "directional derivative too small to test"
    assert abs(numeric - analytic) <= RTOL * scale, (numeric, analytic)


def _differentiable(op) -> bool:
    return any(r is not None for r in op.vjp)


def test_every_differentiable_op_has_a_vjp_case():
    covered = {c.op for c in VJP_CASES}
    missing = sorted(n for n, op in OPS.items() if _differentiable(op) and n not in covered)
    assert not missing, f"ops with VJP rules but no case in VJP_CASES: {missing}"


def test_fixed_arity_ops_have_one_rule_per_input():
    for name, op in OPS.items():
        if op.vjp and not op.variadic:
            assert len(op.vjp) == op.arity, name


def test_loss_rules_are_seeds():
    """Losses are differentiated only as the seed: no rule for the target."""
    for name in LOSSES:
        op = OPS[name]
        assert op.vjp[0] is not None and op.vjp[1] is None, name


# ---------------------------------------------------------------- code templates

BACKEND = get_backend("cpu", "numpy")

# ops of the backward pass (no VJP of their own) and the constant
EXTRA_CODE_CASES = [
    Case("const", {}, (), dict(value=-1.25)),
    Case("sigmoid_grad", {"y": S(3, 4, 5, draw="prob"), "g": S(3, 4, 5)}, ("y", "g")),
    Case("tanh_grad", {"y": S(3, 4, 5), "g": S(3, 4, 5)}, ("y", "g")),
    Case("relu_grad", {"y": S(3, 4, 5, draw="away0"), "g": S(3, 4, 5)}, ("y", "g")),
    Case("hard_sigmoid_grad", {"x": S(3, 4, 5, draw="hsig"), "g": S(3, 4, 5)}, ("x", "g")),
    Case("conv_grad_input", {"g": S(4, 6, 6), "w": S(4, 3, 3, 3, lead="static")}, ("g", "w"),
         dict(x_shape=(3, 6, 6), stride=(1, 1), pad=(1, 1), dilation=(1, 1)), "3x3-same"),
    Case("conv_grad_input", {"g": S(2, 3, 6), "w": S(2, 3, 4, 3, lead="static")}, ("g", "w"),
         dict(x_shape=(3, 11, 9), stride=(3, 2), pad=(1, 2), dilation=(2, 1)), "all"),
    Case("conv_grad_weight", {"x": S(3, 6, 6), "g": S(4, 6, 6)}, ("x", "g"),
         dict(w_shape=(4, 3, 3, 3), stride=(1, 1), pad=(1, 1), dilation=(1, 1)), "3x3-same"),
    Case("conv_grad_weight", {"x": S(3, 11, 9), "g": S(2, 3, 6)}, ("x", "g"),
         dict(w_shape=(2, 3, 4, 3), stride=(3, 2), pad=(1, 2), dilation=(2, 1)), "all"),
    Case("pad_channels", {"g": S(3, 4, 5)}, ("g",), dict(start=2, total=8)),
    Case("sum_to", {"x": S(3, 4, 5)}, ("x",), dict(shape=(3, 1, 1), batched=False), "param"),
    Case("sum_to", {"x": S(3, 4, 5)}, ("x",), dict(shape=(1, 4, 5), batched=True), "batched"),
    *[Case(f"{name}_grad", c.sources, c.args, c.attrs, c.id)
      for name, pd in (("bce", "prob"), ("bce_logits", "normal"), ("mse", "normal"),
                       ("xent_logits", "normal"))
      for c in loss_cases(name, pd, "unit")],
]

CODE_CASES = VJP_CASES + EXTRA_CODE_CASES

# ops the generated code also runs on whole sequences, (T, N, C, H, W) at once
TIME_BATCHED = ("add", "sub", "mul", "addn", "neg", "scale", "sigmoid", "tanh", "relu",
                "hard_sigmoid", "softplus", "sigmoid_grad", "tanh_grad", "relu_grad", "hard_sigmoid_grad",
                "conv", "conv_grad_input", "conv_grad_weight", "concat", "slice",
                "pad_channels", "sum_to", "expand")


def _as_sequence(case: Case) -> Case:
    srcs = {n: Source(s.shape, "seq" if s.lead == "step" else s.lead, s.draw)
            for n, s in case.sources.items()}
    return Case(case.op, srcs, case.args, case.attrs, case.id + "-seq")


def _has_step(case: Case) -> bool:
    return any(s.lead == "step" for s in case.sources.values())


CODE_PARAMS = [c.param() for c in CODE_CASES] + [
    _as_sequence(c).param() for c in CODE_CASES if c.op in TIME_BATCHED and _has_step(c)]


def run_code(op: str, args: list, attrs: dict):
    names = [f"a{i}" for i in range(len(args))]
    expr = OPS[op].code(names, attrs)
    return eval(expr, {"rt": K, "xp": np, "B": BACKEND, "np": np}, dict(zip(names, args)))


def reference(case: Case, args: list):
    """The op's ref, which takes a leading batch axis: time-batched arrays go step by step.

    Losses, their gradients and sum_to take (T, N, ...) arrays as they are;
    conv_grad_weight reduces over the batch, so for it (T, N, ...) is
    flattened to (T*N, ...).
    """
    attrs = ref_attrs(case.op, case.attrs)
    ref = OPS[case.op].ref
    seq = [case.sources[a].lead == "seq" for a in case.args]
    whole = case.op in LOSSES or case.op.removesuffix("_grad") in LOSSES or case.op == "sum_to"
    if not any(seq) or whole:
        return ref(*args, **attrs)
    if case.op == "conv_grad_weight":
        flat = [a.reshape((-1,) + a.shape[2:]) if s else a for a, s in zip(args, seq)]
        return ref(*flat, **attrs)
    return np.stack([ref(*[a[t] if s else a for a, s in zip(args, seq)], **attrs)
                     for t in range(T)])


@pytest.mark.parametrize("case", CODE_PARAMS)
def test_code_template_matches_reference(case: Case):
    rng = np.random.default_rng(zlib.crc32(f"{case.op}-{case.id}".encode()))
    values = {name: draw(src, rng) for name, src in case.sources.items()}
    args = [values[a] for a in case.args]
    got = np.asarray(run_code(case.op, args, case.attrs))
    want = np.asarray(reference(case, args))
    assert got.shape == want.shape
    scale = max(1.0, float(np.abs(want).max()) if want.size else 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * scale)


def test_every_code_template_has_a_case():
    covered = {c.op for c in CODE_CASES}
    missing = sorted(n for n, op in OPS.items() if op.code is not None and n not in covered)
    assert not missing, f"ops with a code template but no case: {missing}"


# ---------------------------------------------------------------- the interpreter itself

def test_interpreter_follows_operand_order_and_repeats():
    g = Graph()
    g.add(Node("a", "input", (), {}, (1, 1, 1), NOWHERE, "@x"))
    g.add(Node("b", "input", (), {}, (1, 1, 1), NOWHERE, "@x"))
    g.add(Node("d", "sub", ("b", "a"), {}, (1, 1, 1), NOWHERE, "@x"))
    g.add(Node("s", "mul", ("d", "d"), {}, (1, 1, 1), NOWHERE, "@x"))
    out = evaluate(g, {"a": np.full((1, 1, 1, 1), 2.0), "b": np.full((1, 1, 1, 1), 5.0)})
    assert float(out["d"].item()) == 3.0 and float(out["s"].item()) == 9.0


def test_interpreter_reports_missing_sources():
    g = Graph()
    g.add(Node("a", "input", (), {}, (1, 1, 1), NOWHERE, "@x"))
    g.add(Node("n", "neg", ("a",), {}, (1, 1, 1), NOWHERE, "@x"))
    with pytest.raises(KeyError, match="'a'"):
        evaluate(g, {})


def test_ref_attrs_drops_bookkeeping():
    assert ref_attrs("scale", dict(factor=2.0, keep=True, _named=True)) == dict(factor=2.0)
    assert ref_attrs("const", dict(value=1.0, _named=True)) == dict(value=1.0)
    assert ref_attrs("concat", dict(_named=True)) == {}

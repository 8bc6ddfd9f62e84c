"""The op table: every primitive op, defined once.

One `OpDef` record holds an op's shape rule, its vector-Jacobian rules (one
per input), its code template and its reference evaluation. Gates, cells and
losses are built from these in the language itself; fusion and hoisting are
passes, not second definitions.

Conventions
- Shapes are per sample: a per-step value of shape (C, H, W) is an array of
  shape (N, C, H, W) at run time (or (T, N, C, H, W) when a stage is
  batched over time). Parameters and constants carry their full shape.
  `None` stands for a dimension not inferred yet.
- A VJP rule takes the builder, the node, the node's cotangent `g` (a node
  id) and the input index, and returns the id of that input's contribution.
  Rules add graph nodes; they never touch arrays. Sigmoid and tanh use their
  output (`g*y*(1-y)`, `g*(1-y*y)`); conv has one rule per input.
- Code templates are format strings over the argument expressions; `rt` is
  `convc.runtime.kernels`, `B` the backend, `xp` its array module.
- Reference evaluations (reference.py) take NumPy arrays with a leading batch axis;
  they share nothing with the runtime's kernels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import reference as R


def float_source(value) -> str:
    """A float as Python source: its repr, or an expression for inf and nan, which have
    no literal (a bare `inf` in generated code is a NameError)."""
    v = float(value)
    if v != v:
        return "float('nan')"
    if v in (float("inf"), float("-inf")):
        return f"float({str(v)!r})"
    return repr(v)


class ShapeError(Exception):
    """Raised by shape rules; the caller turns it into a located diagnostic."""


# `into=OUT`: the op writes into a buffer by its code template with `out=` as its last
# keyword argument (`rt.sigmoid(x)` -> `rt.sigmoid(x, out=buf)`).
OUT = "out="


@dataclass(frozen=True)
class OpDef:
    """Everything every stage knows about one primitive.

    Lowering and shape inference: `shape`, `arity`/`variadic`, `elementwise`.
    Autodiff: `vjp` (one rule per input; None: no gradient through it),
    `shape_only`, `loss`. Passes and peeling: `zero_if_any`, `zero_if_all`,
    `terms`, `activation`/`grad_from_output`. Code generation: `code` (an
    expression), `into` (the statement that writes the result into a given
    buffer: the in-place form time loops use), `alias`, `view`, `owned`.
    Interpretation: `ref` (compiler/reference.py), `source`. Reports: `flops`.
    """
    name: str
    shape: Callable  # (in_shapes, attrs) -> shape
    code: Callable | None  # (args: list[str], attrs) -> python expression
    ref: Callable | None  # (*arrays, **attrs) -> array
    vjp: tuple = ()  # one rule (or None: not differentiable in that input) per input
    variadic: bool = False
    elementwise: bool = False
    doc: str = ""
    # extra: how many inputs (fixed arity ops); -1 for variadic
    arity: int = field(default=1)
    # operands read only for their shape: no gradient flows to them (expand's second)
    shape_only: tuple = ()
    # (args, attrs, out) -> an expression computing the op into the buffer `out`; OUT: the
    # code template with `out=` appended; None: the op cannot write into a given buffer
    into: Callable | str | None = None
    # operands `out` may be: an elementwise pass that reads each element before writing it
    alias: tuple = ()
    # the result is a view of its operand: it has no buffer of its own
    view: bool = False
    # a value with no inputs whose value comes from outside the graph's arithmetic
    # (data, parameters, states, cotangents carried between steps): no code, no ref
    source: bool = False
    # False: the generated function does not own the value (its caller's, or a constant),
    # so never writes into it
    owned: bool = True
    # the result is zero when any of these operands is zero
    zero_if_any: tuple = ()
    # the result is zero when every operand is zero
    zero_if_all: bool = False
    # a signed sum of its operands (+1/-1 per operand; variadic: one sign for all): a zero
    # operand drops out of it
    terms: tuple = ()
    # a pointwise nonlinearity (sibling activations of one value are merged)
    activation: bool = False
    # the op computing g * f'(x) from f's output y (sigmoid: sigmoid_grad), where one exists
    grad_from_output: str | None = None
    # a loss: reduces a prediction and a target to the scalar the backward pass starts from
    loss: bool = False
    # the language calls it by its name on one value (`softplus(x)`): spec/builtins.py
    # lists the functions marked here, lowering applies them by name
    function: bool = False
    # False: the op only moves or reinterprets data (a source, a view, concat): reports
    # count no work for it
    arithmetic: bool = True
    # (args, attrs) -> the value of one element as a C/CUDA expression over the scalars
    # `args` (type T; EXP, TANH, LOG1P, FABS are T's functions): what a fused step
    # kernel computes (compiler/fuse.py, compiler/render.py); None: not fusable
    scalar: Callable | None = None
    # (in_shapes, out_shape) -> multiply-add FLOPs of one sample; None: an elementwise or
    # data-moving op, counted by elements
    flops: Callable | None = None

    @property
    def writes_into(self) -> bool:
        return self.into is not None

    def into_code(self, args: list[str], attrs: dict, out: str) -> str:
        """The expression that computes this op of `args` into `out`."""
        return self.into(args, attrs, out)


OPS: dict[str, OpDef] = {}


def _code_with_out(code):
    def into(args, attrs, out):
        text = code(args, attrs)
        assert text.endswith(")"), text
        return text[:-1] + f", out={out})"
    return into


def c_number(v) -> str:
    """A float as a C/CUDA literal of the kernel's type T (scalar templates)."""
    v = float(v)
    if v != v:
        return "((T)NAN)"
    if v in (float("inf"), float("-inf")):
        return "((T)INFINITY)" if v > 0 else "(-(T)INFINITY)"
    return f"((T){v!r})"


def defop(**kw) -> OpDef:
    if kw.get("into") == OUT:
        kw["into"] = _code_with_out(kw["code"])
    op = OpDef(**kw)
    OPS[op.name] = op
    return op


# ---------------------------------------------------------------- shape helpers

def unify_dim(a, b, what: str = "dimension"):
    if a is None:
        return b
    if b is None or a == b:
        return a
    raise ShapeError(f"{what} {a} does not match {b}")


def fmt_shape(s) -> str:
    if s is None:
        return "[?]"
    return "[" + ", ".join("?" if d is None else str(d) for d in s) + "]"


# Shape inference sets this for its last round: a dimension that is 1 wherever it
# is known (a one-channel state meeting one-channel values) is then taken to be 1.
UNKNOWN_MEETING_ONE_IS_ONE = False


def broadcast(shapes) -> tuple:
    """NumPy broadcasting of per-sample shapes (scalars are shape ())."""
    rank = max(len(s) for s in shapes)
    out = []
    for axis in range(rank):
        dims = [s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0]
        known = [d for d in dims if d is not None and d != 1]
        if len(set(known)) > 1:
            raise ShapeError("shapes " + " and ".join(fmt_shape(s) for s in shapes)
                             + " do not match")
        if known:
            out.append(known[0])
        elif any(d is None for d in dims) and not (UNKNOWN_MEETING_ONE_IS_ONE and 1 in dims):
            out.append(None)
        else:
            out.append(1)
    return tuple(out)


def _same(shapes, attrs):
    return shapes[0]


def _elementwise(shapes, attrs):
    return broadcast(shapes)


# ---------------------------------------------------------------- sources
# Sources have no inputs; their shape is set when they are created.

def _source_shape(shapes, attrs):
    return attrs.get("shape")


for _name, _doc in (("input", "a per-step data input"),
                    ("param", "a trainable parameter"),
                    ("state", "a state's value at the previous step (t-1)"),
                    ("init", "a state's initial value (zeros, learned, or another loop's final)"),
                    ("seqref", "a per-step value of an earlier loop, read at the same step")):
    defop(name=_name, shape=_source_shape, code=None, ref=None, arity=0, source=True,
          owned=False, arithmetic=False, doc=_doc)


defop(name="carry", shape=_source_shape, code=None, ref=None, arity=0, source=True,
      owned=False, arithmetic=False, doc="backward pass: a state's cotangent from step t+1, None when there is none")
defop(name="carry_out", shape=lambda s, at: s[0], code=None, ref=None, arity=1,
      owned=False, arithmetic=False, doc="backward pass: a state read's cotangent at t=0, after the loop")


def _const_shape(shapes, attrs):
    return ()


defop(name="const", shape=_const_shape, arity=0, owned=False, arithmetic=False,
      code=lambda a, at: float_source(at["value"]),
      scalar=lambda a, at: c_number(at["value"]),
      ref=lambda **at: np.asarray(at["value"], dtype=np.float64),
      doc="a scalar constant")


# ---------------------------------------------------------------- elementwise

def _g(b, node, g, i):
    return g


def _neg_g(b, node, g, i):
    return b.op("neg", g)


def _sum_to(b, node, contrib, i):
    """Reduce a contribution to the shape of input i (undo broadcasting)."""
    target = b.shape_of(node.inputs[i])
    if b.is_static(node.inputs[i]) or tuple(b.shape_of(contrib)) != tuple(target):
        return b.op("sum_to", contrib, shape=tuple(target),
                    batched=not b.is_static(node.inputs[i]))
    return contrib


defop(name="add", arity=2, elementwise=True,
      scalar=lambda a, at: f"({a[0]} + {a[1]})", shape=_elementwise,
      code=lambda a, at: f"{a[0]} + {a[1]}",
      into=lambda a, at, out: f"xp.add({a[0]}, {a[1]}, out={out})", alias=(0, 1),
      terms=(1, 1),
      ref=lambda x, y: x + y,
      vjp=(lambda b, n, g, i: _sum_to(b, n, g, i),
           lambda b, n, g, i: _sum_to(b, n, g, i)),
      doc="elementwise sum (NumPy broadcasting)")

defop(name="sub", arity=2, elementwise=True,
      scalar=lambda a, at: f"({a[0]} - {a[1]})", shape=_elementwise,
      code=lambda a, at: f"{a[0]} - {a[1]}",
      into=lambda a, at, out: f"xp.subtract({a[0]}, {a[1]}, out={out})", alias=(0, 1),
      terms=(1, -1),
      ref=lambda x, y: x - y,
      vjp=(lambda b, n, g, i: _sum_to(b, n, g, i),
           lambda b, n, g, i: _sum_to(b, n, b.op("neg", g), i)),
      doc="elementwise difference")

defop(name="mul", arity=2, elementwise=True,
      scalar=lambda a, at: f"({a[0]} * {a[1]})", shape=_elementwise,
      code=lambda a, at: f"{a[0]} * {a[1]}",
      into=lambda a, at, out: f"xp.multiply({a[0]}, {a[1]}, out={out})", alias=(0, 1),
      zero_if_any=(0, 1),
      ref=lambda x, y: x * y,
      vjp=(lambda b, n, g, i: _sum_to(b, n, b.op("mul", g, n.inputs[1]), i),
           lambda b, n, g, i: _sum_to(b, n, b.op("mul", g, n.inputs[0]), i)),
      doc="elementwise (Hadamard) product")

defop(name="addn", arity=-1, variadic=True, elementwise=True,
      scalar=lambda a, at: "(" + " + ".join(a) + ")", shape=_elementwise,
      code=lambda a, at: " + ".join(a),
      into=lambda a, at, out: (f"xp.add({a[0]}, {a[1]}, out={out})" if len(a) == 2 else
                               f"rt.addn({', '.join(a)}, out={out})"), alias=(0,),
      terms=(1,),
      ref=lambda *xs: sum(xs[1:], xs[0]),
      vjp=(lambda b, n, g, i: _sum_to(b, n, g, i),),
      doc="sum of several values (a cotangent with several contributions)")

defop(name="neg", arity=1, elementwise=True,
      scalar=lambda a, at: f"(-{a[0]})", shape=_same,
      code=lambda a, at: f"-{a[0]}",
      into=lambda a, at, out: f"xp.negative({a[0]}, out={out})", alias=(0,),
      zero_if_all=True,
      ref=lambda x: -x,
      vjp=(_neg_g,),
      doc="negation")

defop(name="scale", arity=1, elementwise=True,
      scalar=lambda a, at: f"({a[0]} * {c_number(at['factor'])})", shape=_same,
      code=lambda a, at: f"{a[0]} * {float_source(at['factor'])}",
      into=lambda a, at, out: f"xp.multiply({a[0]}, {float_source(at['factor'])}, out={out})",
      alias=(0,), zero_if_all=True,
      ref=lambda x, factor: x * factor,
      # (factor 1: the identity a state's update gets when its value is made outside the
      # loop; its cotangent passes through unchanged)
      vjp=(lambda b, n, g, i: g if float(n.attrs["factor"]) == 1.0 else
           b.op("scale", g, factor=n.attrs["factor"]),),
      doc="multiplication by a constant (also `/ constant`)")


# ---------------------------------------------------------------- activations

defop(name="sigmoid", arity=1, elementwise=True,
      scalar=lambda a, at: f"(1 / (1 + EXP(-{a[0]})))", shape=_same, function=True,
      code=lambda a, at: f"rt.sigmoid({a[0]})",
      into=OUT, alias=(0,), activation=True, grad_from_output="sigmoid_grad",
      ref=lambda x: R.sigmoid(x),
      vjp=(lambda b, n, g, i: b.op("sigmoid_grad", n.id, g),),
      doc="logistic sigmoid 1/(1+exp(-x))")

defop(name="tanh", arity=1, elementwise=True,
      scalar=lambda a, at: f"TANH({a[0]})", shape=_same, function=True,
      code=lambda a, at: f"xp.tanh({a[0]})",
      # rt.tanh: from exp, faster than NumPy's float32 tanh
      into=lambda a, at, out: f"rt.tanh({a[0]}, out={out})", alias=(0,), zero_if_all=True,
      activation=True, grad_from_output="tanh_grad",
      ref=lambda x: np.tanh(x),
      vjp=(lambda b, n, g, i: b.op("tanh_grad", n.id, g),),
      doc="hyperbolic tangent")

defop(name="relu", arity=1, elementwise=True,
      scalar=lambda a, at: f"({a[0]} < 0 ? 0 : {a[0]})", shape=_same, function=True,
      code=lambda a, at: f"xp.maximum({a[0]}, 0)",
      into=lambda a, at, out: f"xp.maximum({a[0]}, 0, out={out})", alias=(0,),
      zero_if_all=True, activation=True, grad_from_output="relu_grad",
      ref=lambda x: np.maximum(x, 0),
      vjp=(lambda b, n, g, i: b.op("relu_grad", n.id, g),),
      doc="max(x, 0)")

defop(name="hard_sigmoid", arity=1, elementwise=True,
      scalar=lambda a, at: f"CLIP01(0.2 * {a[0]} + 0.5)", shape=_same, function=True,
      code=lambda a, at: f"rt.hard_sigmoid({a[0]})",
      into=OUT, alias=(0,), activation=True,
      ref=lambda x: R.hard_sigmoid(x),
      vjp=(lambda b, n, g, i: b.op("hard_sigmoid_grad", n.inputs[0], g),),
      doc="clip(0.2*x + 0.5, 0, 1), as in Keras")

defop(name="softplus", arity=1, elementwise=True,
      scalar=lambda a, at: f"(({a[0]} < 0 ? 0 : {a[0]}) + LOG1P(EXP(-FABS({a[0]}))))", shape=_same, function=True,
      code=lambda a, at: f"xp.logaddexp(0.0, {a[0]})",
      into=lambda a, at, out: f"xp.logaddexp(0.0, {a[0]}, out={out})", alias=(0,),
      activation=True,
      ref=lambda x: np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0),
      vjp=(lambda b, n, g, i: b.op("mul", g, b.op("sigmoid", n.inputs[0])),),
      doc="log(1 + exp(x)), a smooth relu")

# gradients of activations: primitives of the backward pass (no VJP of their own)
defop(name="sigmoid_grad", arity=2, elementwise=True,
      scalar=lambda a, at: f"({a[1]} * {a[0]} * (1 - {a[0]}))", shape=_elementwise,
      code=lambda a, at: f"rt.sigmoid_grad({a[0]}, {a[1]})",
      into=OUT, zero_if_any=(1,),
      ref=lambda y, g: g * y * (1 - y), doc="g*y*(1-y) from the sigmoid's output y")
defop(name="tanh_grad", arity=2, elementwise=True,
      scalar=lambda a, at: f"({a[1]} * (1 - {a[0]} * {a[0]}))", shape=_elementwise,
      code=lambda a, at: f"rt.tanh_grad({a[0]}, {a[1]})",
      into=OUT, zero_if_any=(1,),
      ref=lambda y, g: g * (1 - y * y), doc="g*(1-y*y) from the tanh's output y")
defop(name="relu_grad", arity=2, elementwise=True,
      scalar=lambda a, at: f"({a[0]} > 0 ? {a[1]} : 0)", shape=_elementwise,
      code=lambda a, at: f"rt.relu_grad({a[0]}, {a[1]})",
      into=OUT, zero_if_any=(1,),
      ref=lambda y, g: g * (y > 0), doc="g where the relu's output is positive")
defop(name="hard_sigmoid_grad", arity=2, elementwise=True,
      scalar=lambda a, at: f"({a[0]} > -2.5 && {a[0]} < 2.5 ? {a[1]} * 0.2 : 0)", shape=_elementwise,
      code=lambda a, at: f"rt.hard_sigmoid_grad({a[0]}, {a[1]})",
      into=OUT, zero_if_any=(1,),
      ref=lambda x, g: g * 0.2 * ((x > -2.5) & (x < 2.5)),
      doc="0.2*g inside the linear part")


# ---------------------------------------------------------------- convolution

def conv_out(size, k, stride, pad, dil, what="spatial size"):
    if size is None:
        return None
    out = (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
    if stride > size + 2 * pad:
        raise ShapeError(f"stride {stride} is larger than the {what} {size}"
                         f"{f' with padding {pad}' if pad else ''}: the output would be one "
                         f"pixel, and the rest of the input never read")
    if out < 1:
        raise ShapeError(f"{what} {size} is too small for a {k}-wide kernel "
                         f"(stride {stride}, padding {pad}, dilation {dil})")
    return out


def _conv_shape(shapes, attrs):
    x, w = shapes
    if len(x) != 3:
        raise ShapeError(f"conv expects a [C, H, W] input, got {fmt_shape(x)}")
    cout, cin, kh, kw = w
    unify_dim(x[0], cin, "input channels")
    sh, sw = attrs["stride"]
    ph, pw = attrs["pad"]
    dh, dw = attrs["dilation"]
    return (cout, conv_out(x[1], kh, sh, ph, dh, "height"),
            conv_out(x[2], kw, sw, pw, dw, "width"))


def _conv_attrs(at):
    return f"{tuple(at['stride'])}, {tuple(at['pad'])}, {tuple(at['dilation'])}"


defop(name="conv", arity=2, shape=_conv_shape,
      code=lambda a, at: f"rt.conv2d(B, {a[0]}, {a[1]}, {_conv_attrs(at)})",
      into=OUT, zero_if_any=(0,), flops=lambda s, out: 2 * _prod(s[1]) * _prod(out[1:]),
      ref=lambda x, w, stride, pad, dilation: R.conv2d(x, w, stride, pad, dilation),
      vjp=(lambda b, n, g, i: b.op("conv_grad_input", g, n.inputs[1],
                                   x_shape=tuple(b.shape_of(n.inputs[0])),
                                   stride=n.attrs["stride"], pad=n.attrs["pad"],
                                   dilation=n.attrs["dilation"]),
           lambda b, n, g, i: b.op("conv_grad_weight", n.inputs[0], g,
                                   w_shape=tuple(b.shape_of(n.inputs[1])),
                                   stride=n.attrs["stride"], pad=n.attrs["pad"],
                                   dilation=n.attrs["dilation"])),
      doc="2-D cross-correlation of a [C, H, W] value with a [O, C, kh, kw] kernel")

defop(name="conv_grad_input", arity=2, shape=lambda s, at: tuple(at["x_shape"]),
      code=lambda a, at: (f"rt.conv2d_grad_input(B, {a[0]}, {a[1]}, {tuple(at['x_shape'])}, "
                          f"{_conv_attrs(at)})"),
      into=OUT, zero_if_any=(0,),
      ref=lambda g, w, x_shape, stride, pad, dilation: R.conv2d_grad_input(
          g, w, x_shape, stride, pad, dilation),
      doc="gradient of conv with respect to its input")

defop(name="conv_grad_weight", arity=2, shape=lambda s, at: tuple(at["w_shape"]),
      code=lambda a, at: (f"rt.conv2d_grad_weight(B, {a[0]}, {a[1]}, {tuple(at['w_shape'])}, "
                          f"{_conv_attrs(at)})"),
      zero_if_any=(0, 1),
      ref=lambda x, g, w_shape, stride, pad, dilation: R.conv2d_grad_weight(
          x, g, w_shape, stride, pad, dilation),
      doc="gradient of conv with respect to its kernel, summed over the batch")


# ---------------------------------------------------------------- channels

def _concat_shape(shapes, attrs):
    if any(len(s) != 3 for s in shapes):
        raise ShapeError("concat expects [C, H, W] values, got "
                         + ", ".join(fmt_shape(s) for s in shapes))
    h = w = None
    for s in shapes:
        h = unify_dim(h, s[1], "height")
        w = unify_dim(w, s[2], "width")
    cs = [s[0] for s in shapes]
    return (None if any(c is None for c in cs) else sum(cs), h, w)


def _concat_vjp(b, n, g, i):
    start = 0
    for j in range(i):
        start += b.shape_of(n.inputs[j])[0]
    stop = start + b.shape_of(n.inputs[i])[0]
    return b.op("slice", g, start=start, stop=stop)


defop(name="concat", arity=-1, variadic=True, shape=_concat_shape,
      code=lambda a, at: f"rt.concat([{', '.join(a)}])",
      into=OUT, zero_if_all=True, arithmetic=False,
      ref=lambda *xs: np.concatenate(xs, axis=1),
      vjp=(_concat_vjp,),  # one rule for every input
      doc="concatenation along channels")


def _slice_shape(shapes, attrs):
    (x,) = shapes
    return (attrs["stop"] - attrs["start"],) + tuple(x[1:])


defop(name="slice", arity=1, shape=_slice_shape,
      code=lambda a, at: f"{a[0]}[..., {at['start']}:{at['stop']}, :, :]",
      view=True, zero_if_all=True, arithmetic=False,
      ref=lambda x, start, stop: x[:, start:stop],
      vjp=(lambda b, n, g, i: b.op("pad_channels", g, start=n.attrs["start"],
                                   total=b.shape_of(n.inputs[0])[0]),),
      doc="channels [start, stop) (split is built from slices)")

defop(name="pad_channels", arity=1,
      shape=lambda s, at: (at["total"],) + tuple(s[0][1:]),
      code=lambda a, at: f"rt.pad_channels({a[0]}, {at['start']}, {at['total']})",
      zero_if_all=True,
      ref=lambda g, start, total: R.pad_channels(g, start, total),
      doc="zeros except channels [start, start+C): the gradient of slice")

def _pad_zeros_shape(shapes, attrs):
    (x,) = shapes
    if len(x) != 3:
        raise ShapeError(f"expects a [C, H, W] value, got {fmt_shape(x)}")
    c = None if x[0] is None else attrs["before"] + x[0] + attrs["after"]
    return (c,) + tuple(x[1:])


defop(name="pad_zeros", arity=1, shape=_pad_zeros_shape,
      code=lambda a, at: (f"rt.pad_channels({a[0]}, {at['before']}, "
                          f"{a[0]}.shape[-3] + {at['before'] + at['after']})"),
      ref=lambda x, before, after: R.pad_channels(x, before, x.shape[1] + before + after),
      vjp=(lambda b, n, g, i: b.op("slice", g, start=n.attrs["before"],
                                   stop=n.attrs["before"] + b.shape_of(n.inputs[0])[0]),),
      doc="`before` zero channels, the value, `after` zero channels: concat with the "
          "zeros of an input not given (a forecaster's); folded away before a conv")


def _expand_shape(shapes, attrs):
    v, ref = shapes
    out = list(attrs["shape"] or (None, None, None))
    if attrs["like"]:
        if len(ref) != 3:
            raise ShapeError(f"expects a [C, H, W] value to take the shape of, got "
                             f"{fmt_shape(ref)}")
        out = [unify_dim(a, b) for a, b in zip(out, ref)]
    if len(v) > 3:
        raise ShapeError(f"cannot broadcast {fmt_shape(v)} to a [C, H, W] value")
    for k, d in enumerate(v):  # the value broadcasts to the result: [], [C, 1, 1], [C, H, W]
        if d is not None and d != 1:
            out[3 - len(v) + k] = unify_dim(out[3 - len(v) + k], d)
    return tuple(out)


defop(name="expand", arity=2, shape=_expand_shape,
      code=lambda a, at: (f"rt.expand({a[0]}, {a[1]})" if at["like"] else
                          f"rt.expand({a[0]}, {a[1]}, {tuple(at['shape'])})"),
      ref=lambda v, r, shape, like: R.expand(v, r, None if like else shape),
      vjp=(lambda b, n, g, i: _sum_to(b, n, g, 0), None), shape_only=(1,),
      doc="a value the same at every step (a constant, or one of parameters only: what a cell "
          "run without input computes from its zeros) as a per-step array: of the shape of "
          "the second operand (like=True: a state's value at t-1, for the state's new value), "
          "or of `shape` with the second operand's batch and time axes (a cell's output); "
          "no gradient flows to the second operand")


def _kernel_part_shape(shapes, attrs):
    (w,) = shapes
    if len(w) != 4:
        raise ShapeError(f"kernel_slice expects an [O, C, kh, kw] kernel, got {fmt_shape(w)}")
    if not 0 <= attrs["start"] < attrs["stop"] <= (w[1] if w[1] is not None else attrs["stop"]):
        raise ShapeError(f"input channels [{attrs['start']}, {attrs['stop']}) are not in "
                         f"the kernel {fmt_shape(w)}")
    return (w[0], attrs["stop"] - attrs["start"], w[2], w[3])


defop(name="kernel_slice", arity=1, shape=_kernel_part_shape,
      code=lambda a, at: f"{a[0]}[:, {at['start']}:{at['stop']}]",
      view=True, arithmetic=False,
      ref=lambda w, start, stop: w[:, start:stop],
      vjp=(lambda b, n, g, i: b.op("kernel_pad", g, start=n.attrs["start"],
                                   total=b.shape_of(n.inputs[0])[1]),),
      doc="input channels [start, stop) of a kernel: conv(concat(a, b), W) is "
          "conv(a, W[:, :Ca]) + conv(b, W[:, Ca:]) (the hoisting pass)")

defop(name="kernel_pad", arity=1,
      shape=lambda s, at: (s[0][0], at["total"]) + tuple(s[0][2:]),
      code=lambda a, at: f"rt.kernel_pad({a[0]}, {at['start']}, {at['total']})",
      ref=lambda g, start, total: R.kernel_pad(g, start, total),
      vjp=(lambda b, n, g, i: b.op("kernel_slice", g, start=n.attrs["start"],
                                   stop=n.attrs["start"] + b.shape_of(n.inputs[0])[1]),),
      doc="zeros except input channels [start, start+C) of a kernel: kernel_slice's gradient")

defop(name="reshape", arity=1, shape=lambda s, at: tuple(at["shape"]),
      code=lambda a, at: f"{a[0]}.reshape({tuple(at['shape'])})",
      view=True, zero_if_all=True, arithmetic=False,
      ref=lambda x, shape: x.reshape(shape),
      vjp=(lambda b, n, g, i: b.op("reshape", g, shape=tuple(b.shape_of(n.inputs[0]))),),
      doc="a parameter viewed with another shape (a per-channel bias as [C, 1, 1])")

defop(name="sum_to", arity=1, shape=lambda s, at: tuple(at["shape"]),
      code=lambda a, at: f"rt.sum_to({a[0]}, {tuple(at['shape'])}, batched={at['batched']})",
      zero_if_all=True,
      ref=lambda x, shape, batched: R.sum_to(x, shape, batched),
      doc="sum over the batch (and time) axes and broadcast dimensions down to `shape`")


# ---------------------------------------------------------------- losses
# A loss reduces a whole batch of sequences to a scalar: the mean over every
# element of the steps it covers. Its VJP is the seed of the backward pass.

def _loss_shape(shapes, attrs):
    """A loss compares prediction and target element by element: same shapes."""
    pred, target = shapes
    if len(pred) != len(target) or any(a is not None and b is not None and a != b
                                       for a, b in zip(pred, target)):
        raise ShapeError(f"the prediction is {fmt_shape(pred)} but the target "
                         f"{fmt_shape(target)}; a loss compares them element by element")
    return ()


def _loss(name, doc):
    defop(name=name, arity=2, shape=_loss_shape, loss=True,
          code=lambda a, at: f"rt.{name}({a[0]}, {a[1]}, steps={at['steps']!r})",
          ref=lambda p, y, steps: getattr(R, name)(p, y, steps),
          vjp=(lambda b, n, g, i: b.op(name + "_grad", n.inputs[0], n.inputs[1],
                                       steps=n.attrs["steps"]), None),
          doc=doc)
    defop(name=name + "_grad", arity=2, shape=lambda s, at: s[0],
          code=lambda a, at: f"rt.{name}_grad({a[0]}, {a[1]}, steps={at['steps']!r})",
          ref=lambda p, y, steps: getattr(R, name + "_grad")(p, y, steps),
          doc=f"gradient of {name} with respect to its first argument")


_loss("bce", "binary cross-entropy of probabilities p against targets y, mean")
_loss("bce_logits", "binary cross-entropy computed from logits (stable), mean")
_loss("mse", "mean squared error")
_loss("xent_logits", "softmax cross-entropy over channels from logits, mean over pixels")


# ---------------------------------------------------------------- queries of the table

def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def node_flops(g, node) -> int:
    """Multiply-add FLOPs of one sample's evaluation of `node` (0 for ops without a
    `flops` rule: elementwise and data-moving ops are counted by their elements)."""
    rule = OPS[node.op].flops
    if rule is None:
        return 0
    return int(rule([g.node(i).shape for i in node.inputs], node.shape))


ZERO, ALIAS = "zero", "alias"


def without_zeros(op: OpDef, zeros: list[bool]):
    """What `op` reduces to when the operands marked in `zeros` are zero.

    (ZERO,): the result is zero; (ALIAS, k): it is operand k; ("terms", ks):
    the signed sum of the operands ks, the zero ones dropped; None: nothing
    simpler (no operand zero, or no rule says so).
    """
    if not any(zeros):
        return None
    if any(zeros[k] for k in op.zero_if_any if k < len(zeros)) or (op.zero_if_all
                                                                      and all(zeros)):
        return (ZERO,)
    if op.terms:
        rest = [k for k, z in enumerate(zeros) if not z]
        if not rest:
            return (ZERO,)
        signs = [op.terms[0] if op.variadic else op.terms[k] for k in rest]
        if len(rest) == 1 and signs[0] == 1:
            return (ALIAS, rest[0])
        return ("terms", rest)
    return None


def record_problems(op: OpDef) -> list[str]:
    """The facts a record lacks or gets wrong, for the stages that read them.

    The op table's test runs this on every record; a new primitive that
    forgets a fact (an elementwise op without `into` makes every time loop
    allocate its result at every step) fails there, not silently later.
    """
    problems = []

    def need(ok, what):
        if not ok:
            problems.append(f"{op.name}: {what}")

    n_in = 1 if op.variadic else op.arity
    need(callable(op.shape), "no shape rule")
    need(op.variadic == (op.arity == -1), "variadic ops have arity -1, others their count")
    if op.source:
        need(op.code is None and op.ref is None and not op.owned and not op.arithmetic,
             "a source has no code nor ref, is not owned and does no arithmetic")
        return problems
    if op.name != "carry_out":  # passes its operand through (the backward pass's plumbing)
        need(op.code is not None, "no code template (code generation)")
        need(op.ref is not None, "no reference evaluation (compiler/reference.py, interp)")
    need(len(op.vjp) in (0, n_in), f"vjp has {len(op.vjp)} rules for {n_in} inputs")
    need(all(k < n_in for k in op.alias + op.zero_if_any + op.shape_only),
         "alias / zero_if_any / shape_only name an operand the op does not have")
    need(not op.terms or len(op.terms) == n_in and set(op.terms) <= {1, -1},
         "terms: one sign (+1 or -1) per operand")
    if op.elementwise:
        need(op.writes_into, "elementwise without `into`: time loops would allocate its "
                             "result at every step")
        need(op.scalar is not None, "elementwise without `scalar`: fused step kernels "
                                    "(compiler/fuse.py) cannot compute it")
    if op.alias:
        need(op.writes_into, "alias without `into`")
    if op.view:
        need(not op.writes_into, "a view has no buffer to write into")
    if op.function:
        need(op.elementwise and op.arity == 1 and op.vjp and op.vjp[0] is not None,
             "a language function here is elementwise on one value, with a VJP")
    if op.grad_from_output:
        g = OPS.get(op.grad_from_output)
        need(g is not None and g.arity == 2 and g.elementwise,
             f"grad_from_output {op.grad_from_output!r} is not an elementwise (y, g) op")
    if op.loss:
        need(op.vjp and op.vjp[0] is not None and (len(op.vjp) < 2 or op.vjp[1] is None),
             "a loss has a gradient for its prediction only")
    return problems


def table_problems() -> list[str]:
    return [p for op in OPS.values() for p in record_problems(op)]


def vjp_rule(op: OpDef, i: int):
    if not op.vjp:
        return None
    if op.variadic:
        return op.vjp[0]
    return op.vjp[i] if i < len(op.vjp) else None

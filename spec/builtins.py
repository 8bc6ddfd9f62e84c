"""The names the language knows without an import: functions, weight kinds, losses.

Only names and signatures live here (the spec knows nothing of arrays); the
compiler maps each function to ops in compiler/lower.py. The pointwise
functions (sigmoid, tanh, ...) are the op table's records marked `function`
(compiler/ops.py), so a new one is one record there; their names and
one-line docs are all the spec reads of the table.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sig:
    positional: tuple[str, ...] = ()
    keywords: dict = field(default_factory=dict)  # name -> default
    variadic: bool = False  # any number of positional arguments (at least one)
    doc: str = ""

    def describe(self, name: str) -> str:
        parts = list(self.positional) + ([f"*values"] if self.variadic else [])
        parts += [f"{k}={v}" for k, v in self.keywords.items()]
        return f"{name}({', '.join(parts)})"


def _pointwise() -> dict[str, Sig]:
    from convc.compiler.ops import OPS

    return {op.name: Sig(("x",), doc=op.doc) for op in OPS.values() if op.function}


# equations: tensor -> tensor
FUNCTIONS: dict[str, Sig] = {
    "conv": Sig(("x", "W"), {"stride": 1, "padding": "same", "dilation": 1},
                doc="2-D convolution of x with kernel W"),
    **_pointwise(),
    "concat": Sig(variadic=True, doc="concatenation along channels"),
    "split": Sig(("x", "n"), doc="n equal parts along channels"),
}

# weight declarations: `weight W = kernel(4 * hidden, 3)`
WEIGHTS: dict[str, Sig] = {
    "kernel": Sig(("out", "size"), {"init": "glorot"},
                  doc="a convolution kernel [out, in, size, size]; `in` comes from its use"),
    "bias": Sig(("channels",), {"per_pixel": False, "init": 0.0},
                doc="one value per channel [C], or per pixel [C, H, W] with per_pixel=true"),
    "hadamard": Sig(("channels",), {"init": 0.0},
                    doc="elementwise (peephole) weights [C, H, W]; H, W come from its use"),
}

INITS = ("glorot", "zeros", "ones", "uniform", "normal")

# model losses: `loss bce(pred, y, steps=all)`
LOSSES: dict[str, Sig] = {
    "bce": Sig(("pred", "target"), {"steps": "all"},
               doc="binary cross-entropy of probabilities (from logits when pred is a sigmoid)"),
    "mse": Sig(("pred", "target"), {"steps": "all"}, doc="mean squared error"),
    "cross_entropy": Sig(("logits", "target"), {"steps": "all"},
                         doc="softmax cross-entropy over channels, target as probabilities"),
}
LOSS_STEPS = ("all", "last")

# keywords of a cell application: `h = enc(x, init=other)` / `g = fc(steps=y, init=enc)`
APPLY_KEYWORDS = ("init", "steps")

STATE_INITS = ("zeros", "learned")

RESERVED = set(FUNCTIONS) | set(WEIGHTS) | set(LOSSES) | {"t", "none", "same", "valid",
                                                          "zeros", "learned", "all", "last"}

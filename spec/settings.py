"""The one schema of every numeric and named setting: train blocks and command lines.

A `Setting` says what a value may be: its kind, its range, its choices.
The same table checks a spec's `train { ... }` block (E205 at the setting's
line, with the allowed values), the options of every `convc` command
(argparse types made from it: a bad value is a usage error, exit 2) and
the settings `train()` receives from Python. A value that passes here can
be used: no NaN or infinity, no integer too large for an array dimension.

The training settings (`TRAIN`) also carry their built-in default and their
help text: `convc train` makes its options from them, `train()` its keywords,
its defaults and its documentation.

    >>> TRAIN["batch_size"].problem(0)
    'expected a positive integer, got 0'
    >>> TRAIN["lr"].problem(float("inf")) is None
    False
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

# The largest count or size any setting may hold: what an array dimension (a
# signed 64-bit index) can hold. Larger numbers are refused before anything
# tries to allocate or index with them.
MAX_INT = 2 ** 63 - 1

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "rmsprop")
SCHEDULES = ("constant", "step", "cosine", "plateau")
CLIP_MODES = ("global_norm", "value", "per_tensor_norm")
DTYPES = ("float32", "float64")
COLLECTIVES = ("mpi", "nccl")
# Seconds a rank waits at an exchange beyond the slowest step seen before it ends the
# run (runtime/distributed.py).
DEFAULT_TIMEOUT = 5.0

# What a setting left unset (None) means where it depends on the run: the
# steps of a run given neither steps nor epochs, the clips generated, and the
# input and predicted frames of a sequence.
DEFAULT_STEPS = 200
DEFAULT_CLIPS = 512
DEFAULT_FRAMES = 10
# A layer of settings (train block, checkpoint, arguments) gives one of these.
LENGTH = ("steps", "epochs")


@dataclass(frozen=True)
class Setting:
    """What one setting may be.

    kind: int, float, str or bool. For numbers, `low` and `high` bound the
    value, `open_low` / `open_high` exclude the bound itself. For strings,
    `choices` lists the allowed values (of the part before a ':' when
    `options` is true: `step:step_size=100`).

    Training settings also have a built-in `default` (None: unset, decided
    by the run), a `help` text, the `metavar` of their option, the `group`
    of options it is listed in, and `trajectory`: whether changing it on
    resume changes the losses a run continues with.
    """

    kind: type
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] = ()
    options: bool = False
    default: Any = None
    help: str = ""
    metavar: str | None = None
    group: str = ""
    trajectory: bool = True

    def explain(self) -> str:
        """The help text, with the built-in default where there is one."""
        if self.default is None or self.kind is bool:
            return self.help
        default = f"{self.default:g}" if self.kind is float else self.default
        return f"{self.help} (default {default})"

    def describe(self) -> str:
        """The allowed values in words: 'a positive integer', 'a number in [0, 1)'."""
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            if not self.choices:
                return "a string"
            return "one of " + ", ".join(self.choices)
        noun = "an integer" if self.kind is int else "a number"
        high = None if self.high == MAX_INT else self.high  # said only when it is passed
        if high is None and self.low is not None and (
                (self.low == 0 and self.open_low) or (self.kind is int and self.low == 1)):
            return f"a positive {noun.split()[-1]}"
        if self.low is not None and high is not None:
            return (f"{noun} in {'(' if self.open_low else '['}{_num(self.low)}, "
                    f"{_num(high)}{')' if self.open_high else ']'}")
        if self.low is not None:
            return f"{noun} {'>' if self.open_low else '>='} {_num(self.low)}"
        return noun

    def problem(self, value) -> str | None:
        """None when `value` is allowed, else 'expected <describe()>, got <value>'."""
        if self._ok(value):
            return None
        if self.kind is int and isinstance(value, int) and abs(value) > MAX_INT:
            return (f"expected {self.describe()} of at most {MAX_INT} (what an array "
                    f"dimension can hold), got a {len(str(abs(value)))}-digit number")
        if self.kind is str and self.options and isinstance(value, str):
            value = value.partition(":")[0]
        return f"expected {self.describe()}, got {value!r}"

    def _ok(self, value) -> bool:
        if self.kind is bool:
            return isinstance(value, bool)
        if isinstance(value, bool):
            return False
        if self.kind is str:
            if not isinstance(value, str):
                return False
            name = value.partition(":")[0] if self.options else value
            return not self.choices or name in self.choices
        if self.kind is int:
            if not isinstance(value, int) and not _is_numpy_int(value):
                return False
            value = int(value)
            if abs(value) > MAX_INT:
                return False
        elif not isinstance(value, (int, float)) and not _is_numpy_float(value):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        if self.high is not None and (value > self.high or
                                      (self.open_high and value == self.high)):
            return False
        return True

    def parse(self, text: str):
        """A command-line word as this setting's value; ValueError says why not."""
        if self.kind is int:
            try:
                value = int(text)
            except ValueError:
                raise ValueError(f"expected {self.describe()}, got {text!r}") from None
        elif self.kind is float:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"expected {self.describe()}, got {text!r}") from None
        else:
            value = text
        why = self.problem(value)
        if why is not None:
            raise ValueError(why)
        return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _is_numpy_int(value) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "dtype") and \
        value.dtype.kind in "iu"


def _is_numpy_float(value) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "dtype") and \
        value.dtype.kind in "iuf"


# Kinds of setting that many options share.
COUNT = Setting(int, low=1, high=MAX_INT)             # sizes, steps, sequences
NONNEG_COUNT = Setting(int, low=0, high=MAX_INT)      # seeds, patience, warm-up runs
POSITIVE = Setting(float, low=0, open_low=True)       # learning rate, clip limit, epsilon
NONNEG = Setting(float, low=0)                        # weight decay, momentum, seconds
FRACTION = Setting(float, low=0, high=1, open_high=True)

def _train(kind: Setting, help: str, default=None, metavar: str | None = None,
           group: str = "optimisation", trajectory: bool = True) -> Setting:
    return replace(kind, default=default, help=help, metavar=metavar, group=group,
                   trajectory=trajectory)


# What a spec's `train { ... }` block, `convc train` and `train()` accept, in the
# order `convc train --help` lists them.
TRAIN: dict[str, Setting] = {
    "data": _train(Setting(str), "synthetic (moving digits), synthetic:shapes, "
                   "sklearn-digits, or a .npy/.npz clip file (N, T, [C,] H, W)",
                   default="synthetic", group="data"),
    "clips": _train(COUNT, f"sequences to generate (default {DEFAULT_CLIPS}) or to keep "
                    f"from a file (default all)", metavar="N", group="data"),
    "size": _train(COUNT, "frame size in pixels; fixed by the model, checked if given",
                   metavar="PX", group="data"),
    "frames_in": _train(COUNT, f"input frames per sequence (default {DEFAULT_FRAMES})",
                        metavar="T", group="data"),
    "frames_out": _train(COUNT, f"frames to predict, forecast models (default "
                         f"{DEFAULT_FRAMES})", metavar="T", group="data"),
    "val_fraction": _train(FRACTION, "share of the sequences held out for validation",
                           default=0.1, metavar="F", group="data"),
    "steps": _train(COUNT, f"optimizer steps (default {DEFAULT_STEPS}); with --resume "
                    f"(resume=True), the total the run ends at, not the number of steps "
                    f"to add", metavar="N", trajectory=False),
    "epochs": _train(COUNT, "passes over the data (instead of steps)", metavar="N",
                     trajectory=False),
    "batch_size": _train(COUNT, "sequences per optimizer step", default=8, metavar="N"),
    "optimizer": _train(Setting(str, choices=OPTIMIZERS), "the optimizer", default="adam"),
    # lr 0 freezes the weights, as PyTorch allows
    "lr": _train(NONNEG, "learning rate", default=1e-3),
    "momentum": _train(FRACTION, "SGD/RMSProp momentum"),
    "decay": _train(FRACTION, "RMSProp decay (PyTorch's alpha; default 0.9)"),
    "eps": _train(POSITIVE, "Adam/RMSProp epsilon"),
    "weight_decay": _train(NONNEG, "L2 penalty added to the gradient"),
    "schedule": _train(Setting(str, choices=SCHEDULES, options=True),
                       "constant, step, cosine or plateau (observes the validation loss), "
                       "with options as 'step:step_size=100,gamma=0.5'",
                       default="constant", metavar="NAME"),
    "clip": _train(POSITIVE, "clip the gradient to this limit (a global norm unless "
                   "clip_mode says otherwise); the pre-clip global norm is logged",
                   metavar="MAX"),
    "clip_mode": _train(Setting(str, choices=CLIP_MODES), "how clip clips",
                        default="global_norm"),
    "bptt": _train(COUNT, "truncate backpropagation through time to windows of this many "
                   "steps", metavar="K"),
    "stateful": _train(Setting(bool), "carry the final states of a batch into the next "
                       "(no gradient between them; reset every epoch)", default=False),
    "val_every": _train(COUNT, "steps between validations (default: every epoch, or 10% "
                        "of the steps)", metavar="N", trajectory=False),
    "patience": _train(NONNEG_COUNT, "validations without improvement before stopping early",
                       metavar="N", trajectory=False),
    "dtype": _train(Setting(str, choices=DTYPES), "floating-point type of parameters and "
                    "data", default="float32"),
    "seed": _train(NONNEG_COUNT, "seed of data, split, order and init", default=0),
    "shards": _train(COUNT, "cut every batch into N shards whose gradients are summed in a "
                     "fixed order, as N MPI ranks do (default 1; one per rank under MPI)",
                     metavar="N", group="distributed"),
    "distributed": _train(Setting(bool), "train data-parallel over the MPI ranks of mpirun "
                          "or srun (on by itself under MPI; --distributed fails when not "
                          "under MPI, --no-distributed ignores MPI)", trajectory=False,
                          group="distributed"),
    "collectives": _train(Setting(str, choices=COLLECTIVES), "how the ranks sum gradients: "
                          "mpi, or nccl between GPUs (default nccl on --device gpu when "
                          "CuPy has NCCL)", trajectory=False,
                          group="distributed"),
    "timeout": _train(POSITIVE, "seconds beyond the slowest step seen that a rank waits "
                      "for the others before it ends a distributed run",
                      default=DEFAULT_TIMEOUT, metavar="S", trajectory=False,
                      group="distributed"),
}

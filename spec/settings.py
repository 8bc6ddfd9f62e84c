"""The one schema of every numeric and named setting: train blocks and command lines.

A `Setting` says what a value may be: its kind, its range, its choices.
The same table checks a spec's `train { ... }` block (E205 at the setting's
line, with the allowed values), the options of every `convc` command
(argparse types made from it: a bad value is a usage error, exit 2) and
the settings `train()` receives from Python. A value that passes here can
be used: no NaN or infinity, no integer too large for an array dimension.

    >>> TRAIN["batch_size"].problem(0)
    'expected a positive integer, got 0'
    >>> TRAIN["lr"].problem(float("inf")) is None
    False
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# The largest count or size any setting may hold: what an array dimension (a
# signed 64-bit index) can hold. Larger numbers are refused before anything
# tries to allocate or index with them.
MAX_INT = 2 ** 63 - 1

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "rmsprop")
SCHEDULES = ("constant", "step", "cosine", "plateau")
CLIP_MODES = ("global_norm", "value", "per_tensor_norm")
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Setting:
    """What one setting may be.

    kind: int, float, str or bool. For numbers, `low` and `high` bound the
    value, `open_low` / `open_high` exclude the bound itself. For strings,
    `choices` lists the allowed values (of the part before a ':' when
    `options` is true: `step:step_size=100`).
    """

    kind: type
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] = ()
    options: bool = False

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

# What a spec's `train { ... }` block, `convc train` and `train()` accept.
TRAIN: dict[str, Setting] = {
    "optimizer": Setting(str, choices=OPTIMIZERS),
    "lr": NONNEG,                 # 0 freezes the weights, as PyTorch allows
    "momentum": FRACTION,
    "decay": FRACTION,
    "eps": POSITIVE,
    "weight_decay": NONNEG,
    "clip": POSITIVE,
    "clip_mode": Setting(str, choices=CLIP_MODES),
    "bptt": COUNT,
    "batch_size": COUNT,
    "epochs": COUNT,
    "steps": COUNT,
    "frames_in": COUNT,
    "frames_out": COUNT,
    "schedule": Setting(str, choices=SCHEDULES, options=True),
    "seed": NONNEG_COUNT,
    "dtype": Setting(str, choices=DTYPES),
    "val_fraction": FRACTION,
    "val_every": COUNT,
    "patience": NONNEG_COUNT,
    "data": Setting(str),
    "clips": COUNT,
    "size": COUNT,
    "stateful": Setting(bool),
}

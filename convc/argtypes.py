"""argparse types made from the settings schema (spec/settings.py).

Every numeric option of every command is parsed by one of these, so a
count of 0, a negative size, NaN, infinity or a 400-digit number is a usage
error naming the option and what it may be (exit 2), the same way in every
command and the same way a train block is checked.
"""
from __future__ import annotations

import argparse

from convc.spec.settings import COUNT, NONNEG, NONNEG_COUNT, POSITIVE, TRAIN, Setting


def argtype(setting: Setting):
    """An argparse `type=` for `setting`; the function carries it as `.setting`."""
    def parse(text: str):
        try:
            return setting.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.setting = setting
    parse.__name__ = setting.describe()  # argparse names the type in some messages
    return parse


def train_type(name: str):
    """The type of the train setting `name` (`--batch-size` is batch_size)."""
    return argtype(TRAIN[name])


positive_int = argtype(COUNT)
nonneg_int = argtype(NONNEG_COUNT)
positive_float = argtype(POSITIVE)
nonneg_float = argtype(NONNEG)

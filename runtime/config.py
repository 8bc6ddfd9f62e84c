"""The settings of a training run: where each comes from, what it may be, what it makes.

Every setting comes from three layers, the later winning: the built-in
defaults of the schema (`convc.spec.settings.TRAIN`, here as `DEFAULTS`),
the spec's `train { ... }` block (`MODEL['train']`), and the arguments given
to `train()`. A resumed run puts the settings saved in its checkpoint
between the last two, so `--resume` alone continues the same run.

    cfg = resolve_config(mod.MODEL.get("train", {}), {"lr": 0.01})
    check_config(cfg)
    opt, schedule = make_optimizer(cfg), make_schedule(cfg, total_steps=200)
"""
from __future__ import annotations

from typing import Any

from convc.errors import ConvcError
from convc.spec.settings import LENGTH, TRAIN

# Built-in defaults, used where neither the spec nor the caller says otherwise;
# None leaves the choice to the run (see DEFAULT_STEPS and the others in
# convc.spec.settings).
DEFAULTS: dict[str, Any] = {name: setting.default for name, setting in TRAIN.items()}

# Settings whose change on resume breaks the bitwise continuation; a note says so.
TRAJECTORY_KEYS = tuple(name for name, setting in TRAIN.items() if setting.trajectory)

# Settings about how this process runs, not about the run: a checkpoint's saved value
# is not taken over on resume (a run trained under mpirun may be resumed alone).
RUN_ONLY_KEYS = ("distributed", "collectives")


def resolve_config(model_train: dict, explicit: dict, saved: dict | None = None) -> dict:
    """Merge DEFAULTS < spec train block < saved run settings < explicit arguments.

    `steps` and `epochs` are one choice: a layer that sets one of them
    clears the other from the layers below it, so `--epochs 3` on a spec
    that says `steps = 200` trains for three epochs.
    """
    first, second = LENGTH
    cfg = dict(DEFAULTS)
    for layer_name, layer in (("train block", model_train), ("checkpoint", saved or {}),
                              ("arguments", explicit)):
        layer = {k: v for k, v in layer.items() if k in cfg and v is not None
                 and not (layer_name == "checkpoint" and k in RUN_ONLY_KEYS)}
        if layer.get(first) is not None and layer.get(second) is not None:
            if layer_name == "checkpoint":
                layer.pop(second)
            else:
                where = "the train block" if layer_name == "train block" else "train()"
                raise ConvcError(f"{where} sets both {first} and {second}; give one of them")
        if first in layer:
            cfg[second] = None
        if second in layer:
            cfg[first] = None
        cfg.update(layer)
    return cfg


def check_config(cfg: dict) -> None:
    """Reject settings that cannot work, with the setting's name and what it may be
    (the schema the checker and the command line use too)."""
    for key, setting in TRAIN.items():
        v = cfg.get(key)
        if key == "data" or v is None:  # data: a name, a path or arrays, read by load_clips
            continue
        if setting.problem(v) is not None:
            raise ConvcError(f"{key} must be {setting.describe()}, got {v!r}")


def parse_schedule(text: str) -> tuple[str, dict]:
    """'cosine' or 'step:step_size=100,gamma=0.5' -> (name, options)."""
    name, _, rest = str(text).partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConvcError(f"schedule option {item!r} must look like key=value "
                             f"(for example 'step:step_size=100,gamma=0.5')")
        try:
            number = float(value)
        except ValueError:
            raise ConvcError(f"schedule option {key}={value!r} is not a number") from None
        options[key.strip()] = int(number) if number.is_integer() and key.strip() in (
            "step_size", "total_steps", "patience") else number
    return name.strip(), options


def make_schedule(cfg: dict, total_steps: int):
    """The learning-rate schedule of `cfg`, its unset options fitted to `total_steps`."""
    from convc.runtime import optim

    name, options = parse_schedule(cfg["schedule"])
    # Defaults that fit a run of `total_steps`; plateau counts validations, not steps.
    builtin = {"step": {"step_size": max(1, total_steps // 3), "gamma": 0.1},
               "cosine": {"total_steps": max(1, total_steps)},
               "plateau": {"factor": 0.5, "patience": 2}}.get(name, {})
    return optim.make_schedule(name, cfg["lr"], **{**builtin, **options})


def make_optimizer(cfg: dict):
    """The optimizer of `cfg`; options left unset keep the optimizer's own defaults."""
    from convc.runtime import optim

    options = {k: cfg[k] for k in ("momentum", "decay", "eps", "weight_decay")
               if cfg[k] is not None}
    return optim.make_optimizer(cfg["optimizer"], cfg["lr"], **options)

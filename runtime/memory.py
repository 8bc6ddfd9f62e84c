"""How much memory a training step needs, estimated before anything is allocated.

The estimate is built from what the compiled module's MODEL table already
records: the parameters' shapes and the memory plan of loss_and_grad
(`MODEL['memory']`, added up by `convc.runtime.summary.plan_memory`: the
arenas of (T, N, ...) buffers and the states' buffers). On top of those:

- the gradients (one array per parameter) and the optimizer's slots
  (adam 2 per parameter, rmsprop 1, momentum 1, plain sgd none);
- the generated data set, when convc makes it (clips x frames x C x H x W);
- PLAN_ALLOWANCE x the plan for what the plan does not place (a step's work
  buffers, padded convolution inputs, col2im sums, the loss's temporaries)
  and SCRATCH_BYTES for the im2col chunks (`ops_numpy.WORK_BYTES`).
  Measured with tracemalloc on seed, encoder_forecaster and shi2015_small at
  batch sizes 2 to 16, the estimate lies within 20% of a step's peak
  (tests/test_memory_estimate.py checks it).
"""
from __future__ import annotations

import math

from convc.errors import ConvcError

PLAN_ALLOWANCE = 1.5
SCRATCH_BYTES = 4 << 20
OPTIMIZER_SLOTS = {"sgd": 0, "adam": 2, "rmsprop": 1}


def _numel(shape) -> int:
    return int(math.prod(int(d) for d in shape)) if shape else 1


def step_steps(model: dict, frames_in: int, frames_out: int | None) -> dict:
    """{axis: steps} of the model's time axes for a task of frames_in (+ frames_out) frames.

    An input's axis runs frames_in steps, a forecast target's frames_out; a
    loop's axis that no data names (a forecaster's) takes frames_out.
    """
    axis_of = model.get("axes", {})
    later = frames_in if frames_out is None else frames_out
    steps = {axis_of[n]: frames_in for n in model["inputs"] if n in axis_of}
    for n in model["targets"]:
        if n in axis_of:
            steps.setdefault(axis_of[n], later)
    for i, loop in enumerate(model["loops"]):
        steps.setdefault(loop["axis"], frames_in if i == 0 and not steps else later)
    return steps


def estimate(model: dict, batch: int, steps, *, optimizer: str = "adam",
             momentum: float | None = None, itemsize: int = 4,
             data_values: int = 0) -> dict:
    """Bytes of one training step, by part, and their total ('total')."""
    from convc.runtime.summary import plan_memory

    params = sum(_numel(p["shape"]) for p in model["params"].values()) * itemsize
    slots = OPTIMIZER_SLOTS.get(optimizer, 2) + (1 if momentum else 0)
    plan = plan_memory(model, steps, batch, itemsize)["bytes"]
    parts = dict(params=params, grads=params, optimizer=slots * params, plan=plan,
                 work=int((PLAN_ALLOWANCE - 1) * plan) + SCRATCH_BYTES,
                 data=int(data_values) * itemsize)
    parts["total"] = sum(parts.values())
    return parts


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, None where the system does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB" if n < 1e6 else f"{n:.2g} TiB"


def check_fits(parts: dict, what: str, available: int | None = None) -> None:
    """Raise ConvcError when the estimate exceeds the machine's available memory."""
    available = available_bytes() if available is None else available
    if available is None or parts["total"] <= available:
        return
    detail = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in parts.items() if k != "total" and v)
    raise ConvcError(f"{what} needs about {fmt_bytes(parts['total'])} ({detail}), but this "
                     f"machine has {fmt_bytes(available)} available; use a smaller batch, "
                     "fewer frames or a smaller model, or pass --ignore-memory-limit "
                     "(ignore_memory_limit=True) to try anyway")

"""The training loop of a compiled model: data, steps, validation, checkpoints, resume.

    m = convc.load("examples/seed.cell")
    result = m.train(steps=200, out="runs/seed")     # or convc.runtime.train.train(m, ...)
    result.losses[-1], result.checkpoint

One step is: the next minibatch, `loss_and_grad` of the generated module,
a check that the loss and the gradient are finite, global-norm clipping,
the learning rate from the schedule, one optimizer update. Around it:
validation, early stopping, a CSV log, checkpoints, two PNGs.

The settings are resolved in runtime/config.py (built-in defaults < the
spec's `train { ... }` block < a resumed run's saved settings < the
arguments), the clips prepared in runtime/dataset.py, the progress lines and
log.csv written by runtime/runlog.py; this module runs the steps, saves and
restores the run's state and handles interruptions.

Two promises shape the code:

- **Bitwise reproducibility.** Nothing here draws from a global random
  generator or iterates a dict in insertion order. The data order is a
  function of (seed, epoch) alone (`runtime.data.Batches`), so a checkpoint
  that stores the parameters, the optimizer and schedule state, the batch
  position, the stateful carry and the run's generator continues with
  exactly the losses an uninterrupted run would have produced.
- **Never save a broken state.** A non-finite loss or gradient stops the run
  before the update, and a checkpoint is only written from finite
  parameters, so the newest checkpoint is always one worth resuming from.
"""
from __future__ import annotations

import contextlib
import inspect
import linecache
import math
import os
import signal
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from convc.errors import CheckpointError, ConvcError, DataError, NonFiniteError
from convc.runtime.config import (TRAJECTORY_KEYS, check_config, make_optimizer,
                                  make_schedule, resolve_config)
from convc.runtime.dataset import GENERATED_DATA, prepare_data, task_lengths
from convc.runtime.distributed import Fault
from convc.runtime.predict import check_params, predict_frames
from convc.runtime.runlog import (LOG_NAME, Progress, append_row, log_text, note, read_log,
                                  set_quiet, steps_label)
from convc.spec.settings import DEFAULT_CLIPS, DEFAULT_STEPS, TRAIN

OUTPUT_NAMES = (LOG_NAME, "model.py", "predictions.png", "loss.png")


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------

# The summary line compares the mean loss of the first and of the last this
# many logged steps (fewer when the run has fewer).
SUMMARY_STEPS = 10


def _mean_loss(rows: list[dict]) -> str:
    mean = sum(row["loss"] for row in rows) / len(rows)
    return f"{mean:.4f} ({steps_label(rows[0]['step'], rows[-1]['step'], len(rows))})"


@dataclass
class TrainResult:
    """What a run produced. `history` holds one dict per step, as in log.csv."""

    params: dict
    history: list[dict]
    config: dict
    steps: int = 0
    epoch: int = 0
    stopped: str = "steps"  # steps | early_stopping | callback | interrupted
    best_val_loss: float | None = None
    best_step: int | None = None
    seconds: float = 0.0
    out: Path | None = None
    checkpoint: Path | None = None
    log: Path | None = None
    model_py: Path | None = None
    predictions_png: Path | None = None
    loss_png: Path | None = None
    final_state: dict | None = None
    # A distributed run: ranks, shards, and the seconds its exchanges took on this rank.
    distributed: dict | None = None

    @property
    def losses(self) -> list[float]:
        return [row["loss"] for row in self.history]

    @property
    def val_losses(self) -> list[tuple[int, float]]:
        return [(row["step"], row["val_loss"]) for row in self.history
                if row.get("val_loss") is not None]

    def summary(self) -> str:
        """One line: steps, time, the mean loss of the first and of the last
        SUMMARY_STEPS logged steps (saying which steps), the last validation loss.

        `convc train` prints it after training, e.g. "trained 25 steps in 0.5 s:
        loss 0.6874 (mean of steps 1-10) -> 0.6431 (mean of steps 16-25),
        validation 0.5486 (step 25)". A run of SUMMARY_STEPS steps or fewer has
        one mean, of all its steps.
        """
        how = {"early_stopping": " (stopped early)", "callback": " (stopped)"}.get(
            self.stopped, "")
        head = f"trained {self.steps} steps{how} in {self.seconds:.1f} s"
        rows = self.history
        if not rows:
            return f"{head}: no loss logged"
        if len(rows) <= SUMMARY_STEPS:
            loss = f"loss {_mean_loss(rows)}"
        else:
            loss = (f"loss {_mean_loss(rows[:SUMMARY_STEPS])} -> "
                    f"{_mean_loss(rows[-SUMMARY_STEPS:])}")
        val = self.val_losses
        val_text = f", validation {val[-1][1]:.4f} (step {val[-1][0]})" if val else ""
        return f"{head}: {loss}{val_text}"

    def paths(self) -> dict[str, Path]:
        """The files this run wrote, by kind (only those that exist)."""
        found = {"checkpoint": self.checkpoint, "log": self.log, "model": self.model_py,
                 "predictions": self.predictions_png, "loss plot": self.loss_png}
        return {k: v for k, v in found.items() if v is not None}

    def report(self) -> str:
        """What `convc train` prints after a run: the summary line (when a step was
        logged), the folder, and each file written in it with what it holds. Empty on
        the other ranks of a distributed run: rank 0 reports the run."""
        if self.distributed is not None and self.distributed["rank"] != 0:
            return ""
        lines = [self.summary()] if self.history else []
        lines.append(f"wrote {self.out}/")
        for kind, path in self.paths().items():
            lines.append(f"  {Path(path).name:<20} {FILE_DESCRIPTIONS[kind]}")
        return "\n".join(lines) + "\n"


# What each kind of file in `TrainResult.paths()` holds, as `report()` says it.
FILE_DESCRIPTIONS = {
    "model": "the generated model (import with convc.api.import_generated)",
    "log": "one row per step: loss, lr, grad_norm, val_loss",
    "checkpoint": "parameters and training state (continue with --resume)",
    "predictions": "inputs, targets and predictions of validation clips",
    "loss plot": "the loss curves",
}


def default_run_folder(model: dict) -> Path:
    """The run folder of a model when none is named: runs/<model name>."""
    return Path("runs") / model["name"]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped training; `checkpoint` holds the last completed step.

    `signum` is the signal that asked for the stop; the command line exits
    with 128 + signum (130 for Ctrl-C, 143 for SIGTERM), as a shell would.
    """

    def __init__(self, message: str, result: TrainResult, checkpoint: Path | None,
                 signum: int = signal.SIGINT):
        super().__init__(message)
        self.result = result
        self.checkpoint = checkpoint
        self.signum = int(signum)


class _Stop(Exception):
    """Internal: a non-finite value was found before the update of `step`.

    `cause` is the NonFiniteError of a model compiled with debug_nans, which
    names the op, its .cell line and the time step.
    """

    def __init__(self, message: str, step: int, cause: NonFiniteError | None = None):
        super().__init__(message)
        self.step = step
        self.cause = cause


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def _model_source(mod) -> str | None:
    """The generated source of a compiled module (in memory or imported from a file)."""
    source = getattr(mod, "source", None)
    if isinstance(source, str):
        return source
    compiled = getattr(mod, "compiled", None)
    if compiled is not None:
        return compiled.source
    filename = getattr(mod, "__file__", None)
    if filename:
        lines = linecache.getlines(filename)
        if lines:
            return "".join(lines)
    return None


def _prepare_out(out: str | os.PathLike, resume: bool, overwrite: bool):
    """Take the run folder `out`: lock it, check that it is empty or convc's, and (with
    overwrite and without resume) remove the previous run's files, only those convc wrote.
    Returns the locked RunFolder (convc.runtime.runfolder)."""
    from convc.runtime.checkpoint import list_checkpoints
    from convc.runtime.runfolder import open_run_folder

    run, previous = open_run_folder(out, OUTPUT_NAMES, overwrite=overwrite,
                                    version=_convc_version())
    try:
        folder = run.path
        old = list_checkpoints(folder)
        if old and not resume:
            if not overwrite:
                raise ConvcError(f"{folder} already holds a training run ({len(old)} checkpoint"
                                 f"{'s' if len(old) != 1 else ''}, newest {old[-1].name}); "
                                 f"continue it with --resume (resume=True), start again with "
                                 f"--overwrite (overwrite=True), or choose another folder")
            for path in old:
                path.unlink()
        if overwrite and not resume:
            for name in previous:
                (folder / name).unlink(missing_ok=True)
    except BaseException:
        run.close()
        raise
    return run


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


def _make_backend(device: str, conv: str, deterministic: bool):
    """The backend of a run; deterministic GPU runs get CuPy's deterministic settings.

    The environment part of those settings must be in place before CuPy is
    imported (get_backend imports it), the rest is applied to the module.
    """
    from convc.runtime.backend import backend_names, declared_capabilities, get_backend

    if not (deterministic and device == "gpu"):
        return get_backend(device, conv)
    if not declared_capabilities(device, conv).deterministic:  # read without importing CuPy
        choices = [n for n in backend_names("gpu") if declared_capabilities("gpu", n).deterministic]
        raise ConvcError(f"deterministic GPU training needs a convolution that declares itself "
                         f"deterministic (--conv {' or --conv '.join(choices)}); --conv {conv} "
                         f"does not (Chainer's uses cuDNN, whose algorithms may accumulate "
                         f"with atomics)")
    from convc.runtime import ops_cupy

    ops_cupy.set_deterministic_environment()
    backend = get_backend(device, conv)
    make_deterministic = getattr(backend, "make_deterministic", None)
    for warning in make_deterministic() if make_deterministic is not None else ():
        note(f"--deterministic: {warning}")
    return backend


def _all_finite(arrays: dict) -> bool:
    from convc.runtime.optim import array_module

    return all(bool(array_module(arrays[k]).isfinite(arrays[k]).all()) for k in sorted(arrays))


class _Trainer:
    """One training run; `train()` is the public face. State lives in attributes so
    that a checkpoint can be written from any point between two steps."""

    def __init__(self, mod, params, cfg: dict, *, explicit: dict, device: str, conv: str,
                 out, checkpoint_every, keep, resume: bool, overwrite: bool, progress,
                 on_step, clips_array, deterministic: bool = False, group=None):
        self.mod = mod
        # A distributed run's ranks (runtime/distributed.py); rank 0 alone writes.
        self.group = group
        self.writer = group is None or group.rank == 0
        self.model = mod.MODEL
        self.cfg = cfg
        self.explicit = explicit
        self.B = _make_backend(device, conv, deterministic)
        self.xp = self.B.xp
        self.device, self.conv, self.deterministic = device, conv, bool(deterministic)
        self.checkpoint_every = checkpoint_every
        self.keep = keep
        self.on_step = on_step
        self.out = Path(out) if out is not None else None
        self.resume_from = None
        saved_cfg = None
        if resume:
            if self.out is None:
                raise ConvcError("resume=True needs out= (the folder of the run to continue)")
            self.resume_from = self._shared_checkpoint()
            if self.resume_from is not None:
                saved_cfg = self.resume_from[2]["user"].get("config", {})
                self.cfg = cfg = resolve_config(self.model.get("train", {}), explicit,
                                                saved_cfg)
                check_config(cfg)
        self.shards = self._shard_count()
        self.data = prepare_data(self.model, cfg, clips_array, lazy=group is not None,
                                 identify=self.writer)
        self._fit_batch_size()
        self.bpe = len(self.data.train_x) // cfg["batch_size"]
        self.total = cfg["steps"] if cfg["steps"] is not None else (
            cfg["epochs"] * self.bpe if cfg["epochs"] is not None else DEFAULT_STEPS)
        self.has_val = len(self.data.val_x) > 0
        if cfg["patience"] is not None and not self.has_val:
            raise ConvcError("patience (early stopping) needs validation data; "
                             "set val_fraction above 0")
        if cfg["val_every"] is None:
            # Saved with the run, so a resumed run validates at the same steps
            # even when it is given a new length.
            cfg["val_every"] = (self.bpe if cfg["epochs"] is not None else
                                max(1, min(self.bpe, self.total // 10)))
        self.val_every = cfg["val_every"]
        self.clip_method = cfg["clip_mode"] if cfg["clip"] is not None else None
        if self.clip_method is not None:
            from convc.runtime.clip import CLIP_METHODS
            if self.clip_method not in CLIP_METHODS:
                raise ConvcError(f"unknown clip_mode {self.clip_method!r}; choose one of "
                                 f"{', '.join(m for m in CLIP_METHODS if m)}")
        self.dtype = np.dtype(cfg["dtype"])
        self.opt = make_optimizer(cfg)
        self.schedule = make_schedule(cfg, self.total)
        from convc.runtime.data import Batches

        self.batches = Batches(len(self.data.train_x), cfg["batch_size"], seed=cfg["seed"])
        self.rng = np.random.default_rng([cfg["seed"], 1])
        self.params = self._initial_params(params)
        self.carry_names = sorted(n for n, s in self.model.get("states", {}).items()
                                  if s.get("init") != "final")
        self.carry: dict | None = None
        self.step = 0
        self.history: list[dict] = []
        self.best_val: float | None = None
        self.best_step: int | None = None
        self.bad_validations = 0
        self.seconds_before = 0.0
        self.last_checkpoint: Path | None = None
        self.last_checkpoint_step: int | None = None
        self.stopped = "steps"
        self.progress = Progress(self.total, enabled=progress is not False and self.writer)
        if self.resume_from is not None:
            self._restore(saved_cfg)
        # Only now, with the settings and the data known to be good, is the
        # folder created (or an old run in it removed, with overwrite=True).
        self.out = self.out if self.writer else None  # other ranks never write into it
        self.folder = _prepare_out(self.out, resume, overwrite) if self.out is not None \
            else None

    # ------------------------------------------------------------ setup
    def _fit_batch_size(self) -> None:
        n = len(self.data.train_x)
        if self.shards > min(n, self.cfg["batch_size"]):
            raise ConvcError(f"{self.shards} shards need a batch of at least {self.shards} "
                             f"sequences, one for each; the batch size is "
                             f"{min(n, self.cfg['batch_size'])}")
        if n >= self.cfg["batch_size"]:
            return
        if "batch_size" in self.explicit or n < 1:
            raise DataError(f"batch size {self.cfg['batch_size']} needs at least that many "
                            f"training sequences; the data leaves {n} after holding out "
                            f"{len(self.data.val_x)} for validation")
        note(f"only {n} training sequences: batch size {self.cfg['batch_size']} -> {n}")
        self.cfg["batch_size"] = n

    def _shard_count(self) -> int:
        """The shards of every batch: `shards` in one process (default 1), the ranks in a
        distributed run (a `shards` given that differs is an error; one saved by a run on
        another number of ranks is replaced, with a note, see docs/distributed.md)."""
        if self.group is None:
            self.cfg["shards"] = self.cfg["shards"] or 1
            return self.cfg["shards"]
        size = self.group.size
        given = self.explicit.get("shards")
        if given is not None and given != size:
            raise ConvcError(f"shards={given} does not match the {size} MPI ranks of this "
                             f"run: a distributed run has one shard per rank")
        self.cfg["shards"] = size
        return size

    def _shared_checkpoint(self):
        """_find_checkpoint on rank 0, its result on every rank (the others never read
        --out); alone, _find_checkpoint."""
        if self.group is None:
            return self._find_checkpoint()
        found, _ = self.group.agree("resume", 0, lambda: self._find_checkpoint()
                                    if self.writer else None)
        return self.group.broadcast(found)

    def _initial_params(self, params) -> dict:
        if params is None:
            return self.mod.init_params(seed=self.cfg["seed"], dtype=self.cfg["dtype"],
                                        backend=self.B)
        check_params(self.model, params, "params")
        # A copy: the optimizer updates in place, and the caller's arrays stay theirs.
        return {name: self.xp.array(self.B.asarray(params[name]), dtype=self.dtype, copy=True)
                for name in sorted(params)}

    def _find_checkpoint(self):
        """The newest valid checkpoint in `out`, or None when the folder has none at all.

        Nothing to resume is not an error: a run killed before its first
        checkpoint is resumed by starting it again, so `--resume` can be used
        blindly in a retry loop. Checkpoints that are all damaged are an
        error, though: starting afresh over them would hide the loss.
        """
        from convc.runtime.checkpoint import latest_valid_checkpoint, list_checkpoints

        found = latest_valid_checkpoint(self.out, report=note)
        if found is None:
            existing = list_checkpoints(self.out)
            if existing:
                raise CheckpointError(
                    f"{self.out}: none of its {len(existing)} checkpoint"
                    f"{'s is' if len(existing) != 1 else ' is'} valid (see above), so there "
                    f"is nothing to resume from; move them away, or start again with "
                    f"--overwrite")
            note(f"{self.out} holds no checkpoint yet: starting the run from step 0")
        else:
            from convc.runtime.checkpoint import validate_run_meta

            validate_run_meta(*found)
        return found

    def _restore(self, saved_cfg: dict) -> None:
        from convc.runtime.data import Batches

        path, arrays, meta = self.resume_from
        user = meta["user"]
        if user.get("model") != self.model["name"]:
            raise CheckpointError(f"{path}: saved by model {user.get('model')!r}, "
                                  f"not {self.model['name']!r}")
        groups: dict[str, dict] = {}
        for key in sorted(arrays):
            group, _, name = key.partition("/")
            groups.setdefault(group, {})[name] = arrays[key]
        saved_params = groups.get("param", {})
        check_params(self.model, saved_params, str(path))
        for name in sorted(saved_params):
            self.params[name] = self.xp.asarray(saved_params[name].astype(self.dtype,
                                                                          copy=False))
        self.opt.load_state_dict(groups.get("optim", {}))
        try:
            self.schedule.load_state_dict(groups.get("sched", {}))
        except KeyError as exc:
            raise CheckpointError(f"{path}: its learning-rate schedule state has no {exc}; was "
                                  f"it saved with another schedule than "
                                  f"{self.cfg['schedule']!r}?") from None
        carry = groups.get("carry")
        self.carry = ({k: self.xp.asarray(carry[k]) for k in sorted(carry)}
                      if carry else None)
        self.batches = Batches.from_state(user["data_position"], n=len(self.data.train_x))
        self.rng.bit_generator.state = user["rng"]
        self.step = int(meta["step"])
        self.best_val = user.get("best_val_loss")
        self.best_step = user.get("best_step")
        self.bad_validations = int(user.get("bad_validations", 0))
        self.seconds_before = float(user.get("seconds", 0.0))
        self.last_checkpoint, self.last_checkpoint_step = path, self.step
        if user.get("deterministic") and not self.deterministic and self.device == "gpu":
            note("the run was started with --deterministic; without it the GPU may use "
                  "TF32 and accelerated reductions from here on")
        if user.get("data") != self.data.fingerprint:
            note(f"resuming with different data from the run in {self.out}; "
                  f"the losses will not match an uninterrupted run")
        changed = [k for k in TRAJECTORY_KEYS if saved_cfg.get(k) != self.cfg.get(k)
                   and k in saved_cfg]
        if changed:
            note("resuming with changed settings: " + ", ".join(
                f"{k}={self.cfg[k]!r} (was {saved_cfg[k]!r})" for k in changed))
        log = self.out / LOG_NAME
        if self.writer and log.exists():
            try:
                rows = [r for r in read_log(log, tolerant=True) if r["step"] <= self.step]
            except (ValueError, OSError) as exc:
                note(f"{log}: unreadable ({exc}); starting a new log")
                rows = []
            self.history = rows
        self.progress.start = self.step
        self.progress.line(f"resuming from {path} (step {self.step}, epoch "
                           f"{self.batches.epoch})")

    # ------------------------------------------------------------ log
    def _rewrite_log(self) -> None:
        if self.out is not None:
            self.folder.write(LOG_NAME, log_text(self.history))

    def _append_log(self, row: dict) -> None:
        if self.out is None:
            return
        path = self.out / LOG_NAME
        try:
            append_row(path, row)
        except OSError as exc:
            raise ConvcError(f"training stopped at step {row['step']}: cannot write {path}: "
                             f"{exc.strerror or exc}. {self._newest_valid()}") from exc

    # ------------------------------------------------------------ checkpoints
    def _checkpoint_arrays(self) -> dict:
        arrays = {f"param/{k}": self.params[k] for k in sorted(self.params)}
        opt_state = self.opt.state_dict()
        arrays.update({f"optim/{k}": opt_state[k] for k in sorted(opt_state)})
        sched_state = self.schedule.state_dict()
        arrays.update({f"sched/{k}": sched_state[k] for k in sorted(sched_state)})
        if self.carry is not None:
            arrays.update({f"carry/{k}": self.carry[k] for k in sorted(self.carry)})
        return arrays

    def save(self, elapsed: float) -> Path | None:
        """Write the checkpoint of the last completed step (finite parameters only)."""
        from convc.runtime.checkpoint import save_checkpoint

        if self.out is None:
            return None
        if self.last_checkpoint_step == self.step:
            return self.last_checkpoint
        if not _all_finite(self.params):
            note(f"not saving step {self.step}: the parameters are not finite")
            return None
        meta = {
            "model": self.model["name"],
            "epoch": self.batches.epoch,
            "data_position": self.batches.state(),
            "rng": self.rng.bit_generator.state,
            "config": self.cfg,
            "best_val_loss": self.best_val,
            "best_step": self.best_step,
            "bad_validations": self.bad_validations,
            "seconds": elapsed,
            "data": self.data.fingerprint,
            "patch": self.data.patch,
            "device": self.device,
            "conv": self.conv,
            "deterministic": self.deterministic,
            "convc_version": _convc_version(),
            "shards": self.shards,
            "ranks": self.group.size if self.group is not None else 1,
        }
        try:
            path = save_checkpoint(self.out, self.step, self._checkpoint_arrays(), meta,
                                   keep=self.keep)
        except CheckpointError as exc:
            raise CheckpointError(f"training stopped at step {self.step}: {exc}. "
                                  f"{self._newest_valid()}") from exc
        self.last_checkpoint, self.last_checkpoint_step = path, self.step
        return path

    def _newest_valid(self) -> str:
        """Where the run can continue from, for messages about a failed write."""
        if self.last_checkpoint is None:
            return "No checkpoint of this run was written yet."
        return (f"The newest valid checkpoint is {self.last_checkpoint} (step "
                f"{self.last_checkpoint_step}); fix the cause (free disk space, permissions) "
                f"and continue with --resume")

    def _save_reporting(self, elapsed: float) -> tuple[Path | None, str | None]:
        """save() on the way out of a run that is stopping anyway: (path, None) or
        (None, why it failed), so that the reason the run stopped is not lost."""
        try:
            return self.save(elapsed), None
        except CheckpointError as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            return None, str(cause)

    # ------------------------------------------------------------ one step
    def _batch(self, x: np.ndarray):
        return self.B.asarray(np.ascontiguousarray(x, dtype=self.dtype))

    def _step(self) -> dict:
        cfg = self.cfg
        k = self.step + 1
        self._phase = "pre"
        self._position = position = self.batches.state()
        if self.batches.index == 0:
            self.carry = None  # stateful runs start every epoch from the initial states
        epoch = self.batches.epoch
        idx = next(self.batches)
        try:
            loss, grads, final = self._loss_and_grad(idx, k)
        except NonFiniteError as exc:  # a model compiled with debug_nans found one
            self.batches = type(self.batches).from_state(position)
            raise _Stop(str(exc), k, cause=exc) from None
        if not math.isfinite(loss):
            self.batches = type(self.batches).from_state(position)
            self._agreed_end()
            raise _Stop(f"the loss is {loss}", k)
        from convc.runtime.clip import clip_grads

        grads, norm = clip_grads(grads, self.clip_method, cfg["clip"])
        if not math.isfinite(norm):
            bad = [n for n in sorted(grads)
                   if not bool(self.xp.isfinite(grads[n]).all())]
            self.batches = type(self.batches).from_state(position)
            what = f"not finite in {', '.join(bad)}" if bad else f"{norm} (overflow)"
            self._agreed_end()
            raise _Stop(f"the loss is {loss:.6g} but the gradient is {what}", k)
        self._phase = "update"  # from here until step = k, the state is half updated
        lr = self.schedule.apply(self.opt, self.step)
        self.opt.step(self.params, grads)
        if cfg["stateful"]:
            self.carry = {n: self.xp.array(final[n], copy=True)
                          for n in self.carry_names if n in final}
        self.step = k
        self._phase = "post"
        return {"step": k, "epoch": epoch, "loss": loss, "lr": float(lr),
                "grad_norm": float(norm), "val_loss": None}

    def _loss_and_grad(self, idx: np.ndarray, k: int):
        """(loss, gradients, final states) of the batch `idx`: whole, in `shards` shards
        one after the other, or in one shard per rank (then summed across the ranks)."""
        from convc.runtime.kernels import shard_bounds, shard_weights

        options = {"backend": self.B}
        if self.cfg["bptt"] is not None:
            options["bptt"] = self.cfg["bptt"]
        carry = self.carry if self.cfg["stateful"] else None
        if self.shards == 1:
            return self._shard_grad(idx, carry, options)
        bounds = shard_bounds(len(idx), self.shards)
        weights = shard_weights(bounds, len(idx))
        if self.group is not None:
            return self._ranks_grad(idx, carry, options, bounds, weights, k)
        return self._local_shards_grad(idx, carry, options, bounds, weights)

    def _shard_grad(self, rows: np.ndarray, carry: dict | None, options: dict):
        x = self._batch(self.data.train_x[rows])
        y = self._batch(self.data.train_y[rows])
        if carry is not None:
            options = dict(options, state=carry)
        loss, grads, final = self.mod.loss_and_grad(
            self.params, {self.data.input_name: x}, {self.data.target_name: y}, **options)
        return float(loss), grads, final

    def _local_shards_grad(self, idx, carry, options, bounds, weights):
        """The shards of one batch in turn, combined as kernels.in_shards combines its
        threads' shards and as the ranks of a distributed run do: g_0 w_0 + g_1 w_1 + ..."""
        from convc.runtime.distributed import _unique
        from convc.runtime.kernels import combine_losses, weigh

        losses, finals, total = [], [], {}
        for i, (a, b) in enumerate(bounds):
            loss, grads, final = self._shard_grad(idx[a:b], _rows(carry, a, b), options)
            losses.append(loss)
            names, aliases = _unique(grads)
            for name in names:  # a shard's arrays are the next shard's to reuse: copied
                if i == 0:
                    total[name] = weigh(self.xp.array(grads[name], copy=True), weights[0])
                else:
                    total[name] += weigh(grads[name], weights[i])
            for name, first in aliases.items():
                total[name] = total[first]
            finals.append({n: self.xp.array(v, copy=True) for n, v in final.items()})
        final = {n: self.xp.concatenate([f[n] for f in finals], axis=0) for n in finals[0]}
        return combine_losses(weights, losses), total, final

    def _ranks_grad(self, idx, carry, options, bounds, weights, k):
        """This rank's shard, then the ranks' losses and gradients summed in rank order."""
        from convc.runtime.distributed import describe_error
        from convc.runtime.kernels import combine_losses

        group = self.group
        a, b = bounds[group.rank]
        error = None
        try:
            loss, grads, final = self._shard_grad(idx[a:b], _rows(carry, a, b), options)
        except Exception as exc:  # told to the others before it is raised here
            error, loss = exc, None
        every = self.checkpoint_every
        kind = "step after a checkpoint" if every and self.step and self.step % every == 0 \
            else "step"
        statuses = group.exchange(kind, k, loss=loss, stop=self._stop_request(),
                                  error=describe_error(error) if error is not None else None)
        if error is not None:
            raise error
        loss = combine_losses(weights, [st["loss"] for st in statuses])
        if not math.isfinite(loss):
            return loss, grads, final
        grads = group.sum_gradients(grads, weights[group.rank])
        if self.cfg["stateful"]:
            final = group.gather_rows(final, bounds, self.xp)
        return loss, grads, final

    def _stop_request(self) -> int:
        flag = getattr(self, "_flag", None)
        return int(flag.signum or signal.SIGINT) if flag is not None and flag.raised else 0

    def _agreed_end(self) -> None:
        """Every rank stops here, at the same step, from the same values."""
        if self.group is not None:
            self.group.ended = True

    def _val_loss(self, start: int, stop: int) -> float:
        x = self._batch(self.data.val_x[start:stop])
        y = self._batch(self.data.val_y[start:stop])
        args = (self.params, {self.data.input_name: x}, {self.data.target_name: y})
        if hasattr(self.mod, "loss"):  # the forward pass alone
            return float(self.mod.loss(*args, backend=self.B))
        loss, _, _ = self.mod.loss_and_grad(*args, backend=self.B)  # generated before loss()
        return float(loss)

    def validate(self) -> float:
        """Mean loss over the validation clips (from the initial states, no update).

        Clips go in chunks of 4 batches; in a distributed run chunk j is rank j %
        ranks's, and the chunks' sums are added in chunk order, so the result is the
        same bits as one process's.
        """
        size = self.cfg["batch_size"] * 4
        if self.group is not None:
            return self._validate_ranks(size)
        total, count = 0.0, 0
        for start in range(0, len(self.data.val_x), size):
            stop = min(start + size, len(self.data.val_x))
            total += self._val_loss(start, stop) * (stop - start)
            count += stop - start
        return total / count

    def _validate_ranks(self, size: int) -> float:
        from convc.runtime.distributed import describe_error, split_validation

        group = self.group
        mine, error = [], None
        try:
            for j, start, stop in split_validation(len(self.data.val_x), size, group.size,
                                                   group.rank):
                mine.append([j, self._val_loss(start, stop) * (stop - start), stop - start])
        except Exception as exc:
            error = exc
        statuses = group.exchange("validation", self.step, val=mine, stop=self._stop_request(),
                                  error=describe_error(error) if error is not None else None)
        if error is not None:
            raise error
        total, count = 0.0, 0
        for _, part, n in sorted(tuple(c) for st in statuses for c in st["val"]):
            total += part
            count += n
        return total / count

    def _after_validation(self, val: float) -> bool:
        """Record a validation loss; True when early stopping says stop."""
        self.schedule.observe(val)
        if self.best_val is None or val < self.best_val:
            self.best_val, self.best_step = val, self.step
            self.bad_validations = 0
            return False
        self.bad_validations += 1
        patience = self.cfg["patience"]
        return patience is not None and self.bad_validations > patience

    # ------------------------------------------------------------ the run
    def run(self) -> TrainResult:
        """The run, holding the run folder's lock until it ends however it ends."""
        try:
            return self._run()
        finally:
            if self.folder is not None:
                self.folder.close()

    def _run(self) -> TrainResult:
        if self.out is not None:
            source = _model_source(self.mod)
            if source is not None:
                self.folder.write("model.py", source)
            # On resume: the log's rows up to the checkpoint's step (see _restore).
            self._rewrite_log()
        cfg = self.cfg
        what = (f"{self.total} steps" + (f" ({cfg['epochs']} epochs)" if cfg["epochs"] else ""))
        self.progress.line(
            f"training {self.model['name']} on {cfg['data']}: {len(self.data.train_x)} train / "
            f"{len(self.data.val_x)} val clips of {self.data.train_x.shape[1]} frames, "
            f"batch {cfg['batch_size']}, {cfg['optimizer']} lr {cfg['lr']:g}, {what}")
        if self.group is not None:
            self.progress.line(f"{self.group.size} ranks, one shard of the batch each ("
                               f"{self.group.name}): " + ", ".join(self.group.peers))
        t0 = time.perf_counter()

        def elapsed() -> float:
            return self.seconds_before + time.perf_counter() - t0

        flag = self._flag = _InterruptFlag(distributed=self.group is not None)
        self._phase = "between"
        pending: dict | None = None  # a completed step's row not yet in the log
        try:
            with flag:
                while self.step < self.total:
                    pending = self._step()
                    stop = False
                    if self.has_val and (self.step % self.val_every == 0
                                         or self.step == self.total):
                        pending["val_loss"] = self.validate()
                        stop = self._after_validation(pending["val_loss"])
                    row, pending = self._log(pending, elapsed()), None
                    self._phase = "between"
                    self.progress.update(self.step, row["loss"], row["lr"], row["val_loss"])
                    if self.on_step is not None and self.on_step(dict(row)) is False:
                        self.stopped, stop = "callback", True
                    if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                        self.save(elapsed())
                    if stop:
                        if self.stopped != "callback":
                            self.stopped = "early_stopping"
                            self.progress.line(
                                f"early stopping at step {self.step}: no better validation "
                                f"loss than {self.best_val:.6g} (step {self.best_step}) for "
                                f"{self.bad_validations} validations")
                        break
                    if self._stop_agreed():
                        raise KeyboardInterrupt
        except _Stop as stop:
            self.progress.close()
            saved, failed = self._save_reporting(elapsed())
            cause = stop.cause
            raise NonFiniteError(self._nonfinite_message(stop, saved, failed),
                                 node=cause.node if cause else None,
                                 where=cause.where if cause else None, step=stop.step,
                                 direction=cause.direction if cause else "training") from None
        except Fault as fault:
            self.progress.close()
            self._faulted(fault, pending, elapsed())
        except KeyboardInterrupt:
            self.progress.close()
            signum = (self.group.stop_signal if self.group is not None else 0) or flag.signum
            self._interrupted(pending, elapsed(), signum or signal.SIGINT)
        self.progress.close()
        checkpoint = self.save(elapsed())
        result = self._result(elapsed())
        result.checkpoint = checkpoint or self.last_checkpoint
        if self.out is not None:
            self._plots(result)
        return result

    def _stop_agreed(self) -> bool:
        """A stop asked for by a signal: in a distributed run, when any rank reported one
        in the last exchange (every rank saw the same statuses, so all stop here)."""
        if self.group is None:
            return self._flag.raised
        if self.group.stop_signal:
            self.group.ended = True
            return True
        return False

    def _faulted(self, fault: Exception, pending: dict | None, seconds: float) -> None:
        """Another rank failed or went silent: save the last completed step (rank 0),
        then raise the fault on with where the run can continue from."""
        from convc.runtime.data import Batches

        if self._phase == "pre":
            self.batches = Batches.from_state(self._position)
        if self._phase == "post" and pending is not None:
            self._log(pending, seconds)
        saved, failed = self._save_reporting(seconds)
        if saved is not None:
            more = f"; saved step {self.step} to {saved}, continue with --resume"
        elif self.last_checkpoint is not None:
            more = (f"; the last checkpoint is {self.last_checkpoint} (step "
                    f"{self.last_checkpoint_step}), continue with --resume")
        elif self.writer:
            more = "; no checkpoint was written" + (f" ({failed})" if failed else "")
        else:
            more = ""
        raise type(fault)(str(fault) + more, rank=fault.rank, abort=fault.abort) from None

    def _log(self, row: dict, seconds: float) -> dict:
        row["seconds"] = seconds
        self.history.append(row)
        self._append_log(row)
        return row

    def _interrupted(self, pending: dict | None, seconds: float, signum: int) -> None:
        """Save the last completed step after Ctrl-C, then raise TrainingInterrupted.

        With the signal handler installed the interrupt only arrives between
        steps. Without it (training outside the main thread) it can arrive
        anywhere: before the update nothing of the step counts (the batch
        position is put back), during it the state is unusable and only the
        previous checkpoint is reported, after it the step is logged and saved.
        """
        from convc.runtime.data import Batches

        saved: Path | None
        if self._phase == "pre":
            self.batches = Batches.from_state(self._position)
        if self._phase == "update":
            saved = None
        else:
            if self._phase == "post" and pending is not None:
                self._log(pending, seconds)
            saved, failed = self._save_reporting(seconds)
        self.stopped = "interrupted"
        what = "interrupted" if signum == signal.SIGINT else \
            f"stopped by {signal.Signals(signum).name}"
        if not self.writer:
            message = f"rank {self.group.rank}: {what} at step {self.step} (rank 0 saves it)"
        elif saved is not None:
            message = f"{what}: saved step {self.step} to {saved}; continue with --resume"
        elif self.last_checkpoint is not None:
            why = f"saving step {self.step} failed ({failed})" if failed else \
                "interrupted during an update"
            message = (f"{what}: {why}; the last checkpoint is {self.last_checkpoint} "
                       f"(step {self.last_checkpoint_step}); continue with --resume")
        else:
            message = f"{what} at step {self.step}; no checkpoint was written" + (
                f" ({failed})" if failed else "")
        raise TrainingInterrupted(message, self._result(seconds),
                                  saved or self.last_checkpoint, signum) from None

    def _nonfinite_message(self, stop: _Stop, saved: Path | None, failed: str | None) -> str:
        cfg = self.cfg
        if saved is not None:
            kept = f"The last good state (step {self.last_checkpoint_step}) is saved in {saved}."
        elif failed is not None:
            kept = (f"Saving the last good state failed ({failed}); the newest checkpoint is "
                    f"{self.last_checkpoint or 'none'}.")
        elif self.out is not None:
            kept = "No checkpoint was written: the parameters were not finite either."
        else:
            kept = "Nothing was saved (no out folder)."
        hints = [f"a smaller learning rate (lr is {cfg['lr']:g})"]
        if cfg["clip"] is None:
            hints.append("gradient clipping (clip=1.0)")
        hints.append("checking that the data lies in [0, 1]")
        find = "" if stop.cause else ("; compile with --debug-nans to find the first "
                                      "operation that produced it")
        return (f"training stopped at step {stop.step} (epoch {self.batches.epoch}): {stop}. "
                f"{kept} Try {', '.join(hints)}{find}")

    def _result(self, seconds: float) -> TrainResult:
        final = dict(self.carry) if self.carry else None
        out = self.out
        return TrainResult(
            params=self.params, history=list(self.history), config=dict(self.cfg),
            steps=self.step, epoch=self.batches.epoch, stopped=self.stopped,
            best_val_loss=self.best_val, best_step=self.best_step, seconds=seconds,
            out=out, checkpoint=self.last_checkpoint,
            log=(out / LOG_NAME) if out else None,
            model_py=(out / "model.py") if out and (out / "model.py").exists() else None,
            final_state=final, distributed=self._distributed_info())

    def _distributed_info(self) -> dict | None:
        group = self.group
        if group is None:
            return None
        return {"ranks": group.size, "rank": group.rank, "shards": self.shards,
                "collectives": group.name, "exchange_seconds": group.exchange_seconds,
                "status_seconds": group.status_seconds}

    # ------------------------------------------------------------ pictures
    def _plots(self, result: TrainResult) -> None:
        from convc.runtime import plots

        try:
            rows = self.history
            steps = [r["step"] for r in rows]
            losses = [r["loss"] for r in rows]
            vals = [(r["step"], r["val_loss"]) for r in rows if r["val_loss"] is not None]
            result.loss_png = plots.save_loss_png(
                self.folder.claim("loss.png"), steps, losses,
                [s for s, _ in vals] or None, [v for _, v in vals] or None,
                title=f"{self.model['name']}: training loss")
            xs, ys = (self.data.val_x, self.data.val_y) if self.has_val else \
                (self.data.train_x, self.data.train_y)
            inputs, targets, preds = predict_frames(
                self.mod, self.params, xs[:4], ys[:4], patch=self.data.patch,
                frames_out=self.data.frames_out, backend=self.B)
            result.predictions_png = plots.save_frames_png(
                self.folder.claim("predictions.png"), inputs, targets, preds,
                title=f"{self.model['name']} after {self.step} steps "
                      f"({'validation' if self.has_val else 'training'} clips)")
        except (ConvcError, ValueError) as exc:
            note(f"skipping the PNGs: {exc}")


def _rows(tree: dict | None, a: int, b: int) -> dict | None:
    return None if tree is None else {k: v[a:b] for k, v in tree.items()}


class _InterruptFlag:
    """Turn the first Ctrl-C or SIGTERM into a flag checked between steps.

    A KeyboardInterrupt in the middle of an optimizer update would leave some
    parameters updated and some not, a state no checkpoint may hold. So the
    first signal only sets `raised` (and `signum`); the loop finishes the step,
    saves it and stops. A second one stops at once. SIGTERM is handled like
    Ctrl-C because it is what batch schedulers (SLURM, Kubernetes) send before
    they kill a job. Outside the main thread no handler can be installed, and
    the loop falls back to catching KeyboardInterrupt where it happens.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, distributed: bool = False):
        # In a distributed run SIGUSR1 does the same: Open MPI's mpirun forwards it and
        # keeps the job, where it ends the job a quarter second after a SIGTERM.
        if distributed and hasattr(signal, "SIGUSR1"):
            self.SIGNALS = self.SIGNALS + (signal.SIGUSR1,)
        self.raised = False
        self.signum: int | None = None
        self._old: dict = {}

    def _handler(self, signum, frame):
        if self.raised:
            raise KeyboardInterrupt
        self.raised, self.signum = True, signum
        if _quiet_rank():  # a distributed run's other ranks: rank 0 says it
            return
        again = "Ctrl-C" if signum == signal.SIGINT else "the signal"
        print(f"\n{signal.Signals(signum).name}: stopping after this step ({again} again to "
              f"stop at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                try:
                    self._old[signum] = signal.signal(signum, self._handler)
                except (ValueError, OSError):
                    pass
        return self

    def __exit__(self, *exc):
        for signum, old in self._old.items():
            # None: the old handler was not installed from Python; the default is closest.
            signal.signal(signum, old if old is not None else signal.SIG_DFL)
        self._old = {}
        return False


def _quiet_rank() -> bool:
    from convc.runtime import runlog

    return runlog._NOTES["quiet"]


def _convc_version() -> str:
    import convc

    return convc.__version__


# ---------------------------------------------------------------------------
# The public function
# ---------------------------------------------------------------------------


def train(mod, params: dict | None = None, *, device: str = "cpu", conv: str = "numpy",
          out: str | os.PathLike | None = None, checkpoint_every: int | None = None,
          keep: int | None = 3, resume: bool = False, overwrite: bool = False,
          progress: bool | None = None, on_step: Callable[[dict], Any] | None = None,
          threads: int | None = None, poison: bool | None = None,
          deterministic: bool = False, ignore_memory_limit: bool = False,
          **settings) -> TrainResult:
    """Train a compiled model (from `convc.load` or `convc.api.import_generated`).

    The training settings (`steps=`, `lr=`, ... listed below) are keywords;
    those left as None come from the spec's `train { ... }` block, then
    from the built-in defaults. `clips` may also be an array of clips
    (N, L, C, H, W) to train on directly.

    device, conv: the backend ("cpu" or "gpu"; see runtime/backend.py).
    out: a folder for model.py, log.csv, checkpoints (every
        `checkpoint_every` steps, the newest `keep` kept, and one at the end),
        predictions.png and loss.png. `resume=True` continues from its newest
        valid checkpoint with bitwise-identical losses; a folder that already
        holds checkpoints needs `resume` or `overwrite`.
    progress: None or True shows progress on stderr, False is silent.
    on_step: called with each log row (a dict); returning False stops.
    threads: limit the BLAS threads (needs threadpoolctl).
    poison: True fills every buffer the generated code allocates with NaN
        before its first write (`kernels.set_poison`), False turns that off,
        None leaves it as it is. Results must not change: a NaN that shows
        up only with poison on is a read of memory nobody wrote.
    deterministic: on the GPU, turn off what can make two runs differ in
        the last bits: TF32 GEMMs and CuPy's CUB/cuTENSOR accelerated
        reductions (see runtime/ops_cupy.py and docs/reliability.md). On the
        CPU training is already bitwise reproducible for a given thread
        count, and the flag changes nothing.
    ignore_memory_limit: train even when the step's estimated memory
        (`convc.runtime.memory.estimate`) exceeds the machine's available
        memory; by default that is a ConvcError raised before allocating.

    Raises NonFiniteError when the loss or gradient stops being finite
    (after saving the last good step), DataError for data that does not
    fit the model, and TrainingInterrupted (a KeyboardInterrupt) on Ctrl-C
    after saving the last completed step.

    Settings (convc.spec.settings.TRAIN):
    """
    unknown = sorted(set(settings) - set(TRAIN))
    if unknown:
        raise TypeError(f"train() got an unexpected keyword argument {unknown[0]!r}")
    clips_array = settings.get("clips") if isinstance(settings.get("clips"), np.ndarray) \
        else None
    explicit = {k: v for k, v in settings.items()
                if v is not None and not (k == "clips" and clips_array is not None)}
    if not hasattr(mod, "MODEL") or not hasattr(mod, "loss_and_grad"):
        raise ConvcError("train() needs a compiled model module (from convc.load)")
    cfg = resolve_config(mod.MODEL.get("train", {}), explicit)
    check_config(cfg)
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int)
                                         or checkpoint_every < 1):
        raise ConvcError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    if clips_array is not None:
        cfg["data"] = "<array>"
    from convc.runtime import distributed

    run = dict(device=device, conv=conv, out=out, checkpoint_every=checkpoint_every, keep=keep,
               resume=resume, overwrite=overwrite, progress=progress, on_step=on_step,
               threads=threads, poison=poison, deterministic=deterministic,
               ignore_memory_limit=ignore_memory_limit)
    if not distributed.wanted(cfg["distributed"]):
        return _train_here(mod, params, cfg, clips_array, explicit, None, **run)
    return _train_ranks(mod, params, cfg, clips_array, explicit, run)


def _train_ranks(mod, params, cfg, clips_array, explicit, run: dict) -> TrainResult:
    """train() as one rank of a distributed run (runtime/distributed.py)."""
    from convc.runtime import distributed

    group = distributed.open_group(run["device"], cfg["collectives"], cfg["timeout"])
    quiet = set_quiet(group.rank != 0)
    try:
        group.introduce()
        return _train_here(mod, params, cfg, clips_array, explicit, group, **run)
    except BaseException as exc:
        group.fail(exc)  # the others hear of it at their next exchange
        if isinstance(exc, Fault) and exc.abort:  # a rank may hang: end the whole job
            group.abort(str(exc))
        raise
    finally:
        group.farewell()
        set_quiet(quiet)


def _train_here(mod, params, cfg, clips_array, explicit, group, *, device, conv, out,
                checkpoint_every, keep, resume, overwrite, progress, on_step, threads, poison,
                deterministic, ignore_memory_limit) -> TrainResult:
    """train() in this process, alone or as one rank of `group`."""
    if not ignore_memory_limit:
        _check_memory(mod.MODEL, cfg, clips_array)
    limits = _thread_limits(threads)
    with limits, _poison_mode(poison):
        trainer = _Trainer(mod, params, cfg, explicit=explicit, device=device, conv=conv,
                           out=out, checkpoint_every=checkpoint_every, keep=keep,
                           resume=resume, overwrite=overwrite, progress=progress,
                           on_step=on_step, clips_array=clips_array,
                           deterministic=deterministic, group=group)
        if group is not None:  # every rank set up (or the one that failed named)
            group.exchange("ready", 0)
        return trainer.run()


def _document_settings(func) -> None:
    """Give `func` (train) the settings of the schema: in its signature, as keywords
    defaulting to None, and at the end of its docstring, with their help and values."""
    signature = inspect.signature(func)
    kept = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    func.__signature__ = signature.replace(parameters=kept + [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
        for name in TRAIN])
    if func.__doc__ is None:  # python -OO
        return
    lines = []
    for name, setting in TRAIN.items():
        text = f"{name}: {setting.explain()}; {setting.describe()}."
        lines += textwrap.wrap(text, 76, initial_indent="    ", subsequent_indent="        ")
    func.__doc__ = func.__doc__.rstrip() + "\n" + "\n".join(lines) + "\n"


_document_settings(train)


def _check_memory(model: dict, cfg: dict, clips_array) -> None:
    """Refuse, before allocating anything, a run whose step cannot fit in memory."""
    from convc.runtime import memory

    fi, fo, length = task_lengths(model, cfg)
    data_values = 0
    if clips_array is None and str(cfg["data"]) in GENERATED_DATA and model["inputs"]:
        (shape,) = list(model["inputs"].values())[:1]
        data_values = (cfg["clips"] or DEFAULT_CLIPS) * length * memory._numel(shape)
    parts = memory.estimate(model, cfg["batch_size"], memory.step_steps(model, fi, fo),
                            optimizer=cfg["optimizer"], momentum=cfg["momentum"],
                            itemsize=np.dtype(cfg["dtype"]).itemsize, data_values=data_values)
    memory.check_fits(parts, f"training {model['name']} with batch {cfg['batch_size']}")


@contextlib.contextmanager
def _poison_mode(poison: bool | None):
    """Poison mode on or off for one run, and back to what it was afterwards."""
    from convc.runtime import kernels

    was = kernels.poison_enabled()
    if poison is not None:
        kernels.set_poison(bool(poison))
    try:
        yield
    finally:
        kernels.set_poison(was)


def _thread_limits(threads: int | None):
    if threads is None:
        return contextlib.nullcontext()
    if not isinstance(threads, int) or threads < 1:
        raise ConvcError(f"threads must be a positive integer, got {threads!r}")
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        raise ConvcError("threads= needs threadpoolctl (pip install threadpoolctl); or set "
                         "OMP_NUM_THREADS before starting Python") from None
    return threadpool_limits(limits=threads)

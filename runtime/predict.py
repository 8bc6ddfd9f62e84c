"""Run a trained model on clips: `convc predict` without the printing.

    m = convc.load("examples/seed.cell")
    p = convc.runtime.predict.predict(m, "runs/seed", data="synthetic", clips=3)
    # or: p = m.predict("runs/seed", data="synthetic", clips=3)
    p.predictions.shape              # (3, 10, 1, 16, 16): the next frame at each step
    convc.runtime.predict.save(p, "preds")   # preds/predictions.npy, preds/predictions.png

`predict` loads the checkpoint (`load_checkpoint_params`, refusing
non-finite parameters unless `allow_nonfinite`), loads or generates the
clips as training does (`runtime.dataset.load_clips`, with the run's saved settings under the ones
given), runs `forward` in batches of 16 (`predict_frames`, which training
uses for its predictions.png too) and returns a `Predictions`: the
inputs, the targets where the clips have them, and the predictions, all as
full float32 frames (N, T, C, H, W), a model that reads p x p patches
unpatched back to one-channel frames. A next-frame model predicts the next
frame at every input step; a forecast model predicts `steps` frames after
the input.

`save` writes predictions.npy (atomically) and predictions.png into a
folder; `save_npy` and `save_png` write one each. None of them replaces a
file the prediction read (the spec, its imports, the checkpoint, the data)
or any `.cell` file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convc.errors import CheckpointError, ConvcError, DataError
from convc.runtime.runlog import note
from convc.spec.settings import DEFAULT_FRAMES

# Clips forward() sees at once.
BATCH = 16
# Sequences generated when generated data is asked for without a count.
GENERATED_CLIPS = 8
NPY_NAME = "predictions.npy"
PNG_NAME = "predictions.png"


@dataclass
class Predictions:
    """What `predict` returns: arrays of full frames, float32, (N, T, C, H, W).

    inputs: the frames the model read (frames_in of them).
    targets: the frames it should have predicted, or None when the clips are
        too short to hold them (a forecast past their end).
    predictions: next_frame: the next frame at each of frames_in steps;
        forecast: frames_out frames after the input (frames_out is None for
        next-frame models).
    checkpoint: the checkpoint file used (the newest valid one of a folder);
    step: the training step it holds (None if it does not say).
    sources: the files read (spec, imports, checkpoint, data file), which
        `save` never replaces.
    """

    model: str
    task: str
    inputs: np.ndarray
    targets: np.ndarray | None
    predictions: np.ndarray
    frames_in: int
    frames_out: int | None
    checkpoint: Path
    step: int | None
    data: str
    patch: int = 1
    sources: tuple[str, ...] = field(default_factory=tuple)

    @property
    def forecast(self) -> bool:
        return self.task == "forecast"

    def describe(self) -> str:
        """One line: what was predicted, for how many sequences, with which checkpoint."""
        what = (f"{self.predictions.shape[1]} frames after {self.frames_in} input frames"
                if self.forecast else f"the next frame at each of {self.frames_in} steps")
        return (f"predicted {what} for {len(self.predictions)} sequences with "
                f"{self.checkpoint} (step {self.step})")


def predict(mod, checkpoint: str | os.PathLike, *, data: str | None = None,
            clips: int | np.ndarray | None = None, steps: int | None = None,
            seed: int | None = None, allow_nonfinite: bool = False, device: str = "cpu",
            conv: str = "numpy") -> Predictions:
    """Run a compiled model (from `convc.load`) with a checkpoint's parameters on clips.

    checkpoint: a checkpoint file (ckpt-*.npz) or a run folder (its newest
        valid checkpoint). One with NaN or Inf parameters is a CheckpointError
        unless `allow_nonfinite`; so is one written by another model.
    data: "synthetic", "synthetic:shapes", "sklearn-digits" or a .npy/.npz clip
        file; None: the data the run trained on (from the checkpoint, then the
        spec's train block, then "synthetic").
    clips: sequences to generate (default 8) or to keep from a file (default
        all), or an array of clips (N, L, C, H, W) to predict on directly.
    steps: frames a forecast model predicts (default: as trained, or 10).
    seed: the seed of generated data (default: the run's).
    device, conv: the backend ("cpu" or "gpu"; see runtime/backend.py).

    Raises CheckpointError for an unusable checkpoint and DataError for
    clips that do not fit the model or are too short for its frames_in.
    """
    from convc.runtime.backend import get_backend
    from convc.runtime.config import resolve_config
    from convc.runtime.dataset import GENERATED_DATA, load_clips
    from convc.runtime.loader import sources

    model = mod.MODEL
    params, meta, where = load_checkpoint_params(checkpoint, model,
                                                 allow_nonfinite=allow_nonfinite)
    array = clips if isinstance(clips, np.ndarray) else None
    count = None if array is not None else clips
    run_config = (meta.get("user") or {}).get("config") or {}
    explicit = {"data": data, "clips": count, "seed": seed}
    if array is None and count is None and _data_of(data, model, run_config) in GENERATED_DATA:
        explicit["clips"] = GENERATED_CLIPS
    explicit = {k: v for k, v in explicit.items() if v is not None}
    cfg = resolve_config(model.get("train", {}), explicit, run_config)
    if array is not None:
        cfg["data"] = "<array>"
    forecast = model.get("task") == "forecast"
    fi = cfg["frames_in"] or DEFAULT_FRAMES
    fo = steps or cfg["frames_out"] or DEFAULT_FRAMES
    loaded, p, _ = load_clips(model, cfg, fi + fo if forecast else fi + 1, array)
    if loaded.shape[1] < fi + (0 if forecast else 1):
        raise DataError(f"{cfg['data']}: clips have {loaded.shape[1]} frames; the model reads "
                        f"{fi} (frames_in){'' if forecast else ' and predicts one more'}")
    x = loaded[:, :fi]
    if forecast:
        y = loaded[:, fi:fi + fo] if loaded.shape[1] >= fi + fo else None
    else:
        y = loaded[:, 1:fi + 1]
    B = get_backend(device, conv)
    params = {k: B.asarray(v.astype(np.float32)) for k, v in sorted(params.items())}
    parts = [predict_frames(mod, params, x[i:i + BATCH],
                            None if y is None else y[i:i + BATCH],
                            patch=p, frames_out=fo, backend=B)
             for i in range(0, len(x), BATCH)]
    data_file = cfg["data"] if array is None and cfg["data"] not in GENERATED_DATA else None
    return Predictions(
        model=model["name"], task=model.get("task", "next_frame"),
        inputs=np.concatenate([part[0] for part in parts]),
        targets=None if y is None else np.concatenate([part[1] for part in parts]),
        predictions=np.concatenate([part[2] for part in parts]),
        frames_in=fi, frames_out=fo if forecast else None, checkpoint=where,
        step=meta.get("step"), data=str(cfg["data"]), patch=p,
        sources=tuple(str(s) for s in (*sources(mod), where, data_file) if s))


def _data_of(data, model: dict, run_config: dict):
    """The data a prediction reads: `data`, else the run's, else the spec's, else the
    default (what resolve_config picks)."""
    from convc.runtime.config import DEFAULTS

    for layer in (run_config, model.get("train", {}), DEFAULTS):
        if data is not None:
            break
        data = layer.get("data")
    return data


# ---------------------------------------------------------------------------
# Checkpoints and the forward pass
# ---------------------------------------------------------------------------


def check_params(model: dict, params: dict, where: str, allow_nonfinite: bool = False) -> None:
    """Raise CheckpointError unless `params` has exactly the model's names and shapes,
    and (unless `allow_nonfinite`) only finite values: a checksum proves a file is what
    was written, not that what was written is usable."""
    specs = model["params"]
    missing = sorted(set(specs) - set(params))
    extra = sorted(set(params) - set(specs))
    if missing or extra:
        raise CheckpointError(f"{where} does not fit model {model['name']}: missing "
                              f"{missing or 'nothing'}, unexpected {extra or 'nothing'}")
    for name in sorted(specs):
        if tuple(params[name].shape) != tuple(specs[name]["shape"]):
            raise CheckpointError(f"{where}: parameter {name} has shape "
                                  f"{tuple(params[name].shape)}, model {model['name']} "
                                  f"needs {tuple(specs[name]['shape'])}")
        value = params[name]
        if not allow_nonfinite and isinstance(value, np.ndarray) and value.dtype.kind in "fc":
            bad = int(np.count_nonzero(~np.isfinite(value)))
            if bad:
                raise CheckpointError(f"{where}: parameter {name} has {bad} non-finite "
                                      f"value{'s' if bad != 1 else ''} (NaN or Inf); refusing "
                                      f"to use it (--allow-nonfinite loads it anyway)")


def load_checkpoint_params(path: str | os.PathLike, model: dict, allow_nonfinite: bool = False
                           ) -> tuple[dict, dict, Path]:
    """(params, metadata, file) from a checkpoint file or a run folder (its newest valid one)."""
    from convc.runtime.checkpoint import latest_valid_checkpoint, load_checkpoint

    path = Path(path)
    if path.is_dir():
        found = latest_valid_checkpoint(path, report=note)
        if found is None:
            raise CheckpointError(f"{path}: no valid checkpoint in this folder")
        path, arrays, meta = found
    else:
        arrays, meta = load_checkpoint(path)
    user = meta.get("user") or {}
    if user.get("model") not in (None, model["name"]):
        raise CheckpointError(f"{path} was written by model {user.get('model')!r}, "
                              f"not {model['name']!r}")
    params = {key.partition("/")[2]: arrays[key] for key in sorted(arrays)
              if key.startswith("param/")}
    check_params(model, params, str(path), allow_nonfinite=allow_nonfinite)
    return params, meta, path


def predict_frames(mod, params: dict, x: np.ndarray, y: np.ndarray | None = None, *,
                   patch: int = 1, frames_out: int | None = None, backend=None
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Run the model on clips x; return (inputs, targets, predictions) as full frames.

    Forecast models predict `frames_out` frames (default: as many as y has).
    With patch=p > 1 every result is unpatched back to one-channel frames.
    """
    from convc.runtime import data as D
    from convc.runtime.model import default_backend

    B = backend if backend is not None else default_backend()
    dtype = params[sorted(params)[0]].dtype
    (input_name, _), = mod.MODEL["inputs"].items()
    kw: dict[str, Any] = {"backend": B}
    if mod.MODEL.get("task") == "forecast":
        kw["steps"] = frames_out or (y.shape[1] if y is not None else DEFAULT_FRAMES)
    outputs, _ = mod.forward(params, {input_name: B.asarray(np.ascontiguousarray(x, dtype))},
                             **kw)
    name = next(iter(mod.MODEL["outputs"]))
    pred = np.asarray(B.asnumpy(outputs[name]), dtype=np.float32)
    x = np.asarray(x, dtype=np.float32)
    y = None if y is None else np.asarray(y, dtype=np.float32)
    if patch > 1:
        x = D.unpatch(x, patch)
        y = None if y is None else D.unpatch(y, patch)
        pred = D.unpatch(pred, patch)
    return x, y, pred


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def check_outputs(out: str | os.PathLike, protected: tuple[str | os.PathLike, ...] = ()
                  ) -> None:
    """Refuse (ConvcError) a folder whose predictions.npy or predictions.png would replace
    one of `protected` or a .cell file; see `convc.runtime.atomic.check_output`."""
    from convc.runtime.atomic import check_output

    for name in (NPY_NAME, PNG_NAME):
        check_output(Path(out) / name, tuple(protected))


def save_npy(pred: Predictions, out: str | os.PathLike) -> Path:
    """Write out/predictions.npy (the predictions, float32 (N, T, C, H, W)) atomically,
    making the folder; returns its path. Errors are ConvcErrors naming the file."""
    from convc.runtime.atomic import check_output, write_atomic

    out = Path(out)
    path = out / NPY_NAME
    check_output(path, pred.sources)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConvcError(f"cannot create {out}: {exc.strerror or exc}") from None
    try:
        write_atomic(path, lambda stream: np.save(stream, pred.predictions))
    except OSError as exc:
        raise ConvcError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def save_png(pred: Predictions, out: str | os.PathLike) -> Path:
    """Draw inputs, targets and predictions of the first sequences to
    out/predictions.png (atomically); returns its path. Without matplotlib: a
    ConvcError that says so."""
    from convc.runtime import plots
    from convc.runtime.atomic import check_output

    path = Path(out) / PNG_NAME
    check_output(path, pred.sources)
    return plots.save_frames_png(path, pred.inputs, pred.targets, pred.predictions,
                                 title=f"{pred.model} at step {pred.step}")


def save(pred: Predictions, out: str | os.PathLike, png: bool = True) -> dict[str, Path]:
    """Write predictions.npy and (with `png`) predictions.png into the folder `out`;
    returns {"predictions": npy path, "png": png path}. A missing matplotlib is a
    ConvcError after the .npy is written; png=False skips the picture."""
    check_outputs(out, pred.sources)
    written = {"predictions": save_npy(pred, out)}
    if png:
        written["png"] = save_png(pred, out)
    return written

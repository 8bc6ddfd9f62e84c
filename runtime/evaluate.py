"""How good are a trained model's forecasts: metrics on full frames, beside two baselines.

    results = evaluate_model(mod, params, test_clips, frames_in=10, frames_out=10,
                             train_clips=train_clips)
    print(format_table(results))

The model sees the first `frames_in` frames of each clip and predicts the next
`frames_out`; the prediction is scored with runtime/metrics.py (MSE and MAE
summed over a frame's pixels and averaged over sequences and frames, SSIM,
PSNR; pixels in [0, 1], OpenSTL's conventions) on *full* frames: a model that
reads 4x4 patches (Shi et al. 2015) has its output unpatched first, so its
numbers are comparable with any other model's on the same clips. SSIM is
Wang et al.'s Gaussian-window SSIM unless `ssim_variant="uniform"` (`convc
eval --ssim uniform`) asks for OpenSTL's (see runtime/metrics.py); every
table and the JSON name the variant.

A number alone says little, so the same metrics are computed for two
predictions that need no learning:

* copy last: the last input frame, repeated. Beating it means the model
  has learnt motion, not just to redraw what it saw.
* mean frame: the average frame of the training clips, repeated. Beating it
  means the model uses its input at all; on sparse data such as moving
  digits this blurry guess is hard to beat on MSE and easy on SSIM.

`main_eval` is the `convc eval` command: a model, a checkpoint written by
runtime/train.py, and the data; it reproduces the run's held-out split when
it evaluates on the data the run trained on.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from convc.argtypes import train_type
from convc.errors import CheckpointError, ConvcError, DataError
from convc.runtime import data as D
from convc.runtime.backend import DEVICES, backend_names
from convc.runtime import metrics
from convc.runtime.predict import check_params

METRICS = ("mse", "mae", "ssim", "psnr")
BETTER = {"mse": "lower", "mae": "lower", "ssim": "higher", "psnr": "higher"}
ROWS = (("model", "model"), ("copy_last", "copy last input"),
        ("mean_frame", "mean training frame"))
DEFAULT_FRAMES = 10


# ---------------------------------------------------------------------------
# Full frames <-> the model's layout
# ---------------------------------------------------------------------------


def _input_shape(mod) -> tuple[int, int, int]:
    meta = mod.MODEL
    if len(meta["inputs"]) != 1 or len(meta["outputs"]) < 1:
        raise ConvcError(f"evaluating needs a model with one input and an output; "
                         f"{meta['name']} has inputs {sorted(meta['inputs'])} and outputs "
                         f"{sorted(meta['outputs'])}")
    (_, shape), = meta["inputs"].items()
    return tuple(int(d) for d in shape)  # type: ignore[return-value]


def infer_patch(model_shape: tuple[int, ...], frame_shape: tuple[int, ...]) -> int:
    """p such that (C, H, W) frames cut into p x p patches have the model's input shape.

    1 when the frames already have the model's shape; anything that fits
    neither way is a DataError naming both shapes.
    """
    c_m, h_m, w_m = model_shape
    c, h, w = frame_shape
    if (c_m, h_m, w_m) == (c, h, w):
        return 1
    if h % h_m == 0 and h // h_m > 1:
        p = h // h_m
        if w == w_m * p and c_m == c * p * p:
            return p
    raise DataError(f"frames of {c}x{h}x{w} (channels x height x width) do not fit a model "
                    f"that reads {c_m}x{h_m}x{w_m}, patched or not")


# ---------------------------------------------------------------------------
# Predictions
# ---------------------------------------------------------------------------


def _forecast_batch(mod, params: dict, x, frames_out: int, backend) -> Any:
    """Predict frames_out frames after the model-layout inputs x (N, T, C, h, w).

    A forecast model (its target has its own time axis, as in the
    encoder-forecaster) predicts them in one call. A next-frame model is
    rolled out: its prediction after the last input frame is the first
    forecast, which is fed back in, one frame at a time, from the states
    the model has reached.
    """
    meta = mod.MODEL
    in_name = next(iter(meta["inputs"]))
    out_name = next(iter(meta["outputs"]))
    if meta.get("task") == "forecast":
        outputs, _ = mod.forward(params, {in_name: x}, steps=frames_out, backend=backend)
        return outputs[out_name]
    outputs, state = mod.forward(params, {in_name: x}, backend=backend)
    frames = [outputs[out_name][:, -1:]]
    while len(frames) < frames_out:
        outputs, state = mod.forward(params, {in_name: frames[-1]}, state=state,
                                     backend=backend)
        frames.append(outputs[out_name][:, -1:])
    return backend.xp.concatenate(frames, axis=1)


def forecast_frames(mod, params: dict, inputs: np.ndarray, frames_out: int,
                    patch: int | None = None, batch_size: int = 16,
                    backend=None) -> np.ndarray:
    """The model's forecast of frames_out full frames after `inputs` (N, T, C, H, W).

    Inputs are cut into patches when the model reads patches (`patch`, or
    inferred from the shapes), run `batch_size` sequences at a time, and the
    result is unpatched back to full frames, as float32 NumPy.
    """
    from convc.runtime.model import default_backend

    B = backend if backend is not None else default_backend()
    inputs = np.asarray(inputs)
    if inputs.ndim != 5:
        raise DataError(f"expected inputs shaped (N, T, C, H, W), found {inputs.shape}")
    p = patch if patch is not None else infer_patch(_input_shape(mod), inputs.shape[2:])
    if frames_out < 1 or batch_size < 1:
        raise ConvcError(f"frames_out and batch_size must be >= 1, got {frames_out} and "
                         f"{batch_size}")
    dtype = params[sorted(params)[0]].dtype
    parts = []
    for start in range(0, len(inputs), batch_size):
        x = inputs[start:start + batch_size]
        x = D.patch(x, p) if p > 1 else x
        x = B.asarray(np.ascontiguousarray(x, dtype=dtype))
        pred = _forecast_batch(mod, params, x, frames_out, B)
        parts.append(np.asarray(B.asnumpy(pred), dtype=np.float32))
    pred = np.concatenate(parts)
    return D.unpatch(pred, p) if p > 1 else pred


# ---------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------


def score(pred: np.ndarray, true: np.ndarray, ssim_variant: str = metrics.DEFAULT_SSIM
          ) -> dict[str, Any]:
    """The four metrics and the MSE at each horizon, as plain Python numbers."""
    result: dict[str, Any] = metrics.evaluate(pred, true, ssim_variant=ssim_variant)
    result["per_frame_mse"] = [float(v) for v in metrics.per_frame_mse(pred, true)]
    return result


def evaluate_model(mod, params: dict, clips: np.ndarray, frames_in: int, frames_out: int,
                   patch: int | None = None, batch_size: int = 16,
                   train_clips: np.ndarray | None = None, backend=None,
                   ssim_variant: str = metrics.DEFAULT_SSIM) -> dict[str, Any]:
    """Score the model's forecasts on `clips` beside the two baselines.

    clips: full frames (N, L, C, H, W) in [0, 1] with L >= frames_in +
    frames_out; the first frames_in frames go in, the next frames_out are
    the truth. train_clips: the training clips (full frames), whose mean
    frame is the mean-frame baseline; without them the evaluated clips'
    input frames stand in (`mean_frame_source` says which). ssim_variant:
    "gaussian" (Wang et al., the default) or "uniform" (OpenSTL's), see
    metrics.ssim.

    Returns {"model", "copy_last", "mean_frame"}, each a dict of "mse",
    "mae", "ssim", "psnr" and "per_frame_mse", plus "sequences",
    "frames_in", "frames_out", "patch", "frame" [C, H, W],
    "mean_frame_source" and "ssim_variant" (metrics.ssim_info: the
    variant's name, label, window, covariance and data range).
    """
    ssim = metrics.ssim_info(ssim_variant)  # an unknown variant fails before the work
    clips = np.asarray(clips)
    if clips.ndim != 5 or len(clips) < 1:
        raise DataError(f"expected clips shaped (N, L, C, H, W) with N >= 1, "
                        f"found {clips.shape}")
    if frames_in < 1 or frames_out < 1:
        raise ConvcError(f"frames_in and frames_out must be >= 1, got {frames_in} and "
                         f"{frames_out}")
    if clips.shape[1] < frames_in + frames_out:
        raise DataError(f"clips have {clips.shape[1]} frames, too short for {frames_in} input "
                        f"+ {frames_out} predicted frames")
    p = patch if patch is not None else infer_patch(_input_shape(mod), clips.shape[2:])
    inputs = clips[:, :frames_in]
    truth = clips[:, frames_in:frames_in + frames_out]

    pred = forecast_frames(mod, params, inputs, frames_out, patch=p, batch_size=batch_size,
                           backend=backend)
    copy_last = metrics.baseline_copy_last(inputs, frames_out)
    if train_clips is not None:
        train_clips = np.asarray(train_clips)
        if train_clips.ndim != 5 or train_clips.shape[2:] != clips.shape[2:]:
            raise DataError(f"training clips {train_clips.shape} do not have the frames of "
                            f"the evaluated clips {clips.shape}")
        mean_source, mean_of = "training clips", train_clips
    else:
        mean_source, mean_of = "evaluated inputs", inputs
    mean_frame = metrics.baseline_mean_frame(mean_of, frames_out, n_sequences=len(clips))
    return {
        "model": score(pred, truth, ssim_variant),
        "copy_last": score(copy_last, truth, ssim_variant),
        "mean_frame": score(mean_frame, truth, ssim_variant),
        "sequences": int(len(clips)),
        "frames_in": int(frames_in),
        "frames_out": int(frames_out),
        "patch": int(p),
        "frame": [int(d) for d in clips.shape[2:]],
        "mean_frame_source": mean_source,
        "ssim_variant": ssim,
    }


def ssim_label(results: dict[str, Any]) -> str:
    """"SSIM (gaussian 11x11, sigma 1.5)" or "SSIM (uniform 7x7, as OpenSTL)": which
    SSIM `results` hold (results from before the variants were named: the Gaussian)."""
    return (results.get("ssim_variant") or metrics.ssim_info())["label"]


def format_table(results: dict[str, Any], markdown: bool = False) -> str:
    """The model and the baselines, one row each: MSE, MAE, SSIM, PSNR.

    The SSIM column names its variant: "SSIM (gaussian 11x11, sigma 1.5;
    higher is better)".
    """
    names = {m: m.upper() for m in METRICS}
    names["ssim"] = ssim_label(results)
    header = ["prediction"] + [f"{names[m][:-1]}; {BETTER[m]} is better)"
                               if names[m].endswith(")") else
                               f"{names[m]} ({BETTER[m]} is better)" for m in METRICS]
    rows = []
    for key, label in ROWS:
        r = results[key]
        rows.append([label, f"{r['mse']:.2f}", f"{r['mae']:.2f}", f"{r['ssim']:.4f}",
                     f"{r['psnr']:.2f}"])
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * len(METRICS)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                       for i, cell in enumerate(row)) for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def describe(results: dict[str, Any]) -> str:
    """One line saying what was evaluated and how."""
    c, h, w = results["frame"]
    p = results["patch"]
    patched = f"; the model reads {p}x{p} patches, scored unpatched" if p > 1 else ""
    return (f"{results['sequences']} sequences of {c}x{h}x{w} frames, {results['frames_in']} "
            f"in and {results['frames_out']} predicted{patched}; MSE and MAE summed over each "
            f"frame's pixels; {ssim_label(results)}; mean frame from the "
            f"{results['mean_frame_source']}")


def beats_baselines(results: dict[str, Any], on: tuple[str, ...] = ("mse", "ssim")) -> bool:
    """True when the model is better than both baselines on every metric in `on`."""
    model = results["model"]
    for baseline in ("copy_last", "mean_frame"):
        for m in on:
            ours, theirs = model[m], results[baseline][m]
            if not (ours < theirs if BETTER[m] == "lower" else ours > theirs):
                return False
    return True


# ---------------------------------------------------------------------------
# `convc eval`
# ---------------------------------------------------------------------------


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `convc eval`, for the command line to add to its sub-parser."""
    parser.add_argument("spec", help="the model's .cell file")
    parser.add_argument("--model", default=None, help="which model of the file, if several")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint (ckpt-*.npz) or a run folder (its newest valid one)")
    parser.add_argument("--data", default=None,
                        help="synthetic, synthetic:shapes, sklearn-digits or a .npy/.npz file "
                             "(default: the data the run trained on)")
    parser.add_argument("--clips", type=train_type("clips"), default=None,
                        help="sequences to generate or keep (default: as in the run)")
    parser.add_argument("--seed", type=train_type("seed"), default=None,
                        help="seed of generated data (default: as in the run)")
    parser.add_argument("--split", choices=("auto", "val", "all"), default="auto",
                        help="val: the run's held-out clips (its own data only); all: every "
                             "clip; auto (default): val on the run's own data, else all")
    parser.add_argument("--frames-in", type=train_type("frames_in"), default=None,
                        help="frames the model sees (default: as in the run, or 10)")
    parser.add_argument("--frames-out", type=train_type("frames_out"), default=None,
                        help="frames to predict (default: as in the run, or 10)")
    parser.add_argument("--batch-size", type=train_type("batch_size"), default=16)
    parser.add_argument("--device", default="cpu", choices=DEVICES)
    parser.add_argument("--conv", default="numpy", choices=backend_names())  # the registry's
    parser.add_argument("--ssim", default=metrics.DEFAULT_SSIM, choices=metrics.SSIM_VARIANTS,
                        help="gaussian (default): Wang et al.'s SSIM, an 11x11 Gaussian window "
                             "of sigma 1.5, data range 1; uniform: OpenSTL's, scikit-image's "
                             "default 7x7 uniform window with sample covariances and data "
                             "range 2, to compare with OpenSTL's tables")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the results as JSON")
    parser.add_argument("--png", default=None, metavar="FILE",
                        help="also draw inputs, truth and predictions of four clips")
    return parser


def load_params(path: str | Path) -> tuple[dict, dict, Path]:
    """(params, stored metadata, file) from a checkpoint file or a run folder.

    Parameters are the checkpoint's "param/<name>" arrays (runtime/train.py's
    naming); a folder means its newest checkpoint that verifies.
    """
    from convc.runtime.checkpoint import latest_valid_checkpoint, load_checkpoint

    path = Path(path)
    if path.is_dir():
        found = latest_valid_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: no valid checkpoint in this folder")
        path, arrays, meta = found
    else:
        arrays, meta = load_checkpoint(path)
    params = {key.partition("/")[2]: value for key, value in sorted(arrays.items())
              if key.startswith("param/")}
    if not params:
        raise CheckpointError(f"{path}: holds no parameters (no 'param/<name>' arrays)")
    return params, meta, path


def _full_clips(dataset, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whole clips as full frames from a dataset.Dataset's (inputs, targets) pair.

    Forecast targets follow the inputs; next-frame targets are the inputs
    shifted by one, so only their last frame is new.
    """
    seq = np.concatenate([x, y if dataset.task == "forecast" else y[:, -1:]], axis=1)
    return D.unpatch(seq, dataset.patch) if dataset.patch > 1 else seq


def evaluation_data(mod, run_config: dict, args, frames_in: int, frames_out: int
                    ) -> tuple[np.ndarray, np.ndarray, str]:
    """(clips to evaluate, training clips, which clips were chosen), as full frames.

    The run's clips are remade from its settings by runtime/dataset.py's own
    prepare_data (same generator seed, same split), so the mean-frame
    baseline is the run's and "val" really is held out. Clips are made
    frames_in + frames_out frames long; for a next-frame model that is
    longer than it trained on, which keeps the same clips, since the
    generator draws every clip's glyphs and motion before its frames.
    """
    from convc.runtime.config import DEFAULTS
    from convc.runtime.dataset import prepare_data

    cfg = dict(DEFAULTS)
    cfg.update({k: v for k, v in run_config.items() if k in cfg})
    if mod.MODEL.get("task") == "forecast":
        cfg["frames_in"], cfg["frames_out"] = frames_in, frames_out
    else:
        cfg["frames_in"], cfg["frames_out"] = frames_in + frames_out - 1, None
    run = prepare_data(mod.MODEL, cfg)
    train_clips = _full_clips(run, run.train_x, run.train_y)

    spec = args.data if args.data is not None else cfg["data"]
    same = (spec == cfg["data"] and args.clips in (None, cfg["clips"])
            and args.seed in (None, cfg["seed"]))
    split = args.split
    if split == "auto":
        split = "val" if same and len(run.val_x) else "all"
    if split == "val":
        if not same:
            raise ConvcError("--split val needs the data the run trained on (leave --data, "
                             "--clips and --seed out, or equal to the run's)")
        if not len(run.val_x):
            raise DataError("the run held out no clips (val_fraction 0); use --split all")
        return (_full_clips(run, run.val_x, run.val_y), train_clips,
                f"the run's held-out clips of {spec}")
    other = {**cfg, "data": spec, "val_fraction": 0.0}
    if args.clips is not None:
        other["clips"] = args.clips
    if args.seed is not None:
        other["seed"] = args.seed
    everything = prepare_data(mod.MODEL, other)
    including = " (the training clips among them)" if same else ""
    return (_full_clips(everything, everything.train_x, everything.train_y), train_clips,
            f"every clip of {spec}{including}")


def run_eval(args) -> dict[str, Any]:
    """`convc eval` without the printing: load, predict, score; returns the results."""
    from convc.runtime import loader
    from convc.runtime.atomic import check_output
    from convc.runtime.backend import get_backend

    for out in (args.json, args.png):  # refused before the work, not after it
        if out:
            check_output(out, _inputs(args))
    mod = loader.load(args.spec, model=args.model)
    params, meta, where = load_params(args.checkpoint)
    # names and shapes; evaluating a diverged run's parameters is allowed
    check_params(mod.MODEL, params, str(where), allow_nonfinite=True)
    user = meta.get("user") or {}
    if user.get("model") not in (None, mod.MODEL["name"]):
        raise ConvcError(f"{where} was written by model {user.get('model')!r}, "
                         f"not {mod.MODEL['name']!r}")
    run_config = user.get("config") or {}
    forecast = mod.MODEL.get("task") == "forecast"
    fi = args.frames_in or run_config.get("frames_in") or DEFAULT_FRAMES
    fo = args.frames_out or (run_config.get("frames_out") if forecast else None) \
        or DEFAULT_FRAMES
    clips, train_clips, chosen = evaluation_data(mod, run_config, args, fi, fo)

    B = get_backend(args.device, args.conv)
    params = {name: B.asarray(value) for name, value in params.items()}
    results = evaluate_model(mod, params, clips, fi, fo, batch_size=args.batch_size,
                             train_clips=train_clips, backend=B,
                             ssim_variant=getattr(args, "ssim", metrics.DEFAULT_SSIM))
    results.update({"checkpoint": str(where), "step": meta.get("step"), "data": chosen,
                    "model_name": mod.MODEL["name"]})
    if args.png:
        from convc.runtime import plots

        shown = clips[:4]
        pred = forecast_frames(mod, params, shown[:, :fi], fo, batch_size=args.batch_size,
                               backend=B)
        plots.save_frames_png(args.png, shown[:, :fi], shown[:, fi:fi + fo], pred,
                              title=f"{mod.MODEL['name']} at step {meta.get('step')}")
    if args.json:
        from convc.runtime.atomic import write_output

        write_output(args.json, json.dumps(results, indent=1, sort_keys=True) + "\n",
                     protected=_inputs(args))
    return results


def _inputs(args) -> tuple[str, ...]:
    """The files `convc eval` reads, which its --json and --png never replace."""
    return tuple(str(p) for p in (args.spec, args.checkpoint, args.data) if p)


def main_eval(args) -> int:
    """Print `convc eval`'s table. Returns 0: a model that loses to a baseline is a
    result, not an error; a note on stderr says so."""
    results = run_eval(args)
    print(f"{results['model_name']} at step {results['step']} ({results['checkpoint']})")
    print(f"evaluated on {results['data']}")
    print(describe(results))
    print()
    print(format_table(results))
    if not all(math.isfinite(results["model"][m]) for m in METRICS):
        print("note: some of the model's metrics are not finite", file=sys.stderr)
    elif not beats_baselines(results):
        print("note: the model does not beat both baselines on MSE and SSIM", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m convc.runtime.evaluate ...`, the same as `convc eval ...`."""
    parser = add_eval_arguments(argparse.ArgumentParser(
        prog="convc eval", description="Score a trained model's forecasts beside two baselines."))
    args = parser.parse_args(argv)
    try:
        return main_eval(args)
    except ConvcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Does the Shi et al. 2015 encoder-forecaster learn? Train it for a fixed time, then score it.

    .venv/bin/python bench/quality.py                 # shi2015_small, 15 minutes, CPU
    .venv/bin/python bench/quality.py --minutes 2     # a quick look
    .venv/bin/python bench/quality.py --full --device gpu --minutes 60   # the paper's model

Trains examples/shi2015_small.cell (or, with --full, the paper-size
examples/shi2015.cell on 64x64 frames) on moving digits that need no
download (runtime/data.synthetic_clips, or sklearn's handwriting with
--data sklearn-digits), with runtime/train.train for a wall-clock budget.
Then it predicts 10 frames from 10 on clips held out from training
(runtime/evaluate) and writes bench/QUALITY.md: the four metrics beside the
copy-last-frame and mean-frame baselines, the command and the date, a
loss-curve PNG and a PNG of predicted against true frames.

The budget is wall-clock time, not steps, because the question the report
answers is "what does this machine get in N minutes"; the number of steps
it took is reported beside it. BLAS is held to --threads threads (default
1): on a small model, more threads on a shared machine made steps slower,
not faster.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

import convc.api as api
from convc.runtime import data as D
from convc.runtime import evaluate as E
from convc.runtime import metrics
from convc.runtime import plots
from convc.runtime.backend import get_backend
from convc.runtime.train import train

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SMALL = ROOT / "examples" / "shi2015_small.cell"
FULL = ROOT / "examples" / "shi2015.cell"
FRAMES_IN = FRAMES_OUT = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=15.0, help="training budget (wall clock)")
    p.add_argument("--full", action="store_true",
                   help="the paper-size model (examples/shi2015.cell, 64x64 frames); "
                        "meant for a GPU machine")
    p.add_argument("--data", default="synthetic:digits",
                   choices=("synthetic:digits", "synthetic:shapes", "sklearn-digits"))
    p.add_argument("--clips", type=int, default=1200,
                   help="clips of 20 frames to generate, before the test split")
    p.add_argument("--test-fraction", type=float, default=1 / 6,
                   help="share of the clips held out for the final evaluation")
    p.add_argument("--batch-size", type=int, default=None, help="default: the model's (16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="BLAS threads")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--ssim", default=metrics.DEFAULT_SSIM, choices=metrics.SSIM_VARIANTS,
                   help="gaussian (default): Wang et al.'s 11x11 Gaussian-window SSIM; "
                        "uniform: OpenSTL's (7x7 uniform window, data range 2)")
    p.add_argument("--out", default=str(ROOT / "runs" / "quality"),
                   help="run folder (checkpoints, log); not part of the report")
    p.add_argument("--report", default=None,
                   help="default: bench/QUALITY.md, or bench/QUALITY_FULL.md with --full")
    args = p.parse_args(argv)
    if args.report is None:
        args.report = str(HERE / ("QUALITY_FULL.md" if args.full else "QUALITY.md"))
    return args


def make_clips(args, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) full-frame clips of FRAMES_IN + FRAMES_OUT frames, split by sequence."""
    clips = D.load_data(args.data, n=args.clips, length=FRAMES_IN + FRAMES_OUT, size=size,
                        seed=args.seed)
    return D.split(clips, args.test_fraction, seed=args.seed + 1)


def _param_count(mod) -> int:
    return sum(int(np.prod(p["shape"])) for p in mod.MODEL["params"].values())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = FULL if args.full else SMALL
    mod = api.load(spec)
    channels, height, _ = mod.MODEL["inputs"]["x"]
    patch = int(round(channels ** 0.5))
    size = height * patch
    train_clips, test_clips = make_clips(args, size)
    print(f"{spec.name}: {_param_count(mod):,} parameters; {len(train_clips)} training and "
          f"{len(test_clips)} test clips of {size}x{size} {args.data}; "
          f"{args.minutes:g} minutes", flush=True)

    budget = args.minutes * 60.0
    start = time.perf_counter()

    def on_step(row: dict) -> bool:
        if row["step"] % 50 == 0 or row.get("val_loss") is not None:
            val = f", val {row['val_loss']:.5f}" if row.get("val_loss") is not None else ""
            print(f"  step {row['step']:5d}  {row['seconds']:7.1f}s  loss {row['loss']:.5f}"
                  f"{val}", flush=True)
        return time.perf_counter() - start < budget

    options = {"batch_size": args.batch_size} if args.batch_size else {}
    result = train(mod, clips=train_clips, steps=10 ** 7, val_fraction=0.05,
                   seed=args.seed, out=args.out, overwrite=True, progress=False,
                   on_step=on_step, threads=args.threads, device=args.device, **options)
    trained = time.perf_counter() - start

    backend = get_backend(args.device)
    results = E.evaluate_model(mod, result.params, test_clips, FRAMES_IN, FRAMES_OUT,
                               batch_size=32, train_clips=train_clips, backend=backend,
                               ssim_variant=args.ssim)
    print(E.format_table(results), flush=True)

    stem = "quality_full" if args.full else "quality"
    # The PNGs go beside the report, which links them by file name.
    loss_png = Path(args.report).parent / f"{stem}_loss.png"
    frames_png = Path(args.report).parent / f"{stem}_frames.png"
    val = result.val_losses
    plots.save_loss_png(loss_png, [r["step"] for r in result.history], result.losses,
                        [s for s, _ in val] or None, [v for _, v in val] or None,
                        title=f"{mod.MODEL['name']}: per-pixel cross-entropy")
    shown = test_clips[:4]
    pred = E.forecast_frames(mod, result.params, shown[:, :FRAMES_IN], FRAMES_OUT,
                             backend=backend)
    plots.save_frames_png(frames_png, shown[:, :FRAMES_IN], shown[:, FRAMES_IN:], pred,
                          title=f"{mod.MODEL['name']} after {result.steps} steps "
                                f"(held-out test clips)")

    report = write_report(args, argv, mod, spec, result, results, trained, train_clips,
                          test_clips, size, loss_png, frames_png)
    verdict = E.beats_baselines(results)
    print(f"wrote {report}; beats both baselines on MSE and SSIM: {'yes' if verdict else 'NO'}")
    return 0 if verdict else 1


def write_report(args, argv, mod, spec: Path, result, results: dict, trained: float,
                 train_clips, test_clips, size: int, loss_png: Path, frames_png: Path) -> Path:
    cfg = result.config
    command = "bench/quality.py" + ("" if not (argv or sys.argv[1:]) else
                                    " " + shlex.join(argv if argv is not None else sys.argv[1:]))
    verdict = E.beats_baselines(results)
    model, copy, mean = results["model"], results["copy_last"], results["mean_frame"]
    horizon = "\n".join(
        f"| {t + 1} | {model['per_frame_mse'][t]:.2f} | {copy['per_frame_mse'][t]:.2f} | "
        f"{mean['per_frame_mse'][t]:.2f} |" for t in range(len(model["per_frame_mse"])))
    last_losses = result.losses[-50:]
    lines = [
        "# Prediction quality of the Shi et al. 2015 encoder-forecaster",
        "",
        f"Written by `{command}` on {datetime.date.today().isoformat()} "
        f"({platform.machine()}, {os.cpu_count()} CPUs, {args.threads} BLAS thread(s), "
        f"device {args.device}). Rerun that command to regenerate this file and its PNGs.",
        "",
        "## What was run",
        "",
        f"- Model: `{os.path.relpath(spec, ROOT)}` ({mod.MODEL['name']}, "
        f"{_param_count(mod):,} parameters): peephole ConvLSTM encoder and forecaster, the "
        "forecaster starting from the encoder's final states with no input of its own, a 1x1 "
        "convolution over the concatenated forecaster states, sigmoid, per-pixel "
        "cross-entropy.",
        f"- Data: `{args.data}` clips of {size}x{size} frames (runtime/data.py, seed "
        f"{args.seed}), {len(train_clips)} for training (5% of them for validation) and "
        f"{len(test_clips)} held out for this evaluation; the model reads them cut into "
        f"{results['patch']}x{results['patch']} patches, {FRAMES_IN} frames in, "
        f"{FRAMES_OUT} predicted.",
        f"- Training: {cfg['optimizer']} (lr {cfg['lr']:g}, decay {cfg['decay']}), batch "
        f"{cfg['batch_size']}, {cfg['dtype']}, clip {cfg['clip']}; {result.steps} steps "
        f"({result.steps * cfg['batch_size']:,} sequences) in {trained / 60:.1f} minutes "
        f"(budget {args.minutes:g}); training loss {np.mean(last_losses):.4f} (mean of the "
        f"last {len(last_losses)} steps), best validation loss "
        + (f"{result.best_val_loss:.4f} at step {result.best_step}."
           if result.best_val_loss is not None else "none."),
        "",
        "## Results on the held-out clips",
        "",
        E.describe(results) + ".",
        "",
        E.format_table(results, markdown=True),
        "",
        f"**Beats both baselines on MSE and SSIM: {'yes' if verdict else 'no'}.**",
        "",
        "MSE per predicted frame (summed over the frame's pixels; error grows with the "
        "horizon):",
        "",
        "| frame | model | copy last input | mean training frame |",
        "|---:|---:|---:|---:|",
        horizon,
        "",
        "MSE, MAE and PSNR follow OpenSTL's conventions (pixels in [0, 1], MSE and MAE "
        "summed per frame, PSNR per frame, all averaged over sequences and frames). "
        + (f"The SSIM column is {E.ssim_label(results)}: scikit-image's default 7x7 "
           "uniform window with sample covariances and data range 2, per frame, as OpenSTL "
           "computes it. " if results["ssim_variant"]["name"] == "uniform" else
           f"The SSIM column is {E.ssim_label(results)}, Wang et al.'s, not comparable with "
           "the 7x7 uniform SSIM of OpenSTL's tables (`--ssim uniform` gives that one). ")
        + "But these clips are synthetic and, without --full, 32x32: the numbers are not "
        "comparable with published Moving MNIST tables, only with the baselines beside them.",
        "",
        f"![loss curve]({loss_png.name})",
        "",
        f"![inputs, truth and predictions of held-out clips]({frames_png.name})",
        "",
    ]
    report = Path(args.report)
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


if __name__ == "__main__":
    sys.exit(main())

"""Pictures of a run: predicted frames next to the truth, and the loss curve.

matplotlib is optional (the "plot" extra), so it is imported inside the
functions that draw. Figures are built with matplotlib's object API on an
Agg canvas, never through pyplot: no global figure state, no GUI backend,
and nothing changes for a caller who has pyplot open for their own plots.
Files are written through convc.runtime.atomic, so an interrupted run or a
full disk never leaves a half-written PNG where the last good one was.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from convc.errors import ConvcError
from convc.runtime.atomic import write_atomic


def _figure(width: float, height: float) -> Any:
    """A new matplotlib Figure on an Agg canvas, or a ConvcError saying how to get one."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConvcError("drawing PNGs needs matplotlib, which is not installed here: "
                         "pip install matplotlib") from exc
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save_atomically(figure: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda stream: figure.savefig(stream, format="png"))
    return path


def _strip(frames: np.ndarray, gap: int = 1) -> np.ndarray:
    """Frames (T, C, H, W) side by side as one image (H, T*(W+gap)-gap[, 3]).

    One image per band keeps the figure to a dozen axes however many frames
    there are; a thin mid-grey gap separates the frames.
    """
    count, channels, height, width = frames.shape
    if channels not in (1, 3):
        raise ValueError(f"can only draw 1 (grey) or 3 (RGB) channels, got {channels}; "
                         f"unpatch the frames first")
    strip = np.full((channels, height, count * (width + gap) - gap), 0.5)
    for t in range(count):
        left = t * (width + gap)
        strip[:, :, left:left + width] = frames[t]
    strip = np.clip(strip, 0.0, 1.0)
    return strip[0] if channels == 1 else strip.transpose(1, 2, 0)


def save_frames_png(
    path: str | os.PathLike,
    inputs: np.ndarray,
    targets: np.ndarray | None,
    preds: np.ndarray,
    max_rows: int = 4,
    title: str | None = None,
) -> Path:
    """Draw input, target and predicted frames for the first few sequences.

    One row per sequence (at most max_rows), three bands side by side:
    the frames the model saw, the frames it should have predicted, and
    what it predicted. Arrays are clip sets (N, T, C, H, W) in [0, 1]
    with 1 or 3 channels; targets may be None when there is no truth.
    """
    bands = [("input", inputs), ("target", targets), ("prediction", preds)]
    bands = [(name, np.asarray(frames)) for name, frames in bands if frames is not None]
    for name, frames in bands:
        if frames.ndim != 5:
            raise ValueError(f"{name} frames: expected (N, T, C, H, W), got {frames.shape}")
    rows = min(max_rows, *(len(frames) for _, frames in bands))
    height, width = inputs.shape[-2:]
    lengths = [frames.shape[1] for _, frames in bands]
    frame_inches = 0.55
    figure = _figure(
        width=max(4.0, frame_inches * (sum(lengths) + len(bands)) * width / height + 0.8),
        height=frame_inches * rows + 0.9 + (0.3 if title else 0.0),
    )
    grid = figure.add_gridspec(rows, len(bands), width_ratios=lengths, wspace=0.05, hspace=0.15)
    for row in range(rows):
        for column, (name, frames) in enumerate(bands):
            axes = figure.add_subplot(grid[row, column])
            axes.imshow(_strip(frames[row]), cmap="gray", vmin=0.0, vmax=1.0,
                        interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            if row == 0:
                axes.set_title(f"{name} ({frames.shape[1]} frames)", fontsize=9)
            if column == 0:
                axes.set_ylabel(f"seq {row}", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    return _save_atomically(figure, path)


def save_loss_png(
    path: str | os.PathLike,
    steps: Sequence[float],
    losses: Sequence[float],
    val_steps: Sequence[float] | None = None,
    val_losses: Sequence[float] | None = None,
    title: str | None = None,
) -> Path:
    """Draw the training loss (and validation loss, if given) against the step.

    The y axis turns logarithmic when the positive losses span more than
    two decades, where a linear axis would flatten everything after the
    first few hundred steps.
    """
    steps = np.asarray(steps, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    if steps.shape != losses.shape:
        raise ValueError(f"{len(steps)} steps but {len(losses)} losses")
    figure = _figure(6.4, 4.0)
    axes = figure.add_subplot(1, 1, 1)
    axes.plot(steps, losses, label="train", linewidth=1.0)
    shown = [losses]
    if val_steps is not None and val_losses is not None:
        val_steps = np.asarray(val_steps, dtype=np.float64)
        val_losses = np.asarray(val_losses, dtype=np.float64)
        if val_steps.shape != val_losses.shape:
            raise ValueError(f"{len(val_steps)} validation steps but {len(val_losses)} losses")
        axes.plot(val_steps, val_losses, "o-", label="validation", markersize=3, linewidth=1.0)
        shown.append(val_losses)
    values = np.concatenate(shown)
    positive = values[np.isfinite(values) & (values > 0)]
    if len(positive) and positive.max() / positive.min() > 100.0:
        axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(True, alpha=0.3)
    axes.legend()
    if title:
        axes.set_title(title)
    figure.tight_layout()
    return _save_atomically(figure, path)

"""Tests for convc.runtime.plots: the PNGs exist, are images, and are not blank."""

import sys

import numpy as np
import pytest

from convc.errors import ConvcError

pytest.importorskip("matplotlib", reason="matplotlib not installed (optional plot extra)")

from convc.runtime import plots  # noqa: E402
from convc.runtime.data import synthetic_clips  # noqa: E402


def _read_png(path):
    from matplotlib.image import imread
    return imread(path)


def test_save_frames_png(tmp_path):
    clips = synthetic_clips(5, 6, size=32, seed=0)
    inputs, targets = clips[:, :3], clips[:, 3:]
    preds = np.clip(targets + 0.1, 0, 1)
    path = plots.save_frames_png(tmp_path / "sub" / "frames.png", inputs, targets, preds,
                                 max_rows=3, title="epoch 1")
    assert path == tmp_path / "sub" / "frames.png"
    image = _read_png(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > image.shape[0]
    assert image.min() < image.max()
    assert [p.name for p in path.parent.iterdir()] == ["frames.png"]  # no temp files left


def test_save_frames_png_without_targets(tmp_path):
    clips = synthetic_clips(1, 4, size=32, seed=1)
    path = plots.save_frames_png(tmp_path / "gen.png", clips[:, :2], None, clips[:, 2:])
    assert _read_png(path).shape[1] > 0


def test_save_loss_png(tmp_path):
    steps = np.arange(1, 201)
    losses = 10.0 / steps ** 1.5   # spans more than two decades -> log axis
    path = plots.save_loss_png(tmp_path / "loss.png", steps, losses,
                               val_steps=[50, 100, 150, 200], val_losses=[0.05, 0.01, 0.008, 0.007],
                               title="ConvLSTM")
    image = _read_png(path)
    assert image.ndim == 3 and image.shape[:2] == (400, 640)
    assert image.min() < image.max()
    # Overwriting an existing file works and keeps a valid PNG.
    plots.save_loss_png(path, [1, 2, 3], [3.0, 2.0, 1.0])
    assert _read_png(path).shape[:2] == (400, 640)


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ConvcError, match="pip install matplotlib"):
        plots.save_loss_png(tmp_path / "loss.png", [1, 2], [1.0, 0.5])

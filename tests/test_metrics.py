"""Tests for convc.runtime.metrics against values computed by hand."""

import math

import numpy as np
import pytest

from convc.runtime import metrics


def _tiny():
    """Two sequences, two frames, one 2x2 channel; errors chosen to add up by hand."""
    true = np.zeros((2, 2, 1, 2, 2))
    pred = np.zeros((2, 2, 1, 2, 2))
    pred[0, 0, 0] = [[0.5, 0.0], [0.0, 0.0]]   # seq 0 frame 0: errors 0.5
    pred[0, 1, 0] = [[0.5, 0.5], [0.0, 0.0]]   # seq 0 frame 1: 0.5, 0.5
    pred[1, 0, 0] = [[1.0, 0.0], [0.0, 0.0]]   # seq 1 frame 0: 1.0
    # seq 1 frame 1: exact
    return pred, true


def test_mse_mae_by_hand():
    pred, true = _tiny()
    # Squared error summed per frame: 0.25, 0.5, 1.0, 0.0 -> mean 1.75 / 4.
    assert metrics.frame_mse(pred, true) == pytest.approx(1.75 / 4)
    # Per frame index, averaged over the two sequences: (0.25+1)/2, (0.5+0)/2.
    np.testing.assert_allclose(metrics.per_frame_mse(pred, true), [0.625, 0.25])
    # Absolute error summed per frame: 0.5, 1.0, 1.0, 0.0 -> mean 2.5 / 4.
    assert metrics.frame_mae(pred, true) == pytest.approx(2.5 / 4)


def test_psnr_by_hand_with_cap():
    pred, true = _tiny()
    # Per-frame MSE is the mean over 4 pixels: 0.0625, 0.125, 0.25, 0 (-> 100 dB cap).
    expected = np.mean([-10 * math.log10(0.0625), -10 * math.log10(0.125),
                        -10 * math.log10(0.25), 100.0])
    assert metrics.psnr(pred, true) == pytest.approx(expected)
    assert metrics.psnr(true, true) == pytest.approx(metrics.PSNR_CAP_DB)


def test_shape_mismatch_is_rejected():
    pred, true = _tiny()
    with pytest.raises(ValueError, match="differs"):
        metrics.frame_mse(pred[:, :1], true)
    with pytest.raises(ValueError, match="N, T, C, H, W"):
        metrics.frame_mse(pred[0], true[0])


def _frames(seed=0, shape=(2, 3, 1, 24, 20)):
    return np.random.default_rng(seed).random(shape)


def test_ssim_identity_symmetry_and_noise():
    clean = _frames()
    assert metrics.ssim(clean, clean) == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(1)
    noisy = np.clip(clean + 0.1 * rng.standard_normal(clean.shape), 0, 1)
    assert metrics.ssim(clean, noisy) == pytest.approx(metrics.ssim(noisy, clean), abs=1e-12)
    scores = [metrics.ssim(clean, np.clip(clean + s * rng.standard_normal(clean.shape), 0, 1))
              for s in (0.02, 0.1, 0.3)]
    assert 1.0 > scores[0] > scores[1] > scores[2]


def test_ssim_chunking_does_not_change_the_result():
    a, b = _frames(2, (5, 2, 1, 16, 16)), _frames(3, (5, 2, 1, 16, 16))
    assert metrics.ssim(a, b, chunk=2) == pytest.approx(metrics.ssim(a, b), abs=1e-12)


def test_ssim_needs_a_full_window():
    with pytest.raises(ValueError, match="11x11"):
        metrics.ssim(np.zeros((1, 1, 1, 8, 8)), np.zeros((1, 1, 1, 8, 8)))


def test_ssim_matches_scikit_image():
    skm = pytest.importorskip("skimage.metrics",
                              reason="scikit-image not installed (optional cross-check)")
    a = _frames(4, (2, 2, 2, 23, 17))
    b = np.clip(a + 0.15 * np.random.default_rng(5).standard_normal(a.shape), 0, 1)
    reference = np.mean([
        skm.structural_similarity(a[n, t, c], b[n, t, c], gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, data_range=1.0)
        for n in range(2) for t in range(2) for c in range(2)
    ])
    assert metrics.ssim(a, b) == pytest.approx(reference, abs=1e-6)


def test_baselines():
    inputs = np.arange(2 * 3).reshape(2, 3, 1, 1, 1).astype(np.float32)
    copied = metrics.baseline_copy_last(inputs, 4)
    assert copied.shape == (2, 4, 1, 1, 1)
    assert copied[:, :, 0, 0, 0].tolist() == [[2, 2, 2, 2], [5, 5, 5, 5]]

    mean = metrics.baseline_mean_frame(inputs, 2)
    assert mean.shape == (2, 2, 1, 1, 1) and mean.dtype == np.float32
    assert np.all(mean == 2.5)
    assert metrics.baseline_mean_frame(inputs, 2, n_sequences=5).shape == (5, 2, 1, 1, 1)


def test_evaluate_keys_and_perfect_prediction():
    clips = _frames(6, (2, 2, 1, 16, 16))
    scores = metrics.evaluate(clips, clips)
    assert set(scores) == {"mse", "mae", "ssim", "psnr"}
    assert all(isinstance(v, float) for v in scores.values())
    assert scores["mse"] == 0.0 and scores["mae"] == 0.0
    assert scores["ssim"] == pytest.approx(1.0)
    assert scores["psnr"] == pytest.approx(metrics.PSNR_CAP_DB)

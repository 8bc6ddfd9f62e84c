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


def _skimage_metrics():
    return pytest.importorskip(
        "skimage.metrics", reason="scikit-image is not installed (the SSIM oracle; "
        "`make venv` installs it with the dev extra)")


def _skimage_ssim(a, b, variant, data_range=None):
    """scikit-image's SSIM of each frame, channel by channel, averaged over everything."""
    skm = _skimage_metrics()
    if variant == "gaussian":
        options = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                       data_range=1.0 if data_range is None else data_range)
    else:
        # OpenSTL's call: structural_similarity(pred.swapaxes(0, 2), true.swapaxes(0, 2),
        # multichannel=True) on float (C, H, W) frames, i.e. the defaults (7x7 uniform
        # window, sample covariance) and, under the scikit-image <= 0.19.3 it pins, the
        # float data range 2 (newer versions refuse float frames without a data_range).
        options = dict(data_range=2.0 if data_range is None else data_range)
    return np.mean([skm.structural_similarity(a[n, t].swapaxes(0, 2), b[n, t].swapaxes(0, 2),
                                              channel_axis=-1, **options)
                    for n in range(a.shape[0]) for t in range(a.shape[1])])


def _noisy_pair(seed, shape, scale=1.0):
    a = _frames(seed, shape)
    b = np.clip(a + 0.15 * np.random.default_rng(seed + 1).standard_normal(a.shape), 0, 1)
    return a * scale, b * scale


@pytest.mark.parametrize("variant", ["gaussian", "uniform"])
@pytest.mark.parametrize("data_range", [None, 1.0, 2.0])
def test_ssim_variants_match_scikit_image(variant, data_range):
    a, b = _noisy_pair(4, (2, 2, 2, 23, 17))
    reference = _skimage_ssim(a, b, variant, data_range)
    ours = metrics.ssim(a, b, variant=variant, data_range=data_range)
    assert ours == pytest.approx(reference, abs=1e-6)


@pytest.mark.parametrize("variant", ["gaussian", "uniform"])
def test_ssim_data_range_scales_with_the_pixels(variant):
    """Frames in [0, 255] with data range 255 are frames in [0, 1] with data range 1."""
    # low contrast, so that the constants (K * data range)^2 weigh
    rng = np.random.default_rng(6)
    a = 0.5 + 0.03 * rng.random((1, 2, 1, 16, 16))
    b = a + 0.01 * rng.standard_normal(a.shape)
    big_a, big_b = a * 255.0, b * 255.0
    reference = _skimage_ssim(big_a, big_b, variant, 255.0)
    assert metrics.ssim(big_a, big_b, variant=variant, data_range=255.0) == pytest.approx(
        reference, abs=1e-6)
    assert metrics.ssim(a, b, variant=variant, data_range=1.0) == pytest.approx(
        reference, abs=1e-6)
    # the variant's own range is not 255: without data_range the numbers differ
    assert metrics.ssim(big_a, big_b, variant=variant) != pytest.approx(reference, abs=0.05)


def test_ssim_frames_smaller_than_the_window():
    """Frames of 7 to 10 pixels fit the uniform window only; below 7, neither. scikit-image
    refuses the same frames."""
    skm = _skimage_metrics()
    a, b = _noisy_pair(8, (2, 1, 1, 8, 9))
    assert metrics.ssim(a, b, variant="uniform") == pytest.approx(
        _skimage_ssim(a, b, "uniform"), abs=1e-6)
    edge_a, edge_b = _noisy_pair(9, (1, 1, 1, 7, 7))  # exactly one window
    assert metrics.ssim(edge_a, edge_b, variant="uniform") == pytest.approx(
        _skimage_ssim(edge_a, edge_b, "uniform"), abs=1e-6)
    with pytest.raises(ValueError, match="11x11"):
        metrics.ssim(a, b, variant="gaussian")
    with pytest.raises(ValueError):
        skm.structural_similarity(a[0, 0, 0], b[0, 0, 0], gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, data_range=1.0)
    small_a, small_b = _noisy_pair(10, (1, 1, 1, 6, 12))
    with pytest.raises(ValueError, match="7x7"):
        metrics.ssim(small_a, small_b, variant="uniform")
    with pytest.raises(ValueError):
        skm.structural_similarity(small_a[0, 0, 0], small_b[0, 0, 0], data_range=2.0)


def test_ssim_variant_labels_and_bad_arguments():
    gaussian, uniform = metrics.ssim_info("gaussian"), metrics.ssim_info("uniform")
    assert gaussian["label"] == "SSIM (gaussian 11x11, sigma 1.5)"
    assert uniform["label"] == "SSIM (uniform 7x7, as OpenSTL)"
    assert (gaussian["window"], gaussian["data_range"], uniform["window"],
            uniform["data_range"]) == (11, 1.0, 7, 2.0)
    assert metrics.ssim_info("gaussian", 255)["label"] == (
        "SSIM (gaussian 11x11, sigma 1.5, data range 255)")
    # another data range is no longer OpenSTL's SSIM, and the label stops saying so
    assert metrics.ssim_info("uniform", 1)["label"] == "SSIM (uniform 7x7, data range 1)"
    a, b = _noisy_pair(11, (1, 1, 1, 12, 12))
    with pytest.raises(ValueError, match="gaussian, uniform"):
        metrics.ssim(a, b, variant="box")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="data_range"):
            metrics.ssim(a, b, data_range=bad)
    # the two variants are different numbers on the same frames
    assert metrics.ssim(a, b) != pytest.approx(metrics.ssim(a, b, variant="uniform"), abs=1e-3)
    assert metrics.evaluate(a, b, ssim_variant="uniform")["ssim"] == metrics.ssim(
        a, b, variant="uniform")


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

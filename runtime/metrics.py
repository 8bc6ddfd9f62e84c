"""Prediction quality: MSE, MAE, PSNR and SSIM, plus two baselines to beat.

The conventions are OpenSTL's (Tan et al., 2023), so numbers reported by
convc can be set next to published Moving MNIST tables: pixels in [0, 1];
MSE and MAE are summed over the pixels of a frame (C*H*W) and averaged over
sequences and frames; PSNR and SSIM are computed per frame and averaged.

Every function takes clip sets shaped (N, T, C, H, W) and computes in
float64 whatever the input precision, so float32 predictions do not lose
digits in the sums.
"""

from __future__ import annotations

import numpy as np

# PSNR of a perfect prediction is infinite; it is capped so that one exact
# frame cannot make an average infinite. 100 dB is an MSE of 1e-10.
PSNR_CAP_DB = 100.0

# SSIM constants of Wang et al. (2004), as used by scikit-image and OpenSTL.
SSIM_SIGMA = 1.5
SSIM_WINDOW = 11  # 2 * int(3.5 * sigma + 0.5) + 1: scikit-image's truncate=3.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _pair(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    true = np.asarray(true)
    if pred.shape != true.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {true.shape}")
    if pred.ndim != 5:
        raise ValueError(f"expected clip sets shaped (N, T, C, H, W), got {pred.shape}")
    return pred.astype(np.float64, copy=False), true.astype(np.float64, copy=False)


def per_frame_mse(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Squared error summed over each frame's pixels, averaged over sequences: shape (T,).

    Error usually grows with the prediction horizon; this shows how fast.
    """
    pred, true = _pair(pred, true)
    return np.square(pred - true).sum(axis=(2, 3, 4)).mean(axis=0)


def frame_mse(pred: np.ndarray, true: np.ndarray) -> float:
    """OpenSTL's MSE: squared error summed over C*H*W, averaged over sequences and frames."""
    return float(per_frame_mse(pred, true).mean())


def frame_mae(pred: np.ndarray, true: np.ndarray) -> float:
    """OpenSTL's MAE: absolute error summed over C*H*W, averaged over sequences and frames."""
    pred, true = _pair(pred, true)
    return float(np.abs(pred - true).sum(axis=(2, 3, 4)).mean())


def psnr(pred: np.ndarray, true: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for data range 1, per frame, averaged.

    Per frame: 20*log10(1) - 10*log10(MSE), with MSE the mean (not sum)
    over C*H*W. A frame predicted exactly scores PSNR_CAP_DB (100 dB)
    instead of infinity.
    """
    pred, true = _pair(pred, true)
    mse = np.square(pred - true).mean(axis=(2, 3, 4))
    floor = 10.0 ** (-PSNR_CAP_DB / 10.0)
    per_frame = 20.0 * np.log10(1.0) - 10.0 * np.log10(np.maximum(mse, floor))
    return float(per_frame.mean())


def _gaussian_window() -> np.ndarray:
    radius = SSIM_WINDOW // 2
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    window = np.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return window / window.sum()


def _band(length: int, window: np.ndarray) -> np.ndarray:
    """The (length - w + 1, length) matrix whose rows slide `window` along an axis."""
    size = len(window)
    band = np.zeros((length - size + 1, length))
    for row in range(length - size + 1):
        band[row, row:row + size] = window
    return band


def _filter_valid(images: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Separable Gaussian filter over the last two axes, keeping only full windows.

    scikit-image filters with reflected borders and then crops
    (window - 1) / 2 pixels from each side before averaging, which leaves
    exactly the pixels whose window lies inside the frame: the 'valid' part
    computed here, so no border mode is needed at all. Written as two
    products with banded matrices because BLAS does that several times
    faster than summing eleven shifted slices.
    """
    return rows @ images @ cols.T


def _ssim_map(x: np.ndarray, y: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The SSIM index at every fully covered pixel of x and y (..., H-10, W-10)."""
    c1 = (SSIM_K1 * 1.0) ** 2  # data range 1
    c2 = (SSIM_K2 * 1.0) ** 2
    mu_x = _filter_valid(x, rows, cols)
    mu_y = _filter_valid(y, rows, cols)
    # Population (not sample) covariances: use_sample_covariance=False.
    var_x = _filter_valid(x * x, rows, cols) - mu_x * mu_x
    var_y = _filter_valid(y * y, rows, cols) - mu_y * mu_y
    cov_xy = _filter_valid(x * y, rows, cols) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return numerator / denominator


def ssim(pred: np.ndarray, true: np.ndarray, chunk: int = 64) -> float:
    """Mean structural similarity over frames and channels (1.0 means identical).

    Matches skimage.metrics.structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1) per frame and
    channel, averaged. Frames must be at least 11x11 (the window): compute
    SSIM on unpatched frames. Sequences are processed `chunk` at a time to
    bound the memory of the five filtered copies.
    """
    pred, true = _pair(pred, true)
    height, width = pred.shape[-2:]
    if height < SSIM_WINDOW or width < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} "
                         f"pixels, got {height}x{width} (unpatch first?)")
    window = _gaussian_window()
    rows, cols = _band(height, window), _band(width, window)
    # Every frame's map has the same number of pixels, so the mean of
    # per-frame means is the mean of all map values: sum them chunk by chunk.
    total = 0.0
    count = 0
    for start in range(0, len(pred), chunk):
        ssim_map = _ssim_map(pred[start:start + chunk], true[start:start + chunk], rows, cols)
        total += float(ssim_map.sum())
        count += ssim_map.size
    return total / count


def baseline_copy_last(inputs: np.ndarray, n_out: int) -> np.ndarray:
    """Predict that nothing moves: the last input frame repeated n_out times.

    A model that does not beat this has not learnt motion.
    """
    if inputs.ndim != 5 or inputs.shape[1] < 1:
        raise ValueError(f"expected inputs shaped (N, T, C, H, W) with T >= 1, got {inputs.shape}")
    return np.repeat(inputs[:, -1:], n_out, axis=1)


def baseline_mean_frame(
    clips: np.ndarray, n_out: int, n_sequences: int | None = None
) -> np.ndarray:
    """Predict the average frame of `clips` (over sequences and frames), repeated.

    Pass the training clips and n_sequences=len(test targets) for the
    classic "predict the data mean" baseline; by default one copy per
    sequence of `clips`. Returns (n_sequences, n_out, C, H, W).
    """
    if clips.ndim != 5:
        raise ValueError(f"expected clips shaped (N, T, C, H, W), got {clips.shape}")
    mean = clips.mean(axis=(0, 1), dtype=np.float64).astype(clips.dtype)
    count = len(clips) if n_sequences is None else n_sequences
    return np.ascontiguousarray(np.broadcast_to(mean, (count, n_out) + mean.shape))


def evaluate(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """All four metrics at once: {"mse", "mae", "ssim", "psnr"} as plain floats."""
    return {
        "mse": frame_mse(pred, true),
        "mae": frame_mae(pred, true),
        "ssim": ssim(pred, true),
        "psnr": psnr(pred, true),
    }

"""Prediction quality: MSE, MAE, PSNR and SSIM, plus two baselines to beat.

MSE, MAE and PSNR follow OpenSTL's `metric()` (Tan et al., 2023,
openstl/core/metrics.py), so they can be set next to OpenSTL's published
Moving MNIST tables: pixels in [0, 1]; MSE and MAE are summed over the
pixels of a frame (C*H*W) and averaged over sequences and frames; PSNR is
computed per frame, from the frame's mean squared error, and averaged (a
frame predicted exactly scores PSNR_CAP_DB here, infinity in OpenSTL).

SSIM comes in two variants, and only one of them is OpenSTL's:

* "uniform" (SSIM (uniform 7x7, as OpenSTL)) is what OpenSTL's tables
  report. OpenSTL calls scikit-image's structural_similarity with its
  defaults, under the scikit-image <= 0.19.3 it requires: a 7x7 uniform
  window, sample covariances (divided by 49 - 1), and, since the frames are
  floating point and no data_range is passed, a data range of 2 (the
  float range [-1, 1] of skimage.util.dtype_range); per channel, then
  averaged over channels, frames and sequences. (OpenSTL also clips the
  predictions to [0, 1] first; convc scores them as they are.)
* "gaussian" (SSIM (gaussian 11x11, sigma 1.5), the default) is Wang et
  al.'s (2004) definition: an 11x11 Gaussian window of sigma 1.5,
  population covariances, data range 1, as scikit-image computes it with
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1. Its numbers are not comparable with OpenSTL's tables
  (they are usually lower than the uniform variant's on the same frames);
  they are with tables that report Wang et al.'s SSIM with its Gaussian
  window at data range 1.

ssim_info() describes a variant (its label is what convc's tables and
JSON print), and `data_range=` overrides a variant's data range.

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
SSIM_UNIFORM_WINDOW = 7  # scikit-image's default win_size without gaussian_weights
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# name: (window, sigma (None: uniform), sample covariance, data range, label)
_SSIM_VARIANTS = {
    "gaussian": (SSIM_WINDOW, SSIM_SIGMA, False, 1.0, "gaussian 11x11, sigma 1.5"),
    "uniform": (SSIM_UNIFORM_WINDOW, None, True, 2.0, "uniform 7x7"),
}
SSIM_VARIANTS = tuple(_SSIM_VARIANTS)
DEFAULT_SSIM = "gaussian"


def ssim_info(variant: str = DEFAULT_SSIM, data_range: float | None = None) -> dict:
    """What ssim(..., variant=, data_range=) computes, as plain values for tables and JSON.

    {"name", "label", "window", "weights", "sigma", "covariance", "data_range",
    "matches"}: label is e.g. "SSIM (gaussian 11x11, sigma 1.5)" or "SSIM
    (uniform 7x7, as OpenSTL)"; a data range other than the variant's own is
    named in it (and the uniform variant is then no longer OpenSTL's).
    """
    if variant not in _SSIM_VARIANTS:
        raise ValueError(f"unknown SSIM variant {variant!r}; use one of "
                         f"{', '.join(SSIM_VARIANTS)}")
    window, sigma, sample, own_range, label = _SSIM_VARIANTS[variant]
    if data_range is None:
        data_range = own_range
    data_range = float(data_range)
    if not (np.isfinite(data_range) and data_range > 0):
        raise ValueError(f"SSIM data_range must be a positive number, got {data_range!r}")
    if data_range != own_range:
        label += f", data range {data_range:g}"
        matches = "scikit-image's structural_similarity with the same settings"
    elif variant == "uniform":
        label += ", as OpenSTL"
        matches = ("OpenSTL's published tables (structural_similarity's defaults under "
                   "scikit-image <= 0.19.3: data range 2 for float frames)")
    else:
        matches = "Wang et al. (2004); not OpenSTL's tables"
    return {"name": variant, "label": f"SSIM ({label})", "window": window,
            "weights": "gaussian" if sigma is not None else "uniform", "sigma": sigma,
            "covariance": "sample (N - 1)" if sample else "population (N)",
            "data_range": data_range, "matches": matches}


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


def _window(variant: str) -> np.ndarray:
    """The variant's 1-D window, normalised to sum 1 (the 2-D one is its outer product)."""
    size, sigma = _SSIM_VARIANTS[variant][:2]
    if sigma is None:
        return np.full(size, 1.0 / size)
    radius = size // 2
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    window = np.exp(-0.5 * (x / sigma) ** 2)
    return window / window.sum()


def _band(length: int, window: np.ndarray) -> np.ndarray:
    """The (length - w + 1, length) matrix whose rows slide `window` along an axis."""
    size = len(window)
    band = np.zeros((length - size + 1, length))
    for row in range(length - size + 1):
        band[row, row:row + size] = window
    return band


def _filter_valid(images: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Separable window filter over the last two axes, keeping only full windows.

    scikit-image filters with reflected borders and then crops
    (window - 1) / 2 pixels from each side before averaging, which leaves
    exactly the pixels whose window lies inside the frame: the 'valid' part
    computed here, so no border mode is needed at all. Written as two
    products with banded matrices because BLAS does that several times
    faster than summing shifted slices.
    """
    return rows @ images @ cols.T


def _ssim_map(x: np.ndarray, y: np.ndarray, rows: np.ndarray, cols: np.ndarray,
              data_range: float, cov_norm: float) -> np.ndarray:
    """The SSIM index at every fully covered pixel of x and y (..., H-w+1, W-w+1)."""
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mu_x = _filter_valid(x, rows, cols)
    mu_y = _filter_valid(y, rows, cols)
    # cov_norm is 1 for population covariances (use_sample_covariance=False),
    # N / (N - 1) over the N = w*w window pixels for sample ones.
    var_x = cov_norm * (_filter_valid(x * x, rows, cols) - mu_x * mu_x)
    var_y = cov_norm * (_filter_valid(y * y, rows, cols) - mu_y * mu_y)
    cov_xy = cov_norm * (_filter_valid(x * y, rows, cols) - mu_x * mu_y)
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return numerator / denominator


def ssim(pred: np.ndarray, true: np.ndarray, chunk: int = 64, variant: str = DEFAULT_SSIM,
         data_range: float | None = None) -> float:
    """Mean structural similarity over frames and channels (1.0 means identical).

    variant "gaussian" (the default) matches
    skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1) per frame and channel,
    averaged: Wang et al.'s SSIM. Variant "uniform" matches
    structural_similarity(win_size=7, data_range=2), i.e. its defaults as
    OpenSTL calls it on float frames (with scikit-image <= 0.19.3, which took
    data range 2 for floats; newer versions refuse floats without one), so
    it is the one to set beside OpenSTL's tables. data_range overrides the
    variant's (1 or 2); the module docstring has the details.

    Frames must be at least as large as the window (11x11 or 7x7), as
    scikit-image requires too: compute SSIM on unpatched frames. Sequences
    are processed `chunk` at a time to bound the memory of the five filtered
    copies.
    """
    info = ssim_info(variant, data_range)
    pred, true = _pair(pred, true)
    height, width = pred.shape[-2:]
    size = info["window"]
    if height < size or width < size:
        raise ValueError(f"SSIM ({variant}) needs frames of at least {size}x{size} "
                         f"pixels, got {height}x{width} (unpatch first?)")
    window = _window(variant)
    rows, cols = _band(height, window), _band(width, window)
    n = size * size
    cov_norm = n / (n - 1) if info["covariance"].startswith("sample") else 1.0
    # Every frame's map has the same number of pixels, so the mean of
    # per-frame means is the mean of all map values: sum them chunk by chunk.
    total = 0.0
    count = 0
    for start in range(0, len(pred), chunk):
        ssim_map = _ssim_map(pred[start:start + chunk], true[start:start + chunk], rows, cols,
                             info["data_range"], cov_norm)
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


def evaluate(pred: np.ndarray, true: np.ndarray, ssim_variant: str = DEFAULT_SSIM
             ) -> dict[str, float]:
    """All four metrics at once: {"mse", "mae", "ssim", "psnr"} as plain floats.

    ssim_variant: "gaussian" or "uniform" (OpenSTL's), see ssim().
    """
    return {
        "mse": frame_mse(pred, true),
        "mae": frame_mae(pred, true),
        "ssim": ssim(pred, true, variant=ssim_variant),
        "psnr": psnr(pred, true),
    }

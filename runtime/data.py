"""Frame-sequence data: built-in generators, file loaders, patching and batching.

Every function here speaks one layout, a *clip set*: a float array shaped
(N, L, C, H, W) (sequences, frames, channels, height, width) with values in
[0, 1], float32 unless asked otherwise. Loaders convert whatever is on disk
into that layout once, so the training loop and the metrics never have to
guess which axis is time.

The built-in generators need no download: objects (digit glyphs or simple
shapes) move with constant velocity on a black canvas and bounce off its
borders, the recipe of Moving MNIST (Srivastava et al., 2015).

Problems with the data itself, whether read from a file or asked of a
generator, raise `DataError` so that the command line prints one clear
message instead of a traceback.
"""

from __future__ import annotations

import functools
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from convc.errors import DataError

# The layout of the standard Moving MNIST file, mnist_test_seq.npy, in words.
MOVING_MNIST_LAYOUT = "(T, N, 64, 64) uint8 (time first, e.g. (20, 10000, 64, 64))"

# A 5x7 bitmap font for the digits 0-9, one string per row. It is the only
# glyph source that ships with convc, so "synthetic:digits" works offline.
_DIGIT_FONT_5X7 = {
    0: [".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."],
    1: ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."],
    2: [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"],
    3: ["#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."],
    4: ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."],
    5: ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."],
    6: ["..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."],
    7: ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."],
    8: [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."],
    9: [".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."],
}

SYNTHETIC_KINDS = ("digits", "shapes")


# ---------------------------------------------------------------------------
# Glyphs
# ---------------------------------------------------------------------------


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(2 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a stack of small images (..., H, W), growing each by the radius.

    The images grow instead of being cropped so that a stroke touching the
    edge fades out instead of being cut off. The separable filter is a sum
    of shifted slices, which handles a whole stack of glyphs at once.
    """
    kernel = _gaussian_kernel(sigma)
    radius = len(kernel) // 2
    height, width = images.shape[-2:]
    pad = [(0, 0)] * (images.ndim - 2) + [(2 * radius, 2 * radius)] * 2
    padded = np.pad(images.astype(np.float64), pad)
    rows = sum(w * padded[..., i:i + height + 2 * radius, :] for i, w in enumerate(kernel))
    return sum(w * rows[..., :, i:i + width + 2 * radius] for i, w in enumerate(kernel))


def _upscale(bitmaps: np.ndarray, scale: int) -> np.ndarray:
    """Scale a stack of small bitmaps (k, h, w) up by an integer factor and soften them.

    Nearest-neighbour scaling alone gives blocky glyphs; a blur of about a
    third of a source pixel rounds them into strokes, like pen on paper.
    Each glyph is scaled to peak 1, faint blur tails are cut to exact 0 so
    the background stays black, and the margin that is black in every
    glyph is trimmed so that the objects can reach the borders.
    """
    big = bitmaps.astype(np.float64).repeat(scale, axis=-2).repeat(scale, axis=-1)
    soft = _blur(big, sigma=max(0.5, 0.35 * scale))
    soft /= soft.max(axis=(-2, -1), keepdims=True)
    soft[soft < 0.02] = 0.0
    ink_rows = np.flatnonzero(soft.any(axis=(0, 2)))
    ink_cols = np.flatnonzero(soft.any(axis=(0, 1)))
    trimmed = soft[:, ink_rows[0]:ink_rows[-1] + 1, ink_cols[0]:ink_cols[-1] + 1]
    return np.pad(trimmed, [(0, 0), (1, 1), (1, 1)])


@functools.lru_cache(maxsize=None)
def _digit_glyphs(size: int) -> np.ndarray:
    """The ten font digits, scaled to about 0.4 * size pixels tall: (10, gh, gw)."""
    scale = max(1, int(0.4 * size / 7))
    bitmaps = np.array([[[ch == "#" for ch in row] for row in _DIGIT_FONT_5X7[digit]]
                        for digit in range(10)])
    bank = _upscale(bitmaps, scale)
    bank.setflags(write=False)
    return bank


@functools.lru_cache(maxsize=None)
def _shape_glyphs(size: int) -> np.ndarray:
    """A filled square, circle and triangle, about 0.35 * size pixels wide: (3, s, s).

    Drawn by 4x supersampling so that the edges are anti-aliased the same
    way at every canvas size.
    """
    side = max(5, int(round(0.35 * size)))
    sub = 4
    centres = (np.arange(side * sub) + 0.5) / (side * sub) * 2.0 - 1.0  # in (-1, 1)
    y, x = np.meshgrid(centres, centres, indexing="ij")
    square = (np.abs(x) <= 0.8) & (np.abs(y) <= 0.8)
    circle = x**2 + y**2 <= 0.85**2
    # Apex at the top (y = -0.8), base along y = +0.8 from x = -0.8 to 0.8.
    triangle = (y <= 0.8) & (np.abs(x) <= (y + 0.8) / 1.6 * 0.8)
    shapes = []
    for mask in (square, circle, triangle):
        blocks = mask.reshape(side, sub, side, sub).mean(axis=(1, 3))
        shapes.append(np.pad(blocks, 1))
    bank = np.stack(shapes)
    bank.setflags(write=False)
    return bank


@functools.lru_cache(maxsize=None)
def _sklearn_glyphs(size: int) -> np.ndarray:
    """scikit-learn's 1797 bundled 8x8 handwritten digits, upscaled: (1797, g, g)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError(
            "the 'sklearn-digits' data needs scikit-learn, which is not installed here: "
            "pip install scikit-learn (or use 'synthetic:digits', which needs nothing)"
        ) from exc
    images = load_digits().images / 16.0  # (1797, 8, 8), ink in [0, 1]
    scale = max(1, int(0.4 * size / 8))
    bank = _upscale(images, scale)
    bank.setflags(write=False)
    return bank


# ---------------------------------------------------------------------------
# Bouncing motion
# ---------------------------------------------------------------------------


def _bouncing_positions(
    rng: np.random.Generator, n: int, length: int, n_objects: int,
    room: tuple[int, int], size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners (n, length, n_objects) of objects bouncing in [0, room].

    room is (rows, columns): how far the corner can move down and right.

    A point moving with constant velocity and reflecting off the walls of
    [0, room] is a triangle wave of the unreflected position, so the whole
    trajectory is one vectorised formula instead of a step-by-step simulation.
    """
    room_yx = np.array(room, dtype=np.float64)[:, None, None, None]
    start = rng.uniform(0, 1, size=(2, n, n_objects)) * room_yx[:, :, :, 0]
    angle = rng.uniform(0, 2 * np.pi, size=(n, n_objects))
    speed = rng.uniform(2.0, 4.0, size=(n, n_objects)) * size / 64.0
    velocity = np.stack([speed * np.sin(angle), speed * np.cos(angle)])
    t = np.arange(length, dtype=np.float64)[None, None, :, None]
    free = start[:, :, None, :] + velocity[:, :, None, :] * t  # (2, n, length, n_objects)
    folded = np.mod(free, 2 * room_yx)
    reflected = room_yx - np.abs(folded - room_yx)
    corners = np.clip(np.rint(reflected), 0, room_yx).astype(np.intp)
    return corners[0], corners[1]


def _render(
    glyphs: np.ndarray, ys: np.ndarray, xs: np.ndarray, size: int, dtype: np.dtype
) -> np.ndarray:
    """Paint glyphs (n, n_objects, gh, gw) at corners (n, length, n_objects).

    Overlapping objects combine with max, as in Moving MNIST, so a crossing
    never makes a pixel brighter than 1. One slice per object and frame:
    measured faster than a single fancy-indexed write of every clip at once,
    which spends its time building index arrays.
    """
    n, length, n_objects = ys.shape
    gh, gw = glyphs.shape[-2:]
    glyphs = glyphs.astype(dtype)
    canvas = np.zeros((n, length, 1, size, size), dtype=dtype)
    for clip in range(n):
        for k in range(n_objects):
            glyph = glyphs[clip, k]
            for t in range(length):
                y, x = ys[clip, t, k], xs[clip, t, k]
                region = canvas[clip, t, 0, y:y + gh, x:x + gw]
                np.maximum(region, glyph, out=region)
    return canvas


def _check_generator_args(n: int, length: int, size: int, n_objects: int) -> None:
    for name, value, least in (("n", n, 1), ("length", length, 1),
                               ("size", size, 16), ("n_objects", n_objects, 1)):
        if int(value) != value or value < least:
            raise DataError(f"synthetic data: {name} must be an integer >= {least}, got {value!r}")


def _bouncing_clips(
    bank: np.ndarray, n: int, length: int, size: int, n_objects: int, seed: int, dtype: Any
) -> np.ndarray:
    gh, gw = bank.shape[-2:]
    room = (size - gh, size - gw)
    if min(room) < 1:
        raise DataError(f"synthetic data: a {size}x{size} canvas is too small for "
                        f"{gh}x{gw} glyphs to move")
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, len(bank), size=(n, n_objects))
    ys, xs = _bouncing_positions(rng, n, length, n_objects, room, size)
    return _render(bank[ids], ys, xs, size, np.dtype(dtype))


def synthetic_clips(
    n: int,
    length: int,
    size: int = 64,
    kind: str = "digits",
    n_objects: int = 2,
    seed: int = 0,
    dtype: Any = np.float32,
) -> np.ndarray:
    """Moving-MNIST-like clips that need no download: (n, length, 1, size, size).

    kind="digits" moves glyphs of a bitmap font embedded in this module;
    kind="shapes" moves filled squares, circles and triangles. Each object
    keeps its glyph and velocity for the whole clip and reflects off the
    borders. The same seed gives the same bytes on every run (positions are
    rounded to whole pixels, so float noise across platforms rarely shows).
    """
    _check_generator_args(n, length, size, n_objects)
    if kind == "digits":
        bank = _digit_glyphs(size)
    elif kind == "shapes":
        bank = _shape_glyphs(size)
    else:
        raise DataError(f"synthetic data: kind must be one of {SYNTHETIC_KINDS}, got {kind!r}")
    return _bouncing_clips(bank, n, length, size, n_objects, seed, dtype)


def sklearn_digit_clips(
    n: int,
    length: int,
    size: int = 64,
    seed: int = 0,
    n_objects: int = 2,
    dtype: Any = np.float32,
) -> np.ndarray:
    """Like `synthetic_clips` but with real handwriting: scikit-learn's 8x8 digits.

    The images ship inside scikit-learn, so this is handwriting without a
    download; they are upscaled and smoothed to about 0.4 * size pixels.
    """
    _check_generator_args(n, length, size, n_objects)
    bank = _sklearn_glyphs(size)
    return _bouncing_clips(bank, n, length, size, n_objects, seed, dtype)


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def _open_npy(path: Path) -> np.ndarray:
    """Memory-map a .npy file, or fail with a DataError naming it."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({exc})") from exc


def load_moving_mnist(
    path: str | os.PathLike, limit: int | None = None, dtype: Any = np.float32
) -> np.ndarray:
    """Read the standard Moving MNIST file into a clip set (N, T, 1, 64, 64).

    mnist_test_seq.npy stores time first, (20, 10000, 64, 64) uint8. The
    file is memory-mapped and converted one frame index at a time, so only
    the float result is ever fully in memory; `limit` keeps the first
    `limit` sequences (the full set is 3.3 GB as float32).
    """
    path = Path(path)
    raw = _open_npy(path)
    found = f"{raw.shape} {raw.dtype}"
    if raw.ndim != 4:
        raise DataError(f"{path}: expected Moving MNIST layout {MOVING_MNIST_LAYOUT}, "
                        f"found {raw.ndim} dimensions: {found}")
    if raw.dtype != np.uint8:
        raise DataError(f"{path}: expected Moving MNIST layout {MOVING_MNIST_LAYOUT}, "
                        f"found dtype {raw.dtype}: {found}")
    if raw.shape[2:] != (64, 64) or raw.shape[0] < 2 or raw.shape[1] < 1:
        raise DataError(f"{path}: expected Moving MNIST layout {MOVING_MNIST_LAYOUT}, "
                        f"found shape {found}")
    # uint8 cannot leave [0, 255], so the range holds by construction.
    length, count = raw.shape[:2]
    if limit is not None:
        count = min(count, int(limit))
    clips = np.empty((count, length, 1, 64, 64), dtype=dtype)
    for t in range(length):
        clips[:, t, 0] = raw[t, :count]
    clips *= clips.dtype.type(1.0 / 255.0)
    return clips


def _pick_npz_array(path: Path, key: str | None) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            if key is None:
                if len(keys) != 1:
                    raise DataError(f"{path}: expected one array or a key to choose one, "
                                    f"found arrays {keys}")
                key = keys[0]
            if key not in keys:
                raise DataError(f"{path}: expected an array named {key!r}, found {keys}")
            return archive[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        # a truncated or corrupt archive: its zip directory or a member is damaged
        raise DataError(f"{path}: not a readable .npz archive ({exc})") from exc


def _to_clip_set(raw: np.ndarray, where: str, dtype: Any) -> np.ndarray:
    """Validate a (N, T, H, W) or (N, T, C, H, W) array and scale it into [0, 1]."""
    expected = "(N, T, H, W) or (N, T, C, H, W), uint8 or float in [0, 1]"
    if raw.ndim == 4:
        raw = raw[:, :, None]
    if raw.ndim != 5:
        raise DataError(f"{where}: expected {expected}, found shape {raw.shape}")
    empty = [name for name, n in zip(("sequences (N)", "frames (T)", "channels (C)",
                                      "rows (H)", "columns (W)"), raw.shape) if n == 0]
    if empty:
        raise DataError(f"{where}: holds no data: zero {' and zero '.join(empty)} in shape "
                        f"{raw.shape}")
    if raw.dtype == np.uint8:
        clips = raw.astype(dtype)
        clips *= clips.dtype.type(1.0 / 255.0)
        return clips
    if not np.issubdtype(raw.dtype, np.floating):
        raise DataError(f"{where}: expected {expected}, found dtype {raw.dtype}")
    if not np.isfinite(raw).all():
        raise DataError(f"{where}: expected finite values, found NaN or Inf")
    low, high = float(raw.min()), float(raw.max())
    if low < 0.0 or high > 1.0:
        raise DataError(f"{where}: expected float values in [0, 1], found [{low:g}, {high:g}]; "
                        f"normalise the frames first (e.g. divide 0-255 pixels by 255)")
    return raw.astype(dtype)


def load_sequences(
    path: str | os.PathLike, key: str | None = None, dtype: Any = np.float32
) -> np.ndarray:
    """Read any .npy or .npz of sequences stored sequence-first: (N, T, C, H, W).

    (N, T, H, W) gains a channel axis; uint8 is scaled by 1/255; floats must
    already lie in [0, 1], because silently rescaling by the data's own
    maximum would give train and test files different scales. A .npz needs
    `key` unless it holds exactly one array.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".npz":
        raw = _pick_npz_array(path, key)
        where = f"{path}[{key}]" if key else str(path)
    else:
        raw = _open_npy(path)
        where = str(path)
    return _to_clip_set(raw, where, dtype)


def _looks_like_moving_mnist(path: Path) -> bool:
    """True for mnist_test_seq*.npy, or a .npy whose header says (20, N, 64, 64) uint8.

    A (20, 20, 64, 64) uint8 file is ambiguous; it is read time first, the
    Moving MNIST convention. Call `load_sequences` directly to read it the
    other way.
    """
    if path.name.startswith("mnist_test_seq") and path.suffix == ".npy":
        return True
    if path.suffix != ".npy" or not path.is_file():
        return False
    try:
        raw = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return False
    return (raw.ndim == 4 and raw.dtype == np.uint8
            and raw.shape[0] == 20 and raw.shape[2:] == (64, 64))


def load_data(
    spec: str,
    *,
    n: int | None = None,
    length: int = 20,
    size: int = 64,
    n_objects: int = 2,
    seed: int = 0,
    key: str | None = None,
    dtype: Any = np.float32,
) -> np.ndarray:
    """The command line's `--data` option: a name or a path to a clip set.

    "synthetic" and "synthetic:digits" (font digits), "synthetic:shapes",
    "sklearn-digits" (scikit-learn handwriting): generated with `n` clips
    (default 1000) of `length` frames of `size` pixels. A path to
    mnist_test_seq.npy, or any .npy laid out (20, N, 64, 64) uint8, is read
    as Moving MNIST; any other .npy or .npz goes through `load_sequences`.
    For files, `n` keeps the first n sequences and `length`/`size` are
    ignored (the file decides).
    """
    generated = n if n is not None else 1000
    if spec in ("synthetic", "synthetic:digits"):
        return synthetic_clips(generated, length, size, "digits", n_objects, seed, dtype)
    if spec == "synthetic:shapes":
        return synthetic_clips(generated, length, size, "shapes", n_objects, seed, dtype)
    if spec == "sklearn-digits":
        return sklearn_digit_clips(generated, length, size, seed, n_objects, dtype)
    if spec.startswith("synthetic"):
        raise DataError(f"unknown data {spec!r}: expected synthetic, synthetic:digits, "
                        f"synthetic:shapes, sklearn-digits or a .npy/.npz path")
    path = Path(spec)
    if path.suffix not in (".npy", ".npz"):
        raise DataError(f"{spec}: expected synthetic, synthetic:digits, synthetic:shapes, "
                        f"sklearn-digits or a path ending in .npy or .npz")
    if _looks_like_moving_mnist(path):
        return load_moving_mnist(path, limit=n, dtype=dtype)
    clips = load_sequences(path, key=key, dtype=dtype)
    return clips[:n] if n is not None else clips


# ---------------------------------------------------------------------------
# Patching (space-to-depth)
# ---------------------------------------------------------------------------


def patch(clips: np.ndarray, p: int) -> np.ndarray:
    """Space-to-depth: (N, L, C, H, W) -> (N, L, C*p*p, H/p, W/p).

    Shi et al. (2015) feed the ConvLSTM 16x16x16 tensors cut from 64x64
    frames with p=4: each non-overlapping p x p block becomes p*p channels
    of one pixel, so the recurrent convolutions see a wider area for the
    same kernel size. Channel order, which `unpatch` inverts exactly:

        patched[n, l, c*p*p + dy*p + dx, y, x] == clips[n, l, c, y*p + dy, x*p + dx]
    """
    n, length, channels, height, width = _five_d(clips, "patch")
    if p < 1 or height % p or width % p:
        raise DataError(f"patch size {p} must divide the frame size {height}x{width}")
    blocks = clips.reshape(n, length, channels, height // p, p, width // p, p)
    # axes: n, l, c, y, dy, x, dx -> n, l, c, dy, dx, y, x
    depth = blocks.transpose(0, 1, 2, 4, 6, 3, 5)
    return depth.reshape(n, length, channels * p * p, height // p, width // p)


def unpatch(patched: np.ndarray, p: int) -> np.ndarray:
    """Depth-to-space, the exact inverse of `patch`: (N, L, C*p*p, h, w) -> (N, L, C, h*p, w*p)."""
    n, length, depth, height, width = _five_d(patched, "unpatch")
    if p < 1 or depth % (p * p):
        raise DataError(f"unpatch: {depth} channels is not a multiple of p*p = {p * p}")
    channels = depth // (p * p)
    blocks = patched.reshape(n, length, channels, p, p, height, width)
    # axes: n, l, c, dy, dx, y, x -> n, l, c, y, dy, x, dx
    space = blocks.transpose(0, 1, 2, 5, 3, 6, 4)
    return space.reshape(n, length, channels, height * p, width * p)


def _five_d(array: np.ndarray, what: str) -> tuple[int, int, int, int, int]:
    if array.ndim != 5:
        raise DataError(f"{what}: expected clips shaped (N, L, C, H, W), found {array.shape}")
    return array.shape  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# Splits, tasks and batches
# ---------------------------------------------------------------------------


def split(clips: np.ndarray, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split clips into (train, validation) by a seeded random choice of sequences.

    Both parts keep the original order of their sequences (the choice is
    random, the order is not), so the split depends only on N and the seed.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"validation fraction must be in [0, 1), got {val_fraction}")
    count = len(clips)
    n_val = int(round(count * val_fraction))
    if val_fraction > 0 and (n_val < 1 or n_val >= count):
        raise DataError(f"cannot hold out {val_fraction:.0%} of {count} sequences "
                        f"and keep at least one for each of training and validation")
    order = np.random.default_rng(seed).permutation(count)
    val_index = np.sort(order[:n_val])
    train_index = np.sort(order[n_val:])
    return clips[train_index], clips[val_index]


def frames_for_task(
    clips: np.ndarray, frames_in: int | None = None, frames_out: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Cut clips into (inputs, targets) for a prediction task.

    With frames_in and frames_out: the first frames_in frames predict the
    next frames_out (Moving MNIST's 10 -> 10). With neither: next-frame
    prediction, inputs clips[:, :-1] and targets clips[:, 1:].
    """
    length = clips.shape[1]
    if frames_in is None and frames_out is None:
        if length < 2:
            raise DataError(f"next-frame prediction needs clips of at least 2 frames, got {length}")
        return clips[:, :-1], clips[:, 1:]
    if frames_in is None or frames_out is None:
        raise DataError("give both frames_in and frames_out, or neither for next-frame prediction")
    if frames_in < 1 or frames_out < 1:
        raise DataError(f"frames_in and frames_out must be >= 1, got {frames_in} and {frames_out}")
    if frames_in + frames_out > length:
        raise DataError(f"clips have {length} frames, too short for {frames_in} input + "
                        f"{frames_out} target frames")
    return clips[:, :frames_in], clips[:, frames_in:frames_in + frames_out]


class Batches:
    """Endless, reproducible minibatches of sequence indices.

    Each epoch visits a fresh permutation of range(n), drawn from a
    generator seeded by (seed, epoch) rather than from one running
    generator: the order of epoch e is then a function of (seed, e) alone,
    so the position (epoch, index) is all a checkpoint has to store for a
    resumed run to see exactly the batches an uninterrupted run would.
    The last partial batch of an epoch is dropped so every batch has the
    same shape (a compiled model is specialised to its batch size).

        batches = Batches(len(train), batch_size=16, seed=0)
        idx = next(batches)          # int array of 16 sequence indices
        x = train[idx]
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, epoch: int = 0, index: int = 0):
        if batch_size < 1 or n < batch_size:
            raise DataError(f"batch size {batch_size} needs between 1 and {n} sequences "
                            f"(the data has {n})")
        self.n = int(n)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.index = int(index)  # the next batch's number within the epoch
        if not 0 <= self.index < self.batches_per_epoch or self.epoch < 0:
            raise DataError(f"batch position epoch={epoch}, index={index} is outside "
                            f"0 <= index < {self.batches_per_epoch}")
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.intp)

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        """The next batch's indices; never raises StopIteration (loop by step count)."""
        start = self.index * self.batch_size
        batch = self._epoch_order()[start:start + self.batch_size].copy()
        self.index += 1
        if self.index == self.batches_per_epoch:
            self.epoch += 1
            self.index = 0
        return batch

    def state(self) -> dict:
        """Everything needed to continue from here, as plain ints (JSON-safe)."""
        return {"n": self.n, "batch_size": self.batch_size, "seed": self.seed,
                "epoch": self.epoch, "index": self.index}

    @classmethod
    def from_state(cls, state: dict, n: int | None = None) -> "Batches":
        """Continue from `state()`. Passing the data's current `n` catches a
        resume against a different data set, which would silently change
        every later batch."""
        if n is not None and n != state["n"]:
            raise DataError(f"saved batch position is for {state['n']} sequences, "
                            f"but the data now has {n}")
        return cls(state["n"], state["batch_size"], state["seed"], state["epoch"], state["index"])

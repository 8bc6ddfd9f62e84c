"""The clips a model trains on: loaded or generated at its size, split, cut into pairs.

    data = prepare_data(mod.MODEL, cfg)          # cfg from runtime.config.resolve_config
    data.train_x.shape                           # (N, T, C, H, W), the model's layout

`load_clips` reads a clip file or generates clips ("synthetic" moving digits,
"synthetic:shapes", "sklearn-digits") at the model's frame size and checks
that they fit its input, cutting one-channel frames into p x p patches for a
model that reads p*p channels. `prepare_data` splits them into training and
validation clips (by the seed alone) and cuts each task's (input, target)
pairs. `fingerprint` identifies the data, so that a resumed run notices
when it is given other data.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from convc.errors import ConvcError, DataError
from convc.spec.settings import DEFAULT_CLIPS, DEFAULT_FRAMES

GENERATED_DATA = ("synthetic", "synthetic:digits", "synthetic:shapes", "sklearn-digits")


@dataclass
class Dataset:
    """Training and validation (inputs, targets) in the model's layout (N, T, C, H, W)."""

    input_name: str
    target_name: str
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    patch: int  # p when frames were cut into p x p patches, else 1
    task: str
    frames_out: int | None
    fingerprint: dict


def patch_factor(channels: int) -> int:
    """p for a model that reads C = p*p channels of patched one-channel frames, else 1."""
    p = int(round(math.sqrt(channels)))
    return p if p > 1 and p * p == channels else 1


def fingerprint(spec: str, clips: np.ndarray) -> dict:
    """Enough to notice that a resumed run sees different data: shape and a content hash.

    Large files are hashed on a sample of sequences (the first, middle and
    last) to keep resuming fast.
    """
    digest = hashlib.sha256()
    if clips.nbytes <= 64 << 20:
        digest.update(np.ascontiguousarray(clips).tobytes())
    else:
        for i in sorted({0, len(clips) // 2, len(clips) - 1}):
            digest.update(np.ascontiguousarray(clips[i]).tobytes())
    return {"source": str(spec), "shape": list(clips.shape), "sha256": digest.hexdigest()}


def task_lengths(model: dict, cfg: dict) -> tuple[int, int | None, int]:
    """(frames_in, frames_out or None, clip length) of the model's task."""
    fi = cfg["frames_in"] or DEFAULT_FRAMES
    if model.get("task") == "forecast":
        fo = cfg["frames_out"] or DEFAULT_FRAMES
        return fi, fo, fi + fo
    return fi, None, fi + 1


def load_clips(model: dict, cfg: dict, length: int, clips: np.ndarray | None = None
               ) -> tuple[np.ndarray, int, dict]:
    """Clips in the model's input layout: (clips, patch factor p, fingerprint).

    Generated data is made at the model's frame size, `length` frames long;
    a model whose input has C = p*p > 1 channels gets (H*p)x(W*p) one-channel
    clips cut into p x p patches (Shi et al. 2015: 64x64 -> 16x16x16). A file
    must match the model, patched or not. Anything else is a DataError that
    names what the model expects and what the data has. `clips` (an array of
    clips) skips loading.
    """
    from convc.runtime import data as D

    if len(model["inputs"]) != 1 or len(model["targets"]) != 1:
        raise ConvcError(f"training on clip data needs a model with one input and one target; "
                         f"{model['name']} has inputs {sorted(model['inputs'])} and targets "
                         f"{sorted(model['targets'])}")
    (in_name, in_shape), = model["inputs"].items()
    (tg_name, tg_shape), = model["targets"].items()
    C, H, W = (int(d) for d in in_shape)
    if tuple(tg_shape) != tuple(in_shape):
        raise ConvcError(f"training on clip data needs the target to have the input's shape; "
                         f"{in_name} is {_shape(in_shape)} but {tg_name} is {_shape(tg_shape)}")
    p = patch_factor(C)
    spec = str(cfg["data"])
    frame = (H * p, W * p)
    if cfg["size"] is not None and cfg["size"] != frame[0]:
        how = f" cut into {p}x{p} patches" if p > 1 else ""
        raise ConvcError(f"size {cfg['size']} does not fit model {model['name']}: its input "
                         f"{in_name} is {_shape(in_shape)}, so frames are {frame[0]}x{frame[1]} "
                         f"pixels{how}; leave size out or set it to {frame[0]}")
    if clips is None:
        if spec in GENERATED_DATA:
            if C > 1 and p == 1:
                raise DataError(f"{spec} data has one channel, but model {model['name']} reads "
                                f"{C} channels ({_shape(in_shape)}); give a data file instead")
            if frame[0] != frame[1]:
                raise DataError(f"{spec} data has square frames, but model {model['name']} "
                                f"reads {frame[0]}x{frame[1]} frames")
            clips = D.load_data(spec, n=cfg["clips"] or DEFAULT_CLIPS, length=length,
                                size=frame[0], seed=cfg["seed"])
        else:
            clips = D.load_data(spec, n=cfg["clips"])
    clips = np.asarray(clips)
    if clips.ndim != 5:
        raise DataError(f"{spec}: expected clips shaped (N, T, C, H, W), found {clips.shape}")
    identity = fingerprint(spec, clips)
    found = tuple(clips.shape[2:])
    if found == (C, H, W):
        pass
    elif p > 1 and found == (1, H * p, W * p):
        clips = D.patch(clips, p)
    else:
        also = f" (or 1x{H * p}x{W * p} frames to cut into {p}x{p} patches)" if p > 1 else ""
        raise DataError(f"{spec}: model {model['name']} reads {in_name} frames of "
                        f"{C}x{H}x{W} (channels x height x width){also}, but the data has "
                        f"{found[0]}x{found[1]}x{found[2]} (clips of shape {clips.shape})")
    return clips, p, identity


def prepare_data(model: dict, cfg: dict, clips: np.ndarray | None = None, *,
                 lazy: bool = False, identify: bool = True) -> Dataset:
    """Load clips sized to the model (see `load_clips`), split them, cut the task's pairs.

    next_frame: x = clip[:, :-1], y = clip[:, 1:] over frames_in + 1 frames;
    forecast: x = clip[:, :frames_in], y = the next frames_out frames. The
    split into training and validation clips depends only on the seed.

    lazy: a .npy clip file stays memory-mapped, and each batch reads only the
    sequences it holds (`ClipRows`), with the same values as the whole file
    loaded; a rank of a distributed run so reads its shard alone. identify:
    compute the data's fingerprint (a lazy run reads the file for it).
    """
    from convc.runtime import data as D

    if lazy and clips is None and _mappable(str(cfg["data"])):
        return _lazy_data(model, cfg, identify)
    fi, fo, length = task_lengths(model, cfg)
    clips, p, identity = load_clips(model, cfg, length, clips)
    if clips.shape[1] < length:
        need = (f"{fi} input + {fo} target frames" if fo is not None else
                f"{fi} input frames + 1 for the last target")
        raise DataError(f"{cfg['data']}: clips have {clips.shape[1]} frames, too short for "
                        f"{need} ({length}); set frames_in/frames_out to fit")
    clips = clips[:, :length]
    val_fraction = float(cfg["val_fraction"])
    if val_fraction > 0 and len(clips) < 2:
        val_fraction = 0.0
    elif val_fraction > 0 and round(len(clips) * val_fraction) < 1:
        val_fraction = 1.0 / len(clips)  # hold out at least one sequence
    train, val = D.split(clips, val_fraction, seed=cfg["seed"])
    cut = (fi, fo) if fo is not None else (None, None)
    tx, ty = D.frames_for_task(train, *cut)
    vx, vy = D.frames_for_task(val, *cut)
    (in_name, _), = model["inputs"].items()
    (tg_name, _), = model["targets"].items()
    return Dataset(in_name, tg_name, tx, ty, vx, vy, p, model.get("task", "next_frame"), fo,
                   identity)


def _mappable(spec: str) -> bool:
    return spec not in GENERATED_DATA and spec.endswith(".npy")


def _val_fraction(cfg: dict, count: int) -> float:
    """prepare_data's validation share of `count` clips (at least one held out)."""
    val_fraction = float(cfg["val_fraction"])
    if val_fraction > 0 and count < 2:
        return 0.0
    if val_fraction > 0 and round(count * val_fraction) < 1:
        return 1.0 / count
    return val_fraction


def split_indices(count: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The sequences of runtime.data.split(clips, val_fraction, seed), as indices."""
    from convc.runtime import data as D

    index = np.arange(count)
    train, val = D.split(index, val_fraction, seed=seed)
    return train, val


class ClipFile:
    """A memory-mapped .npy of clips, read a few sequences at a time in the model's layout.

    The values are those `runtime.data.load_data` gives for the whole file:
    sequence-first (N, T, [C,] H, W) or Moving MNIST's time-first (T, N, 64, 64)
    uint8 (scaled by 1/255), float files checked to be finite and in [0, 1] as
    each sequence is read.
    """

    def __init__(self, spec: str, limit: int | None, dtype=np.float32):
        from convc.runtime import data as D
        from pathlib import Path

        path = Path(spec)
        self.spec, self.dtype = spec, np.dtype(dtype)
        self.raw = D._open_npy(path)
        self.time_first = D._looks_like_moving_mnist(path)
        raw = self.raw
        if self.time_first:
            if raw.ndim != 4 or raw.dtype != np.uint8 or raw.shape[2:] != (64, 64):
                D.load_moving_mnist(path, limit=0)  # its error, naming what it found
            count, length = raw.shape[1], raw.shape[0]
            self.frame = (1, 64, 64)
        else:
            if raw.ndim not in (4, 5) or 0 in raw.shape:
                D._to_clip_set(raw[:0] if raw.ndim not in (4, 5) else raw, spec, dtype)
            count, length = raw.shape[0], raw.shape[1]
            self.frame = tuple(raw.shape[2:]) if raw.ndim == 5 else (1,) + tuple(raw.shape[2:])
            if raw.dtype != np.uint8 and not np.issubdtype(raw.dtype, np.floating):
                D._to_clip_set(raw[:1], spec, dtype)  # its error, naming the dtype
        self.count = min(count, int(limit)) if limit is not None else count
        self.length = length

    @property
    def shape(self) -> tuple:
        return (self.count, self.length) + self.frame

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def read(self, rows) -> np.ndarray:
        from convc.runtime import data as D

        rows = np.asarray(rows, dtype=np.intp)
        if self.time_first:
            raw = np.asarray(self.raw[:, rows])  # (T, n, 64, 64)
            clips = np.empty((len(rows), self.length) + self.frame, dtype=self.dtype)
            for t in range(self.length):
                clips[:, t, 0] = raw[t]
            clips *= clips.dtype.type(1.0 / 255.0)
            return clips
        raw = np.asarray(self.raw[rows])
        return D._to_clip_set(raw, self.spec, self.dtype)


class ClipRows:
    """Inputs or targets of some sequences of a ClipFile, read when indexed.

    `view[i]` for an index array or a slice reads those sequences (positions
    into `rows`), patches them and cuts the task's frames [first, last).
    """

    def __init__(self, file: ClipFile, rows: np.ndarray, first: int, last: int, patch: int):
        self.file, self.rows = file, np.asarray(rows, dtype=np.intp)
        self.first, self.last, self.patch = first, last, patch

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple:
        c, h, w = self.file.frame
        p = self.patch
        return (len(self.rows), self.last - self.first, c * p * p, h // p, w // p)

    def __getitem__(self, which) -> np.ndarray:
        from convc.runtime import data as D

        clips = self.file.read(self.rows[which])[:, self.first:self.last]
        return D.patch(clips, self.patch) if self.patch > 1 else clips


def _lazy_data(model: dict, cfg: dict, identify: bool) -> Dataset:
    """prepare_data for a .npy file left on disk (see prepare_data's `lazy`)."""
    fi, fo, length = task_lengths(model, cfg)
    spec = str(cfg["data"])
    file = ClipFile(spec, cfg["clips"])  # float32, as load_data reads a file
    if file.count == 0:
        raise DataError(f"{spec}: holds no sequences")
    _, p, _ = load_clips(model, cfg, length, file.read([0]))  # checks the frames fit
    if file.length < length:
        need = (f"{fi} input + {fo} target frames" if fo is not None else
                f"{fi} input frames + 1 for the last target")
        raise DataError(f"{cfg['data']}: clips have {file.length} frames, too short for "
                        f"{need} ({length}); set frames_in/frames_out to fit")
    identity = _lazy_fingerprint(spec, file) if identify else None
    train, val = split_indices(file.count, _val_fraction(cfg, file.count), cfg["seed"])
    first, last = (0, fi) if fo is not None else (0, length - 1)
    tfirst, tlast = (fi, fi + fo) if fo is not None else (1, length)
    (in_name, _), = model["inputs"].items()
    (tg_name, _), = model["targets"].items()
    return Dataset(in_name, tg_name, ClipRows(file, train, first, last, p),
                   ClipRows(file, train, tfirst, tlast, p), ClipRows(file, val, first, last, p),
                   ClipRows(file, val, tfirst, tlast, p), p, model.get("task", "next_frame"),
                   fo, identity)


def _lazy_fingerprint(spec: str, file: ClipFile) -> dict:
    """fingerprint(spec, clips) of the clips the whole file would give, read for it."""
    if file.nbytes <= 64 << 20:
        return fingerprint(spec, file.read(np.arange(file.count)))
    digest = hashlib.sha256()
    for i in sorted({0, file.count // 2, file.count - 1}):
        digest.update(np.ascontiguousarray(file.read([i])[0]).tobytes())
    return {"source": str(spec), "shape": list(file.shape), "sha256": digest.hexdigest()}


def _shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"

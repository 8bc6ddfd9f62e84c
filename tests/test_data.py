"""Tests for convc.runtime.data: generators, loaders, patching, splits and batches."""

import sys
from pathlib import Path

import numpy as np
import pytest

from convc.errors import DataError
from convc.runtime import data


# ---------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["digits", "shapes"])
def test_synthetic_shape_range_and_determinism(kind):
    clips = data.synthetic_clips(6, 8, size=32, kind=kind, seed=3)
    assert clips.shape == (6, 8, 1, 32, 32)
    assert clips.dtype == np.float32
    assert clips.min() == 0.0 and 0.9 < clips.max() <= 1.0
    again = data.synthetic_clips(6, 8, size=32, kind=kind, seed=3)
    assert clips.tobytes() == again.tobytes()
    other = data.synthetic_clips(6, 8, size=32, kind=kind, seed=4)
    assert clips.tobytes() != other.tobytes()


def test_synthetic_objects_move_and_stay_whole():
    clips = data.synthetic_clips(4, 20, size=64, n_objects=1, seed=0)
    # Motion: consecutive frames differ.
    assert all(not np.array_equal(clips[i, 0], clips[i, 1]) for i in range(4))
    # Reflection keeps the object inside the canvas, so no ink is ever lost.
    ink = clips.sum(axis=(2, 3, 4))
    np.testing.assert_allclose(ink, ink[:, :1] * np.ones_like(ink), rtol=1e-5)


def test_synthetic_dtype_and_bad_arguments():
    assert data.synthetic_clips(2, 3, size=32, dtype=np.float64).dtype == np.float64
    with pytest.raises(DataError, match="kind"):
        data.synthetic_clips(2, 3, kind="letters")
    with pytest.raises(DataError, match="size"):
        data.synthetic_clips(2, 3, size=8)


@pytest.mark.slow  # importing scikit-learn takes seconds
def test_sklearn_digit_clips():
    pytest.importorskip("sklearn", reason="scikit-learn not installed (optional data source)")
    clips = data.sklearn_digit_clips(3, 5, size=64, seed=1)
    assert clips.shape == (3, 5, 1, 64, 64)
    assert 0.0 <= clips.min() and clips.max() <= 1.0
    assert clips.tobytes() == data.sklearn_digit_clips(3, 5, size=64, seed=1).tobytes()


def test_sklearn_missing_says_how_to_install(monkeypatch):
    data._sklearn_glyphs.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match="pip install scikit-learn"):
        data.sklearn_digit_clips(2, 3)
    data._sklearn_glyphs.cache_clear()


# ---------------------------------------------------------------------------
# Moving MNIST and generic files
# ---------------------------------------------------------------------------


def _fake_moving_mnist(path, frames=20, count=3):
    raw = np.random.default_rng(0).integers(0, 256, size=(frames, count, 64, 64), dtype=np.uint8)
    np.save(path, raw)
    return raw


def test_load_moving_mnist_transposes_time_and_scales(tmp_path):
    raw = _fake_moving_mnist(tmp_path / "mnist_test_seq.npy")
    clips = data.load_moving_mnist(tmp_path / "mnist_test_seq.npy")
    assert clips.shape == (3, 20, 1, 64, 64) and clips.dtype == np.float32
    np.testing.assert_allclose(clips[2, 7, 0], raw[7, 2] / 255.0, rtol=1e-6)
    assert clips.min() >= 0.0 and clips.max() <= 1.0
    assert data.load_moving_mnist(tmp_path / "mnist_test_seq.npy", limit=2).shape[0] == 2


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((20, 3, 64), dtype=np.uint8),                # wrong ndim
        np.zeros((20, 3, 64, 64), dtype=np.int16),            # wrong dtype
        np.full((20, 3, 64, 64), 2.0, dtype=np.float32),      # float out of range
        np.full((20, 3, 64, 64), np.nan, dtype=np.float32),   # NaN
        np.zeros((20, 3, 32, 32), dtype=np.uint8),            # wrong frame size
    ],
    ids=["ndim", "dtype", "float-range", "nan", "frame-size"],
)
def test_load_moving_mnist_rejects_bad_files(tmp_path, array):
    path = tmp_path / "mnist_test_seq.npy"
    np.save(path, array)
    with pytest.raises(DataError, match=r"\(T, N, 64, 64\) uint8") as info:
        data.load_moving_mnist(path)
    assert str(path) in str(info.value)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.load_moving_mnist(tmp_path / "absent.npy")
    with pytest.raises(DataError, match="no such file"):
        data.load_sequences(tmp_path / "absent.npz")
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not numpy at all")
    with pytest.raises(DataError, match="junk.npy"):
        data.load_sequences(junk)


def test_load_sequences_layouts(tmp_path):
    four = np.random.default_rng(1).integers(0, 256, size=(2, 5, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "four.npy", four)
    clips = data.load_sequences(tmp_path / "four.npy")
    assert clips.shape == (2, 5, 1, 8, 8) and clips.dtype == np.float32
    np.testing.assert_allclose(clips[:, :, 0], four / 255.0, rtol=1e-6)

    five = np.random.default_rng(2).random((2, 5, 3, 8, 8))
    np.savez(tmp_path / "one.npz", frames=five)
    np.testing.assert_allclose(data.load_sequences(tmp_path / "one.npz"), five, rtol=1e-6)

    np.savez(tmp_path / "two.npz", a=five, b=five)
    with pytest.raises(DataError, match=r"\['a', 'b'\]"):
        data.load_sequences(tmp_path / "two.npz")
    assert data.load_sequences(tmp_path / "two.npz", key="b").shape == five.shape
    with pytest.raises(DataError, match="'c'"):
        data.load_sequences(tmp_path / "two.npz", key="c")


@pytest.mark.parametrize(
    "array, message",
    [
        (np.full((2, 5, 8, 8), 255.0), "normalise"),
        (np.full((2, 5, 8, 8), np.inf), "finite"),
        (np.zeros((2, 5, 8), dtype=np.uint8), r"\(N, T, H, W\)"),
        (np.zeros((2, 5, 8, 8), dtype=np.int32), "dtype int32"),
    ],
    ids=["range", "inf", "ndim", "dtype"],
)
def test_load_sequences_rejects(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError, match=message):
        data.load_sequences(tmp_path / "bad.npy")


def test_load_data_dispatch(tmp_path):
    assert data.load_data("synthetic", n=2, length=3, size=32).shape == (2, 3, 1, 32, 32)
    shapes = data.load_data("synthetic:shapes", n=2, length=3, size=32)
    digits = data.load_data("synthetic:digits", n=2, length=3, size=32)
    assert shapes.tobytes() != digits.tobytes()
    # Any (20, N, 64, 64) uint8 .npy is read time first, whatever its name.
    raw = _fake_moving_mnist(tmp_path / "renamed.npy", count=4)
    clips = data.load_data(str(tmp_path / "renamed.npy"))
    assert clips.shape == (4, 20, 1, 64, 64)
    np.testing.assert_allclose(clips[3, 0, 0], raw[0, 3] / 255.0, rtol=1e-6)
    assert data.load_data(str(tmp_path / "renamed.npy"), n=2).shape[0] == 2
    # Other layouts go through load_sequences.
    np.save(tmp_path / "generic.npy", np.zeros((3, 6, 16, 16), dtype=np.uint8))
    assert data.load_data(str(tmp_path / "generic.npy")).shape == (3, 6, 1, 16, 16)
    with pytest.raises(DataError, match="expected synthetic"):
        data.load_data("frames.txt")
    with pytest.raises(DataError, match="unknown data"):
        data.load_data("synthetic:letters")


# ---------------------------------------------------------------------------
# Patching
# ---------------------------------------------------------------------------


def test_patch_channel_order_by_hand():
    # One 4x4 frame with two channels, p = 2; pixel value encodes (c, y, x).
    clips = np.zeros((1, 1, 2, 4, 4))
    for c in range(2):
        for y in range(4):
            for x in range(4):
                clips[0, 0, c, y, x] = 100 * c + 10 * y + x
    patched = data.patch(clips, 2)
    assert patched.shape == (1, 1, 8, 2, 2)
    # Block (y=1, x=0) covers pixels y in {2, 3}, x in {0, 1}.
    # channel c*p*p + dy*p + dx holds pixel (y*p+dy, x*p+dx) of channel c.
    assert list(patched[0, 0, :, 1, 0]) == [20, 21, 30, 31, 120, 121, 130, 131]
    p = 2
    for c in range(2):
        for dy in range(p):
            for dx in range(p):
                for y in range(2):
                    for x in range(2):
                        assert patched[0, 0, c * p * p + dy * p + dx, y, x] == \
                            clips[0, 0, c, y * p + dy, x * p + dx]


def test_patch_unpatch_roundtrip_and_errors():
    clips = np.random.default_rng(0).random((2, 3, 1, 64, 64)).astype(np.float32)
    patched = data.patch(clips, 4)
    assert patched.shape == (2, 3, 16, 16, 16)
    assert np.array_equal(data.unpatch(patched, 4), clips)
    with pytest.raises(DataError, match="divide"):
        data.patch(clips, 5)
    with pytest.raises(DataError, match="multiple"):
        data.unpatch(patched, 3)


# ---------------------------------------------------------------------------
# Splits, tasks and batches
# ---------------------------------------------------------------------------


def test_split_is_deterministic_and_disjoint():
    clips = np.arange(10).reshape(10, 1, 1, 1, 1).astype(np.float32)
    train, val = data.split(clips, 0.3, seed=5)
    train2, val2 = data.split(clips, 0.3, seed=5)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    assert len(train) == 7 and len(val) == 3
    assert sorted(train.ravel().tolist() + val.ravel().tolist()) == list(range(10))
    _, val3 = data.split(clips, 0.3, seed=6)
    assert not np.array_equal(val, val3)
    with pytest.raises(DataError):
        data.split(clips, 1.0, seed=0)


def test_frames_for_task():
    clips = np.arange(20).reshape(1, 20, 1, 1, 1)
    inputs, targets = data.frames_for_task(clips, 10, 5)
    assert inputs.ravel().tolist() == list(range(10))
    assert targets.ravel().tolist() == list(range(10, 15))
    inputs, targets = data.frames_for_task(clips)
    assert inputs.ravel().tolist() == list(range(19))
    assert targets.ravel().tolist() == list(range(1, 20))
    with pytest.raises(DataError, match="too short"):
        data.frames_for_task(clips, 10, 11)
    with pytest.raises(DataError, match="both"):
        data.frames_for_task(clips, 10)


def test_batches_cover_each_epoch_and_reshuffle():
    batches = data.Batches(10, batch_size=3, seed=1)
    assert batches.batches_per_epoch == 3
    epoch0 = [next(batches) for _ in range(3)]
    epoch1 = [next(batches) for _ in range(3)]
    assert all(len(b) == 3 for b in epoch0 + epoch1)
    assert len(set(np.concatenate(epoch0).tolist())) == 9  # one sequence dropped
    assert not np.array_equal(np.concatenate(epoch0), np.concatenate(epoch1))
    assert batches.state()["epoch"] == 2 and batches.state()["index"] == 0


def test_batches_resume_gives_identical_sequence():
    uninterrupted = data.Batches(17, batch_size=4, seed=7)
    expected = [next(uninterrupted) for _ in range(13)]

    first = data.Batches(17, batch_size=4, seed=7)
    seen = [next(first) for _ in range(6)]
    saved = dict(first.state())
    del first
    resumed = data.Batches.from_state(saved, n=17)
    seen += [next(resumed) for _ in range(7)]
    assert all(np.array_equal(a, b) for a, b in zip(expected, seen))

    with pytest.raises(DataError, match="17 sequences"):
        data.Batches.from_state(saved, n=20)
    with pytest.raises(DataError):
        data.Batches(3, batch_size=4)


@pytest.mark.parametrize("shape", [(0, 11, 1, 16, 16), (4, 0, 1, 16, 16), (4, 11, 0, 16, 16),
                                   (4, 11, 16, 0), (0, 11, 16, 16)])
@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_an_empty_clip_array_is_a_data_error(tmp_path, shape, suffix):
    path = tmp_path / f"empty{suffix}"
    array = np.zeros(shape, np.float32)
    np.save(path, array) if suffix == ".npy" else np.savez(path, clips=array)
    with pytest.raises(DataError, match=r"holds no data: zero") as info:
        data.load_data(str(path))
    assert str(path) in str(info.value)


def _truncations(tmp_path):
    whole = tmp_path / "whole.npz"
    rng = np.random.default_rng(0)
    np.savez_compressed(whole, clips=rng.uniform(0, 1, (4, 11, 1, 16, 16)).astype(np.float32))
    raw = whole.read_bytes()
    for cut in (10, 100, len(raw) // 2, len(raw) - 30, len(raw) - 1):
        path = tmp_path / f"cut{cut}.npz"
        path.write_bytes(raw[:cut])
        yield path
    flipped = bytearray(raw)
    middle = len(raw) // 2
    flipped[middle:middle + 8] = bytes(255 - b for b in flipped[middle:middle + 8])
    path = tmp_path / "flipped.npz"
    path.write_bytes(bytes(flipped))
    yield path


def test_a_truncated_or_corrupt_npz_is_a_data_error(tmp_path):
    for path in _truncations(tmp_path):
        with pytest.raises(DataError, match="not a readable .npz archive") as info:
            data.load_data(str(path))
        assert str(path) in str(info.value)


@pytest.mark.parametrize("command", ["train", "predict"])
def test_bad_data_files_end_in_one_clear_line(capsys, tmp_path, command):
    from convc import cli

    seed = Path(__file__).resolve().parents[1] / "examples" / "seed.cell"
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 11, 1, 16, 16), np.float32))
    if command == "train":
        extra = ["--out", str(tmp_path / "run"), "--steps", "1", "-q"]
    else:  # a trained run to predict with
        assert cli.main(["train", str(seed), "--out", str(tmp_path / "ok"), "--steps", "1",
                         "--clips", "8", "--batch-size", "4", "--frames-in", "4", "-q"]) == 0
        capsys.readouterr()
        extra = ["--checkpoint", str(tmp_path / "ok"), "--out", str(tmp_path / "pred")]
    for path in [empty, *_truncations(tmp_path)]:
        code = cli.main([command, str(seed), "--data", str(path), *extra])
        out, err = capsys.readouterr()
        assert code == 1, (path, err)
        assert err.startswith("convc: error: ") and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1 and str(path) in err
    assert not (tmp_path / "pred").exists() and not list((tmp_path / "run").glob("ckpt-*"))

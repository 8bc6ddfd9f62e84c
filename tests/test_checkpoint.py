"""Checkpoints: exact round trips, corruption detection, pruning, and failed writes."""

import errno
import os

from pathlib import Path

import numpy as np
import pytest

from convc.errors import CheckpointError
from convc.runtime import checkpoint as ckpt
from convc.runtime.checkpoint import (
    flatten_groups,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    split_groups,
)


def sample_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "param/enc.W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "param/enc.b": rng.standard_normal(4),
        "param/fortran": np.asfortranarray(rng.standard_normal((3, 5))),
        "optim/m/enc.W": np.array([np.nan, -0.0, np.inf, 1e-310]),
        "optim/t": np.array(7, dtype=np.int64),
        "rng/key": rng.integers(0, 2**32, size=4, dtype=np.uint32),
        "data/order": rng.permutation(10).astype(np.int32),
        "data/mask": np.array([True, False, True]),
        "data/empty": np.zeros((0, 3), dtype=np.float32),
    }


def assert_bitwise_equal(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        expected = np.asarray(want[name])
        assert got[name].dtype == expected.dtype, name
        assert got[name].shape == expected.shape, name
        assert got[name].tobytes() == expected.tobytes(), name


def temp_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_roundtrip_is_bitwise_exact(tmp_path):
    arrays = sample_arrays()
    meta = {"epoch": 3, "data_position": 12, "config": {"lr": 0.1, "betas": (0.9, 0.999)},
            "loss": np.float32(0.25), "name": "run ü"}
    path = save_checkpoint(tmp_path / "run" / "nested", 1200, arrays, meta)
    assert path.name == "ckpt-00001200.npz"
    loaded, stored = load_checkpoint(path)
    assert_bitwise_equal(loaded, arrays)
    assert stored["step"] == 1200
    assert stored["epoch"] == 3
    assert stored["data_position"] == 12
    assert stored["format_version"] == ckpt.FORMAT_VERSION
    assert stored["user"] == {"epoch": 3, "data_position": 12,
                              "config": {"lr": 0.1, "betas": [0.9, 0.999]},
                              "loss": 0.25, "name": "run ü"}
    assert len(stored["checksum"]) == 64
    assert temp_files(path.parent) == []


def test_a_checkpoint_is_a_plain_npz(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"param/w": np.arange(3.0)}, {})
    with np.load(path, allow_pickle=False) as contents:
        assert sorted(contents.files) == ["__meta__", "param/w"]
        assert contents["__meta__"].dtype == np.uint8


def test_groups_flatten_and_split():
    groups = {"param": {"enc.W": 1, "dec.W": 2}, "optim": {"m/enc.W": 3}}
    flat = flatten_groups(groups)
    assert sorted(flat) == ["optim/m/enc.W", "param/dec.W", "param/enc.W"]
    assert split_groups(flat) == groups


def big_checkpoint(folder, step, seed=0):
    """A checkpoint whose bytes are almost all array data, like a real one.

    In a tiny file the middle byte may land in a zip header field that no
    reader uses (a timestamp, a size the central directory repeats); flipping
    it changes nothing that is loaded, so it is rightly not an error.
    """
    arrays = {"param/enc.W": np.random.default_rng(seed).standard_normal((64, 64)),
              "optim/t": np.array(seed)}
    return save_checkpoint(folder, step, arrays, {"epoch": seed}), arrays


def test_flipped_byte_in_the_middle_is_detected(tmp_path):
    path, _ = big_checkpoint(tmp_path, 5)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(path.name)):
        load_checkpoint(path)


def test_no_flipped_byte_anywhere_gives_wrong_data(tmp_path):
    """Flip bytes all over the file: each load either fails or returns the exact original.

    Some bytes (a zip timestamp, say) carry nothing that is returned, so a
    flip there may load fine; what must never happen is different data.
    """
    arrays = {"param/w": np.linspace(-1, 1, 50), "optim/t": np.array(3)}
    path = save_checkpoint(tmp_path, 1, arrays, {"epoch": 2})
    original = path.read_bytes()
    _, want_meta = load_checkpoint(path)
    for position in range(0, len(original), 7):
        damaged = bytearray(original)
        damaged[position] ^= 0x10
        path.write_bytes(bytes(damaged))
        try:
            loaded, meta = load_checkpoint(path)
        except CheckpointError:
            continue
        assert_bitwise_equal(loaded, arrays)
        assert meta == want_meta, position


@pytest.mark.parametrize("keep_fraction", [0.0, 0.01, 0.5, 0.99])
def test_truncated_file_is_detected(tmp_path, keep_fraction):
    path = save_checkpoint(tmp_path, 5, sample_arrays(), {})
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep_fraction)])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        load_checkpoint(path)


def test_missing_file_and_missing_metadata(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "ckpt-00000001.npz")
    path = tmp_path / "ckpt-00000001.npz"
    np.savez(path, **{"param/w": np.zeros(2)})
    with pytest.raises(CheckpointError, match="missing metadata"):
        load_checkpoint(path)


def test_renamed_checkpoint_is_rejected(tmp_path):
    path = save_checkpoint(tmp_path, 5, {"param/w": np.zeros(2)}, {})
    renamed = path.rename(tmp_path / "ckpt-00000009.npz")
    with pytest.raises(CheckpointError, match="step"):
        load_checkpoint(renamed)


def test_latest_valid_skips_a_corrupted_newest(tmp_path):
    for step in (10, 20, 30):
        _, arrays = big_checkpoint(tmp_path, step, seed=step)
        if step == 20:
            arrays_20 = arrays
    newest = list_checkpoints(tmp_path)[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))

    reports = []
    path, arrays, meta = latest_valid_checkpoint(tmp_path, report=reports.append)
    assert path.name == "ckpt-00000020.npz"
    assert meta["step"] == 20 and meta["epoch"] == 20
    assert_bitwise_equal(arrays, arrays_20)
    assert len(reports) == 1 and "ckpt-00000030.npz" in reports[0]


def test_latest_valid_reports_to_stderr_by_default(tmp_path, capsys):
    save_checkpoint(tmp_path, 1, {"param/w": np.zeros(2)}, {})
    (tmp_path / "ckpt-00000002.npz").write_bytes(b"not a checkpoint")
    path, _, _ = latest_valid_checkpoint(tmp_path)
    assert path.name == "ckpt-00000001.npz"
    assert "ckpt-00000002.npz" in capsys.readouterr().err


def test_latest_valid_with_nothing_usable(tmp_path):
    assert latest_valid_checkpoint(tmp_path / "does-not-exist") is None
    (tmp_path / "ckpt-00000001.npz").write_bytes(b"")
    assert latest_valid_checkpoint(tmp_path, report=lambda message: None) is None


def test_keep_prunes_older_checkpoints(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step * 100, {"param/w": np.full(2, step)}, {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt-00000400.npz", "ckpt-00000500.npz"]
    save_checkpoint(tmp_path, 600, {"param/w": np.zeros(2)}, {}, keep=None)
    assert len(list_checkpoints(tmp_path)) == 3


def test_list_checkpoints_sorts_by_step_not_by_name(tmp_path):
    save_checkpoint(tmp_path, 123456789, {"param/w": np.zeros(1)}, {}, keep=None)
    save_checkpoint(tmp_path, 99999999, {"param/w": np.zeros(1)}, {}, keep=None)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt-99999999.npz", "ckpt-123456789.npz"]


def test_stale_temp_files_are_removed_on_the_next_save(tmp_path):
    (tmp_path / ".ckpt-00000001-dead.tmp").write_bytes(b"half a checkpoint")
    save_checkpoint(tmp_path, 2, {"param/w": np.zeros(1)}, {})
    assert temp_files(tmp_path) == []


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def savez_then_full_disk(stream, **arrays):
    stream.write(b"PK\x03\x04 partial data")
    full_disk()


@pytest.mark.parametrize("target, replacement", [
    ("savez", savez_then_full_disk),
    ("fsync", full_disk),
    ("replace", full_disk),
])
def test_failed_write_keeps_previous_checkpoints(tmp_path, monkeypatch, target, replacement):
    first = save_checkpoint(tmp_path, 1, sample_arrays(1), {"epoch": 1})
    second = save_checkpoint(tmp_path, 2, sample_arrays(2), {"epoch": 2})
    before = {p.name: p.read_bytes() for p in (first, second)}

    module = np if target == "savez" else os
    monkeypatch.setattr(module, target, replacement)
    with pytest.raises(CheckpointError) as failure:
        save_checkpoint(tmp_path, 3, sample_arrays(3), {"epoch": 3}, keep=1)
    monkeypatch.undo()

    message = str(failure.value)
    assert "ckpt-00000003.npz" in message and "No space left on device" in message
    assert temp_files(tmp_path) == []
    assert [p.name for p in list_checkpoints(tmp_path)] == sorted(before)
    for name, data in before.items():
        assert (tmp_path / name).read_bytes() == data
    path, _, meta = latest_valid_checkpoint(tmp_path)
    assert path == second and meta["epoch"] == 2


def test_bad_input_is_refused_before_writing(tmp_path):
    with pytest.raises(CheckpointError, match="group/name"):
        save_checkpoint(tmp_path, 1, {"W": np.zeros(1)}, {})
    with pytest.raises(CheckpointError, match="not a plain numeric"):
        save_checkpoint(tmp_path, 1, {"param/o": np.array([{}], dtype=object)}, {})
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path, 1, {"param/w": np.zeros(1)}, {"f": open})
    with pytest.raises(CheckpointError, match="keep"):
        save_checkpoint(tmp_path, 1, {"param/w": np.zeros(1)}, {}, keep=0)
    assert list(tmp_path.iterdir()) == []


PICKLE_RAN = []


def _record_pickle_ran(value):
    PICKLE_RAN.append(value)
    return value


class Payload:
    """An object whose unpickling calls a function: loading must never get that far."""

    def __reduce__(self):
        return (_record_pickle_ran, ("unpickled",))


def test_object_arrays_are_refused_without_unpickling(tmp_path, monkeypatch):
    good = save_checkpoint(tmp_path, 1, {"param/w": np.zeros(2)}, {})
    with np.load(good, allow_pickle=False) as contents:
        meta = contents["__meta__"]
    evil = tmp_path / "ckpt-00000002.npz"
    payload = np.empty(1, dtype=object)
    payload[0] = Payload()
    np.savez(evil, **{"param/w": payload, "__meta__": meta})

    calls = []
    real_load = np.load

    def spy_load(*args, **kwargs):
        calls.append(kwargs.get("allow_pickle"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy_load)
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(evil)
    assert calls == [False]
    assert PICKLE_RAN == []


def test_cupy_arrays_are_saved_as_numpy(tmp_path):
    cupy = pytest.importorskip("cupy", reason="cupy not installed")
    try:
        device_array = cupy.arange(6, dtype=cupy.float32)
    except Exception as exc:  # cupy installed but no usable GPU
        pytest.skip(f"no usable GPU: {exc}")
    path = save_checkpoint(tmp_path, 1, {"param/w": device_array}, {})
    arrays, _ = load_checkpoint(path)
    assert isinstance(arrays["param/w"], np.ndarray)
    assert arrays["param/w"].tolist() == list(range(6))


# ---------------------------------------------------------------------------
# Forged checkpoints: a valid checksum over bad contents
# ---------------------------------------------------------------------------

SEED_SPEC = Path(__file__).resolve().parent.parent / "examples" / "seed.cell"


def _forge(src, dst, edit_meta=None, edit_arrays=None):
    """Rewrite checkpoint src as dst with edited contents and a recomputed checksum."""
    import json

    arrays, meta = load_checkpoint(src)
    meta.pop("checksum")
    if edit_meta:
        edit_meta(meta)
    if edit_arrays:
        edit_arrays(arrays)
    meta["checksum"] = ckpt._checksum(arrays, meta)
    payload = dict(arrays)
    payload[ckpt.META_KEY] = np.frombuffer(ckpt._canonical_json(meta).encode(), dtype=np.uint8)
    with open(dst, "wb") as stream:
        np.savez(stream, **payload)


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory):
    from convc.cli import main

    out = tmp_path_factory.mktemp("run") / "seed"
    assert main(["train", str(SEED_SPEC), "--steps", "2", "--clips", "8", "--out", str(out),
                 "-q"]) == 0
    return out


def _set(path, value):
    def edit(meta):
        target = meta
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


FORGERIES = {
    "rng": (_set(("user", "rng"), {"bit_generator": "PCG64", "state": "garbage"}), None,
            "user.rng"),
    "data_position": (_set(("user", "data_position"), None), None, "user.data_position"),
    "user_list": (_set(("user",), [1, 2]), None, "user"),
    "seconds": (_set(("user", "seconds"), "ten"), None, "user.seconds"),
    "schedule_2d": (None, lambda a: a.update({"sched/last_step": np.zeros((2, 2))}),
                    "sched/last_step"),
}


@pytest.mark.parametrize("case", sorted(FORGERIES))
def test_forged_checkpoint_is_refused_on_resume(seed_run, tmp_path, capsys, case):
    import shutil

    from convc.cli import main

    edit_meta, edit_arrays, field = FORGERIES[case]
    run = tmp_path / "run"
    shutil.copytree(seed_run, run)
    for old in list_checkpoints(run):
        _forge(old, old, edit_meta, edit_arrays)
    capsys.readouterr()
    code = main(["train", str(SEED_SPEC), "--steps", "3", "--clips", "8", "--out", str(run),
                 "--resume", "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert field in err and "Traceback" not in err


def test_nan_weights_are_refused_by_predict_unless_allowed(seed_run, tmp_path, capsys):
    from convc.cli import main

    src = list_checkpoints(seed_run)[-1]
    forged = tmp_path / src.name

    def poison(arrays):
        name = sorted(k for k in arrays if k.startswith("param/"))[0]
        arrays[name] = np.full_like(arrays[name], np.nan)
    _forge(src, forged, edit_arrays=poison)
    argv = ["predict", str(SEED_SPEC), "--checkpoint", str(forged), "--data", "synthetic",
            "--clips", "2", "--out", str(tmp_path / "p")]
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "parameter " in err and "Traceback" not in err
    assert main(argv + ["--allow-nonfinite"]) == 0

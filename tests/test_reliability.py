"""Reliability under faults: what docs/reliability.md promises, each promise checked.

- Bitwise reproducibility: five fresh `convc train` processes print the same
  losses and write the same parameters, bit for bit.
- `--deterministic` on the GPU, through a NumPy-backed stand-in for CuPy.
- Checkpoints: what they hold, that they load without running code, that a
  damaged newest one is reported and the one before it used, and that a
  resumed run is bitwise the uninterrupted one.
- `--debug-nans` names the node, the .cell line, the time step and the pass.
- Poison mode changes no loss and no parameter of any example.
- Bad input (specs, data, folders, a full disk, Ctrl-C, SIGTERM) ends in a
  clear message and leaves the newest checkpoint valid.

The SIGKILL fault script, bench/faults.py, runs from tests/test_faults.py.
Models are tiny (16x16 frames, 3-4 input frames, batches of 4); most commands
run in-process through `cli.main`, a few in subprocesses where the process
boundary is the point.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

import convc.api as api
from convc import cli
from convc.errors import CheckpointError, ConvcError
from convc.runtime import dataset, kernels, ops_cupy, runlog
from convc.runtime import train as T
from convc.runtime.checkpoint import (checkpoint_path, latest_valid_checkpoint,
                                      list_checkpoints, load_checkpoint)
from helpers import EXAMPLES, example_ids, load_example
from helpers import one_blas_thread  # noqa: F401  (an autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "examples" / "seed.cell"
TINY = dict(clips=16, batch_size=4, frames_in=4, progress=False)
# The same run on the command line.
TINY_ARGS = ["--clips", "16", "--batch-size", "4", "--frames-in", "4", "--threads", "1", "-q"]
# One BLAS thread in subprocesses too: reproducibility is promised per thread count.
SUBPROCESS_ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                      MKL_NUM_THREADS="1")


@pytest.fixture(scope="module")
def seed():
    return api.load(SEED)


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def param_digest(checkpoint: Path) -> str:
    """sha256 over the parameter arrays of a checkpoint (names, dtypes, bytes)."""
    arrays, _ = load_checkpoint(checkpoint)
    h = hashlib.sha256()
    for name in sorted(arrays):
        if name.startswith("param/"):
            h.update(f"{name}:{arrays[name].dtype.str}:{arrays[name].shape}".encode())
            h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


def log_losses(folder: Path) -> list[str]:
    """The loss column of log.csv as written: repr of each float, exact."""
    lines = (folder / "log.csv").read_text().splitlines()
    return [line.split(",")[2] for line in lines[1:]]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------- reproducibility

def test_five_fresh_processes_give_bitwise_identical_losses_and_parameters(tmp_path):
    """Five `convc train` processes at once (different hash seeds), 20 steps each."""
    procs = []
    for i in range(5):
        env = dict(SUBPROCESS_ENV, PYTHONHASHSEED=str(i))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "convc", "train", str(SEED), "--steps", "20",
             "--frames-in", "3", "--clips", "12", "--batch-size", "4", "--optimizer", "adam",
             "--lr", "0.01", "--threads", "1", "-q", "--out", str(tmp_path / f"run{i}")],
            env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    losses = [log_losses(tmp_path / f"run{i}") for i in range(5)]
    digests = [param_digest(checkpoint_path(tmp_path / f"run{i}", 20)) for i in range(5)]
    assert len(losses[0]) == 20
    hexes = [[float(v).hex() for v in run_losses] for run_losses in losses]
    assert all(h == hexes[0] for h in hexes), hexes
    assert len(set(digests)) == 1, digests


# ---------------------------------------------------------------- --deterministic

def _fake_cupy(calls: list) -> types.ModuleType:
    """CuPy's module surface that deterministic mode touches, NumPy underneath."""
    fake = types.ModuleType("cupy")
    fake.__getattr__ = lambda name: getattr(np, name)  # PEP 562 module fallback
    fake.asnumpy = np.asarray
    fake.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))

    def recorder(name):
        return lambda *args: calls.append((name, *args))

    linalg = types.SimpleNamespace(COMPUTE_TYPE_DEFAULT=1, COMPUTE_TYPE_TF32=7,
                                   set_compute_type=recorder("set_compute_type"))
    fake._core = types.SimpleNamespace(
        _routines_linalg=linalg,
        set_elementwise_accelerators=recorder("elementwise"),
        set_reduction_accelerators=recorder("reduction"),
        set_routine_accelerators=recorder("routine"))
    return fake


@pytest.fixture
def fake_gpu(monkeypatch):
    """A stand-in cupy in sys.modules and the deterministic variables restored afterwards."""
    calls: list = []
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(calls))
    for key in ops_cupy.DETERMINISTIC_ENVIRONMENT:
        monkeypatch.delenv(key, raising=False)
    return calls


def test_deterministic_gpu_mode_turns_off_tf32_and_accelerated_reductions(seed, fake_gpu,
                                                                          monkeypatch):
    monkeypatch.setenv("CUPY_TF32", "1")  # a user's setting that deterministic mode overrides
    cpu = T.train(seed, steps=3, **TINY)
    gpu = T.train(seed, steps=3, device="gpu", deterministic=True, **TINY)
    assert gpu.losses == cpu.losses  # the stand-in is NumPy: the same bits
    for key, value in ops_cupy.DETERMINISTIC_ENVIRONMENT.items():
        assert os.environ[key] == value, key
    assert ("elementwise", []) in fake_gpu and ("reduction", []) in fake_gpu
    assert ("routine", []) in fake_gpu
    assert ("set_compute_type", np.float32, 1) in fake_gpu  # plain FP32, not TF32 (7)


def test_without_deterministic_the_gpu_settings_are_left_alone(seed, fake_gpu):
    T.train(seed, steps=1, device="gpu", **TINY)
    assert fake_gpu == []
    assert "CUPY_ACCELERATORS" not in os.environ


def test_deterministic_gpu_refuses_cudnn_convolutions(seed, fake_gpu):
    with pytest.raises(ConvcError, match="--conv numpy"):
        T.train(seed, steps=1, device="gpu", conv="chainer", deterministic=True, **TINY)


def test_deterministic_environment_is_set_before_cupy_is_imported(seed, fake_gpu,
                                                                  monkeypatch):
    seen = {}
    real = ops_cupy.import_cupy

    def spy():
        seen.update({k: os.environ.get(k) for k in ops_cupy.DETERMINISTIC_ENVIRONMENT})
        return real()

    monkeypatch.setattr(ops_cupy, "import_cupy", spy)
    T.train(seed, steps=1, device="gpu", deterministic=True, **TINY)
    assert seen == ops_cupy.DETERMINISTIC_ENVIRONMENT


def test_deterministic_flag_on_the_cpu_changes_nothing(capsys, tmp_path):
    code, _, err = run(capsys, "train", SEED, "--steps", "3", "--out", tmp_path / "a",
                       *TINY_ARGS)
    assert code == 0, err
    code, _, err = run(capsys, "train", SEED, "--steps", "3", "--out", tmp_path / "b",
                       "--deterministic", *TINY_ARGS)
    assert code == 0, err
    assert log_losses(tmp_path / "a") == log_losses(tmp_path / "b")
    _, meta = load_checkpoint(checkpoint_path(tmp_path / "b", 3))
    assert meta["user"]["deterministic"] is True


# ---------------------------------------------------------------- checkpoints

def test_a_checkpoint_holds_the_whole_training_state_and_loads_without_code(seed, tmp_path):
    T.train(seed, steps=5, optimizer="adam", lr=0.01, schedule="cosine", stateful=True,
            out=tmp_path, **TINY)
    path = checkpoint_path(tmp_path, 5)
    # Plain npz, read with pickling refused: nothing in a checkpoint can run code.
    with np.load(path, allow_pickle=False) as contents:
        names = set(contents.files)
        meta = json.loads(contents["__meta__"].tobytes().decode("utf-8"))
    groups = {name.partition("/")[0] for name in names if name != "__meta__"}
    assert groups == {"param", "optim", "sched", "carry"}
    assert {f"param/{k}" for k in seed.MODEL["params"]} <= names
    assert any(name.startswith("optim/m/") for name in names)  # Adam's moments
    assert sorted(n for n in names if n.startswith("carry/")) == ["carry/lstm.c",
                                                                 "carry/lstm.h"]
    assert meta["step"] == 5 and meta["epoch"] == meta["user"]["epoch"]
    assert meta["data_position"] == meta["user"]["data_position"]
    assert meta["user"]["rng"]["bit_generator"] == "PCG64"
    assert meta["user"]["config"]["optimizer"] == "adam"
    assert len(meta["checksum"]) == 64
    load_checkpoint(path)  # and the checksum verifies


def test_a_truncated_newest_checkpoint_is_reported_and_the_previous_one_used(capsys,
                                                                             tmp_path):
    args = ["--steps", "6", "--checkpoint-every", "1", "--keep", "10", "--optimizer", "adam",
            "--lr", "0.01", *TINY_ARGS]
    code, _, err = run(capsys, "train", SEED, "--out", tmp_path / "whole", *args)
    assert code == 0, err
    cut = tmp_path / "cut"
    code, _, err = run(capsys, "train", SEED, "--out", cut, *args[:1], "4", *args[2:])
    assert code == 0, err
    newest = checkpoint_path(cut, 4)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a dying disk
    code, _, err = run(capsys, "train", SEED, "--out", cut, "--resume", *args)
    assert code == 0, err
    assert "skipping invalid checkpoint" in err and "ckpt-00000004.npz" in err
    assert "truncated" in err
    assert log_losses(cut) == log_losses(tmp_path / "whole")
    assert param_digest(checkpoint_path(cut, 6)) == \
        param_digest(checkpoint_path(tmp_path / "whole", 6))


def test_resume_with_nothing_to_resume_starts_from_step_zero(capsys, tmp_path):
    """A run killed before its first checkpoint is continued by starting it again."""
    from convc.runtime.runfolder import open_run_folder

    out = tmp_path / "run"
    folder, _ = open_run_folder(out, T.OUTPUT_NAMES, overwrite=False, version="test")
    folder.write("log.csv", "step,epoch,loss,lr,grad_norm,val_loss,seconds\n1,0,0.6")
    folder.close()  # the killed run's folder: convc's manifest, half a log, no checkpoint
    code, _, err = run(capsys, "train", SEED, "--steps", "2", "--out", out, "--resume",
                       *TINY_ARGS)
    assert code == 0, err
    assert "holds no checkpoint yet" in err
    assert [r["step"] for r in runlog.read_log(out / "log.csv")] == [1, 2]


def test_resume_over_only_damaged_checkpoints_is_an_error_that_deletes_nothing(capsys,
                                                                               tmp_path):
    code, _, err = run(capsys, "train", SEED, "--steps", "2", "--out", tmp_path, *TINY_ARGS)
    assert code == 0, err
    damaged = checkpoint_path(tmp_path, 2)
    damaged.write_bytes(b"PK\x03\x04 not really")
    before = folder_bytes(tmp_path)
    code, _, err = run(capsys, "train", SEED, "--steps", "4", "--out", tmp_path, "--resume",
                       *TINY_ARGS)
    assert code == 1 and "none of its 1 checkpoint is valid" in err
    assert folder_bytes(tmp_path) == before


def test_half_a_log_row_from_a_killed_run_does_not_stop_a_resume(seed, tmp_path):
    settings = dict(steps=6, checkpoint_every=2, **TINY)
    whole = T.train(seed, out=tmp_path / "whole", **settings)
    cut = tmp_path / "cut"
    T.train(seed, out=cut, **dict(settings, steps=4))
    with open(cut / "log.csv", "a") as stream:
        stream.write("5,2,0.69")  # killed while appending step 5's row
    resumed = T.train(seed, out=cut, resume=True, **settings)
    assert resumed.losses == whole.losses
    assert log_losses(cut) == log_losses(tmp_path / "whole")
    with pytest.raises(ValueError, match="line 8: malformed row"):
        with open(cut / "log.csv", "a") as stream:
            stream.write("7,3\n")
        runlog.read_log(cut / "log.csv")


# ---------------------------------------------------------------- non-finite values

GROW = """\
# s grows 1e10-fold a step: float32 overflows at time step 4.
cell Grow() {
    input x
    state s = zeros
    weight W = kernel(2, 1)
    s = s[t-1] * 1e10 + sigmoid(conv(x, W))
    output s
}

model grow {
    input x: [1, 16, 16]
    target y: [1, 16, 16]

    g = Grow()
    s = g(x)
    weight W_y = kernel(1, 1)
    pred = sigmoid(conv(s, W_y))
    output pred
    loss mse(pred, y)
}
"""

# Finite forward (the scaled values underflow to zero), infinite backward: the
# cotangent is scaled by 1e30 twice on its way back from `big` to `tiny`.
BACKWARD = """\
model back {
    input x: [1, 16, 16]
    target y: [1, 16, 16]

    weight W = kernel(1, 1)
    u = conv(x, W)
    tiny = u * 1e-30
    tinier = tiny * 1e-30
    back = tinier * 1e30
    big = back * 1e30
    pred = sigmoid(big)
    output pred
    loss mse(pred, y)
}
"""


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow itself
def test_debug_nans_names_the_node_the_cell_line_and_the_time_step(capsys, tmp_path):
    spec = tmp_path / "grow.cell"
    spec.write_text(GROW)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", spec, "--steps", "3", "--frames-in", "6", "--clips",
                       "8", "--batch-size", "4", "--threads", "1", "-q", "--out", out,
                       "--debug-nans")
    assert code == 1
    line = _line_of(GROW, "* 1e10")
    found = re.search(rf"grow.cell:{line}: non-finite value in (\w+) at time step 4 during "
                      r"the forward pass", err)
    assert found, err
    # the value is named as the generated code names it
    assert f"{found.group(1)} = " in (out / "model.py").read_text(), found.group(1)
    assert "training stopped at step 1" in err and "Traceback" not in err
    # The last good state (the initial parameters) is kept and loads.
    assert "ckpt-00000000.npz" in err
    path, _, meta = latest_valid_checkpoint(out)
    assert meta["step"] == 0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow itself
def test_debug_nans_names_a_backward_node(capsys, tmp_path):
    spec = tmp_path / "back.cell"
    spec.write_text(BACKWARD)
    code, _, err = run(capsys, "train", spec, "--steps", "3", "--frames-in", "3", "--clips",
                       "8", "--batch-size", "4", "--threads", "1", "-q", "--out",
                       tmp_path / "run", "--debug-nans")
    assert code == 1
    line = _line_of(BACKWARD, "back = tinier")
    assert f"back.cell:{line}: non-finite value in dtinier during the backward pass" in err


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow itself
def test_without_debug_nans_a_non_finite_gradient_stops_with_advice(capsys, tmp_path):
    spec = tmp_path / "back.cell"
    spec.write_text(BACKWARD)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", spec, "--steps", "3", "--frames-in", "3", "--clips",
                       "8", "--batch-size", "4", "--threads", "1", "-q", "--out", out)
    assert code == 1
    assert "training stopped at step 1" in err and "gradient is not finite in W" in err
    assert "--debug-nans" in err and latest_valid_checkpoint(out)[2]["step"] == 0


# ---------------------------------------------------------------- poison mode

@pytest.fixture
def poison():
    """Poison off at the start (conftest's --poison respects this name), off at the end."""
    kernels.set_poison(False)
    yield
    kernels.set_poison(False)


def _clips_for(mod, n: int = 4, length: int = 5) -> np.ndarray:
    (_, shape), = mod.MODEL["inputs"].items()
    rng = np.random.default_rng(0)
    return rng.uniform(0.0, 1.0, (n, length) + tuple(shape)).astype(np.float32)


@pytest.mark.parametrize("path", EXAMPLES, ids=example_ids())
def test_poison_changes_no_loss_and_no_parameter_of_any_example(path, poison):
    """Three optimizer steps of every example, poison off and on: the same bits."""
    mod = load_example(path, hidden=2)
    forecast = mod.MODEL.get("task") == "forecast"
    (_, (channels, height, _)), = mod.MODEL["inputs"].items()
    kw = dict(clips=_clips_for(mod), steps=3, batch_size=2, frames_in=3, val_fraction=0.0,
              progress=False,
              size=height * dataset.patch_factor(channels),  # the spec's train block says 16 or 64
              **({"frames_out": 2} if forecast else {}))
    clean = T.train(mod, poison=False, **kw)
    poisoned = T.train(mod, poison=True, **kw)
    assert not kernels.poison_enabled()  # put back as it was
    assert np.isfinite(clean.losses).all()
    assert [float(v).hex() for v in poisoned.losses] == [float(v).hex() for v in clean.losses]
    for name in sorted(clean.params):
        assert poisoned.params[name].tobytes() == clean.params[name].tobytes(), name


def test_poison_flag_on_the_command_line(capsys, tmp_path, poison):
    code, _, err = run(capsys, "train", SEED, "--steps", "3", "--out", tmp_path / "a",
                       *TINY_ARGS)
    assert code == 0, err
    code, _, err = run(capsys, "train", SEED, "--steps", "3", "--out", tmp_path / "b",
                       "--poison", *TINY_ARGS)
    assert code == 0, err
    assert log_losses(tmp_path / "a") == log_losses(tmp_path / "b")
    assert not kernels.poison_enabled()


# ---------------------------------------------------------------- bad input

BAD_SPEC = "model broken {\n    input x: [1, 16, 16]\n    h = = x\n}\n"


def _bad_inputs(tmp_path: Path) -> dict[str, list]:
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"\x93NUMPY this is not an array")
    small = tmp_path / "small.npy"
    np.save(small, np.zeros((6, 8, 1, 8, 8), dtype=np.float32))
    nans = tmp_path / "nans.npy"
    np.save(nans, np.full((6, 8, 1, 16, 16), np.nan, dtype=np.float32))
    spec = tmp_path / "broken.cell"
    spec.write_text(BAD_SPEC)
    return {
        "malformed spec": [spec, "--steps", "6"],
        "missing spec": [tmp_path / "nope.cell", "--steps", "6"],
        "garbage data": [SEED, "--steps", "6", "--data", garbage],
        "wrong frame size": [SEED, "--steps", "6", "--data", small],
        "NaN data": [SEED, "--steps", "6", "--data", nans],
        "missing data": [SEED, "--steps", "6", "--data", tmp_path / "none.npy"],
        "bad schedule": [SEED, "--steps", "6", "--schedule", "step:gamma"],
    }


@pytest.mark.parametrize("case", ["malformed spec", "missing spec", "garbage data",
                                  "wrong frame size", "NaN data", "missing data",
                                  "bad schedule"])
def test_bad_input_to_a_resumed_run_is_a_clear_error_that_touches_nothing(capsys, tmp_path,
                                                                         case):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", SEED, "--steps", "2", "--out", out, *TINY_ARGS)
    assert code == 0, err
    before = folder_bytes(out)
    argv = _bad_inputs(tmp_path)[case]
    code, _, err = run(capsys, "train", argv[0], "--out", out, "--resume", *argv[1:],
                       *TINY_ARGS)
    assert code == 1, err
    assert "Traceback" not in err
    assert err.startswith("convc: error:") or "error[" in err, err
    assert folder_bytes(out) == before
    assert latest_valid_checkpoint(out)[2]["step"] == 2


def test_a_missing_output_folder_is_created(capsys, tmp_path):
    out = tmp_path / "a" / "b" / "c"
    code, _, err = run(capsys, "train", SEED, "--steps", "1", "--out", out, *TINY_ARGS)
    assert code == 0, err
    assert list_checkpoints(out) == [checkpoint_path(out, 1)]


def test_an_output_folder_that_cannot_be_made_is_a_clear_error(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run(capsys, "train", SEED, "--steps", "1", "--out", blocker / "run",
                       *TINY_ARGS)
    assert code == 1 and err.startswith("convc: error: cannot create output folder")


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(seed, tmp_path, monkeypatch):
    settings = dict(steps=6, checkpoint_every=2, optimizer="adam", lr=0.01, **TINY)
    whole = T.train(seed, out=tmp_path / "whole", **settings)
    real = np.savez
    writes = {"n": 0}

    def savez_then_disk_full(file, *args, **kwds):
        writes["n"] += 1
        if writes["n"] < 2:
            return real(file, *args, **kwds)
        file.write(b"PK\x03\x04" + bytes(100))  # part of the file reached the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "run"
    monkeypatch.setattr(np, "savez", savez_then_disk_full)
    with pytest.raises(CheckpointError) as info:
        T.train(seed, out=out, **settings)
    message = str(info.value)
    assert "training stopped at step 4" in message and "No space left on device" in message
    assert "ckpt-00000002.npz (step 2)" in message and "--resume" in message
    assert [p.name for p in list_checkpoints(out)] == ["ckpt-00000002.npz"]
    assert not list(out.glob(".ckpt-*.tmp"))
    load_checkpoint(checkpoint_path(out, 2))

    monkeypatch.setattr(np, "savez", real)  # space freed
    resumed = T.train(seed, out=out, resume=True, **settings)
    assert resumed.losses == whole.losses


def test_a_full_disk_while_appending_to_the_log_is_a_clear_error(seed, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def disk_full_on_step_3(path, mode="r", *args, **kwargs):
        if "a" in mode and len(runlog.read_log(path)) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return open(path, mode, *args, **kwargs)

    # `open` as runlog.py sees it (a module global shadows the builtin there only)
    monkeypatch.setattr(runlog, "open", disk_full_on_step_3, raising=False)
    with pytest.raises(ConvcError, match=r"step 3: cannot write .*log.csv: No space left"):
        T.train(seed, steps=5, checkpoint_every=1, out=out, **TINY)
    assert latest_valid_checkpoint(out)[2]["step"] == 2


def test_ctrl_c_to_a_training_process_saves_a_checkpoint_and_exits_130(seed, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "convc", "train", str(SEED), "--steps", "2000", "--out",
         str(out), *TINY_ARGS], cwd=str(ROOT), env=SUBPROCESS_ENV,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "log.csv").exists() or \
                len((out / "log.csv").read_text().splitlines()) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted: saved step" in err and "--resume" in err and "Traceback" not in err
    path, _, meta = latest_valid_checkpoint(out)
    step = meta["step"]
    assert f"saved step {step} to {path}" in err
    assert len(runlog.read_log(out / "log.csv")) == step
    # Resuming continues the same run: in-process, the losses of an unbroken run.
    resumed = T.train(seed, steps=step + 2, out=out, resume=True, **TINY)
    whole = T.train(seed, steps=step + 2, **TINY)
    assert resumed.losses == whole.losses


def test_sigterm_saves_like_ctrl_c_and_exits_143(seed, tmp_path, capsys, monkeypatch):
    def terminate_at_3(row):
        if row["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(T.TrainingInterrupted) as info:
        T.train(seed, steps=10, out=tmp_path, on_step=terminate_at_3, **TINY)
    assert info.value.signum == signal.SIGTERM
    assert info.value.checkpoint == checkpoint_path(tmp_path, 3)
    assert str(info.value).startswith("stopped by SIGTERM: saved step 3")
    assert signal.getsignal(signal.SIGTERM) is handler

    def train_raises(args):
        raise info.value

    monkeypatch.setattr(cli, "cmd_train", train_raises)
    code, _, err = run(capsys, "train", SEED)
    assert code == 143 and "stopped by SIGTERM" in err

"""Data-parallel training over MPI ranks (runtime/distributed.py, docs/distributed.md).

The promise: N ranks give bitwise the losses, validation losses and
parameters of one process running the same global batch cut into the same
N shards (`--shards N`); rank 0 alone writes; a rank that raises, dies or
hangs ends every rank in bounded time with a message naming it, and
`--resume` continues bitwise after it, after a SIGTERM to the launcher,
and on another number of ranks.

The multi-process tests start `mpirun` (the convc[mpi] extra: mpi4py and
the mpich wheel; Open MPI's launcher gets --oversubscribe and, as root,
--allow-run-as-root) and skip, saying why, where there is none. Each is
parametrised by the collectives backend; "nccl" needs CuPy with NCCL and
two GPUs.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SEED = str(ROOT / "examples" / "seed.cell")
FAULTY = str(ROOT / "tests" / "distributed_faulty.py")
BIN = Path(sys.executable).parent
CONVC = [sys.executable, "-m", "convc"]
# Small and quick: 36 training clips, batches of 6 (shards of 2 at three ranks).
RUN = ["--batch-size", "6", "--clips", "40", "--threads", "1", "--clip", "0.5",
       "--val-every", "3", "--lr", "0.5", "--optimizer", "adam"]


def _launcher() -> tuple[list[str] | None, str]:
    """mpirun with the options this machine needs, or (None, why the tests skip)."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None, "mpi4py is not installed (pip install 'convc[mpi]')"
    mpirun = shutil.which("mpirun", path=str(BIN)) or shutil.which("mpirun")
    if mpirun is None:
        return None, "no mpirun (pip install 'convc[mpi]' installs MPICH's)"
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version or "prte" in version.lower():
        extra = ["--oversubscribe"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            extra.append("--allow-run-as-root")
        return [mpirun, *extra], ""
    return [mpirun], ""


MPIRUN, NO_MPI = _launcher()
needs_mpi = pytest.mark.skipif(MPIRUN is None, reason=NO_MPI)


def _gpus() -> int:
    try:
        import cupy
        from cupy.cuda import nccl  # noqa: F401

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


BACKENDS = [
    pytest.param("mpi", id="mpi"),
    pytest.param("nccl", id="nccl", marks=pytest.mark.skipif(
        _gpus() < 2, reason="the NCCL backend needs CuPy with NCCL and two GPUs")),
]


def _device(backend: str) -> list[str]:
    return ["--device", "gpu", "--collectives", "nccl"] \
        if backend == "nccl" else []


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT.parent) + os.pathsep + os.environ.get(
        "PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return env


def mpirun(n: int, args: list[str], cwd, timeout: float = 240, script=None):
    command = [*MPIRUN, "-n", str(n), *(script or CONVC), *args]
    return subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def alone(args: list[str], cwd, timeout: float = 240):
    env = {k: v for k, v in _env().items() if not k.startswith(("PMI", "OMPI", "PMIX"))}
    return subprocess.run([*CONVC, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _ok(result) -> None:
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def _log(folder: Path) -> list[str]:
    """log.csv without its seconds column (the only one that may differ)."""
    return [",".join(line.split(",")[:6]) for line in
            (folder / "log.csv").read_text().splitlines()]


def _params(folder: Path) -> dict:
    from convc.runtime.checkpoint import latest_valid_checkpoint

    _, arrays, meta = latest_valid_checkpoint(folder)
    return {k: v for k, v in arrays.items() if k.split("/")[0] in ("param", "optim")}, meta


def _same_run(a: Path, b: Path) -> None:
    assert _log(a) == _log(b)
    pa, ma = _params(a)
    pb, mb = _params(b)
    assert ma["step"] == mb["step"]
    assert sorted(pa) == sorted(pb)
    for name in pa:
        assert pa[name].tobytes() == pb[name].tobytes(), name


# ---------------------------------------------------------------- one process

def test_distributed_outside_mpi_fails_clearly(tmp_path):
    result = alone(["train", SEED, "--steps", "2", "--distributed", *RUN,
                    "--out", str(tmp_path / "r")], tmp_path)
    assert result.returncode == 1
    assert "mpirun -n N" in result.stderr and "srun --mpi=pmix" in result.stderr
    assert not (tmp_path / "r").exists()


def test_shards_sum_in_a_fixed_order_close_to_the_whole_batch(tmp_path):
    """--shards N changes the losses only by rounding (a mean of means), and it is what
    a distributed run is compared with below."""
    import convc

    mod = convc.load(SEED)
    settings = dict(steps=4, batch_size=6, clips=40, threads=1, progress=False, clip=0.5)
    whole = mod.train(**settings).losses
    for shards in (2, 3):
        parts = mod.train(shards=shards, **settings).losses
        assert parts != whole or shards == 1
        np.testing.assert_allclose(parts, whole, rtol=1e-5)
        assert mod.train(shards=shards, **settings).losses == parts  # reproducible
    with pytest.raises(Exception, match="7 shards need a batch of at least 7"):
        mod.train(shards=7, **settings)


def test_a_npy_file_read_by_rows_gives_the_loaded_values(tmp_path):
    """What each rank reads of a .npy (memory-mapped, only its rows) equals the file
    loaded whole: float and uint8 files, and Moving MNIST's time-first layout."""
    import convc
    from convc.runtime.config import resolve_config
    from convc.runtime.dataset import ClipRows, prepare_data

    rng = np.random.default_rng(0)
    mod = convc.load(SEED)
    files = {"float.npy": rng.uniform(0, 1, (30, 12, 1, 16, 16)).astype(np.float32),
             "bytes.npy": rng.integers(0, 256, (30, 11, 16, 16), dtype=np.uint8)}
    for name, array in files.items():
        np.save(tmp_path / name, array)
        cfg = resolve_config(mod.MODEL.get("train", {}), {"data": str(tmp_path / name),
                                                           "clips": 25})
        eager, lazy = prepare_data(mod.MODEL, cfg), prepare_data(mod.MODEL, cfg, lazy=True)
        assert isinstance(lazy.train_x, ClipRows)
        assert lazy.fingerprint == eager.fingerprint
        for part in ("train_x", "train_y", "val_x", "val_y"):
            e, z = getattr(eager, part), getattr(lazy, part)
            assert z.shape == e.shape and len(z) == len(e)
            rows = np.array([len(e) - 1, 0])
            assert z[rows].tobytes() == e[rows].tobytes()
            assert z[0:2].tobytes() == e[0:2].tobytes()
    # a float file with a value out of range is refused when its rows are read
    bad = files["float.npy"].copy()
    bad[3, 2, 0, 1, 1] = 2.0
    np.save(tmp_path / "bad.npy", bad)
    cfg = resolve_config(mod.MODEL.get("train", {}), {"data": str(tmp_path / "bad.npy"),
                                                       "val_fraction": 0.0})
    with pytest.raises(Exception, match=r"in \[0, 1\]"):  # read whole for the fingerprint
        prepare_data(mod.MODEL, cfg, lazy=True)
    lazy = prepare_data(mod.MODEL, cfg, lazy=True, identify=False)  # another rank: its rows
    assert lazy.train_x[np.arange(3)].shape[0] == 3
    with pytest.raises(Exception, match=r"in \[0, 1\]"):
        lazy.train_x[np.arange(len(lazy.train_x))]


def test_the_chunked_sum_is_in_shards_arithmetic():
    """Rank j adds chunk j of every rank's weighted gradient in rank order: elementwise
    the same as in_shards's g_0 w_0 + g_1 w_1 + ... on whole arrays."""
    from convc.runtime.kernels import shard_bounds, shard_weights, weigh

    rng = np.random.default_rng(1)
    n, k = 7, 3
    weights = shard_weights(shard_bounds(n, k), n)
    grads = [rng.standard_normal(1001).astype(np.float32) for _ in range(k)]
    whole = weigh(grads[0].copy(), weights[0])
    for g, w in zip(grads[1:], weights[1:]):
        whole += weigh(g.copy(), w)
    flats = [weigh(g.copy(), w) for g, w in zip(grads, weights)]
    chunks = []
    for a, b in shard_bounds(1001, k):
        summed = flats[0][a:b].copy()
        for f in flats[1:]:
            summed += f[a:b]
        chunks.append(summed)
    assert np.concatenate(chunks).tobytes() == whole.tobytes()
    # a different order of addition does differ in the last bits somewhere
    reverse = flats[2] + flats[1] + flats[0]
    assert reverse.tobytes() != whole.tobytes()


# ---------------------------------------------------------------- N ranks

@needs_mpi
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_n_ranks_are_one_process_with_n_shards(tmp_path, n, backend):
    ranks, shards = tmp_path / "ranks", tmp_path / "shards"
    args = ["train", SEED, "--steps", "6", *RUN, *_device(backend)]
    _ok(mpirun(n, [*args, "--distributed", "--out", str(ranks)], tmp_path))
    _ok(alone([*args, "--shards", str(n), "--out", str(shards)], tmp_path))
    _same_run(ranks, shards)
    # rank 0 alone wrote, and only what one process writes
    assert sorted(p.name for p in ranks.iterdir()) == sorted(p.name for p in shards.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranks", "shards"]


@needs_mpi
def test_the_validation_loss_is_one_processes(tmp_path):
    """Ranks take whole validation chunks and their sums are added in chunk order: with
    the same parameters (lr 0), 3 ranks report one unsharded process's validation loss."""
    ranks, plain = tmp_path / "ranks", tmp_path / "plain"
    args = ["train", SEED, "--steps", "3", *RUN, "--lr", "0", "--val-every", "1",
            "--val-fraction", "0.5"]
    _ok(mpirun(3, [*args, "--out", str(ranks)], tmp_path))
    _ok(alone([*args, "--out", str(plain)], tmp_path))
    val = [line.split(",")[5] for line in _log(ranks)][1:]
    assert val == [line.split(",")[5] for line in _log(plain)][1:] and all(val)
    loss = [line.split(",")[2] for line in _log(ranks)][1:]
    assert loss != [line.split(",")[2] for line in _log(plain)][1:]  # the shards' sum


@needs_mpi
def test_stateful_runs_carry_every_shards_states(tmp_path):
    ranks, shards = tmp_path / "ranks", tmp_path / "shards"
    args = ["train", SEED, "--steps", "5", *RUN, "--stateful", "--bptt", "4"]
    _ok(mpirun(2, [*args, "--out", str(ranks)], tmp_path))
    _ok(alone([*args, "--shards", "2", "--out", str(shards)], tmp_path))
    _same_run(ranks, shards)
    from convc.runtime.checkpoint import latest_valid_checkpoint

    a, b = latest_valid_checkpoint(ranks)[1], latest_valid_checkpoint(shards)[1]
    carry = sorted(k for k in a if k.startswith("carry/"))
    assert carry and all(a[k].tobytes() == b[k].tobytes() for k in carry)
    assert a[carry[0]].shape[0] == 6  # the whole batch's states, both shards'


@needs_mpi
def test_each_rank_reads_its_rows_of_a_npy_file(tmp_path):
    clips = np.random.default_rng(2).integers(0, 256, (40, 11, 16, 16), dtype=np.uint8)
    np.save(tmp_path / "clips.npy", clips)
    ranks, shards = tmp_path / "ranks", tmp_path / "shards"
    args = ["train", SEED, "--steps", "4", *RUN, "--data", str(tmp_path / "clips.npy")]
    _ok(mpirun(2, [*args, "--out", str(ranks)], tmp_path))
    _ok(alone([*args, "--shards", "2", "--out", str(shards)], tmp_path))
    _same_run(ranks, shards)


@needs_mpi
@pytest.mark.parametrize("backend", BACKENDS)
def test_resumed_on_another_number_of_ranks(tmp_path, backend):
    """2 ranks to step 4, then 3 ranks to step 8: bitwise one process with --shards 2 to
    step 4, resumed with --shards 3 (the documented rule: the shards are the ranks)."""
    ranks, shards = tmp_path / "ranks", tmp_path / "shards"
    args = ["train", SEED, *RUN, *_device(backend)]
    _ok(mpirun(2, [*args, "--steps", "4", "--out", str(ranks)], tmp_path))
    resumed = mpirun(3, [*args, "--steps", "8", "--resume", "--out", str(ranks)], tmp_path)
    _ok(resumed)
    assert "shards=3 (was 2)" in resumed.stderr
    assert resumed.stderr.count("shards=3 (was 2)") == 1  # rank 0 alone notes it
    _ok(alone([*args, "--steps", "4", "--shards", "2", "--out", str(shards)], tmp_path))
    _ok(alone([*args, "--steps", "8", "--shards", "3", "--resume", "--out", str(shards)],
              tmp_path))
    _same_run(ranks, shards)
    # and a 3-rank run resumed alone keeps its 3 shards
    alone_too = tmp_path / "alone"
    _ok(mpirun(3, [*args, "--steps", "4", "--out", str(alone_too)], tmp_path))
    _ok(alone([*args, "--steps", "8", "--resume", "--out", str(alone_too)], tmp_path))
    reference = tmp_path / "reference"
    _ok(alone([*args, "--steps", "4", "--shards", "3", "--out", str(reference)], tmp_path))
    _ok(alone([*args, "--steps", "8", "--shards", "3", "--resume", "--out", str(reference)],
              tmp_path))
    _same_run(alone_too, reference)


# ---------------------------------------------------------------- faults

@needs_mpi
def test_a_setting_every_rank_refuses_ends_the_run_at_once(tmp_path):
    out = tmp_path / "run"
    t0 = time.monotonic()
    result = mpirun(2, ["train", SEED, *RUN, "--steps", "3", "--shards", "3",
                        "--out", str(out)], tmp_path, timeout=120)
    assert time.monotonic() - t0 < 60
    assert result.returncode == 1
    assert "shards=3 does not match the 2 MPI ranks" in result.stderr
    assert not out.exists()


@needs_mpi
def test_rank_0_refusing_the_folder_ends_every_rank(tmp_path):
    """Only rank 0 opens --out; when it refuses it, rank 1 hears why and stops too."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = mpirun(2, ["train", SEED, *RUN, "--steps", "3", "--out", str(out)], tmp_path,
                    timeout=120)
    assert result.returncode == 1
    assert "rank 0 (pid" in result.stderr and "failed during setup" in result.stderr
    assert "holds notes.txt" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def _reference(tmp_path, steps: int, shards: int = 2) -> Path:
    folder = tmp_path / f"reference-{steps}"
    _ok(alone(["train", SEED, *RUN, "--steps", str(steps), "--shards", str(shards),
               "--out", str(folder)], tmp_path))
    return folder


@needs_mpi
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rank_that_raises_ends_every_rank_and_resume_continues(tmp_path, backend):
    out = tmp_path / "run"
    args = ["train", SEED, *RUN, *_device(backend), "--steps", "8", "--checkpoint-every", "3",
            "--out", str(out)]
    t0 = time.monotonic()
    result = mpirun(2, args, tmp_path, script=[sys.executable, FAULTY, "1", "5", "raise"],
                    timeout=120)
    assert time.monotonic() - t0 < 100
    assert result.returncode != 0
    assert "RuntimeError: planted fault in rank 1 at step 5" in result.stderr
    assert "rank 1 (pid" in result.stderr and "failed at step 5" in result.stderr
    assert f"saved step 4 to {out / 'ckpt-00000004.npz'}" in result.stderr
    assert _params(out)[1]["step"] == 4
    _ok(mpirun(2, [*args, "--resume"], tmp_path))
    _same_run(out, _reference(tmp_path, 8))


@needs_mpi
def test_a_killed_rank_ends_every_rank_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    args = ["train", SEED, *RUN, "--steps", "8", "--checkpoint-every", "3", "--out", str(out)]
    t0 = time.monotonic()
    result = mpirun(2, args, tmp_path, script=[sys.executable, FAULTY, "1", "5", "kill"],
                    timeout=120)
    assert time.monotonic() - t0 < 100
    assert result.returncode != 0
    # the launcher names the process (its pid), which the run's first lines map to a rank
    line = next(x for x in result.stderr.splitlines() if "one shard of the batch each" in x)
    pid = line.split("rank 1 (pid ")[1].split()[0]
    said = (result.stdout + result.stderr).replace(line, "")
    assert pid in said and ("signal 9" in said or "Killed" in said), said[-2000:]
    assert _params(out)[1]["step"] in (3, 4)  # the last checkpoint, or step 4 if saved
    _ok(mpirun(2, [*args, "--resume"], tmp_path))
    _same_run(out, _reference(tmp_path, 8))


@needs_mpi
def test_a_rank_that_hangs_is_named_after_the_timeout(tmp_path):
    out = tmp_path / "run"
    args = ["train", SEED, *RUN, "--steps", "8", "--checkpoint-every", "3", "--timeout", "3",
            "--out", str(out)]
    t0 = time.monotonic()
    result = mpirun(2, args, tmp_path, script=[sys.executable, FAULTY, "1", "5", "hang"],
                    timeout=120)
    took = time.monotonic() - t0
    assert result.returncode != 0 and took < 60
    assert "no word from rank 1 (pid" in result.stderr and "at step 5" in result.stderr
    assert "it died or hangs" in result.stderr
    assert f"saved step 4 to {out / 'ckpt-00000004.npz'}" in result.stderr
    _ok(mpirun(2, [*args, "--resume"], tmp_path))
    _same_run(out, _reference(tmp_path, 8))


@needs_mpi
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1],
                         ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_to_the_launcher_saves_the_last_step(tmp_path, signum):
    """SIGTERM as a single process takes it; SIGUSR1, which Open MPI's mpirun forwards
    without ending the job, the same way under MPI."""
    out = tmp_path / "run"
    args = ["train", SEED, *RUN, "--steps", "2000", "--out", str(out)]
    launcher = subprocess.Popen([*MPIRUN, "-n", "2", *CONVC, *args], cwd=tmp_path, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            log = out / "log.csv"
            if log.exists() and len(log.read_text().splitlines()) > 4:
                break
            time.sleep(0.2)
        launcher.send_signal(signum)
        _, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    name = signal.Signals(signum).name
    assert f"stopped by {name}: saved step" in err, err[-2000:]
    assert launcher.returncode == 128 + signum
    assert err.count(f"{name}: stopping after this step") == 1  # said once, by rank 0
    step = _params(out)[1]["step"]
    rows = _log(out)
    assert int(rows[-1].split(",")[0]) == step > 3
    total = step + 3
    resume = ["train", SEED, *RUN, "--steps", str(total), "--out", str(out), "--resume"]
    _ok(mpirun(2, resume, tmp_path))
    _same_run(out, _reference(tmp_path, total))

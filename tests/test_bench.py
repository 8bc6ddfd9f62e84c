"""runtime/bench.py (`convc bench`), bench/peer_adapter.py, bench/gpu_check.py,
bench/gemm_floor.py and bench/winograd_trial.py."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

import convc.api as api
from convc.runtime import bench
from convc.runtime.backend import get_backend
from helpers import ROOT

TINY = dict(N=2, T=3, Cin=1, H=8, hidden=3, k=3, layers=1)


def _module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def peers_formula(cfg: dict) -> int:
    """The peer yardstick's nominal FLOPs of one step (common.conv_flops), by hand."""
    n, t, h, ch, k = cfg["N"], cfg["T"], cfg["H"], cfg["hidden"], cfg["k"]
    fwd = 0
    for layer in range(cfg["layers"]):
        c = (cfg["Cin"] if layer == 0 else ch) + ch
        fwd += 2 * n * t * h * h * 4 * ch * c * k * k
    fwd += 2 * n * t * h * h * cfg["Cin"] * ch
    return 3 * fwd


@pytest.mark.parametrize("name", sorted(bench.CONFIGS))
def test_flop_count_from_the_graph_matches_the_peers_formula(name):
    cfg = dict(bench.CONFIGS[name], name=name)
    mod = api.load(None, text=bench.peer_cell_text(cfg))
    flops = bench.conv_flops(mod, {"x": cfg["T"]}, cfg["N"])
    assert flops["total"] == peers_formula(cfg)
    assert flops["backward"] == 2 * flops["forward"]


def test_run_and_report(monkeypatch):
    monkeypatch.setitem(bench.CONFIGS, "tiny", TINY)
    report = bench.run(config="tiny", steps=2, warmup=1, threads=1, peak=True)
    (r,) = report["results"]
    assert r["name"] == "tiny" and r["timed_steps"] >= 2
    assert r["median_ms"] > 0 and r["gflops"] > 0
    assert r["flops"]["total"] == peers_formula(TINY)
    assert np.isfinite(r["loss_first"]) and r["loss_last"] < r["loss_first"] + 1.0
    assert report["gemm_peak"]["gflops"] > 0 and 0 < r["peak_fraction"]
    text = bench.format_report(report)
    assert "tiny" in text and "GEMM peak" in text and "% peak" in text
    json.dumps(report)  # serialisable for --json


def test_run_on_a_cell_file():
    report = bench.run(spec=ROOT / "examples" / "stack.cell", steps=1, warmup=0, threads=1,
                       batch=2, frames=3, peak=False)
    (r,) = report["results"]
    assert r["name"] == "stack.cell" and r["flops"]["total"] > 0
    assert "gemm_peak" not in report


def test_run_with_recompute_trains_the_same():
    kw = dict(spec=ROOT / "examples" / "stack.cell", steps=2, warmup=0, threads=1, batch=2,
              frames=5, peak=False)
    plain = bench.run(**kw)["results"][0]
    report = bench.run(recompute=2, **kw)
    windowed = report["results"][0]
    assert report["recompute"] == 2 and "recompute=2" in bench.format_report(report)
    assert abs(windowed["loss_last"] - plain["loss_last"]) <= 1e-5 * abs(plain["loss_last"])


def test_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.CONFIGS, "tiny", TINY)
    out = tmp_path / "bench.json"
    assert bench.main(["--config", "tiny", "--steps", "1", "--warmup", "0", "--threads", "1",
                       "--no-peak", "--json", str(out)]) == 0
    assert "tiny" in capsys.readouterr().out
    assert json.loads(out.read_text())["results"][0]["name"] == "tiny"


# ---------------------------------------------------------------- the peer adapter

@pytest.fixture(scope="module")
def adapter():
    return _module(ROOT / "bench" / "peer_adapter.py", "convc_peer_adapter_test")


def _peer_params(cfg, rng):
    ch, k = cfg["hidden"], cfg["k"]
    p = {}
    for layer in range(cfg["layers"]):
        c = (cfg["Cin"] if layer == 0 else ch) + ch
        p[f"l{layer}.W"] = rng.uniform(-0.3, 0.3, (4 * ch, c, k, k)).astype(np.float32)
        p[f"l{layer}.b"] = rng.uniform(-0.1, 0.1, 4 * ch).astype(np.float32)
    p["head.W"] = rng.uniform(-0.5, 0.5, (cfg["Cin"], ch, 1, 1)).astype(np.float32)
    p["head.b"] = rng.uniform(-0.1, 0.1, cfg["Cin"]).astype(np.float32)
    return p


def _reference_loss(cfg, p, data):
    """The peers' model written out in NumPy (float64), for the step-0 loss."""
    from convc.compiler.reference import conv2d
    x, y = data[:, :-1].astype(np.float64), data[:, 1:].astype(np.float64)
    n, t = x.shape[:2]
    ch, k = cfg["hidden"], cfg["k"]
    seq = [x[:, s] for s in range(t)]
    for layer in range(cfg["layers"]):
        h = np.zeros((n, ch) + x.shape[-2:])
        c = np.zeros_like(h)
        out = []
        for s in range(t):
            z = conv2d(np.concatenate([seq[s], h], 1), p[f"l{layer}.W"].astype(np.float64),
                           (1, 1), (k // 2, k // 2), (1, 1))
            z += p[f"l{layer}.b"][None, :, None, None]
            i, f, o, g = np.split(z, 4, axis=1)
            sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
            c = sig(f) * c + sig(i) * np.tanh(g)
            h = sig(o) * np.tanh(c)
            out.append(h)
        seq = out
    logits = np.stack([conv2d(h, p["head.W"].astype(np.float64), (1, 1), (0, 0), (1, 1))
                       for h in seq], 1) + p["head.b"][None, None, :, None, None]
    return float(np.mean(np.maximum(logits, 0) - logits * y + np.log1p(np.exp(-np.abs(logits)))))


@pytest.mark.parametrize("layers", [1, 2])
def test_adapter_loss_matches_the_peers_model(adapter, layers):
    cfg = dict(TINY, layers=layers, name="tiny", peephole=False, loss="bce")
    rng = np.random.default_rng(layers)
    p = _peer_params(cfg, rng)
    data = (rng.uniform(0, 1, (cfg["N"], cfg["T"] + 1, 1, 8, 8)) > 0.6).astype(np.float32)
    model = adapter.build_model(cfg, p, data, 0.1)
    loss, grads = model.loss_and_grads()
    assert sorted(grads) == sorted(p)
    assert all(grads[k].shape == p[k].shape for k in p)
    assert loss == pytest.approx(_reference_loss(cfg, p, data), abs=1e-5)
    first = model.train_step()
    assert first == pytest.approx(loss, abs=1e-6)
    assert model.train_step() < first  # SGD went downhill
    assert "convc" in adapter.versions()


# ---------------------------------------------------------------- gpu_check

def test_gpu_check_fails_cleanly_without_cupy():
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--quick"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "CuPy" in proc.stderr and "Traceback" not in proc.stderr


def test_gpu_check_logic_runs_on_the_cpu_backend():
    """The checks themselves, with NumPy standing in for CuPy."""
    gc = _module(ROOT / "bench" / "gpu_check.py", "convc_gpu_check_test")
    cpu = get_backend("cpu")
    f = gc.check_float64(cpu)
    assert f["ok"] and f["grad_max_rel_diff"] == 0.0
    monkey = dict(gc.CONFIG_SET)
    gc.CONFIG_SET["small"] = dict(TINY)
    try:
        assert gc.check_repeatable(cpu)["bitwise_identical"]
        t = gc.time_convc(cpu, "small", 1, deadline=float("inf"))
        assert t["steps"] == 1 and t["median_ms"] > 0
    finally:
        gc.CONFIG_SET.clear()
        gc.CONFIG_SET.update(monkey)


# ---------------------------------------------------------------- gemm_floor

@pytest.fixture(scope="module")
def gemm_floor():
    return _module(ROOT / "bench" / "gemm_floor.py", "convc_gemm_floor_test")


def test_gemm_floor_records_each_threads_gemms_and_replays_them(gemm_floor):
    """Calls in a worker thread are recorded under that thread; FLOPs count batched
    products; the replay's operands have the recorded shapes and strides."""
    import threading

    a = np.ones((3, 4, 5), np.float32)
    b = np.ones((5, 6), np.float32).T.copy().T  # an F-ordered operand
    w = np.ones((8, 7))[:, 1:]  # a strided one

    def step():
        np.matmul(a, b)
        t = threading.Thread(target=lambda: np.matmul(w, np.ones((6, 2)), out=np.empty((8, 2))))
        t.start()
        t.join()

    matmul = np.matmul
    calls, _ = gemm_floor.record(step)
    assert np.matmul is matmul and len(calls) == 2  # put back
    main = calls[threading.main_thread().ident]
    (other,) = [v for k, v in calls.items() if k != threading.main_thread().ident]
    assert gemm_floor.flops(main) == 2 * 3 * 4 * 5 * 6
    assert gemm_floor.flops(other) == 2 * 8 * 6 * 2
    ops = gemm_floor.operands(other, seed=0)
    (wa, wb, wo), = ops
    assert wa.shape == w.shape and wa.strides == w.strides and wo.shape == (8, 2)
    gemm_floor.replay([gemm_floor.operands(main, 1), ops])  # every set in its own thread


def test_gemm_floor_prints_the_steps_share(gemm_floor, capsys):
    assert gemm_floor.main(["--config", "seed", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "training step" in out and "its GEMMs alone" in out and "GEMM share" in out


# ---------------------------------------------------------------- winograd_trial

@pytest.fixture(scope="module")
def winograd_trial():
    return _module(ROOT / "bench" / "winograd_trial.py", "convc_winograd_trial_test")


@pytest.mark.parametrize("m, r", [(2, 5), (2, 3), (4, 3)])
def test_winograd_transforms_compute_a_correlation(winograd_trial, m, r):
    """A^T [(G g) * (B^T d)] is the valid correlation of d with g, for random d and g."""
    at, g, bt = winograd_trial.transforms(m, r)
    rng = np.random.default_rng(m * 10 + r)
    d = rng.standard_normal(m + r - 1)
    k = rng.standard_normal(r)
    expected = np.correlate(d, k, mode="valid")
    np.testing.assert_allclose(at @ ((g @ k) * (bt @ d)), expected, rtol=1e-12, atol=1e-12)


def test_winograd_trial_kernels_agree_with_convc(winograd_trial):
    """float64 to rounding against convc's direct kernels, also through the backend
    subclass with strided (channel-major) gy and a slice of a larger output."""
    assert winograd_trial.main(["--quick"]) == 0
    rng = np.random.default_rng(5)
    direct, wino = get_backend("cpu"), winograd_trial.WinogradBackend(min_channels=1)
    x = rng.standard_normal((3, 6, 8, 8))
    w = rng.standard_normal((10, 6, 5, 5))
    gy = rng.standard_normal((10, 3, 8, 8)).transpose(1, 0, 2, 3)  # channel-major
    geo = ((1, 1), (2, 2), (1, 1))
    big = np.zeros((3, 14, 8, 8))
    wino.conv2d(x, w, *geo, out=big[:, 2:12])
    np.testing.assert_allclose(big[:, 2:12], direct.conv2d(x, w, *geo), rtol=1e-12, atol=1e-12)
    assert not big[:, :2].any() and not big[:, 12:].any()
    np.testing.assert_allclose(wino.conv2d_grad_input(gy, w, x.shape, *geo),
                               direct.conv2d_grad_input(gy, w, x.shape, *geo),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(wino.conv2d_grad_weight(x, gy, w.shape, *geo),
                               direct.conv2d_grad_weight(x, gy, w.shape, *geo),
                               rtol=1e-12, atol=1e-12)


def test_gpu_check_two_gpu_case_runs_its_plumbing_on_the_cpu():
    """Step 4 (two GPUs through NCCL against --shards 2 on one) with the CPU and MPI in
    their place: the launch, the flags and the comparison of the logs. It skips,
    saying why, with fewer than two devices."""
    gc = _module(ROOT / "bench" / "gpu_check.py", "convc_gpu_check_test2")

    class Devices:  # what gpu_check reads of CuPy: the number of devices
        def __init__(self, count):
            self.cuda = type("cuda", (), {"runtime": type("rt", (), {
                "getDeviceCount": staticmethod(lambda: count)})})

    one = gc.check_two_gpus(Devices(1))
    assert one == dict(ran=False, why="1 GPU visible; the check needs two")
    pytest.importorskip("mpi4py", reason="the convc[mpi] extra is not installed")
    got = gc.check_two_gpus(Devices(2), steps=2, device="cpu", collectives="mpi")
    assert got["ran"], got
    assert got["ok"], got
    assert len(got["losses_nccl2"]) == 2

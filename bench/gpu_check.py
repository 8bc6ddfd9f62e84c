"""convc on one GPU (CuPy): correctness, repeatability and speed, in under five minutes.

    python bench/gpu_check.py                 # everything, JSON summary on the last line
    python bench/gpu_check.py --quick         # fewer timed steps

1. float64 agreement: the peer yardstick's ConvLSTM (two layers, small
   frames) gives the same loss and gradients on CuPy as on NumPy (relative
   difference <= 1e-10; the two run the same generated code, its fused
   step kernels as CUDA on the GPU and as C on the CPU), and as the plain
   module (fuse=False: one CuPy call per elementwise op) on the GPU.
2. Repeatability: three float32 runs of one batch on the GPU, in
   deterministic mode (ops_cupy.CupyBackend.make_deterministic: no TF32, no
   CUB/cuTENSOR reductions), give bitwise identical losses and gradients.
3. Speed: ms per training step (forward over T, BPTT, SGD update, float32)
   of the three benchmark configurations (`seed`, `small`, `shi2015`),
   synchronised around each step, and the same model in PyTorch on CUDA
   beside it when torch with CUDA can be imported (same weights and data);
   seed also without fused kernels (what the CUDA kernels save).
4. Two GPUs (only where CuPy sees two or more, with mpi4py and mpirun):
   `mpirun -n 2 convc train --device gpu --collectives nccl` gives bitwise
   the losses of one process with `--shards 2` on one GPU
   (runtime/distributed.py's NCCL path, docs/distributed.md).

Without CuPy or a GPU it stops at once with a message and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

SMALL_CHECK = dict(name="gpu_check", N=2, T=4, Cin=2, H=8, hidden=4, k=3, layers=2)
TIME_LIMIT_S = 270  # stop starting new work after this (the whole check must stay < 5 min)


def gpu_backend():
    """The deterministic CuPy backend, or raise BackendError saying what is missing."""
    from convc.runtime.ops_cupy import set_deterministic_environment

    set_deterministic_environment()  # before CuPy is imported: TF32 off, no CUB
    from convc.runtime.backend import get_backend

    backend = get_backend("gpu")
    warnings = backend.make_deterministic()
    return backend, warnings


def peer_params(mod, cfg: dict, seed: int, dtype) -> dict:
    """Weights drawn like the peers' common.make_params (Glorot, forget bias 1)."""
    rng = np.random.default_rng(seed)
    ch, k = cfg["hidden"], cfg["k"]
    out = {}
    for layer in range(cfg["layers"]):
        cin = cfg["Cin"] if layer == 0 else ch
        c = cin + ch
        a = np.sqrt(6.0 / (c * k * k + 4 * ch * k * k))
        out[f"l{layer}.W"] = rng.uniform(-a, a, (4 * ch, c, k, k))
        b = np.zeros(4 * ch)
        b[ch:2 * ch] = 1.0
        out[f"l{layer}.b"] = b + rng.uniform(-0.05, 0.05, 4 * ch)
    a = np.sqrt(6.0 / (ch + cfg["Cin"]))
    out["head_W"] = rng.uniform(-a, a, (cfg["Cin"], ch, 1, 1))
    out["head_b"] = rng.uniform(-0.05, 0.05, cfg["Cin"])
    assert sorted(out) == sorted(mod.MODEL["params"]), sorted(mod.MODEL["params"])
    return {k_: v.astype(dtype) for k_, v in out.items()}


def batch(cfg: dict, seed: int, dtype):
    rng = np.random.default_rng(seed)
    shape = (cfg["N"], cfg["T"] + 1, cfg["Cin"], cfg["H"], cfg["H"])
    data = (rng.uniform(0, 1, shape) > 0.7).astype(dtype)
    return {"x": data[:, :-1]}, {"y": data[:, 1:]}


def load(cfg: dict, fuse: bool | None = None):
    import convc.api as api
    from convc.runtime.bench import peer_cell_text

    return api.load(None, text=peer_cell_text(cfg), fuse=fuse)


def to_device(backend, tree: dict) -> dict:
    return {k: backend.asarray(v) for k, v in tree.items()}


def check_float64(backend) -> dict:
    mod = load(SMALL_CHECK)
    params = peer_params(mod, SMALL_CHECK, 0, np.float64)
    inputs, targets = batch(SMALL_CHECK, 1, np.float64)
    loss_c, grads_c, _ = mod.loss_and_grad(params, inputs, targets)
    loss_g, grads_g, _ = mod.loss_and_grad(to_device(backend, params), inputs, targets,
                                           backend=backend)
    worst = 0.0
    for name, g in grads_c.items():
        diff = np.abs(backend.asnumpy(grads_g[name]) - g).max() / max(np.abs(g).max(), 1e-300)
        worst = max(worst, float(diff))
    loss_diff = abs(float(loss_g) - float(loss_c)) / max(abs(float(loss_c)), 1e-300)
    from convc.runtime.fused import CudaKernel

    kernels = getattr(mod, "FK", None)
    cuda = kernels is not None and isinstance(
        next(iter(vars(kernels.of(np.float64, backend)).values()), None), CudaKernel)
    plain = load(SMALL_CHECK, fuse=False)
    loss_p, grads_p, _ = plain.loss_and_grad(to_device(backend, params), inputs, targets,
                                             backend=backend)
    plain_worst = max(float(np.abs(backend.asnumpy(grads_g[k]) - backend.asnumpy(g)).max()
                            / max(float(np.abs(backend.asnumpy(g)).max()), 1e-300))
                      for k, g in grads_p.items())
    return dict(loss_cpu=float(loss_c), loss_gpu=float(loss_g), loss_rel_diff=loss_diff,
                grad_max_rel_diff=worst, cuda_kernels=bool(cuda),
                fused_vs_plain_grad_max_rel_diff=plain_worst,
                ok=bool(worst <= 1e-10 and loss_diff <= 1e-12 and plain_worst <= 1e-10))


def check_repeatable(backend, runs: int = 3) -> dict:
    cfg = dict(CONFIG_SET["small"], name="repeat")
    mod = load(cfg)
    params = to_device(backend, peer_params(mod, cfg, 0, np.float32))
    inputs, targets = batch(cfg, 1, np.float32)
    results = []
    for _ in range(runs):
        loss, grads, _ = mod.loss_and_grad(params, inputs, targets, backend=backend)
        results.append((float(loss), {k: backend.asnumpy(v) for k, v in grads.items()}))
    same = all(r[0] == results[0][0] and
               all(np.array_equal(r[1][k], results[0][1][k]) for k in r[1])
               for r in results[1:])
    return dict(runs=runs, losses=[r[0] for r in results], bitwise_identical=bool(same))


def time_convc(backend, name: str, steps: int, deadline: float, fuse=None) -> dict:
    cfg = dict(CONFIG_SET[name], name=name)
    mod = load(cfg, fuse=fuse)
    params = to_device(backend, peer_params(mod, cfg, 0, np.float32))
    inputs, targets = batch(cfg, 1, np.float32)
    sync = synchronizer(backend)
    for _ in range(2):
        mod.sgd_step(params, inputs, targets, 0.1, backend=backend)
    sync()
    times = []
    while len(times) < steps and time.perf_counter() < deadline:
        t0 = time.perf_counter()
        mod.sgd_step(params, inputs, targets, 0.1, backend=backend)
        sync()
        times.append(time.perf_counter() - t0)
    return dict(median_ms=statistics.median(times) * 1e3, min_ms=min(times) * 1e3,
                steps=len(times))


def synchronizer(backend):
    """Wait for the device to finish (a no-op for NumPy, so the code runs on the CPU too)."""
    cuda = getattr(backend.xp, "cuda", None)
    if cuda is None:
        return lambda: None
    return cuda.Device().synchronize


def time_torch(name: str, steps: int, deadline: float) -> dict | None:
    """The same ConvLSTM in PyTorch eager on CUDA, or None without torch + CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    import torch.nn.functional as F

    cfg = dict(CONFIG_SET[name], name=name)
    mod = load(cfg)
    p = peer_params(mod, cfg, 0, np.float32)
    dev = torch.device("cuda")
    tp = {k: torch.tensor(v, device=dev, requires_grad=True) for k, v in p.items()}
    inputs, targets = batch(cfg, 1, np.float32)
    x = torch.tensor(inputs["x"], device=dev)
    y = torch.tensor(targets["y"], device=dev)
    ch, k = cfg["hidden"], cfg["k"]
    opt = torch.optim.SGD(list(tp.values()), lr=0.1)

    def step():
        opt.zero_grad(set_to_none=True)
        seq = [x[:, t] for t in range(cfg["T"])]
        for layer in range(cfg["layers"]):
            h = x.new_zeros(cfg["N"], ch, cfg["H"], cfg["H"])
            c = torch.zeros_like(h)
            out = []
            for t in range(cfg["T"]):
                z = F.conv2d(torch.cat([seq[t], h], 1), tp[f"l{layer}.W"], tp[f"l{layer}.b"],
                             padding=k // 2)
                i, f, o, g = torch.split(z, ch, 1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                out.append(h)
            seq = out
        hs = torch.stack(seq, 1).reshape(-1, ch, cfg["H"], cfg["H"])
        logits = F.conv2d(hs, tp["head_W"], tp["head_b"]).reshape(y.shape)
        loss = F.binary_cross_entropy_with_logits(logits, y)
        loss.backward()
        opt.step()
        return loss

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    times = []
    while len(times) < steps and time.perf_counter() < deadline:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return dict(median_ms=statistics.median(times) * 1e3, min_ms=min(times) * 1e3,
                steps=len(times), torch=torch.__version__)


CONFIG_SET = {
    "seed": dict(N=1, T=10, Cin=1, H=16, hidden=8, k=3, layers=1),
    "small": dict(N=8, T=10, Cin=1, H=32, hidden=16, k=3, layers=1),
    "shi2015": dict(N=4, T=10, Cin=16, H=16, hidden=64, k=5, layers=2),
}


def check_two_gpus(xp, steps: int = 4, device: str = "gpu", collectives: str = "nccl") -> dict:
    """2 ranks x 1 GPU through NCCL against 1 process with --shards 2: the losses of
    log.csv, bit for bit. Skipped (saying why) with fewer than two GPUs or no MPI.
    (device="cpu", collectives="mpi" runs the same plumbing on the CPU, for its test.)"""
    import shutil
    import subprocess
    import tempfile

    count = xp.cuda.runtime.getDeviceCount()
    if count < 2:
        return dict(ran=False, why=f"{count} GPU visible; the check needs two")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return dict(ran=False, why="mpi4py is not installed (pip install 'convc[mpi]')")
    bindir = Path(sys.executable).parent
    mpirun = shutil.which("mpirun", path=str(bindir)) or shutil.which("mpirun")
    if mpirun is None:
        return dict(ran=False, why="no mpirun")
    from convc.runtime.runlog import read_log

    spec = str(ROOT / "examples" / "seed.cell")
    common = ["train", spec, "--device", device, "--deterministic", "--steps", str(steps),
              "--batch-size", "4", "--clips", "16", "--quiet"]
    convc = [sys.executable, "-m", "convc"]
    with tempfile.TemporaryDirectory() as tmp:
        one, two = Path(tmp) / "one", Path(tmp) / "two"
        runs = {"shards2": [*convc, *common, "--shards", "2", "--out", str(one)],
                "nccl2": [mpirun, "-n", "2", *convc, *common, "--collectives", collectives,
                          "--distributed", "--out", str(two)]}
        for name, command in runs.items():
            done = subprocess.run(command, capture_output=True, text=True, timeout=240)
            if done.returncode != 0:
                return dict(ran=True, ok=False, failed=name, stderr=done.stderr[-2000:])
        a = [r["loss"].hex() for r in read_log(one / "log.csv")]
        b = [r["loss"].hex() for r in read_log(two / "log.csv")]
    return dict(ran=True, ok=a == b, losses_shards2=a, losses_nccl2=b)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 timed steps instead of 20")
    ap.add_argument("--configs", nargs="+", default=list(CONFIG_SET), choices=list(CONFIG_SET))
    a = ap.parse_args(argv)
    start = time.perf_counter()
    deadline = start + TIME_LIMIT_S
    from convc.errors import BackendError

    try:
        backend, warnings = gpu_backend()
    except BackendError as exc:
        print(f"gpu_check: cannot run: {exc}", file=sys.stderr)
        return 2
    xp = backend.xp
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    report = dict(device=name, cupy=xp.__version__, warnings=warnings,
                  env={k: os.environ.get(k) for k in ("CUPY_TF32", "CUPY_ACCELERATORS",
                                                      "CUBLAS_WORKSPACE_CONFIG")})
    print(f"GPU: {name}, CuPy {xp.__version__}", flush=True)

    report["float64"] = check_float64(backend)
    f = report["float64"]
    print(f"1. float64 CuPy vs NumPy: loss rel diff {f['loss_rel_diff']:.1e}, gradients max "
          f"rel diff {f['grad_max_rel_diff']:.1e}; fused (CUDA kernels: {f['cuda_kernels']}) "
          f"vs plain on the GPU {f['fused_vs_plain_grad_max_rel_diff']:.1e}: "
          f"{'PASS' if f['ok'] else 'FAIL'}", flush=True)
    report["repeat"] = check_repeatable(backend)
    r = report["repeat"]
    print(f"2. {r['runs']} float32 runs bitwise identical: "
          f"{'PASS' if r['bitwise_identical'] else 'FAIL'} (losses {r['losses']})", flush=True)

    steps = 5 if a.quick else 20
    report["timing"] = {}
    print("3. ms per training step (median, float32):", flush=True)
    for cname in a.configs:
        if time.perf_counter() > deadline:
            print(f"   {cname}: skipped (time limit)")
            continue
        row = dict(convc=time_convc(backend, cname, steps, deadline))
        if cname == "seed":  # launch-bound: what the fused CUDA kernels save
            row["convc_plain"] = time_convc(backend, cname, steps, deadline, fuse=False)
        try:
            row["torch_cuda"] = time_torch(cname, steps, deadline)
        except Exception as exc:  # torch is only a comparison: report, do not fail
            row["torch_cuda"] = dict(error=f"{type(exc).__name__}: {exc}")
        report["timing"][cname] = row
        t = row["torch_cuda"]
        tt = f"{t['median_ms']:.2f} ms" if t and "median_ms" in t else \
            (t.get("error") if t else "not available")
        plain = f" (plain {row['convc_plain']['median_ms']:.2f} ms)" if "convc_plain" in row else ""
        print(f"   {cname:8s} convc {row['convc']['median_ms']:8.2f} ms{plain}   torch CUDA {tt}",
              flush=True)
    if time.perf_counter() < deadline:
        report["two_gpus"] = check_two_gpus(xp)
    else:
        report["two_gpus"] = dict(ran=False, why="time limit")
    t2 = report["two_gpus"]
    print("4. two GPUs, NCCL vs --shards 2: " +
          (("PASS" if t2["ok"] else "FAIL") if t2["ran"] else f"not run ({t2['why']})"),
          flush=True)
    report["seconds"] = time.perf_counter() - start
    ok = report["float64"]["ok"] and report["repeat"]["bitwise_identical"] and \
        (not t2["ran"] or t2["ok"])
    report["ok"] = bool(ok)
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

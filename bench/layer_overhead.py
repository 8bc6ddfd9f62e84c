"""What a training step costs through convc.torch.Layer, against the compiled module's own.

For the peer yardstick's seed and small configurations
(/work/shared/bench/peers/common.py CONFIGS, written as `.cell` text by
convc.runtime.bench.peer_cell_text), in float32, at 1 and 2 threads:

- convc: the module's own step, `loss_and_grad` and a plain SGD update of
  every parameter (what `sgd_step` does);
- vjp: the Layer's step without torch: `vjp_start`, the BCE's cotangent in
  NumPy, the pullback, the SGD update (what the generated VJP costs over
  `loss_and_grad`);
- torch (Layer): the same model as a `convc.torch.Layer`: its forward pass,
  the BCE loss of its prediction in torch, `loss.backward()` (the generated
  VJP), `torch.optim.SGD.step()`;
- torch floor: that step with the layer replaced by a stand-in of no cost
  (an autograd Function that hands back a prediction and gradients made
  beforehand): what torch's loss, autograd and optimizer cost by themselves,
  whatever the layer. `Layer - floor` is what the layer itself costs in a
  torch step; its ratio to convc is the layer's overhead.

With 2 threads on a machine of 2 cores, torch's OpenMP threads spin for a
while after each parallel torch op (the loss, the optimizer) and take the
cores from convc's shard threads; `--omp-passive` makes them sleep
(OMP_WAIT_POLICY=PASSIVE), as a user would on such a machine.

Each round runs `--steps` steps of each, one of one then one of the other
(after warm-up steps of both), so that both see the same load of a shared
machine; a round's figure is the median ms per step of each, the result the
median over `--rounds` rounds, and the ratios to convc of those medians. Threads: BLAS
(threadpoolctl) and torch's intra-op pool, both set to the count.

    .venv/bin/python bench/layer_overhead.py
    .venv/bin/python bench/layer_overhead.py --configs small --threads 2 --rounds 9
    .venv/bin/python bench/layer_overhead.py --omp-passive
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

LR = 0.1


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "?"
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                  if ln.startswith("model name")), "?")
    flags = sorted({f for f in text.split() if f == "avx2" or f.startswith("avx512")})
    return f"{model}; {' '.join(flags) or 'no avx2'}"


def setup(name: str):
    import convc
    from convc.runtime.bench import CONFIGS, _batch, peer_cell_text

    cfg = dict(CONFIGS[name], name=name)
    mod = convc.load(None, text=peer_cell_text(cfg), vjp=True)
    inputs, targets, _ = _batch(mod, cfg["N"], cfg["T"], None, 1, np.float32)
    return mod, inputs, targets


def convc_stepper(mod, inputs, targets):
    params = mod.init_params(seed=0, dtype="float32")

    def step():
        loss, grads, _ = mod.loss_and_grad(params, inputs, targets)
        for k in sorted(params):
            params[k] -= LR * grads[k]
        return loss
    return step


def vjp_stepper(mod, inputs, targets):
    """The Layer's step without torch: vjp_start, the BCE's cotangent in NumPy, the
    pullback, SGD. What it costs over `convc` is the generated vjp's (it also makes
    the inputs' and the initial states' cotangents); the Layer's over it, torch's."""
    params = mod.init_params(seed=0, dtype="float32")
    (out_name,), y = list(mod.MODEL["outputs"]), next(iter(targets.values()))

    def step():
        outputs, _, pullback = mod.vjp_start(params, inputs)
        p = outputs[out_name]
        ct = (p - y) / (np.maximum(p * (1 - p), 1e-12) * p.size)
        grads, _, _ = pullback({out_name: ct})
        for k in sorted(params):
            params[k] -= LR * grads[k]
    return step


def torch_stepper(mod, inputs, targets):
    import torch

    import convc.torch as ct

    layer = ct.Layer(mod, dtype=torch.float32, seed=0)
    opt = torch.optim.SGD(layer.parameters(), lr=LR)
    x = {k: torch.from_numpy(v) for k, v in inputs.items()}
    y = torch.from_numpy(next(iter(targets.values())))

    def step():
        opt.zero_grad()
        pred = layer(x)
        loss = torch.nn.functional.binary_cross_entropy(pred, y)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def floor_stepper(mod, inputs, targets):
    """The torch step of torch_stepper with a stand-in layer of no cost."""
    import torch

    import convc.torch as ct

    layer = ct.Layer(mod, dtype=torch.float32, seed=0)
    x = {k: torch.from_numpy(v) for k, v in inputs.items()}
    y = torch.from_numpy(next(iter(targets.values())))
    with torch.no_grad():
        pred0 = layer(x)
    params = list(layer.parameters())
    grads = [torch.zeros_like(p) for p in params]

    class StandIn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *tensors):
            return pred0.clone()

        @staticmethod
        def backward(ctx, g):
            return tuple(grads)

    opt = torch.optim.SGD(params, lr=LR)

    def step():
        opt.zero_grad()
        pred = StandIn.apply(*params)
        loss = torch.nn.functional.binary_cross_entropy(pred, y)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def alternated(steppers, n: int) -> list[float]:
    """n steps of each stepper, one of each in turn (so that all see the same machine
    load); the median ms per step of each."""
    times = [[] for _ in steppers]
    for _ in range(n):
        for k, step in enumerate(steppers):
            t0 = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def measure(name: str, threads: int, rounds: int, steps: int, warmup: int) -> dict:
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    mod, inputs, targets = setup(name)
    with threadpool_limits(limits=threads):
        kinds = {"convc": convc_stepper, "vjp": vjp_stepper, "torch": torch_stepper,
                 "floor": floor_stepper}
        steppers = [make(mod, inputs, targets) for make in kinds.values()]
        first = [step() for step in steppers]  # the same start: the same loss
        for _ in range(warmup):
            for step in steppers:
                step()
        ms = {k: [] for k in kinds}
        for _ in range(rounds):
            for k, t in zip(kinds, alternated(steppers, steps)):
                ms[k].append(t)
    med = {k: statistics.median(v) for k, v in ms.items()}
    own = [t - f for t, f in zip(ms["torch"], ms["floor"])]  # per round: the layer's part
    return dict(config=name, threads=threads, convc_ms=med["convc"], vjp_ms=med["vjp"],
                torch_ms=med["torch"], ratio=med["torch"] / med["convc"],
                floor_ms=med["floor"], own_ratio=statistics.median(own) / med["convc"],
                vjp_ratio=med["vjp"] / med["convc"], first_loss=(first[0], first[2]),
                spread={k: (min(v), max(v)) for k, v in ms.items()})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["seed", "small"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=0, help="steps per round (0: by config)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--omp-passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE for torch's OpenMP pool (set before torch is "
                         "imported): its idle threads sleep instead of spinning")
    args = ap.parse_args(argv)
    if args.omp_passive:
        if "torch" in sys.modules:
            raise SystemExit("--omp-passive: torch is imported already")
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    import torch

    print(f"cpu: {cpu_flags()}; {os.cpu_count()} cores; load {' '.join(map(str, os.getloadavg()))}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}"
          f", OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print(f"{'config':8} {'threads':>7} {'convc ms':>9} {'vjp ms':>8} {'Layer ms':>9} "
          f"{'floor ms':>9} {'vjp/convc':>9} {'Layer/convc':>11} {'(Layer-floor)/convc':>19}"
          f"   (median of {args.rounds} rounds; min-max convc | Layer)")
    for name in args.configs:
        for threads in args.threads:
            steps = args.steps or {"seed": 40}.get(name, 8)
            r = measure(name, threads, args.rounds, steps, args.warmup)
            sa, sb = r["spread"]["convc"], r["spread"]["torch"]
            print(f"{name:8} {threads:>7} {r['convc_ms']:9.2f} {r['vjp_ms']:8.2f} "
                  f"{r['torch_ms']:9.2f} {r['floor_ms']:9.2f} {r['vjp_ratio']:9.3f} "
                  f"{r['ratio']:11.3f} {r['own_ratio']:19.3f}   "
                  f"({sa[0]:.2f}-{sa[1]:.2f} | {sb[0]:.2f}-{sb[1]:.2f}; "
                  f"first loss {r['first_loss'][0]:.5f} / {r['first_loss'][1]:.5f})",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

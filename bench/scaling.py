"""Data-parallel scaling on one machine: 1 rank x 2 threads against 2 ranks x 1 thread.

    python bench/scaling.py                       # all configs; starts mpirun itself
    python bench/scaling.py --config shi2015 --steps 20 --json scaling.json

For each of runtime/bench.py's configs (seed, small, shi2015; the peer
yardstick's ConvLSTM, written by `peer_cell_text`) it times a training
step of the whole batch (loss_and_grad + SGD update):

- alone: one process with 2 BLAS threads (kernels.in_shards cuts the batch
  into two thread shards when the step is large enough);
- ranks: `mpirun -n 2`, one BLAS thread each, each rank its half of the
  batch, then runtime/distributed.py's status round and fixed-order
  gradient exchange (all-to-all, rank-order sum, all-gather) and the same
  update on every rank. The exchange's seconds are timed apart.

Efficiency is alone / ranks (the same two cores and the same global batch:
1.0 means the processes cost nothing over the threads). "waiting" is the
status round, where the rank that finished its shard first waits for the
other; "gradient exchange" the all-to-all, sum and all-gather; "exchange %"
both as a share of rank 0's step (medians over the timed steps).
A batch of one cannot be cut: the seed config (N=1) is timed at N=2 too.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _model(name: str, batch: int | None):
    from convc import api
    from convc.runtime.bench import CONFIGS, _batch, peer_cell_text

    cfg = dict(CONFIGS[name], name=name)
    if batch is not None:
        cfg["N"] = batch
    mod = api.load(None, text=peer_cell_text(cfg))
    inputs, targets, _ = _batch(mod, cfg["N"], cfg["T"], None, 1, "float32")
    return cfg, mod, inputs, targets


def _sgd(params: dict, grads: dict, lr: float = 0.01) -> None:
    for name in sorted(params):
        params[name] -= lr * grads[name]


def time_alone(name: str, batch: int | None, steps: int, warmup: int, threads: int) -> dict:
    from threadpoolctl import threadpool_limits

    cfg, mod, inputs, targets = _model(name, batch)
    params = mod.init_params(seed=0, dtype="float32")
    times = []
    with threadpool_limits(limits=threads):
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            _, grads, _ = mod.loss_and_grad(params, inputs, targets)
            _sgd(params, grads)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return {"config": name, "batch": cfg["N"], "threads": threads,
            "step_ms": statistics.median(times) * 1e3}


def time_ranks(name: str, batch: int | None, steps: int, warmup: int) -> dict | None:
    """One rank's part of the 2-rank measurement (run under mpirun)."""
    from threadpoolctl import threadpool_limits

    from convc.runtime import distributed
    from convc.runtime.kernels import shard_bounds, shard_weights

    cfg, mod, inputs, targets = _model(name, batch)
    group = distributed.open_group("cpu", "mpi", margin=30.0)
    bounds = shard_bounds(cfg["N"], group.size)
    weights = shard_weights(bounds, cfg["N"])
    a, b = bounds[group.rank]
    mine_in = {k: v[a:b] for k, v in inputs.items()}
    mine_tg = {k: v[a:b] for k, v in targets.items()}
    params = mod.init_params(seed=0, dtype="float32")
    size = sum(int(v.size) for v in params.values())
    times, exchange, compute, status = [], [], [], []
    with threadpool_limits(limits=1):
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            loss, grads, _ = mod.loss_and_grad(params, mine_in, mine_tg)
            t1 = time.perf_counter()
            group.exchange("step", i, loss=float(loss))
            t_status = time.perf_counter()
            grads = group.sum_gradients(grads, weights[group.rank])
            t2 = time.perf_counter()
            _sgd(params, grads)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                exchange.append(t2 - t1)
                compute.append(t1 - t0)
                status.append(t_status - t1)
    # the slower rank's compute: the status round is the faster one waiting for it
    slowest = group.exchange("compute", 0, compute=statistics.median(compute))
    group.farewell()
    if group.rank != 0:
        return None
    step = statistics.median(times)
    return {"config": name, "batch": cfg["N"], "ranks": group.size, "params": size,
            "gradient_bytes": size * 4, "step_ms": step * 1e3,
            "exchange_ms": statistics.median(exchange) * 1e3,
            "status_ms": statistics.median(status) * 1e3,
            "compute_ms": [st["compute"] * 1e3 for st in slowest]}


def _mpirun() -> list[str]:
    mpirun = Path(sys.executable).parent / "mpirun"
    command = [str(mpirun) if mpirun.exists() else "mpirun"]
    version = subprocess.run([*command, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version:
        command += ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return command


def measure(name: str, batch: int | None, steps: int, warmup: int) -> dict:
    alone = time_alone(name, batch, steps, warmup, threads=2)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([*_mpirun(), "-n", "2", sys.executable, __file__, "--rank-part",
                          "--config", name, "--steps", str(steps), "--warmup", str(warmup)]
                         + (["--batch", str(batch)] if batch else []),
                         capture_output=True, text=True, env=env, check=True).stdout
    ranks = json.loads(out.strip().splitlines()[-1])
    return {"config": name, "batch": alone["batch"], "alone_ms": alone["step_ms"],
            "ranks_ms": ranks["step_ms"], "exchange_ms": ranks["exchange_ms"],
            "efficiency": alone["step_ms"] / ranks["step_ms"],
            "exchange_share": ranks["exchange_ms"] / ranks["step_ms"],
            "params": ranks["params"], "gradient_bytes": ranks["gradient_bytes"],
            "status_ms": ranks["status_ms"], "rank_compute_ms": ranks["compute_ms"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=None)
    parser.add_argument("--batch", type=int, default=None, help="override the config's N")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--rank-part", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_part:
        result = time_ranks(args.config[0], args.batch, args.steps, args.warmup)
        if result is not None:
            print(json.dumps(result))
        return 0
    plan = [(c, None) for c in (args.config or ["seed", "small", "shi2015"])]
    if args.batch is None and ("seed", None) in plan:
        plan[plan.index(("seed", None))] = ("seed", 2)  # a batch of one cannot be cut
    rows = []
    print("| config | batch | 1 rank x 2 threads, ms | 2 ranks x 1 thread, ms | efficiency "
          "| waiting for the other rank, ms | gradient exchange, ms | exchange % of step "
          "| gradient KB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, batch in plan:
        row = measure(name, batch or args.batch, args.steps, args.warmup)
        rows.append(row)
        print(f"| {row['config']} | {row['batch']} | {row['alone_ms']:.1f} | "
              f"{row['ranks_ms']:.1f} | {row['efficiency']:.0%} | {row['status_ms']:.2f} | "
              f"{row['exchange_ms'] - row['status_ms']:.2f} | {row['exchange_share']:.1%} | "
              f"{row['gradient_bytes'] / 1024:.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

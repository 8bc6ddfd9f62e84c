"""How much of a convc training step is its GEMMs: the step against its own matmuls alone.

    .venv/bin/python bench/gemm_floor.py                    # shi2015, 2 threads, 10 rounds
    .venv/bin/python bench/gemm_floor.py --config seed --rounds 20

One step of the model (a yardstick configuration, see runtime/bench.py) is
run with every `numpy.matmul` call recorded, per thread: the shapes, strides
and dtypes of its operands. The recording is then replayed on arrays of the
same layout, each thread's calls in its own thread at once, with the BLAS threads
the step's GEMMs ran with (one per shard when the step ran in shards, one for
a step too small to share, else `--threads`). Real steps and replays alternate, so both see the
same machine. The replay is the time the step's GEMMs take by themselves,
at the rate this BLAS reaches on these shapes: no step built from the same
GEMMs can be faster, and the rest of the step (im2col and col2im, gate
arithmetic, Python) is the difference.

Printed: the GEMM FLOPs the step really does (convc skips products with the
zero initial state and the data's gradient), the step's and the replay's
median (and range) in ms, the GEMMs' share of the step, and the replay's
GFLOP/s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from convc import api  # noqa: E402
from convc.argtypes import positive_int  # noqa: E402
from convc.runtime import bench  # noqa: E402


def record(step) -> tuple[dict, dict]:
    """The numpy.matmul calls of step(), per thread: [(a, b, out) layouts], and the
    BLAS threads each thread's first call ran with."""
    from convc.runtime import kernels

    blas = kernels._blas()
    calls: dict = {}
    threads: dict = {}
    lock = threading.Lock()
    matmul = np.matmul

    def layout(x):
        return None if x is None else (x.shape, x.strides, x.dtype.str)

    def recording(a, b, out=None, **kwargs):
        with lock:
            me = threading.get_ident()
            if me not in threads and blas:
                threads[me] = min(lib.num_threads or 1 for lib in blas.lib_controllers)
            calls.setdefault(me, []).append((layout(a), layout(b), layout(out)))
        return matmul(a, b, out=out, **kwargs)

    np.matmul = recording  # the kernels look it up at each call
    try:
        step()
    finally:
        np.matmul = matmul
    return calls, threads


def operands(layouts: list, seed: int) -> list:
    """Arrays with the recorded shapes and strides (views of fresh random buffers)."""
    rng = np.random.default_rng(seed)

    def make(lay):
        if lay is None:
            return None
        shape, strides, dtype = lay
        dtype = np.dtype(dtype)
        span = sum((n - 1) * s for n, s in zip(shape, strides)) // dtype.itemsize + 1
        base = rng.random(span, dtype=np.float64).astype(dtype)
        return np.lib.stride_tricks.as_strided(base, shape, strides)

    return [(make(a), make(b), make(o)) for a, b, o in layouts]


def flops(layouts: list) -> float:
    total = 0.0
    for (a_shape, _, _), (b_shape, _, _), _ in layouts:
        batch = int(np.prod(a_shape[:-2])) if len(a_shape) > 2 else \
            int(np.prod(b_shape[:-2])) if len(b_shape) > 2 else 1
        m = a_shape[-2] if len(a_shape) > 1 else 1
        n = b_shape[-1] if len(b_shape) > 1 else 1
        total += 2.0 * batch * m * a_shape[-1] * n
    return total


def replay(sets: list) -> None:
    """Every thread's GEMMs in a thread of its own, at once."""
    def run(ops):
        for a, b, out in ops:
            np.matmul(a, b, out=out)

    others = [threading.Thread(target=run, args=(ops,)) for ops in sets[1:]]
    for t in others:
        t.start()
    run(sets[0])
    for t in others:
        t.join()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(bench.CONFIGS), default="shi2015")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--rounds", type=positive_int, default=10)
    a = p.parse_args(argv)

    cfg = dict(bench.CONFIGS[a.config], name=a.config)
    mod = api.load(None, text=bench.peer_cell_text(cfg))
    params = mod.init_params(seed=0, dtype="float32")
    inputs, targets, _ = bench._batch(mod, cfg["N"], cfg["T"], None, 1, np.float32)

    def step():
        mod.sgd_step(params, inputs, targets, 0.01)

    with bench.blas_threads(a.threads):
        for _ in range(2):
            step()
        calls, threads = record(step)
        main_id = threading.main_thread().ident
        order = sorted(calls, key=lambda k: k != main_id)  # the main thread's first
        sets = [operands(calls[k], i) for i, k in enumerate(order)]
        done = sum(flops(calls[k]) for k in order)
        replay_threads = threads.get(order[0], a.threads)
        steps, gemms = [], []
        for r in range(a.rounds):
            t0 = time.perf_counter()
            step()
            steps.append(time.perf_counter() - t0)
            with bench.blas_threads(replay_threads):
                t0 = time.perf_counter()
                replay(sets)
                gemms.append(time.perf_counter() - t0)

    def ms(ts):
        return (f"{statistics.median(ts) * 1e3:8.1f} ms (range {min(ts) * 1e3:.1f}-"
                f"{max(ts) * 1e3:.1f})")

    n_calls = sum(len(calls[k]) for k in order)
    steps_per_axis = {ax: cfg["T"] for ax in mod.MODEL["axes"].values()}
    nominal = bench.conv_flops(mod, steps_per_axis, cfg["N"])["total"]
    print(f"{a.config}: {n_calls} GEMMs a step on {len(sets)} thread(s), {done / 1e9:.2f} GFLOP "
          f"done ({nominal / 1e9:.2f} nominal); {a.rounds} rounds, BLAS threads {a.threads}")
    print(f"  training step     {ms(steps)}")
    print(f"  its GEMMs alone   {ms(gemms)}  {done / statistics.median(gemms) / 1e9:.1f} GFLOP/s")
    share = statistics.median(gemms) / statistics.median(steps)
    print(f"  GEMM share {share:.0%}; the rest of the step "
          f"{(statistics.median(steps) - statistics.median(gemms)) * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""oneDNN's convolutions (`--conv onednn`) against convc's im2col + GEMM, measured.

Run by hand (not by the tests); needs `pip install 'convc[onednn]'` and threadpoolctl:

    .venv/bin/python bench/onednn_conv.py              # both tables, 1 and 2 threads
    .venv/bin/python bench/onednn_conv.py --configs seed small --rounds 5

Table 1, per convolution call: every distinct convolution a training step
(loss_and_grad) of the yardstick configurations (runtime/bench.py CONFIGS:
seed, small, shi2015) makes, recorded with the operand layouts the generated
code passes (gy channel-major), timed as ms per call on NumpyBackend and on
raw oneDNN (the per-shape rule of runtime/ops_onednn.py switched off), float32,
median of repeated calls, at 1 and 2 threads.

Table 2, whole training steps: loss_and_grad of each configuration in float32
with backend numpy, backend onednn (with its rule) and oneDNN for every
float32 shape (the rule off), at 1 and 2 threads, median of --rounds rounds,
the backends' order reversed every other round.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import convc  # noqa: E402
from convc.runtime import ops_onednn  # noqa: E402
from convc.runtime.backend import get_backend  # noqa: E402
from convc.runtime.bench import CONFIGS, _batch, peer_cell_text  # noqa: E402
from convc.runtime.ops_numpy import NumpyBackend  # noqa: E402


def cpu_info() -> str:
    model, flags = "?", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and model == "?":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = sorted(f for f in flags if f.startswith(("avx", "fma", "amx")))
    return (f"CPU: {model}, {os.cpu_count()} logical cores; SIMD flags: "
            f"{' '.join(simd) or 'none'} (avx2: {'avx2' in flags}, "
            f"avx512f: {'avx512f' in flags})")


class _Recorder(NumpyBackend):
    """NumpyBackend that records every convolution call with its operands."""

    def __init__(self):
        super().__init__()
        self.calls = collections.OrderedDict()

    def _keep(self, key, count_args):
        if key not in self.calls:
            self.calls[key] = [0, count_args]
        self.calls[key][0] += 1

    def conv2d(self, x, w, stride, pad, dilation, out=None):
        self._keep(("fwd", x.shape, w.shape, tuple(stride), tuple(pad), tuple(dilation)),
                   (x.copy(), w.copy()))
        return super().conv2d(x, w, stride, pad, dilation, out=out)

    def conv2d_grad_input(self, gy, w, x_shape, stride, pad, dilation, out=None):
        self._keep(("bwd_data", tuple(x_shape), w.shape, tuple(stride), tuple(pad),
                    tuple(dilation)), (_same_layout(gy), w.copy()))
        return super().conv2d_grad_input(gy, w, x_shape, stride, pad, dilation, out=out)

    def conv2d_grad_weight(self, x, gy, w_shape, stride, pad, dilation):
        self._keep(("bwd_weights", x.shape, tuple(w_shape), tuple(stride), tuple(pad),
                    tuple(dilation)), (x.copy(), _same_layout(gy)))
        return super().conv2d_grad_weight(x, gy, w_shape, stride, pad, dilation)


def _same_layout(a):
    """A copy of a with the same memory order (a channel-major gy stays channel-major)."""
    if a.flags.c_contiguous:
        return a.copy()
    return np.ascontiguousarray(a.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)


def _model(name):
    cfg = dict(CONFIGS[name], name=name)
    mod = convc.load(None, text=peer_cell_text(cfg), target=("cpu", "onednn"))
    params = mod.init_params(seed=0, dtype="float32")
    inputs, targets, _ = _batch(mod, cfg["N"], cfg["T"], None, 1, np.float32)
    return mod, params, inputs, targets


def _call(backend, key, args):
    kind, a_shape, b_shape, stride, pad, dil = key
    if kind == "fwd":
        return lambda: backend.conv2d(args[0], args[1], stride, pad, dil)
    if kind == "bwd_data":
        return lambda: backend.conv2d_grad_input(args[0], args[1], a_shape, stride, pad, dil)
    return lambda: backend.conv2d_grad_weight(args[0], args[1], b_shape, stride, pad, dil)


def _ms(fn, budget: float = 0.25, least: int = 5) -> float:
    fn()
    times = []
    stop = time.perf_counter() + budget
    while len(times) < least or (time.perf_counter() < stop and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def per_call_table(names, thread_counts, budget):
    from threadpoolctl import threadpool_limits

    print("\n## ms per convolution call (float32; median; 'rule': what --conv onednn runs at "
          f"{'/'.join(map(str, thread_counts))} threads)")
    head = "| config | op | x (N,C,H,W) | w (O,C,kh,kw) | s,p,d | calls/step |"
    for t in thread_counts:
        head += f" numpy {t}t | onednn {t}t | speed-up {t}t |"
    print(head + " rule | oneDNN impl |")
    print("|" + "---|" * (head.count("|") + 1))
    for name in names:
        mod, params, inputs, targets = _model(name)
        rec = _Recorder()
        with threadpool_limits(limits=1):
            mod.loss_and_grad(params, inputs, targets, backend=rec)
        for key, (count, args) in rec.calls.items():
            kind, a_shape, b_shape, stride, pad, dil = key
            x_shape = a_shape if kind != "bwd_data" else a_shape
            w_shape = b_shape
            row = (f"| {name} | {kind} | {x_shape} | {w_shape} | "
                   f"{stride[0]},{pad[0]},{dil[0]} | {count} |")
            impl = "?"
            for t in thread_counts:
                with threadpool_limits(limits=t):
                    numpy_b, raw = NumpyBackend(), ops_onednn.OnednnEveryShapeBackend()
                    a = _ms(_call(numpy_b, key, args), budget)
                    b = _ms(_call(raw, key, args), budget)
                    impl = next(iter(raw.implementations().values()), "?")
                row += f" {a:.3f} | {b:.3f} | {a / b:.2f}x |"
            rule = "/".join("onednn" if ops_onednn.use_onednn(kind, x_shape, w_shape, stride,
                                                              pad, dil, t) else "numpy"
                            for t in thread_counts)
            print(row + f" {rule} | {impl} |", flush=True)


def step_table(names, thread_counts, rounds):
    from threadpoolctl import threadpool_limits

    print(f"\n## ms per training step (loss_and_grad, float32; median of {rounds} rounds, "
          f"backends alternating)")
    print("| config | threads | numpy ms | onednn ms | onednn/numpy | oneDNN every shape ms "
          "| every/numpy | loss rel. diff (onednn, every) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        mod, params, inputs, targets = _model(name)
        for t in thread_counts:
            with threadpool_limits(limits=t):
                backends = {"numpy": get_backend("cpu", "numpy"),
                            "onednn": get_backend("cpu", "onednn"),
                            "every": ops_onednn.OnednnEveryShapeBackend()}
                times = {k: [] for k in backends}
                losses = {}
                for k, b in backends.items():  # warm-up: plans, primitives, workspaces
                    losses[k] = float(mod.loss_and_grad(params, inputs, targets,
                                                        backend=b)[0])
                for r in range(rounds):
                    order = list(backends) if r % 2 == 0 else list(backends)[::-1]  # ABC, CBA
                    for k in order:
                        t0 = time.perf_counter()
                        mod.loss_and_grad(params, inputs, targets, backend=backends[k])
                        times[k].append(time.perf_counter() - t0)
            a = statistics.median(times["numpy"]) * 1e3
            b = statistics.median(times["onednn"]) * 1e3
            c = statistics.median(times["every"]) * 1e3
            diff = [abs(losses[k] - losses["numpy"]) / abs(losses["numpy"])
                    for k in ("onednn", "every")]
            print(f"| {name} | {t} | {a:.1f} | {b:.1f} | {b / a:.2f} | {c:.1f} | {c / a:.2f} | "
                  f"{diff[0]:.1e}, {diff[1]:.1e} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--rounds", type=int, default=5, help="training-step rounds (>= 5)")
    p.add_argument("--budget", type=float, default=0.25,
                   help="seconds of repeated calls per timing in the per-call table")
    p.add_argument("--skip-calls", action="store_true", help="only the training-step table")
    p.add_argument("--skip-steps", action="store_true", help="only the per-call table")
    args = p.parse_args(argv)
    print(cpu_info())
    print(f"oneDNN {ops_onednn.version()}; numpy {np.__version__}")
    if not args.skip_calls:
        per_call_table(args.configs, args.threads, args.budget)
    if not args.skip_steps:
        step_table(args.configs, args.threads, max(5, args.rounds))


if __name__ == "__main__":
    main()

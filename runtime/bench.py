"""`convc bench`: how fast a compiled model trains, against the machine's own limit.

One training step is what `sgd_step` does: the forward pass over T steps,
backpropagation through time, a plain SGD update, in float32. For each
model the report gives

- ms per training step (median of the timed steps, and the fastest);
- GFLOP/s of the convolutions, counted from the compiled graph: each forward
  convolution costs 2*N*T*Cout*Cin*kh*kw*Ho*Wo, the backward pass twice that
  (its input and weight gradients), so a step is 3x the forward count. This
  is the nominal count the peer benchmarks use; convc skips some of it (the
  data input's gradient, the recurrent convolution at t = 0 where h is zero),
  so the figure is what the step is *worth*, not what it did;
- that rate as a share of the machine's float32 GEMM peak, measured in the
  same command (a square NumPy matmul, best of a few tries) with the same
  number of threads: the fraction of the hardware a training step gets;
- memory: the process's peak RSS, and the growth of RSS during the timed
  steps (VmHWM reset before them; Linux only).

Without a file, the three ConvLSTM configurations of the peer yardstick
(/work/shared/bench/peers/common.py) are timed: `seed`, `small` and
`shi2015`, written as `.cell` text by `peer_cell_text`, so bench/peer_adapter.py
builds exactly the model timed here.

    convc bench                      # seed, small, shi2015
    convc bench examples/stack.cell --batch 8 --frames 10
    python -m convc.runtime.bench --config small --steps 20 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from contextlib import contextmanager

import numpy as np

# The peer yardstick's configurations: N, T, Cin, H (= W), hidden, k, layers.
CONFIGS = {
    "seed": dict(N=1, T=10, Cin=1, H=16, hidden=8, k=3, layers=1),
    "small": dict(N=8, T=10, Cin=1, H=32, hidden=16, k=3, layers=1),
    "shi2015": dict(N=4, T=10, Cin=16, H=16, hidden=64, k=5, layers=2),
}

_PEEPHOLE_CELL = '''
cell ConvLSTMFusedPeep(hidden, kernel = 3) {
    """ConvLSTMFused with the Hadamard peepholes of Shi et al. 2015."""
    input x
    state h = zeros
    state c = zeros
    weight W = kernel(4 * hidden, kernel)
    weight b = bias(4 * hidden)
    weight wci = hadamard(hidden)
    weight wcf = hadamard(hidden)
    weight wco = hadamard(hidden)

    z = conv(concat(x, h[t-1]), W) + b
    z_i, z_f, z_o, z_g = split(z, 4)
    c = sigmoid(z_f + wcf * c[t-1]) * c[t-1] + sigmoid(z_i + wci * c[t-1]) * tanh(z_g)
    h = sigmoid(z_o + wco * c) * tanh(c)
    output h
}
'''


def peer_cell_text(cfg: dict) -> str:
    """The peer yardstick's ConvLSTM for one configuration, as a `.cell` program.

    Layers of std.ConvLSTMFused (one convolution over concat(x, h[t-1]), gate
    order i, f, o, g, one bias), a 1x1 head with a bias whose sigmoid
    predicts the next frame, BCE (or MSE with cfg["loss"] = "mse") over every
    step. Parameters: l{layer}.W, l{layer}.b, head_W, head_b (and
    l{layer}.wci/wcf/wco with cfg["peephole"]).
    """
    cin, size, hidden, k = cfg["Cin"], cfg["H"], cfg["hidden"], cfg["k"]
    peep = bool(cfg.get("peephole"))
    cell = "ConvLSTMFusedPeep" if peep else "ConvLSTMFused"
    lines = ["import std", ""]
    if peep:
        lines += [_PEEPHOLE_CELL.strip(), ""]
    lines += [f"model convlstm_{cfg.get('name', 'bench')} {{",
              '    """The peer yardstick\'s ConvLSTM: stacked layers, a 1x1 head, '
              'next-frame loss."""',
              f"    input x: [{cin}, {size}, {size}]",
              f"    target y: [{cin}, {size}, {size}]"]
    prev = "x"
    for layer in range(cfg["layers"]):
        lines.append(f"    l{layer} = {cell}(hidden = {hidden}, kernel = {k})")
        lines.append(f"    h{layer} = l{layer}({prev})")
        prev = f"h{layer}"
    loss = "bce" if cfg.get("loss", "bce") == "bce" else "mse"
    lines += [f"    weight head_W = kernel({cin}, 1)",
              f"    weight head_b = bias({cin})",
              f"    pred = sigmoid(conv({prev}, head_W) + head_b)",
              "    output pred",
              f"    loss {loss}(pred, y)",
              "}", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- measuring

def conv_flops(mod, steps: dict[str, int], batch: int) -> dict:
    """Nominal convolution FLOPs of one training step, from the compiled graph.

    steps: the number of steps of each time axis. Forward: every forward conv
    node, 2*N*T*Cout*Cin*kh*kw*Ho*Wo (T of its loop's axis; the op table's `flops`
    rule); backward: twice
    the forward count.
    """
    from convc.compiler.ir import data_name, is_data_seg
    from convc.compiler.ops import OPS, node_flops

    low = mod.compiled.lowered
    g = low.graph
    axis_of_seg = {s.id: s.axis for s in low.segments}
    fwd = 0
    for nid in g.order():
        node = g.node(nid)
        if node.grad or OPS[node.op].flops is None:
            continue
        seg = node.seg
        if seg is None:
            t = 1
        elif is_data_seg(seg):
            t = steps.get(low.axis_of.get(data_name(seg), data_name(seg)), 1)
        else:
            t = steps.get(axis_of_seg[seg], 1)
        fwd += batch * t * node_flops(g, node)
    return dict(forward=fwd, backward=2 * fwd, total=3 * fwd)


def gemm_peak(threads: int, seconds: float = 1.5) -> dict:
    """float32 GEMM GFLOP/s of NumPy's BLAS on this machine, best of a few square matmuls."""
    rng = np.random.default_rng(0)
    best = {}
    with blas_threads(threads):
        for n in (1024, 2048):
            a = rng.standard_normal((n, n)).astype(np.float32)
            b = rng.standard_normal((n, n)).astype(np.float32)
            c = np.empty((n, n), np.float32)
            np.matmul(a, b, out=c)
            flops = 2.0 * n ** 3
            fastest = float("inf")
            stop = time.perf_counter() + seconds / 2
            tries = 0
            while tries < 3 or time.perf_counter() < stop:
                t0 = time.perf_counter()
                np.matmul(a, b, out=c)
                fastest = min(fastest, time.perf_counter() - t0)
                tries += 1
                if tries >= 50:
                    break
            best[n] = flops / fastest / 1e9
    return dict(gflops=max(best.values()), by_size={str(k): v for k, v in best.items()},
                threads=threads)


@contextmanager
def blas_threads(n: int | None):
    """Limit the BLAS (and OpenMP) thread pools to n threads, if threadpoolctl is there."""
    if n is None:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # an optional dependency: the environment's setting stays
        yield
        return
    with threadpool_limits(limits=n):
        yield


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _batch(mod, batch: int, frames: int, frames_out: int | None, seed: int, dtype):
    """Inputs and targets: moving squares, (N, T, C, H, W), values in {0, 1}."""
    meta = mod.MODEL
    rng = np.random.default_rng(seed)
    in_axes = {meta["axes"][n] for n in meta["inputs"]}
    lengths = {ax: (frames if ax in in_axes else (frames_out or frames))
               for ax in set(meta["axes"].values())}

    def clip(shape, steps):
        c, h, w = shape
        out = np.zeros((batch, steps, c, h, w), dtype=dtype)
        side = max(1, min(h, w) // 4)
        for n in range(batch):
            for ch in range(c):
                pos = rng.uniform(0, [max(h - side, 1), max(w - side, 1)])
                vel = rng.uniform(-0.15, 0.15, 2) * np.array([h, w])
                for t in range(steps):
                    y, x = int(pos[0]), int(pos[1])
                    out[n, t, ch, y:y + side, x:x + side] = 1.0
                    pos = np.clip(pos + vel, 0, [max(h - side, 0), max(w - side, 0)])
        return out

    inputs = {n: clip(s, lengths[meta["axes"][n]]) for n, s in sorted(meta["inputs"].items())}
    targets = {n: clip(s, lengths[meta["axes"][n]]) for n, s in sorted(meta["targets"].items())}
    return inputs, targets, lengths


def time_model(mod, *, batch: int, frames: int, frames_out: int | None = None,
               steps: int = 10, warmup: int = 2, min_time: float = 0.0, lr: float = 0.01,
               seed: int = 0, params: dict | None = None, inputs=None, targets=None,
               backend=None) -> dict:
    """Time `steps` SGD training steps of a compiled module (after `warmup` untimed ones)."""
    dtype = np.float32
    if params is None:
        params = mod.init_params(seed=seed, dtype="float32", backend=backend)
    if inputs is None:
        inputs, targets, lengths = _batch(mod, batch, frames, frames_out, seed + 1, dtype)
    else:
        meta = mod.MODEL
        lengths = {meta["axes"][n]: np.shape(v)[1] for n, v in
                   list(inputs.items()) + list(targets.items())}
    kw = {} if backend is None else {"backend": backend}
    rss_before = _status_kb("VmRSS")
    reset = _reset_peak_rss()
    losses = []
    for _ in range(warmup):
        losses.append(float(mod.sgd_step(params, inputs, targets, lr, **kw)))
    times = []
    start = time.perf_counter()
    while len(times) < steps or (time.perf_counter() - start < min_time and len(times) < 500):
        t0 = time.perf_counter()
        losses.append(float(mod.sgd_step(params, inputs, targets, lr, **kw)))
        times.append(time.perf_counter() - t0)
    hwm = _status_kb("VmHWM")
    flops = conv_flops(mod, lengths, batch)
    med = statistics.median(times)
    return dict(
        model=mod.MODEL["name"], batch=batch, steps_per_axis=lengths,
        timed_steps=len(times), warmup=warmup,
        median_ms=med * 1e3, min_ms=min(times) * 1e3, max_ms=max(times) * 1e3,
        times_ms=[round(t * 1e3, 4) for t in times],
        flops=flops, gflops=flops["total"] / med / 1e9,
        loss_first=losses[0], loss_last=losses[-1],
        step_rss_mb=((hwm - rss_before) / 1024 if reset and hwm and rss_before else None),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def run(spec=None, config=None, steps: int = 10, threads: int | None = 2, warmup: int = 2,
        batch: int | None = None, frames: int | None = None, frames_out: int | None = None,
        min_time: float = 0.0, seed: int = 0, peak: bool = True, model: str | None = None,
        lr: float = 0.01, recompute: int | None = None, fuse: bool | None = None) -> dict:
    """Time one `.cell` file (spec) or the built-in configurations; returns a report dict.

    config: one of CONFIGS, a list of them, or None (all three when spec is None).
    threads: BLAS threads for the timed steps and the GEMM peak (None: leave as is).
    recompute: compile with recompute=K (memory against compute). fuse: fused step
    kernels (None: where they can be built, as convc.load does).
    """
    from convc.runtime import loader

    results = []
    with blas_threads(threads):
        if spec is not None:
            mod = loader.load(spec, model=model, recompute=recompute, fuse=fuse)
            train = mod.MODEL.get("train", {})
            n = batch or int(train.get("batch_size", 8))
            t = frames or int(train.get("frames_in", 10))
            t_out = frames_out or (int(train["frames_out"]) if "frames_out" in train else None)
            r = time_model(mod, batch=n, frames=t, frames_out=t_out, steps=steps,
                           warmup=warmup, min_time=min_time, seed=seed, lr=lr)
            r["name"] = os.path.basename(str(spec))
            results.append(r)
        else:
            names = list(CONFIGS) if config is None else \
                [config] if isinstance(config, str) else list(config)
            for name in names:
                if name not in CONFIGS:
                    raise ValueError(f"unknown benchmark configuration {name!r}; "
                                     f"choose from {', '.join(CONFIGS)}")
                cfg = dict(CONFIGS[name], name=name)
                mod = loader.load(None, text=peer_cell_text(cfg), recompute=recompute,
                                  fuse=fuse)
                r = time_model(mod, batch=batch or cfg["N"], frames=frames or cfg["T"],
                               steps=steps, warmup=warmup, min_time=min_time, seed=seed,
                               lr=lr)
                r["name"] = name
                r["config"] = cfg
                results.append(r)
    out = dict(results=results, threads=threads, machine=machine_info(), recompute=recompute,
               fused=bool(getattr(mod, "KERNELS", None)),
               date=time.strftime("%Y-%m-%d %H:%M"))
    if peak:
        out["gemm_peak"] = gemm_peak(threads or 2)
        for r in results:
            r["peak_fraction"] = r["gflops"] / out["gemm_peak"]["gflops"]
    return out


def machine_info() -> dict:
    info = dict(python=platform.python_version(), numpy=np.__version__,
                cpus=os.cpu_count(), platform=platform.platform())
    try:
        with open("/proc/loadavg") as fh:
            info["loadavg"] = fh.read().split()[:3]
    except OSError:
        pass
    try:
        from threadpoolctl import threadpool_info
        blas = [d for d in threadpool_info() if d.get("user_api") == "blas"]
        if blas:
            info["blas"] = f"{blas[0].get('internal_api')} {blas[0].get('version')} " \
                           f"({blas[0].get('architecture')})"
    except ImportError:
        pass
    return info


def format_report(report: dict) -> str:
    """The report as a table, one row per model."""
    lines = []
    peak = report.get("gemm_peak")
    m = report.get("machine", {})
    lines.append(f"convc bench, {report.get('date', '')}: {m.get('cpus')} CPUs, "
                 f"{m.get('blas', 'BLAS ?')}, numpy {m.get('numpy')}, "
                 f"threads {report.get('threads')}, load {' '.join(m.get('loadavg', []))}")
    if peak:
        lines.append(f"float32 GEMM peak ({peak['threads']} threads): {peak['gflops']:.1f} GFLOP/s")
    if report.get("recompute"):
        lines.append(f"compiled with recompute={report['recompute']}")
    if "fused" in report:
        lines.append("fused step kernels: " + ("yes" if report["fused"] else
                                               "no (the plain NumPy path)"))
    lines.append("")
    head = (f"{'model':<14} {'N':>3} {'T':>4} {'median ms':>10} {'min ms':>9} {'GFLOP/step':>11} "
            f"{'GFLOP/s':>8} {'% peak':>7} {'step RSS MB':>12} {'peak RSS MB':>12} {'loss':>9}")
    lines.append(head)
    lines.append("-" * len(head))
    for r in report["results"]:
        t = "/".join(str(v) for v in r["steps_per_axis"].values())
        frac = f"{100 * r['peak_fraction']:.0f}%" if "peak_fraction" in r else "n/a"
        rss = f"{r['step_rss_mb']:.0f}" if r.get("step_rss_mb") is not None else "n/a"
        lines.append(f"{r['name']:<14} {r['batch']:>3} {t:>4} {r['median_ms']:>10.2f} "
                     f"{r['min_ms']:>9.2f} {r['flops']['total'] / 1e9:>11.3f} "
                     f"{r['gflops']:>8.1f} {frac:>7} {rss:>12} {r['peak_rss_mb']:>12.0f} "
                     f"{r['loss_first']:>9.5f}")
    lines.append("")
    lines.append("One step: forward over T, BPTT, SGD update, float32. GFLOP counts the "
                 "convolutions (forward 2*N*T*Cout*Cin*k*k*Ho*Wo, backward 2x).")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line

def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `convc bench`, for the command line to add to its sub-parser."""
    from convc.argtypes import nonneg_float, nonneg_int, positive_int

    parser.add_argument("file", metavar="FILE", nargs="?", default=None,
                        help="a .cell file to time (default: the peer yardstick's ConvLSTMs)")
    parser.add_argument("--model", default=None, help="which model of FILE (default: its last)")
    parser.add_argument("--config", action="append", choices=sorted(CONFIGS), default=None,
                        help="a built-in configuration (repeatable; default: all three)")
    parser.add_argument("--steps", type=positive_int, default=10,
                        help="timed steps (default 10)")
    parser.add_argument("--warmup", type=nonneg_int, default=2,
                        help="untimed steps first (default 2)")
    parser.add_argument("--min-time", type=nonneg_float, default=0.0,
                        help="keep timing until this many seconds (default 0)")
    parser.add_argument("--threads", type=positive_int, default=2, help="BLAS threads (default 2)")
    parser.add_argument("--batch", type=positive_int, default=None, help="sequences per step")
    parser.add_argument("--frames", type=positive_int, default=None, help="input steps T")
    parser.add_argument("--frames-out", type=positive_int, default=None,
                        help="target steps of a forecast model (default: --frames)")
    parser.add_argument("--seed", type=nonneg_int, default=0)
    parser.add_argument("--recompute", type=positive_int, default=None, metavar="K",
                        help="compile with recompute=K: forward values kept for windows of K "
                             "steps, recomputed in the backward pass")
    parser.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                        help="fused step kernels (default: where they can be built)")
    parser.add_argument("--no-peak", action="store_true", help="skip the GEMM peak measurement")
    parser.add_argument("--json", metavar="OUT", default=None, help="also write the report as JSON")
    return parser


def main_bench(args) -> int:
    report = run(spec=args.file, config=args.config, steps=args.steps, threads=args.threads,
                 warmup=args.warmup, batch=args.batch, frames=args.frames,
                 frames_out=args.frames_out, min_time=args.min_time, seed=args.seed,
                 peak=not args.no_peak, model=args.model, recompute=args.recompute,
                 fuse=args.fuse)
    print(format_report(report))
    if args.json:
        from convc.runtime.atomic import write_output

        write_output(args.json, json.dumps(report, indent=1),
                     protected=tuple(str(p) for p in (getattr(args, "file", None),) if p))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m convc.runtime.bench ...`, the same as `convc bench ...`."""
    parser = add_bench_arguments(argparse.ArgumentParser(
        prog="convc bench", description="Time training steps against the GEMM peak."))
    return main_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

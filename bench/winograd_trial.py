"""Winograd F(2x2, 5x5) convolution in NumPy, measured against convc's im2col + GEMM.

    .venv/bin/python bench/winograd_trial.py           # accuracy, kernel timings, a step A/B (~2 min)
    .venv/bin/python bench/winograd_trial.py --quick   # the accuracy checks only (tests run this)

The shi2015 yardstick config (5x5 kernels, 64 hidden channels, 2 layers)
spends ~80% of a training step in GEMMs already running at 80-85% of the
one-thread BLAS peak, so the only way to a large speed-up is to do fewer
multiplications. Winograd's F(2x2, 5x5) needs 36 multiplications per 2x2
outputs where a direct convolution needs 100 (Lavin and Gray 2016). This
file is that algorithm written with NumPy the way convc's kernels are
(transforms as small GEMMs with Kronecker-product matrices over every tile at
once, one GEMM per tile position, a strided gather and scatter), for the
convolution, its input gradient and its weight gradient, and the
measurements that decided against adopting it:

- accuracy: float64 agrees with the direct convolution to ~1e-14 (the
  algebra is right); float32 errors are 3-8x (points 0, +-1, 2, -1/2) to
  10-20x (0, +-1, +-2) the direct convolution's;
- speed of the three functions on one thread (median ms, direct ->
  Winograd, two runs on 2026-11-30): 20 images, 64 -> 256 channels:
  74 -> 48 and 63 -> 70 (convolution), 80 -> 66 and 83 -> 73 (input
  gradient), 84 -> 54 and 85 -> 68 (weight gradient); 2 images (one time
  step): 7.5 -> 8.3 and 7.5 -> 5.0, 10.3 -> 8.3 and 7.5 -> 6.0, 8.1 -> 8.8
  and 6.7 -> 6.7. Which one wins changes from run to run;
- a whole training step, one shard (2 sequences) on one thread, which is
  what each of a yardstick step's two threads runs (`step_ab`, two runs):
  direct 712 / 743 ms, Winograd wherever it fits 688 / 717, Winograd for 8
  images or more only 681 / 705; with the backend wired in, the real
  two-thread step (interleaved, 8 steps each, two runs): 792 -> 789 and
  739 -> 715 ms. That is 0-5%, inside this machine's run-to-run noise, for
  5-20x the float32 error and 15 MB more work arrays per thread (34 -> 49
  MB kept): not adopted.

Why: a ConvLSTM convolution has 4x more output channels (the gates) than
input channels, so the transformed product (36 values per output channel per
2x2 pixels: 2304 per pixel for 256 gate channels) is larger than the im2col
matrix it replaces (64 channels x 25 taps = 1600 per pixel); and NumPy cannot
fuse the transforms into the GEMMs, so gathering tiles, the two transforms
and the scatter are separate passes over memory, while the 36 per-position
GEMMs (K = 64 channels, 128-256 columns) run at ~45-55 GFLOP/s on one thread
against ~75 for the direct convolution's single large GEMM. A compiled kernel
that transforms tiles in registers (as oneDNN and NNPACK do) would change
this; plain NumPy does not. Nor did Numba-compiled transforms around the same
BLAS GEMMs (bench/RESULTS.md): -5% on the step at best, +20% with larger
chunks, as the per-position GEMMs and the weight transform stay.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from fractions import Fraction

import numpy

from convc.runtime import ops_numpy

# Output tile size per kernel size.
TILE = {5: 2}
# Interpolation points (the point at infinity is added); the first a - 1 are used.
POINTS = (0, 1, -1, 2, Fraction(-1, 2), -2, Fraction(1, 2))
POINT_SETS = {"0,+-1,2,-1/2": POINTS, "0,+-1,+-2": (0, 1, -1, 2, -2)}
# The largest work array of a chunk of images.
CHUNK_BYTES = 3 << 20


def _solve(rows: list, rhs: list) -> list:
    """The exact solution of a consistent linear system (Fractions, Gauss-Jordan)."""
    n = len(rows[0])
    m = [list(r) + [b] for r, b in zip(rows, rhs)]
    pivots = []
    row = 0
    for col in range(n):
        pick = next((i for i in range(row, len(m)) if m[i][col] != 0), None)
        if pick is None:
            continue
        m[row], m[pick] = m[pick], m[row]
        inv = 1 / m[row][col]
        m[row] = [v * inv for v in m[row]]
        for i in range(len(m)):
            if i != row and m[i][col] != 0:
                f = m[i][col]
                m[i] = [a - f * b for a, b in zip(m[i], m[row])]
        pivots.append(col)
        row += 1
    if any(all(v == 0 for v in r[:n]) and r[n] != 0 for r in m):
        raise ValueError("inconsistent system")
    x = [Fraction(0)] * n
    for i, col in enumerate(pivots):
        x[col] = m[i][n]
    return x


@functools.lru_cache(maxsize=None)
def transforms(m: int, r: int, points: tuple = POINTS) -> tuple:
    """(A^T (m, a), G (a, r), B^T (a, a)) of F(m, r) as float64 arrays, a = m + r - 1.

    Toom-Cook with the first a-1 of `points` and the point at infinity: A^T
    evaluates the output polynomial, G the kernel's (scaled by the Lagrange
    denominators); B^T is the unique matrix that makes
    A^T [(G g) (.) (B^T d)] the valid correlation of d (length a) with g
    (length r), solved for exactly.
    """
    a = m + r - 1
    pts = [Fraction(p) for p in points[:a - 1]]
    if len(pts) < a - 1:
        raise ValueError(f"F({m}, {r}) needs {a - 1} points, got {len(points)}")
    at = [[p ** i for p in pts] + [Fraction(int(i == m - 1))] for i in range(m)]
    g = []
    for j, p in enumerate(pts):
        f = Fraction(1)
        for q in pts[:j] + pts[j + 1:]:
            f *= p - q
        g.append([p ** k / f for k in range(r)])
    g.append([Fraction(int(k == r - 1)) for k in range(r)])
    # sum_j AT[i][j] G[j][k] BT[j][l] = [l == i + k], for every i, k, l: per column l of BT
    bt = [[Fraction(0)] * a for _ in range(a)]
    for col in range(a):
        rows = [[at[i][j] * g[j][k] for j in range(a)] for i in range(m) for k in range(r)]
        rhs = [Fraction(int(col == i + k)) for i in range(m) for k in range(r)]
        for j, v in enumerate(_solve(rows, rhs)):
            bt[j][col] = v
    as_array = functools.partial(numpy.array, dtype=numpy.float64)
    return as_array(at), as_array(g), as_array(bt)


def _strided(xp, a, shape: tuple, strides: tuple):
    if xp is numpy:
        return numpy.lib.stride_tricks.as_strided(a, shape=shape, strides=strides,
                                                  writeable=True)
    return xp.lib.stride_tricks.as_strided(a, shape=shape, strides=strides)


def _tile_view(xp, a, m: int, size: int):
    """(size, size, C, N, H/m, W/m) view of a (N, C, H', W') array: element
    [i, j, c, n, ty, tx] is a[n, c, m*ty + i, m*tx + j]."""
    n, c, h, w = a.shape
    s_n, s_c, s_h, s_w = a.strides
    shape = (size, size, c, n, (h - size) // m + 1, (w - size) // m + 1)
    return _strided(xp, a, shape, (s_h, s_w, s_c, s_n, m * s_h, m * s_w))


class Winograd:
    """F(m x m, r x r) convolution, its input gradient and its weight gradient.

    One per kernel size and dtype; work arrays come from the caller's Workspace.
    """

    def __init__(self, xp, r: int, dtype, points: tuple = POINTS) -> None:
        self.xp = xp
        self.r = r
        self.m = m = TILE[r]
        self.a = a = m + r - 1
        at, g, bt = transforms(m, r, tuple(points))
        dtype = numpy.dtype(dtype)
        self.dtype = dtype
        self.kb = xp.asarray(numpy.kron(bt, bt).astype(dtype))  # (a*a, a*a): B^T d B
        self.ka = xp.asarray(numpy.kron(at, at).astype(dtype))  # (m*m, a*a): A^T M A
        self.kg = xp.asarray(numpy.kron(g, g).astype(dtype))    # (a*a, r*r): G g G^T
        self.kbt = xp.asarray(numpy.ascontiguousarray(numpy.kron(bt, bt).T.astype(dtype)))
        self.kat = xp.asarray(numpy.ascontiguousarray(numpy.kron(at, at).T.astype(dtype)))
        self.chunk_bytes = CHUNK_BYTES

    # -- pieces -----------------------------------------------------------------------

    def _weights(self, w, ws):
        """U = G w G^T for every channel pair: (a*a, O, C)."""
        xp = self.xp
        o, c = w.shape[:2]
        u = ws.get(xp, "wino_u", (self.a * self.a, o, c), self.dtype)
        xp.matmul(self.kg, w.reshape(o * c, self.r * self.r).T, out=u.reshape(self.a ** 2, -1))
        return u

    def _chunk(self, n: int, channels: int, tiles: int) -> int:
        per_image = self.a * self.a * channels * tiles * self.dtype.itemsize
        return max(1, min(n, self.chunk_bytes // max(1, per_image)))

    def _input_tiles(self, x, ws):
        """V = B^T d B of every a x a input tile of x (a chunk of images): (a*a, C, tiles)."""
        xp = self.xp
        n, c, h, w = x.shape
        p = self.r // 2
        padded = ws.padded(xp, x.shape, (p, p), self.dtype)
        padded[:, :, p:p + h, p:p + w] = x
        aa = self.a * self.a
        cols = n * (h // self.m) * (w // self.m)
        d = ws.get(xp, "wino_d", (self.a, self.a, c, n, h // self.m, w // self.m), self.dtype)
        xp.copyto(d, _tile_view(xp, padded, self.m, self.a))
        v = ws.get(xp, "wino_v", (aa, c, cols), self.dtype)
        xp.matmul(self.kb, d.reshape(aa, -1), out=v.reshape(aa, -1))
        return v

    def _output_grad_tiles(self, gy, ws):
        """dM = A dY A^T of every m x m tile of gy (a chunk of images): (a*a, O, tiles)."""
        xp = self.xp
        n, o, h, w = gy.shape
        m = self.m
        cols = n * (h // m) * (w // m)
        dy = ws.get(xp, "wino_dy", (m, m, o, n, h // m, w // m), self.dtype)
        xp.copyto(dy, _tile_view(xp, gy, m, m))
        dm = ws.get(xp, "wino_dm", (self.a * self.a, o, cols), self.dtype)
        xp.matmul(self.kat, dy.reshape(m * m, -1), out=dm.reshape(self.a * self.a, -1))
        return dm

    # -- the three functions ----------------------------------------------------------

    def conv2d(self, x, w, out, ws):
        """out[...] = conv2d(x, w) with `same` padding; returns out."""
        xp = self.xp
        n, c, h, wd = x.shape
        o = w.shape[0]
        m, aa = self.m, self.a * self.a
        tiles = (h // m) * (wd // m)
        u = self._weights(w, ws)
        step = self._chunk(n, max(c, o), tiles)
        for a in range(0, n, step):
            b = min(n, a + step)
            v = self._input_tiles(x[a:b], ws)
            mm = ws.get(xp, "wino_m", (aa, o, (b - a) * tiles), self.dtype)
            xp.matmul(u, v, out=mm)
            y = ws.get(xp, "wino_y", (m, m, o, b - a, h // m, wd // m), self.dtype)
            xp.matmul(self.ka, mm.reshape(aa, -1), out=y.reshape(m * m, -1))
            xp.copyto(_tile_view(xp, out[a:b], m, m), y)
        return out

    def conv2d_grad_input(self, gy, w, out, ws):
        """out[...] = the input gradient of conv2d(x, w) for output gradient gy."""
        xp = self.xp
        n, o, h, wd = gy.shape
        c = w.shape[1]
        m, a_, aa, p = self.m, self.a, self.a * self.a, self.r // 2
        tiles = (h // m) * (wd // m)
        ut = self._weights(w, ws).transpose(0, 2, 1)  # (a*a, C, O)
        step = self._chunk(n, max(c, o), tiles)
        for a in range(0, n, step):
            b = min(n, a + step)
            dm = self._output_grad_tiles(gy[a:b], ws)
            dv = ws.get(xp, "wino_v", (aa, c, (b - a) * tiles), self.dtype)
            xp.matmul(ut, dm, out=dv)
            dd = ws.get(xp, "wino_d", (a_, a_, c, b - a, h // m, wd // m), self.dtype)
            xp.matmul(self.kbt, dv.reshape(aa, -1), out=dd.reshape(aa, -1))
            # overlapping tiles add up: one add per tap position, into a zeroed padded image
            acc = ws.get(xp, "wino_acc", (b - a, c, h + 2 * p, wd + 2 * p), self.dtype)
            acc[...] = 0
            view = _tile_view(xp, acc, m, a_)
            for i in range(a_):
                for j in range(a_):
                    xp.add(view[i, j], dd[i, j], out=view[i, j])
            xp.copyto(out[a:b], acc[:, :, p:p + h, p:p + wd])
        return out

    def conv2d_grad_weight(self, x, gy, w_shape: tuple, ws):
        """The weight gradient of conv2d(x, w) for output gradient gy, summed over images."""
        xp = self.xp
        n, c, h, wd = x.shape
        o = gy.shape[1]
        m, aa = self.m, self.a * self.a
        tiles = (h // m) * (wd // m)
        du = xp.empty((aa, o, c), dtype=self.dtype)
        step = self._chunk(n, max(c, o), tiles)
        for a in range(0, n, step):
            b = min(n, a + step)
            v = self._input_tiles(x[a:b], ws)
            dm = self._output_grad_tiles(gy[a:b], ws)
            if a == 0:
                xp.matmul(dm, v.transpose(0, 2, 1), out=du)
            else:
                part = ws.get(xp, "wino_part", (aa, o, c), self.dtype)
                xp.matmul(dm, v.transpose(0, 2, 1), out=part)
                du += part
        dw = xp.matmul(du.reshape(aa, o * c).T, self.kg)  # G^T dU G: (O*C, r*r)
        return dw.reshape(w_shape)


class WinogradBackend(ops_numpy.NumpyBackend):
    """convc's NumPy backend with Winograd for the 5x5 stride-1 `same` convolutions
    whose channel counts are both at least `min_channels`, on batches of at least
    `min_images` images."""

    def __init__(self, min_channels: int = 32, min_images: int = 1) -> None:
        super().__init__()
        self.min_channels = min_channels
        self.min_images = min_images
        self._plans: dict = {}

    def _plan(self, x_shape, w_shape, stride, pad, dilation, dtype):
        o, c, kh, kw = w_shape
        if not (kh == kw and kh in TILE and tuple(stride) == (1, 1)
                and tuple(dilation) == (1, 1) and tuple(pad) == (kh // 2, kw // 2)
                and x_shape[2] % TILE[kh] == 0 and x_shape[3] % TILE[kh] == 0
                and min(c, o) >= self.min_channels and x_shape[0] >= self.min_images):
            return None
        key = (kh, numpy.dtype(dtype).str)
        if key not in self._plans:
            self._plans[key] = Winograd(numpy, kh, dtype)
        return self._plans[key]

    def conv2d(self, x, w, stride, pad, dilation, out=None):
        plan = self._plan(x.shape, w.shape, stride, pad, dilation, x.dtype)
        if plan is None:
            return super().conv2d(x, w, stride, pad, dilation, out=out)
        if out is None:
            out = numpy.empty((x.shape[0], w.shape[0]) + tuple(x.shape[2:]), x.dtype)
        return plan.conv2d(x, w, out, self.workspace)

    def conv2d_grad_input(self, gy, w, x_shape, stride, pad, dilation, out=None):
        plan = self._plan(x_shape, w.shape, stride, pad, dilation, gy.dtype)
        if plan is None:
            return super().conv2d_grad_input(gy, w, x_shape, stride, pad, dilation, out=out)
        if out is None:
            out = numpy.empty(tuple(x_shape), gy.dtype)
        return plan.conv2d_grad_input(gy, w, out, self.workspace)

    def conv2d_grad_weight(self, x, gy, w_shape, stride, pad, dilation):
        plan = self._plan(x.shape, w_shape, stride, pad, dilation, x.dtype)
        if plan is None:
            return super().conv2d_grad_weight(x, gy, w_shape, stride, pad, dilation)
        return plan.conv2d_grad_weight(x, gy, tuple(w_shape), self.workspace)


def _rel(a, ref) -> float:
    return float(numpy.abs(a - ref).max() / numpy.abs(ref).max())


def accuracy(shapes, dtype, points=POINTS, seed=0) -> list[dict]:
    """Max error / max |reference| of the three functions against the direct
    convolution in float64, for Winograd and for the direct convolution in `dtype`."""
    rng = numpy.random.default_rng(seed)
    ws = ops_numpy.Workspace()
    plan = Winograd(numpy, 5, dtype, points)
    rows = []
    for n, c, o, hw in shapes:
        x = rng.standard_normal((n, c, hw, hw))
        w = rng.standard_normal((o, c, 5, 5)) * 0.05
        gy = rng.standard_normal((n, o, hw, hw))
        geo = ((1, 1), (2, 2), (1, 1))
        ref = (ops_numpy.conv2d(numpy, x, w, *geo),
               ops_numpy.conv2d_grad_input(numpy, gy, w, x.shape, *geo),
               ops_numpy.conv2d_grad_weight(numpy, x, gy, w.shape, *geo))
        xd, wd, gd = (a.astype(dtype) for a in (x, w, gy))
        wino = (plan.conv2d(xd, wd, numpy.empty((n, o, hw, hw), dtype), ws),
                plan.conv2d_grad_input(gd, wd, numpy.empty(x.shape, dtype), ws),
                plan.conv2d_grad_weight(xd, gd, w.shape, ws))
        direct = (ops_numpy.conv2d(numpy, xd, wd, *geo),
                  ops_numpy.conv2d_grad_input(numpy, gd, wd, x.shape, *geo),
                  ops_numpy.conv2d_grad_weight(numpy, xd, gd, w.shape, *geo))
        rows.append(dict(shape=(n, c, o, hw), winograd=[_rel(a, r) for a, r in zip(wino, ref)],
                         direct=[_rel(a, r) for a, r in zip(direct, ref)]))
    return rows


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(numpy.median(times) * 1e3)


def kernel_times(shapes, repeats: int = 15, seed=0) -> list[dict]:
    """Median ms of the three functions, direct and Winograd, float32, on this thread."""
    rng = numpy.random.default_rng(seed)
    direct, wino = ops_numpy.NumpyBackend(), WinogradBackend(min_channels=1)
    geo = ((1, 1), (2, 2), (1, 1))
    rows = []
    for n, c, o, hw in shapes:
        x = rng.standard_normal((n, c, hw, hw)).astype(numpy.float32)
        w = (rng.standard_normal((o, c, 5, 5)) * 0.05).astype(numpy.float32)
        gy = rng.standard_normal((n, o, hw, hw)).astype(numpy.float32)
        y = numpy.empty((n, o, hw, hw), numpy.float32)
        dx = numpy.empty_like(x)
        row = dict(shape=(n, c, o, hw))
        for name, be in (("direct", direct), ("winograd", wino)):
            row[name] = [
                _median_ms(lambda: be.conv2d(x, w, *geo, out=y), repeats),
                _median_ms(lambda: be.conv2d_grad_input(gy, w, x.shape, *geo, out=dx), repeats),
                _median_ms(lambda: be.conv2d_grad_weight(x, gy, w.shape, *geo), repeats)]
        rows.append(row)
    return rows


def step_ab(rounds: int = 6, seed=0) -> dict:
    """One shard (half the batch) of the shi2015 yardstick step, loss and BPTT, on one
    thread: the direct backend, Winograd wherever it fits, and Winograd for batches of
    8 images or more only (the hoisted convolutions and weight gradients), interleaved;
    median ms of each and the work arrays each backend keeps."""
    import convc.api
    from convc.runtime.bench import CONFIGS, peer_cell_text

    cfg = dict(CONFIGS["shi2015"], name="shi2015")
    mod = convc.api.load(None, text=peer_cell_text(cfg))
    rng = numpy.random.default_rng(seed)
    params = {k: (rng.standard_normal(v["shape"]) * 0.05).astype(numpy.float32)
              for k, v in mod.PARAMS.items()}
    half = cfg["N"] // 2
    data = rng.random((half, cfg["T"] + 1, cfg["Cin"], cfg["H"], cfg["H"])).astype(numpy.float32)
    inputs, targets = {"x": data[:, :-1].copy()}, {"y": data[:, 1:].copy()}
    backends = {"direct": ops_numpy.NumpyBackend(), "winograd": WinogradBackend(),
                "winograd, 8+ images": WinogradBackend(min_images=8)}
    times: dict = {k: [] for k in backends}
    losses = {}
    for r in range(rounds + 1):
        for name, be in backends.items():
            t0 = time.perf_counter()
            loss, _, _ = mod.loss_and_grad_shard(params, inputs, targets, backend=be)
            if r:  # the first round warms up the work arrays
                times[name].append(time.perf_counter() - t0)
            losses[name] = float(loss)
    return dict(ms={k: float(numpy.median(v) * 1e3) for k, v in times.items()},
                rounds={k: [round(t * 1e3) for t in v] for k, v in times.items()}, loss=losses,
                work_mb={k: be.workspace.nbytes() / 2**20 for k, be in backends.items()})


def _one_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="accuracy checks only, small shapes")
    p.add_argument("--rounds", type=int, default=6, help="rounds of the step A/B (default 6)")
    a = p.parse_args(argv)
    small = [(2, 8, 12, 8), (3, 5, 7, 6)]
    full = [(2, 64, 256, 16), (20, 64, 256, 16), (20, 128, 256, 16)]
    ok = True
    print("accuracy: max |error| / max |float64 direct|   (conv, input grad, weight grad)")
    for dtype in (numpy.float64, numpy.float32):
        for label, points in POINT_SETS.items():
            for row in accuracy(small if a.quick else full, dtype, points):
                w, d = row["winograd"], row["direct"]
                print(f"  {numpy.dtype(dtype).name:7s} points {label:13s} (N, C, O, HW) "
                      f"{row['shape']}: winograd " + " ".join(f"{e:.1e}" for e in w)
                      + "   direct " + " ".join(f"{e:.1e}" for e in d))
                if dtype == numpy.float64:
                    ok &= max(w) < 1e-12
                else:
                    ok &= max(w) < 1e-4
    if not ok:
        print("FAILED: Winograd disagrees with the direct convolution")
        return 1
    if a.quick:
        return 0
    with _one_thread():
        print("\none thread, float32, median ms   (conv, input grad, weight grad)")
        for row in kernel_times(full):
            print(f"  (N, C, O, HW) {row['shape']}: direct "
                  + " ".join(f"{t:6.1f}" for t in row["direct"]) + "   winograd "
                  + " ".join(f"{t:6.1f}" for t in row["winograd"]))
        res = step_ab(a.rounds)
    print("\nshi2015 step, one shard (2 sequences) on one thread, median ms: "
          + ", ".join(f"{k} {v:.0f} {res['rounds'][k]}" for k, v in res["ms"].items()))
    print("  losses: " + ", ".join(f"{k} {v:.7f}" for k, v in res["loss"].items()))
    print("  work arrays kept: " + ", ".join(f"{k} {v:.1f} MB" for k, v in res["work_mb"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

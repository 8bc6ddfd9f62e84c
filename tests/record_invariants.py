"""Record the numbers the compiler refactor of issue 16 must keep, bit for bit.

    python tests/record_invariants.py [--out FILE] [--models-of RECORD]

For every model below this compiles the model, builds float64 parameters,
inputs and targets from fixed seeds, and writes the sha256 digest of the
exact bytes (its first 16 hex digits) of everything the generated module
computes from them:

- the parameters `init_params` makes (`params.NAME`), so a change there is
  told apart from a change in the arithmetic;
- `forward`: every output and every final state (`forward.out.NAME`,
  `forward.final.NAME`);
- `loss` (`loss`, as float.hex(): exact and readable);
- `loss_and_grad` with full BPTT (`full.*`) and with bptt=2 (`bptt2.*`):
  the loss, every parameter's gradient and every final state;
- for the examples also a module compiled with recompute=2 (`@recompute2`).

The models: every examples/*.cell (shrunk with tests/helpers.py's `shrink`:
8x8 frames, at most 3 hidden channels); every cell of spec/stdlib/std.cell
wrapped in small models (next frame with a 3x3 and a 1x1 kernel, the second
from a given starting state with a `steps = last` loss, and an
encoder-forecaster); and 50 random models from the grammar generator of
tests/test_random_models.py (`models()`), model k drawn with its own
random.Random(k) in place of Hypothesis' `draw` (`seeded_draw`), so the same
50 texts come every run and they are independent draws, not Hypothesis'
mutations of each other. The record keeps each model's text (for an example:
its path and the digest of the shrunk text), so tests/test_invariants.py
recomputes exactly what was recorded, whatever later happens to the
generator. At bc35bd6 each of the 72 models also agreed with the reference
interpreter and passed the float64 gradient check (full BPTT and bptt=2).

The inputs are made here, not by runtime/gradcheck.py's `random_problem`
(whose recipe `problem` below copies, as of bc35bd6), so that a refactor of
the runtime cannot change what is fed in. BLAS runs on one thread (as
tests/helpers.py's `one_blas_thread`, through threadpoolctl): on the
recording machine (OpenBLAS 0.3.31, 2 cores) 2 threads gave other bits for
examples/shi2015's forward pass (its GEMMs are large enough to be split),
while each thread count alone gave the same bits run after run.

Bits depend on the CPU's BLAS kernels (OpenBLAS picks SkylakeX on AVX-512,
Haswell on AVX2), so there is one record per BLAS architecture:
tests/invariants/record-<architecture>.json. A record for a new machine is
made from the committed code at the refactor's current step, which the
other records prove bitwise unchanged, and for the same model texts:
`--models-of tests/invariants/record-SkylakeX.json` recomputes the models of
that record (the random models are the same texts, not a new draw).

The first record was made from the committed code in a clean worktree:

    git worktree add --detach /tmp/inv HEAD
    cp tests/record_invariants.py /tmp/inv/tests/   # if not committed yet
    cd /tmp/inv && CONVC_TREE=/tmp/inv PYTHONPATH=/tmp/wtboot \\
        /work/main/.venv/bin/python tests/record_invariants.py --out /tmp/record.json

(/tmp/wtboot/sitecustomize.py maps the `convc.*` imports to $CONVC_TREE,
since the venv's editable install points at the main tree.) See
tests/test_invariants.py for when the record may be regenerated: never
during the refactor.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import random
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RECORDS = HERE / "invariants"


def record_path(env: dict) -> Path:
    """Where the record of this environment lives: named by its BLAS architecture."""
    arch = "-".join(sorted({b.rsplit(" ", 1)[-1] for b in env.get("blas") or []})) or "unknown"
    return RECORDS / f"record-{arch}.json"


def records() -> list[tuple[Path, dict]]:
    return [(p, json.loads(p.read_text(encoding="utf-8")))
            for p in sorted(RECORDS.glob("record-*.json"))]
if str(HERE) not in sys.path:  # helpers.py, test_random_models.py
    sys.path.insert(0, str(HERE))

PROBLEM = dict(batch=2, frames=3, frames_out=2, seed=0, spread=0.3, state_seed=2000,
               state_scale=0.5, dtype="float64")
SHRINK = dict(size=8, hidden=3)
N_RANDOM = 50
BLAS_THREADS = 1
DIGEST_HEX = 16


# ---------------------------------------------------------------- the models

STD_CELLS = {
    "ConvLSTM": "ConvLSTM(hidden = 3, kernel = {k}, peephole = true)",
    "ConvLSTM_nopeep": "ConvLSTM(hidden = 3, kernel = {k}, peephole = false)",
    "ConvLSTMFused": "ConvLSTMFused(hidden = 3, kernel = {k})",
    "ConvGRU": "ConvGRU(hidden = 3, kernel = {k})",
}

NEXT_FRAME = """import std

model {name} {{
    input x: [2, 6, 6]
    target y: [1, 6, 6]
    l = {cell}
    h = l(x)
    weight W_out = kernel(1, 1)
    weight b_out = bias(1)
    pred = {head}
    output pred
    loss {loss}
}}
"""

FORECASTER = """import std

model {name} {{
    input x: [2, 6, 6]
    target y: [1, 6, 6]
    enc = {cell}
    h = enc(x)
    fc = {cell}
    g = fc(steps = y, init = enc)
    weight W_out = kernel(1, 1)
    weight b_out = bias(1)
    pred = sigmoid(conv(g, W_out) + b_out)
    output pred
    loss bce(pred, y)
}}
"""


def std_models() -> list[dict]:
    """Each standard cell in a next-frame model (3x3; 1x1 from a given state with a
    loss on the last step) and as an encoder-forecaster (3x3)."""
    out = []
    for key, cell in STD_CELLS.items():
        name = f"std_{key}_next"
        out.append(dict(name=f"std/{key}/next", kind="std", stateful=False, text=NEXT_FRAME.format(
            name=name.lower(), cell=cell.format(k=3),
            head="sigmoid(conv(h, W_out) + b_out)", loss="bce(pred, y)")))
        name = f"std_{key}_next1"
        out.append(dict(name=f"std/{key}/next_k1_state", kind="std", stateful=True,
                        text=NEXT_FRAME.format(
                            name=name.lower(), cell=cell.format(k=1),
                            head="conv(h, W_out) + b_out", loss="mse(pred, y, steps = last)")))
        text = FORECASTER.format(name=f"std_{key}_fc".lower(), cell=cell.format(k=3))
        out.append(dict(name=f"std/{key}/forecaster", kind="std", stateful=False, text=text))
    return out


def example_models() -> list[dict]:
    """Every examples/*.cell, shrunk; each also compiled with recompute=2."""
    from helpers import shrink

    out = []
    for path in sorted((ROOT / "examples").glob("*.cell")):
        text = shrink(path.read_text(encoding="utf-8"), **SHRINK)
        base = dict(kind="example", path=f"examples/{path.name}", shrink=dict(SHRINK),
                    text_sha256=hashlib.sha256(text.encode()).hexdigest(), stateful=False)
        out.append(dict(base, name=f"example/{path.stem}"))
        out.append(dict(base, name=f"example/{path.stem}@recompute2", recompute=2))
    return out


def seeded_draw(rng: random.Random):
    """A Hypothesis-style `draw` that samples the generator's strategies from `rng`:
    sampled_from and booleans uniformly, integers(a, b) uniformly in [a, b] (and
    just(v), what sampled_from of one element is). Only these occur in tests/test_random_models.py's models()."""
    def draw(strategy):
        s = getattr(strategy, "wrapped_strategy", strategy)
        kind = type(s).__name__
        if kind == "SampledFromStrategy" and not s._transformations:
            return rng.choice(list(s.elements))
        if kind == "IntegersStrategy" and s.start is not None and s.end is not None:
            return rng.randint(s.start, s.end)
        if kind == "JustStrategy":  # sampled_from of one element
            return s.value
        if kind == "BooleansStrategy":
            return rng.random() < 0.5
        raise TypeError(f"seeded_draw cannot draw from {strategy!r}")
    return draw


def random_models(n: int = N_RANDOM) -> list[dict]:
    """n distinct models from models(), model k drawn with random.Random(k) (k = 0, 1,
    ...), independently of each other and of Hypothesis' own search."""
    import test_random_models as trm

    definition = trm.models().wrapped_strategy.definition  # the @st.composite function
    out, seen, k = [], set(), 0
    while len(out) < n:
        spec = definition(seeded_draw(random.Random(k)))
        k += 1
        if spec.text in seen:
            continue
        seen.add(spec.text)
        crc = zlib.crc32(spec.text.encode())
        out.append(dict(name=f"random/{len(out):02d}-{crc:08x}", kind="random", draw_seed=k - 1,
                        stateful=bool(spec.stateful), text=spec.text))
    return out


def all_models() -> list[dict]:
    return example_models() + std_models() + random_models()


# ---------------------------------------------------------------- computing

def digest(a) -> str:
    """The sha256 of an array's dtype, shape and exact bytes, its first DIGEST_HEX
    hex digits (64 bits: a changed array goes unnoticed with odds 2**-64)."""
    a = np.ascontiguousarray(np.asarray(a))
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()[:DIGEST_HEX]


def scalar(x) -> str:
    """A loss, exactly: float.hex() of its float64 value (and its dtype if not float64)."""
    a = np.asarray(x)
    if a.shape != ():
        return "array:" + digest(a)
    s = float(a).hex()
    return s if a.dtype == np.float64 else f"{a.dtype.str}:{s}"


def load(entry: dict):
    """Compile a recorded model; for an example, check its text is the recorded one."""
    import convc.api as api

    if entry["kind"] == "example":
        from helpers import shrink

        path = ROOT / entry["path"]
        text = shrink(path.read_text(encoding="utf-8"), **entry["shrink"])
        if hashlib.sha256(text.encode()).hexdigest() != entry["text_sha256"]:
            raise TextChanged(f"{entry['path']} is not the text that was recorded")
    else:
        text = entry["text"]
        safe = entry["name"].replace("/", "_").replace("@", "_")
        path = HERE / f"invariants_{safe}.cell"
    kw = {"recompute": entry["recompute"]} if entry.get("recompute") else {}
    return api.load(path, text=text, **kw)


class TextChanged(Exception):
    pass


def problem(mod, stateful: bool):
    """runtime/gradcheck.py's random_problem(mod, batch=2, frames=3, frames_out=2,
    seed=0) as of bc35bd6, plus N(0, 0.5) starting states when `stateful`; also the
    `steps=` that forward needs for a forecaster's own time axis."""
    p = PROBLEM
    meta = mod.MODEL
    rng = np.random.default_rng(p["seed"])
    params = mod.init_params(seed=p["seed"], dtype="float64")
    params = {k: v + rng.normal(0.0, p["spread"], v.shape) for k, v in sorted(params.items())}
    axes = meta.get("axes", {})
    in_axes = {axes.get(n) for n in meta["inputs"]}

    def length(name):
        return p["frames"] if axes.get(name) in in_axes else p["frames_out"]

    def seqs(table):
        return {n: rng.uniform(0.0, 1.0, (p["batch"], length(n)) + tuple(s))
                for n, s in sorted(table.items())}

    inputs, targets = seqs(meta["inputs"]), seqs(meta["targets"])
    state = None
    if stateful:
        srng = np.random.default_rng(p["seed"] + p["state_seed"])
        state = {n: srng.normal(0.0, p["state_scale"], (p["batch"],) + tuple(s["shape"]))
                 for n, s in sorted(meta["states"].items())}
    out_axes = {axes[n] for n in meta["targets"] if axes.get(n) not in in_axes}
    steps = {ax: p["frames_out"] for ax in sorted(out_axes)} or None
    return params, inputs, targets, state, steps


def compute(entry: dict) -> dict[str, str]:
    """Every recorded quantity of one model: {quantity: digest or float.hex}."""
    mod = load(entry)
    params, inputs, targets, state, steps = problem(mod, entry.get("stateful", False))
    out = {}
    for k in sorted(params):
        out[f"params.{k}"] = digest(params[k])
    outputs, finals = mod.forward(params, inputs, steps=steps, state=state)
    for k in sorted(outputs):
        out[f"forward.out.{k}"] = digest(outputs[k])
    for k in sorted(finals):
        out[f"forward.final.{k}"] = digest(finals[k])
    out["loss"] = scalar(mod.loss(params, inputs, targets, state=state))
    for mode, bptt in (("full", None), ("bptt2", 2)):
        loss, grads, finals = mod.loss_and_grad(params, inputs, targets, state=state, bptt=bptt)
        out[f"{mode}.loss"] = scalar(loss)
        assert set(grads) == set(params), (entry["name"], sorted(set(params) ^ set(grads)))
        for k in sorted(grads):
            out[f"{mode}.grad.{k}"] = digest(grads[k])
        for k in sorted(finals):
            out[f"{mode}.final.{k}"] = digest(finals[k])
    return out


def differences(want: dict[str, str], got: dict[str, str]) -> list[str]:
    """Every quantity whose recorded and recomputed values differ (or that only one
    has), grouped: ['full.grad: enc1.W_x, enc1.b_f', 'full.loss: 0x1.8p-1 -> ...']."""
    groups: dict[str, list[str]] = {}
    for k in sorted(set(want) | set(got)):
        old, new = want.get(k), got.get(k)
        if old == new:
            continue
        # params.NAME, forward.out.NAME, full.grad.NAME, full.final.NAME; loss, full.loss
        parts = k.split(".", 2)
        if parts[0] == "params":
            group, name = "params", k[len("params."):]
        elif len(parts) == 3 and parts[1] in ("out", "final", "grad"):
            group, name = f"{parts[0]}.{parts[1]}", parts[2]
        else:
            group, name = k, ""
        if old is None or new is None:
            name = f"{name or k} ({'not recorded' if old is None else 'not computed'})"
        elif not name:  # a loss: both values
            try:
                x, y = float.fromhex(old), float.fromhex(new)
                name = f"{old} -> {new} (relative change {abs(x - y) / max(abs(x), 1e-300):.1e})"
            except ValueError:
                name = f"{old} -> {new}"
        groups.setdefault(group, []).append(name)
    return [f"{g}: {', '.join(names)}" for g, names in groups.items()]


def blas_limits(threads: int = BLAS_THREADS):
    """A context limiting BLAS to `threads` (a no-op without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


def environment() -> dict:
    """What the bits may depend on besides the code: NumPy, the BLAS and the CPU."""
    env = {"numpy": np.__version__, "machine": platform.machine()}
    try:
        from threadpoolctl import threadpool_info

        blas = [d for d in threadpool_info() if d.get("user_api") == "blas"]
        # NumPy's own BLAS: torch, SciPy or scikit-image loaded by other tests bring theirs
        mine = [d for d in blas if "numpy" in str(d.get("filepath", "")).lower()]
        blas = mine or blas
        env["blas"] = [f"{d.get('internal_api')} {d.get('version')} {d.get('architecture')}"
                       for d in blas]
    except ImportError:
        env["blas"] = None
    return env


def _commit() -> str | None:
    """HEAD, with " + uncommitted changes" when the tree has any besides this file."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
    try:
        head = git("rev-parse", "HEAD").strip()
        changed = [line for line in git("status", "--porcelain", "--untracked-files=no")
                   .splitlines() if not line.endswith("record_invariants.py") and "invariants/record-" not in line]
    except Exception:
        return None
    return head + (" + uncommitted changes" if changed else "")


def record(threads: int = BLAS_THREADS, models: list[dict] | None = None) -> dict:
    """Digests of `models` (default: all_models()) made on this machine."""
    if models is None:
        models = all_models()
    else:
        models = [{k: v for k, v in m.items() if k != "digests"} for m in models]
    with blas_limits(threads):
        for entry in models:
            entry["digests"] = compute(entry)
    return dict(
        about="tests/record_invariants.py: sha256 of the exact bytes (losses as float.hex) "
              "that tests/test_invariants.py recomputes; regenerate only for an intended "
              "numerical change (see its docstring)",
        recorded_from=_commit(), environment=environment(), blas_threads=threads,
        problem=PROBLEM, models=models)


def write(rec: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="default: tests/invariants/record-<this BLAS architecture>.json")
    ap.add_argument("--models-of", type=Path, default=None,
                    help="recompute the models of this record instead of drawing them")
    ap.add_argument("--threads", type=int, default=BLAS_THREADS,
                    help="BLAS threads while computing (default 1)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    models = (json.loads(args.models_of.read_text(encoding="utf-8"))["models"]
              if args.models_of else None)
    rec = record(args.threads, models)
    args.out = args.out or record_path(rec["environment"])
    write(rec, args.out)
    n = sum(len(m["digests"]) for m in rec["models"])
    print(f"{len(rec['models'])} models, {n} quantities, {time.perf_counter() - start:.1f} s "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How many calls a time step of the generated code makes: fused kernels against plain.

    .venv/bin/python bench/calls_per_step.py
    .venv/bin/python bench/calls_per_step.py --configs seed shi2015

For each peer yardstick configuration (runtime/bench.py CONFIGS, the model as
`.cell` text by peer_cell_text), the module is compiled twice, with fused
step kernels and without (fuse=True / fuse=False), and the body of each time
loop of loss_and_grad_shard (the general step: `for t in range(...)`) is
read from the generated source. Printed per loop: the calls a step makes
from the generated code, by kind: elementwise NumPy or runtime calls
(`xp.*`, `rt.*` but the convolutions), fused kernels (`K.*`) and
convolutions (`rt.conv2d*`, each one a few NumPy calls and a GEMM inside).
Counted from the source, so the count is exact and needs no timing.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CALL = re.compile(r"\b(xp|rt|K)\.(\w+)\(")


def loop_bodies(source: str, function: str = "loss_and_grad_shard") -> list[list[str]]:
    """The lines of each `for t in range(...)` loop of one generated function."""
    lines = source.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"def {function}("))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("def ")),
               len(lines))
    bodies = []
    i = start
    while i < end:
        ln = lines[i]
        if ln.lstrip().startswith("for t in range("):
            indent = len(ln) - len(ln.lstrip())
            body = []
            i += 1
            while i < end and (not lines[i].strip() or
                               len(lines[i]) - len(lines[i].lstrip()) > indent):
                body.append(lines[i])
                i += 1
            bodies.append(body)
            continue
        i += 1
    return bodies


def count(body: list[str]) -> dict[str, int]:
    kinds = {"elementwise": 0, "fused kernels": 0, "convolutions": 0}
    for ln in body:
        code = ln.split("#", 1)[0]
        for mod, name in CALL.findall(code):
            if mod == "K":
                kinds["fused kernels"] += 1
            elif name.startswith("conv2d"):
                kinds["convolutions"] += 1
            elif name not in ("empty",):
                kinds["elementwise"] += 1
    return kinds


def main(argv=None) -> int:
    import convc
    from convc.runtime.bench import CONFIGS, peer_cell_text

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    args = ap.parse_args(argv)
    print(f"{'config':8} {'loop':>4} {'':6} {'elementwise':>11} {'fused kernels':>13} "
          f"{'convolutions':>12} {'calls/step':>10}")
    for name in args.configs:
        text = peer_cell_text(dict(CONFIGS[name], name=name))
        for label, fuse in (("plain", False), ("fused", True)):
            mod = convc.load(None, text=text, fuse=fuse)
            for k, body in enumerate(loop_bodies(mod.source)):
                c = count(body)
                print(f"{name:8} {k:>4} {label:6} {c['elementwise']:>11} "
                      f"{c['fused kernels']:>13} {c['convolutions']:>12} {sum(c.values()):>10}")
    print("\n(loop 0, 1, ...: the forward loops, then the backward ones, of loss_and_grad's "
          "general step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

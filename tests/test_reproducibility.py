"""Bitwise reproducibility of generated training code, and buffers never read unwritten.

- Two runs of 20 SGD steps (the generated `sgd_step`, float32) of the seed
  and stack examples from the same initial parameters give the same loss
  sequence and the same final parameters, bit for bit; so do two fresh
  interpreters.
- Poison mode (`convc.runtime.kernels.set_poison(True)`) fills every
  buffer from `rt.empty` with NaN. The forward pass, loss, gradients and
  final states are bitwise the same with it on and off, for every example,
  with full and truncated BPTT and from given states: no buffer element is
  read before it is written.

The examples run with 8x8 frames and at most 4 hidden channels, to stay fast.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from convc.runtime import kernels
from helpers import one_blas_thread  # noqa: F401  (an autouse fixture)
from helpers import EXAMPLES, example_ids, load_example, random_batch, random_state, tree_bytes

STEPS = 20
LR = 0.05
SGD_EXAMPLES = ("seed", "stack")


def example(stem: str):
    return next(p for p in EXAMPLES if p.stem == stem)


def train(path, steps: int = STEPS):
    """`steps` SGD steps from init_params(seed=0); returns (losses, final params)."""
    mod = load_example(path, hidden=4)
    params = mod.init_params(seed=0, dtype="float32")
    inputs, targets = random_batch(mod, N=2, T=4, seed=0, dtype="float32")
    losses = [mod.sgd_step(params, inputs, targets, LR) for _ in range(steps)]
    return np.asarray(losses, dtype=np.float64), params


def fingerprint(losses, params) -> str:
    return hashlib.sha256(tree_bytes({"losses": losses}) + tree_bytes(params)).hexdigest()


@pytest.mark.parametrize("stem", SGD_EXAMPLES)
def test_two_runs_are_bitwise_identical(stem):
    losses_a, params_a = train(example(stem))
    losses_b, params_b = train(example(stem))
    assert np.isfinite(losses_a).all()
    assert losses_a[-1] < losses_a[0], "training did not move"
    assert losses_a.tobytes() == losses_b.tobytes()
    assert tree_bytes(params_a) == tree_bytes(params_b)
    assert all(params_a[k].dtype == np.float32 for k in params_a)


_TRAIN_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import test_reproducibility as r
out = {{}}
for stem in sys.argv[1:]:
    out[stem] = r.fingerprint(*r.train(r.example(stem)))
print(json.dumps(out))
"""


def test_fresh_processes_are_bitwise_identical(tmp_path):
    here = {stem: fingerprint(*train(example(stem))) for stem in SGD_EXAMPLES}
    script = tmp_path / "train20.py"
    script.write_text(_TRAIN_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__))),
                      encoding="utf-8")
    for seed in ("0", "7"):
        # one BLAS thread, as in this process (the one_blas_thread fixture)
        env = dict(os.environ, PYTHONHASHSEED=seed, OPENBLAS_NUM_THREADS="1",
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        run = subprocess.run([sys.executable, str(script), *SGD_EXAMPLES], env=env,
                             capture_output=True, text=True, cwd=os.getcwd(), timeout=300)
        assert run.returncode == 0, run.stderr
        there = json.loads(run.stdout.strip().splitlines()[-1])
        assert there == here, f"PYTHONHASHSEED={seed}"


# ---------------------------------------------------------------- poison mode

@pytest.fixture
def poison():
    """Turn poison mode on inside the test; always off again afterwards."""
    assert not kernels.poison_enabled()
    try:
        yield
    finally:
        kernels.set_poison(False)


def everything(mod, params, inputs, targets, **kw) -> bytes:
    T_out = targets[next(iter(targets))].shape[1]
    outputs, finals = mod.forward(params, inputs, steps=T_out, state=kw.get("state"))
    loss, grads, finals2 = mod.loss_and_grad(params, inputs, targets, **kw)
    return (tree_bytes({f"out.{k}": v for k, v in outputs.items()})
            + tree_bytes({f"final.{k}": v for k, v in finals.items()})
            + tree_bytes({"loss": np.float64(loss)})
            + tree_bytes({f"grad.{k}": v for k, v in grads.items()})
            + tree_bytes({f"final2.{k}": v for k, v in finals2.items()}))


@pytest.mark.parametrize("path", EXAMPLES, ids=example_ids())
@pytest.mark.parametrize("mode", ["full", "bptt", "state"])
def test_poison_mode_changes_nothing(path, mode, poison):
    mod = load_example(path)
    params = mod.init_params(seed=0, dtype="float32")
    inputs, targets = random_batch(mod, N=2, T=5, seed=0, dtype="float32")
    kw = {"full": {}, "bptt": {"bptt": 2},
          "state": {"state": {k: v.astype(np.float32)
                              for k, v in random_state(mod, N=2).items()}}}[mode]
    clean = everything(mod, params, inputs, targets, **kw)
    kernels.set_poison(True)
    poisoned = everything(mod, params, inputs, targets, **kw)
    kernels.set_poison(False)
    assert poisoned == clean


def test_poison_mode_is_visible():
    """The check above means something: poison fills buffers with NaN."""
    try:
        kernels.set_poison(True)
        buf = kernels.empty(np, (3, 2), np.float32)
    finally:
        kernels.set_poison(False)
    assert np.isnan(buf).all()

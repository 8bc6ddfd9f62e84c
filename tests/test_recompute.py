"""recompute=K: forward values kept for windows of K steps, recomputed in the backward pass.

The recomputation runs the same generated code on the same operands, so the
backward pass sees exactly the values the forward pass made. Against the plan
that keeps all steps the only difference is the input convolutions, which run
window by window (GEMMs of another size, which BLAS may round differently in
float32): loss, gradients and final states agree to rounding, for every
example, window length, truncation and starting state, and a run with
recompute is bitwise repeatable. The memory report must describe the
buffers actually allocated, and the plan must allocate less.
"""
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import convc
from convc import cli
from convc.runtime.ops_numpy import NumpyBackend
from convc.runtime.summary import plan_memory

sys.path.insert(0, str(Path(__file__).parent))
from helpers import one_blas_thread  # noqa: F401,E402  (an autouse fixture)
from helpers import check_gradients, load_text, random_batch, random_params  # noqa: E402
from helpers import random_state  # noqa: E402
from test_random_models import CROSSED, DELAY, models  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.cell"))


def _same(a, b, rtol=1e-12, **kw):
    la, ga, fa = a.loss_and_grad(**kw)
    lb, gb, fb = b.loss_and_grad(**kw)
    assert abs(la - lb) <= rtol * abs(la)
    assert sorted(ga) == sorted(gb) and sorted(fa) == sorted(fb)
    for k in ga:
        scale = float(np.abs(ga[k]).max())
        np.testing.assert_allclose(gb[k], ga[k], rtol=rtol, atol=rtol * scale, err_msg=k)
    for k in fa:
        np.testing.assert_allclose(fb[k], fa[k], rtol=rtol, atol=rtol, err_msg=k)
    # and a second call with recompute is bitwise the first
    lc, gc, fc = b.loss_and_grad(**kw)
    assert lc == lb and all(np.array_equal(gc[k], gb[k]) for k in gb)


@pytest.mark.parametrize("K", [1, 3, 50])
@pytest.mark.parametrize("name", [n for n in EXAMPLES if n != "shi2015.cell"])
def test_same_results_as_keeping_all_steps(name, K):
    full = convc.load(ROOT / "examples" / name)
    windowed = convc.load(ROOT / "examples" / name, recompute=K)
    assert "_steps(" in windowed.source  # every example has a loop it can recompute
    params = random_params(full)
    inputs, targets = random_batch(full, N=2, T=7)
    _same(full, windowed, params=params, inputs=inputs, targets=targets)
    _same(full, windowed, params=params, inputs=inputs, targets=targets, bptt=3)
    state = random_state(full, N=2)
    _same(full, windowed, params=params, inputs=inputs, targets=targets, state=state)


def test_float32_and_paper_model():
    full = convc.load(ROOT / "examples" / "shi2015.cell")
    windowed = convc.load(ROOT / "examples" / "shi2015.cell", recompute=4)
    params = full.init_params(seed=0)  # float32
    inputs, targets = random_batch(full, N=1, T=5)
    inputs = {k: v.astype(np.float32) for k, v in inputs.items()}
    targets = {k: v.astype(np.float32) for k, v in targets.items()}
    _same(full, windowed, rtol=1e-4, params=params, inputs=inputs, targets=targets)


@pytest.mark.parametrize("text", [DELAY, CROSSED], ids=["delay", "crossed"])
def test_states_that_meet_across_a_step(text):
    full = load_text(text, "test_recompute_across.cell")
    windowed = load_text(text, "test_recompute_across.cell", recompute=2)
    params = random_params(full)
    inputs, targets = random_batch(full, N=2, T=5)
    _same(full, windowed, params=params, inputs=inputs, targets=targets)


def test_gradient_check_with_recompute():
    mod = convc.load(ROOT / "examples" / "stack.cell", recompute=2)
    params = random_params(mod)
    inputs, targets = random_batch(mod, N=2, T=5)
    check_gradients(mod, params, inputs, targets, n_dirs=1)


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=models())
def test_random_models_same_results(spec):
    full = load_text(spec.text, "test_recompute_random.cell")
    windowed = load_text(spec.text, "test_recompute_random.cell", recompute=2)
    params = random_params(full)
    inputs, targets = random_batch(full, N=2, T=spec.T)
    state = random_state(full, N=2) if spec.stateful else None
    _same(full, windowed, params=params, inputs=inputs, targets=targets, state=state,
          bptt=spec.bptt)


def _peak(mod, params, inputs, targets):
    """Memory allocated by one call from a fresh backend (the arenas included)."""
    backend = NumpyBackend()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        mod.loss_and_grad_shard(params, inputs, targets, backend=backend)
        return tracemalloc.get_traced_memory()[1] - base, backend
    finally:
        tracemalloc.stop()


def test_memory_report_matches_the_arena_and_the_plan_allocates_less():
    N, T = 4, 40
    path = ROOT / "examples" / "stack.cell"
    full = convc.load(path)
    params = {k: v.astype(np.float32) for k, v in full.init_params(seed=0).items()}
    inputs, targets = random_batch(full, N=N, T=T)
    inputs = {k: v.astype(np.float32) for k, v in inputs.items()}
    targets = {k: v.astype(np.float32) for k, v in targets.items()}
    peaks, plans = {}, {}
    for K in (None, 1):
        mod = full if K is None else convc.load(path, recompute=K)
        peaks[K], backend = _peak(mod, params, inputs, targets)
        plans[K] = plan_memory(mod.MODEL, T, batch=N)["bytes"]
        # the arena the backend holds is the one the report counts
        (axis, per_step), = mod.MODEL["memory"]["arena"].items()
        arena = [v for k, v in backend.workspace._flat.items()
                 if k[:2] == ("slot", "arena")]
        assert len(arena) == 1 and arena[0].size == per_step * T * N
    saved = plans[None] - plans[1]
    assert saved > 0.2 * plans[None]
    # the measured peak (scratch memory and returned gradients included) drops too
    assert peaks[None] - peaks[1] > 0.5 * saved, (peaks, plans)


def test_invalid_window_length_is_an_error():
    with pytest.raises(ValueError, match="recompute"):
        convc.load(ROOT / "examples" / "seed.cell", recompute=0)


def test_cli_summary_and_compile_report_the_bytes_saved(capsys, tmp_path):
    seed = str(ROOT / "examples" / "stack.cell")
    assert cli.main(["summary", seed, "--frames", "40", "--batch", "4",
                     "--recompute", "2"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("recompute=2"))
    assert "saves" in line and "0 B" not in line and "of 40 forward steps again" in line
    target = tmp_path / "m.py"
    assert cli.main(["compile", seed, "--recompute", "3", "-o", str(target)]) == 0
    err = capsys.readouterr().err
    assert "recompute=3" in err and "saves" in err
    assert "def loop0_steps(start, stop):" in target.read_text()


def test_cli_train_with_recompute(capsys, tmp_path):
    out = tmp_path / "run"
    code = cli.main(["train", str(ROOT / "examples" / "seed.cell"), "--steps", "2", "--clips",
                     "4", "--frames-in", "4", "--out", str(out), "-q", "--recompute", "2"])
    assert code == 0, capsys.readouterr().err
    assert "loop0_steps" in (out / "model.py").read_text()


@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("name", ["seed.cell", "encoder_forecaster.cell"])
def test_sequences_shorter_than_a_window_and_debug_nans(name, T):
    full = convc.load(ROOT / "examples" / name)
    windowed = convc.load(ROOT / "examples" / name, recompute=3, debug_nans=True)
    params = random_params(full)
    inputs, targets = random_batch(full, N=2, T=T, T_out=T)
    _same(full, windowed, params=params, inputs=inputs, targets=targets)

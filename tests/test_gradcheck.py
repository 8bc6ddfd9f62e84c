"""The truncated-BPTT reference of runtime/gradcheck.py holds for every loop arrangement.

Before it was built from the model's own step-by-step forward pass with the
window-boundary states held constant, a forecaster (`fc(steps = y, init = enc)`)
ended in a TypeError and a `steps = last` loss (seed.cell) was a false FAIL.
"""
from __future__ import annotations

import pytest

from helpers import EXAMPLES, check_gradients, load_example, one_blas_thread  # noqa: F401
from helpers import random_batch, random_params

SMALL = [p for p in EXAMPLES if p.stem in ("seed", "encoder_forecaster", "stack")]


@pytest.mark.parametrize("bptt", [1, 2])
@pytest.mark.parametrize("path", SMALL, ids=[p.stem for p in SMALL])
def test_truncated_gradient_matches_the_truncated_objective(path, bptt):
    mod = load_example(path, size=6, hidden=2)
    params = random_params(mod)
    inputs, targets = random_batch(mod, N=1, T=4)
    check_gradients(mod, params, inputs, targets, n_dirs=1, bptt=bptt)

"""Finite-difference check of a compiled model's gradients, in float64.

For each parameter, a few random directions d: the central difference
(L(p + eps d) - L(p - eps d)) / 2 eps against <grad, d>. Directions keep it
cheap (two loss evaluations each, whatever the parameter's size) and test
every element at once.
"""
from __future__ import annotations

import numpy as np


def _loss(mod, params, inputs, targets, **kw):
    return mod.loss_and_grad(params, inputs, targets, **kw)[0]


def directional_check(mod, params: dict, inputs: dict, targets: dict, *, n_dirs: int = 2,
                      eps: float = 1e-2, seed: int = 0, names=None, **kw) -> dict:
    """Worst relative error per parameter: |fd - an| / max(|fd|, |an|, tiny).

    The finite difference is Richardson-extrapolated from steps eps and eps/2
    ((4 D(eps/2) - D(eps)) / 3, error O(eps^4)), so a large step keeps
    round-off small without paying in truncation error: float64 gradients
    agree to about 1e-9 where a plain central difference stops near 1e-6.

    `params` must be float64; `kw` goes to loss_and_grad (state=, bptt=).
    With bptt=k the loss whose gradient is checked is the truncated one: the
    reference treats the states at each window boundary as constants
    (see `truncated_objective`), so the truncated gradient is exact for it.
    """
    rng = np.random.default_rng(seed)
    bptt = kw.pop("bptt", None)
    _, grads, _ = mod.loss_and_grad(params, inputs, targets, bptt=bptt, **kw)
    if bptt:
        loss = truncated_objective(mod, params, inputs, targets, bptt, **kw)
    else:
        def loss(p):
            return _loss(mod, p, inputs, targets, **kw)
    out = {}
    for name in sorted(names or params):
        worst = 0.0
        for _ in range(n_dirs):
            d = rng.standard_normal(params[name].shape)
            d /= np.linalg.norm(d) or 1.0

            def central(h):
                plus = dict(params)
                minus = dict(params)
                plus[name] = params[name] + h * d
                minus[name] = params[name] - h * d
                return (loss(plus) - loss(minus)) / (2 * h)

            fd = (4 * central(eps / 2) - central(eps)) / 3
            an = float(np.sum(np.asarray(grads[name], dtype=np.float64) * d))
            scale = max(abs(fd), abs(an), 1e-10)
            worst = max(worst, abs(fd - an) / scale)
        out[name] = worst
    return out


def truncated_objective(mod, params0, inputs, targets, k, state=None):
    """The loss as truncated BPTT with windows of k steps sees it, as a function of params.

    The rule the generated backward loops follow (compiler/codegen.py,
    carry_step): on every time axis, each loop counts its own steps from 0,
    and the cotangent of a state read at step t is cut when t % k == 0, t > 0;
    so windows are [0, k), [k, 2k), ... of each loop's own axis. A loop's
    initial states (zeros, learned, or an earlier loop's final states passed
    by `init=`) are read at t = 0 and keep their gradient; losses (on all steps
    or on `steps = last`) are the full model's. The reference is the model's
    own step-by-step forward pass (compiler/interp.py) in which every state
    read at a window start takes the value the unperturbed parameters
    `params0` give it: constants, so no gradient crosses a boundary, for any
    arrangement of loops, forecasters, `init=` chains and time axes.
    """
    from convc.compiler import interp

    low = mod.compiled.lowered
    held = {}

    def record(nid, t, v):
        if t > 0 and t % k == 0:
            held[(nid, t)] = v
        return v

    def hold(nid, t, v):
        return held[(nid, t)] if t > 0 and t % k == 0 else v

    interp.run_forward(low, params0, inputs, targets, state=state, hold=record)

    def loss(params):
        return interp.run_forward(low, params, inputs, targets, state=state, hold=hold)[2]

    return loss

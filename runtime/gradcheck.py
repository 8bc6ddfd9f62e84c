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
    (see `truncated_loss`), so the truncated gradient is exact for it.
    """
    rng = np.random.default_rng(seed)
    bptt = kw.pop("bptt", None)
    _, grads, _ = mod.loss_and_grad(params, inputs, targets, bptt=bptt, **kw)
    if bptt:
        def loss(p):
            return truncated_loss(mod, p, params, inputs, targets, bptt, **kw)
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


def truncated_loss(mod, params, params0, inputs, targets, k, state=None):
    """The loss as truncated BPTT with windows of k steps sees it.

    The sequence is cut into windows [0, k), [k, 2k), ...; each window starts
    from the states the unperturbed parameters `params0` reach at its start
    (constants, so no gradient crosses a boundary), and the loss is the
    step-weighted mean of the windows' losses. Valid for next-frame models
    (one time axis) whose loss covers every step.
    """
    x_name = next(iter(inputs))
    T = inputs[x_name].shape[1]
    total = 0.0
    start_state = state
    for a in range(0, T, k):
        b = min(a + k, T)
        win_in = {n: v[:, a:b] for n, v in inputs.items()}
        win_tg = {n: v[:, a:b] for n, v in targets.items()}
        loss, _, _ = mod.loss_and_grad(params, win_in, win_tg, state=start_state)
        total += loss * (b - a) / T
        # the next window starts where the *unperturbed* run is after this one
        _, final = mod.forward(params0, win_in, state=start_state)
        start_state = final
    return total

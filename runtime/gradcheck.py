"""Finite-difference check of a compiled model's gradients, in float64.

For each parameter p and a random unit direction d, the directional
derivative of the loss, L'(p; d), is estimated from the loss alone and
compared with <grad, d> from the generated BPTT. Directions keep it cheap
(a few loss evaluations each, whatever the parameter's size) and test every
element at once: a wrong element shows along almost every direction.

How the estimate and its error bound are found, from the function itself:

1. **Noise.** The loss is computed in float64, so each evaluation carries a
   rounding error. Its size, sigma, is measured at the point with Moré and
   Wild's ECnoise (SIAM J. Sci. Comput. 33, 2011): nine evaluations a tiny
   step apart along a random direction; the k-th differences of smooth
   values vanish, those of rounding errors do not, and where several orders
   agree they give sigma.
2. **Step sweep.** Central differences D(h) at h = h0, h0/2, h0/4, ...;
   each pair is Richardson-extrapolated, R(h) = (4 D(h/2) - D(h)) / 3 (error
   O(h^4)). The error bound of R at a step is its distance to the previous
   extrapolation (truncation: it shrinks as h^4 until rounding takes over)
   plus the rounding that the formula's coefficients amplify (1.5 sigma / h).
   The sweep stops once rounding alone exceeds four times the best bound,
   or three smaller steps did no better than a bound that shows the loss
   smooth there, and keeps the step with the smallest bound.
3. **Verdict.** A parameter passes when |R - <grad, d>| is within three
   times that bound (or within `tolerance` times the derivative's size, when
   a tolerance is given). The bound divided by the derivative's size is the
   check's *resolution*: the smallest relative error it can see there
   (1e-9 to 1e-12 on smooth models), reported with every parameter.
4. **Kinks.** relu, hard_sigmoid and the like are not smooth: a step that
   crosses a kink leaves a large bound at that step, and the sweep goes on
   to smaller ones, where the loss is smooth again. Where no step resolves
   the derivative to RESOLVABLE, the direction is dropped and a fresh one
   tried; a parameter for which no direction works is reported as not
   checked (naming it), never as failed.

With `bptt=k` the loss whose gradient is checked is the truncated one: the
states read at each window start are held at their unperturbed values
(see `truncated_objective`), so the truncated gradient is exact for it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

# Worst resolution (bound / derivative) at which a direction counts as checked:
# beyond it the loss is not smooth at any step tried (a kink within reach).
RESOLVABLE = 1e-4
# |R - analytic| <= SAFETY * bound passes. The bound is an estimate, not a rigorous
# limit; three keeps a correct gradient from failing on an unlucky rounding.
SAFETY = 3.0
H0 = 0.1            # the first step along a unit direction
MIN_STEP = 1e-9     # no step below this (rounding alone would swamp it)
RETRIES = 4         # fresh directions tried for a parameter whose direction is rough
# A bound below this many sigmas is rounding (the bound 1.5 sigma / h at h ~ 1e-5), never
# a kink, however small the derivative it bounds.
ROUNDING_FLOOR = 1e5
NOISE_POINTS = 9    # ECnoise's evaluations
EPS64 = np.finfo(np.float64).eps


# ---------------------------------------------------------------------------
# The problem: parameters, inputs and targets
# ---------------------------------------------------------------------------


def random_problem(mod, *, batch: int = 2, frames: int = 4, frames_out: int | None = None,
                   seed: int = 0, spread: float = 0.3):
    """Float64 parameters, inputs and targets for checking `mod`'s gradients.

    The parameters are the seeded initial values plus N(0, spread) noise, so
    none sits at a special point (zero biases, zero peepholes) where the check
    would see little. Inputs and targets are uniform in [0, 1]: `frames` steps
    on the inputs' time axis, `frames_out` (default `frames`) on any other.
    """
    model = mod.MODEL
    rng = np.random.default_rng(seed)
    params = mod.init_params(seed=seed, dtype="float64")
    params = {k: v + rng.normal(0.0, spread, v.shape) for k, v in sorted(params.items())}
    axes = model.get("axes", {})
    in_axes = {axes.get(n) for n in model["inputs"]}

    def length(name):
        return frames if axes.get(name) in in_axes else (frames_out or frames)

    def seqs(table):
        return {n: rng.uniform(0.0, 1.0, (batch, length(n)) + tuple(s))
                for n, s in sorted(table.items())}

    return params, seqs(model["inputs"]), seqs(model["targets"])


# ---------------------------------------------------------------------------
# Noise and derivatives of a function of one variable
# ---------------------------------------------------------------------------


def noise_level(f, delta: float = 1e-6, points: int = NOISE_POINTS) -> float | None:
    """ECnoise: the standard deviation of f's rounding noise near 0, or None.

    f is evaluated at `points` equally spaced arguments `delta` apart; the
    k-th differences scaled by gamma_k = (k!)^2 / (2k)! estimate sigma once
    the smooth part has vanished from them. A level is accepted where three
    consecutive orders agree within a factor 4 and the differences change
    sign (noise, not curvature). None when no level is consistent (a kink
    within the stencil, or delta too large); 0.0 when f is constant there.
    """
    values = np.array([f(delta * (i - (points - 1) / 2)) for i in range(points)])
    if not np.all(np.isfinite(values)):
        return None
    if np.ptp(values) == 0.0:
        return 0.0
    levels, changes = [], []
    diff = values
    for k in range(1, points):
        diff = np.diff(diff)
        gamma = math.factorial(k) ** 2 / math.factorial(2 * k)
        levels.append(math.sqrt(gamma * float(np.mean(diff ** 2))))
        changes.append(bool(np.any(diff > 0)) and bool(np.any(diff < 0)))
    for k in range(len(levels) - 2):
        window = levels[k:k + 3]
        if min(window) > 0 and max(window) <= 4 * min(window) and changes[k]:
            return float(window[0])
    return None


@dataclass
class Derivative:
    """One directional derivative estimated by the step sweep."""

    value: float        # the extrapolated finite difference at the chosen step
    bound: float        # its estimated error (truncation + rounding)
    step: float         # the chosen step h
    evaluations: int


def derivative(f, sigma: float, *, h0: float = H0, fixed: bool = False) -> Derivative:
    """d/dh f(h) at h = 0 with an error bound, from central differences of f.

    `sigma` is f's rounding noise. With `fixed`, only h0, h0/2 and h0/4 are
    used (the --eps option); otherwise the sweep runs as the module says.
    """
    central: list[float] = []
    extrapolated: list[float] = []
    best: Derivative | None = None
    h, evaluations, since = h0, 0, 0
    while h >= MIN_STEP:
        central.append((f(h) - f(-h)) / (2 * h))
        evaluations += 2
        if len(central) >= 2:
            extrapolated.append((4 * central[-1] - central[-2]) / 3)
            rounding = 1.5 * sigma / h + 4 * EPS64 * abs(extrapolated[-1])
            if len(extrapolated) >= 2:
                bound = abs(extrapolated[-1] - extrapolated[-2]) + rounding
                if not math.isfinite(bound):
                    bound = math.inf
                if best is None or bound < best.bound:
                    best, since = Derivative(extrapolated[-1], bound, h, evaluations), 0
                else:
                    since += 1
                smooth = best.bound <= max(RESOLVABLE * abs(best.value), ROUNDING_FLOOR * sigma)
                # Done: rounding alone now exceeds the best bound, or three smaller steps
                # did no better than a bound that says the loss is smooth there.
                if fixed or rounding > 4 * best.bound or (since >= 3 and smooth):
                    break
        h /= 2
    if best is None:  # a step too small to sweep from
        value = extrapolated[-1] if extrapolated else central[-1]
        return Derivative(value, math.inf, h0, evaluations)
    best.evaluations = evaluations
    return best


# ---------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------


@dataclass
class ParamResult:
    name: str
    shape: tuple
    status: str             # "ok", "FAIL" or "unchecked"
    analytic: float         # <grad, d> along the direction reported
    numeric: float          # the finite-difference estimate
    error: float            # |numeric - analytic| / scale
    resolution: float       # bound / scale: the smallest relative error visible here
    step: float
    directions: int         # directions tried
    reason: str = ""


@dataclass
class Report:
    model: str
    bptt: int | None
    batch: int
    frames: int
    seed: int
    noise: float            # sigma of the loss's rounding noise
    loss: float
    tolerance: float | None
    params: list[ParamResult] = field(default_factory=list)
    evaluations: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> list[ParamResult]:
        return [p for p in self.params if p.status == "FAIL"]

    @property
    def unchecked(self) -> list[ParamResult]:
        return [p for p in self.params if p.status == "unchecked"]

    @property
    def verdict(self) -> str:
        """PASS, FAIL, or UNCHECKED (nothing failed, something could not be checked)."""
        return "FAIL" if self.failed else ("UNCHECKED" if self.unchecked else "PASS")

    @property
    def exit_status(self) -> int:
        """What `convc gradcheck` exits with: 0 PASS, 1 FAIL, 3 UNCHECKED."""
        return {"PASS": 0, "FAIL": 1, "UNCHECKED": 3}[self.verdict]

    def to_json(self) -> dict:
        data = asdict(self)
        data["verdict"] = self.verdict
        for p in data["params"]:
            p["shape"] = list(p["shape"])
            for k in ("error", "resolution", "analytic", "numeric", "step"):
                if not math.isfinite(p[k]):
                    p[k] = None  # JSON has no infinity
        return data


def format_report(report: Report, *, dirs: int, eps: float | None = None) -> str:
    """The report as `convc gradcheck` prints it: what was checked, one row per
    parameter (error, resolution, step, status) and a PASS/FAIL/UNCHECKED line.
    `dirs` and `eps` are the arguments the check ran with."""
    limit = (f"a relative error within {SAFETY:g}x the finite differences' resolution"
             + (f" or {report.tolerance:g}" if report.tolerance is not None else ""))
    steps = "steps from --eps " + format(eps, "g") if eps else "step sweep"
    lines = [f"gradient check of {report.model}: float64, batch {report.batch}, "
             f"{report.frames} steps{f', bptt {report.bptt}' if report.bptt else ''}, "
             f"{dirs} random directions per parameter, poisoned buffers",
             f"loss {report.loss:.6g}, its rounding noise {report.noise:.1e}; {steps}; "
             f"a parameter passes with {limit}"]
    width = max([len(p.name) for p in report.params] + [len("parameter")])
    lines.append(f"  {'parameter':<{width}}  {'error':>8}  {'resolution':>10}  {'step':>7}")
    for p in report.params:
        if p.status == "unchecked":
            lines.append(f"  {p.name:<{width}}  {'-':>8}  {'-':>10}  {'-':>7}  "
                         f"not checked: {p.reason}")
        else:
            lines.append(f"  {p.name:<{width}}  {p.error:8.1e}  {p.resolution:10.1e}  "
                         f"{p.step:7.1e}  {p.status}")
    checked = [p for p in report.params if p.status != "unchecked"]
    worst = max((p.error for p in checked), default=0.0)
    tail = (f"worst error {worst:.1e}; {report.evaluations} loss evaluations, "
            f"{report.seconds:.1f} s")
    n = len(report.params)
    if report.failed:
        lines.append(f"FAIL ({len(report.failed)} of {n} parameters: "
                     f"{', '.join(p.name for p in report.failed)}): {tail}")
    elif report.unchecked:
        lines.append(f"UNCHECKED: {len(checked)} of {n} parameters agree; "
                     f"{', '.join(p.name for p in report.unchecked)} could not be checked "
                     f"at this point (try another --seed): {tail}")
    else:
        lines.append(f"PASS: all {n} parameters agree: {tail}")
    return "\n".join(lines) + "\n"


def _verdict(d: Derivative, analytic: float, sigma: float, tolerance: float | None):
    """(status, relative error, resolution) of one direction.

    Rough (not checked) when the bound is large both against the derivative and
    against rounding at small steps: the loss is not smooth at any step tried.
    A bound at the rounding level is never rough, so a derivative that is
    (nearly) zero along the direction is checked, absolutely, to that level.
    """
    if not math.isfinite(analytic):
        return "FAIL", math.inf, math.inf
    size = max(abs(analytic), abs(d.value)) if math.isfinite(d.value) else abs(analytic)
    if not math.isfinite(d.bound) or (d.bound > RESOLVABLE * size
                                      and d.bound > ROUNDING_FLOOR * sigma):
        return "rough", math.nan, math.inf
    scale = max(size, d.bound, 1e-300)
    error, resolution = abs(d.value - analytic) / scale, d.bound / scale
    # A tolerance loosens the limit; below what the differences resolve it cannot go.
    limit = max(tolerance or 0.0, SAFETY * resolution)
    return ("ok" if error <= limit else "FAIL"), error, resolution


def gradcheck(mod, params: dict | None = None, inputs: dict | None = None,
              targets: dict | None = None, *, batch: int = 2, frames: int = 4,
              frames_out: int | None = None, seed: int = 0, dirs: int = 2,
              bptt: int | None = None, state: dict | None = None, eps: float | None = None,
              tolerance: float | None = None, names=None,
              poison: bool | None = True) -> Report:
    """Check every parameter's gradient of the compiled model `mod` (see the module doc).

    `params`, `inputs` and `targets` default to `random_problem(mod, ...)`;
    given ones must be float64. `dirs` random directions per parameter; `eps`
    fixes the first step instead of sweeping (h = eps, eps/2, eps/4);
    `tolerance` replaces the noise-derived limit with a relative error;
    `names` checks only those parameters. Runs with poisoned buffers, so a
    read of memory nobody wrote shows up as NaN (`poison=False`: without;
    None: as poison mode is set now).
    """
    import time

    from convc.runtime import kernels

    started = time.perf_counter()
    if params is None or inputs is None or targets is None:
        made = random_problem(mod, batch=batch, frames=frames, frames_out=frames_out, seed=seed)
        params, inputs, targets = (given if given is not None else default
                                   for given, default in zip((params, inputs, targets), made))
    kw = {} if state is None else {"state": state}
    was = kernels.poison_enabled()
    kernels.set_poison(was if poison is None else poison)
    try:
        loss0, grads, _ = mod.loss_and_grad(params, inputs, targets, bptt=bptt, **kw)
        if bptt:
            objective = truncated_objective(mod, params, inputs, targets, bptt, **kw)
        else:
            def objective(p):  # the forward pass alone: the same loss, computed the same way
                return mod.loss(p, inputs, targets, **kw)
        count = [0]

        def loss(p):
            count[0] += 1
            return float(objective(p))

        rng = np.random.default_rng(seed + 7919)
        sigma = _model_noise(loss, params, rng)
        report = Report(mod.MODEL["name"], bptt, next(iter(inputs.values())).shape[0],
                        next(iter(inputs.values())).shape[1], seed, sigma, float(loss0),
                        tolerance)
        for name in sorted(names or params):
            report.params.append(_check_param(loss, params, grads, name, rng, dirs, sigma,
                                              eps, tolerance))
    finally:
        kernels.set_poison(was)
    report.evaluations = count[0]
    report.seconds = time.perf_counter() - started
    return report


def _along(params: dict, direction: dict, h: float) -> dict:
    moved = dict(params)
    for k, d in direction.items():
        moved[k] = params[k] + h * d
    return moved


def _unit(rng, shape) -> np.ndarray:
    d = rng.standard_normal(shape)
    return d / (np.linalg.norm(d) or 1.0)


def _model_noise(loss, params: dict, rng) -> float:
    """sigma of the loss's rounding at `params`, measured along random directions in
    the space of all parameters; where ECnoise finds no consistent level, a
    generous guess (a thousand roundings of the loss)."""
    for delta in (1e-6, 1e-7, 1e-5):
        direction = {k: _unit(rng, v.shape) / math.sqrt(len(params)) for k, v in params.items()}
        sigma = noise_level(lambda h: loss(_along(params, direction, h)), delta)
        if sigma is not None:
            # The floor: a loss that is exactly linear along the direction still rounds.
            return max(sigma, EPS64 * abs(loss(params)))
    return 1e3 * EPS64 * max(abs(loss(params)), 1.0)


def _check_param(loss, params, grads, name, rng, dirs, sigma, eps, tolerance) -> ParamResult:
    grad = np.asarray(grads[name], dtype=np.float64)
    shape = tuple(np.shape(params[name]))
    worst: ParamResult | None = None
    tried = checked = 0
    rough = 0
    while checked < dirs and tried < dirs + RETRIES:
        tried += 1
        d = _unit(rng, shape)
        analytic = float(np.sum(grad * d))
        est = derivative(lambda h: loss(_along(params, {name: d}, h)), sigma,
                         h0=eps if eps is not None else H0, fixed=eps is not None)
        status, error, resolution = _verdict(est, analytic, sigma, tolerance)
        if status == "rough":
            rough += 1
            continue
        checked += 1
        result = ParamResult(name, shape, status, analytic, est.value, error, resolution,
                             est.step, tried)
        if worst is None or (status == "FAIL", error) > (worst.status == "FAIL", worst.error):
            worst = result
    if worst is None:
        return ParamResult(name, shape, "unchecked", math.nan, math.nan, math.nan, math.inf,
                           math.nan, tried,
                           f"the loss is not smooth along {rough} random directions at this "
                           f"point (a kink, e.g. of relu or hard_sigmoid, "
                           + (f"within the steps {eps:g}, {eps / 2:g} and {eps / 4:g}); "
                              f"without --eps, smaller steps are tried" if eps is not None else
                              f"at every step down to {MIN_STEP:g}); try another --seed"))
    worst.directions = tried
    return worst


# ---------------------------------------------------------------------------
# The truncated objective
# ---------------------------------------------------------------------------


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

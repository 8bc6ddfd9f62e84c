"""What a generated `vjp` calls: its batch shards and its cotangent arguments.

A module compiled with vjp=True (`convc.load(path, vjp=True)`) has

    vjp(params, inputs, cotangents, state=None, state_cotangents=None,
        bptt=None, backend=None) -> (param_cts, input_cts, state_cts)

the vector-Jacobian product of the model's outputs (and final states) at
`params, inputs, state`: given the cotangent of every output, an array like
the output, (N, T, C, H, W), and optionally of final states, it returns the
cotangents of every parameter, every input (N, T, C, H, W) and every initial
state (N, C, H, W), by the same generated BPTT as `loss_and_grad`.

Shards: as `loss_and_grad`, the batch may be cut into shards that run side
by side on the CPU (`kernels.shard_count`). Cotangents are given per
sample, so the parameters' cotangents are the shards' summed, in shard
order (bitwise the same every run), and the inputs' and states' are the
shards' stacked.
"""
from __future__ import annotations

from convc.runtime import kernels as _k


def state_cotangent(state_cotangents, name: str, shape: tuple, n: int, dtype, xp):
    """The cotangent of state `name`'s final value: as given, else zeros (N, *shape)."""
    if state_cotangents is not None and name in state_cotangents:
        return xp.asarray(state_cotangents[name], dtype=dtype)
    return xp.zeros((n,) + tuple(shape), dtype=dtype)


def in_shards(fn, params, inputs, cotangents, state=None, state_cotangents=None, bptt=None,
              backend=None, work: float = float("inf")):
    """fn(params, inputs, cotangents, ...) over batch shards in parallel threads, combined.

    fn returns (param_cts, input_cts, state_cts) for the batch it is given.
    One shard: fn itself, unchanged (on one BLAS thread when the steps are too
    small to share).
    """
    n = len(next(iter(inputs.values()))) if inputs else \
        len(next(iter(cotangents.values())))
    k = _k.shard_count(backend, n, work)
    kw = dict(state=state, state_cotangents=state_cotangents, bptt=bptt)
    if k == 0:
        with _k._blas().limit(limits=1):
            return fn(params, inputs, cotangents, backend=backend, **kw)
    if k == 1:
        return fn(params, inputs, cotangents, backend=backend, **kw)
    if backend is None:
        from convc.runtime.model import default_backend

        backend = default_backend()
    bounds = _k.shard_bounds(n, k)
    pool = _k._SHARDS
    spawned = pool["backends"].setdefault(type(backend), [])
    while len(spawned) < k - 1:
        spawned.append(backend.spawn())  # each thread its own work arrays
    workers = _pool(k)
    split = _k._split
    ins, cts = split(inputs, bounds), split(cotangents, bounds)
    sts, scs = split(state, bounds), split(state_cotangents, bounds)
    crew = _k.Crew(k)
    with _k._blas().limit(limits=1):
        futures = [workers.submit(_k._shard, crew, fn, spawned[i - 1], params, ins[i],
                                  cts[i], state=sts[i], state_cotangents=scs[i], bptt=bptt)
                   for i in range(1, k)]
        parts = [_k._shard(crew, fn, backend, params, ins[0], cts[0], state=sts[0],
                           state_cotangents=scs[0], bptt=bptt)]
        parts += [f.result() for f in futures]
    return _combined(parts)


def _pool(k: int):
    """The shared thread pool of k - 1 workers (kernels' `_SHARDS`)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = _k._SHARDS
    if pool["workers"] != k - 1:
        if pool["pool"] is not None:
            pool["pool"].shutdown()
        pool["pool"] = ThreadPoolExecutor(max_workers=k - 1, thread_name_prefix="convc")
        pool["workers"] = k - 1
    return pool["pool"]


def _combined(parts):
    """The shards' (param_cts, input_cts, state_cts): the parameters' summed in shard
    order, the inputs' and states' stacked."""
    grads, done = {}, {}
    for name in parts[0][0]:  # in place, in shard order: the shards' arrays are theirs
        total = parts[0][0][name]
        if id(total) in done:  # one array for two names: summed already
            grads[name] = grads[done[id(total)]]
            continue
        done[id(total)] = name
        for p in parts[1:]:
            total += p[0][name]
        grads[name] = total
    xp = _k.array_module(next(iter(parts[0][0].values())))

    def stacked(j):
        return {name: xp.concatenate([p[j][name] for p in parts], axis=0)
                for name in parts[0][j]}

    return grads, stacked(1), stacked(2)


# ---------------------------------------------------------------- vjp_start: two phases

_IDLE: dict = {}  # id(backend) -> [clones of it, each with a workspace of its own, idle]


def _lease(backend):
    """A backend whose work memory no other call in flight uses: a clone from the
    backend's idle clones (or a new one, `spawn()`), so a forward pass whose values
    wait for their pullback keeps them, and a step after step reuses the memory."""
    if backend is None:
        from convc.runtime.model import default_backend

        backend = default_backend()
    if getattr(backend, "workspace", None) is None or not backend.capabilities.shards:
        return backend, None  # no memory kept between calls: nothing to share
    idle = _IDLE.setdefault(id(backend), [])
    clone = idle.pop() if idle else backend.spawn()
    return clone, (idle, clone)


class Pullback:
    """The second half of `vjp_start`: call it once with the outputs' cotangents.

    pullback(cotangents, state_cotangents=None) -> (param_cts, input_cts, state_cts)

    Until it is called (or closed, or collected), the forward pass's values are
    kept in memory of this call's own. A batch cut into shards (as `vjp` cuts
    it) has one generator per shard: the cotangents are cut the same way, the
    shards' backward passes run side by side, and their products are combined
    as `vjp`'s (`in_shards`).
    """

    def __init__(self, steps, model: dict, params, inputs, lease, bounds=None,
                 backends=None, one_thread: bool = False):
        # one generator and its lease, or (shards) lists of them and their backends
        self._steps, self._model = steps, model
        self._params, self._inputs = params, inputs
        self._lease, self._bounds, self._backends = lease, bounds, backends
        self._one_thread = one_thread

    def __call__(self, cotangents, state_cotangents=None):
        from convc.runtime.calls import check_call

        if self._steps is None:
            raise RuntimeError(f"{self._model['name']}: this pullback has run (or was "
                               "closed) already; call vjp_start again")
        check_call(self._model, "pullback", self._params, self._inputs, cotangents=cotangents,
                   state_cotangents=state_cotangents)
        try:
            if self._bounds is not None:
                return self._sharded(cotangents, state_cotangents)
            if self._one_thread:  # as vjp: steps too small to share the BLAS threads
                with _k._blas().limit(limits=1):
                    return self._steps.send((cotangents, state_cotangents))
            return self._steps.send((cotangents, state_cotangents))
        finally:
            self.close()

    def _sharded(self, cotangents, state_cotangents):
        gens, backends = self._steps, self._backends
        cts = _k._split(cotangents, self._bounds)
        scs = _k._split(state_cotangents, self._bounds)
        crew = _k.Crew(len(gens))
        workers = _pool(len(gens))
        with _k._blas().limit(limits=1):
            futures = [workers.submit(_k._shard, crew, _send, backends[i], gens[i],
                                      (cts[i], scs[i])) for i in range(1, len(gens))]
            parts = [_k._shard(crew, _send, backends[0], gens[0], (cts[0], scs[0]))]
            parts += [f.result() for f in futures]
        return _combined(parts)

    def close(self) -> None:
        """Let the forward pass's values go without computing the product."""
        steps, self._steps = self._steps, None
        for gen in (steps if isinstance(steps, list) else [steps]):
            if gen is not None:
                gen.close()
        lease, self._lease = self._lease, None
        for held in (lease if isinstance(lease, list) else [lease]):
            _give_back(held)

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit the generator's module may be gone already
            pass


def _send(gen, value, backend=None):
    """A shard's backward pass: its generator sent its cotangents (for `kernels._shard`)."""
    return gen.send(value)


def _give_back(held) -> None:
    """Return a leased clone, `_lease`'s (idle, clone), to its idle list (None: none)."""
    if held is not None:
        idle, clone = held
        idle.append(clone)


def start(steps_fn, model: dict, params, inputs, state=None, steps=None, bptt=None,
          backend=None, work: float = float("inf")):
    """Run a generated `_vjp_steps` to the end of its forward pass: (outputs, final,
    Pullback).

    work: as `vjp`'s (convolution FLOPs of one step of one sample): the batch is
    cut into the shards `vjp` would cut it into (`kernels.shard_count`), or run on
    one BLAS thread where `vjp` would, so that the two phases cost what `vjp` does.
    """
    n = len(next(iter(inputs.values()))) if inputs else 1
    k = _k.shard_count(backend, n, work)
    if k >= 2 and getattr(backend or _default(), "workspace", None) is not None:
        return _start_shards(steps_fn, model, params, inputs, state, steps, bptt, backend, k)
    b, lease = _lease(backend)
    gen = steps_fn(params, inputs, state=state, steps=steps, bptt=bptt, backend=b)
    try:
        if k == 0:
            with _k._blas().limit(limits=1):
                outputs, final = next(gen)
        else:
            outputs, final = next(gen)
    except BaseException:
        gen.close()
        _give_back(lease)
        raise
    return outputs, final, Pullback(gen, model, params, inputs, lease, one_thread=k == 0)


def _start_shards(steps_fn, model, params, inputs, state, steps, bptt, backend, k):
    """`start` over k batch shards side by side, each with a leased backend."""
    n = len(next(iter(inputs.values())))
    bounds = _k.shard_bounds(n, k)
    backends, leases = zip(*[_lease(backend) for _ in range(k)])
    backends, leases = list(backends), list(leases)
    ins, sts = _k._split(inputs, bounds), _k._split(state, bounds)
    gens = [steps_fn(params, ins[i], state=sts[i], steps=steps, bptt=bptt,
                     backend=backends[i]) for i in range(k)]
    workers = _pool(k)
    try:
        with _k._blas().limit(limits=1):
            futures = [workers.submit(next, gens[i]) for i in range(1, k)]
            try:
                parts = [next(gens[0])]
            finally:
                parts_rest = [f.result() for f in futures]
        parts += parts_rest
    except BaseException:
        for gen in gens:
            gen.close()
        for held in leases:
            _give_back(held)
        raise
    xp = _k.array_module(next(iter(parts[0][0].values())))

    def stacked(j):
        return {name: xp.concatenate([p[j][name] for p in parts], axis=0)
                for name in parts[0][j]}

    return stacked(0), stacked(1), Pullback(gens, model, params, inputs, leases,
                                            bounds=bounds, backends=backends)


def _default():
    from convc.runtime.model import default_backend

    return default_backend()


def choose(wrt: str, **steps_fns):
    """The generated `_vjp_steps` for vjp_start's `wrt=`: 'all' (parameters, inputs and
    initial states) or 'params' (the parameters' cotangents only)."""
    fn = steps_fns.get(wrt) if isinstance(wrt, str) else None
    if fn is None:
        raise ValueError(f"vjp_start: wrt={wrt!r}; choose 'all' or 'params'")
    return fn


def module_with_vjp(path_or_module, model: str | None = None, **options):
    """The compiled module a framework layer wraps: `path_or_module` itself (a module
    made with vjp=True), or `convc.runtime.loader.load(path, model=model, vjp=True, **options)`
    (what `convc.load` compiles, without its train/predict helpers).

    Compile options (`text=`, `recompute=`, `debug_nans=`) go with a path only: a
    module given is compiled already, and one without vjp_start is refused.
    """
    if hasattr(path_or_module, "MODEL") and hasattr(path_or_module, "forward"):
        mod = path_or_module
        given = sorted(k for k, v in options.items() if v is not None and v is not False)
        if given:
            raise ValueError(f"{', '.join(k + '=' for k in given)} are compile options: give "
                             "them to convc.load(..., vjp=True), or give the layer a path")
        if model is not None and mod.MODEL["name"] != model:
            raise ValueError(f"the module given is model {mod.MODEL['name']!r}, not {model!r}")
    else:
        from convc.runtime import loader

        mod = loader.load(path_or_module, model=model, vjp=True, **options)
    if not callable(getattr(mod, "vjp_start", None)):
        raise ValueError(f"model {mod.MODEL['name']}: the module was compiled without its "
                         "vector-Jacobian product; load it with convc.load(path, vjp=True) "
                         "(or `convc compile --vjp`)")
    return mod

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
    from concurrent.futures import ThreadPoolExecutor

    if backend is None:
        from convc.runtime.model import default_backend

        backend = default_backend()
    bounds = _k.shard_bounds(n, k)
    pool = _k._SHARDS
    spawned = pool["backends"].setdefault(type(backend), [])
    while len(spawned) < k - 1:
        spawned.append(backend.spawn())  # each thread its own work arrays
    if pool["workers"] != k - 1:
        if pool["pool"] is not None:
            pool["pool"].shutdown()
        pool["pool"] = ThreadPoolExecutor(max_workers=k - 1, thread_name_prefix="convc")
        pool["workers"] = k - 1
    split = _k._split
    ins, cts = split(inputs, bounds), split(cotangents, bounds)
    sts, scs = split(state, bounds), split(state_cotangents, bounds)
    crew = _k.Crew(k)
    with _k._blas().limit(limits=1):
        futures = [pool["pool"].submit(_k._shard, crew, fn, spawned[i - 1], params, ins[i],
                                       cts[i], state=sts[i], state_cotangents=scs[i],
                                       bptt=bptt)
                   for i in range(1, k)]
        parts = [_k._shard(crew, fn, backend, params, ins[0], cts[0], state=sts[0],
                           state_cotangents=scs[0], bptt=bptt)]
        parts += [f.result() for f in futures]
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
    kept in memory of this call's own.
    """

    def __init__(self, steps, model: dict, params, inputs, lease):
        self._steps, self._model = steps, model
        self._params, self._inputs = params, inputs
        self._lease = lease

    def __call__(self, cotangents, state_cotangents=None):
        from convc.runtime.calls import check_call

        if self._steps is None:
            raise RuntimeError(f"{self._model['name']}: this pullback has run (or was "
                               "closed) already; call vjp_start again")
        check_call(self._model, "pullback", self._params, self._inputs, cotangents=cotangents,
                   state_cotangents=state_cotangents)
        try:
            return self._steps.send((cotangents, state_cotangents))
        finally:
            self.close()

    def close(self) -> None:
        """Let the forward pass's values go without computing the product."""
        steps, self._steps = self._steps, None
        if steps is not None:
            steps.close()
        lease, self._lease = self._lease, None
        if lease is not None:
            idle, clone = lease
            idle.append(clone)

    def __del__(self):
        self.close()


def start(steps_fn, model: dict, params, inputs, state=None, steps=None, bptt=None,
          backend=None):
    """Run a generated `_vjp_steps` to the end of its forward pass: (outputs, final,
    Pullback)."""
    b, lease = _lease(backend)
    gen = steps_fn(params, inputs, state=state, steps=steps, bptt=bptt, backend=b)
    try:
        outputs, final = next(gen)
    except BaseException:
        gen.close()
        if lease is not None:
            lease[0].append(lease[1])
        raise
    return outputs, final, Pullback(gen, model, params, inputs, lease)

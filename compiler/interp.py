"""A reference interpreter: evaluate graph IR with the op table's `ref` functions.

The generated module is the product; this is the yardstick. It shares only
the op table's reference evaluations with the generated code (no schedule, no
buffers, no code templates, no backend), so a test that compares the two
catches mistakes in scheduling, buffering and code generation, and a per-op
finite-difference test run through it checks each VJP rule on its own.

Two entry points:

- `evaluate(graph, env)`: every node of a small graph without time, in
  topological order. Source nodes (input, param, state, carry, ...) take
  their values from `env`; a value with a time context (`seg` set) carries a
  leading batch axis, a static value (parameter, constant) does not. This is
  what the per-op tests use: build `x -> op -> y`, apply a VJP rule through
  `compiler.autodiff.Builder`, evaluate.
- `run_forward(lowered, params, inputs, ...)`: a whole model's forward pass
  (and loss), step by step, straight from the lowered graph: data sequences
  first, then each time loop in order (a loop may start from an earlier
  loop's final states), then the losses over all steps. Slow and obvious.
"""
from __future__ import annotations

import inspect

import numpy as np

from .ir import Graph, Node, data_name, is_data_seg, loop_index
from .ops import OPS

_REF_KEYWORDS: dict[str, frozenset | None] = {}


def ref_attrs(op: str, attrs: dict) -> dict:
    """The node attributes the op's `ref` function takes as keywords.

    Nodes carry bookkeeping attributes too (`keep`, `_named`, `update`, ...);
    the reference evaluation's signature says which ones it takes: the
    parameters after its array operands (all public attributes for `**attrs`).
    """
    if op not in _REF_KEYWORDS:
        params = list(inspect.signature(OPS[op].ref).parameters.values())
        if any(p.kind == p.VAR_KEYWORD for p in params):
            _REF_KEYWORDS[op] = None
        else:
            n_operands = 0 if OPS[op].variadic else OPS[op].arity
            _REF_KEYWORDS[op] = frozenset(
                p.name for p in params[n_operands:]
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    names = _REF_KEYWORDS[op]
    return {k: v for k, v in attrs.items()
            if (k in names if names is not None else not k.startswith("_"))}


def _reference(node: Node):
    """(function, keyword arguments) of a node's reference evaluation."""
    op = OPS[node.op]
    if op.ref is None:
        raise ValueError(f"{node.id}: op {node.op!r} has no reference evaluation")
    return op.ref, ref_attrs(node.op, node.attrs)


def apply_op(node: Node, args: list) -> np.ndarray:
    """One node's value from its operands' values, by the op's reference evaluation."""
    fn, kw = _reference(node)
    return np.asarray(fn(*args, **kw))


def evaluate(graph: Graph, env: dict, wanted=None) -> dict:
    """Values of every node (or of `wanted` and what they need), by id.

    `env` gives the sources' values (and may pin any other node's value).
    A `carry_out` node passes its operand through, as the generated code does.
    """
    order = graph.order()
    if wanted is not None:
        need = set(wanted)
        for w in wanted:
            need |= graph.ancestors(w)
        order = [n for n in order if n in need]
    values = dict(env)
    for nid in order:
        if nid in values:
            continue
        node = graph.node(nid)
        if OPS[node.op].source:  # no reference evaluation: its value comes from outside
            raise KeyError(f"no value given for source node {nid!r} ({node.op})")
        args = [values[i] for i in node.inputs]
        if node.op == "carry_out":
            values[nid] = args[0]
        else:
            values[nid] = apply_op(node, args)
    return values


# ---------------------------------------------------------------- whole models

def run_forward(lowered, params: dict, inputs: dict, targets: dict | None = None,
                steps: dict | int | None = None, state: dict | None = None, hold=None):
    """A model's forward pass from its lowered graph, one step at a time.

    params: {name: array} in the layout the generated module uses;
    inputs / targets: {name: array (N, T, C, H, W)}; steps: the length of
    each axis no given sequence has (forecasting), an int or {axis: int};
    state: {state name: array (N, C, H, W)} to start from; hold: called as
    hold(state node id, t, value) on every state read, it returns the value
    the step uses (truncated-BPTT references hold window starts constant).

    Returns (outputs, finals, loss): outputs {name: (N, T, ...)}, finals
    {state name: (N, ...)} and the summed loss (None without targets).
    Backward nodes (`grad=True`) are ignored.
    """
    g = lowered.graph
    targets = targets or {}
    nodes = {n: g.node(n) for n in g.order()}  # looked up once: a check runs this often
    order = [n for n in nodes if not nodes[n].grad]
    data = dict(inputs, **targets)
    T = _axis_lengths(lowered, data, steps)
    n_batch = np.asarray(next(iter(data.values()))).shape[0]
    # 1. static values: parameters, constants, reshaped biases
    static = _static_values(lowered, nodes, order, params)
    # 2. data sequences, then 3. each loop, step by step
    seq: dict[str, list] = {}  # per-step values, one array (N, ...) per step
    for seg in _time_groups(lowered, nodes, order):
        if is_data_seg(seg) and data_name(seg) not in data:
            continue  # a target that was not given: nothing reads it but the losses
        members = [n for n in order if nodes[n].seg == seg]
        n_steps = _step_count(lowered, nodes, seg, members, T, seq)
        plan = _step_plan(lowered, nodes, members, data)
        _run_steps(g, plan, n_steps, seq, static, state, hold, n_batch)
    # 4. what reads whole sequences: the losses
    whole: dict[str, np.ndarray] = {}
    loss = _whole_sequence_values(lowered, nodes, order, static, seq, whole, bool(targets))
    outputs = {name: np.swapaxes(_stacked(nid, static, seq, whole), 0, 1)
               for name, nid in lowered.outputs.items()}
    finals = {}
    for s in lowered.segments:
        for r in s.states:
            node = nodes[r]
            finals[node.attrs["state"]] = seq[node.attrs["update"]][-1]
    return outputs, finals, loss


def _axis_lengths(lowered, data: dict, steps: dict | int | None) -> dict[str, int]:
    """The length of every time axis: a given sequence's length (N, T, ...), else what
    `steps` says (an int for every axis, or {axis: int}); no length is a ValueError."""
    T: dict[str, int] = {}
    for name, arr in data.items():
        T.setdefault(lowered.axis_of[name], np.asarray(arr).shape[1])
    for seg in lowered.segments:
        if seg.axis not in T:
            if steps is None:
                raise ValueError(f"axis {seg.axis!r} has no sequence: give steps=")
            T[seg.axis] = int(steps[seg.axis] if isinstance(steps, dict) else steps)
    return T


def _static_values(lowered, nodes: dict, order: list[str], params: dict) -> dict:
    """The values computed once, without time: the parameters, and what reads neither a
    time context nor a time-dependent operand (constants, reshaped biases)."""
    param_nodes = {p.node: name for name, p in lowered.params.items()}
    static: dict[str, np.ndarray] = {}
    timed: dict[str, bool] = {}
    for nid in order:
        node = nodes[nid]
        timed[nid] = node.seg is not None or any(timed[i] for i in node.inputs)
    for nid in order:
        node = nodes[nid]
        if timed[nid]:
            continue
        if node.op == "param":
            static[nid] = np.asarray(params[param_nodes[nid]])
        else:
            static[nid] = apply_op(node, [static[i] for i in node.inputs])
    return static


def _time_groups(lowered, nodes: dict, order: list[str]) -> list[str]:
    """The time contexts in the order they run: data sequences, then the loops in segment
    order. A loop left without states (its recurrence was dead code) is no longer a
    segment: it keeps its key's number and runs as long as what it reads."""
    seg_index = {s.id: s.index for s in lowered.segments}

    def group_key(seg: str):
        if is_data_seg(seg):
            return (0, seg)
        return (1, seg_index.get(seg, loop_index(seg)))

    return sorted({nodes[n].seg for n in order if nodes[n].seg is not None}, key=group_key)


def _step_count(lowered, nodes: dict, seg: str, members: list[str], T: dict, seq: dict
                ) -> int:
    """How many steps a time context runs: its axis's length, or for a loop that is no
    longer a segment, the length of a sequence it reads."""
    if is_data_seg(seg):
        return T[lowered.axis_of[data_name(seg)]]
    seg_axis = {s.id: s.axis for s in lowered.segments}
    if seg in seg_axis:
        return T[seg_axis[seg]]
    return next(len(seq[i]) for n in members for i in nodes[n].inputs if i in seq)


def _step_plan(lowered, nodes: dict, members: list[str], data: dict) -> list[tuple]:
    """How each member of a time context gets its value at a step, looked up once, not at
    every step: (id, "input", sequence, None), (id, "state", node, None) or
    (id, "op", (function, keywords), operand ids)."""
    data_nodes = {nid: name for name, nid in list(lowered.inputs.items())
                  + list(lowered.targets.items())}
    plan = []
    for nid in members:
        node = nodes[nid]
        if node.op == "input":
            plan.append((nid, "input", np.asarray(data[data_nodes[nid]]), None))
        elif node.op == "state":
            plan.append((nid, "state", node, None))
        else:
            plan.append((nid, "op", _reference(node), node.inputs))
    return plan


def _run_steps(g: Graph, plan: list[tuple], n_steps: int, seq: dict, static: dict,
               state: dict | None, hold, n_batch: int) -> None:
    """One time context's steps in order, every member at each step (a state read through
    `hold`); appends each member's value at each step to `seq`."""
    for nid, _, _, _ in plan:
        seq[nid] = []
    for t in range(n_steps):
        for nid, kind, what, operands in plan:
            if kind == "input":
                v = what[:, t]
            elif kind == "state":
                v = _state_value(g, what, t, seq, static, state, n_batch)
                if hold is not None:
                    v = hold(nid, t, v)
            else:
                fn, kw = what
                v = np.asarray(fn(*[static[i] if i in static else seq[i][t] for i in operands],
                                  **kw))
            seq[nid].append(v)


def _stacked(nid: str, static: dict, seq: dict, whole: dict):
    """A value over all steps, (T, N, ...) as the generated code has it (stacked once,
    kept in `whole`), or a static value as it is."""
    if nid in static:
        return static[nid]
    if nid not in whole:
        whole[nid] = np.stack(seq[nid])
    return whole[nid]


def _whole_sequence_values(lowered, nodes: dict, order: list[str], static: dict, seq: dict,
                           whole: dict, with_targets: bool) -> float | None:
    """The values without time that read whole sequences (the losses), into `static`;
    returns the summed loss, None without targets or losses."""
    for nid in order:
        node = nodes[nid]
        if node.seg is None and nid not in static and all(
                i in static or i in seq for i in node.inputs):
            static[nid] = apply_op(node, [_stacked(i, static, seq, whole) for i in node.inputs])
    if with_targets and lowered.losses:
        return float(sum(float(static[n]) for n in lowered.losses))
    return None


def _state_value(g: Graph, node: Node, t: int, seq: dict, static: dict, state: dict | None,
                 n_batch: int):
    """A state read at step t: the update's value at t-1, or the initial value at t = 0.

    A given `state` replaces zeros and learned initial values, not a final
    state handed over from an earlier loop (as in the generated code).
    """
    if t > 0:
        return seq[node.attrs["update"]][t - 1]
    kind = node.attrs["init"]
    if kind == "final":
        return seq[node.attrs["init_from"]][-1]
    if state is not None and node.attrs["state"] in state:
        value = np.asarray(state[node.attrs["state"]])
    elif kind == "learned":
        value = static[node.attrs["init_from"]]
    else:
        value = np.zeros(())
    return np.broadcast_to(value, (n_batch,) + tuple(node.shape)).copy()

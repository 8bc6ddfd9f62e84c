"""A model at a glance: parameters, FLOPs and BPTT memory per cell and per output.

    print(convc.runtime.summary.summary(convc.load("examples/seed.cell")))

One row per cell instance and one per output head, like Keras' summary()
or torchinfo, with the numbers that matter for a recurrent model:

- Params: the parameters the row owns (`enc1.W_x` belongs to `enc1`).
- FLOPs/step: convolutions only, per sample and time step, a multiply-add
  counted as two: 2 * Cout * Cin * kh * kw * Ho * Wo.
- Elementwise/step: element operations of everything else (adds, gates,
  activations), per sample and time step, in their own column because they
  cost memory bandwidth rather than arithmetic.
- Activations/step: bytes (float32) per sample and time step of the values
  the compiled code keeps in (T, N, ...) buffers for the backward pass: the
  state buffers, the loop values the schedule stores, and the batched values
  the backward pass reads. Training a sequence of T steps keeps T times this.

The numbers come from the compiled graph (`mod.compiled.lowered`) and the
schedule (`mod.compiled.schedule.stored`), so they describe the code that
actually runs, after constant folding, fusion and dead-code elimination.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from convc.errors import ConvcError

BYTES_PER_VALUE = 4  # float32



@dataclass
class Row:
    """One line of the table; numbers are per sample and per time step."""

    name: str
    kind: str
    output_shape: tuple | None
    params: int = 0
    flops: int = 0
    elementwise: int = 0
    activation_bytes: int = 0
    param_names: list[str] = field(default_factory=list)


def _numel(shape) -> int:
    return int(math.prod(int(d) for d in shape)) if shape else 1


def _fmt_shape(shape) -> str:
    return "x".join(str(d) for d in shape) if shape else "-"


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ---------------------------------------------------------------------------
# Which cell instance a node belongs to
# ---------------------------------------------------------------------------


class _Owners:
    """Maps forward nodes to the cell instance that made them (None: model level).

    Lowering records the instance on every node it makes while elaborating a
    cell (the `_instance` attribute), and the passes hand it on to the nodes
    they make in a node's place; a parameter is named `instance.weight` and a
    state read carries `instance.state`.
    """

    def __init__(self, low):
        g = low.graph
        instances = set(low.cells)

        def prefix(name) -> str | None:
            head = str(name).split(".", 1)[0] if "." in str(name) else None
            return head if head in instances else None

        param_owner = {spec.node: prefix(name) for name, spec in low.params.items()}
        self.owner: dict[str, str | None] = {}
        for n in g.order():
            node = g.node(n)
            if node.grad:
                continue
            inst = node.attrs.get("_instance")
            if inst not in instances:
                inst = param_owner.get(n)
            if inst is None and node.op == "state":
                inst = prefix(node.attrs.get("state", ""))
            if inst is None and node.op == "reshape" and node.inputs:
                inst = param_owner.get(node.inputs[0])
            self.owner[n] = inst


# ---------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------


def _per_step(node) -> bool:
    return node.seg is not None and node.op != "input"


def summary_rows(mod) -> list[Row]:
    """The table's rows: one per input, cell instance and output head, in model order."""
    from convc.compiler.ops import OPS, node_flops

    compiled = getattr(mod, "compiled", None)
    if compiled is None:
        raise ConvcError("summary needs a model compiled in this process (convc.load), "
                         "not one imported from a generated file")
    low = compiled.lowered
    g = low.graph
    stored = set(compiled.schedule.stored)
    owners = _Owners(low).owner
    order = g.order()

    # Heads: model-level forward nodes, each given to the first output that needs it.
    head_of: dict[str, str] = {}
    for out_name, out_node in low.outputs.items():
        for n in sorted(g.ancestors(out_node) | {out_node}, key=lambda m: g.node(m).order):
            if owners.get(n) is None and n not in head_of and not g.node(n).grad:
                head_of[n] = out_name

    def row_key(n: str) -> str | None:
        inst = owners.get(n)
        if inst is not None:
            return inst
        return f"head:{head_of[n]}" if n in head_of else None

    rows: dict[str, Row] = {}
    for name, nid in low.inputs.items():
        rows[f"input:{name}"] = Row(name, "input", g.node(nid).shape)
    for inst, cell in low.cells.items():
        rows[inst] = Row(inst, cell, _instance_output_shape(g, inst, compiled, owners))
    for out_name, out_node in low.outputs.items():
        rows[f"head:{out_name}"] = Row(out_name, "output", g.node(out_node).shape)
    other = Row("(other)", "model", None)

    for pname in sorted(low.params):
        spec = low.params[pname]
        key = row_key(spec.node)
        row = rows.get(key, other) if key else other
        row.params += _numel(g.node(spec.node).shape)
        row.param_names.append(pname)

    # Forward cost per step.
    for n in order:
        node = g.node(n)
        if node.grad or not _per_step(node) or not OPS[node.op].arithmetic:
            continue
        key = row_key(n)
        row = rows.get(key, other) if key else other
        if OPS[node.op].flops is not None:
            row.flops += node_flops(g, node)
        else:
            row.elementwise += _numel(node.shape)

    # Activations kept for the backward pass, per step: one buffer per state
    # (its read and its update share it), plus stored or backward-read values.
    counted: set[str] = set()
    state_of: dict[str, str] = {}
    for n in order:
        node = g.node(n)
        if node.op == "state" and not node.grad:
            state_of[n] = node.attrs["state"]
            update = node.attrs.get("update")
            if update is not None:
                state_of[update] = node.attrs["state"]
    for n in order:
        node = g.node(n)
        if node.grad or not _per_step(node):
            continue
        read_by_backward = any(g.node(c).grad for c in g.consumers(n))
        if n in state_of:
            key_id = "state:" + state_of[n]
        elif n in stored or read_by_backward:
            key_id = n
        else:
            continue
        if key_id in counted:
            continue
        counted.add(key_id)
        key = row_key(n)
        row = rows.get(key, other) if key else other
        row.activation_bytes += _numel(node.shape) * BYTES_PER_VALUE

    result = list(rows.values())
    if other.params or other.flops or other.elementwise or other.activation_bytes:
        result.append(other)
    return result


def _instance_output_shape(g, inst: str, compiled, owners) -> tuple | None:
    """The shape of the cell's declared output (`h` of ConvLSTM), else of its first state."""
    from convc.spec import ast as A

    cell = compiled.program.cells.get(compiled.lowered.cells[inst]) \
        if getattr(compiled, "program", None) is not None else None
    names: list[str] = []
    if cell is not None:
        stack = list(cell.body)
        while stack:
            st = stack.pop(0)
            if isinstance(st, A.OutputDecl):
                names.extend(st.names)
            elif isinstance(st, A.If):
                stack.extend(st.then + st.orelse)
    for out in names:
        for n in g.order():
            if owners.get(n) == inst and g.node(n).attrs.get("_named") == out:
                return g.node(n).shape
    for n in g.order():
        node = g.node(n)
        if node.op == "state" and owners.get(n) == inst:
            return node.shape
    return None


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


def summary(mod) -> str:
    """The summary table of a compiled model, with its docstring and its cells'."""
    rows = summary_rows(mod)
    compiled = mod.compiled
    low = compiled.lowered
    headers = ("Layer", "Type", "Output/step", "Params", "FLOPs/step", "Elementwise/step",
               "Activations/step")
    table = []
    for r in rows:
        table.append((r.name, r.kind, _fmt_shape(r.output_shape), _fmt_int(r.params),
                      _fmt_int(r.flops), _fmt_int(r.elementwise),
                      _fmt_bytes(r.activation_bytes) if r.activation_bytes else "0"))
    total_params = sum(r.params for r in rows)
    total_flops = sum(r.flops for r in rows)
    total_elem = sum(r.elementwise for r in rows)
    total_act = sum(r.activation_bytes for r in rows)
    total = ("Total", "", "", _fmt_int(total_params), _fmt_int(total_flops),
             _fmt_int(total_elem), _fmt_bytes(total_act))
    widths = [max(len(h), *(len(t[i]) for t in table + [total])) for i, h in enumerate(headers)]
    right = {3, 4, 5, 6}

    def line(cells) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    rule = "-" * len(line(headers))
    out = [f"Model: {low.name}  ({low.file})"]
    if low.doc:
        out += [("  " + text).rstrip() for text in low.doc.strip().splitlines()]
    out += ["", line(headers), rule]
    out += [line(t) for t in table]
    out += [rule, line(total), ""]
    size_mib = total_params * BYTES_PER_VALUE / 2 ** 20
    out.append(f"Parameters: {_fmt_int(total_params)} ({size_mib:.2f} MiB as float32)")
    out.append("Per sample and time step. FLOPs count convolutions only (a multiply-add is 2);")
    out.append("a training step over T steps costs about 3 x T x FLOPs/step (forward and")
    out.append("backward) and keeps T x Activations/step (float32) for the backward pass.")
    out += _memory_lines(mod.MODEL)
    docs = [(cell, (doc or "").strip().splitlines()[0] if doc else "")
            for cell, doc in sorted(low.cell_docs.items())]
    if docs:
        out += ["", "Cells:"]
        width = max(len(c) for c, _ in docs)
        out += [f"  {c.ljust(width)}  {d}".rstrip() for c, d in docs]
    return "\n".join(out) + "\n"


def _memory_lines(model: dict) -> list[str]:
    """The estimate train() checks before a run (runtime/memory.py), at the spec's settings."""
    from convc.runtime import memory

    tr = model.get("train", {})
    batch = int(tr.get("batch_size") or 8)
    fi = int(tr.get("frames_in") or 10)
    fo = int(tr.get("frames_out") or 10) if model.get("task") == "forecast" else None
    steps = memory.step_steps(model, fi, fo)
    parts = memory.estimate(model, batch, steps, optimizer=tr.get("optimizer") or "adam",
                            momentum=tr.get("momentum"))
    detail = ", ".join(f"{k} {memory.fmt_bytes(v)}" for k, v in parts.items()
                       if k != "total" and v)
    return [f"Training step memory (batch {batch}, T = {_fmt_steps(steps)}): about "
            f"{memory.fmt_bytes(parts['total'])} ({detail})"]


# ---------------------------------------------------------------------------
# Memory against compute: recompute=K
# ---------------------------------------------------------------------------


def plan_memory(meta: dict, steps, batch: int = 1, itemsize: int = BYTES_PER_VALUE) -> dict:
    """Bytes of the (T, N, ...) buffers loss_and_grad's memory plan allocates.

    `meta` is a generated module's MODEL (compiled with or without
    recompute=K); `steps` the sequence length (one number, or {axis: length}).
    Counts the arenas (every batched and stored value, placed so that values
    whose lives do not overlap share memory), the states' buffers and, with
    recompute=K, the windows' buffers and checkpoints. The per-step work
    buffers and the convolution's scratch memory do not grow with T and are
    not counted. Also returns how many forward steps the backward pass runs
    again (all but the last window of each loop).
    """
    axis_of = {loop["id"]: loop["axis"] for loop in meta["loops"]}

    def length(axis):
        return int(steps[axis]) if isinstance(steps, dict) else int(steps)

    mem = meta["memory"]
    K = mem["recompute"]
    elements = sum(size * length(axis) for axis, size in mem["arena"].items())
    again = {}
    for v in mem["values"]:
        T = length(axis_of[v["loop"]])
        if v["ring"]:
            k = min(K, T)
            rows = (k + 1 + -(-T // K)) if v["state"] else k
            again[v["loop"]] = T - ((T - 1) % K + 1)
        elif v["state"]:
            rows = T + 1
        else:
            continue  # in the arena
        elements += rows * v["elements"]
    return dict(bytes=elements * batch * itemsize, recomputed_steps=sum(again.values()),
                steps=sum(length(loop["axis"]) for loop in meta["loops"]))


def recompute_report(full: dict, windowed: dict, steps, batch: int = 1) -> str:
    """Memory against compute: the plan of `full` (a MODEL without recompute) against
    those of `windowed` ({K: MODEL compiled with recompute=K})."""
    base = plan_memory(full, steps, batch)
    lines = [f"Memory plan of loss_and_grad, buffers that grow with T (float32, batch {batch}, "
             f"T = {_fmt_steps(steps)}):",
             f"  all steps kept:  {_fmt_bytes(base['bytes'])}"]
    for k, meta in sorted(windowed.items()):
        r = plan_memory(meta, steps, batch)
        saved = base["bytes"] - r["bytes"]
        share = 100.0 * saved / base["bytes"] if base["bytes"] else 0.0
        lines.append(f"  recompute={k}:     {_fmt_bytes(r['bytes'])}, saves {_fmt_bytes(saved)} "
                     f"({share:.0f}%); the backward pass runs {r['recomputed_steps']} of "
                     f"{r['steps']} forward steps again")
    if not any(v["window"] for v in full["memory"]["values"]):
        lines.append("  (no loop value can be recomputed: each is read outside its backward "
                     "loop)")
    return "\n".join(lines) + "\n"


def default_windows(steps) -> list[int]:
    """Window lengths worth showing: 1 and about sqrt(T) (the classic checkpointing choice)."""
    T = max(steps.values()) if isinstance(steps, dict) else int(steps)
    return sorted({1, max(1, round(math.sqrt(T)))})


def _fmt_steps(steps) -> str:
    if isinstance(steps, dict):
        return ", ".join(f"{k} {v}" for k, v in sorted(steps.items()))
    return str(steps)

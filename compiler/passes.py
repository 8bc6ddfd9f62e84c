"""Graph passes: constant folding, loss fusion, CSE, dead-code elimination.

Each pass rewrites the graph in place and returns how many nodes it changed,
so `convc compile --timings` and the tests can see that it did something.
They are optimisations over one definition of each op: folding evaluates an
op's reference evaluation; nothing here re-defines an op.
"""
from __future__ import annotations

import numpy as np

from .ir import Graph, is_data_seg, seg_order
from .ops import OPS


def _const_value(g: Graph, nid: str):
    node = g.node(nid)
    return node.attrs["value"] if node.op == "const" else None


def _pinned(g: Graph, nid: str, roots: set[str]) -> bool:
    """Nodes that must stay (roots, state updates, explicit keeps)."""
    node = g.node(nid)
    if nid in roots or node.attrs.get("keep"):
        return True
    return any(g.node(v).op == "state" and g.node(v).attrs.get("update") == nid
               for v in g.g.successors(nid))


def fold_constants(g: Graph, roots: set[str]) -> int:
    """Evaluate ops on constants; drop additions of zero, products with zero and one.

    A cell applied without input (`fc(steps=y)`) sees its input as the
    constant 0, so `conv(x, W_x)` folds to 0 and `0 + conv(h, W_h)` to the
    second term: the forecaster of an encoder-forecaster needs no input path.
    """
    changed = 0
    for nid in g.order():
        if nid not in g:
            continue
        node = g.node(nid)
        op = OPS[node.op]
        if not node.inputs or node.op == "const" or _pinned(g, nid, roots):
            continue
        vals = [_const_value(g, i) for i in node.inputs]
        new = None
        if all(v is not None for v in vals) and op.elementwise and op.ref is not None:
            attrs = {k: v for k, v in node.attrs.items() if not k.startswith("_")}
            value = float(np.asarray(op.ref(*[np.float64(v) for v in vals], **attrs)))
            new = _make_const(g, node, value)
        elif node.op in ("add", "sub") and vals[1] == 0.0 and _same_shape(g, node, 0):
            new = node.inputs[0]
        elif node.op == "add" and vals[0] == 0.0 and _same_shape(g, node, 1):
            new = node.inputs[1]
        elif node.op == "sub" and vals[0] == 0.0:
            g.node(nid).op = "neg"
            g.set_inputs(nid, (node.inputs[1],))
            changed += 1
            continue
        elif node.op == "mul" and 0.0 in vals:
            new = _make_const(g, node, 0.0)
        elif node.op == "mul" and vals[0] == 1.0 and _same_shape(g, node, 1):
            new = node.inputs[1]
        elif node.op == "mul" and vals[1] == 1.0 and _same_shape(g, node, 0):
            new = node.inputs[0]
        elif node.op == "scale" and node.attrs["factor"] == 1.0:
            new = node.inputs[0]
        elif node.op in ("conv", "slice", "neg", "scale") and vals[0] == 0.0:
            new = _make_const(g, node, 0.0)
        if new is not None:
            g.replace_uses(nid, new)
            changed += 1
    return changed


def fold_zero_channels(g: Graph) -> int:
    """conv(pad_zeros(h), W) -> conv(h, W[:, before:before+C]): no work on the zeros.

    pad_zeros stands for the zeros of an input a cell was not given (a
    forecaster's) concatenated with its other values; the kernel keeps its
    columns for them, which then see no use and get a zero gradient. A conv
    over a concat with such parts becomes the sum of the convs of its other
    parts, each with its columns of the kernel. Runs once shapes are known
    (it needs each part's channels).
    """
    changed = 0
    for nid in g.order():
        node = g.node(nid)
        if node.op != "conv":
            continue
        x = g.node(node.inputs[0])
        parts = x.inputs if x.op == "concat" else (node.inputs[0],)
        if not any(g.node(p).op == "pad_zeros" for p in parts):
            continue
        pieces, offset = [], 0  # (value, first kernel column)
        for p in parts:
            pn = g.node(p)
            if pn.op == "pad_zeros":
                pieces.append((pn.inputs[0], offset + pn.attrs["before"]))
            else:
                pieces.append((p, offset))
            offset += pn.shape[0]
        w = node.inputs[1]
        conv_attrs = {k: v for k, v in node.attrs.items() if k != "_named"}
        tags = {k: v for k, v in conv_attrs.items() if k.startswith("_")}
        terms = []
        for value, col in pieces:
            ws = _kernel_slice(g, w, col, col + g.node(value).shape[0], f"{col}", node)
            terms.append((value, ws))
        if len(terms) == 1:
            g.set_inputs(nid, terms[0])
        else:
            acc = _new(g, nid, "conv", terms[0], node, node.seg, **conv_attrs)
            for value, ws in terms[1:-1]:
                c = _new(g, nid, "conv", (value, ws), node, node.seg, **conv_attrs)
                acc = _new(g, nid, "add", (acc, c), node, node.seg, **tags)
            last = _new(g, nid, "conv", terms[-1], node, node.seg, **conv_attrs)
            _rewrite(g, nid, "add", (acc, last))
        changed += 1
    return changed


def _same_shape(g: Graph, node, i: int) -> bool:
    return tuple(g.node(node.inputs[i]).shape or ()) == tuple(node.shape or ()) and \
        (g.node(node.inputs[i]).seg is not None or node.seg is None)


def _make_const(g: Graph, like, value: float) -> str:
    from .ir import Node
    nid = g.fresh("c")
    g.add(Node(nid, "const", (), dict(value=float(value)), (), like.loc, None))
    return nid


def fuse_bce_logits(g: Graph) -> int:
    """bce(sigmoid(a), y) -> bce_logits(a, y): the same loss, without log(0) for saturated p."""
    changed = 0
    for nid in g.order():
        node = g.node(nid)
        if node.op == "bce":
            p = g.node(node.inputs[0])
            if p.op == "sigmoid":
                node.op = "bce_logits"
                g.set_inputs(nid, (p.inputs[0], node.inputs[1]))
                changed += 1
    return changed


def cse(g: Graph) -> int:
    """Merge nodes that apply the same op to the same inputs with the same attributes."""
    seen: dict = {}
    changed = 0
    for nid in g.order():
        node = g.node(nid)
        if node.op in ("input", "param", "state") or node.attrs.get("keep"):
            continue
        key = (node.op, node.inputs, node.seg,
               tuple(sorted((k, repr(v)) for k, v in node.attrs.items()
                            if not k.startswith("_"))))
        if key in seen:
            g.replace_uses(nid, seen[key])
            changed += 1
        else:
            seen[key] = nid
    return changed


def live_nodes(g: Graph, roots) -> set[str]:
    """Nodes the roots need, following state recurrences and initial values."""
    live: set[str] = set()
    # a state that another starts from (init=enc) keeps its read, whose buffer holds the
    # final value, also where nothing reads it at t-1 (an encoder whose h reads only x)
    read_of = {g.node(n).attrs["update"]: n for n in g.g.nodes
               if g.node(n).op == "state" and g.node(n).attrs.get("update")}
    stack = list(roots)
    while stack:
        n = stack.pop()
        if n in live:
            continue
        live.add(n)
        node = g.node(n)
        stack.extend(node.inputs)
        if node.op == "state":
            for key in ("update", "init_from"):
                if node.attrs.get(key):
                    stack.append(node.attrs[key])
            if node.attrs.get("init_from") in read_of:
                stack.append(read_of[node.attrs["init_from"]])
    return live


def dce(g: Graph, roots) -> int:
    live = live_nodes(g, roots)
    dead = [n for n in list(g.g.nodes) if n not in live]
    for n in dead:
        g.remove(n)
    return len(dead)


# ================================================================ loop-aware rewrites
# These run on the differentiated graph, forward and backward nodes together,
# because they need to know the recurrences (which values are computed step by
# step and which could run over the whole sequence at once). Every rewrite
# replaces values by equal values, so the backward nodes that read forward
# values stay correct; nodes are rewritten in place where their ids are known
# elsewhere (the backward pass's tables, state links, outputs).

def loop_rewrites(low, bw, fuse: bool = False) -> dict[str, int]:
    """Run every loop-aware rewrite once; returns how many nodes each changed.

    Idempotent: a second run finds nothing to do. fuse: the loops' elementwise
    work will run in fused kernels (fuse.py), where a gate is one statement of
    a kernel over the gate's channels: activations of sibling slices are not
    merged into one call then, and an elementwise op whose every use is a
    channel slice is computed slice by slice instead (`slice_elementwise`),
    so that every gate is of the kernel's shape.
    """
    g = low.graph
    counts = {}
    cycles = cycle_ids(g)
    counts["hoist_concat_convs"] = hoist_concat_convs(g, cycles)
    cycles = cycle_ids(g)
    counts["reassociate_adds"] = reassociate_adds(g, cycles)
    counts["split_grad_input_slices"] = split_grad_input_slices(g)
    counts["concat_slice_grads"] = concat_slice_grads(g)
    if fuse:
        counts["slice_elementwise"] = slice_elementwise(g, protected_nodes(low, bw))
    else:
        counts["merge_sibling_activations"] = merge_sibling_activations(g)
        counts["merge_sibling_activation_grads"] = merge_sibling_activation_grads(g)
    counts["dead"] = remove_dead(g, protected_nodes(low, bw))
    return counts


def cycle_ids(g: Graph) -> dict[str, int]:
    """For each forward node on a recurrence: the id of that recurrence.

    A recurrence is a strongly connected component of the forward graph with
    the time edges added (a state's update at t feeds its read at t+1), taken
    both ways so a read always belongs with its update.
    """
    import networkx as nx

    h = nx.DiGraph()
    fwd = [n for n in g.g.nodes if not g.node(n).grad]
    h.add_nodes_from(fwd)
    for u in fwd:
        for v in g.data.successors(u):
            if not g.node(v).grad:
                h.add_edge(u, v)
    for n in fwd:
        node = g.node(n)
        if node.op == "state" and node.attrs.get("update") in h:
            h.add_edge(node.attrs["update"], n)
            h.add_edge(n, node.attrs["update"])
    out = {}
    comps = sorted((c for c in nx.strongly_connected_components(h) if len(c) > 1),
                   key=lambda c: min(g.node(n).order for n in c))
    for k, comp in enumerate(comps):
        for n in comp:
            out[n] = k
    return out


def _new(g: Graph, base: str, op: str, inputs, like, seg, grad: bool = False, **attrs) -> str:
    """Add a node; its shape comes from the op's shape rule."""
    from .ir import Node

    nid = g.fresh(base)
    if "_instance" in like.attrs:  # made for the cell instance `like` was made for
        attrs.setdefault("_instance", like.attrs["_instance"])
    node = Node(nid, op, tuple(inputs), dict(attrs), None, like.loc, seg, grad=grad)
    g.add(node)
    node.shape = tuple(OPS[op].shape([g.node(i).shape for i in node.inputs], node.attrs))
    return nid


def _rewrite(g: Graph, nid: str, op: str, inputs, **attrs) -> None:
    """Turn node `nid` into another op with the same value (its id, shape and uses stay)."""
    node = g.node(nid)
    shape = tuple(OPS[op].shape([g.node(i).shape for i in inputs], attrs))
    if tuple(shape) != tuple(node.shape):
        raise AssertionError(f"rewrite of {nid} changes its shape {node.shape} -> {shape}")
    keep = {k: v for k, v in node.attrs.items() if k.startswith("_") or k == "keep"}
    node.op = op
    node.attrs = dict(attrs, **keep)
    g.set_inputs(nid, tuple(inputs))


def _part_name(g: Graph, nid: str) -> str:
    """A short name for an operand: the state (`h`) or sequence (`x`) it is, else its id."""
    node = g.node(nid)
    if node.op == "state":
        return node.attrs.get("state", nid).split(".")[-1]
    if node.op == "input":
        return node.attrs.get("seq", nid)
    return nid


def _kernel_slice(g: Graph, w: str, start: int, stop: int, name: str, like) -> str:
    """kernel_slice(w, start, stop), looking through a slice of a slice; reused if it exists."""
    wnode = g.node(w)
    if wnode.op == "kernel_slice":
        base = wnode.attrs["start"]
        w, start, stop = wnode.inputs[0], base + start, base + stop
        wnode = g.node(w)
    if start == 0 and stop == wnode.shape[1]:
        return w
    for u in g.consumers(w):
        un = g.node(u)
        if un.op == "kernel_slice" and un.attrs["start"] == start and un.attrs["stop"] == stop:
            return u
    return _new(g, f"{w}_{name}", "kernel_slice", (w,), like, None, start=start, stop=stop)


def hoist_concat_convs(g: Graph, cycles: dict[str, int]) -> int:
    """conv(concat(a, b), W) -> conv(a, W[:, :Ca]) + conv(b, W[:, Ca:]) on a recurrence.

    When some operands of the concat are not on the convolution's recurrence
    (the cell's input x, or the layer below's output), their part of the
    convolution does not have to wait for the previous step: split off, it is
    scheduled before the loop (or between two loops) as one GEMM over every
    step. Adjacent operands of the same kind stay together. The convolution
    node becomes the sum of the parts, the parts off the recurrence first.
    """
    changed = 0
    for nid in g.order():
        node = g.node(nid)
        if node.op != "conv" or node.grad or nid not in cycles:
            continue
        cat_id, w_id = node.inputs
        cat = g.node(cat_id)
        if cat.op != "concat" or g.node(w_id).shape is None:
            continue
        inside = [cycles.get(p) == cycles[nid] for p in cat.inputs]
        if all(inside) or not any(inside):
            continue
        runs = []  # [inside?, [parts], start, stop]
        start = 0
        for p, ins in zip(cat.inputs, inside):
            c = g.node(p).shape[0]
            if runs and runs[-1][0] == ins:
                runs[-1][1].append(p)
                runs[-1][3] += c
            else:
                runs.append([ins, [p], start, start + c])
            start += c
        terms = {False: [], True: []}
        for ins, parts, a, b in runs:
            name = "_".join(_part_name(g, p) for p in parts)
            x = parts[0] if len(parts) == 1 else _new(g, "concat", "concat", parts, cat,
                                                      node.seg)
            w = _kernel_slice(g, w_id, a, b, name, node)
            terms[ins].append(_new(g, f"{nid}_{name}", "conv", (x, w), node, node.seg,
                                   **{k: node.attrs[k] for k in ("stride", "pad", "dilation")}))
        acc = terms[False] + terms[True]
        while len(acc) > 2:
            acc = [_new(g, "add", "add", acc[:2], node, node.seg)] + acc[2:]
        _rewrite(g, nid, "add", acc)
        changed += 1
    return changed


def _add_tree(g: Graph, root: str) -> tuple[list[str], list[str]]:
    """Leaves and inner nodes of the tree of forward `add`s under root (inner: one use)."""
    leaves, inner = [], []
    stack = [root]
    while stack:
        n = stack.pop()
        node = g.node(n)
        if node.op == "add" and (n == root or (len(g.consumers(n)) == 1 and not node.grad
                                              and not _pinned(g, n, set()))):
            if n != root:
                inner.append(n)
            stack.extend(reversed(node.inputs))
        else:
            leaves.append(n)
    return leaves, inner


def reassociate_adds(g: Graph, cycles: dict[str, int]) -> int:
    """Sum the terms off a recurrence first: (conv_x + conv_h) + b -> (conv_x + b) + conv_h.

    The bias (or any other term that does not depend on the previous step)
    then joins the hoisted input convolution before the loop, and the loop
    adds one precomputed term to its own convolution.
    """
    changed = 0
    for nid in g.order():
        if nid not in g:
            continue
        node = g.node(nid)
        if node.op != "add" or node.grad or nid not in cycles:
            continue
        users = g.consumers(nid)
        if len(users) == 1 and g.node(users[0]).op == "add" and not g.node(users[0]).grad \
                and not _pinned(g, nid, set()):
            continue  # an inner node of a larger sum: its root handles it
        leaves, inner = _add_tree(g, nid)
        outside = [x for x in leaves if cycles.get(x) != cycles[nid]]
        inside = [x for x in leaves if cycles.get(x) == cycles[nid]]
        if len(outside) < 2 or not inside:
            continue
        if any(set(_add_tree(g, i)[0]) == set(outside) for i in inner):
            continue  # the off-recurrence terms are already summed on their own
        segs = [g.node(x).seg for x in outside if g.node(x).seg is not None]
        seg = max(segs, key=seg_order) if segs else None
        acc = outside[0]
        for x in outside[1:]:
            acc = _new(g, "add", "add", (acc, x), node, seg)
        terms = [acc] + inside
        while len(terms) > 2:
            terms = [_new(g, "add", "add", terms[:2], node, node.seg)] + terms[2:]
        _rewrite(g, nid, "add", terms)
        for n in inner:
            if n in g and not g.consumers(n):
                g.remove(n)
        changed += 1
    return changed


def split_grad_input_slices(g: Graph) -> int:
    """slice(conv_grad_input(g, W), a, b) -> conv_grad_input(g, W[:, a:b]).

    Channel c of a convolution's input gradient only involves W[:, c], so the
    gradient of each part of a concat is a convolution gradient of its own:
    parts nothing differentiates (the data input x) cost nothing, and a part
    off the recurrence (the layer below's output) is computed over all steps
    at once. Applies when every use of the gradient is such a slice.
    """
    changed = 0
    for nid in g.order():
        node = g.node(nid)
        if node.op != "conv_grad_input":
            continue
        users = g.consumers(nid)
        if not users or any(g.node(u).op != "slice" for u in users):
            continue
        gy, w = node.inputs
        for u in users:
            un = g.node(u)
            a, b = un.attrs["start"], un.attrs["stop"]
            ws = _kernel_slice(g, w, a, b, f"{a}_{b}", node)
            x_shape = (b - a,) + tuple(node.attrs["x_shape"][1:])
            _rewrite(g, u, "conv_grad_input", (gy, ws), x_shape=x_shape,
                     **{k: node.attrs[k] for k in ("stride", "pad", "dilation")})
        g.remove(nid)
        changed += 1
    return changed


def concat_slice_grads(g: Graph) -> int:
    """addn(pad_channels(g1, 0, C), pad_channels(g2, C1, C), ...) -> concat(g1, g2, ...).

    The backward of split: when the slices' gradients tile every channel, the
    cotangent is their concatenation, which the code generator writes in place
    (each part straight into its channels of one buffer) instead of allocating
    a zero array per part and adding them up.
    """
    changed = 0
    for nid in g.order():
        node = g.node(nid)
        if node.op != "addn" or not node.grad or node.shape is None:
            continue
        pads = [g.node(i) for i in node.inputs]
        if any(p.op != "pad_channels" for p in pads) or len(set(node.inputs)) != len(pads):
            continue
        total = node.shape[0]
        spans = sorted((p.attrs["start"], p.attrs["start"] + g.node(p.inputs[0]).shape[0],
                        p.inputs[0]) for p in pads)
        if any(p.attrs["total"] != total for p in pads) or spans[0][0] != 0 or \
                spans[-1][1] != total or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
            continue
        _rewrite(g, nid, "concat", tuple(s[2] for s in spans))
        for p in pads:
            if not g.consumers(p.id):
                g.remove(p.id)
        changed += 1
    return changed


def merge_sibling_activations(g: Graph) -> int:
    """sigmoid(z[a:b]), sigmoid(z[b:c]) -> one sigmoid(z[a:c]), sliced: one call per gate kind.

    A ConvLSTM's input, forget and output gates are adjacent channels of one
    convolution; one activation over the three saves two passes of call
    overhead per step. Each old activation becomes a slice of the merged one
    (its id stays, so its backward nodes still find it).
    """
    changed = 0
    for nid in g.order():
        if nid not in g:
            continue
        node = g.node(nid)
        if node.grad:
            continue
        groups: dict[str, list] = {}
        for s in g.consumers(nid):
            sn = g.node(s)
            if sn.op != "slice" or sn.grad:
                continue
            users = g.consumers(s)
            if len(users) != 1 or not OPS[g.node(users[0]).op].activation:
                continue
            act = g.node(users[0])
            if act.grad or act.seg != sn.seg:
                continue
            groups.setdefault(act.op, []).append((sn.attrs["start"], sn.attrs["stop"], s, act.id))
        for op, items in sorted(groups.items()):
            items.sort()
            runs = [[items[0]]]
            for it in items[1:]:
                if it[0] == runs[-1][-1][1]:
                    runs[-1].append(it)
                else:
                    runs.append([it])
            for run in runs:
                if len(run) < 2:
                    continue
                a, b = run[0][0], run[-1][1]
                first = g.node(run[0][3])
                part = _new(g, f"z_{op}", "slice", (nid,), first, first.seg, start=a, stop=b)
                merged = _new(g, op, op, (part,), first, first.seg)
                for start, stop, s, act in run:
                    _rewrite(g, act, "slice", (merged,), start=start - a, stop=stop - a)
                    if not g.consumers(s):
                        g.remove(s)
                changed += 1
    return changed


def slice_elementwise(g: Graph, protected: set[str] = frozenset()) -> int:
    """slice(f(a, b), i, j) -> f(slice(a, i, j), slice(b, i, j)) when every use of f is
    a channel slice: a ConvLSTM's z = conv_x + conv_h becomes one add per gate.

    For fused kernels (fuse.py), which group ops of one shape: each part then
    has its gate's shape. Operands are sliced where they have f's channels and
    passed whole where they broadcast over them (a channel of length 1). Runs
    to a fixed point, so slices move up through a chain of such ops. A
    `protected` node (an output, a gradient, a state's update) stays whole.
    """
    changed = 0
    again = True
    while again:
        again = False
        for nid in g.order():
            if nid not in g:
                continue
            node = g.node(nid)
            op = OPS[node.op]
            users = g.consumers(nid)
            if not (op.elementwise and op.scalar is not None) or not users or \
                    nid in protected or node.seg is None or is_data_seg(node.seg) or \
                    node.shape is None or len(node.shape) < 1 or \
                    any(g.node(u).op != "slice" for u in users) or len(set(users)) != len(users):
                continue
            C, rank = node.shape[0], len(node.shape)
            ins = [g.node(i) for i in node.inputs]
            if any(x.shape is None for x in ins):
                continue
            # an operand has f's channels (sliced), or broadcasts over them (passed whole)
            whole = [len(x.shape) < rank or x.shape[len(x.shape) - rank] == 1 for x in ins]
            if any(not w and tuple(x.shape)[0] != C for x, w in zip(ins, whole)):
                continue
            attrs = {k: v for k, v in node.attrs.items() if not k.startswith("_")}
            for u in users:
                un = g.node(u)
                a, b = un.attrs["start"], un.attrs["stop"]
                parts = [x.id if w else _new(g, f"{x.id}_part", "slice", (x.id,), un, un.seg,
                                             grad=un.grad, start=a, stop=b)
                         for x, w in zip(ins, whole)]
                _rewrite(g, u, node.op, tuple(parts), **attrs)
            g.remove(nid)
            changed += 1
            again = True
    return changed


# the gradient ops computed from an activation's output (sigmoid_grad, ...)
def _output_grads() -> set[str]:
    return {op.grad_from_output for op in OPS.values() if op.grad_from_output}


def merge_sibling_activation_grads(g: Graph) -> int:
    """concat(..., sigmoid_grad(S[a:b], g1), sigmoid_grad(S[b:c], g2), ...) -> one over S.

    The backward of merge_sibling_activations: when the gradients of adjacent
    slices of one activation sit side by side in a concat (a ConvLSTM's dz),
    their cotangents are concatenated (each written into its channels of one
    buffer) and the activation's gradient runs once over the whole of it,
    straight into its channels of the outer concat.
    """
    changed = 0
    for nid in g.order():
        if nid not in g:
            continue
        cat = g.node(nid)
        if cat.op != "concat" or not cat.grad:
            continue
        parts = list(cat.inputs)
        i = 0
        while i < len(parts):
            run = _grad_run(g, parts, i, nid)
            if len(run) < 2:
                i += 1
                continue
            first = g.node(parts[i])
            act = g.node(g.node(first.inputs[0]).inputs[0])
            lo = g.node(first.inputs[0]).attrs["start"]
            hi = g.node(g.node(parts[i + len(run) - 1]).inputs[0]).attrs["stop"]
            y = act.id if (lo, hi) == (0, act.shape[0]) else \
                _new(g, f"{act.id}_part", "slice", (act.id,), act, act.seg, start=lo, stop=hi)
            ct = _new(g, f"d{act.id}", "concat", tuple(g.node(p).inputs[1] for p in run),
                      first, first.seg, grad=True)
            merged = _new(g, f"d_{first.op}", first.op, (y, ct), first, first.seg, grad=True)
            parts[i:i + len(run)] = [merged]
            g.set_inputs(nid, tuple(parts))
            for p in run:
                if not g.consumers(p):
                    g.remove(p)
            changed += 1
            i += 1
    return changed


def _grad_run(g: Graph, parts: list, i: int, cat: str) -> list:
    """The longest run parts[i:j] of activation gradients over adjacent slices of one value."""
    run = []
    prev = None
    for p in parts[i:]:
        node = g.node(p)
        if not node.grad or node.op not in _output_grads() or g.consumers(p) != [cat] or \
                parts.count(p) != 1:
            break
        y = g.node(node.inputs[0])
        if y.op != "slice":
            break
        act = g.node(y.inputs[0])
        if OPS[act.op].grad_from_output != node.op or tuple(node.shape) != tuple(y.shape):
            break
        if prev is not None and (prev[0] != act.id or prev[1] != y.attrs["start"]):
            break
        run.append(p)
        prev = (act.id, y.attrs["stop"])
    return run


def protected_nodes(low, bw) -> set[str]:
    """Nodes that must stay even without data consumers (roots, time links, tables)."""
    g = low.graph
    keep = set(low.losses) | set(low.outputs.values()) | set(low.inputs.values()) | \
        set(low.targets.values()) | {p.node for p in low.params.values()}
    if bw is not None:
        keep |= set(bw.grads.values()) | set(bw.read_cts.values()) | \
            set(bw.carry_outs.values()) | set(bw.carries.values()) | \
            set(bw.input_cts.values()) | set(bw.init_cts.values()) | \
            set(bw.seeds.values()) | set(bw.final_seeds.values())
    for n in g.g.nodes:
        node = g.node(n)
        if node.op in ("state", "carry", "carry_out") or node.attrs.get("keep"):
            keep.add(n)
        for k in ("update", "init_from"):
            if node.attrs.get(k):
                keep.add(node.attrs[k])
        keep.update(node.attrs.get("terminal", ()))
    return keep


def remove_dead(g: Graph, protected: set[str]) -> int:
    """Remove nodes nothing reads (after rewrites), except protected ones."""
    removed = 0
    stack = [n for n in g.g.nodes if not g.consumers(n) and n not in protected]
    while stack:
        n = stack.pop()
        if n not in g or n in protected or g.consumers(n):
            continue
        ins = g.node(n).inputs
        g.remove(n)
        removed += 1
        stack.extend(i for i in ins if i in g)
    return removed

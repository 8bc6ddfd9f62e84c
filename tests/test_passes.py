"""The loop-aware rewrites, loop fission, peeling and the memory plan.

Every rewrite must (1) happen on a model it is meant for, with the effect
it promises in the graph or the generated code, and (2) leave the results
alone: the loss and every gradient in float64 equal those of the same model
compiled without it (relative 1e-10), and the forward pass agrees with the
reference interpreter.
"""
from __future__ import annotations

import ast
from contextlib import contextmanager

import numpy as np
import pytest

from convc.compiler import passes
from convc.compiler import reference
from convc.compiler.interp import run_forward
from convc.runtime import kernels
from convc.runtime.bench import peer_cell_text
from helpers import load_text, one_blas_thread  # noqa: F401  (an autouse fixture)
from helpers import random_batch, random_params, random_state

REWRITES = ("hoist_concat_convs", "reassociate_adds", "split_grad_input_slices",
            "concat_slice_grads", "merge_sibling_activations", "merge_sibling_activation_grads")

# The peer yardstick's model (std.ConvLSTMFused layers and a 1x1 head), small.
FUSED2 = peer_cell_text(dict(name="fused2", N=2, T=4, Cin=2, H=6, hidden=3, k=3, layers=2))
FUSED1 = peer_cell_text(dict(name="fused1", N=2, T=4, Cin=1, H=6, hidden=2, k=3, layers=1))

# Two convolutions over one concat (CSE merges the concats), a delay state, a per-pixel bias.
SHARED = """import std
cell Shared(hidden) {
    input x
    state h = zeros
    state c = zeros
    weight W1 = kernel(hidden, 3)
    weight W4 = kernel(hidden, 3)
    weight b = bias(hidden, per_pixel = true)
    h = sigmoid(conv(concat(x, h[t-1]), W1) - h[t-1] + b)
    c = 0.5 * c[t-1] + tanh(conv(concat(x, h[t-1]), W4))
    y = h * c
    output y
}
model shared {
    input x: [2, 6, 6]
    target y: [1, 6, 6]
    l0 = ConvLSTM(hidden = 2, kernel = 1, peephole = true)
    h0 = l0(x)
    l1 = Shared(hidden = 3)
    h1 = l1(h0)
    weight W_out = kernel(1, 1)
    pred = conv(h1, W_out)
    output pred
    loss mse(pred, y)
}
"""


@contextmanager
def disabled(*names):
    """Compile with some loop-aware rewrites switched off (all of them: "all")."""
    if names == ("all",):
        names = REWRITES
    saved = {n: getattr(passes, n) for n in names}
    try:
        for n in names:
            setattr(passes, n, lambda *a, **k: 0)
        yield
    finally:
        for n, f in saved.items():
            setattr(passes, n, f)


_COUNT = [0]


def compile_text(text: str, off=()):
    _COUNT[0] += 1
    with disabled(*off):
        return load_text(text, f"test_passes_{_COUNT[0]}.cell")


def assert_same_results(mod, ref, T: int = 4, seed: int = 0, **kw):
    params = random_params(mod, seed=seed)
    inputs, targets = random_batch(mod, N=2, T=T, seed=seed)
    la, ga, fa = mod.loss_and_grad(params, inputs, targets, **kw)
    lb, gb, fb = ref.loss_and_grad(params, inputs, targets, **kw)
    assert abs(la - lb) <= 1e-12 * max(1.0, abs(lb))
    assert sorted(ga) == sorted(gb)
    for name in ga:
        scale = max(float(np.abs(gb[name]).max()), 1e-300)
        err = float(np.abs(np.asarray(ga[name]) - np.asarray(gb[name])).max()) / scale
        assert err <= 1e-10, f"{name}: relative difference {err:.2e}"
    for name in fa:
        np.testing.assert_allclose(fa[name], fb[name], rtol=1e-12, atol=1e-12)
    # and the forward pass against the reference interpreter
    outs, _ = mod.forward(params, inputs, state=kw.get("state"))
    want, _, _ = run_forward(mod.compiled.lowered, params, inputs, targets,
                             state=kw.get("state"))
    for name in outs:
        np.testing.assert_allclose(outs[name], want[name], rtol=1e-10, atol=1e-12)


def forward_ops(mod, kinds: tuple) -> list:
    """(op, block kind) of every forward node in blocks of the given kinds."""
    s = mod.compiled.schedule
    g = mod.compiled.lowered.graph
    return [(g.node(n).op, s.block_of[n][0]) for n in g.order()
            if s.block_of[n][0] in kinds and not g.node(n).grad]


# ---------------------------------------------------------------- each rewrite happens

def test_hoist_concat_convs_moves_the_input_half_out_of_the_loop():
    mod = compile_text(FUSED1)
    assert mod.compiled.schedule.rewrites["hoist_concat_convs"] == 1
    g = mod.compiled.lowered.graph
    s = mod.compiled.schedule
    loop_convs = [n for n in g.order() if g.node(n).op == "conv" and s.block_of[n][0] == "loop"]
    pre_convs = [n for n in g.order() if g.node(n).op == "conv" and s.block_of[n][0] == "pre"]
    assert len(loop_convs) == 1 and len(pre_convs) == 1
    # the loop's convolution reads the state only, with a kernel slice of W
    cin = g.node(g.node(loop_convs[0]).inputs[0])
    assert cin.op == "state"
    w = g.node(g.node(loop_convs[0]).inputs[1])
    assert w.op == "kernel_slice" and (w.attrs["start"], w.attrs["stop"]) == (1, 3)
    # the pre-loop convolution reads the whole input sequence: one GEMM stack over all steps
    assert g.node(g.node(pre_convs[0]).inputs[0]).op == "input"
    assert_same_results(mod, compile_text(FUSED1, off=("all",)))


def test_reassociate_adds_puts_the_bias_before_the_loop():
    mod = compile_text(FUSED1)
    assert mod.compiled.schedule.rewrites["reassociate_adds"] == 1
    ops = forward_ops(mod, ("pre",))
    assert ("add", "pre") in ops  # conv(x, W_x) + b, all steps at once
    g = mod.compiled.lowered.graph
    s = mod.compiled.schedule
    loop_adds = [n for n in g.order() if g.node(n).op == "add" and s.block_of[n][0] == "loop"
                 and any(g.node(i).op == "conv" for i in g.node(n).inputs)]
    assert len(loop_adds) == 1  # one add per step: the precomputed term plus conv(h, W_h)
    assert_same_results(mod, compile_text(FUSED1, off=("reassociate_adds",)))


def test_split_grad_input_slices_drops_the_data_inputs_gradient():
    mod = compile_text(FUSED1)
    assert mod.compiled.schedule.rewrites["split_grad_input_slices"] == 1
    g = mod.compiled.lowered.graph
    gis = [g.node(n) for n in g.order() if g.node(n).op == "conv_grad_input"
           and g.node(n).attrs["pad"] != (0, 0)]  # not the 1x1 head's
    # only the state's channels: nothing is computed for x
    assert [n.attrs["x_shape"][0] for n in gis] == [2]
    assert g.node(gis[0].inputs[1]).op == "kernel_slice"
    assert_same_results(mod, compile_text(FUSED1, off=("split_grad_input_slices",)))


def test_split_grad_input_slices_batches_the_layer_belows_gradient():
    mod = compile_text(FUSED2)
    s = mod.compiled.schedule
    g = mod.compiled.lowered.graph
    kinds = sorted(s.block_of[n][0] for n in g.order() if g.node(n).op == "conv_grad_input")
    # per step: each layer's recurrent part; all steps at once: the head's, and layer 1's
    # gradient with respect to layer 0's output
    assert kinds == ["bloop", "bloop", "bmid", "bpre"]
    assert_same_results(mod, compile_text(FUSED2, off=("all",)))


def test_concat_slice_grads_turns_pads_into_a_concat():
    mod = compile_text(FUSED1)
    assert mod.compiled.schedule.rewrites["concat_slice_grads"] == 1
    g = mod.compiled.lowered.graph
    assert not [n for n in g.order() if g.node(n).op == "pad_channels"]
    cats = sorted((g.node(n) for n in g.order() if g.node(n).op == "concat" and g.node(n).grad),
                  key=lambda n: len(n.inputs))
    # dz = concat(the i, f, o gates' gradient, g's); the gates' cotangents = concat(di, df, do)
    assert [len(c.inputs) for c in cats] == [2, 3]
    # each gate's gradient is written straight into its channels of dz's buffer
    assert "its parts were written into it above" in mod.source
    assert_same_results(mod, compile_text(FUSED1, off=("concat_slice_grads",)))


def test_merge_sibling_activations_makes_one_sigmoid_of_three_gates():
    mod = compile_text(FUSED1)
    assert mod.compiled.schedule.rewrites["merge_sibling_activations"] == 1
    g = mod.compiled.lowered.graph
    s = mod.compiled.schedule
    sig = [n for n in g.order() if g.node(n).op == "sigmoid" and s.block_of[n][0] == "loop"]
    assert len(sig) == 1 and g.node(sig[0]).shape[0] == 6  # i, f, o of 2 channels each
    assert_same_results(mod, compile_text(FUSED1, off=("merge_sibling_activations",)))


def test_merge_sibling_activation_grads_makes_one_sigmoid_grad():
    mod = compile_text(FUSED1)
    assert mod.compiled.schedule.rewrites["merge_sibling_activation_grads"] == 1
    g = mod.compiled.lowered.graph
    s = mod.compiled.schedule
    sg = [g.node(n) for n in g.order() if g.node(n).op == "sigmoid_grad"
          and s.block_of[n][0] == "bloop"]
    assert len(sg) == 1 and sg[0].shape[0] == 6  # the three gates at once
    assert g.node(sg[0].inputs[0]).op == "sigmoid"  # the merged activation itself
    assert_same_results(mod, compile_text(FUSED1, off=("merge_sibling_activation_grads",)))


def test_rewrites_on_shared_concats_and_delays():
    mod = compile_text(SHARED)
    # the h recurrence's convolution is split; c's reads h[t-1] but is on no recurrence of
    # its own (c does not feed h): loop fission runs it whole, between h's loop and c's
    assert mod.compiled.schedule.rewrites["hoist_concat_convs"] == 1
    s = mod.compiled.schedule
    g = mod.compiled.lowered.graph
    assert [b[0] for b in s.forward_blocks if b[0] in ("loop", "mid") and s.members[b]] == \
        ["loop", "mid", "loop", "mid", "loop"]
    assert any(g.node(n).op == "conv" and g.node(g.node(n).inputs[0]).op == "concat"
               for b in s.forward_blocks if b[0] == "mid" for n in s.members[b])
    ref = compile_text(SHARED, off=("all",))
    assert_same_results(mod, ref)
    assert_same_results(mod, ref, bptt=2)
    assert_same_results(mod, ref, T=1)
    assert_same_results(mod, ref, state=random_state(mod, N=2, seed=3))


def test_rewrites_are_idempotent():
    mod = compile_text(FUSED2)
    counts = passes.loop_rewrites(mod.compiled.lowered, mod.compiled.backward)
    assert not any(counts.values()), counts


# ---------------------------------------------------------------- loop fission

def test_stacked_layers_get_a_loop_each_with_the_input_convolution_between():
    mod = compile_text(FUSED2)
    s = mod.compiled.schedule
    fwd = [b for b in s.forward_blocks if b[0] == "loop" or b[0] == "mid" and s.members[b]]
    bwd = [b for b in s.backward_blocks if b[0] == "bloop" or b[0] == "bmid" and s.members[b]]
    assert [b[0] for b in fwd] == ["loop", "mid", "loop"]
    # each layer's weight gradient right after its loop
    assert [b[0] for b in bwd] == ["bloop", "bmid", "bloop", "bmid"]
    g = mod.compiled.lowered.graph
    mid = [g.node(n).op for n in s.members[fwd[1]]]
    assert "conv" in mid  # layer 1's convolution of layer 0's output, all steps at once
    for kw in ({}, {"bptt": 2}, {"state": random_state(mod, N=2, seed=1)}):
        assert_same_results(mod, compile_text(FUSED2, off=("all",)), **kw)


# ---------------------------------------------------------------- generated code

def _loop_bodies(source: str, function: str):
    tree = ast.parse(source)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    return [n for n in ast.walk(fn) if isinstance(n, ast.For)]


def _allocating_calls(loop: ast.For) -> list[str]:
    """Calls in a loop body that make a new array: no out=, not a view or a check."""
    bad = []
    for stmt in ast.walk(loop):
        if not isinstance(stmt, ast.Assign) or not isinstance(stmt.value, ast.Call):
            continue
        call = stmt.value
        name = ast.unparse(call.func)
        if any(k.arg == "out" for k in call.keywords) or name.endswith("zeros_like"):
            continue
        bad.append(ast.unparse(stmt))
    return bad


@pytest.mark.parametrize("text", [FUSED1, FUSED2], ids=["1 layer", "2 layers"])
def test_no_allocation_inside_the_time_loops(text):
    mod = compile_text(text)
    for function in ("loss_and_grad_shard", "forward"):
        loops = _loop_bodies(mod.source, function)
        assert loops
        for loop in loops:
            assert not _allocating_calls(loop), (function, _allocating_calls(loop))


def test_peeled_steps_skip_the_zero_state_work():
    src = compile_text(FUSED1).source
    fwd = src[src.index("def loss_and_grad"):]
    # forward t = 0: no recurrent convolution (h[t-1] is zero)
    first = fwd[fwd.index("if state is None:"):fwd.index("for t in range(t0")]
    assert "rt.conv2d(" not in first
    # backward t = 0: no gradient with respect to h[-1]
    last = fwd[fwd.index("if T_x > 1:"):]
    last = last[:last.index("\n\n")]
    assert "conv2d_grad_input" not in last
    # backward t = T-1: no carry is read
    top = fwd[fwd.index("t = T_x - 1"):fwd.index("for t in range(T_x - 2")]
    body = top[:top.index("_next = ")]
    assert "_next" not in body


def test_poison_mode_gives_the_same_bits():
    mod = compile_text(FUSED2)
    params = random_params(mod, seed=2, dtype="float32")
    inputs, targets = random_batch(mod, N=2, T=4, seed=2, dtype="float32")
    plain = mod.loss_and_grad(params, inputs, targets)
    was = kernels.poison_enabled()
    kernels.set_poison(True)
    try:
        poisoned = mod.loss_and_grad(params, inputs, targets)
    finally:
        kernels.set_poison(was)
    assert plain[0] == poisoned[0]
    for name in plain[1]:
        assert np.array_equal(plain[1][name], poisoned[1][name]), name


def test_debug_nans_still_checks_every_value():
    mod = load_text(FUSED2, "test_passes_debug_nans.cell")
    from convc.api import load
    dbg = load(None, text=FUSED2, debug_nans=True)
    assert dbg.source.count("rt.check_finite(") > 20
    params = random_params(mod, seed=4)
    inputs, targets = random_batch(mod, N=2, T=3, seed=4)
    la, ga, _ = dbg.loss_and_grad(params, inputs, targets)
    lb, gb, _ = mod.loss_and_grad(params, inputs, targets)
    assert la == pytest.approx(lb, rel=1e-12)
    inputs["x"][0, 1, 0, 2, 2] = np.nan
    from convc.errors import NonFiniteError
    with pytest.raises(NonFiniteError):
        dbg.loss_and_grad(params, inputs, targets)


def test_gradients_do_not_alias_internal_buffers():
    mod = compile_text(FUSED1)
    params = random_params(mod, seed=5)
    inputs, targets = random_batch(mod, N=2, T=4, seed=5)
    _, g1, f1 = mod.loss_and_grad(params, inputs, targets)
    keep = {k: np.array(v) for k, v in g1.items()}
    keep_f = {k: np.array(v) for k, v in f1.items()}
    other = random_params(mod, seed=6)
    mod.loss_and_grad(other, inputs, targets)  # must not change what the first call returned
    for k in g1:
        assert np.array_equal(g1[k], keep[k]), k
    for k in f1:
        assert np.array_equal(f1[k], keep_f[k]), k


# ---------------------------------------------------------------- batch shards

@pytest.mark.parametrize("kw", [{}, {"bptt": 2}, {"state": True}], ids=["full", "bptt", "state"])
def test_shards_give_the_whole_batchs_loss_and_gradients(kw):
    """With two BLAS threads the batch runs as two shards in two threads; same results."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    mod = compile_text(FUSED2)
    params = random_params(mod, seed=7)
    inputs, targets = random_batch(mod, N=5, T=4, seed=7)
    if kw.get("state"):
        kw = {"state": random_state(mod, N=5, seed=7)}
    from convc.runtime.ops_numpy import NumpyBackend
    backend = NumpyBackend()
    whole = mod.loss_and_grad_shard(params, inputs, targets, backend=backend, **kw)
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        assert kernels.shard_count(None, 5) == 2
        sharded = mod.loss_and_grad(params, inputs, targets, **kw)
    assert sharded[0] == pytest.approx(whole[0], rel=1e-12)
    for name in whole[1]:
        np.testing.assert_allclose(sharded[1][name], whole[1][name], rtol=1e-10, atol=1e-14)
    for name in whole[2]:
        np.testing.assert_allclose(sharded[2][name], whole[2][name], rtol=1e-12, atol=1e-14)


def test_small_steps_run_whole_on_one_thread():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        assert kernels.shard_count(None, 8, work=1e3) == 0  # too small to share
        assert kernels.shard_count(None, 1, work=1e9) == 1
        assert kernels.shard_count(None, 8, work=1e9) == 2
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        assert kernels.shard_count(None, 8, work=1e9) == 1


# ---------------------------------------------------------------- kernels the plan relies on

@pytest.mark.parametrize("pad, stride, dilation", [((2, 2), (1, 1), (1, 1)),
                                                   ((4, 2), (1, 1), (2, 1)),
                                                   ((1, 2), (2, 1), (1, 1))])
def test_one_gemm_convolutions_match_the_reference(pad, stride, dilation):
    """Many input rows (C*kh*kw >= 256): all images share a GEMM, gy read channel-major.
    A `same` geometry takes the flat kernels with the images back to back (what a tap
    reads across the top or bottom of one image is the next one's, masked)."""
    from convc.runtime import ops_numpy
    from convc.runtime.ops_numpy import NumpyBackend
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 12, 9, 8))
    w = rng.standard_normal((20, 12, 5, 5))  # 300 rows; gy too large for the turned-kernel path
    backend = NumpyBackend()
    args = (stride, pad, dilation)
    assert ops_numpy.same_flat(x.shape, (5, 5), *args) == (stride == (1, 1))
    y = backend.conv2d(x, w, *args)
    np.testing.assert_allclose(y, reference.conv2d(x, w, *args), rtol=1e-10, atol=1e-10)
    gy_cm = rng.standard_normal((20, 3) + y.shape[2:])  # (O, N, Ho, Wo) memory, as dz is kept
    gy = gy_cm.transpose(1, 0, 2, 3)
    dx = backend.conv2d_grad_input(gy, w, x.shape, *args)
    dx_ref = reference.conv2d_grad_input(gy, w, x.shape, *args)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-10, atol=1e-10)
    # the general kernel too (the backend takes a kept plan at this small size)
    dx = ops_numpy.conv2d_grad_input(np, gy, w, x.shape, *args, ws=ops_numpy.Workspace())
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-10, atol=1e-10)
    dw = backend.conv2d_grad_weight(x, gy, w.shape, *args)
    np.testing.assert_allclose(dw, reference.conv2d_grad_weight(x, gy, w.shape, *args),
                               rtol=1e-10, atol=1e-10)
    assert ops_numpy.ONE_GEMM_ROWS <= 300
    if stride == (1, 1):
        assert gy.size * 25 * gy.itemsize > ops_numpy.FLIP_BYTES


# ---------------------------------------------------------------- weight gradients shared

def _channel_group_case(dtype, seed=0):
    """A weight gradient that takes the channel-group path (T*N*H*W >= 4096), in pieces."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((16, 64, 16, 16)).astype(dtype)
    gy = np.ascontiguousarray(rng.standard_normal((8, 16, 16, 16)).astype(dtype))
    return x, gy.transpose(1, 0, 2, 3), (8, 64, 3, 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_gradient_pieces_taken_by_an_idle_thread_give_the_same_bits(dtype):
    """A shard thread that is done takes pieces of another's weight gradient (kernels.Crew):
    both threads run some, and the result is the one-thread result to the bit."""
    import threading
    import time

    from convc.runtime import ops_numpy

    x, gy, w_shape = _channel_group_case(dtype)
    args = ((1, 1), (1, 1), (1, 1))
    alone = ops_numpy.conv2d_grad_weight(np, x, gy, w_shape, *args, ws=ops_numpy.Workspace())
    crew = kernels.Crew(2)
    ran = []
    owner = threading.get_ident()

    def share(pieces, ws):
        def tagged(run):
            def go(work):
                ran.append(threading.get_ident())
                if threading.get_ident() == owner:
                    time.sleep(0.02)  # the owner is slow: the helper must take some
                run(work)
            return go
        crew.share([tagged(p) for p in pieces], ws)

    helper = threading.Thread(target=crew.help, args=(ops_numpy.Workspace(),))
    helper.start()
    shared = ops_numpy.conv2d_grad_weight(np, x, gy, w_shape, *args,
                                          ws=ops_numpy.Workspace(), share=share)
    crew.help(ops_numpy.Workspace())  # the owner's shard is done too: the helper may leave
    helper.join(timeout=10)
    assert not helper.is_alive()
    assert len(ran) >= 3 and owner in ran and set(ran) - {owner}, ran
    assert np.array_equal(shared, alone)
    np.testing.assert_allclose(alone, reference.conv2d_grad_weight(x, gy, w_shape, *args),
                               rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-3)


def test_a_thread_ahead_takes_open_pieces_of_the_one_behind():
    """Having done its own pieces, a thread takes another shard's open ones before going on
    with its own shard (so the thread ahead gives time to the one behind, midway)."""
    import threading
    import time

    crew = kernels.Crew(2)
    started = threading.Event()
    ran_by = []

    def behind_piece(ws):
        ran_by.append(threading.current_thread().name)
        started.set()
        time.sleep(0.05)

    def behind():
        crew.share([behind_piece] * 8, None)
        crew.help(None)

    other = threading.Thread(target=behind, name="behind")
    other.start()
    assert started.wait(10)
    mine = []
    crew.share([lambda ws: mine.append(1)], None)  # returns once nothing is open
    assert mine == [1]
    assert threading.current_thread().name in ran_by  # it took some of the other's
    crew.help(None)
    other.join(timeout=10)
    assert not other.is_alive() and len(ran_by) == 8


def test_a_piece_that_fails_on_a_helper_raises_in_its_owner():
    import threading

    crew = kernels.Crew(2)
    started = threading.Event()

    def wait_then_help():
        started.wait(5)
        crew.help(None)

    def good(ws):
        started.set()  # the helper wakes while the owner is still in this piece...
        import time
        time.sleep(0.05)

    def bad(ws):  # ...and takes this one, from the back
        raise ValueError("piece failed")

    helper = threading.Thread(target=wait_then_help)
    helper.start()
    with pytest.raises(ValueError, match="piece failed"):
        crew.share([good, bad], None)
    crew.help(None)
    helper.join(timeout=10)
    assert not helper.is_alive()


def test_a_failing_shard_still_lets_the_others_finish():
    """A shard that raises does so at once, without waiting for the others to finish, and
    the others do not wait for it."""
    import threading

    from convc.runtime.ops_numpy import NumpyBackend

    crew = kernels.Crew(2)
    go = threading.Event()

    def boom(*args, backend=None):
        raise RuntimeError("shard failed")

    def fine(*args, backend=None):
        assert go.wait(10)  # still running when the other shard has failed
        crew.share([lambda ws: None] * 3, backend.workspace)
        return "ok"

    out = {}
    t = threading.Thread(target=lambda: out.setdefault("b", kernels._shard(crew, fine,
                                                                          NumpyBackend())))
    t.start()
    with pytest.raises(RuntimeError, match="shard failed"):
        kernels._shard(crew, boom, NumpyBackend())
    go.set()
    t.join(timeout=10)
    assert out == {"b": "ok"}


@pytest.mark.parametrize("zero", [0, 2, 5, 16])
def test_weight_gradient_skips_leading_zero_images(zero):
    """What a zero initial state h[t-1] contributes at t = 0 (leading all-zero images of a
    channel group) is skipped; the gradient still equals the reference."""
    from convc.runtime import ops_numpy

    x, gy, w_shape = _channel_group_case(np.float64, seed=1)
    x[:zero, 20:] = 0  # the state part of a concat(x, h[t-1]), zero at the first steps
    args = ((1, 1), (1, 1), (1, 1))
    assert ops_numpy._zero_images(np, x[:, 20:]) == zero
    assert ops_numpy._zero_images(np, x[:, :20]) == 0
    dw = ops_numpy.conv2d_grad_weight(np, x, gy, w_shape, *args, ws=ops_numpy.Workspace())
    np.testing.assert_allclose(dw, reference.conv2d_grad_weight(x, gy, w_shape, *args),
                               rtol=1e-10, atol=1e-10)
    if zero == 16:
        assert not dw[:, 20:].any()


def test_sharded_steps_that_share_weight_gradients_are_bitwise_reproducible():
    """Two BLAS threads, weight gradients big enough to be cut into pieces that either
    thread may run: which thread runs which piece changes from call to call, the bits
    do not."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from convc.runtime import ops_numpy

    mod = compile_text(peer_cell_text(dict(name="crew", N=4, T=8, Cin=2, H=16, hidden=30, k=3,
                                           layers=2)))
    params = random_params(mod, seed=11, dtype="float32")
    inputs, targets = random_batch(mod, N=4, T=8, seed=11, dtype="float32")
    pieces = []
    real = ops_numpy.conv2d_grad_weight

    def counting(*args, share=None, **kw):
        if share is not None:
            def counted(ps, ws):
                pieces.append(len(ps))
                share(ps, ws)
            return real(*args, share=counted, **kw)
        return real(*args, **kw)

    ops_numpy.conv2d_grad_weight = counting
    try:
        with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
            runs = [mod.loss_and_grad(params, inputs, targets) for _ in range(4)]
    finally:
        ops_numpy.conv2d_grad_weight = real
    assert pieces and max(pieces) >= 2, pieces  # the crew really had pieces to share
    for loss, grads, finals in runs[1:]:
        assert loss == runs[0][0]
        for name in grads:
            assert np.array_equal(grads[name], runs[0][1][name]), name

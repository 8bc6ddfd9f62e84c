"""convc.torch.Layer: a compiled model as a torch.nn.Module (convc/torch.py, docs/torch.md).

- torch.autograd.gradcheck passes in float64 on every example (shrunk) and
  std model, with respect to the parameters, the inputs and the initial
  states at once: so the input and initial-state cotangents equal finite
  differences too (gradcheck compares every gradient with central
  differences);
- the layer's backward pass is the generated vjp (the pullback of
  vjp_start), with bptt=, recompute=, poison mode and debug_nans;
- a PyTorch encoder, a Layer and a PyTorch head train under Adam to the
  losses and parameters of the same model written in PyTorch alone;
- docs/torch.md's example runs.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="convc.torch needs PyTorch "
                                            "(pip install 'convc[torch]')")

import convc.api as api  # noqa: E402
import convc.torch as ct  # noqa: E402
from convc.runtime import layouts  # noqa: E402
from helpers import (EXAMPLES, ROOT, STD_MODELS, assert_convc_leaves_out, one_blas_thread,  # noqa: E402,F401
                     random_params, run_docs_python,
                     shrink, std_model_path)

F64 = torch.float64
MODELS = [p.stem for p in EXAMPLES] + sorted(STD_MODELS)


def _load(name: str, **kw):
    if name in STD_MODELS:
        return api.load(std_model_path(name), text=STD_MODELS[name], vjp=True, **kw)
    path = next(p for p in EXAMPLES if p.stem == name)
    text = shrink(path.read_text(encoding="utf-8"), size=8, hidden=2)
    return api.load(path, text=text, vjp=True, **kw)


def _forecasts(mod) -> bool:
    """Whether some loop runs over an axis no input gives (forward needs steps=)."""
    in_axes = {mod.MODEL["axes"][n] for n in mod.MODEL["inputs"]}
    return any(loop["axis"] not in in_axes for loop in mod.MODEL["loops"])


def _case(mod, N=1, T=2, seed=0):
    """A float64 layer with noisy parameters, inputs and given initial states."""
    layer = ct.Layer(mod, dtype=F64)
    layer.load_convc_params(random_params(mod, seed=seed))
    g = torch.Generator().manual_seed(seed)
    inputs = {k: torch.rand((N, T) + tuple(s), generator=g, dtype=F64, requires_grad=True)
              for k, s in mod.MODEL["inputs"].items()}
    state = {k: (0.5 * torch.randn((N,) + tuple(s["shape"]), generator=g, dtype=F64))
             .requires_grad_() for k, s in mod.MODEL["states"].items() if s["init"] != "final"}
    return layer, inputs, state, (T if _forecasts(mod) else None)


@pytest.mark.parametrize("name", MODELS)
def test_gradcheck_parameters_inputs_and_initial_states(name):
    mod = _load(name)
    layer, inputs, state, steps = _case(mod)
    names = [n for n, _ in layer.named_convc_parameters()]
    keys = [f"params.{ct.torch_name(n)}" for n in names]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_convc_parameters()]
    n_p, n_i = len(params), len(inputs)

    def f(*args):
        given = dict(zip(keys, args[:n_p]))
        ins = dict(zip(inputs, args[n_p:n_p + n_i]))
        st = dict(zip(state, args[n_p + n_i:]))
        out, fin = torch.func.functional_call(layer, given, (ins,),
                                              dict(state=st, steps=steps, return_state=True))
        out = out if isinstance(out, dict) else {"": out}
        return tuple(out.values()) + tuple(fin.values())

    args = (*params, *inputs.values(), *state.values())
    # fast mode: random directions of every argument at once, central differences
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
    # and what the check differentiated is the model: the same outputs as forward()
    out, _ = mod.forward({n: p.detach().numpy() for n, p in zip(names, params)},
                         {k: v.detach().numpy() for k, v in inputs.items()},
                         state={k: v.detach().numpy() for k, v in state.items()} or None,
                         steps=steps)
    got = f(*args)
    for k, v in zip(out, got):
        np.testing.assert_array_equal(v.detach().numpy(), out[k])


TINY = """
import std

model tiny {
    \"\"\"A std ConvLSTM with peepholes, small enough for gradcheck's full Jacobians.\"\"\"
    input x: [1, 4, 4]
    l = ConvLSTM(hidden = 2, kernel = 3)
    h = l(x)
    output h
}
"""


def test_gradcheck_full_jacobians():
    """gradcheck's slow mode: every column of the Jacobian of the outputs and final states,
    by central differences, against every row by the layer's backward."""
    mod = api.load(std_model_path("tiny"), text=TINY, vjp=True)
    layer, inputs, state, _ = _case(mod, N=1, T=2, seed=2)
    keys = [f"params.{ct.torch_name(n)}" for n, _ in layer.named_convc_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_convc_parameters()]

    def f(*args):
        given = dict(zip(keys, args[:len(keys)]))
        out, fin = torch.func.functional_call(
            layer, given, (args[len(keys)],),
            dict(state=dict(zip(state, args[len(keys) + 1:])), return_state=True))
        return (out, *fin.values())

    assert torch.autograd.gradcheck(f, (*params, inputs["x"], *state.values()), eps=1e-6,
                                    atol=1e-8, rtol=1e-6)


def _grads(layer, inputs, state, steps, seed=3, **kw):
    """Gradients of <outputs, C> + <final states, S> through the layer's backward."""
    for p in layer.parameters():
        p.grad = None
    for t in (*inputs.values(), *state.values()):
        t.grad = None
    out, fin = layer(inputs, state=state, steps=steps, return_state=True, **kw)
    out = out if isinstance(out, dict) else dict(zip(layer.convc_module.MODEL["outputs"], [out]))
    g = torch.Generator().manual_seed(seed)
    C = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in out.items()}
    S = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in fin.items()}
    kept = [c.clone() for c in (*C.values(), *S.values())]
    total = sum((out[k] * C[k]).sum() for k in C) + sum((fin[k] * S[k]).sum() for k in S)
    total.backward()
    for a, b in zip(kept, (*C.values(), *S.values())):  # torch's tensors are never written
        assert torch.equal(a, b)
    return ({n: p.grad.clone() for n, p in layer.named_convc_parameters()},
            {k: v.grad.clone() for k, v in inputs.items()},
            {k: v.grad.clone() for k, v in state.items()}, C, S)


def _numpy(d):
    return {k: v.detach().numpy() for k, v in d.items()}


@pytest.mark.parametrize("name", ["encoder_forecaster", "std_convlstm"])
def test_backward_is_the_generated_vjp(name):
    mod = _load(name)
    layer, inputs, state, steps = _case(mod, N=2, T=3, seed=4)
    pg, ig, sg, C, S = _grads(layer, inputs, state, steps)
    want = mod.vjp(layer.convc_params(), _numpy(inputs), _numpy(C), state=_numpy(state),
                   state_cotangents=_numpy(S))
    for got, exp in zip((pg, ig, sg), want):
        assert set(got) == set(exp)
        for k in got:
            np.testing.assert_array_equal(got[k].numpy(), exp[k], err_msg=k)
    # a later call reuses the generated code's memory: what torch holds stays
    kept = {k: v.clone() for k, v in sg.items()}
    again = {k: v.detach().clone().requires_grad_() for k, v in state.items()}
    _grads(layer, inputs, again, steps, seed=5)
    assert all(torch.equal(kept[k], sg[k]) for k in kept)


@pytest.mark.parametrize("k", [0, 2, 3])
def test_vjp_start_cuts_the_batch_as_vjp_does(monkeypatch, k):
    """The layer's forward and backward are vjp_start and its pullback: on a batch cut
    into shards (k = 2, 3: in threads side by side) or run on one BLAS thread (k = 0),
    as vjp() runs it, they give vjp()'s products bit for bit."""
    from convc.runtime import kernels

    from helpers import random_batch, random_state, tree_bytes

    mod = _load("encoder_forecaster")
    params = random_params(mod, seed=9)
    inputs, _ = random_batch(mod, N=4, T=3, seed=9)
    state = {k_: v for k_, v in random_state(mod, N=4, seed=9).items()
             if mod.MODEL["states"][k_]["init"] != "final"}
    monkeypatch.setattr(kernels, "shard_count", lambda backend, n, work: k)
    out, fin, pullback = mod.vjp_start(params, inputs, state=state, steps=3)
    ref_out, ref_fin = mod.forward(params, inputs, state=state, steps=3)
    assert tree_bytes(out) == tree_bytes(ref_out) and tree_bytes(fin) == tree_bytes(ref_fin)
    rng = np.random.default_rng(9)
    C = {k_: rng.standard_normal(v.shape) for k_, v in out.items()}
    S = {k_: rng.standard_normal(v.shape) for k_, v in fin.items()}
    got = pullback(C, state_cotangents=S)
    want = mod.vjp(params, inputs, C, state=state, state_cotangents=S)
    assert all(tree_bytes(a) == tree_bytes(b) for a, b in zip(got, want))
    with pytest.raises(RuntimeError, match="has run"):
        pullback(C)
    _, _, unused = mod.vjp_start(params, inputs, state=state, steps=3)
    unused.close()  # its shards' memory goes back: the next call leases no new clone
    from convc.runtime import vjp as runtime_vjp
    from convc.runtime.model import default_backend

    idle = runtime_vjp._IDLE[id(default_backend())]
    before = len(idle)
    mod.vjp_start(params, inputs, state=state, steps=3)[2](C, state_cotangents=S)
    assert len(idle) == before


def test_options_pass_through_bptt_recompute_poison_debug_nans():
    path = next(p for p in EXAMPLES if p.stem == "stack")
    text = shrink(path.read_text(encoding="utf-8"), size=8, hidden=2)
    mod = api.load(path, text=text, vjp=True)
    layer, inputs, state, steps = _case(mod, N=2, T=4, seed=6)
    params = layer.convc_params()
    for options in ({}, {"bptt": 2}):
        layer.bptt = options.get("bptt")
        pg, ig, sg, C, S = _grads(layer, inputs, state, steps)
        want = mod.vjp(params, _numpy(inputs), _numpy(C), state=_numpy(state),
                       state_cotangents=_numpy(S), **options)
        for got, exp in zip((pg, ig, sg), want):
            for k in got:
                np.testing.assert_array_equal(got[k].numpy(), exp[k], err_msg=(options, k))
    layer.bptt = None
    full = _grads(layer, inputs, state, steps)
    for kw in ({"recompute": 2}, {"debug_nans": True}):
        other = ct.Layer(path, text=text, dtype=F64, **kw)
        other.load_convc_params(params)
        got = _grads(other, inputs, state, steps)
        for a, b in zip(got[:3], full[:3]):
            for k in a:
                np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-12, atol=1e-15,
                                           err_msg=(kw, k))
    from convc.runtime import kernels

    poisoned = ct.Layer(mod, dtype=F64, poison=True)
    poisoned.load_convc_params(params)
    seen = []
    real = kernels.empty

    def spy(*args, **kwargs):
        seen.append(kernels.poison_enabled())
        return real(*args, **kwargs)

    kernels.empty, before = spy, kernels.poison_enabled()
    try:
        got = _grads(poisoned, inputs, state, steps)
    finally:
        kernels.empty = real
    assert seen and all(seen) and kernels.poison_enabled() == before
    for a, b in zip(got[:3], full[:3]):
        for k in a:
            np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=("poison", k))


def test_float32_follows_float64():
    mod32 = api.load(std_model_path("std_convgru"), text=STD_MODELS["std_convgru"], vjp=True)
    layer64, inputs, state, steps = _case(mod32, N=2, T=3, seed=7)
    layer32 = ct.Layer(mod32, dtype=torch.float32)
    layer32.load_convc_params(layer64.convc_params())
    assert all(p.dtype == torch.float32 for p in layer32.parameters())
    out32 = layer32(inputs["x"].float())
    assert out32.dtype == torch.float32
    out32.sum().backward()
    out64 = layer64(inputs["x"])
    out64.sum().backward()
    np.testing.assert_allclose(out32.detach().numpy(), out64.detach().numpy(), rtol=1e-5,
                               atol=1e-6)
    for (n, a), (_, b) in zip(layer32.named_convc_parameters(), layer64.named_convc_parameters()):
        np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-3, atol=1e-5,
                                   err_msg=n)
    x64 = inputs["x"].detach().clone().requires_grad_()
    layer32(x64).sum().backward()  # float64 input into a float32 layer: torch converts back
    assert x64.grad.dtype == F64 and x64.grad.shape == x64.shape


def test_names_without_dots_and_the_mapping_back():
    mod = _load("stack")
    layer = ct.Layer(mod)
    names = sorted(mod.MODEL["params"])
    assert [n for n, _ in layer.named_convc_parameters()] == names
    torch_names = [n for n, _ in layer.named_parameters()]
    assert torch_names == [f"params.{n.replace('.', '__')}" for n in names]
    for (tname, p), name in zip(layer.named_parameters(), names):
        assert layer.convc_name(p) == layer.convc_name(tname) == name
        assert tuple(p.shape) == tuple(mod.MODEL["params"][name]["shape"])
    init = mod.init_params(seed=0)
    assert all(np.array_equal(layer.convc_params()[k], init[k]) for k in init)
    assert set(layer.state_dict()) == set(torch_names)
    with pytest.raises(KeyError, match="no parameter"):
        layer.convc_name("nope")
    with pytest.raises(ValueError, match="compiled without"):
        ct.Layer(api.load(next(p for p in EXAMPLES if p.stem == "seed")))
    with pytest.raises(TypeError, match="float32 or torch.float64"):
        ct.Layer(mod, dtype=torch.float16)


def test_importing_convc_does_not_import_torch():
    assert_convc_leaves_out("torch", "convc.torch", TINY)


# ---------------------------------------------------------------- against PyTorch alone

HIDDEN, SIZE, ENC = 3, 8, 2
LSTM = f"""
import std

model lstm {{
    \"\"\"A std ConvLSTM with peepholes; its hidden sequence is the output.\"\"\"
    input x: [{ENC}, {SIZE}, {SIZE}]
    l = ConvLSTM(hidden = {HIDDEN}, kernel = 3)
    h = l(x)
    output h
}}
"""


class TorchConvLSTM(torch.nn.Module):
    """The peer yardstick's cell written in PyTorch: one Conv2d over cat[x, h], gate order
    i, f, o, g, Hadamard peepholes (i, f on c[t-1], o on c[t])."""

    def __init__(self, cin, hidden, size):
        super().__init__()
        self.hidden = hidden
        self.conv = torch.nn.Conv2d(cin + hidden, 4 * hidden, 3, padding=1)
        for n in ("wci", "wcf", "wco"):
            setattr(self, n, torch.nn.Parameter(torch.zeros(1, hidden, size, size)))

    def forward(self, xs):
        N, T, _, H, W = xs.shape
        h = c = xs.new_zeros(N, self.hidden, H, W)
        hs = []
        for t in range(T):
            zi, zf, zo, zg = torch.split(self.conv(torch.cat([xs[:, t], h], 1)), self.hidden, 1)
            i = torch.sigmoid(zi + self.wci * c)
            f = torch.sigmoid(zf + self.wcf * c)
            c = f * c + i * torch.tanh(zg)
            h = torch.sigmoid(zo + self.wco * c) * torch.tanh(c)
            hs.append(h)
        return torch.stack(hs, 1)


class Net(torch.nn.Module):
    """A Conv2d per frame, a recurrent core, a 1x1 Conv2d head with a sigmoid."""

    def __init__(self, core):
        super().__init__()
        self.enc = torch.nn.Conv2d(1, ENC, 3, padding=1)
        self.core = core
        self.head = torch.nn.Conv2d(HIDDEN, 1, 1)

    def forward(self, x):
        N, T = x.shape[:2]
        e = torch.tanh(self.enc(x.flatten(0, 1))).unflatten(0, (N, T))
        h = self.core(e)
        return torch.sigmoid(self.head(h.flatten(0, 1))).unflatten(0, (N, T))


def test_adam_trains_a_mixed_model_as_pytorch_alone():
    torch.manual_seed(0)
    mod = api.load(std_model_path("lstm"), text=LSTM, vjp=True)
    ours = Net(ct.Layer(mod, dtype=F64)).double()
    theirs = Net(TorchConvLSTM(ENC, HIDDEN, SIZE)).double()
    params = random_params(mod, seed=8)  # peepholes and biases away from their zero start
    ours.core.load_convc_params(params)
    theirs.core.load_state_dict({k: torch.from_numpy(v) for k, v in
                                 layouts.to_torch_convlstm(params, mod, "l").items()})
    for part in ("enc", "head"):
        getattr(theirs, part).load_state_dict(getattr(ours, part).state_dict())
    g = torch.Generator().manual_seed(1)
    clips = torch.rand(2, 5, 1, SIZE, SIZE, generator=g, dtype=F64)
    x, y = clips[:, :-1], clips[:, 1:]
    optims = [torch.optim.Adam(m.parameters(), lr=0.01) for m in (ours, theirs)]
    losses = [[], []]
    for _ in range(20):
        for k, (m, opt) in enumerate(zip((ours, theirs), optims)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            opt.step()
            losses[k].append(loss.item())
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-10)
    assert losses[0][-1] < losses[0][0]  # it trained

    def rel(a, b):
        return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))

    trained = layouts.to_torch_convlstm(ours.core.convc_params(), mod, "l")
    core = theirs.core.state_dict()
    assert set(trained) == set(core)
    for k in trained:
        assert rel(torch.from_numpy(trained[k]), core[k]) <= 1e-10, k
    for part in ("enc", "head"):
        for k, v in getattr(theirs, part).state_dict().items():
            assert rel(getattr(ours, part).state_dict()[k], v) <= 1e-10, (part, k)
    moved = rel(torch.from_numpy(trained["conv.weight"]),
                torch.from_numpy(layouts.to_torch_convlstm(params, mod, "l")["conv.weight"]))
    assert moved > 1e-3  # the weights compared are not their starting values


# ---------------------------------------------------------------- docs/torch.md

def test_the_docs_example_runs():
    run_docs_python("torch.md", "convc.torch.Layer", ROOT)

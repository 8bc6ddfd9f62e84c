"""convc.chainer.Link: a compiled model as a Chainer Link (docs/chainer.md).

Chainer's own gradient_check.check_backward must pass on the Link in float64
for every example and std model, with respect to its parameters, inputs and
initial states, and must catch a wrong gradient; the input and initial-state
cotangents must equal central finite differences of the module's forward();
and a Chainer encoder, the Link and a Chainer head must train under
chainer.optimizers.Adam to the losses and parameters (1e-10 relative) of the
same model written in Chainer functions alone. The page's example must run.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from helpers import (EXAMPLES, ROOT, STD_MODELS, assert_convc_leaves_out, one_blas_thread,  # noqa: F401
                     random_batch, run_docs_python,
                     random_params, random_state, shrink, std_model_path)
from test_vjp import LEARNED

try:
    from convc.runtime._chainer_compat import import_chainer

    chainer = import_chainer()
except Exception as exc:  # noqa: BLE001 - any failure to import means: skip, saying why
    pytest.skip(f"convc.chainer needs Chainer 7.8.1 (pip install 'convc[chainer]'): {exc}",
                allow_module_level=True)

import chainer.functions as F  # noqa: E402
import chainer.links as L  # noqa: E402
from chainer import gradient_check  # noqa: E402

import convc.api as api  # noqa: E402
import convc.chainer as cch  # noqa: E402
from convc.runtime import layouts  # noqa: E402

MODELS = [p.stem for p in EXAMPLES] + sorted(STD_MODELS)
N, T = 2, 3


def _load(name: str):
    if name == "learned_start":  # a state whose start is a parameter
        return api.load(None, text=LEARNED, vjp=True)
    if name in STD_MODELS:
        return api.load(std_model_path(name), text=STD_MODELS[name], vjp=True)
    path = next(p for p in EXAMPLES if p.stem == name)
    return api.load(path, text=shrink(path.read_text(encoding="utf-8")), vjp=True)


def _startable(mod, state: dict) -> dict:
    """The states a caller may give: all but those started from another loop's final."""
    return {k: v for k, v in state.items() if mod.MODEL["states"][k]["init"] != "final"}


def _steps(mod, T_out: int):
    """steps= for a model with a loop over an axis no input gives, else None."""
    in_axes = {mod.MODEL["axes"][n] for n in mod.MODEL["inputs"]}
    return T_out if set(mod.MODEL["vjp"]["output_axes"].values()) - in_axes else None


def _setup(name: str, seed: int = 1):
    mod = _load(name)
    link = cch.Link(mod, dtype=np.float64, params=random_params(mod, seed=seed))
    inputs, _ = random_batch(mod, N=N, T=T, seed=seed)
    state = _startable(mod, random_state(mod, N=N, seed=seed))
    return mod, link, inputs, state


def _as_function(link, inputs: dict, state: dict, steps):
    """f(*inputs, *states) -> (*outputs, *final states): what check_backward calls."""
    inames, snames = list(inputs), list(state)

    def f(*args):
        out, fin = link(dict(zip(inames, args[:len(inames)])),
                        state=dict(zip(snames, args[len(inames):])), steps=steps)
        return tuple(out.values()) + tuple(fin.values())
    return f, tuple(inputs.values()) + tuple(state.values())


def _check(link, inputs, state, steps, seed=3):
    f, args = _as_function(link, inputs, state, steps)
    with chainer.no_backprop_mode():
        ys = f(*args)
    rng = np.random.default_rng(seed)
    gys = tuple(rng.standard_normal(y.shape) for y in ys)
    gradient_check.check_backward(f, args, gys, params=tuple(link.params()), eps=1e-6,
                                  atol=1e-8, rtol=1e-6, dtype=np.float64)


@pytest.mark.parametrize("name", MODELS + ["learned_start"])
def test_check_backward_passes_on_every_model(name):
    mod, link, inputs, state = _setup(name)
    assert len(list(link.params())) == len(mod.MODEL["params"])
    _check(link, inputs, state, _steps(mod, T))
    if name == "learned_start":  # from the learned start: its parameter's gradient
        _check(link, inputs, {}, _steps(mod, T))


def test_check_backward_catches_a_wrong_gradient(monkeypatch):
    mod, link, inputs, state = _setup("stack")
    product = cch._Apply._product

    def off(self, *args):  # one input cotangent 0.1% too large
        pc, ic, sc = product(self, *args)
        return pc, {k: 1.001 * v for k, v in ic.items()}, sc
    monkeypatch.setattr(cch._Apply, "_product", off)
    with pytest.raises(AssertionError, match="check_backward failed"):
        _check(link, inputs, state, _steps(mod, T))


@pytest.mark.parametrize("name", ["stack", "encoder_forecaster", "std_convgru"])
def test_input_and_state_cotangents_equal_finite_differences(name):
    mod, link, inputs, state = _setup(name, seed=4)
    steps = _steps(mod, T)
    rng = np.random.default_rng(5)
    mod_params = link.convc_params()
    out, fin = mod.forward(mod_params, inputs, state=state, steps=steps)
    C = {k: rng.standard_normal(v.shape) for k, v in out.items()}
    S = {k: rng.standard_normal(v.shape) for k, v in fin.items()}

    def f(inputs, state):
        o, s = mod.forward(mod_params, inputs, state=state, steps=steps)
        return sum(float(np.sum(o[k] * C[k])) for k in C) + \
            sum(float(np.sum(s[k] * S[k])) for k in S)

    xs = {k: chainer.Variable(v.copy()) for k, v in inputs.items()}
    ss = {k: chainer.Variable(v.copy()) for k, v in state.items()}
    o, s = link(xs, state=ss, steps=steps)
    total = sum(F.sum(o[k] * C[k]) for k in C) + sum(F.sum(s[k] * S[k]) for k in S)
    total.backward()
    assert abs(float(total.array) - f(inputs, state)) <= 1e-12 * abs(float(total.array))
    eps = 1e-6
    for where, got in (("inputs", xs), ("state", ss)):
        for k, var in got.items():
            u = rng.standard_normal(var.shape)
            point = dict(inputs=inputs, state=state)

            def at(sign):
                moved = dict(point[where], **{k: point[where][k] + sign * eps * u})
                return f(**dict(point, **{where: moved}))
            fd = (at(1) - at(-1)) / (2 * eps)
            an = float(np.sum(var.grad * u))
            assert var.grad.shape == var.shape and var.grad.dtype == np.float64
            assert abs(fd - an) <= 1e-6 * max(abs(an), 1.0), (where, k, fd, an)


def _same(a, b) -> bool:
    pa, pb = dict(a.namedparams()), dict(b.namedparams())
    return set(pa) == set(pb) and all(np.array_equal(pa[k].array, pb[k].array) for k in pa)


def test_names_forward_and_the_module_agree(tmp_path):
    mod, link, inputs, state = _setup("encoder_forecaster")
    assert link.names["enc1.W_x"] == "enc1__W_x" and link.names["W_out"] == "W_out"
    assert {"/" + c for c in link.names.values()} == {n for n, _ in link.namedparams()}
    with chainer.no_backprop_mode():
        out, fin = link(inputs, state=state, steps=T)
    want, wfin = mod.forward(link.convc_params(), inputs, state=state, steps=T)
    assert np.array_equal(out["pred"].array, want["pred"]) and set(fin) == set(wfin)
    assert all(np.array_equal(fin[k].array, wfin[k]) for k in wfin)
    with pytest.raises(ValueError, match="fc1.h starts from another loop"):
        link(inputs, state={"fc1.h": np.zeros((N, 3, 8, 8))}, steps=T)
    other = cch.Link(mod, dtype=np.float64, seed=7)
    assert not _same(other, link)
    other.load_convc_params(link.convc_params())
    assert _same(other, link)
    assert cch.chainer_name("params", taken={"params"}) == "params_"
    chainer.serializers.save_npz(tmp_path / "link.npz", link)  # under the Chainer names
    again = cch.Link(mod, dtype=np.float64, seed=8)
    chainer.serializers.load_npz(tmp_path / "link.npz", again)
    assert _same(again, link)


def test_float32_a_second_backward_and_no_double_backward():
    mod = _load("seed")
    link = cch.Link(mod)  # float32, the module's seeded initial values
    inputs, _ = random_batch(mod, N=2, T=3, dtype="float32")
    out, _ = link(inputs["x"])
    assert out["pred"].dtype == np.float32 and link.lstm__W.dtype == np.float32
    loss = F.sum(out["pred"])
    loss.backward()
    first = {k: v.grad.copy() for k, v in link.namedparams()}
    assert all(g.dtype == np.float32 for g in first.values())
    link.cleargrads()
    loss.backward()  # the pullback ran: the same product again, by vjp()
    assert all(np.allclose(v.grad, first[k], rtol=1e-5, atol=1e-7)
               for k, v in link.namedparams())
    out, _ = link(inputs["x"])
    with pytest.raises(NotImplementedError, match="first-order"):
        F.sum(out["pred"]).backward(enable_double_backprop=True)


# ------------------------------------------- a Chainer encoder + convc + head, under Adam

CORE = '''
import std

model core {
    """The recurrent core of a Chainer model: one std ConvLSTM, with peepholes."""
    input x: [2, 8, 8]
    lstm = ConvLSTM(hidden = 3, kernel = 3)
    h = lstm(x)
    output h
}
'''


def _per_frame(link, x):
    """A 2-D Chainer link applied to every frame of (N, T, C, H, W)."""
    n, t = x.shape[:2]
    y = link(F.reshape(x, (n * t,) + x.shape[2:]))
    return F.reshape(y, (n, t) + y.shape[1:])


class _Model(chainer.Chain):
    def __init__(self, core, rng):
        super().__init__()
        with self.init_scope():
            self.enc = L.Convolution2D(1, 2, ksize=3, pad=1,
                                       initialW=rng.normal(0, 0.5, (2, 1, 3, 3)),
                                       initial_bias=rng.normal(0, 0.1, 2))
            self.core = core
            self.head = L.Convolution2D(3, 1, ksize=1, initialW=rng.normal(0, 0.5, (1, 3, 1, 1)),
                                        initial_bias=np.zeros(1))

    def forward(self, x, y):
        h = self.core(_per_frame(self.enc, x))
        if isinstance(h, tuple):  # the convc Link: (outputs, final)
            h = h[0]["h"]
        return F.mean_squared_error(_per_frame(self.head, h), y)


class _ConvLSTM(chainer.Link):
    """Shi et al.'s ConvLSTM in Chainer functions: one convolution over concat(x, h) with
    gate order i, f, o, g, peepholes w_ci, w_cf on c[t-1] and w_co on the new c."""

    def __init__(self, state_dict):
        super().__init__()
        with self.init_scope():
            for k, v in state_dict.items():
                setattr(self, k.replace(".", "_"), chainer.Parameter(np.array(v)))

    def forward(self, x):
        n, t = x.shape[:2]
        hidden = self.wci.shape[1]
        h = c = np.zeros((n, hidden) + x.shape[3:])
        peep = {g: F.broadcast_to(getattr(self, "wc" + g), (n,) + self.wci.shape[1:])
                for g in "ifo"}
        hs = []
        for s in range(t):
            z = F.convolution_2d(F.concat([x[:, s], h], axis=1), self.conv_weight,
                                 self.conv_bias, pad=1)
            zi, zf, zo, zg = F.split_axis(z, 4, axis=1)
            i = F.sigmoid(zi + peep["i"] * c)
            f = F.sigmoid(zf + peep["f"] * c)
            c = f * c + i * F.tanh(zg)
            h = F.sigmoid(zo + peep["o"] * c) * F.tanh(c)
            hs.append(h)
        return F.stack(hs, axis=1)


def _close(a, b) -> bool:
    """Equal to 1e-10 relative to the larger magnitude in b."""
    return np.max(np.abs(np.asarray(a) - np.asarray(b))) <= 1e-10 * max(np.max(np.abs(b)), 1e-300)


def test_a_chainer_model_with_the_link_trains_like_one_written_in_chainer():
    mod = api.load(std_model_path("core"), text=CORE, vjp=True)
    rng = np.random.default_rng(0)
    start = random_params(mod, seed=3)
    with chainer.using_config("dtype", np.float64):  # the Chainer links' parameters too
        ours = _Model(cch.Link(mod, dtype=np.float64, params=start), np.random.default_rng(1))
        theirs = _Model(_ConvLSTM(layouts.to_torch_convlstm(start, mod, "lstm")),
                        np.random.default_rng(1))
    batches = [(rng.uniform(0, 1, (2, 3, 1, 8, 8)), rng.uniform(0, 1, (2, 3, 1, 8, 8)))
               for _ in range(20)]
    losses = {}
    for key, model in (("convc", ours), ("chainer", theirs)):
        opt = chainer.optimizers.Adam(alpha=0.01)
        opt.setup(model)
        losses[key] = []
        for x, y in batches:
            model.cleargrads()
            loss = model(x, y)
            loss.backward()
            opt.update()
            losses[key].append(float(loss.array))
    assert losses["convc"][-1] < 0.7 * losses["convc"][0]  # it learns
    assert _close(losses["convc"], losses["chainer"]), (losses["convc"], losses["chainer"])
    for a, b in ((ours.enc, theirs.enc), (ours.head, theirs.head)):
        assert _close(a.W.array, b.W.array) and _close(a.b.array, b.b.array)
    mapped = layouts.to_torch_convlstm(ours.core.convc_params(), mod, "lstm")
    for k, v in mapped.items():
        got = getattr(theirs.core, k.replace(".", "_")).array
        assert not _close(v, layouts.to_torch_convlstm(start, mod, "lstm")[k])  # it moved
        assert _close(v, got), k


def test_import_convc_does_not_import_chainer():
    assert_convc_leaves_out("chainer", "convc.chainer", CORE)


# ---------------------------------------------------------------- docs/chainer.md

def test_the_docs_example_runs(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    namespace = run_docs_python("chainer.md", "convc.chainer.Link", tmp_path)
    assert namespace["losses"][-1] < namespace["losses"][0]

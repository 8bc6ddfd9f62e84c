"""Optimizers, schedules and gradient clipping.

Expected values are computed here, by hand or from the formula written out
with Python scalars, never by running the optimizer a second time: a test
that compares the code with itself cannot find a wrong formula.
"""

import io
import math

import numpy as np
import pytest

from convc.errors import ConvcError
from convc.runtime import config
from convc.runtime.clip import (
    clip_by_global_norm,
    clip_by_value,
    clip_grads,
    clip_per_tensor_norm,
    global_norm,
)
from convc.runtime.optim import (
    SGD,
    Adam,
    ConstantLR,
    CosineLR,
    ReduceOnPlateau,
    RMSProp,
    StepLR,
    make_optimizer,
    make_schedule,
)

REL = 1e-12


def run_scalar(opt, grads_per_step, x0=1.0):
    """Run ``opt`` on one parameter holding a single number; return x after each step."""
    params = {"x": np.array([x0])}
    history = []
    for g in grads_per_step:
        opt.step(params, {"x": np.array([g])})
        history.append(float(params["x"][0]))
    return history


# -- optimizers against hand-computed updates -----------------------------------


def test_sgd_plain_by_hand():
    params = {"a": np.array([1.0, -2.0]), "b": np.array([[0.5]])}
    a_before = params["a"]
    opt = SGD(lr=0.1)
    opt.step(params, {"a": np.array([0.1, 0.2]), "b": np.array([[-0.3]])})
    # p - lr * g
    np.testing.assert_allclose(params["a"], [0.99, -2.02], rtol=REL)
    np.testing.assert_allclose(params["b"], [[0.53]], rtol=REL)
    opt.step(params, {"a": np.array([0.4, -0.1]), "b": np.array([[0.2]])})
    np.testing.assert_allclose(params["a"], [0.95, -2.01], rtol=REL)
    np.testing.assert_allclose(params["b"], [[0.51]], rtol=REL)
    assert params["a"] is a_before, "parameters must be updated in place"


def test_sgd_momentum_by_hand():
    # b1 = g1 = 1           x = 1    - 0.1 * 1    = 0.9
    # b2 = 0.9*1 + 2 = 2.9  x = 0.9  - 0.1 * 2.9  = 0.61
    # b3 = 0.9*2.9 - 1      x = 0.61 - 0.1 * 1.61 = 0.449
    history = run_scalar(SGD(lr=0.1, momentum=0.9), [1.0, 2.0, -1.0])
    assert history == pytest.approx([0.9, 0.61, 0.449], rel=REL)


def test_sgd_nesterov_by_hand():
    # step = g + 0.9 * b with b as in the momentum test
    # 1: b = 1,    step = 1 + 0.9       = 1.9    x = 1     - 0.19   = 0.81
    # 2: b = 2.9,  step = 2 + 0.9*2.9   = 4.61   x = 0.81  - 0.461  = 0.349
    # 3: b = 1.61, step = -1 + 0.9*1.61 = 0.449  x = 0.349 - 0.0449 = 0.3041
    history = run_scalar(SGD(lr=0.1, momentum=0.9, nesterov=True), [1.0, 2.0, -1.0])
    assert history == pytest.approx([0.81, 0.349, 0.3041], rel=REL)


def test_sgd_weight_decay_is_coupled_l2():
    # d = g + 0.1 * x
    # 1: d = 1 + 0.1       = 1.1    x = 1    - 0.11   = 0.89
    # 2: d = 2 + 0.1*0.89  = 2.089  x = 0.89 - 0.2089 = 0.6811
    history = run_scalar(SGD(lr=0.1, weight_decay=0.1), [1.0, 2.0])
    assert history == pytest.approx([0.89, 0.6811], rel=REL)


def test_adam_by_hand():
    lr, beta1, beta2, eps = 0.1, 0.9, 0.999, 1e-8
    grads = [1.0, -0.5, 2.0]
    expected = []
    x, m, v = 1.0, 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1 ** t)
        v_hat = v / (1 - beta2 ** t)
        x = x - lr * m_hat / (math.sqrt(v_hat) + eps)
        expected.append(x)
    # First step by hand: m_hat = 1, v_hat = 1, so x = 1 - 0.1 / (1 + 1e-8).
    assert expected[0] == pytest.approx(1 - 0.1 / (1 + 1e-8), rel=1e-15)
    history = run_scalar(Adam(lr=lr, betas=(beta1, beta2), eps=eps), grads)
    assert history == pytest.approx(expected, rel=REL)


def test_adam_weight_decay_adds_to_gradient():
    lr, beta1, beta2, eps, wd = 0.01, 0.8, 0.99, 1e-6, 0.5
    grads = [0.3, 0.1]
    expected = []
    x, m, v = 2.0, 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        d = g + wd * x
        m = beta1 * m + (1 - beta1) * d
        v = beta2 * v + (1 - beta2) * d * d
        x = x - lr * (m / (1 - beta1 ** t)) / (math.sqrt(v / (1 - beta2 ** t)) + eps)
        expected.append(x)
    opt = Adam(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd)
    assert run_scalar(opt, grads, x0=2.0) == pytest.approx(expected, rel=REL)


def test_rmsprop_by_hand():
    # 1: s = 0.1 * 1 = 0.1            x = 1 - 0.01 * 1 / (sqrt(0.1) + 1e-8)
    # 2: s = 0.9*0.1 + 0.1*4 = 0.49   x -= 0.01 * 2 / (0.7 + 1e-8)
    x1 = 1 - 0.01 / (math.sqrt(0.1) + 1e-8)
    x2 = x1 - 0.01 * 2 / (0.7 + 1e-8)
    history = run_scalar(RMSProp(lr=0.01, decay=0.9, eps=1e-8), [1.0, 2.0])
    assert history == pytest.approx([x1, x2], rel=REL)


def test_rmsprop_momentum_by_hand():
    lr, decay, eps, mom = 0.01, 0.9, 1e-8, 0.5
    # 1: s = 0.1,  b = 1 / (sqrt(0.1) + eps)          x = 1 - lr * b
    # 2: s = 0.49, b = 0.5 * b + 2 / (0.7 + eps)      x -= lr * b
    b1 = 1 / (math.sqrt(0.1) + eps)
    b2 = mom * b1 + 2 / (0.7 + eps)
    x1 = 1 - lr * b1
    x2 = x1 - lr * b2
    history = run_scalar(RMSProp(lr=lr, decay=decay, eps=eps, momentum=mom), [1.0, 2.0])
    assert history == pytest.approx([x1, x2], rel=REL)


@pytest.mark.parametrize("make", [lambda: SGD(0.1, momentum=0.9, weight_decay=0.1),
                                  lambda: Adam(0.1, weight_decay=0.1),
                                  lambda: RMSProp(0.1, momentum=0.9, weight_decay=0.1)],
                         ids=["sgd", "adam", "rmsprop"])
def test_grads_are_not_modified_and_float32_stays_float32(make):
    opt = make()
    params = {"w": np.ones((2, 3), dtype=np.float32)}
    grads = {"w": np.full((2, 3), 0.5, dtype=np.float32)}
    opt.step(params, grads)
    opt.step(params, grads)
    assert params["w"].dtype == np.float32
    assert np.all(grads["w"] == np.float32(0.5))


def test_step_requires_one_gradient_per_parameter():
    opt = SGD(0.1)
    with pytest.raises(ConvcError, match="no gradient for"):
        opt.step({"a": np.zeros(1), "b": np.zeros(1)}, {"a": np.zeros(1)})


# -- against PyTorch, when it is installed ---------------------------------------


def test_matches_torch_optim_in_float64():
    torch = pytest.importorskip("torch", reason="torch not installed; comparison skipped")
    rng = np.random.default_rng(0)
    shapes = {"enc.W": (3, 2, 3, 3), "enc.b": (3,), "dec.W": (1, 3, 1, 1)}
    start = {name: rng.standard_normal(shape) for name, shape in shapes.items()}
    grads_per_step = [{name: rng.standard_normal(shape) for name, shape in shapes.items()}
                      for _ in range(5)]
    cases = [
        (SGD(0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
         lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True,
                                    weight_decay=0.01)),
        (Adam(0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01),
         lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6,
                                     weight_decay=0.01)),
        (RMSProp(0.01, decay=0.9, eps=1e-8, momentum=0.5, weight_decay=0.01),
         lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.9, eps=1e-8, momentum=0.5,
                                        weight_decay=0.01)),
    ]
    for ours, make_torch in cases:
        params = {name: value.copy() for name, value in start.items()}
        torch_params = {name: torch.tensor(value, dtype=torch.float64, requires_grad=True)
                        for name, value in start.items()}
        theirs = make_torch([torch_params[name] for name in sorted(torch_params)])
        for grads in grads_per_step:
            ours.step(params, grads)
            for name, tp in torch_params.items():
                tp.grad = torch.tensor(grads[name], dtype=torch.float64)
            theirs.step()
        for name in shapes:
            np.testing.assert_allclose(params[name], torch_params[name].detach().numpy(),
                                       rtol=1e-12, atol=1e-12, err_msg=type(ours).__name__)


# -- state dict ----------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: SGD(0.1, momentum=0.9, nesterov=True),
                                  lambda: Adam(0.05),
                                  lambda: RMSProp(0.01, momentum=0.5)],
                         ids=["nesterov", "adam", "rmsprop"])
def test_state_dict_roundtrip_continues_identically(make):
    rng = np.random.default_rng(1)
    params = {"b": rng.standard_normal(4), "a": rng.standard_normal((2, 2))}
    grads = [{name: rng.standard_normal(p.shape) for name, p in params.items()}
             for _ in range(5)]
    first = make()
    for g in grads[:2]:
        first.step(params, g)

    # Through an npz file, as a checkpoint would store it.
    buffer = io.BytesIO()
    np.savez(buffer, **first.state_dict())
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as stored:
        state = {key: stored[key] for key in stored.files}
    second = make()
    second.load_state_dict(state)
    resumed = {name: p.copy() for name, p in params.items()}

    for g in grads[2:]:
        first.step(params, g)
        second.step(resumed, g)
    for name in params:
        assert params[name].tobytes() == resumed[name].tobytes()
    assert second.t == first.t == 5


def test_state_dict_is_a_copy():
    opt = Adam(0.1)
    params = {"w": np.ones(3)}
    opt.step(params, {"w": np.ones(3)})
    state = opt.state_dict()
    saved = state["m/w"].copy()
    opt.step(params, {"w": np.ones(3)})
    assert np.array_equal(state["m/w"], saved)
    assert state["t"].shape == () and int(state["t"]) == 1


def test_loading_another_optimizers_state_is_an_error():
    adam = Adam(0.1)
    adam.step({"w": np.ones(2)}, {"w": np.ones(2)})
    with pytest.raises(ConvcError, match="different optimizer"):
        SGD(0.1, momentum=0.9).load_state_dict(adam.state_dict())


# -- factory ---------------------------------------------------------------------


def test_make_optimizer_names():
    assert type(make_optimizer("sgd", 0.1)) is SGD
    momentum = make_optimizer("momentum", 0.1)
    assert momentum.momentum == 0.9 and not momentum.nesterov
    nesterov = make_optimizer("nesterov", 0.1, momentum=0.5)
    assert nesterov.nesterov and nesterov.momentum == 0.5
    assert make_optimizer("adam", 0.1, betas=(0.5, 0.6)).betas == (0.5, 0.6)
    assert make_optimizer("rmsprop", 0.1, decay=0.99).decay == 0.99


def test_make_optimizer_errors_list_valid_choices():
    with pytest.raises(ConvcError, match=r"valid names are \['adam', 'momentum'"):
        make_optimizer("adagrad", 0.1)
    with pytest.raises(ConvcError, match="valid options"):
        make_optimizer("adam", 0.1, momentum=0.9)
    with pytest.raises(ConvcError, match="lr"):
        make_optimizer("sgd", -1.0)
    with pytest.raises(ConvcError, match="nesterov"):
        SGD(0.1, nesterov=True)


# -- schedules -------------------------------------------------------------------


def test_constant_and_step_schedules():
    assert ConstantLR(0.3).lr_at(12345) == 0.3
    step = StepLR(1.0, step_size=10, gamma=0.5)
    assert [step.lr_at(s) for s in (0, 9, 10, 19, 20, 25)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_cosine_schedule():
    cosine = CosineLR(1.0, total_steps=100, min_lr=0.1)
    assert cosine.lr_at(0) == pytest.approx(1.0, rel=REL)
    assert cosine.lr_at(50) == pytest.approx(0.55, rel=REL)
    assert cosine.lr_at(25) == pytest.approx(0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2, rel=REL)
    assert cosine.lr_at(100) == pytest.approx(0.1, rel=REL)
    assert cosine.lr_at(1000) == pytest.approx(0.1, rel=REL)


def test_apply_sets_optimizer_lr():
    opt = SGD(1.0)
    schedule = StepLR(1.0, step_size=2, gamma=0.1)
    schedule.apply(opt, 5)
    assert opt.lr == pytest.approx(0.01, rel=REL)
    assert schedule.lr == opt.lr


def test_reduce_on_plateau():
    schedule = ReduceOnPlateau(1.0, factor=0.5, patience=2, min_lr=0.2)
    changes = [schedule.observe(m) for m in (1.0, 1.0, 1.1)]
    assert changes == [False, False, False] and schedule.lr_at(0) == 1.0
    assert schedule.observe(1.2) is True          # third bad observation > patience 2
    assert schedule.lr_at(7) == 0.5
    schedule.observe(0.9)                         # improvement resets the count
    for metric in (0.95, 0.95, 0.95):
        schedule.observe(metric)
    assert schedule.lr == 0.25
    for metric in (0.95, 0.95, 0.95):
        schedule.observe(metric)
    assert schedule.lr == 0.2                     # clamped at min_lr
    assert schedule.observe(float("nan")) is False

    resumed = ReduceOnPlateau(1.0, factor=0.5, patience=2, min_lr=0.2)
    resumed.load_state_dict(schedule.state_dict())
    assert (resumed.lr, resumed.best, resumed.num_bad) == (
        schedule.lr, schedule.best, schedule.num_bad)


def test_make_schedule():
    assert isinstance(make_schedule("cosine", 0.1, total_steps=10), CosineLR)
    assert make_schedule("step", 0.1, step_size=3).lr_at(3) == pytest.approx(0.01, rel=REL)
    with pytest.raises(ConvcError, match="valid names"):
        make_schedule("warmup", 0.1)
    with pytest.raises(ConvcError, match="valid options"):
        make_schedule("step", 0.1, step_size=3, patience=2)
    with pytest.raises(ConvcError, match="step_size"):
        make_schedule("step", 0.1)


# -- clipping --------------------------------------------------------------------


def flat(grads):
    return np.concatenate([grads[name].ravel().astype(np.float64) for name in sorted(grads)])


def cosine(u, v):
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def test_global_norm_by_hand():
    grads = {"a": np.array([3.0, 4.0]), "b": np.array([[12.0]])}
    assert global_norm(grads) == 13.0


def test_global_norm_accumulates_in_float64():
    # Each square (1e40) overflows float32; the norm itself does not.
    grads = {"w": np.full(4, 1e20, dtype=np.float32)}
    assert global_norm(grads) == pytest.approx(2e20, rel=1e-6)


def test_clip_by_global_norm_keeps_direction_and_hits_the_limit():
    rng = np.random.default_rng(2)
    grads = {"enc.W": rng.standard_normal((4, 3, 3, 3)), "enc.b": 10 * rng.standard_normal(4),
             "dec.W": 0.01 * rng.standard_normal((2, 4))}
    before = flat(grads)
    arrays = {name: g for name, g in grads.items()}
    clipped, norm = clip_by_global_norm(grads, 1.5)
    assert norm == pytest.approx(np.linalg.norm(before), rel=REL)
    assert all(clipped[name] is arrays[name] for name in arrays), "clipping is in place"
    assert cosine(before, flat(clipped)) == pytest.approx(1.0, abs=1e-12)
    assert global_norm(clipped) == pytest.approx(1.5, rel=REL)


def test_clip_by_global_norm_is_a_no_op_under_the_limit():
    grads = {"a": np.array([3.0, 4.0]), "b": np.array([[12.0]])}
    copies = {name: g.copy() for name, g in grads.items()}
    _, norm = clip_by_global_norm(grads, 13.5)
    assert norm == 13.0
    for name in grads:
        assert grads[name].tobytes() == copies[name].tobytes()


def test_clip_by_global_norm_leaves_non_finite_grads_alone():
    grads = {"a": np.array([np.inf, 1.0])}
    _, norm = clip_by_global_norm(grads, 1.0)
    assert math.isinf(norm)
    assert grads["a"][1] == 1.0


def test_clip_by_value():
    grads = {"a": np.array([-3.0, 0.5, 2.0])}
    clip_by_value(grads, 1.0)
    assert grads["a"].tolist() == [-1.0, 0.5, 1.0]


def test_per_tensor_norm_changes_direction():
    """Documented behaviour: each tensor is scaled on its own, so the direction changes."""
    grads = {"big": np.array([3.0, 4.0]), "small": np.array([0.1])}
    before = flat(grads)
    clip_per_tensor_norm(grads, 1.0)
    np.testing.assert_allclose(grads["big"], [0.6, 0.8], rtol=REL)
    assert grads["small"][0] == 0.1
    assert cosine(before, flat(grads)) < 1.0 - 1e-4


def test_clip_grads_dispatch():
    def fresh():
        return {"a": np.array([3.0, 4.0])}

    grads, norm = clip_grads(fresh(), None)
    assert norm == 5.0 and grads["a"].tolist() == [3.0, 4.0]
    grads, norm = clip_grads(fresh(), "global_norm", 1.0)
    assert norm == 5.0
    np.testing.assert_allclose(grads["a"], [0.6, 0.8], rtol=REL)
    grads, norm = clip_grads(fresh(), "value", 3.5)
    assert norm == 5.0 and grads["a"].tolist() == [3.0, 3.5]
    grads, norm = clip_grads(fresh(), "per_tensor_norm", 2.5)
    np.testing.assert_allclose(grads["a"], [1.5, 2.0], rtol=REL)
    with pytest.raises(ConvcError, match="valid methods"):
        clip_grads(fresh(), "norm", 1.0)
    with pytest.raises(ConvcError, match="positive"):
        clip_grads(fresh(), "global_norm", 0.0)


def test_the_settings_schema_names_what_the_runtime_has():
    from convc.runtime import optim
    from convc.runtime.clip import CLIP_METHODS
    from convc.spec import settings

    assert set(settings.OPTIMIZERS) == set(optim._OPTIMIZERS)
    assert set(settings.SCHEDULES) == set(optim._SCHEDULES)
    assert set(settings.CLIP_MODES) == {m for m in CLIP_METHODS if m}
    assert set(settings.TRAIN) == set(config.DEFAULTS)


@pytest.mark.parametrize("key,value", [("batch_size", 0), ("lr", float("nan")),
                                       ("clip", float("inf")), ("steps", 10 ** 400),
                                       ("optimizer", "sgdd"), ("momentum", -0.5),
                                       ("val_fraction", 1.0), ("seed", True)])
def test_train_refuses_what_the_schema_refuses(key, value):
    cfg = dict(config.DEFAULTS, **{key: value})
    with pytest.raises(ConvcError, match=f"^{key} must be "):
        config.check_config(cfg)

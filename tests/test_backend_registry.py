"""Backends declare what they can do, and are found by name (runtime/backend.py).

The registry lists the built-in backends and says which cannot be made here
and why; a name it does not know is an error naming the ones it does; a
class that breaks the protocol is refused when it is registered, naming
what it lacks; the runtime honours what a backend declares (no `out=`, no
batch shards); and the reference backend (runtime/backend_reference.py, the
worked example of docs/compiler.md's "Adding a backend") gives a compiled
model the numpy backend's loss and gradients to 1e-12 in float64.
"""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from convc import api
from convc.errors import BackendError
from convc.runtime import backend as registry
from convc.runtime import kernels
from convc.runtime.backend import (Backend, Capabilities, available_backends, backend_names,
                                   declared_capabilities, get_backend, register_backend)
from convc.runtime.backend_reference import ReferenceBackend
from convc.runtime.ops_numpy import NumpyBackend

from helpers import (EXAMPLES, STD_MODELS, load_example, load_text, one_blas_thread,  # noqa: F401
                      random_batch, random_params, std_model_path)


@pytest.fixture
def scratch_names():
    """Names a test registers, removed afterwards (the registry is process-wide)."""
    names: list[tuple[str, str]] = []
    yield names
    for name, device in names:
        registry.unregister_backend(name, device)


# ---------------------------------------------------------------- what is registered


def test_the_registry_lists_the_built_in_backends():
    assert {"numpy", "chainer", "reference"} <= set(backend_names("cpu"))
    assert {"numpy", "chainer"} <= set(backend_names("gpu"))
    assert "reference" not in backend_names("gpu")
    found = {(a.device, a.conv): a for a in available_backends()}
    for key in [("cpu", "numpy"), ("cpu", "reference")]:
        assert found[key].available and found[key].reason is None
    assert get_backend("cpu", "reference").name == "reference"


def test_a_missing_optional_package_is_unavailable_with_its_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    monkeypatch.setitem(sys.modules, "chainer", None)
    found = {(a.device, a.conv): a for a in available_backends()}
    assert not found[("gpu", "numpy")].available
    assert "pip install convc[gpu]" in found[("gpu", "numpy")].reason
    assert not found[("cpu", "chainer")].available
    assert "pip install convc[chainer]" in found[("cpu", "chainer")].reason
    assert found[("cpu", "numpy")].available


def test_an_unknown_name_is_an_error_naming_the_registered_ones():
    with pytest.raises(BackendError) as info:
        get_backend("cpu", "torch")
    message = str(info.value)
    assert "unknown convolution implementation 'torch'" in message
    for name in ("numpy", "chainer", "reference"):
        assert name in message
    with pytest.raises(BackendError, match=r"reference.*runs on cpu"):
        get_backend("gpu", "reference")
    with pytest.raises(BackendError, match="unknown device 'tpu'; choose one of cpu, gpu"):
        get_backend("tpu")


def test_capabilities_are_declared_without_making_the_backend(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # no GPU backend could be made
    gpu = declared_capabilities("gpu", "numpy")
    assert gpu.device == "gpu" and gpu.deterministic and not gpu.shards
    assert not declared_capabilities("gpu", "chainer").deterministic  # cuDNN
    cpu = declared_capabilities("cpu", "numpy")
    assert cpu.writes_out and cpu.shards and cpu.weight_gradient_layout == "channel-major"
    ref = declared_capabilities("cpu", "reference")
    assert not ref.writes_out and not ref.shards and ref.float64


def test_capabilities_reject_unknown_values():
    with pytest.raises(ValueError, match="device"):
        Capabilities(device="tpu")
    with pytest.raises(ValueError, match="weight_gradient_layout"):
        Capabilities(weight_gradient_layout="images-last")


# ---------------------------------------------------------------- the protocol at registration


class _NoWeightGradient(Backend):
    name = "half"
    xp = np

    def conv2d(self, x, w, stride, pad, dilation):
        return ReferenceBackend().conv2d(x, w, stride, pad, dilation)

    def conv2d_grad_input(self, gy, w, x_shape, stride, pad, dilation):
        return ReferenceBackend().conv2d_grad_input(gy, w, x_shape, stride, pad, dilation)

    def asnumpy(self, a):
        return np.asarray(a)


class _DuckTyped:
    """Not a Backend subclass: it has the methods but forgot asnumpy."""

    name = "duck"
    xp = np
    capabilities = Capabilities()
    conv2d = ReferenceBackend.conv2d
    conv2d_grad_input = ReferenceBackend.conv2d_grad_input
    conv2d_grad_weight = ReferenceBackend.conv2d_grad_weight
    asarray = Backend.asarray


class _ClaimsOut(ReferenceBackend):
    capabilities = Capabilities(writes_out=True)  # but its conv2d takes no out=


class _ClaimsShards(ReferenceBackend):
    capabilities = Capabilities(shards=True)  # but it cannot spawn


@pytest.mark.parametrize("cls, missing", [
    (_NoWeightGradient, "no method conv2d_grad_weight()"),
    (_DuckTyped, "no method asnumpy()"),
    (_ClaimsOut, "declares writes_out but conv2d() takes no out="),
    (_ClaimsShards, "declares shards but has no method spawn()"),
])
def test_a_class_that_breaks_the_protocol_is_refused_at_registration(cls, missing,
                                                                     scratch_names):
    with pytest.raises(BackendError, match=r"'broken' does not implement the backend "
                                           r"protocol .*" + missing.replace("(", r"\(")
                       .replace(")", r"\)")):
        register_backend("broken", cls)
    assert "broken" not in backend_names()


def test_a_lazy_factory_is_checked_when_it_is_first_imported(scratch_names):
    scratch_names.append(("lazy_half", "cpu"))
    register_backend("lazy_half", f"{__name__}:_NoWeightGradient")
    assert "lazy_half" in backend_names()
    with pytest.raises(BackendError, match=r"'lazy_half'.*no method conv2d_grad_weight"):
        get_backend("cpu", "lazy_half")


def test_what_a_factory_makes_is_checked_too(scratch_names):
    scratch_names.append(("no_xp", "cpu"))
    register_backend("no_xp", lambda: type("NoXp", (ReferenceBackend,), {"xp": None})())
    with pytest.raises(BackendError, match="no array module `xp`"):
        get_backend("cpu", "no_xp")


def test_a_registered_class_is_what_get_backend_makes(scratch_names):
    scratch_names.append(("ref2", "cpu"))
    register_backend("ref2", ReferenceBackend)
    assert type(get_backend("cpu", "ref2")) is ReferenceBackend
    assert "ref2" in backend_names("cpu")


# ---------------------------------------------------------------- capabilities are honoured


class _NoShards(NumpyBackend):
    """NumPy's convolution, declared unshardable."""

    capabilities = Capabilities(writes_out=True, shards=False)


def test_a_backend_declaring_no_shards_is_never_sharded():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        if kernels.shard_count(NumpyBackend(), 8, work=1e9) != 2:
            pytest.skip("fewer than two BLAS threads here: nothing would be sharded")
        assert kernels.shard_count(_NoShards(), 8, work=1e9) == 1
        assert kernels.shard_count(ReferenceBackend(), 8, work=1e9) == 1
        calls = []

        def fn(params, inputs, targets, state=None, bptt=None, backend=None):
            calls.append((len(inputs["x"]), backend))
            return 0.0, {}, {}

        backend = _NoShards()
        kernels.in_shards(fn, {}, {"x": np.zeros((8, 1))}, {}, backend=backend, work=1e9)
        assert calls == [(8, backend)]  # the whole batch, in this thread, on this backend


def test_a_sharding_backend_runs_its_shards_on_spawned_backends_of_its_own_kind():
    threadpoolctl = pytest.importorskip("threadpoolctl")

    class Mine(NumpyBackend):
        pass

    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        if kernels.shard_count(Mine(), 8, work=1e9) != 2:
            pytest.skip("fewer than two BLAS threads here: nothing would be sharded")
        seen = []

        def fn(params, inputs, targets, state=None, bptt=None, backend=None):
            seen.append((len(inputs["x"]), type(backend)))
            return 1.0, {"w": np.ones(2)}, {}

        main = Mine()
        kernels.in_shards(fn, {}, {"x": np.zeros((8, 1))}, {}, backend=main, work=1e9)
    assert sorted(seen, key=str) == [(4, Mine), (4, Mine)]


def test_a_backend_without_out_gets_its_result_copied_into_out():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 5, 5)), rng.standard_normal((4, 3, 3, 3))
    big = np.zeros((2, 6, 5, 5))
    geo = ((1, 1), (1, 1), (1, 1))
    got = kernels.conv2d(ReferenceBackend(), x, w, *geo, out=big[:, 1:5])  # conv2d has no out=
    assert got is not None and not big[:, 0].any() and not big[:, 5].any()
    np.testing.assert_allclose(big[:, 1:5], NumpyBackend().conv2d(x, w, *geo), rtol=1e-12)
    dx = np.zeros((2, 3, 5, 5))
    kernels.conv2d_grad_input(ReferenceBackend(), big[:, 1:5], w, x.shape[1:], *geo, out=dx)
    np.testing.assert_allclose(dx, NumpyBackend().conv2d_grad_input(big[:, 1:5], w, x.shape,
                                                                     *geo), rtol=1e-12)


# ---------------------------------------------------------------- the reference backend end to end


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _models():
    seed = next(p for p in EXAMPLES if p.stem == "seed")
    yield "seed", lambda: load_example(seed)
    for name in ("std_convlstm", "std_convgru"):
        yield name, (lambda n=name: load_text(STD_MODELS[n], name=std_model_path(n).name))


@pytest.mark.parametrize("name, load", list(_models()), ids=[n for n, _ in _models()])
def test_the_reference_backend_agrees_with_numpy_end_to_end(name, load):
    mod = load()
    params = random_params(mod, seed=3)
    inputs, targets = random_batch(mod, N=2, T=3, seed=3)
    ours = mod.loss_and_grad(params, inputs, targets, backend=get_backend("cpu", "numpy"))
    ref = mod.loss_and_grad(params, inputs, targets, backend=get_backend("cpu", "reference"))
    assert _rel(ref[0], ours[0]) <= 1e-12
    assert set(ref[1]) == set(ours[1]) == set(params)
    for p in params:
        assert ref[1][p].dtype == np.float64
        assert _rel(ref[1][p], ours[1][p]) <= 1e-12, p
    out_ours, _ = mod.forward(params, inputs, backend=get_backend("cpu", "numpy"))
    out_ref, _ = mod.forward(params, inputs, backend=get_backend("cpu", "reference"))
    for k in out_ours:
        assert _rel(out_ref[k], out_ours[k]) <= 1e-12, k


def test_the_cli_offers_every_registered_convolution():
    from convc import cli

    parser = cli.build_parser()
    args = parser.parse_args(["train", "model.cell", "--conv", "reference"])
    assert args.conv == "reference"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "model.cell", "--conv", "torch"])


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="cupy is installed")
def test_registering_the_gpu_backends_imports_no_cupy():
    assert "cupy" not in sys.modules
    declared_capabilities("gpu", "numpy")
    declared_capabilities("gpu", "chainer")
    assert "cupy" not in sys.modules


# ---------------------------------------------------------------- the compiler asks the target

CHANNEL_MAJOR = ".transpose(1, 2, 0, 3, 4)  # channel-major"


def test_the_plan_keeps_channel_major_values_only_for_a_backend_that_asks():
    """A stored cotangent feeding a weight gradient is laid out (C, T, N, H, W) when the
    target's capabilities say its weight-gradient GEMM reads it so (NumPy's), and plainly
    for one with no preference (the reference backend, or a declared Capabilities)."""
    seed = next(p for p in EXAMPLES if p.stem == "seed")
    text = seed.read_text(encoding="utf-8")
    numpy_mod = api.load(seed, text=text)
    assert declared_capabilities("cpu", "numpy").weight_gradient_layout == "channel-major"
    assert CHANNEL_MAJOR in numpy_mod.source
    for target in (("cpu", "reference"), Capabilities()):
        plain = api.load(seed, text=text, target=target)
        assert CHANNEL_MAJOR not in plain.source
        params = random_params(plain, seed=5)
        inputs, targets = random_batch(plain, N=2, T=3, seed=5)
        ours = numpy_mod.loss_and_grad(params, inputs, targets)
        theirs = plain.loss_and_grad(params, inputs, targets)
        assert _rel(theirs[0], ours[0]) <= 1e-12
        for p in params:
            assert _rel(theirs[1][p], ours[1][p]) <= 1e-12, p


def test_an_unknown_compile_target_is_an_error_naming_the_registered_ones():
    seed = next(p for p in EXAMPLES if p.stem == "seed")
    with pytest.raises(BackendError, match="numpy"):
        api.load(seed, target=("cpu", "torch"))

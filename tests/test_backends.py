"""Tests of the convolution backends (runtime/backend.py and runtime/ops_*.py).

Every backend is checked three ways: against a naive loop implementation
that shares no code with im2col, as a vector-Jacobian product against a
finite difference of its own forward pass, and (when Chainer is installed)
against Chainer in float64.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convc.errors import BackendError
from convc.runtime import ops_numpy
from convc.runtime._chainer_compat import import_chainer
from convc.runtime.backend import conv2d_output_size, get_backend

# (x_shape, w_shape, stride, pad, dilation)
CASES = [
    pytest.param((2, 3, 6, 6), (4, 3, 3, 3), (1, 1), (1, 1), (1, 1), id="3x3-same"),
    pytest.param((2, 5, 4, 6), (3, 5, 1, 1), (1, 1), (0, 0), (1, 1), id="1x1"),
    pytest.param((2, 5, 5, 7), (3, 5, 1, 1), (2, 2), (0, 0), (1, 1), id="1x1-stride"),
    pytest.param((1, 2, 3, 3), (2, 2, 1, 1), (1, 1), (1, 1), (1, 1), id="1x1-pad"),
    pytest.param((2, 3, 7, 5), (4, 3, 2, 4), (1, 1), (1, 2), (1, 1), id="even-kernel"),
    pytest.param((2, 3, 9, 8), (2, 3, 3, 3), (2, 3), (1, 0), (1, 1), id="stride"),
    pytest.param((1, 2, 9, 10), (3, 2, 3, 2), (1, 1), (2, 1), (2, 3), id="dilation"),
    pytest.param((2, 3, 11, 9), (2, 3, 4, 3), (3, 2), (1, 2), (2, 1), id="all"),
    pytest.param((2, 3, 4, 5), (2, 3, 4, 5), (1, 1), (0, 0), (1, 1), id="kernel-fills-input"),
    pytest.param((1, 2, 8, 8), (2, 2, 3, 3), (3, 3), (0, 0), (1, 1), id="unreached-rows"),
]


# ---------------------------------------------------------------- reference


def _padded(x, pad):
    ph, pw = pad
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))


def reference_conv2d(x, w, stride, pad, dilation):
    """Loop over output pixels and kernel offsets; a (N, C) x (C, O) product at each."""
    n, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho = conv2d_output_size(h, kh, stride[0], pad[0], dilation[0])
    wo = conv2d_output_size(wd, kw, stride[1], pad[1], dilation[1])
    xpad = _padded(x, pad)
    y = np.zeros((n, o, ho, wo), dtype=x.dtype)
    for p in range(ho):
        for q in range(wo):
            for i in range(kh):
                for j in range(kw):
                    r = stride[0] * p + dilation[0] * i
                    c = stride[1] * q + dilation[1] * j
                    y[:, :, p, q] += xpad[:, :, r, c] @ w[:, :, i, j].T
    return y


def reference_grad_input(gy, w, x_shape, stride, pad, dilation):
    n, c_in, h, wd = x_shape
    _, _, kh, kw = w.shape
    _, _, ho, wo = gy.shape
    dxpad = np.zeros((n, c_in, h + 2 * pad[0], wd + 2 * pad[1]), dtype=gy.dtype)
    for p in range(ho):
        for q in range(wo):
            for i in range(kh):
                for j in range(kw):
                    r = stride[0] * p + dilation[0] * i
                    c = stride[1] * q + dilation[1] * j
                    dxpad[:, :, r, c] += gy[:, :, p, q] @ w[:, :, i, j]
    return dxpad[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + wd]


def reference_grad_weight(x, gy, w_shape, stride, pad, dilation):
    _, _, kh, kw = w_shape
    _, _, ho, wo = gy.shape
    xpad = _padded(x, pad)
    dw = np.zeros(w_shape, dtype=x.dtype)
    for p in range(ho):
        for q in range(wo):
            for i in range(kh):
                for j in range(kw):
                    r = stride[0] * p + dilation[0] * i
                    c = stride[1] * q + dilation[1] * j
                    dw[:, :, i, j] += gy[:, :, p, q].T @ xpad[:, :, r, c]
    return dw


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def numpy_backend():
    return get_backend("cpu", "numpy")


@pytest.fixture(scope="module")
def chainer_backend():
    if importlib.util.find_spec("chainer") is None:
        pytest.skip("chainer not installed")
    return get_backend("cpu", "chainer")


@pytest.fixture(scope="module")
def reference_backend():
    return get_backend("cpu", "reference")


@pytest.fixture(params=["numpy", "chainer", "reference"])
def backend(request):
    """Every CPU backend; the Chainer one is skipped where Chainer is missing."""
    return request.getfixturevalue(f"{request.param}_backend")


def _operands(x_shape, w_shape, stride, pad, dilation, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    ho = conv2d_output_size(x_shape[2], w_shape[2], stride[0], pad[0], dilation[0])
    wo = conv2d_output_size(x_shape[3], w_shape[3], stride[1], pad[1], dilation[1])
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    gy = rng.standard_normal((x_shape[0], w_shape[0], ho, wo)).astype(dtype)
    return rng, x, w, gy


# ---------------------------------------------------------------- against the loops


@pytest.mark.parametrize("x_shape, w_shape, stride, pad, dilation", CASES)
def test_matches_reference(backend, x_shape, w_shape, stride, pad, dilation):
    _, x, w, gy = _operands(x_shape, w_shape, stride, pad, dilation)
    args = (stride, pad, dilation)

    y = backend.conv2d(x, w, *args)
    np.testing.assert_allclose(y, reference_conv2d(x, w, *args), rtol=1e-12, atol=1e-12)

    dx = backend.conv2d_grad_input(gy, w, x_shape, *args)
    assert dx.shape == x_shape
    np.testing.assert_allclose(dx, reference_grad_input(gy, w, x_shape, *args),
                               rtol=1e-12, atol=1e-12)

    dw = backend.conv2d_grad_weight(x, gy, w_shape, *args)
    assert dw.shape == w_shape
    np.testing.assert_allclose(dw, reference_grad_weight(x, gy, w_shape, *args),
                               rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 2), c=st.integers(1, 3), o=st.integers(1, 3),
    kh=st.integers(1, 4), kw=st.integers(1, 4),
    sh=st.integers(1, 3), sw=st.integers(1, 3),
    ph=st.integers(0, 2), pw=st.integers(0, 2),
    dh=st.integers(1, 3), dw=st.integers(1, 3),
    extra_h=st.integers(0, 5), extra_w=st.integers(0, 5),
)
def test_random_shapes_match_reference(n, c, o, kh, kw, sh, sw, ph, pw, dh, dw,
                                       extra_h, extra_w):
    # Pick the input at least as large as the dilated kernel so the output is not empty.
    x_shape = (n, c, dh * (kh - 1) + 1 + extra_h, dw * (kw - 1) + 1 + extra_w)
    w_shape = (o, c, kh, kw)
    args = ((sh, sw), (ph, pw), (dh, dw))
    _, x, w, gy = _operands(x_shape, w_shape, *args)
    np.testing.assert_allclose(ops_numpy.conv2d(np, x, w, *args),
                               reference_conv2d(x, w, *args), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ops_numpy.conv2d_grad_input(np, gy, w, x_shape, *args),
                               reference_grad_input(gy, w, x_shape, *args),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ops_numpy.conv2d_grad_weight(np, x, gy, w_shape, *args),
                               reference_grad_weight(x, gy, w_shape, *args),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("which", ["numpy", "reference"])
@pytest.mark.parametrize("pad", [(0, 0), (1, 2)])
@pytest.mark.parametrize("kernel", [(1, 1), (3, 2)])
def test_non_contiguous_operands(request, which, kernel, pad):
    """Generated code passes views (splits, transposes); strides must be honoured."""
    numpy_backend = request.getfixturevalue(f"{which}_backend")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 7, 6)).transpose(0, 1, 3, 2)  # (2, 3, 6, 7), not C-order
    w = rng.standard_normal((4, 6) + kernel)[:, ::2]             # (4, 3, kh, kw), strided
    args = ((1, 1), pad, (1, 1))
    y = numpy_backend.conv2d(x, w, *args)
    np.testing.assert_allclose(y, reference_conv2d(x, w, *args), rtol=1e-12, atol=1e-12)
    gy = rng.standard_normal(y.shape[:2] + y.shape[:1:-1]).transpose(0, 1, 3, 2)
    np.testing.assert_allclose(numpy_backend.conv2d_grad_input(gy, w, x.shape, *args),
                               reference_grad_input(gy, w, x.shape, *args),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(numpy_backend.conv2d_grad_weight(x, gy, w.shape, *args),
                               reference_grad_weight(x, gy, w.shape, *args),
                               rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- as VJPs


def _rel_err(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


@pytest.mark.parametrize("x_shape, w_shape, stride, pad, dilation", CASES)
def test_gradients_are_vjps(backend, x_shape, w_shape, stride, pad, dilation):
    """<gy, (f(x + e*dx) - f(x - e*dx)) / 2e> == <grad_input(gy), dx>, and likewise for w."""
    rng, x, w, gy = _operands(x_shape, w_shape, stride, pad, dilation)
    args = (stride, pad, dilation)
    eps = 1e-3

    dx = rng.standard_normal(x_shape)
    finite = np.vdot(gy, backend.conv2d(x + eps * dx, w, *args)
                     - backend.conv2d(x - eps * dx, w, *args)) / (2 * eps)
    analytic = np.vdot(backend.conv2d_grad_input(gy, w, x_shape, *args), dx)
    assert _rel_err(finite, analytic) < 1e-8

    dw = rng.standard_normal(w_shape)
    finite = np.vdot(gy, backend.conv2d(x, w + eps * dw, *args)
                     - backend.conv2d(x, w - eps * dw, *args)) / (2 * eps)
    analytic = np.vdot(backend.conv2d_grad_weight(x, gy, w_shape, *args), dw)
    assert _rel_err(finite, analytic) < 1e-8


# ---------------------------------------------------------------- dtypes and layout


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_shape, w_shape, stride, pad, dilation", [CASES[0], CASES[1], CASES[7]])
def test_dtype_is_preserved(backend, dtype, x_shape, w_shape, stride, pad, dilation):
    _, x, w, gy = _operands(x_shape, w_shape, stride, pad, dilation, dtype=dtype)
    args = (stride, pad, dilation)
    results = [
        backend.conv2d(x, w, *args),
        backend.conv2d_grad_input(gy, w, x_shape, *args),
        backend.conv2d_grad_weight(x, gy, w_shape, *args),
    ]
    for result in results:
        assert result.dtype == dtype
        assert result.flags.c_contiguous
    if dtype == np.float32:
        np.testing.assert_allclose(results[0], reference_conv2d(x.astype(np.float64),
                                                                w.astype(np.float64), *args),
                                   rtol=1e-4, atol=1e-4)


def test_results_do_not_alias_inputs(numpy_backend):
    """The caller owns the result; writing into it must not change an operand."""
    _, x, w, gy = _operands((1, 4, 3, 3), (4, 4, 1, 1), (1, 1), (0, 0), (1, 1))
    args = ((1, 1), (0, 0), (1, 1))
    for result in (numpy_backend.conv2d(x, w, *args),
                   numpy_backend.conv2d_grad_input(gy, w, x.shape, *args),
                   numpy_backend.conv2d_grad_weight(x, gy, w.shape, *args)):
        for operand in (x, w, gy):
            assert not np.shares_memory(result, operand)


def test_shape_errors_are_value_errors(numpy_backend):
    x = np.zeros((1, 3, 5, 5))
    with pytest.raises(ValueError, match="channels"):
        numpy_backend.conv2d(x, np.zeros((2, 4, 3, 3)), (1, 1), (0, 0), (1, 1))
    with pytest.raises(ValueError, match="empty output"):
        numpy_backend.conv2d(x, np.zeros((2, 3, 7, 7)), (1, 1), (0, 0), (1, 1))
    with pytest.raises(ValueError, match="output gradient"):
        numpy_backend.conv2d_grad_input(np.zeros((1, 2, 4, 4)), np.zeros((2, 3, 3, 3)),
                                        x.shape, (1, 1), (0, 0), (1, 1))


# ---------------------------------------------------------------- against Chainer


@pytest.mark.parametrize("x_shape, w_shape, stride, pad, dilation", CASES)
def test_numpy_agrees_with_chainer(numpy_backend, chainer_backend, x_shape, w_shape, stride,
                                   pad, dilation):
    _, x, w, gy = _operands(x_shape, w_shape, stride, pad, dilation, seed=2)
    args = (stride, pad, dilation)
    pairs = [
        (numpy_backend.conv2d(x, w, *args), chainer_backend.conv2d(x, w, *args)),
        (numpy_backend.conv2d_grad_input(gy, w, x_shape, *args),
         chainer_backend.conv2d_grad_input(gy, w, x_shape, *args)),
        (numpy_backend.conv2d_grad_weight(x, gy, w_shape, *args),
         chainer_backend.conv2d_grad_weight(x, gy, w_shape, *args)),
    ]
    for ours, theirs in pairs:
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-10)


def test_chainer_import_patches_numpy(chainer_backend):
    chainer = import_chainer()
    assert chainer.__version__ == "7.8.1"
    assert "float" in np.sctypes  # put back for NumPy 2, the real one on NumPy 1


# ---------------------------------------------------------------- choosing a backend


def test_default_backend_is_numpy_on_cpu():
    backend = get_backend()
    assert backend.name == "numpy"
    assert backend.xp is np
    a = np.arange(3.0)
    assert backend.asnumpy(backend.asarray(a)) is a


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="cupy is installed")
def test_gpu_without_cupy_raises_backend_error():
    with pytest.raises(BackendError, match=r"pip install convc\[gpu\]"):
        get_backend("gpu")


def test_missing_cupy_is_a_backend_error(monkeypatch):
    # A None entry in sys.modules makes `import cupy` raise ImportError, installed or not.
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(BackendError, match=r"pip install convc\[gpu\]"):
        get_backend("gpu", "numpy")
    if importlib.util.find_spec("chainer") is not None:
        with pytest.raises(BackendError, match=r"pip install convc\[gpu\]"):
            get_backend("gpu", "chainer")


def _fake_cupy(device_count: int) -> types.ModuleType:
    """A stand-in `cupy` module that is NumPy underneath, for machines without a GPU."""
    fake = types.ModuleType("cupy")
    fake.__getattr__ = lambda name: getattr(np, name)  # PEP 562 module fallback
    fake.asnumpy = np.asarray
    fake.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: device_count))
    return fake


def test_cupy_backend_runs_the_shared_code_on_its_xp(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(device_count=1))
    backend = get_backend("gpu")
    assert backend.name == "cupy"
    assert backend.xp is sys.modules["cupy"]
    x_shape, w_shape, stride, pad, dilation = CASES[7].values
    _, x, w, gy = _operands(x_shape, w_shape, stride, pad, dilation)
    args = (stride, pad, dilation)
    np.testing.assert_allclose(backend.conv2d(x, w, *args), reference_conv2d(x, w, *args),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(backend.conv2d_grad_input(gy, w, x_shape, *args),
                               reference_grad_input(gy, w, x_shape, *args), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(backend.conv2d_grad_weight(x, gy, w_shape, *args),
                               reference_grad_weight(x, gy, w_shape, *args), rtol=1e-12, atol=1e-12)


def test_cupy_without_a_gpu_is_a_backend_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(device_count=0))
    with pytest.raises(BackendError, match="no GPU"):
        get_backend("gpu")


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="cupy not installed")
@pytest.mark.parametrize("x_shape, w_shape, stride, pad, dilation", CASES)
def test_cupy_agrees_with_numpy(numpy_backend, x_shape, w_shape, stride, pad, dilation):
    try:
        gpu = get_backend("gpu")
    except BackendError as exc:
        pytest.skip(str(exc))
    _, x, w, gy = _operands(x_shape, w_shape, stride, pad, dilation, seed=3)
    args = (stride, pad, dilation)
    xd, wd, gyd = gpu.asarray(x), gpu.asarray(w), gpu.asarray(gy)
    pairs = [
        (numpy_backend.conv2d(x, w, *args), gpu.conv2d(xd, wd, *args)),
        (numpy_backend.conv2d_grad_input(gy, w, x_shape, *args),
         gpu.conv2d_grad_input(gyd, wd, x_shape, *args)),
        (numpy_backend.conv2d_grad_weight(x, gy, w_shape, *args),
         gpu.conv2d_grad_weight(xd, gyd, w_shape, *args)),
    ]
    for ours, theirs in pairs:
        np.testing.assert_allclose(ours, gpu.asnumpy(theirs), rtol=1e-10, atol=1e-10)


def test_missing_chainer_is_a_backend_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "chainer", None)
    with pytest.raises(BackendError, match=r"pip install convc\[chainer\]"):
        get_backend("cpu", "chainer")


@pytest.mark.parametrize("device, conv", [("tpu", "numpy"), ("cpu", "torch"), ("GPU", "numpy")])
def test_unknown_names_raise_backend_error(device, conv):
    with pytest.raises(BackendError, match="unknown"):
        get_backend(device, conv)


def test_every_available_backend_satisfies_the_protocol_it_declares():
    """Methods, capabilities, and `out=` exactly where writes_out says (all registered)."""
    import inspect

    from convc.runtime.backend import available_backends, protocol_problems

    for entry in available_backends():
        if not entry.available:
            continue
        made = get_backend(entry.device, entry.conv)
        assert protocol_problems(made) == [], entry
        caps = made.capabilities
        assert caps.device == entry.device
        takes_out = "out" in inspect.signature(made.conv2d).parameters
        assert takes_out == caps.writes_out, (entry, "conv2d's out= and writes_out disagree")

"""The oneDNN backend (runtime/ops_onednn.py, `--conv onednn`).

oneDNN's primitives are checked with OnednnEveryShapeBackend (the per-shape
rule off, so every float32 convolution runs on oneDNN) against NumpyBackend:
forward, input and weight gradients to ~1e-5 relative in float32; float64
falls back to NumPy's code and equals it exactly; the same inputs on the same
thread count give the same bits run after run; and a compiled model trains
to the NumPy backend's losses.
"""

from __future__ import annotations

import numpy as np
import pytest

from convc.errors import BackendError
from convc.runtime import ops_onednn
from convc.runtime.backend import available_backends, backend_names, get_backend
from convc.runtime.ops_numpy import NumpyBackend

from helpers import one_blas_thread  # noqa: F401

try:
    ops_onednn.library()
except BackendError as exc:
    pytest.skip(f"libdnnl.so.3 is not loadable ({exc}); pip install 'convc[onednn]'",
                allow_module_level=True)

# (x_shape, w_shape, stride, pad, dilation)
SHAPES = [
    pytest.param((1, 3, 8, 9), (4, 3, 3, 3), (1, 1), (1, 1), (1, 1), id="3x3-same-b1"),
    pytest.param((3, 5, 11, 10), (6, 5, 3, 3), (2, 2), (1, 1), (1, 1), id="stride2-b3"),
    pytest.param((3, 4, 12, 12), (3, 4, 3, 3), (1, 1), (2, 2), (2, 2), id="dilation2"),
    pytest.param((3, 8, 7, 7), (5, 8, 1, 1), (1, 1), (0, 0), (1, 1), id="1x1-b3"),
    pytest.param((1, 8, 7, 6), (1, 8, 1, 1), (1, 1), (0, 0), (1, 1), id="1x1-head-b1"),
    pytest.param((3, 3, 9, 9), (4, 3, 5, 5), (2, 2), (2, 2), (1, 1), id="5x5-stride2"),
    pytest.param((1, 6, 10, 10), (8, 6, 5, 5), (1, 1), (2, 2), (1, 1), id="5x5-same-b1"),
    pytest.param((3, 4, 10, 11), (3, 4, 3, 2), (2, 1), (0, 1), (2, 1), id="mixed-unpadded"),
    pytest.param((1, 2, 8, 8), (2, 2, 3, 3), (3, 3), (0, 0), (1, 1), id="unreached-rows"),
]


@pytest.fixture(scope="module")
def onednn():
    return ops_onednn.OnednnEveryShapeBackend()


@pytest.fixture(scope="module")
def numpy_backend():
    return NumpyBackend()


def _operands(x_shape, w_shape, stride, pad, dilation, dtype, seed=0):
    from convc.runtime.backend import check_conv2d_shapes

    rng = np.random.default_rng(seed)
    ho, wo = check_conv2d_shapes(x_shape, w_shape, stride, pad, dilation)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    gy = rng.standard_normal((x_shape[0], w_shape[0], ho, wo)).astype(dtype)
    return x, w, gy


def _close(a, b, rtol=1e-5):
    scale = max(float(np.abs(b).max()), 1e-30)
    assert a.shape == b.shape and a.dtype == b.dtype
    assert float(np.abs(a - b).max()) <= rtol * scale


def _channel_major(a):
    """a's values with (O, N, H, W) memory, as generated code passes gy."""
    return np.ascontiguousarray(a.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)


def test_registered_and_available():
    assert "onednn" in backend_names("cpu")
    found = {(a.device, a.conv): a for a in available_backends()}
    assert found[("cpu", "onednn")].available, found[("cpu", "onednn")].reason
    b = get_backend("cpu", "onednn")
    assert isinstance(b, ops_onednn.OnednnBackend) and b.name == "onednn"
    assert b.capabilities.float64 and b.capabilities.writes_out and b.capabilities.deterministic
    assert type(b.spawn()) is ops_onednn.OnednnBackend


@pytest.mark.parametrize("x_shape, w_shape, stride, pad, dilation", SHAPES)
def test_float32_matches_numpy(onednn, numpy_backend, x_shape, w_shape, stride, pad, dilation):
    x, w, gy = _operands(x_shape, w_shape, stride, pad, dilation, np.float32)
    y = onednn.conv2d(x, w, stride, pad, dilation)
    _close(y, numpy_backend.conv2d(x, w, stride, pad, dilation))
    dx = onednn.conv2d_grad_input(_channel_major(gy), w, x_shape, stride, pad, dilation)
    _close(dx, numpy_backend.conv2d_grad_input(gy, w, x_shape, stride, pad, dilation))
    dw = onednn.conv2d_grad_weight(x, _channel_major(gy), w_shape, stride, pad, dilation)
    _close(dw, numpy_backend.conv2d_grad_weight(x, gy, w_shape, stride, pad, dilation))
    kinds = {key[0] for key in onednn.implementations()}
    assert kinds == {"fwd", "bwd_data", "bwd_weights"}  # oneDNN ran, not the fallback


@pytest.mark.parametrize("x_shape, w_shape, stride, pad, dilation", SHAPES[:4])
def test_out_is_written(onednn, numpy_backend, x_shape, w_shape, stride, pad, dilation):
    x, w, gy = _operands(x_shape, w_shape, stride, pad, dilation, np.float32, seed=1)
    expect_y = numpy_backend.conv2d(x, w, stride, pad, dilation)
    expect_dx = numpy_backend.conv2d_grad_input(gy, w, x_shape, stride, pad, dilation)
    out = np.full(expect_y.shape, np.nan, np.float32)
    assert onednn.conv2d(x, w, stride, pad, dilation, out=out) is out
    _close(out, expect_y)
    # a strided view of a larger buffer: written in place, the rest untouched
    big = np.full((x_shape[0], w_shape[0] + 2) + expect_y.shape[2:], 7.0, np.float32)
    view = big[:, 1:-1]
    assert onednn.conv2d(x, w, stride, pad, dilation, out=view) is view
    _close(big[:, 1:-1], expect_y)
    assert (big[:, 0] == 7).all() and (big[:, -1] == 7).all()
    dxo = np.full(x_shape, np.nan, np.float32)
    assert onednn.conv2d_grad_input(gy, w, x_shape, stride, pad, dilation, out=dxo) is dxo
    _close(dxo, expect_dx)


@pytest.mark.parametrize("x_shape, w_shape, stride, pad, dilation", SHAPES)
def test_float64_falls_back_to_numpy_exactly(x_shape, w_shape, stride, pad, dilation):
    onednn, ref = ops_onednn.OnednnEveryShapeBackend(), NumpyBackend()
    x, w, gy = _operands(x_shape, w_shape, stride, pad, dilation, np.float64, seed=2)
    gyc = _channel_major(gy)
    pairs = [
        (onednn.conv2d(x, w, stride, pad, dilation), ref.conv2d(x, w, stride, pad, dilation)),
        (onednn.conv2d_grad_input(gyc, w, x_shape, stride, pad, dilation),
         ref.conv2d_grad_input(gyc, w, x_shape, stride, pad, dilation)),
        (onednn.conv2d_grad_weight(x, gyc, w_shape, stride, pad, dilation),
         ref.conv2d_grad_weight(x, gyc, w_shape, stride, pad, dilation)),
    ]
    for a, b in pairs:
        assert a.dtype == np.float64
        assert np.array_equal(a, b)
    assert onednn.implementations() == {}  # no primitive was made


@pytest.mark.parametrize("nthreads", [1, 2])
def test_bitwise_deterministic(nthreads):
    from threadpoolctl import threadpool_limits

    x_shape, w_shape, stride, pad, dil = (4, 16, 16, 16), (32, 16, 5, 5), (1, 1), (2, 2), (1, 1)
    x, w, gy = _operands(x_shape, w_shape, stride, pad, dil, np.float32, seed=3)
    gyc = _channel_major(gy)
    with threadpool_limits(limits=nthreads):
        assert ops_onednn.threads() == nthreads
        runs = {"fwd": [], "bwd_data": [], "bwd_weights": []}
        for _ in range(20):
            b = ops_onednn.OnednnEveryShapeBackend()  # fresh primitives every time too
            runs["fwd"].append(b.conv2d(x, w, stride, pad, dil).tobytes())
            runs["bwd_data"].append(b.conv2d_grad_input(gyc, w, x_shape, stride, pad,
                                                        dil).tobytes())
            runs["bwd_weights"].append(b.conv2d_grad_weight(x, gyc, w_shape, stride, pad,
                                                            dil).tobytes())
        assert {key[-1] for key in b.implementations()} == {nthreads}
    for op, results in runs.items():
        assert len(set(results)) == 1, f"{op} differs between runs on {nthreads} threads"


def test_the_rule_is_fixed_by_shape_and_threads():
    r = ops_onednn.use_onednn
    assert r("bwd_data", (8, 16, 32, 32), (1, 16, 1, 1), (1, 1), (0, 0), (1, 1), 1)
    assert not r("bwd_data", (8, 16, 32, 32), (64, 16, 3, 3), (1, 1), (1, 1), (1, 1), 1)
    assert not r("fwd", (8, 16, 32, 32), (64, 16, 3, 3), (1, 1), (1, 1), (1, 1), 2)
    big = ((40, 128, 16, 16), (256, 128, 5, 5), (1, 1), (2, 2), (1, 1))
    assert r("bwd_weights", *big, 2) and not r("bwd_weights", *big, 1)


def test_missing_library_is_a_backend_error_naming_the_extra(monkeypatch):
    monkeypatch.setattr(ops_onednn, "_LIB", {})
    monkeypatch.setattr(ops_onednn, "_candidates", lambda: ["/nonexistent/libdnnl.so.3"])
    with pytest.raises(BackendError, match=r"pip install 'convc\[onednn\]'"):
        ops_onednn.OnednnBackend()


@pytest.mark.parametrize("every", [False, True], ids=["rule", "every-shape"])
def test_seed_model_trains_like_numpy(one_blas_thread, every):  # noqa: F811
    import convc
    from convc.runtime.bench import CONFIGS, _batch, peer_cell_text

    cfg = dict(CONFIGS["seed"], name="seed", N=2, T=5)
    mod = convc.load(None, text=peer_cell_text(cfg), target=("cpu", "onednn"))
    inputs, targets, _ = _batch(mod, cfg["N"], cfg["T"], None, 1, np.float32)
    backends = {"numpy": get_backend("cpu", "numpy"),
                "onednn": ops_onednn.OnednnEveryShapeBackend() if every
                else get_backend("cpu", "onednn")}
    losses = {}
    for name, b in backends.items():
        params = mod.init_params(seed=0, dtype="float32")
        losses[name] = [float(mod.sgd_step(params, inputs, targets, 0.5, backend=b))
                        for _ in range(4)]
    assert losses["numpy"][-1] < losses["numpy"][0]
    for a, b in zip(losses["onednn"], losses["numpy"]):
        assert abs(a - b) <= 1e-4 * abs(b)
    if every:
        assert {key[0] for key in backends["onednn"].implementations()} == \
            {"fwd", "bwd_data", "bwd_weights"}

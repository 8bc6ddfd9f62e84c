"""The fused kernels' GPU path, run on the CPU: a stand-in for CuPy whose RawModule
compiles each kernel's CUDA source (generated code's CUDA_KERNELS, with the dtype's
prelude of runtime/fused.py) as C++ with the system compiler, one loop over the
thread index in place of the launch grid, and runs it on NumPy arrays.

So the CUDA text itself is checked for what no nvcc compile shows: its indexing,
its argument order, the strides and broadcasting the launcher passes, the grid
it launches. For every example and the std ConvLSTM models, a fused module run
on the GPU backend (CuPy's, here NumPy underneath) computes the loss and the
gradients of the plain NumPy path (1e-12 of each value's size, float64), and
makes one launch per kernel call of the step. The stand-in's arrays count what
would wait for the device (a value read on the host): a training step, fused
or plain, reads one, its loss, at any number of steps. Skipped, saying why,
without a C++ compiler. (nvcc compiles the same kernels in
tests/test_fused_kernels.py.)
"""
from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

import convc.api as api
from convc.runtime import fused
from convc.runtime.backend import get_backend
from convc.runtime.gradcheck import random_problem
from helpers import EXAMPLES, STD_MODELS, shrink, std_model_path

CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) to emulate CUDA")

_BUILT: dict[str, object] = {}


class _Emulated:
    """A RawModule's `kernel`, compiled for the CPU: the launch is a loop over i."""

    def __init__(self, code: str, folder, launches: list):
        total = re.search(r"if \(i < n \* (\d+)\)", code)
        assert total, "the kernel's bound check is not where the emulation expects it"
        self.per_sample = int(total.group(1))
        src = code.replace("long i = (long)blockIdx.x * blockDim.x + threadIdx.x;",
                           f"for (long i = 0; i < n * {self.per_sample}; i++)")
        src = src.replace('extern "C" __global__', 'extern "C"').replace("static __device__",
                                                                        "static")
        src = "#include <math.h>\n" + src
        key = hashlib.sha256(src.encode()).hexdigest()[:16]
        if key not in _BUILT:
            c, so = folder / f"{key}.cpp", folder / f"{key}.so"
            c.write_text(src)
            subprocess.run([CXX, "-O1", "-shared", "-fPIC", str(c), "-o", str(so)], check=True,
                           capture_output=True)
            _BUILT[key] = ctypes.CDLL(str(so)).kernel
        self.fn = _BUILT[key]
        sig = re.search(r'extern "C" void kernel\(([^)]*)\)', src).group(1)
        self.types = [ctypes.c_void_p if "*" in p else ctypes.c_long for p in sig.split(", ")]
        self.launches = launches

    def __call__(self, grid, block, args):
        assert len(args) == len(self.types)
        n = int(args[0])
        assert grid[0] * block[0] >= n * self.per_sample > (grid[0] - 1) * block[0]
        values = [a.ctypes.data if isinstance(a, np.ndarray) else int(a) for a in args]
        self.fn(*[t(v) for t, v in zip(self.types, values)])
        self.launches.append(n)


class DeviceArray(np.ndarray):
    """The stand-in's device array: NumPy's, counting what would wait for the GPU (a
    value read on the host: float(), int(), bool(), .item(), .tolist())."""

    syncs: list = []

    def _host(self, what):
        DeviceArray.syncs.append(what)
        return np.asarray(self)

    def __float__(self):
        return float(self._host("float"))

    def __int__(self):
        return int(self._host("int"))

    def __bool__(self):
        return bool(self._host("bool"))

    def __index__(self):
        return self._host("index").__index__()

    def item(self, *args):
        return self._host("item").item(*args)

    def tolist(self):
        return self._host("tolist").tolist()


def _on_device(f):
    def made(*args, **kwargs):
        r = f(*args, **kwargs)
        return r.view(DeviceArray) if isinstance(r, np.ndarray) else r
    return made


def _fake_cupy(folder, launches: list) -> types.ModuleType:
    fake = types.ModuleType("cupy")
    fake.__getattr__ = lambda name: getattr(np, name)  # NumPy underneath
    for name in ("empty", "zeros", "zeros_like", "empty_like", "asarray", "ascontiguousarray",
                 "full", "ones", "array", "concatenate", "stack"):
        setattr(fake, name, _on_device(getattr(np, name)))

    def asnumpy(a):
        DeviceArray.syncs.append("asnumpy")
        return np.asarray(a)
    fake.asnumpy = asnumpy
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(
        getDeviceCount=lambda: 1, getDevice=lambda: 0))

    class RawModule:
        def __init__(self, code):
            self.code = code

        def get_function(self, name):
            assert name == "kernel"
            return _Emulated(self.code, folder, launches)

    fake.RawModule = RawModule
    return fake


@pytest.fixture
def gpu(monkeypatch, tmp_path_factory):
    launches: list = []
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(tmp_path_factory.mktemp("cuda"),
                                                        launches))
    return get_backend("gpu"), launches


MODELS = [(p.stem, p, shrink(p.read_text(encoding="utf-8"))) for p in EXAMPLES] + \
    [(name, std_model_path(name), STD_MODELS[name]) for name in sorted(STD_MODELS)
     if "LSTM" in name]


@pytest.mark.parametrize("name, path, text", MODELS, ids=[m[0] for m in MODELS])
def test_the_cuda_kernels_compute_what_the_numpy_path_does(gpu, name, path, text):
    backend, launches = gpu
    plain = api.load(path, text=text, fuse=False)
    fast = api.load(path, text=text, fuse=True)
    params, inputs, targets = random_problem(plain, batch=2, frames=4)
    la, ga, _ = plain.loss_and_grad(params, inputs, targets)
    K = fast.FK.of(np.float64, backend)
    assert isinstance(K.k0, fused.CudaKernel), "the GPU backend did not get the CUDA kernels"
    lb, gb, _ = fast.loss_and_grad_shard(params, inputs, targets, backend=backend)
    assert launches, f"{name}: no kernel launched"
    assert abs(la - lb) <= 1e-12 * max(abs(la), 1e-300), (name, la, lb)
    for k in ga:
        scale = max(float(np.max(np.abs(ga[k]))), 1e-300)
        err = float(np.max(np.abs(ga[k] - gb[k]))) / scale
        assert err <= 1e-12, f"{name}: gradient {k} differs by {err:.2e} on the GPU path"


def test_one_launch_per_kernel_call(gpu):
    """The launches of a step are the kernel calls the generated code makes: counted
    through the array kernels (the CPU) and as launches (the GPU path)."""
    backend, launches = gpu
    path = next(p for p in EXAMPLES if p.stem == "seed")
    fast = api.load(path, text=shrink(path.read_text(encoding="utf-8")), fuse=True)
    params, inputs, targets = random_problem(fast, batch=2, frames=5)
    calls = []

    class Counting:
        def __getattr__(self, name):
            def call(*arrays):
                calls.append(name)
                return getattr(fast.ArrayKernels, name)(*arrays)
            return call
    real = fast.FK
    fast.FK = types.SimpleNamespace(of=lambda dtype, b=None: Counting())
    fast.loss_and_grad_shard(params, inputs, targets, backend=get_backend("cpu", "numpy"))
    fast.FK = real
    fast.loss_and_grad_shard(params, inputs, targets, backend=backend)
    assert len(launches) == len(calls) >= 2 * 5 - 2, (len(launches), len(calls))


def test_the_launcher_refuses_what_the_kernel_cannot_take(gpu):
    backend, _ = gpu
    path = next(p for p in EXAMPLES if p.stem == "seed")
    fast = api.load(path, text=shrink(path.read_text(encoding="utf-8")), fuse=True)
    K = fast.FK.of(np.float32, backend)
    shape, nout, _ = fast.CUDA_KERNELS["k0"]
    nin = len(re.findall(r"const T \*in\d+", fast.CUDA_KERNELS["k0"][2].split("{")[0]))
    ok = [np.zeros((2, *shape), np.float32) for _ in range(nout + nin)]
    K.k0(*ok)
    with pytest.raises(TypeError, match="float64"):
        K.k0(*ok[:-1], ok[-1].astype(np.float64))
    with pytest.raises(ValueError, match="length"):
        K.k0(np.zeros((2, shape[0] + 1, *shape[1:]), np.float32), *ok[1:])


def test_gpu_check_runs_its_first_check_on_the_emulated_gpu(gpu, monkeypatch):
    """bench/gpu_check.py's float64 check, fused kernels on (as a user gets them), on the
    stand-in: the CUDA kernels run, and agree with NumPy and with the plain module."""
    import importlib.util
    from pathlib import Path

    backend, launches = gpu
    monkeypatch.setenv("CONVC_FUSE", "")  # the default a user has: fused where it can be
    path = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("convc_gpu_check_emulated", path)
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    f = gc.check_float64(backend)
    assert f["cuda_kernels"] and launches, f
    assert f["ok"], f


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("model", ["seed", "stack"])
def test_a_step_on_the_gpu_waits_for_the_device_once(gpu, model, fuse):
    """loss_and_grad on the GPU backend reads one value on the host, the loss at its end,
    at any T: nothing inside the time loops synchronises; and its kernel launches
    grow by the same count per step."""
    backend, launches = gpu
    path = next(p for p in EXAMPLES if p.stem == model)
    mod = api.load(path, text=shrink(path.read_text(encoding="utf-8")), fuse=fuse)
    seen = {}
    for T in (4, 8):
        params, inputs, targets = random_problem(mod, batch=2, frames=T)
        params = {k: v.view(DeviceArray) for k, v in params.items()}
        mod.loss_and_grad_shard(params, inputs, targets, backend=backend)  # warm-up
        DeviceArray.syncs.clear()
        launches.clear()
        mod.loss_and_grad_shard(params, inputs, targets, backend=backend)
        seen[T] = (list(DeviceArray.syncs), len(launches))
    assert seen[4][0] == seen[8][0] == ["float"], seen
    if fuse:
        assert seen[8][1] > seen[4][1] > 0 and (seen[8][1] - seen[4][1]) % 4 == 0, seen

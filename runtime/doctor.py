"""What convc is running on: one table for bug reports and CI logs.

`report()` answers the questions asked first when a number comes out wrong or
slow: which Python and NumPy, which BLAS with how many threads, whether CuPy
sees a GPU, and whether the optional oracles (Chainer, torch) import. Each row
is computed on its own and any failure becomes the row's text, so the doctor
works on exactly the broken installs it is meant to describe.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import sys
from typing import Callable

Row = tuple[str, str]


def _reason(exc: BaseException) -> str:
    """One line naming the exception, for a table cell."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _module_version(name: str) -> str:
    """Import `name` and give its version, or say why it cannot be used."""
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        if getattr(exc, "name", None) == name:
            return "not installed"
        return f"not available: {_reason(exc)}"
    except Exception as exc:  # a broken install can raise anything on import
        return f"not available: {_reason(exc)}"
    return str(getattr(module, "__version__", "installed (version unknown)"))


def _convc_version() -> str:
    import convc

    location = os.path.dirname(os.path.abspath(convc.__file__))
    return f"{convc.__version__} ({location})"


def _cpus() -> str:
    total = os.cpu_count()
    if hasattr(os, "sched_getaffinity"):
        return f"{len(os.sched_getaffinity(0))} usable of {total}"
    return str(total)


def _blas_from_threadpoolctl() -> list[Row] | None:
    """BLAS rows from threadpoolctl, or None when it is not installed."""
    try:
        import threadpoolctl
    except ImportError:
        return None
    import numpy  # noqa: F401  (loads the BLAS library so threadpoolctl sees it)

    libraries = [
        info for info in threadpoolctl.threadpool_info() if info.get("user_api") == "blas"
    ]
    if not libraries:
        return [("blas", "none found by threadpoolctl"), ("blas threads", "unknown")]
    names = []
    for info in libraries:
        name = f"{info.get('internal_api', '?')} {info.get('version') or ''}".strip()
        layer = info.get("threading_layer")
        names.append(f"{name} ({layer})" if layer and layer != "unknown" else name)
    threads = ", ".join(str(info.get("num_threads", "?")) for info in libraries)
    return [("blas", "; ".join(names)), ("blas threads", threads)]


def _blas_from_numpy() -> list[Row]:
    """BLAS rows from NumPy's build configuration (no thread count there)."""
    import numpy

    try:
        config = numpy.show_config(mode="dicts")  # NumPy >= 1.25
        blas = config["Build Dependencies"]["blas"]
        summary = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except TypeError:  # older NumPy: show_config() has no mode and only prints
        info = getattr(numpy.__config__, "blas_opt_info", {}) or {}
        summary = ", ".join(info.get("libraries", [])) or "unknown"
    return [("blas", f"{summary} (from numpy build config)"), ("blas threads", "unknown")]


def _blas() -> list[Row]:
    rows = _blas_from_threadpoolctl()
    return rows if rows is not None else _blas_from_numpy()


def _cupy() -> list[Row]:
    """CuPy version, and the first GPU with its CUDA versions when there is one."""
    version = _module_version("cupy")
    if version == "not installed" or version.startswith("not available"):
        return [("cupy", version), ("gpu", "none (no cupy)"), ("cuda", "none (no cupy)")]
    import cupy

    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError when no driver or no device
        reason = f"not available: {_reason(exc)}"
        return [("cupy", version), ("gpu", reason), ("cuda", reason)]
    if count == 0:
        return [("cupy", version), ("gpu", "none found"), ("cuda", "none found")]
    try:
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        gpu = f"{name} (1 of {count})" if count > 1 else name
    except Exception as exc:
        gpu = f"not available: {_reason(exc)}"
    try:
        runtime = cupy.cuda.runtime.runtimeGetVersion()
        driver = cupy.cuda.runtime.driverGetVersion()
        cuda = f"runtime {_cuda_version(runtime)}, driver {_cuda_version(driver)}"
    except Exception as exc:
        cuda = f"not available: {_reason(exc)}"
    return [("cupy", version), ("gpu", gpu), ("cuda", cuda)]


def _cuda_version(number: int) -> str:
    """CUDA encodes 12.4 as 12040."""
    return f"{number // 1000}.{(number % 1000) // 10}"


def _chainer() -> str:
    """Chainer through convc's compatibility shim, which patches it for NumPy 2."""
    if importlib.util.find_spec("chainer") is None:
        return "not installed"
    try:
        from convc.runtime._chainer_compat import import_chainer
    except ImportError:
        # Without the shim Chainer 7.8.1 does not import under NumPy 2, so only
        # say that it is installed.
        version = importlib.metadata.version("chainer")
        return f"{version} installed (not imported: convc.runtime._chainer_compat missing)"
    try:
        chainer = import_chainer()
    except Exception as exc:  # BackendError says what is wrong with the install
        return f"not available: {_reason(exc)}"
    return str(getattr(chainer, "__version__", "installed (version unknown)"))


def _onednn() -> str:
    """Whether the `--conv onednn` backend can be made here, with libdnnl's version."""
    from convc.errors import BackendError
    from convc.runtime import ops_onednn

    try:
        return f"available: oneDNN {ops_onednn.version()}"
    except BackendError as exc:
        return f"not available: {exc}"


def _fused() -> str:
    """Whether fused step kernels (fuse=True, `--fuse`) can be built here, and with what."""
    from convc.runtime import fused

    ok, how = fused.available()
    return f"available: {how}" if ok else f"not available: {how}"


def _safely(item: str, compute: Callable[[], str]) -> Row:
    try:
        return item, compute()
    except Exception as exc:
        return item, f"error: {_reason(exc)}"


def report() -> list[Row]:
    """(item, value) rows describing this installation. Never raises."""
    rows = [
        _safely("python", lambda: sys.version.split()[0]),
        _safely("python executable", lambda: sys.executable),
        _safely("convc", _convc_version),
        _safely("platform", platform.platform),
        _safely("cpus", _cpus),
        _safely("numpy", lambda: _module_version("numpy")),
    ]
    try:
        rows += _blas()
    except Exception as exc:
        rows += [("blas", f"error: {_reason(exc)}"), ("blas threads", "unknown")]
    rows += [
        _safely("lark", lambda: _module_version("lark")),
        _safely("networkx", lambda: _module_version("networkx")),
    ]
    try:
        rows += _cupy()
    except Exception as exc:
        error = f"error: {_reason(exc)}"
        rows += [("cupy", error), ("gpu", error), ("cuda", error)]
    rows += [
        _safely("chainer", _chainer),
        _safely("matplotlib", lambda: _module_version("matplotlib")),
        _safely("torch", lambda: _module_version("torch")),
        _safely("onednn", _onednn),
        _safely("fused kernels", _fused),
    ]
    return rows


def format_report(rows: list[Row]) -> str:
    """The rows as a two-column table, items left-aligned to the longest one."""
    width = max((len(item) for item, _ in rows), default=0)
    return "\n".join(f"{item:<{width}}  {value}" for item, value in rows)


if __name__ == "__main__":
    print(format_report(report()))

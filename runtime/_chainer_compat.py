"""Import Chainer 7.8.1 on a NumPy 2 environment.

Chainer's last release predates NumPy 2 and fails at import time on three
things that are gone or going:

- `numpy.sctypes`, removed in NumPy 2.0, is read at import time by
  `chainer.functions.array.as_strided`. We put back the dict it had
  (int/uint/float/complex/others lists).
- `numpy.distutils`, removed for Python >= 3.12, is imported by
  `chainer._environment_check` (it only uses it on macOS). Where it is
  missing we register a stub whose `system_info.get_info` finds nothing.
- `pkg_resources`, removed from recent setuptools, is imported by the same
  check to look up optional packages. Where it is missing we register a
  stub that reports every optional package as not installed.

Patches are applied only where the real thing is missing, before the first
`import chainer`. Every Chainer import in convc (tests included) goes through
`import_chainer()`, so this is the one place to look when Chainer breaks.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings

import numpy

from convc.errors import BackendError


def _sctypes() -> dict[str, list]:
    """The value `numpy.sctypes` had in NumPy 1.x on a 64-bit Linux."""
    return {
        "int": [numpy.int8, numpy.int16, numpy.int32, numpy.int64],
        "uint": [numpy.uint8, numpy.uint16, numpy.uint32, numpy.uint64],
        "float": [numpy.float16, numpy.float32, numpy.float64, numpy.longdouble],
        "complex": [numpy.complex64, numpy.complex128, numpy.clongdouble],
        "others": [bool, object, bytes, str, numpy.void],
    }


def _has_sctypes() -> bool:
    # NumPy 2 raises AttributeError from its module __getattr__ for removed names.
    try:
        numpy.sctypes
    except AttributeError:
        return False
    return True


def _stub_numpy_distutils() -> None:
    """Register an empty `numpy.distutils.system_info` if the real one cannot be imported."""
    if sys.modules.get("numpy.distutils") is not None:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import numpy.distutils.system_info  # noqa: F401
        return
    except ImportError:
        pass
    distutils = types.ModuleType("numpy.distutils")
    system_info = types.ModuleType("numpy.distutils.system_info")
    system_info.get_info = lambda name, notfound_action=0: {}
    distutils.system_info = system_info
    sys.modules["numpy.distutils"] = distutils
    sys.modules["numpy.distutils.system_info"] = system_info


def _stub_pkg_resources() -> None:
    """Register a `pkg_resources` that knows no distributions, if setuptools lacks it."""
    if importlib.util.find_spec("pkg_resources") is not None:
        return

    class ResolutionError(Exception):
        pass

    class DistributionNotFound(ResolutionError):
        pass

    class VersionConflict(ResolutionError):
        pass

    def require(*requirements):
        raise DistributionNotFound(requirements)

    stub = types.ModuleType("pkg_resources")
    stub.ResolutionError = ResolutionError
    stub.DistributionNotFound = DistributionNotFound
    stub.VersionConflict = VersionConflict
    stub.require = require
    stub.get_distribution = require
    sys.modules["pkg_resources"] = stub


def import_chainer():
    """Patch what Chainer 7.8.1 needs from old NumPy/setuptools, import it, and return it.

    Raises BackendError, saying what to install, if Chainer is not installed.
    """
    if sys.modules.get("chainer") is not None:
        return sys.modules["chainer"]
    if importlib.util.find_spec("chainer") is None:
        raise BackendError("the chainer convolution backend needs Chainer, which is not "
                           "installed; install it with `pip install convc[chainer]`")
    if not _has_sctypes():
        numpy.sctypes = _sctypes()
    _stub_numpy_distutils()
    _stub_pkg_resources()
    with warnings.catch_warnings():
        # Chainer's import-time environment check pulls in deprecated modules
        # (numpy.distutils, pkg_resources); their warnings say nothing about convc.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
        try:
            import chainer
        except ImportError as exc:
            raise BackendError(f"Chainer is installed but cannot be imported: {exc}; "
                               f"convc supports chainer==7.8.1 (`pip install convc[chainer]`)"
                               ) from exc
    return chainer

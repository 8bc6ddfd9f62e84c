"""The doctor names every item, and a missing or broken optional package is a
row of text, never an exception."""

import sys

from convc.runtime import doctor

EXPECTED_ITEMS = [
    "python",
    "python executable",
    "convc",
    "platform",
    "cpus",
    "numpy",
    "blas",
    "blas threads",
    "lark",
    "networkx",
    "cupy",
    "gpu",
    "cuda",
    "chainer",
    "matplotlib",
    "torch",
    "onednn",
    "fused kernels",
]


def _hide_modules(monkeypatch, *names):
    """Make importing `name` fail as if it were not installed.

    A None entry in sys.modules makes every import of that name raise
    ModuleNotFoundError, whichever import mechanism the doctor uses.
    """
    for loaded in list(sys.modules):
        if loaded.split(".")[0] in names:
            monkeypatch.delitem(sys.modules, loaded)
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


class _BrokenCupyFinder:
    """An import hook that fails the way CuPy does on a machine with a bad driver."""

    def find_spec(self, name, path=None, target=None):
        if name == "cupy":
            raise RuntimeError("CUDA driver version is insufficient")
        return None


def test_report_has_every_item_once():
    rows = doctor.report()
    items = [item for item, _ in rows]
    assert items == EXPECTED_ITEMS
    for item, value in rows:
        assert isinstance(value, str) and value, item


def test_report_values_for_required_packages():
    rows = dict(doctor.report())
    assert rows["python"] == sys.version.split()[0]
    assert rows["python executable"] == sys.executable
    import convc
    import numpy

    assert rows["convc"].startswith(convc.__version__)
    assert rows["numpy"] == numpy.__version__


def test_report_without_cupy(monkeypatch):
    _hide_modules(monkeypatch, "cupy")
    rows = dict(doctor.report())
    assert rows["cupy"] == "not installed"
    assert rows["gpu"].startswith("none")
    assert rows["cuda"].startswith("none")


def test_report_without_optional_packages(monkeypatch):
    _hide_modules(monkeypatch, "cupy", "torch", "matplotlib", "threadpoolctl", "chainer")
    rows = dict(doctor.report())
    assert [item for item in rows] == EXPECTED_ITEMS
    assert rows["chainer"] == "not installed"
    assert rows["torch"] == "not installed"
    assert rows["matplotlib"] == "not installed"
    assert rows["blas"].endswith("(from numpy build config)")


def test_broken_cupy_is_reported_not_raised(monkeypatch):
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenCupyFinder(), *sys.meta_path])
    rows = dict(doctor.report())
    assert rows["cupy"] == "not available: RuntimeError: CUDA driver version is insufficient"
    assert rows["gpu"].startswith("none")


def test_report_never_raises_when_a_probe_fails(monkeypatch):
    def broken():
        raise OSError("no /proc")

    monkeypatch.setattr(doctor, "_cpus", broken)
    monkeypatch.setattr(doctor, "_blas", broken)
    monkeypatch.setattr(doctor, "_cupy", broken)
    rows = dict(doctor.report())
    assert rows["cpus"] == "error: OSError: no /proc"
    assert rows["blas"] == "error: OSError: no /proc"
    assert rows["gpu"] == "error: OSError: no /proc"


def test_format_report_aligns_values():
    text = doctor.format_report([("python", "3.11"), ("blas threads", "2")])
    assert text.splitlines() == ["python        3.11", "blas threads  2"]
    assert doctor.format_report([]) == ""

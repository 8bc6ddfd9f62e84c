"""Shared test settings: the Hypothesis profiles, the fuzz case counter, and `--poison`.

Profiles (choose with `pytest --hypothesis-profile=NAME`):

- "default", the normal run (`make test`): Hypothesis' usual 100 examples a
  test, no deadline (a compile can take longer than 200 ms on a busy
  machine) and derandomized, so that CI runs the same cases every time.
- "fuzz" (`make fuzz`): 3500 examples a test and a fresh random seed each
  run. tests/test_fuzz.py shares three such budgets among its three tests
  (see `examples` there), 10,500 specs in all; under "default" they try 300.

Tests that count what they tried add to `fuzz_counter`; the total is printed
at the end of the run.

Models compile to the plain NumPy path here (CONVC_FUSE=0, also for the
commands tests run in subprocesses): the invariants record, the goldens and
the bitwise checks are of that path. tests/test_fused_loops.py and the tests
that pass fuse=True check the fused kernels against it.
"""
from __future__ import annotations

import collections
import os
import time

os.environ["CONVC_FUSE"] = "0"

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("default", deadline=None, derandomize=True, print_blob=True)
settings.register_profile(
    "fuzz", max_examples=3500, deadline=None, derandomize=False, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large])
settings.load_profile("default")

_FUZZ = collections.Counter()
_FUZZ_SECONDS = [0.0]


@pytest.fixture(scope="session")
def fuzz_counter() -> collections.Counter:
    """Counts the cases each fuzz test tried, by test name."""
    return _FUZZ


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    start = time.perf_counter()
    yield
    if "fuzz_counter" in getattr(item, "fixturenames", ()):
        _FUZZ_SECONDS[0] += time.perf_counter() - start


def pytest_terminal_summary(terminalreporter):
    if not _FUZZ:
        return
    total = sum(_FUZZ.values())
    parts = ", ".join(f"{name} {n}" for name, n in sorted(_FUZZ.items()))
    terminalreporter.write_line(f"fuzz: tried {total} specs ({parts}) in "
                                f"{_FUZZ_SECONDS[0]:.1f} s")


# ---------------------------------------------------------------- --poison
# `pytest --poison` runs every test with poison mode on: every buffer the
# generated code allocates starts as NaN, so a read before the first write
# changes a result and fails the test that checks it (`make test` runs the
# core tests a second time this way; see docs/reliability.md).

def pytest_addoption(parser):
    parser.addoption("--poison", action="store_true",
                     help="run with convc's poison mode on: every generated buffer starts "
                          "as NaN (results must not change)")


@pytest.fixture(scope="session", autouse=True)
def _poison_session(request):
    """Poison on before any fixture computes anything (module fixtures included)."""
    if not request.config.getoption("--poison"):
        yield
        return
    from convc.runtime import kernels

    kernels.set_poison(True)
    yield
    kernels.set_poison(False)


@pytest.fixture(autouse=True)
def _poison_each_test(request):
    """Poison back on after a test that switched it off. Tests that compare poison on
    and off themselves ask for a fixture named `poison` and start with it off."""
    if not request.config.getoption("--poison"):
        yield
        return
    from convc.runtime import kernels

    kernels.set_poison("poison" not in request.fixturenames)
    yield
    kernels.set_poison(True)

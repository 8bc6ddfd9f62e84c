"""The numbers the compiler refactor (issue 16) must keep: bitwise, on this machine.

tests/invariants/record-<BLAS architecture>.json holds, for 72 models (every example, shrunk, and
again with recompute=2; every standard cell in three small models; 50 random
models of the grammar of tests/test_random_models.py), the sha256 digests
(first 16 hex digits) of the exact bytes of the float64 parameters, the
forward outputs and final states, and the loss, every gradient and the final
states of `loss_and_grad` with full BPTT and with bptt=2; losses as
float.hex(). tests/record_invariants.py made it from the committed code before
the refactor (`recorded_from`) and says how. Each test here recomputes one
model with the current code and fails naming every quantity that differs
(`full.grad: enc1.W_x, ...`, `full.loss: OLD -> NEW`).

BLAS runs on the record's thread count (1): with 2 threads the larger GEMMs
of examples/shi2015 already give other bits. The digests hold for the
machine, NumPy and BLAS they were made with (`environment` in the record):
the test uses the record of this environment, and where none matches it
skips, saying so (make one as tests/record_invariants.py says, from the
committed code of a step the other records still pass).

Regenerating the record: never during the refactor, whose point is that these
bits do not move. Only for an intended numerical change (a fix, a new
kernel), with the reason in the commit message:

    CONVC_UPDATE_INVARIANTS=1 .venv/bin/python -m pytest -q tests/test_invariants.py

(or `python tests/record_invariants.py`) rewrites this machine's record from
the code in the tree, for the same models; commit it with the change that
moved the numbers, and regenerate the other machines' records on them.
"""
from __future__ import annotations

import json
import os

import pytest

import record_invariants as R

UPDATE = os.environ.get("CONVC_UPDATE_INVARIANTS") == "1"
RECORDS = R.records()
ENVIRONMENT = R.environment()
# This machine's record, else the first (its models are every record's models).
MATCH = [(path, rec) for path, rec in RECORDS if rec["environment"] == ENVIRONMENT]
PATH, RECORD = (MATCH or RECORDS)[0]
MODELS = RECORD["models"]


@pytest.fixture(autouse=True, scope="module")
def record_threads():
    """The record's BLAS thread count for the whole module (threadpoolctl needed)."""
    pytest.importorskip("threadpoolctl")
    with R.blas_limits(RECORD["blas_threads"]):
        yield


@pytest.fixture(scope="module")
def same_machine():
    if not MATCH:
        made = "; ".join(str(rec["environment"]) for _, rec in RECORDS)
        pytest.skip(f"no record for this environment ({ENVIRONMENT}); the records were made "
                    f"with {made}: bitwise equality is only promised on the same machine and "
                    "libraries")


@pytest.mark.skipif(not UPDATE, reason="set CONVC_UPDATE_INVARIANTS=1 to regenerate the record")
def test_update_record():
    R.write(R.record(RECORD["blas_threads"], MODELS), R.record_path(ENVIRONMENT))


@pytest.mark.skipif(UPDATE, reason="regenerating the record")
@pytest.mark.parametrize("entry", MODELS, ids=[m["name"] for m in MODELS])
def test_reproduces_record(entry, same_machine):
    try:
        got = R.compute(entry)
    except R.TextChanged as e:
        pytest.fail(f"{entry['name']}: {e}: the record no longer covers it (a changed "
                    "example is no numerical change; restore it or regenerate on purpose)")
    diff = R.differences(entry["digests"], got)
    if diff:
        pytest.fail(f"{entry['name']} differs from {PATH.relative_to(R.HERE)} in\n  "
                    + "\n  ".join(diff), pytrace=False)


def test_record_covers_the_models():
    """The record holds what issue 16 asks for: the examples, every std cell, 50 random
    models, each with its loss and gradients under full BPTT and bptt=2."""
    kinds = [m["kind"] for m in MODELS]
    assert kinds.count("example") >= 2 * 5 and kinds.count("random") == R.N_RANDOM
    names = {m["name"] for m in MODELS}
    assert {f"std/{c}/{v}" for c in R.STD_CELLS
            for v in ("next", "next_k1_state", "forecaster")} <= names
    for m in MODELS:
        keys = m["digests"]
        assert {"loss", "full.loss", "bptt2.loss"} <= set(keys), m["name"]
        assert any(k.startswith("full.grad.") for k in keys), m["name"]
        assert any(k.startswith("bptt2.grad.") for k in keys), m["name"]


def test_every_record_holds_the_same_models():
    """A record for another machine covers the same texts, so all of them test one thing."""
    def texts(rec):
        return [{k: v for k, v in m.items() if k != "digests"} for m in rec["models"]]

    for path, rec in RECORDS[1:]:
        assert texts(rec) == texts(RECORDS[0][1]), path.name

"""The op table (compiler/ops.py) holds every fact each stage needs, in one record per op.

- Every record passes `record_problems`: a primitive added without a fact
  some stage reads (a code template, a reference evaluation, the `into`
  form that keeps time loops from allocating, one VJP rule per input) fails
  here, naming the op and the fact.
- The checker can fail: records with a fact removed are reported.
- The facts are the ones the stages use: every op in the graphs of the
  examples has a record, the forward ops have a VJP for each input that
  needs one, and the `into` form computes what the code template does.
- The language's pointwise functions are the records marked `function`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from convc.compiler.ops import OPS, record_problems, table_problems, without_zeros, ZERO, ALIAS
from convc.runtime import kernels as K
from convc.runtime.backend import get_backend
from convc.spec.builtins import FUNCTIONS
from convc.api import compile_file

EXAMPLES = sorted(Path(__file__).resolve().parent.parent.joinpath("examples").glob("*.cell"))


def test_every_record_has_what_the_stages_need():
    assert table_problems() == []


@pytest.mark.parametrize("op, change, says", [
    ("tanh", dict(into=None), "time loops would allocate"),
    ("sigmoid", dict(ref=None), "no reference evaluation"),
    ("mul", dict(code=None), "no code template"),
    ("conv", dict(vjp=(None,)), "vjp has 1 rules for 2 inputs"),
    ("add", dict(terms=(1,)), "one sign"),
    ("slice", dict(into=lambda a, at, out: out), "a view has no buffer"),
    ("relu", dict(grad_from_output="relu"), "not an elementwise (y, g) op"),
    ("mse", dict(vjp=(None, None)), "gradient for its prediction only"),
])
def test_a_missing_fact_is_reported(op, change, says):
    broken = dataclasses.replace(OPS[op], **change)
    problems = record_problems(broken)
    assert any(says in p for p in problems), problems


def test_the_language_functions_are_the_function_records():
    pointwise = {n for n, op in OPS.items() if op.function}
    assert {"sigmoid", "tanh", "relu", "hard_sigmoid", "softplus"} <= pointwise
    assert pointwise <= set(FUNCTIONS)


def test_zero_rules():
    assert without_zeros(OPS["mul"], [True, False]) == (ZERO,)
    assert without_zeros(OPS["add"], [False, True]) == (ALIAS, 0)
    assert without_zeros(OPS["sub"], [False, True]) == (ALIAS, 0)
    assert without_zeros(OPS["sub"], [True, False]) == ("terms", [1])  # -y: not an alias
    assert without_zeros(OPS["addn"], [False, True, False]) == ("terms", [0, 2])
    assert without_zeros(OPS["tanh"], [True]) == (ZERO,)
    assert without_zeros(OPS["sigmoid"], [True]) is None  # sigmoid(0) = 0.5
    assert without_zeros(OPS["softplus"], [True]) is None  # log 2
    assert without_zeros(OPS["conv"], [False, True]) is None  # a zero kernel is not known


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_op_the_examples_use_has_its_facts(path):
    low = compile_file(path).lowered
    g = low.graph
    for nid in g.order():
        node = g.node(nid)
        assert node.op in OPS, nid
        op = OPS[node.op]
        if node.grad or op.source or not op.vjp:
            continue
        for i in range(len(node.inputs)):
            rule = op.vjp[0] if op.variadic else op.vjp[i]
            if rule is None:
                assert op.loss or i in op.shape_only, f"{nid}: {node.op} input {i}"


@pytest.mark.parametrize("name", sorted(n for n, op in OPS.items() if op.elementwise))
def test_into_computes_what_the_code_computes(name):
    op = OPS[name]
    rng = np.random.default_rng(len(name))
    n_args = 3 if op.variadic else op.arity
    args = [rng.uniform(0.1, 0.9, (2, 3, 4, 5)) for _ in range(n_args)]
    attrs = {"factor": -0.37} if name == "scale" else {}
    names = [f"a{i}" for i in range(n_args)]
    env = {"rt": K, "xp": np, "B": get_backend("cpu", "numpy"), "np": np}
    want = eval(op.code(names, attrs), env, dict(zip(names, args)))
    out = np.full_like(args[0], np.nan)
    got = eval(op.into_code(names, attrs, "out"), env, dict(zip(names, args), out=out))
    assert got is out
    np.testing.assert_allclose(out, want, rtol=1e-15, atol=0)
    for k in op.alias:  # writing over an operand it may alias gives the same
        moved = [a.copy() for a in args]
        local = dict(zip(names, moved), out=moved[k])
        eval(op.into_code(names, attrs, "out"), env, local)
        np.testing.assert_allclose(moved[k], want, rtol=1e-15, atol=0)

"""The generated code: safe buffers, source properties, determinism, imports, source comments.

(a) Buffers. Every name bound to `rt.empty(...)` (and every view of one,
    `h_prev = h_buf[t]`) is never the target of `+=` (nor is a subscript of
    it): a gradient is initialised by its first write, never accumulated
    into an uninitialised buffer. `xp.empty` / `np.empty` are never called
    directly, so poison mode (`rt.set_poison`) sees every buffer.
(b) Properties of the source, for every example and the std-cell models of
    helpers.STD_MODELS, checked on its syntax tree (the compiler's naming, memory
    plan and emission order may change; these may not):
    (b1) every bound name is from the spec or of a documented fixed pattern
         (compiler/naming.py), and the fraction of bare op counters (add_3,
         dadd_29, a model-level add_conv) is a ratchet that only falls
         (COUNTER_FRACTION);
    (b2) one statement per graph node: one call or operator on atoms a statement;
    (b3) nothing allocates inside a `for t` time loop (every call writes into an
         out=, truncated BPTT's cut included);
    (b4) a small structural golden, tests/golden/structure.json: the generated
         functions' signatures and the `.cell` lines each quotes. After a
         deliberate change, regenerate it with

             CONVC_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_codegen.py -k structure

         and review its diff like any other change.
    Each checker is shown flagging hand-written bad code. tests/test_loop_allocations.py
    counts what the time loops allocate when they run.
(c) Determinism. Two compiles give byte-identical source, IR text, DOT and
    JSON, also in fresh interpreters with different PYTHONHASHSEEDs.
(d) The generated module imports only numpy and convc.runtime.
(e) Every statement computed from the `.cell` source sits under a comment
    naming the `.cell` file and line it came from, and that comment quotes
    that line (every example and std-cell model).
(f) The generated forward pass and loss of every example agree with the
    reference interpreter (compiler/interp.py), which shares nothing with
    the generated code but the op table's reference evaluations.
"""
from __future__ import annotations

import ast
import difflib
import hashlib
import json
import linecache
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convc.api as api
from convc.compiler.interp import run_forward
from convc.compiler.ops import OPS
from convc.spec.loader import stdlib_dir
from helpers import one_blas_thread  # noqa: F401  (an autouse fixture)
from helpers import (EXAMPLES, GOLDEN, ROOT, STD_MODELS, example_ids, load_example,
                     random_batch, random_params, random_state, std_model_path)

_COMPILED: dict = {}


def compiled(path: Path):
    if path not in _COMPILED:
        _COMPILED[path] = api.compile_file(path)
    return _COMPILED[path]


def example(stem: str) -> Path:
    return next(p for p in EXAMPLES if p.stem == stem)


# ---------------------------------------------------------------- (a) buffers

_EMPTY_FUNCS = {"empty", "empty_like"}


def buffer_violations(source: str) -> list[str]:
    """Where generated code could read a buffer before writing all of it.

    Names bound to rt.empty(...) and names bound to a view of one (a
    subscript, or the name itself) are buffers; `buf += ...`,
    `buf[...] += ...` and `xp.add(buf[t], g, out=buf[t])` are violations, and
    so is any direct xp/np.empty call.
    """
    tree = ast.parse(source)
    problems = []
    buffers: set[str] = set()
    # assignments in source order: buffers and their views
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in _EMPTY_FUNCS and isinstance(node.func.value, ast.Name) and \
                node.func.value.id in ("xp", "np", "numpy", "cupy"):
            problems.append(f"line {node.lineno}: {node.func.value.id}.{node.func.attr}() "
                            "bypasses rt.empty (poison mode would not see it)")
    assigns = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Assign)),
                     key=lambda n: (n.lineno, n.col_offset))
    for node in assigns:
        value = node.value
        is_buffer = (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)
                     and value.func.attr == "empty" and isinstance(value.func.value, ast.Name)
                     and value.func.value.id == "rt")
        base = value
        while isinstance(base, ast.Subscript):
            base = base.value
        is_view = isinstance(base, ast.Name) and base.id in buffers
        for target in node.targets:
            if isinstance(target, ast.Name):
                if is_buffer or is_view:
                    buffers.add(target.id)
    for node in ast.walk(tree):
        if isinstance(node, ast.AugAssign) and _base(node.target) in buffers:
            problems.append(f"line {node.lineno}: {ast.unparse(node.target)} "
                            f"{type(node.op).__name__}= into the buffer {_base(node.target)}")
        # xp.add(buf, g, out=buf) is `buf += g` spelled as a call
        if isinstance(node, ast.Call):
            for out in (k.value for k in node.keywords if k.arg == "out"):
                if _base(out) in buffers and \
                        any(ast.dump(a) == ast.dump(out) for a in node.args):
                    problems.append(f"line {node.lineno}: {ast.unparse(node)} accumulates "
                                    f"into the buffer {_base(out)}")
    return problems


def _base(expr) -> str | None:
    """The name a (possibly subscripted) expression refers to: buf for buf[t][0]."""
    while isinstance(expr, ast.Subscript):
        expr = expr.value
    return expr.id if isinstance(expr, ast.Name) else None


@pytest.mark.parametrize("path", EXAMPLES, ids=example_ids())
def test_buffers_are_written_before_they_are_read(path):
    assert buffer_violations(compiled(path).source) == []


def test_buffers_with_debug_nans():
    c = api.compile_file(example("stack"), debug_nans=True)
    assert "rt.check_finite(" in c.source
    assert buffer_violations(c.source) == []


BAD_SNIPPETS = {
    "augassign": "buf = rt.empty(xp, (3,), dtype)\nbuf += g\n",
    "subscript": "buf = rt.empty(xp, (T, 3), dtype)\nfor t in range(T):\n    buf[t] += g\n",
    "view": "buf = rt.empty(xp, (T, 3), dtype)\nrow = buf[1]\nrow += g\n",
    "view-of-view": "buf = rt.empty(xp, (T, 3), dtype)\na = buf[1:]\nb = a[0]\nb[0] += g\n",
    "out=": "buf = rt.empty(xp, (T, 3), dtype)\nxp.add(buf[0], g, out=buf[0])\n",
    "xp.empty": "buf = xp.empty((3,), dtype)\nbuf[:] = 0\n",
    "np.empty_like": "buf = np.empty_like(g)\n",
}


@pytest.mark.parametrize("name", sorted(BAD_SNIPPETS))
def test_buffer_checker_catches_bad_code(name):
    assert buffer_violations(BAD_SNIPPETS[name])


def test_buffer_checker_accepts_good_code():
    good = ("buf = rt.empty(xp, (T, 3), dtype)\nfor t in range(T):\n    buf[t] = g\n"
            "acc = g\nacc += g\nd = buf[0] + g\nd += g\nxp.add(buf[1], g, out=buf[2])\n"
            "e = xp.tanh(g, out=buf[3])\n")
    assert buffer_violations(good) == []


# ---------------------------------------------------------------- (b) properties of the source
#
# The models: every example and the std-cell models of helpers.STD_MODELS. Each checker
# returns its findings; a test below shows each one flagging a hand-written bad snippet.

MODELS = {p.stem: (p, None) for p in EXAMPLES}
MODELS.update({name: (std_model_path(name), text) for name, text in STD_MODELS.items()})


def compiled_model(name: str):
    path, text = MODELS[name]
    if text is None:
        return compiled(path)
    key = ("std", name)
    if key not in _COMPILED:
        _COMPILED[key] = api.compile_file(path, text=text)
    return _COMPILED[key]


def model_meta(source: str) -> dict:
    """The generated module's MODEL table, read from its source (a literal)."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["MODEL"]:
            return ast.literal_eval(node.value)
    raise AssertionError("no MODEL table")


def generated_functions(source: str) -> list[ast.FunctionDef]:
    return [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)]


# (b1) names. A name bound in a generated function (an assignment or loop target, an
# argument) is one of
#   fixed    FIXED_NAMES (arguments and plumbing), T_<axis> / arena_<axis>, or
#            const_<value> bound to that number (const_1_0, const_neg0_5, const_1em05);
#   spec     derived from a name the spec gives: after an optional work-buffer prefix
#            work_ and an optional gradient prefix d/d_, some run of its `_`-separated
#            parts is an input, target, output, parameter, state or cell name, or a name
#            on a quoted `.cell` line (h_enc1, dh_enc1_next, denc1_W_h, z_g_l2,
#            W_out_0_8, add_z_o_enc1, dc_enc1_via_tanh, work_f_enc1), the language's own
#            words and op names aside;
#   counter  a bare op counter: an op of the op table with numbers or other op names
#            (add_3, dadd_29, d_mul_11, add_conv, tanh_1_seq), an optional work_ or
#            gradient prefix and role suffixes _seq/_buf/_prev/_next/_init.
# Anything else fails: the old work buffers w<N> and constants c/c_<N> (which a
# ConvLSTM's state c shadowed) are no longer a pattern. The fraction of counters is a
# ratchet: COUNTER_FRACTION holds today's figure for each model and the fraction may
# not grow above it (lower the figure here with the naming: the ratchet only tightens).
FIXED_NAMES = frozenset({
    "params", "inputs", "targets", "state", "steps", "bptt", "backend", "seed", "lr", "options",
    "B", "xp", "dtype", "N", "t", "t0", "name", "_", "loss", "grads", "final", "outputs",
    "cotangents", "state_cotangents", "param_cts", "input_cts", "state_cts", "wrt", "steps_fn"})
FIXED_PATTERNS = (re.compile(r"T_\w+"), re.compile(r"arena_\w+"))
_ROLES = r"(?:_(?:seq|buf|prev|next|init))*"
_CONSTANT = re.compile(r"const_(?:neg)?(?:\d+(?:_\d+)?(?:e[mp]\d+)?|inf|nan)(?:_\d+)?")
# words of the .cell language that quoted lines hold but that name nothing of the spec
_LANGUAGE_WORDS = frozenset({
    "t", "same", "valid", "padding", "steps", "last", "all", "true", "false", "per_pixel",
    "stride", "dilation", "kernel", "bias", "zeros", "weight", "state", "input", "output",
    "target", "loss", "model", "cell", "import", "init", "split", "bce", "mse", "xent", "std"})
_IDENT = re.compile(r"[A-Za-z_]\w*")
_OPS_ALT = "|".join(sorted(map(re.escape, OPS), key=len, reverse=True))
_OP_COUNTER = re.compile(rf"(?:d_?)?(?:{_OPS_ALT})(?:_(?:{_OPS_ALT}|\d+))*{_ROLES}")

# counters / all distinct bound names. At 0cbaba9, before compiler/naming.py: 178/440
# encoder_forecaster, 34/109 seed, 265/644 shi2015, 178/440 shi2015_small, 122/285 stack,
# 44/116 std_convgru, 46/137 std_convlstm, 31/96 std_convlstm_fused, 34/119
# std_convlstm_nopeep, 80/188 std_gru_forecaster (0.29-0.43). Since naming.py: none.
COUNTER_FRACTION = {
    "encoder_forecaster": 0 / 460,
    "seed": 0 / 115,
    "shi2015": 0 / 674,
    "shi2015_small": 0 / 460,
    "stack": 0 / 299,
    "std_convgru": 0 / 121,
    "std_convlstm": 0 / 142,
    "std_convlstm_fused": 0 / 100,
    "std_convlstm_nopeep": 0 / 125,
    "std_gru_forecaster": 0 / 198,
}


def spec_words(source: str) -> set[str]:
    """The names the spec gives, as the generated module shows them (MODEL, quoted lines)."""
    meta = model_meta(source)
    words = set()
    for table in ("inputs", "targets", "outputs", "params", "states", "cells"):
        for key in meta.get(table, {}):
            words.update(key.split("."))
            words.add(key.replace(".", "_"))
    for line in source.splitlines():
        m = _LOC_COMMENT.match(line)
        if m and m.group("text"):
            words.update(_IDENT.findall(m.group("text").split("#")[0]))
    return {w for w in words if w not in OPS and w not in _LANGUAGE_WORDS}


def bound_names(source: str) -> set[str]:
    names = set()
    for fn in generated_functions(source):
        for n in ast.walk(fn):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                names.add(n.id)
            elif isinstance(n, ast.arg):
                names.add(n.arg)
    return names


def constant_names(source: str) -> set[str]:
    """Names some generated statement binds to a number (c = 1.0)."""
    return {t.id for fn in generated_functions(source) for n in ast.walk(fn)
            if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
            and isinstance(n.value.value, (int, float)) for t in n.targets
            if isinstance(t, ast.Name)}


def name_kind(name: str, words: set[str], constants: frozenset = frozenset()) -> str:
    """fixed, spec, counter or unknown (see (b1))."""
    if name in FIXED_NAMES or any(p.fullmatch(name) for p in FIXED_PATTERNS):
        return "fixed"
    if name in constants and _CONSTANT.fullmatch(name):
        return "fixed"
    name = name.removeprefix("work_")  # a work buffer, named for a value it holds
    for core in {name, re.sub(r"^d_?", "", name)}:
        parts = core.split("_")
        if any("_".join(parts[i:j]) in words
               for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)):
            return "spec"
    if _OP_COUNTER.fullmatch(name):
        return "counter"
    return "unknown"


def name_report(source: str) -> dict[str, list[str]]:
    words = spec_words(source)
    constants = frozenset(constant_names(source))
    kinds: dict[str, list[str]] = {"fixed": [], "spec": [], "counter": [], "unknown": []}
    for name in sorted(bound_names(source)):
        kinds[name_kind(name, words, constants)].append(name)
    return kinds


def counter_fraction(kinds: dict[str, list[str]]) -> float:
    total = sum(len(v) for v in kinds.values())
    return len(kinds["counter"]) / total if total else 0.0


@pytest.mark.parametrize("model", sorted(MODELS))
def test_bound_names_come_from_the_spec_or_fixed_patterns(model):
    kinds = name_report(compiled_model(model).source)
    assert kinds["unknown"] == [], "names neither from the spec nor of a documented pattern"
    fraction = counter_fraction(kinds)
    assert fraction <= COUNTER_FRACTION[model] + 1e-12, (
        f"{model}: {len(kinds['counter'])} of {sum(map(len, kinds.values()))} bound names "
        f"({fraction:.4f}) are bare op counters, more than the ratchet's "
        f"{COUNTER_FRACTION[model]:.4f}: {kinds['counter']}")


NAME_SNIPPET = ('MODEL = {"inputs": {"x": (1, 4, 4)}, "params": {"l.W": {}}, "cells": {"l": "C"}}\n'
                "def forward(params, inputs):\n"
                "    # m.cell:3  h = tanh(conv(x, W))\n"
                "    l_W = params['l.W']\n    conv_x = rt.conv2d(B, x, l_W)\n"
                "    h_l = rt.tanh(conv_x)\n    add_7 = xp.add(h_l, 1.0)\n    w3 = add_7\n"
                "    dadd_7_seq = w3\n    tmp = add_7\n    work_add_7 = add_7\n"
                "    work_h_l = h_l\n    const_1_0 = 1.0\n    c = 1.0\n")


def test_name_checker_flags_unknown_names_and_counts_counters():
    kinds = name_report(NAME_SNIPPET)
    assert kinds["unknown"] == ["c", "tmp", "w3"]  # the old constant and work buffer too
    assert kinds["counter"] == ["add_7", "dadd_7_seq", "work_add_7"]
    assert set(kinds["spec"]) == {"conv_x", "h_l", "l_W", "work_h_l"}
    assert set(kinds["fixed"]) == {"const_1_0", "inputs", "params"}
    assert counter_fraction(kinds) == 3 / 13


# (b2) One statement per graph node. Every assignment (and expression statement and
# return) in a generated function computes one thing: its value is an atom (a name, a
# constant, an attribute, a subscript with an index of names, constants and integer
# arithmetic, a tuple or list of atoms), or ONE call / operator applied to atoms, where a
# keyword argument may also be one rt.empty(...) of atoms (the buffer the result goes
# to), or a conditional of such, or a dict of such (the returned grads and states).
# An augmented assignment is itself the op: its operand is an atom. The functions checked
# are those that compute graph nodes (they quote `.cell` lines: forward, loss,
# loss_and_grad_shard), not helpers such as sgd_step (`params[name] -= lr * grads[name]`);
# assignments to fixed names (T_y = int(steps[...] if ... else steps): argument handling)
# are exempt.

_LOOP_INTEGERS = re.compile(r"t|t0|N|T_\w+|bptt")


def _is_int(e) -> bool:
    """Integer arithmetic on sizes and steps: T_x + 1, 0 * T_x * N, t % bptt."""
    if isinstance(e, ast.Constant):
        return isinstance(e.value, int)
    if isinstance(e, ast.Name):
        return bool(_LOOP_INTEGERS.fullmatch(e.id))
    if isinstance(e, ast.BinOp):
        return _is_int(e.left) and _is_int(e.right)
    if isinstance(e, ast.UnaryOp):
        return _is_int(e.operand)
    return False


def _is_index(e) -> bool:
    if isinstance(e, (ast.Name, ast.Constant)):
        return True
    if isinstance(e, ast.Slice):
        return all(p is None or _is_index(p) for p in (e.lower, e.upper, e.step))
    if isinstance(e, ast.Tuple):
        return all(_is_index(x) for x in e.elts)
    return _is_int(e)


def is_atom(e) -> bool:
    if isinstance(e, (ast.Name, ast.Constant)):
        return True
    if isinstance(e, ast.Attribute):
        return is_atom(e.value)
    if isinstance(e, ast.Subscript):
        return is_atom(e.value) and _is_index(e.slice)
    if isinstance(e, (ast.Tuple, ast.List)):
        return all(is_atom(x) for x in e.elts)
    if isinstance(e, ast.UnaryOp) and isinstance(e.operand, ast.Constant):
        return True
    return _is_int(e)


def _is_buffer(e) -> bool:
    return (isinstance(e, ast.Call) and ast.unparse(e.func) == "rt.empty"
            and all(is_atom(a) for a in e.args) and all(is_atom(k.value) for k in e.keywords))


def is_one_op(e) -> bool:
    if is_atom(e):
        return True
    if isinstance(e, ast.Call):
        return (is_atom(e.func) and all(is_atom(a) for a in e.args)
                and all(is_atom(k.value) or _is_buffer(k.value) for k in e.keywords))
    if isinstance(e, (ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp)):
        return all(is_atom(x) for x in ast.iter_child_nodes(e) if isinstance(x, ast.expr))
    if isinstance(e, ast.IfExp):
        return all(is_one_op(x) for x in (e.test, e.body, e.orelse))
    if isinstance(e, ast.Dict):
        return all(k is None or is_atom(k) for k in e.keys) and all(map(is_one_op, e.values))
    return False


def _fixed_target(t) -> bool:
    return isinstance(t, ast.Name) and name_kind(t.id, set()) == "fixed"


def graph_functions(source: str) -> list[ast.FunctionDef]:
    """The generated functions that compute graph nodes: those quoting `.cell` lines."""
    lines = source.splitlines()
    return [fn for fn in generated_functions(source)
            if any(_LOC_COMMENT.match(line) for line in lines[fn.lineno - 1:fn.end_lineno])]


def compound_statements(source: str) -> list[str]:
    """Statements of the graph's generated functions that compute more than one thing."""
    problems = []
    for fn in graph_functions(source):
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign):
                if all(_fixed_target(t) for t in node.targets):
                    continue
                value = node.value
            elif isinstance(node, ast.AugAssign):  # itself the op: its operand an atom
                if not is_atom(node.value):
                    problems.append(f"{fn.name} line {node.lineno}: {ast.unparse(node)}")
                continue
            elif isinstance(node, ast.Return):
                value = node.value
            elif isinstance(node, ast.Expr) and not isinstance(node.value, ast.Constant):
                value = node.value
            else:
                continue
            if value is not None and not is_one_op(value):
                problems.append(f"{fn.name} line {node.lineno}: {ast.unparse(node)}")
    return problems


@pytest.mark.parametrize("model", sorted(MODELS))
def test_one_statement_per_graph_node(model):
    assert compound_statements(compiled_model(model).source) == []


_IN_GRAPH_CODE = "def f(x, steps):\n    # m.cell:3  y = f(x)\n"  # quotes a line: graph code
COMPOUND_SNIPPETS = {
    "nested call": "    y = rt.sigmoid(xp.add(x, b, out=w0), out=w0)\n",
    "chained operators": "    y = x * w + b\n",
    "operator in a call": "    y = rt.tanh(x + b, out=w0)\n",
    "call in a subscript": "    y = x[xp.argmax(x)]\n",
    "expression statement": "    xp.add(xp.negative(x), b, out=w0)\n",
    "call in out=": "    y = xp.add(x, b, out=xp.empty_like(x))\n",
    "augmented": "    x += b * c\n",
    "return": "    return float(xp.sum(x))\n",
    "not an index": "    y = h_buf[t + k]\n",
}


@pytest.mark.parametrize("name", sorted(COMPOUND_SNIPPETS))
def test_statement_checker_flags_compound_statements(name):
    assert compound_statements(_IN_GRAPH_CODE + COMPOUND_SNIPPETS[name])


def test_statement_checker_accepts_one_op_statements():
    good = (_IN_GRAPH_CODE + "    T_y = int(steps['y'] if isinstance(steps, dict) else steps)\n"
            "    y = xp.add(x[t][..., 0:8, :, :], b, out=w0[t + 1])\n    z = y[:, 1:9]\n"
            "    c = rt.conv2d(B, x, W, (1, 1), out=rt.empty(xp, (T_x + 1, N, 8), dtype, "
            "at=(arena_x, 0 * T_x * N)))\n    a = b = None\n    d = x * 2.0\n    d += x\n"
            "    g = {'W': dW, 'h': h_buf[-1].copy()}\n    return g, z\n"
            "def sgd_step(params, grads, lr):\n    for name in sorted(params):\n"
            "        params[name] -= lr * grads[name]\n")
    assert compound_statements(good) == []


# (b3) No allocation in time loops. Inside the body of every `for t in ...` loop, each
# call to xp.*, np.* or rt.* writes into a preallocated out= (a view of a buffer
# allocated before the loop), no allocating function is called at all (empty, zeros,
# zeros_like, ones, full, array, asarray, ascontiguousarray, concatenate, stack, tile,
# repeat, copy, ...) unless it is given out=, there is no .copy(), and no arithmetic
# operator is applied to anything but the loop's integers (t, t0, T_<axis>, constants).
# (Truncated BPTT's cut hands on `dh_<state>_next_zero`, zeros made once before the loop.)
_ALLOCATING = frozenset({
    "empty", "empty_like", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like",
    "array", "asarray", "ascontiguousarray", "asfortranarray", "concatenate", "stack",
    "hstack", "vstack", "tile", "repeat", "copy", "arena", "pad", "broadcast_to", "outer"})
_ARRAY_MODULES = ("xp", "np", "numpy", "rt", "cupy")


def _time_loops(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and \
                node.target.id == "t":
            yield node


def _parents(tree) -> dict:
    return {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}


def loop_allocations(source: str) -> list[str]:
    """Where and what, for each allocation that code in a time loop would make."""
    tree = ast.parse(source)
    parents = _parents(tree)
    found = []
    seen: set[int] = set()
    for loop in _time_loops(tree):
        for node in ast.walk(ast.Module(body=loop.body, type_ignores=[])):
            if id(node) in seen:
                continue
            seen.add(id(node))
            why = None
            if isinstance(node, ast.Call):
                func = node.func
                has_out = any(k.arg == "out" for k in node.keywords)
                attr = func.attr if isinstance(func, ast.Attribute) else None
                module = func.value.id if attr and isinstance(func.value, ast.Name) else None
                if attr in _ALLOCATING and not has_out:
                    why = "allocates"
                elif module in _ARRAY_MODULES and not has_out:
                    why = "has no out= (its result is a new array)"
            elif isinstance(node, (ast.BinOp, ast.UnaryOp)) and \
                    not isinstance(parents.get(node), (ast.BinOp, ast.UnaryOp)) and \
                    not _is_int(node):
                why = "is arithmetic on arrays (a new array)"
            if why:
                found.append(f"line {node.lineno}: {ast.unparse(node)} {why}")
    return found


@pytest.mark.parametrize("model", sorted(MODELS))
def test_no_allocation_in_time_loops(model):
    assert loop_allocations(compiled_model(model).source) == []


LOOP_SNIPPETS = {
    "rt.empty": "for t in range(T):\n    w = rt.empty(xp, (N, 3), dtype)\n",
    "xp.zeros": "for t in range(T):\n    w = xp.zeros((N, 3))\n",
    "np.array": "for t in range(T):\n    w = np.array(h)\n",
    "copy": "for t in range(T):\n    h_buf[t + 1] = h.copy()\n",
    "concatenate": "for t in range(T):\n    z = xp.concatenate([x[t], h], axis=1)\n",
    "stack": "for t in range(t0, T_x):\n    if t > 2:\n        z = xp.stack([x[t], h])\n",
    "no out=": "for t in range(T):\n    h = rt.tanh(z)\n",
    "operator": "for t in range(T):\n    h = h_buf[t] * 0.5 + x[t]\n",
    "nested loop": "for t in range(T):\n    for k in range(3):\n        a = xp.add(x, y)\n",
    "zeros_like": "for t in range(T):\n    dh_next = xp.zeros_like(dh_next)\n",
    "truncation reset": ("for t in range(T):\n    if bptt and t % bptt == 0:\n"
                         "        dh_next = xp.zeros_like(dh_next)\n"),
}


@pytest.mark.parametrize("name", sorted(LOOP_SNIPPETS))
def test_loop_allocation_checker_flags_allocations(name):
    assert loop_allocations(LOOP_SNIPPETS[name])


def test_loop_allocation_checker_accepts_writes_into_buffers():
    good = ("w = xp.zeros((N, 3))\nfor t in range(t0, T_x):\n    h_prev = h_buf[t]\n"
            "    a = xp.add(x[t], h_prev, out=w)\n    h = rt.tanh(a, out=h_buf[t + 1])\n"
            "    c = rt.concat([a, h], out=c_seq[t])\n    s = x[t + 1:T_x - 1]\n"
            "    if bptt and t % bptt == 0:\n        dh_next = dh_next_zero\n"
            "h_last = h_buf[-1].copy()\n")
    assert loop_allocations(good) == []


# (b4) A small structural golden: each model's generated functions with their signatures,
# and for each function the `.cell` lines its comments quote (sorted: emission order is
# the compiler's to change). These change only on purpose; after such a change run
#
#     CONVC_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_codegen.py -k structure
#
# and review the diff of tests/golden/structure.json.
STRUCTURE = GOLDEN / "structure.json"


def structure(source: str) -> dict:
    out = {"functions": {}, "cell_lines": {}}
    lines = source.splitlines()
    for fn in generated_functions(source):
        out["functions"][fn.name] = f"({ast.unparse(fn.args)})"
        end = fn.end_lineno or fn.lineno
        quoted = set()
        for line in lines[fn.lineno - 1:end]:
            m = _LOC_COMMENT.match(line)
            if m:
                quoted.add((m.group("file"), int(m.group("line"))))
        if quoted:
            out["cell_lines"][fn.name] = [f"{f}:{n}" for f, n in sorted(quoted)]
    return out


def test_structure_matches_the_golden():
    got = {model: structure(compiled_model(model).source) for model in sorted(MODELS)}
    if os.environ.get("CONVC_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        STRUCTURE.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    assert STRUCTURE.exists(), f"no {STRUCTURE}; run with CONVC_UPDATE_GOLDEN=1 to write it"
    want = json.loads(STRUCTURE.read_text(encoding="utf-8"))
    assert sorted(got) == sorted(want), "models added or removed: regenerate the golden"
    for model in sorted(want):
        assert got[model] == want[model], (
            f"{model}: the generated functions or the .cell lines they quote changed "
            "(regenerate with CONVC_UPDATE_GOLDEN=1 if deliberate):\n"
            + "\n".join(difflib.unified_diff(
                json.dumps(want[model], indent=1, sort_keys=True).splitlines(),
                json.dumps(got[model], indent=1, sort_keys=True).splitlines(),
                "golden", "generated", lineterm="")))


def test_structure_sees_a_changed_signature_and_a_lost_line():
    source = compiled_model("seed").source
    base = structure(source)
    assert "loss_and_grad" in base["functions"] and "seed.cell:16" in base["cell_lines"]["forward"]
    renamed = structure(source.replace("def forward(params, inputs, steps=None,",
                                       "def forward(params, inputs, steps=4,"))
    assert renamed["functions"]["forward"] != base["functions"]["forward"]
    lost = structure(source.replace("# seed.cell:22  ", "# "))
    assert "seed.cell:22" not in lost["cell_lines"]["forward"]


@pytest.mark.parametrize("stem", ["seed", "encoder_forecaster"])
def test_written_source_imports_and_runs(stem, tmp_path):
    """The generated source is a working module on its own, not just text."""
    path = tmp_path / f"{stem}.py"
    path.write_text(compiled(example(stem)).source, encoding="utf-8")
    mod = api.import_generated(path)
    assert callable(mod.loss_and_grad) and callable(mod.forward)
    assert mod.MODEL["name"] == stem


# ---------------------------------------------------------------- (c) determinism

def artifacts(c) -> dict[str, str]:
    return {"source": c.source, "ir": c.ir_text(), "dot": c.dot(), "json": c.json()}


def digests(c) -> dict[str, str]:
    return {k: hashlib.sha256(v.encode()).hexdigest() for k, v in artifacts(c).items()}


@pytest.mark.parametrize("path", EXAMPLES, ids=example_ids())
def test_two_compiles_are_identical(path):
    a = artifacts(api.compile_file(path))
    b = artifacts(api.compile_file(path))
    for kind in a:
        assert a[kind] == b[kind], kind
    json.loads(a["json"])  # and the JSON is JSON


_DIGEST_SCRIPT = """
import hashlib, json, sys
import convc.api as api
out = {}
for p in sys.argv[1:]:
    c = api.compile_file(p)
    arts = {"source": c.source, "ir": c.ir_text(), "dot": c.dot(), "json": c.json()}
    out[p] = {k: hashlib.sha256(v.encode()).hexdigest() for k, v in arts.items()}
print(json.dumps(out))
"""


def test_compiles_are_identical_across_processes_and_hash_seeds(tmp_path):
    """Fresh interpreters, different string hashing, another working directory: the
    same bytes (the source, IR and JSON name files without their folders)."""
    paths = [str(Path(p).resolve()) for p in EXAMPLES]
    here = {p: digests(compiled(Path(p))) for p in paths}
    script = tmp_path / "digests.py"
    script.write_text(_DIGEST_SCRIPT, encoding="utf-8")
    for seed, cwd in (("1", os.getcwd()), ("4242", str(tmp_path))):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        run = subprocess.run([sys.executable, str(script), *paths], env=env,
                             capture_output=True, text=True, cwd=cwd, timeout=300)
        assert run.returncode == 0, run.stderr
        there = json.loads(run.stdout.strip().splitlines()[-1])
        for p in paths:
            assert there[p] == here[p], \
                f"{Path(p).name} differs with PYTHONHASHSEED={seed} in {cwd}"


# ---------------------------------------------------------------- (d) imports

ALLOWED_IMPORTS = ("numpy", "convc.runtime")


def imported_modules(source: str) -> list[str]:
    mods = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            mods.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mods.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("__import__", "exec", "eval"):
            mods.append(f"<{node.func.id}>")
    return mods


def _allowed(mod: str) -> bool:
    return any(mod == a or mod.startswith(a + ".") for a in ALLOWED_IMPORTS)


@pytest.mark.parametrize("path", EXAMPLES, ids=example_ids())
def test_generated_module_imports_only_numpy_and_the_runtime(path):
    mods = imported_modules(compiled(path).source)
    assert mods, "no imports found at all"
    assert [m for m in mods if not _allowed(m)] == []


def test_import_checker_catches_other_imports():
    assert not all(_allowed(m) for m in imported_modules("import os\n"))
    assert not all(_allowed(m) for m in imported_modules("from convc.compiler import ops\n"))
    assert not all(_allowed(m) for m in imported_modules("m = __import__('torch')\n"))
    assert all(_allowed(m) for m in imported_modules(
        "import numpy as np\nfrom convc.runtime import kernels as rt\n"))


# ---------------------------------------------------------------- (e) source comments

_LOC_COMMENT = re.compile(r"^\s*# (?P<file>[^\s:]+\.cell):(?P<line>\d+)(?:  (?P<text>.*))?$")
_ASSIGN = re.compile(r"^\s*(?P<name>[A-Za-z_]\w*) = ")
_SOURCE_OPS = ("input", "param", "state", "carry", "carry_out")


def _cell_lines(name: str, texts: dict[str, str] | None = None) -> list[str]:
    """The lines of the `.cell` file a comment names: an example, the stdlib, or one of
    `texts` ({file name: text}, for models compiled from text)."""
    if texts and name in texts:
        return texts[name].splitlines()
    for cand in [ROOT / "examples" / name, Path(stdlib_dir()) / name]:
        if cand.exists():
            return cand.read_text(encoding="utf-8").splitlines()
    raise AssertionError(f"a comment names {name}, which is neither an example nor stdlib")


def comment_problems(c) -> list[str]:
    """Statements computing a node without the right `.cell` comment above them."""
    g = c.lowered.graph
    lines = c.source.splitlines()
    problems = []
    seen_in_fn: set[str] = set()
    for i, line in enumerate(lines):
        if line.startswith("def "):
            seen_in_fn = set()
            continue
        m = _ASSIGN.match(line)
        if not m or m.group("name") not in g or m.group("name") in seen_in_fn:
            continue
        name = m.group("name")
        node = g.node(name)
        if node.op in _SOURCE_OPS or node.loc.line <= 0:
            continue
        seen_in_fn.add(name)
        found = None
        for j in range(i - 1, -1, -1):
            prev = lines[j]
            lm = _LOC_COMMENT.match(prev)
            if lm:
                found = lm
                break
            stripped = prev.strip()
            if not stripped or stripped.startswith(("def ", "for ", "# ")):
                break
        want = f"{Path(node.loc.file).name}:{node.loc.line}"
        if found is None:
            problems.append(f"line {i + 1}: {name} has no .cell comment (want {want})")
        elif f"{found.group('file')}:{found.group('line')}" != want:
            problems.append(f"line {i + 1}: {name} is under "
                            f"{found.group('file')}:{found.group('line')}, want {want}")
    return problems


def quote_problems(source: str, texts: dict[str, str] | None = None) -> list[str]:
    """`.cell` comments whose quoted text is not the line they name."""
    problems = []
    for i, line in enumerate(source.splitlines()):
        m = _LOC_COMMENT.match(line)
        if not m or m.group("text") is None:
            continue
        actual = _cell_lines(m.group("file"), texts)
        n = int(m.group("line"))
        quoted = m.group("text").strip()
        if not (1 <= n <= len(actual)) or not actual[n - 1].strip().startswith(quoted):
            problems.append(f"line {i + 1}: {m.group('file')}:{n} quotes {quoted!r}")
    return problems


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_cell_statement_names_its_source_line(model):
    c = compiled_model(model)
    path, text = MODELS[model]
    assert comment_problems(c) == []
    assert quote_problems(c.source, {path.name: text} if text else None) == []


def test_comment_checkers_flag_missing_and_wrong_comments():
    c = compiled(example("seed"))
    assert quote_problems(c.source.replace("# seed.cell:20  o = sigmoid",
                                           "# seed.cell:20  o = tanh"))
    assert quote_problems(c.source.replace("# seed.cell:22  h", "# seed.cell:23  h"))

    class Moved:  # the same compile with one comment gone, and one naming another line
        lowered = c.lowered
        source = c.source.replace("        # seed.cell:20  o = sigmoid(z_o + b_o)\n", "", 1)

    assert comment_problems(Moved)
    Moved.source = c.source.replace("# seed.cell:18  f = sigmoid", "# seed.cell:17  f = sigmoid")
    assert comment_problems(Moved)


def test_generated_source_is_in_linecache():
    """Tracebacks and pdb show generated lines."""
    mod = api.load(example("seed"))
    first = mod.source.splitlines()[0]
    assert linecache.getline(mod.__file__, 1).rstrip("\n") == first


# ---------------------------------------------------------------- (f) the interpreter

@pytest.mark.parametrize("path", EXAMPLES, ids=example_ids())
@pytest.mark.parametrize("stateful", [False, True], ids=["zeros", "state"])
def test_generated_code_agrees_with_the_interpreter(path, stateful):
    mod = load_example(path)
    params = random_params(mod, seed=3)
    inputs, targets = random_batch(mod, N=2, T=3, T_out=4, seed=3)
    state = random_state(mod, N=2) if stateful else None
    want_out, want_final, want_loss = run_forward(mod.compiled.lowered, params, inputs,
                                                  targets, state=state)
    loss, _, final = mod.loss_and_grad(params, inputs, targets, state=state)
    outputs, final2 = mod.forward(params, inputs, steps=4, state=state)
    assert abs(loss - want_loss) <= 1e-12 * abs(want_loss)
    for k in want_out:
        np.testing.assert_allclose(outputs[k], want_out[k], rtol=1e-12, atol=1e-13)
    assert set(final) == set(want_final) == set(final2)
    for k in want_final:
        np.testing.assert_allclose(final[k], want_final[k], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(final2[k], want_final[k], rtol=1e-12, atol=1e-13)


def test_docstrings_with_backslashes_and_quotes():
    """A .cell docstring reaches the module's docstring unchanged, whatever it holds."""
    import warnings
    doc = r'Paths like C:\data\new, a \"\"\" run of quotes, ends in \\'
    text = ('cell Tiny(hidden) {\n    """Doc of a cell with \\t in it."""\n    input x\n'
            '    state h = zeros\n    weight W = kernel(hidden, 3)\n'
            '    h = tanh(conv(concat(x, h[t-1]), W))\n    output h\n}\n\n'
            f'model tiny {{\n    """{doc}"""\n    input x: [1, 6, 6]\n    target y: [1, 6, 6]\n'
            '    l = Tiny(hidden = 2)\n    h = l(x)\n    weight W = kernel(1, 1)\n'
            '    p = conv(h, W)\n    output p\n    loss mse(p, y)\n}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no invalid escape sequence either
        mod = api.load(ROOT / "tests" / "test_codegen_doc.cell", text=text)
    assert doc in mod.__doc__
    assert "Doc of a cell with \\t in it." in mod.__doc__


@pytest.mark.parametrize("path", EXAMPLES, ids=example_ids())
def test_loss_alone_equals_the_loss_of_loss_and_grad(path):
    mod = load_example(path)
    params = random_params(mod)
    inputs, targets = random_batch(mod, N=2, T=3, T_out=4)
    state = random_state(mod, N=2)
    for kw in ({}, {"state": state}):
        alone = mod.loss(params, inputs, targets, **kw)
        with_grads = mod.loss_and_grad(params, inputs, targets, **kw)[0]
        assert isinstance(alone, float)
        assert abs(alone - with_grads) <= 1e-12 * abs(with_grads)
    assert "def loss(params, inputs, targets" in mod.source


# ---------------------------------------------------------------- plan, then render

@pytest.mark.parametrize("path", EXAMPLES, ids=example_ids())
@pytest.mark.parametrize("recompute", [None, 2])
def test_the_emitter_renders_a_finished_plan_and_changes_nothing_in_it(path, recompute):
    """plan.py's ModulePlan is a value: planning twice gives the same plan, and the
    generator renders it to the compiled source without touching it, twice alike."""
    from convc.compiler.codegen import Generator
    from convc.compiler.plan import plan_module

    c = api.load(path, recompute=recompute).compiled
    args = (c.lowered, c.backward, c.schedule, recompute, "channel-major")
    plan = plan_module(*args)
    before = repr(plan)
    assert repr(plan_module(*args)) == before
    first = Generator(c.lowered, c.backward, c.schedule, plan).module()
    second = Generator(c.lowered, c.backward, c.schedule, plan).module()
    assert first == second == c.source
    assert repr(plan) == before
    assert set(plan.functions) == {"forward", "loss", "loss_and_grad"}
    for fp in plan.functions.values():  # every loop it runs has its memory plan
        assert {b for b in fp.blocks if b.kind.is_loop and fp.members.get(b)} == set(fp.loops)

"""Shared test utilities: compile small models, make float64 parameters and batches.

The gradient tests need models small enough to run a finite-difference check
of every parameter in seconds, and data that keeps directional derivatives
well above round-off: parameters are their seeded initial values plus
N(0, 0.3) noise (so zero biases and peepholes are not exactly zero), inputs
and targets are uniform in [0, 1].
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import convc.api as api
from convc.runtime.gradcheck import gradcheck

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.cell"))
GOLDEN = Path(__file__).resolve().parent / "golden"

@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """Run a module's tests with one BLAS thread (import this name to use it).

    The models here are tiny: with several threads each small GEMM pays for
    waking them, and on a busy machine a float64 check ran 5-7x slower.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # an optional dev dependency: only slower without it
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def example_ids() -> list[str]:
    return [p.stem for p in EXAMPLES]


def shrink(text: str, size: int = 8, hidden: int = 3) -> str:
    """A `.cell` text with smaller frames and layers, for fast float64 checks.

    Every sequence declaration `[C, H, W]` gets H = W = size and every
    `hidden = n` becomes at most `hidden`; nothing else changes, so the
    model's structure (cells, loops, losses, truncation) is the one the
    example declares.
    """
    text = re.sub(r"(\b(?:input|target)\s+\w+\s*:\s*\[\s*\d+\s*),\s*\d+\s*,\s*\d+\s*\]",
                  rf"\1, {size}, {size}]", text)
    return re.sub(r"\bhidden\s*=\s*(\d+)",
                  lambda m: f"hidden = {min(int(m.group(1)), hidden)}", text)


def load_text(text: str, name: str = "test_model.cell", **options):
    """Compile `.cell` text (it may `import std`) and import the generated module.

    `name` is the file name diagnostics and source comments show; give each
    distinct text its own name. `options` go to convc.load (recompute=K).
    """
    return api.load(ROOT / "tests" / name, text=text, **options)


def load_example(path: Path, small: bool = True, **shrink_kw):
    """An example model, shrunk for float64 checks unless small=False."""
    text = path.read_text(encoding="utf-8")
    if small:
        text = shrink(text, **shrink_kw)
    return api.load(path, text=text)


def random_params(mod, seed: int = 0, noise: float = 0.3, dtype: str = "float64") -> dict:
    """The module's seeded initial parameters plus N(0, noise) noise, as `dtype`."""
    params = mod.init_params(seed=seed, dtype="float64")
    rng = np.random.default_rng(seed + 1000)
    return {k: (v + rng.normal(0.0, noise, v.shape)).astype(dtype)
            for k, v in sorted(params.items())}


def axis_lengths(mod, T: int, T_out: int | None = None) -> dict[str, int]:
    """Steps per time axis: T for the inputs' axis, T_out (default T) for any other."""
    meta = mod.MODEL
    in_axes = {meta["axes"][n] for n in meta["inputs"]}
    return {ax: (T if ax in in_axes else (T_out or T)) for ax in set(meta["axes"].values())}


def random_batch(mod, N: int = 2, T: int = 4, T_out: int | None = None, seed: int = 0,
                 dtype: str = "float64") -> tuple[dict, dict]:
    """Inputs and targets, (N, T, C, H, W), uniform in [0, 1]."""
    rng = np.random.default_rng(seed)
    meta = mod.MODEL
    lengths = axis_lengths(mod, T, T_out)

    def seqs(table):
        return {n: rng.uniform(0.0, 1.0, (N, lengths[meta["axes"][n]]) + tuple(s)).astype(dtype)
                for n, s in sorted(table.items())}

    return seqs(meta["inputs"]), seqs(meta["targets"])


def random_state(mod, N: int = 2, seed: int = 0, scale: float = 0.5) -> dict:
    """A starting state for every state of the model, (N, C, H, W), N(0, scale)."""
    rng = np.random.default_rng(seed + 2000)
    return {n: rng.normal(0.0, scale, (N,) + tuple(s["shape"]))
            for n, s in sorted(mod.MODEL["states"].items())}


def check_gradients(mod, params, inputs, targets, n_dirs: int = 2, **kw) -> dict:
    """runtime/gradcheck.py's float64 check; fail naming every parameter that fails.

    The tests' models keep relu and hard_sigmoid kinks out of a finite
    difference's reach, so a parameter the check could not resolve fails here
    too. Returns each parameter's relative error. `kw`: bptt=, state=, eps=.
    """
    report = gradcheck(mod, params, inputs, targets, dirs=n_dirs, poison=None, **kw)
    assert {p.name for p in report.params} == set(params)
    bad = [p for p in report.params if p.status != "ok"]
    assert not bad, "gradient check: " + "; ".join(
        f"{p.name} {p.status}: error {p.error:.2e}, resolution {p.resolution:.2e}"
        f"{' (' + p.reason + ')' if p.reason else ''}" for p in bad)
    return {p.name: p.error for p in report.params}


def tree_bytes(arrays: dict) -> bytes:
    """Every array's name, dtype, shape and bytes, in name order: for bitwise comparisons."""
    out = []
    for name in sorted(arrays):
        a = np.ascontiguousarray(np.asarray(arrays[name]))
        out.append(f"{name}:{a.dtype.str}:{a.shape}".encode() + a.tobytes())
    return b"\0".join(out)



# Models built from the cells of the standard library (spec/stdlib/std.cell), for the
# tests that check properties of the generated source of every model: each std cell
# alone with a 1x1 head, and a ConvGRU encoder-forecaster (a second loop, init=).
def _std_model(name: str, doc: str, body: str, head: str) -> str:
    return (f'import std\n\nmodel {name} {{\n    """{doc}"""\n'
            "    input x: [1, 8, 8]\n    target y: [1, 8, 8]\n"
            f"{body}"
            "    weight W_out = kernel(1, 1)\n    weight b_out = bias(1)\n"
            f"    pred = sigmoid(conv({head}, W_out) + b_out)\n"
            "    output pred\n    loss mse(pred, y)\n}\n")


def _one_cell(name: str, cell: str, args: str) -> str:
    return _std_model(name, f"One {cell} of std.cell and a 1x1 convolution.",
                      f"    l = {cell}({args})\n    h = l(x)\n", "h")


STD_MODELS = {
    "std_convlstm": _one_cell("std_convlstm", "ConvLSTM",
                              "hidden = 4, kernel = 3, peephole = true"),
    "std_convlstm_nopeep": _one_cell("std_convlstm_nopeep", "ConvLSTM",
                                     "hidden = 4, kernel = 3, peephole = false"),
    "std_convlstm_fused": _one_cell("std_convlstm_fused", "ConvLSTMFused",
                                    "hidden = 4, kernel = 3"),
    "std_convgru": _one_cell("std_convgru", "ConvGRU", "hidden = 4, kernel = 3"),
    "std_gru_forecaster": _std_model(
        "std_gru_forecaster", "A ConvGRU encoder and a ConvGRU forecaster started from its state.",
        "    enc = ConvGRU(hidden = 4, kernel = 3)\n    fc = ConvGRU(hidden = 4, kernel = 3)\n"
        "    h = enc(x)\n    g = fc(steps = y, init = enc)\n", "g"),
}


def std_model_path(name: str) -> Path:
    """The path (not a file) a STD_MODELS text is compiled under: its comments name it."""
    return ROOT / "tests" / f"{name}.cell"


def assert_convc_leaves_out(framework: str, layer_module: str, text: str) -> None:
    """In a fresh interpreter: importing convc and compiling `text` with vjp=True imports
    no `framework`; importing `layer_module` (convc.torch, ...) does."""
    import subprocess
    import sys

    code = (f"import sys, convc, convc.api, convc.runtime.model, convc.runtime.vjp\n"
            f"convc.load(None, text={text!r}, vjp=True)\n"
            f"assert {framework!r} not in sys.modules, '{framework} imported'\n"
            f"import {layer_module}\n"
            f"assert {framework!r} in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def run_docs_python(doc: str, needle: str, cwd: Path) -> dict:
    """Run every ```python block of docs/<doc> in order, in one namespace, in `cwd`;
    one of them must use `needle`. Returns the namespace."""
    import os

    text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks and any(needle in b for b in blocks), f"docs/{doc} shows no {needle}"
    namespace: dict = {"__name__": "docs_" + Path(doc).stem}
    here = os.getcwd()
    os.chdir(cwd)
    try:
        for block in blocks:
            exec(compile(block, f"docs/{doc}", "exec"), namespace)
    finally:
        os.chdir(here)
    return namespace


def every_model() -> list[tuple[str, Path, str]]:
    """(name, path, text) of every example (shrunk), every std-cell model and the
    random models of the invariants record: what a check over "every model" runs."""
    import json

    out = [(p.stem, p, shrink(p.read_text(encoding="utf-8"))) for p in EXAMPLES]
    out += [(name, std_model_path(name), text) for name, text in sorted(STD_MODELS.items())]
    record = json.loads((ROOT / "tests" / "invariants" / "record-Haswell.json").read_text())
    out += [(e["name"], ROOT / "tests" / f"{e['name']}.cell", e["text"])
            for e in record["models"] if e["kind"] == "random"]
    return out

"""runtime/weights.py and `convc export`: parameters as .safetensors files.

Round trips are bit for bit; a file that does not fit the model is refused
with a message naming the first wrong tensor (or field of the fingerprint);
nothing in a file runs; no existing file is replaced without being asked;
and the examples of docs/weights.md run as written. Without the safetensors
package every test here that needs it skips, saying so, and the functions'
own message about the missing package is tested with the package hidden.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convc
from convc import cli
from convc.runtime import weights as W
from convc.runtime.checkpoint import save_checkpoint
from convc.runtime.weights import WeightsError

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "examples" / "seed.cell"
STACK = ROOT / "examples" / "stack.cell"

try:
    import safetensors.numpy as st
except ImportError:
    st = None


@pytest.fixture(autouse=True)
def needs_safetensors(request):
    """Every test but the one about a missing safetensors needs the package."""
    if st is None and "without_safetensors" not in request.node.name:
        pytest.skip("safetensors is not installed (pip install 'convc[safetensors]')")


@pytest.fixture(scope="module")
def seed():
    return convc.load(SEED)


@pytest.fixture(scope="module")
def stack():
    return convc.load(STACK)


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write_raw(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    """A .safetensors file written by safetensors itself, as other code would."""
    st.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
                 metadata=metadata)
    return path


def saved(seed, tmp_path, dtype="float32", name="w.safetensors") -> tuple[dict, Path]:
    params = seed.init_params(seed=1, dtype=dtype)
    return params, convc.save_params(params, tmp_path / name, seed)


# ---------------------------------------------------------------------------
# Round trips and what a file holds
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_is_bit_for_bit(seed, tmp_path, dtype):
    params, path = saved(seed, tmp_path, dtype)
    loaded = convc.load_params(path, seed)
    assert sorted(loaded) == sorted(params)
    for name in params:
        assert loaded[name].dtype == np.dtype(dtype)
        assert loaded[name].tobytes() == params[name].tobytes()
    # also through a .cell path and a MODEL table, and with the dtype asked for
    for model in (SEED, seed.MODEL):
        again = convc.load_params(path, model, dtype=dtype)
        assert all(np.array_equal(again[k], params[k]) for k in params)


def test_the_file_has_the_models_names_shapes_and_fingerprint(seed, tmp_path):
    params, path = saved(seed, tmp_path)
    with st.safe_open(str(path), framework="np") as f:
        names, meta = sorted(f.keys()), f.metadata()
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
    assert names == sorted(seed.MODEL["params"])
    assert shapes == {k: tuple(v["shape"]) for k, v in seed.MODEL["params"].items()}
    assert meta["convc.format"] == "params" and meta["convc.model"] == "seed"
    assert meta["convc.fingerprint"] == W.model_fingerprint(seed)
    assert re.fullmatch(r"[0-9a-f]{64}", meta["convc.fingerprint"])
    interface = json.loads(meta["convc.interface"])
    assert interface["params"]["lstm.W"] == [list(seed.MODEL["params"]["lstm.W"]["shape"]),
                                             "kernel"]
    assert interface["cells"] == {"lstm": "SeedLSTM"}


def test_user_metadata_is_kept_and_convc_keys_are_reserved(seed, tmp_path):
    params = seed.init_params(seed=0)
    path = convc.save_params(params, tmp_path / "m.safetensors", seed,
                             metadata={"trained_on": "moving mnist"})
    assert W.read_weights(path)[1]["trained_on"] == "moving mnist"
    with pytest.raises(WeightsError, match="convc's own"):
        convc.save_params(params, tmp_path / "n.safetensors", seed,
                          metadata={"convc.model": "x"})
    with pytest.raises(WeightsError, match="strings to strings"):
        convc.save_params(params, tmp_path / "n.safetensors", seed, metadata={"step": 3})
    assert not (tmp_path / "n.safetensors").exists()


def test_the_fingerprint_covers_the_interface_not_comments(tmp_path):
    text = SEED.read_text()
    base = W.model_fingerprint(convc.load(None, text=text))
    commented = text.replace("model seed {", "# a comment\nmodel seed {")
    retrained = text.replace("steps = 200", "steps = 300")
    assert W.model_fingerprint(convc.load(None, text=commented)) == base
    assert W.model_fingerprint(convc.load(None, text=retrained)) == base
    wider = text.replace("hidden = 8", "hidden = 6")
    renamed = text.replace("model seed {", "model seed2 {")
    for other in (wider, renamed):
        assert W.model_fingerprint(convc.load(None, text=other)) != base


# ---------------------------------------------------------------------------
# Files that do not fit are refused, naming the first wrong tensor
# ---------------------------------------------------------------------------


def test_another_models_file_names_the_first_missing_tensor(seed, stack, tmp_path):
    _, path = saved(seed, tmp_path)
    with pytest.raises(WeightsError) as err:
        convc.load_params(path, stack)
    message = str(err.value)
    assert f"{path}: tensor W_out is missing" in message
    assert "written for model 'seed'" in message


def test_missing_extra_shape_and_dtype_are_named(seed, tmp_path):
    params = seed.init_params(seed=0)
    cases = {
        "lstm.b_c is missing": {k: v for k, v in params.items() if k != "lstm.b_c"},
        "tensor extra is not a parameter": {**params, "extra": np.zeros(2, np.float32)},
        r"tensor lstm\.W has shape \(32, 9, 3, 2\), model seed needs \(32, 9, 3, 3\)":
            {**params, "lstm.W": params["lstm.W"][..., :2]},
        "tensor b_y has dtype int32": {**params, "b_y": params["b_y"].astype(np.int32)},
        "tensor lstm.W has dtype float64 but W_y has float32":
            {**params, "lstm.W": params["lstm.W"].astype(np.float64)},
    }
    meta = W.metadata_for(seed)
    for i, (expected, tensors) in enumerate(cases.items()):
        path = write_raw(tmp_path / f"case{i}.safetensors", tensors, meta)
        with pytest.raises(WeightsError, match=expected):
            convc.load_params(path, seed)
        with pytest.raises(WeightsError, match=expected.replace(f"{path}: ", "")):
            convc.save_params(tensors, tmp_path / f"out{i}.safetensors", seed)
        assert not (tmp_path / f"out{i}.safetensors").exists()


def test_a_dtype_asked_for_must_be_the_files(seed, tmp_path):
    _, path = saved(seed, tmp_path, "float32")
    with pytest.raises(WeightsError, match=r"W_y has dtype float32, float64 was asked for"):
        convc.load_params(path, seed, dtype="float64")


def test_a_wrong_fingerprint_is_refused_and_explained(seed, tmp_path):
    params = seed.init_params(seed=0)
    # the same parameters, but the file says its model had another state shape
    meta = W.metadata_for(seed)
    interface = json.loads(meta["convc.interface"])
    interface["states"]["lstm.c"] = [8, 8, 8]
    meta["convc.interface"] = json.dumps(interface)
    meta["convc.fingerprint"] = "0" * 64
    path = write_raw(tmp_path / "other.safetensors", params, meta)
    with pytest.raises(WeightsError, match=r"another model: its states lstm\.c is \[8, 8, 8\], "
                                           r"here \[8, 16, 16\]"):
        convc.load_params(path, seed)
    assert sorted(convc.load_params(path, seed, check_fingerprint=False)) == sorted(params)


def test_a_file_without_convc_metadata_needs_check_fingerprint_false(seed, tmp_path):
    params = seed.init_params(seed=0)
    path = write_raw(tmp_path / "plain.safetensors", params)
    with pytest.raises(WeightsError, match="no convc metadata"):
        convc.load_params(path, seed)
    loaded = convc.load_params(path, seed, check_fingerprint=False)
    assert all(np.array_equal(loaded[k], params[k]) for k in params)
    meta = {**W.metadata_for(seed), "convc.format_version": "99"}
    with pytest.raises(WeightsError, match="format version '99'"):
        convc.load_params(write_raw(tmp_path / "v99.safetensors", params, meta), seed)


def test_non_finite_values_are_refused_unless_allowed(seed, tmp_path):
    params = seed.init_params(seed=0)
    params["lstm.b_i"][0, 0, 0] = np.nan
    params["lstm.b_i"][1, 0, 0] = np.inf
    path = convc.save_params(params, tmp_path / "nan.safetensors", seed)
    with pytest.raises(WeightsError, match="lstm.b_i has 2 non-finite values"):
        convc.load_params(path, seed)
    assert np.isnan(convc.load_params(path, seed, allow_nonfinite=True)["lstm.b_i"][0, 0, 0])


def test_files_that_are_not_safetensors_are_refused(seed, tmp_path):
    params, good = saved(seed, tmp_path)
    data = good.read_bytes()
    npz = save_checkpoint(tmp_path / "run", 1, {f"param/{k}": v for k, v in params.items()},
                          {"model": "seed"})
    cases = {"empty": b"", "garbage": b"\x00" * 3 + b"not a weights file",
             "truncated": data[: len(data) // 2], "npz": npz.read_bytes()}
    for name, content in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(WeightsError, match=r"not a readable \.safetensors file"):
            convc.load_params(path, seed)
    with pytest.raises(WeightsError, match="not found"):
        convc.load_params(tmp_path / "nope.safetensors", seed)
    with pytest.raises(WeightsError, match="is a folder"):
        convc.load_params(tmp_path, seed)


class _Planted:
    """Unpickling this creates a file: the proof that a loader ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def test_nothing_in_a_file_runs(seed, tmp_path):
    marker = tmp_path / "ran"
    assert pickle.loads(pickle.dumps(_Planted(str(marker)))) is None and marker.exists()
    marker.unlink()
    path = tmp_path / "pickle.safetensors"
    path.write_bytes(pickle.dumps({"lstm.W": _Planted(str(marker))}))
    with pytest.raises(WeightsError):
        convc.load_params(path, seed)
    # a header that is valid JSON but names a pickled dtype is refused too
    header = json.dumps({"lstm.W": {"dtype": "O", "shape": [1], "data_offsets": [0, 8]}})
    blob = len(header).to_bytes(8, "little") + header.encode() + b"\0" * 8
    (tmp_path / "object.safetensors").write_bytes(blob)
    with pytest.raises(WeightsError):
        convc.load_params(tmp_path / "object.safetensors", seed)
    assert not marker.exists()


# ---------------------------------------------------------------------------
# Writing: never over an existing file unless asked, atomically
# ---------------------------------------------------------------------------


def test_an_existing_file_is_refused_unless_overwrite(seed, tmp_path):
    target = tmp_path / "mine.safetensors"
    target.write_bytes(b"my own file")
    params = seed.init_params(seed=0)
    with pytest.raises(WeightsError, match="refusing to replace .*overwrite=True"):
        convc.save_params(params, target, seed)
    assert target.read_bytes() == b"my own file"
    convc.save_params(params, target, seed, overwrite=True)
    assert sorted(convc.load_params(target, seed)) == sorted(params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.safetensors"]  # no temporaries


def test_a_spec_or_a_folder_is_never_written(seed, tmp_path):
    spec = tmp_path / "seed.cell"
    spec.write_text(SEED.read_text())
    params = seed.init_params(seed=0)
    for path in (spec, tmp_path):
        with pytest.raises(convc.errors.ConvcError, match="refusing to write|is a folder"):
            convc.save_params(params, path, seed, overwrite=True)
    assert spec.read_text() == SEED.read_text()


def test_a_file_appearing_during_the_write_is_not_replaced(seed, tmp_path, monkeypatch):
    target = tmp_path / "race.safetensors"
    real_link = os.link

    def someone_else_writes_first(src, dst, *args, **kwargs):
        Path(dst).write_bytes(b"theirs")
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", someone_else_writes_first)
    with pytest.raises(WeightsError, match="appeared while it was being written"):
        convc.save_params(seed.init_params(seed=0), target, seed)
    assert target.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race.safetensors"]


def test_a_failed_write_leaves_nothing(seed, tmp_path, monkeypatch):
    def full_disk(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(WeightsError, match="No space left on device"):
        convc.save_params(seed.init_params(seed=0), tmp_path / "w.safetensors", seed)
    assert list(tmp_path.iterdir()) == []


def test_without_safetensors_the_message_says_what_to_install(seed, tmp_path, monkeypatch,
                                                               capsys):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    for call in (lambda: convc.save_params({}, tmp_path / "w.safetensors", seed),
                 lambda: convc.load_params(tmp_path / "w.safetensors", seed)):
        with pytest.raises(WeightsError, match=r"pip install 'convc\[safetensors\]'"):
            call()
    code, out, err = run(capsys, "export", SEED, "--checkpoint", tmp_path, "-o",
                         tmp_path / "w.safetensors")
    assert code == 1 and "convc[safetensors]" in err and "Traceback" not in err


# ---------------------------------------------------------------------------
# convc export
# ---------------------------------------------------------------------------


@pytest.fixture
def run_folder(seed, tmp_path):
    params = seed.init_params(seed=4)
    save_checkpoint(tmp_path / "run", 3, {f"param/{k}": v for k, v in params.items()},
                    {"model": "seed"})
    return tmp_path / "run", params


def test_export_writes_what_load_params_reads(capsys, seed, tmp_path, run_folder):
    folder, params = run_folder
    out = tmp_path / "seed.safetensors"
    code, stdout, err = run(capsys, "export", SEED, "--checkpoint", folder, "-o", out)
    assert code == 0, err
    assert f"wrote {out}: 7 parameters of model seed" in stdout and "(step 3)" in stdout
    loaded = convc.load_params(out, seed)
    assert all(loaded[k].tobytes() == params[k].tobytes() for k in params)
    assert W.read_weights(out)[1]["step"] == "3"


def test_export_refuses_to_replace_a_file(capsys, tmp_path, run_folder):
    folder, _ = run_folder
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"my own")
    code, stdout, err = run(capsys, "export", SEED, "--checkpoint", folder, "-o", out)
    assert code == 1 and stdout == "" and "Traceback" not in err
    assert err.strip() == f"convc: error: refusing to replace {out}: it exists (--overwrite " \
                          f"replaces it)"
    assert out.read_bytes() == b"my own"
    code, _, err = run(capsys, "export", SEED, "--checkpoint", folder, "-o", out, "--overwrite")
    assert code == 0 and out.read_bytes() != b"my own"


def test_export_never_writes_over_its_inputs(capsys, tmp_path, run_folder):
    folder, _ = run_folder
    spec = tmp_path / "seed.cell"
    spec.write_text(SEED.read_text())
    checkpoint = next(folder.iterdir())
    before = checkpoint.read_bytes()
    for out in (checkpoint, spec):
        code, _, err = run(capsys, "export", spec, "--checkpoint", folder, "-o", out,
                           "--overwrite")
        assert code == 1 and "refusing to write" in err and "Traceback" not in err
    assert checkpoint.read_bytes() == before and spec.read_text() == SEED.read_text()


def test_export_errors_are_one_line_and_exit_1(capsys, tmp_path, run_folder):
    folder, _ = run_folder
    out = tmp_path / "x.safetensors"
    cases = [
        ([STACK, "--checkpoint", folder], "written by model 'seed', not 'stack'"),
        ([SEED, "--checkpoint", tmp_path / "none.npz"], "checkpoint not found"),
        ([SEED, "--checkpoint", tmp_path], "no valid checkpoint in this folder"),
    ]
    for argv, expected in cases:
        code, stdout, err = run(capsys, "export", *argv, "-o", out)
        assert code == 1 and stdout == "", err
        assert expected in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    assert not out.exists()
    code, _, err = run(capsys, "export", SEED, "-o", out)
    assert code == 2 and "--checkpoint" in err


def test_export_refuses_non_finite_parameters_unless_allowed(capsys, seed, tmp_path):
    params = seed.init_params(seed=0)
    params["W_y"][0, 0, 0, 0] = np.nan
    save_checkpoint(tmp_path / "bad", 1, {f"param/{k}": v for k, v in params.items()},
                    {"model": "seed"})
    out = tmp_path / "nan.safetensors"
    code, _, err = run(capsys, "export", SEED, "--checkpoint", tmp_path / "bad", "-o", out)
    assert code == 1 and "W_y has 1 non-finite value" in err and not out.exists()
    code, _, err = run(capsys, "export", SEED, "--checkpoint", tmp_path / "bad", "-o", out,
                       "--allow-nonfinite")
    assert code == 0 and out.exists()


# ---------------------------------------------------------------------------
# docs/weights.md
# ---------------------------------------------------------------------------


def doc_blocks(kind: str) -> list[str]:
    text = (ROOT / "docs" / "weights.md").read_text()
    return re.findall(rf"```{kind}\n(.*?)```", text, flags=re.S)


@pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_the_docs_examples_run(tmp_path, monkeypatch):
    """Every ```python block of docs/weights.md, in order in one namespace, and every
    ```sh block, in a copy of the project's examples/ (the docs' paths are relative)."""
    blocks = doc_blocks("python")
    assert len(blocks) >= 5 and doc_blocks("sh")
    if os.environ.setdefault("KERAS_BACKEND", "torch") != "torch":
        pytest.skip("docs/weights.md runs Keras on its torch backend")
    for module in ("torch", "keras"):
        assert any(f"import {module}" in block for block in blocks)
        pytest.importorskip(module, reason=f"docs/weights.md's examples use {module}, which "
                                           f"is not installed")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_weights"}
    script = Path(sys.executable).parent / "convc"
    for block in doc_blocks("sh"):
        for line in block.strip().splitlines():
            if line.startswith("convc "):
                result = subprocess.run([str(script), *line.split()[1:]], capture_output=True,
                                        text=True, timeout=300)
                assert result.returncode == 0, (line, result.stderr)
    for block in blocks:
        exec(compile(block, "docs/weights.md", "exec"), namespace)


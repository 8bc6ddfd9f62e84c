"""convc.runtime.predict, the Python API behind `convc predict`, and the runtime's layering.

The CLI's predict tests (tests/test_cli.py, test_checkpoint.py, test_data.py)
go through the command line; these call the runtime directly: the shapes of
next-frame, forecast and patched predictions, that they are the model's
forward pass, the files `save` writes, and its refusal to replace an input.
The last tests check that no runtime module imports `convc.api`, the layer
above it.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convc.api as api
from convc.errors import CheckpointError, ConvcError, DataError
from convc.runtime import predict as P
from convc.runtime.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "examples" / "seed.cell"
FORECASTER = ROOT / "examples" / "encoder_forecaster.cell"

# The seed model on 2x2 patches: 8x8 frames of 4 channels, 16x16 pixels unpatched.
PATCHED = SEED.read_text().replace("[1, 16, 16]", "[4, 8, 8]").replace(
    "kernel(1, 1)", "kernel(4, 1)").replace("bias(1, per_pixel = true)",
                                            "bias(4, per_pixel = true)")


def _checkpoint(mod, folder: Path, config: dict | None = None, nan: bool = False) -> Path:
    """A checkpoint of mod's seeded initial parameters (one NaN with `nan`), as a run
    would write it, with `config` as the run's saved settings."""
    params = mod.init_params(seed=0)
    if nan:
        name = sorted(params)[0]
        params[name] = params[name].copy()
        params[name].flat[0] = np.nan
    arrays = {f"param/{k}": np.asarray(v) for k, v in params.items()}
    return save_checkpoint(folder, 0, arrays, {"model": mod.MODEL["name"],
                                               "config": config or {}})


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory):
    """A real run folder: three training steps of the seed model on 4-frame clips."""
    mod = api.load(SEED)
    out = tmp_path_factory.mktemp("predict") / "run"
    mod.train(steps=3, clips=8, frames_in=4, out=out, progress=False)
    return mod, out


def test_next_frame_predictions_from_a_run_folder(seed_run, tmp_path):
    mod, run = seed_run
    pred = P.predict(mod, run, data="synthetic", clips=3)
    assert isinstance(pred, P.Predictions) and pred.task == "next_frame"
    assert pred.predictions.shape == (3, 4, 1, 16, 16) and pred.predictions.dtype == np.float32
    assert pred.inputs.shape == pred.targets.shape == (3, 4, 1, 16, 16)
    # the targets are the inputs one frame later
    np.testing.assert_array_equal(pred.targets[:, :-1], pred.inputs[:, 1:])
    assert pred.frames_in == 4 and pred.frames_out is None and pred.step == 3
    assert pred.checkpoint == run / "ckpt-00000003.npz"
    assert pred.describe() == (f"predicted the next frame at each of 4 steps for 3 sequences "
                               f"with {run / 'ckpt-00000003.npz'} (step 3)")
    # the same through convc.load's convenience, and generated clips default to 8
    again = mod.predict(run, data="synthetic")
    assert again.predictions.shape == (8, 4, 1, 16, 16)


def test_predictions_are_the_models_forward_pass(seed_run):
    mod, run = seed_run
    clips = np.random.default_rng(1).uniform(0, 1, (20, 6, 1, 16, 16)).astype(np.float32)
    pred = P.predict(mod, run, clips=clips)  # 20 clips: two batches of at most 16
    assert pred.data == "<array>"
    np.testing.assert_array_equal(pred.inputs, clips[:, :4])
    np.testing.assert_array_equal(pred.targets, clips[:, 1:5])
    from convc.runtime.predict import load_checkpoint_params

    params, _, _ = load_checkpoint_params(run, mod.MODEL)
    outputs, _ = mod.forward(params, {"x": clips[:, :4]})
    np.testing.assert_allclose(pred.predictions, outputs["pred"], rtol=1e-6, atol=1e-7)


def test_forecast_predictions_have_steps_frames(tmp_path):
    mod = api.load(FORECASTER)
    ckpt = _checkpoint(mod, tmp_path / "run", {"frames_in": 3, "frames_out": 2})
    pred = P.predict(mod, ckpt, data="synthetic", clips=2)
    assert pred.task == "forecast" and (pred.frames_in, pred.frames_out) == (3, 2)
    assert pred.inputs.shape == (2, 3, 1, 16, 16)
    assert pred.targets.shape == pred.predictions.shape == (2, 2, 1, 16, 16)
    longer = P.predict(mod, ckpt, data="synthetic", clips=2, steps=6)
    assert longer.predictions.shape == longer.targets.shape == (2, 6, 1, 16, 16)
    assert longer.describe().startswith("predicted 6 frames after 3 input frames for 2 "
                                        "sequences with ")
    # clips too short for the frames to predict: predictions without targets
    short = np.random.default_rng(0).uniform(0, 1, (2, 4, 1, 16, 16)).astype(np.float32)
    beyond = P.predict(mod, ckpt, clips=short, steps=5)
    assert beyond.targets is None and beyond.predictions.shape == (2, 5, 1, 16, 16)
    with pytest.raises(DataError, match="clips have 2 frames; the model reads 3"):
        P.predict(mod, ckpt, clips=short[:, :2])


def test_patched_models_predict_full_frames(tmp_path):
    mod = api.load(None, text=PATCHED)
    assert tuple(mod.MODEL["inputs"]["x"]) == (4, 8, 8)
    ckpt = _checkpoint(mod, tmp_path / "run", {"frames_in": 3})
    pred = P.predict(mod, ckpt, data="synthetic", clips=2)
    assert pred.patch == 2
    for frames in (pred.inputs, pred.targets, pred.predictions):
        assert frames.shape == (2, 3, 1, 16, 16)


def test_save_writes_the_npy_and_the_png(seed_run, tmp_path):
    pytest.importorskip("matplotlib")
    mod, run = seed_run
    pred = P.predict(mod, run, data="synthetic", clips=2)
    out = tmp_path / "new" / "folder"
    written = P.save(pred, out)
    assert written == {"predictions": out / "predictions.npy", "png": out / "predictions.png"}
    np.testing.assert_array_equal(np.load(out / "predictions.npy"), pred.predictions)
    assert (out / "predictions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["predictions.npy", "predictions.png"]
    other = tmp_path / "npy-only"
    assert P.save(pred, other, png=False) == {"predictions": other / "predictions.npy"}
    assert [p.name for p in other.iterdir()] == ["predictions.npy"]


def test_save_never_replaces_the_data_it_read(seed_run, tmp_path, capsys):
    from convc.cli import main

    mod, run = seed_run
    data = tmp_path / "predictions.npy"
    np.save(data, np.random.default_rng(0).uniform(0, 1, (2, 5, 1, 16, 16)).astype(np.float32))
    before = data.read_bytes()
    pred = P.predict(mod, run, data=str(data))
    assert str(data) in pred.sources and str(run / "ckpt-00000003.npz") in pred.sources
    with pytest.raises(ConvcError, match="refusing to write .*predictions.npy: it is an input"):
        P.save(pred, tmp_path)
    # the command line refuses before any work, and writes nothing
    code = main(["predict", str(SEED), "--checkpoint", str(run), "--data", str(data),
                 "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and "refusing to write" in err and "input" in err
    assert data.read_bytes() == before and not (tmp_path / "predictions.png").exists()


def test_non_finite_checkpoints_are_refused_unless_allowed(tmp_path):
    mod = api.load(SEED)
    ckpt = _checkpoint(mod, tmp_path / "run", {"frames_in": 2}, nan=True)
    with pytest.raises(CheckpointError, match="non-finite value .*--allow-nonfinite"):
        P.predict(mod, ckpt, data="synthetic", clips=1)
    pred = P.predict(mod, ckpt, data="synthetic", clips=1, allow_nonfinite=True)
    assert pred.predictions.shape == (1, 2, 1, 16, 16)


def test_data_defaults_to_the_runs(tmp_path):
    mod = api.load(SEED)
    ckpt = _checkpoint(mod, tmp_path / "run", {"data": "synthetic:shapes", "frames_in": 2,
                                               "clips": 64})
    pred = P.predict(mod, ckpt)
    assert pred.data == "synthetic:shapes" and len(pred.predictions) == P.GENERATED_CLIPS


# ---------------------------------------------------------------------------
# Layering: the runtime never imports convc.api
# ---------------------------------------------------------------------------

RUNTIME = sorted(p.stem for p in (ROOT / "runtime").glob("*.py") if p.stem != "__init__")


def _api_imports(path: Path) -> list[str]:
    """Lines of `path` that import convc.api (or `api` from convc)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        if any(n == "convc.api" or n.startswith("convc.api.") for n in names):
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_no_runtime_module_imports_convc_api():
    assert "predict" in RUNTIME and "loader" in RUNTIME
    found = [hit for name in RUNTIME for hit in _api_imports(ROOT / "runtime" / f"{name}.py")]
    assert found == [], f"the runtime imports convc.api at {found}"


def test_importing_and_using_the_runtime_leaves_convc_api_unimported(tmp_path):
    """Every runtime module imported, a spec loaded and a prediction made, in a fresh
    interpreter: convc.api never appears in sys.modules."""
    script = f"""
import importlib, sys
failed = []
for name in {RUNTIME!r}:
    try:
        importlib.import_module("convc.runtime." + name)
    except ImportError as exc:   # an optional dependency (chainer, cupy) missing
        failed.append((name, str(exc)))
from convc.runtime import loader, predict
mod = loader.load({str(SEED)!r})
assert "convc.api" not in sys.modules, "imported by a runtime module"
import numpy as np
from convc.runtime.checkpoint import save_checkpoint
arrays = {{"param/" + k: np.asarray(v) for k, v in mod.init_params(seed=0).items()}}
ckpt = save_checkpoint({str(tmp_path)!r}, 0, arrays, {{"model": "seed"}})
p = predict.predict(mod, ckpt, data="synthetic", clips=1)
assert "convc.api" not in sys.modules, "imported by predict"
print("ok", failed)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok"), result.stdout


def test_convc_load_and_the_runtime_loader_agree():
    from convc.runtime import loader

    a, b = api.load(SEED), loader.load(SEED)
    assert a.source == b.source and a.spec_path == b.spec_path == str(SEED)
    assert a.compiled.program.modules.keys() == b.compiled.program.modules.keys()
    assert callable(a.predict) and callable(a.train) and not hasattr(b, "predict")
    assert api.module_from_source is loader.module_from_source

"""runtime/evaluate.py: forecasts scored on full frames beside two baselines, and `convc eval`.

The metric functions have their own tests (test_metrics.py); here the
baselines are checked against numbers worked out by hand on constant frames,
where SSIM has a closed form, and the plumbing (patching, checkpoints, the
run's held-out split) end to end on a tiny model.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import convc.api as api
from convc.errors import ConvcError, DataError
from convc.runtime import data as D
from convc.runtime import evaluate as E
from convc.runtime.checkpoint import save_checkpoint
from convc.runtime.metrics import SSIM_K1

# A tiny encoder-forecaster that reads 16x16 frames cut into 2x2 patches.
TINY = """
import std

model tiny {
    input x: [4, 8, 8]
    target y: [4, 8, 8]
    enc = ConvLSTM(hidden = 2, kernel = 3)
    fc = ConvLSTM(hidden = 2, kernel = 3)
    h = enc(x)
    g = fc(steps = y, init = enc)
    weight W_out = kernel(4, 1)
    weight b_out = bias(4)
    pred = sigmoid(conv(g, W_out) + b_out)
    output pred
    loss bce(pred, y)
    train { optimizer = "rmsprop"; lr = 0.001; frames_in = 3; frames_out = 2 }
}
"""

# A next-frame model (one time axis), for the roll-out.
NEXT_FRAME = """
import std

model nextframe {
    input x: [1, 16, 16]
    target y: [1, 16, 16]
    lstm = ConvLSTM(hidden = 2, kernel = 3)
    h = lstm(x)
    weight W_out = kernel(1, 1)
    weight b_out = bias(1)
    pred = sigmoid(conv(h, W_out) + b_out)
    output pred
    loss bce(pred, y)
}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "tiny.cell"
    path.write_text(TINY, encoding="utf-8")
    return path, api.load(path)


def _constant_clips(values) -> np.ndarray:
    """Clips (N, L, 1, 16, 16) whose frames are each one constant value."""
    values = np.asarray(values, dtype=np.float64)
    return np.broadcast_to(values[:, :, None, None, None], values.shape + (1, 16, 16)).copy()


def _ssim_constant(a: float, b: float) -> float:
    """SSIM of two constant frames: no variance, so only the luminance term is left."""
    c1 = SSIM_K1 ** 2
    return (2 * a * b + c1) / (a * a + b * b + c1)


def _psnr(mse_per_pixel: float) -> float:
    return 100.0 if mse_per_pixel == 0 else -10 * math.log10(mse_per_pixel)


def test_baselines_by_hand_on_a_two_frame_toy(tiny):
    _, mod = tiny
    params = mod.init_params(seed=0)
    clips = _constant_clips([[0.1, 0.3],     # moves: copying 0.1 is off by 0.2
                             [0.5, 0.5]])    # still: copying is exact
    train = _constant_clips([[0.2, 0.6]])    # mean frame 0.4
    results = E.evaluate_model(mod, params, clips, frames_in=1, frames_out=1,
                               train_clips=train)
    pixels = 16 * 16

    copy = results["copy_last"]
    assert copy["mse"] == pytest.approx((pixels * 0.2 ** 2 + 0.0) / 2)        # 5.12
    assert copy["mae"] == pytest.approx((pixels * 0.2 + 0.0) / 2)             # 25.6
    assert copy["psnr"] == pytest.approx((_psnr(0.04) + 100.0) / 2)
    assert copy["ssim"] == pytest.approx((_ssim_constant(0.1, 0.3) + 1.0) / 2)
    assert copy["per_frame_mse"] == pytest.approx([5.12])

    mean = results["mean_frame"]
    assert mean["mse"] == pytest.approx(pixels * 0.1 ** 2)                    # 2.56
    assert mean["mae"] == pytest.approx(pixels * 0.1)                         # 25.6
    assert mean["psnr"] == pytest.approx(_psnr(0.01))                         # 20 dB
    assert mean["ssim"] == pytest.approx((_ssim_constant(0.4, 0.3)
                                          + _ssim_constant(0.4, 0.5)) / 2)
    assert results["mean_frame_source"] == "training clips"
    assert (results["sequences"], results["patch"], results["frame"]) == (2, 2, [1, 16, 16])


def test_mean_frame_without_training_clips_uses_the_inputs(tiny):
    _, mod = tiny
    clips = _constant_clips([[0.1, 0.3], [0.5, 0.5]])
    results = E.evaluate_model(mod, mod.init_params(seed=0), clips, 1, 1)
    # mean of the two input frames (0.1 and 0.5) is 0.3: exact for seq 0, off by 0.2 for seq 1
    assert results["mean_frame"]["mse"] == pytest.approx(16 * 16 * 0.04 / 2)
    assert results["mean_frame_source"] == "evaluated inputs"


def test_model_row_scores_the_unpatched_forecast(tiny):
    _, mod = tiny
    params = mod.init_params(seed=1)
    clips = D.synthetic_clips(5, 5, size=16, seed=3)
    results = E.evaluate_model(mod, params, clips, 3, 2, batch_size=2)
    outputs, _ = mod.forward(params, {"x": D.patch(clips[:, :3], 2)}, steps=2)
    expected = E.score(D.unpatch(outputs["pred"], 2), clips[:, 3:5])
    for key in E.METRICS:
        assert results["model"][key] == pytest.approx(expected[key], rel=1e-5)
    assert len(results["model"]["per_frame_mse"]) == 2


def test_next_frame_model_is_rolled_out(tmp_path):
    path = tmp_path / "nextframe.cell"
    path.write_text(NEXT_FRAME, encoding="utf-8")
    mod = api.load(path)
    params = mod.init_params(seed=2, dtype="float64")
    inputs = D.synthetic_clips(2, 4, size=16, seed=4, dtype=np.float64)
    pred = E.forecast_frames(mod, params, inputs, frames_out=3)
    assert pred.shape == (2, 3, 1, 16, 16)
    # Fed its own forecasts as inputs, the model must predict the same frames again.
    fed = np.concatenate([inputs, pred[:, :2].astype(np.float64)], axis=1)
    outputs, _ = mod.forward(params, {"x": fed})
    np.testing.assert_allclose(outputs["pred"][:, -3:], pred, rtol=1e-5, atol=1e-6)


def test_patch_inference():
    assert E.infer_patch((16, 16, 16), (1, 64, 64)) == 4
    assert E.infer_patch((1, 16, 16), (1, 16, 16)) == 1
    with pytest.raises(DataError, match="do not fit"):
        E.infer_patch((16, 16, 16), (1, 32, 32))


def test_beats_baselines():
    good = {"model": {"mse": 1.0, "ssim": 0.9}, "copy_last": {"mse": 2.0, "ssim": 0.5},
            "mean_frame": {"mse": 1.5, "ssim": 0.4}}
    assert E.beats_baselines(good)
    good["mean_frame"]["mse"] = 0.5
    assert not E.beats_baselines(good)


# -- convc eval ---------------------------------------------------------------------


def _tiny_checkpoint(folder, mod, config: dict, step: int = 7):
    params = mod.init_params(seed=5)
    arrays = {f"param/{name}": value for name, value in params.items()}
    arrays["optim/t"] = np.array(step)
    return save_checkpoint(folder, step, arrays, {"model": "tiny", "config": config})


RUN = {"data": "synthetic", "clips": 12, "seed": 0, "val_fraction": 0.25,
       "frames_in": 3, "frames_out": 2}


def test_eval_command_prints_all_metrics_and_both_baselines(tiny, tmp_path, capsys):
    spec, mod = tiny
    ckpt = _tiny_checkpoint(tmp_path / "run", mod, RUN)
    out_json = tmp_path / "eval.json"
    png = tmp_path / "eval.png"
    code = E.main([str(spec), "--checkpoint", str(ckpt), "--json", str(out_json),
                   "--png", str(png), "--batch-size", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    for word in ("MSE", "MAE", "SSIM", "PSNR", "model", "copy last input",
                 "mean training frame", "held-out", "step 7"):
        assert word in printed
    results = json.loads(out_json.read_text())
    assert results["sequences"] == 3        # 25% of 12 clips held out, as the run did
    assert results["patch"] == 2 and results["frame"] == [1, 16, 16]
    for row in ("model", "copy_last", "mean_frame"):
        assert all(math.isfinite(results[row][m]) for m in E.METRICS)
    assert png.stat().st_size > 0


@pytest.mark.parametrize("variant, label", [
    ("gaussian", "SSIM (gaussian 11x11, sigma 1.5)"),
    ("uniform", "SSIM (uniform 7x7, as OpenSTL)"),
])
def test_eval_names_the_ssim_variant_in_the_table_and_the_json(tiny, tmp_path, capsys,
                                                              variant, label):
    from convc.runtime import metrics

    spec, mod = tiny
    ckpt = _tiny_checkpoint(tmp_path / "run", mod, RUN)
    out_json = tmp_path / "eval.json"
    argv = [str(spec), "--checkpoint", str(ckpt), "--json", str(out_json), "--batch-size", "2"]
    if variant != "gaussian":  # the default
        argv += ["--ssim", variant]
    assert E.main(argv) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("prediction"))
    assert f"{label[:-1]}; higher is better)" in header
    assert f"; {label};" in printed  # the line that says how the clips were scored
    results = json.loads(out_json.read_text())
    assert results["ssim_variant"] == metrics.ssim_info(variant)
    assert results["ssim_variant"]["label"] == label
    # the JSON's numbers are that variant's: the copy-last baseline, recomputed
    parser = E.add_eval_arguments(__import__("argparse").ArgumentParser())
    clips, _, _ = E.evaluation_data(mod, RUN, parser.parse_args(argv), 3, 2)
    copy = metrics.baseline_copy_last(clips[:, :3], 2)
    assert results["copy_last"]["ssim"] == pytest.approx(
        metrics.ssim(copy, clips[:, 3:5], variant=variant), abs=1e-12)
    other = "uniform" if variant == "gaussian" else "gaussian"
    assert results["copy_last"]["ssim"] != pytest.approx(
        metrics.ssim(copy, clips[:, 3:5], variant=other), abs=1e-6)
    assert E.format_table(results, markdown=True).splitlines()[0].count(label[:-1]) == 1


def test_eval_refuses_an_unknown_ssim_variant(tiny, tmp_path, capsys):
    spec, mod = tiny
    ckpt = _tiny_checkpoint(tmp_path / "run", mod, RUN)
    with pytest.raises(SystemExit):
        E.main([str(spec), "--checkpoint", str(ckpt), "--ssim", "box"])
    assert "invalid choice: 'box'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown SSIM variant"):
        E.evaluate_model(mod, mod.init_params(seed=0), _constant_clips([[0.1, 0.3]]), 1, 1,
                         ssim_variant="box")


def test_eval_holds_out_the_runs_validation_clips(tiny, tmp_path):
    spec, mod = tiny
    ckpt = _tiny_checkpoint(tmp_path / "run", mod, RUN)
    parser = E.add_eval_arguments(__import__("argparse").ArgumentParser())
    args = parser.parse_args([str(spec), "--checkpoint", str(ckpt.parent)])
    clips, train, chosen = E.evaluation_data(mod, RUN, args, 3, 2)
    # The run's clips, regenerated and split the same way (runtime/data.split).
    every = D.synthetic_clips(12, 5, size=16, seed=0)
    expected_train, expected_val = D.split(every, 0.25, seed=0)
    np.testing.assert_array_equal(clips, expected_val)
    np.testing.assert_array_equal(train, expected_train)
    assert "held-out" in chosen

    other = parser.parse_args([str(spec), "--checkpoint", str(ckpt), "--seed", "9",
                               "--clips", "4"])
    clips, _, chosen = E.evaluation_data(mod, RUN, other, 3, 2)
    np.testing.assert_array_equal(clips, D.synthetic_clips(4, 5, size=16, seed=9))
    assert chosen == "every clip of synthetic"
    with pytest.raises(ConvcError, match="--split val"):
        E.evaluation_data(mod, RUN, parser.parse_args(
            [str(spec), "--checkpoint", str(ckpt), "--seed", "9", "--split", "val"]), 3, 2)


def test_eval_refuses_a_checkpoint_of_another_model(tiny, tmp_path, capsys):
    spec, mod = tiny
    params = mod.init_params(seed=0)
    arrays = {f"param/{name}": value for name, value in params.items() if name != "W_out"}
    ckpt = save_checkpoint(tmp_path, 1, arrays, {"config": RUN})
    assert E.main([str(spec), "--checkpoint", str(ckpt)]) == 1
    assert "missing ['W_out']" in capsys.readouterr().err

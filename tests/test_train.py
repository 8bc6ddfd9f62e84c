"""The training loop: outputs, a falling loss, bitwise resume and reproducibility,
stateful carries, NaN handling, Ctrl-C, and data that does not fit the model.

Runs are tiny (16x16 frames, 4 input frames, batches of 4) so the whole file
takes seconds; what is checked does not depend on the size.
"""
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest

import convc.api as api
from convc.errors import ConvcError, DataError, NonFiniteError
from convc.runtime import config, dataset, runlog
from convc.runtime import train as T
from convc.runtime.checkpoint import latest_valid_checkpoint, list_checkpoints, load_checkpoint
from convc.runtime.predict import predict_frames

ROOT = Path(__file__).resolve().parents[1]
SEED_CELL = ROOT / "examples" / "seed.cell"
FORECAST_CELL = ROOT / "examples" / "encoder_forecaster.cell"

TINY = dict(clips=16, batch_size=4, frames_in=4, progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """Tiny GEMMs gain nothing from threads, and a busy machine makes them crawl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def seed():
    return api.load(SEED_CELL)


def _read_png(path):
    import matplotlib.image

    return matplotlib.image.imread(str(path))


def test_run_writes_log_checkpoints_model_and_pictures(seed, tmp_path):
    out = tmp_path / "run"
    result = T.train(seed, steps=6, checkpoint_every=3, out=out, **TINY)

    assert result.steps == 6 and result.stopped == "steps"
    rows = runlog.read_log(out / "log.csv")
    header = (out / "log.csv").read_text().splitlines()[0]
    assert header == "step,epoch,loss,lr,grad_norm,val_loss,seconds"
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == result.losses
    assert all(r["lr"] == 0.5 for r in rows)  # the seed's train block: sgd, lr 0.5
    assert all(r["grad_norm"] > 0 for r in rows)
    assert rows[-1]["val_loss"] is not None  # the last step is always validated

    assert [p.name for p in list_checkpoints(out)] == ["ckpt-00000003.npz", "ckpt-00000006.npz"]
    arrays, meta = load_checkpoint(out / "ckpt-00000006.npz")
    assert meta["step"] == 6
    assert sorted(k.partition("/")[2] for k in arrays if k.startswith("param/")) == \
        sorted(seed.MODEL["params"])
    assert meta["user"]["config"]["lr"] == 0.5
    assert meta["data_position"] == meta["user"]["data_position"]

    generated = api.import_generated(out / "model.py")
    assert generated.MODEL["name"] == "seed"

    for name in ("predictions.png", "loss.png"):
        image = _read_png(out / name)
        assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
        assert float(image[..., :3].std()) > 0.01, f"{name} is blank"
    assert result.predictions_png == out / "predictions.png"
    assert result.loss_png == out / "loss.png"


def test_loss_falls_over_a_hundred_steps(seed):
    result = T.train(seed, steps=100, clips=32, batch_size=4, frames_in=4, val_fraction=0.0,
                     progress=False)
    losses = result.losses
    assert len(losses) == 100 and all(math.isfinite(v) for v in losses)
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.9 * first, (first, last)


def test_two_runs_give_bitwise_identical_losses(seed):
    a = T.train(seed, steps=8, **TINY)
    b = T.train(seed, steps=8, threads=1, **TINY)
    assert a.losses == b.losses
    assert [r["grad_norm"] for r in a.history] == [r["grad_norm"] for r in b.history]
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    c = T.train(seed, steps=8, seed=1, **TINY)
    assert c.losses != a.losses


def _resume_settings():
    # Adam's moments, a plateau schedule that counts validations, a stateful
    # carry and clipping: every piece of state a resume has to restore.
    return dict(steps=12, optimizer="adam", lr=0.01, schedule="plateau:patience=0,factor=0.5",
                val_every=2, stateful=True, clip=0.05, checkpoint_every=4, **TINY)


def test_resume_after_ctrl_c_is_bitwise_identical(seed, tmp_path):
    whole = T.train(seed, out=tmp_path / "whole", **_resume_settings())
    assert whole.final_state is not None

    def interrupt_at_7(row):
        if row["step"] == 7:
            raise KeyboardInterrupt

    with pytest.raises(T.TrainingInterrupted) as info:
        T.train(seed, out=tmp_path / "cut", on_step=interrupt_at_7, **_resume_settings())
    assert info.value.checkpoint == tmp_path / "cut" / "ckpt-00000007.npz"
    assert "--resume" in str(info.value)
    assert len(runlog.read_log(tmp_path / "cut" / "log.csv")) == 7

    resumed = T.train(seed, out=tmp_path / "cut", resume=True, **_resume_settings())
    assert resumed.losses == whole.losses
    assert resumed.val_losses == whole.val_losses
    assert [r["lr"] for r in resumed.history] == [r["lr"] for r in whole.history]
    assert all(np.array_equal(resumed.params[k], whole.params[k]) for k in whole.params)
    cut_log = runlog.read_log(tmp_path / "cut" / "log.csv")
    whole_log = runlog.read_log(tmp_path / "whole" / "log.csv")
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in cut_log]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in whole_log]


def test_resume_from_a_mid_run_checkpoint_truncates_the_log(seed, tmp_path):
    out = tmp_path / "run"
    settings = dict(steps=10, checkpoint_every=4, keep=None, **TINY)
    whole = T.train(seed, out=out, **settings)
    for late in ("ckpt-00000008.npz", "ckpt-00000010.npz"):
        (out / late).unlink()
    (out / "ckpt-00000008.npz").write_bytes(b"PK\x03\x04 a damaged checkpoint")
    resumed = T.train(seed, out=out, resume=True, **settings)
    assert resumed.losses == whole.losses
    rows = runlog.read_log(out / "log.csv")
    assert [r["step"] for r in rows] == list(range(1, 11))


def test_a_folder_with_a_run_needs_resume_or_overwrite(seed, tmp_path):
    T.train(seed, steps=2, out=tmp_path, **TINY)
    with pytest.raises(ConvcError, match="--resume"):
        T.train(seed, steps=2, out=tmp_path, **TINY)
    again = T.train(seed, steps=3, out=tmp_path, overwrite=True, **TINY)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000003.npz"]
    assert len(runlog.read_log(tmp_path / "log.csv")) == again.steps == 3


def test_stateful_training_carries_states_and_resets_each_epoch(seed, monkeypatch):
    seen = []
    real = seed.loss_and_grad

    def spy(params, inputs, targets, state=None, **kw):
        if params is not None and len(next(iter(inputs.values()))) == 4:
            seen.append(state)
        return real(params, inputs, targets, state=state, **kw)

    monkeypatch.setattr(seed, "loss_and_grad", spy)
    # 12 training clips in batches of 4: three batches an epoch.
    result = T.train(seed, steps=6, stateful=True, clips=12, val_fraction=0.0,
                     batch_size=4, frames_in=4, progress=False)
    assert [s is None for s in seen] == [True, False, False, True, False, False]
    assert sorted(seen[1]) == ["lstm.c", "lstm.h"]
    assert seen[1]["lstm.h"].shape == (4, 8, 16, 16)
    assert sorted(result.final_state) == ["lstm.c", "lstm.h"]
    assert all(np.isfinite(v).all() for v in result.final_state.values())


def test_nan_loss_stops_with_a_clear_error_and_a_valid_checkpoint(seed, tmp_path, monkeypatch):
    real = seed.loss_and_grad
    calls = {"n": 0}

    def nan_at_fifth_step(params, inputs, targets, **kw):
        calls["n"] += 1
        loss, grads, final = real(params, inputs, targets, **kw)
        return (float("nan") if calls["n"] == 5 else loss), grads, final

    monkeypatch.setattr(seed, "loss_and_grad", nan_at_fifth_step)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError) as info:
        T.train(seed, steps=10, checkpoint_every=3, val_fraction=0.0, out=out, **TINY)
    message = str(info.value)
    assert "step 5" in message and "loss is nan" in message
    assert "ckpt-00000004.npz" in message and "--debug-nans" in message
    assert info.value.step == 5
    found = latest_valid_checkpoint(out)
    assert found is not None
    path, arrays, meta = found
    assert meta["step"] == 4
    assert all(np.isfinite(a).all() for a in arrays.values() if a.dtype.kind == "f")
    assert len(runlog.read_log(out / "log.csv")) == 4


def test_nan_gradient_names_the_parameters(seed, monkeypatch):
    real = seed.loss_and_grad

    def nan_grad(params, inputs, targets, **kw):
        loss, grads, final = real(params, inputs, targets, **kw)
        grads["W_y"] = grads["W_y"] * np.nan
        return loss, grads, final

    monkeypatch.setattr(seed, "loss_and_grad", nan_grad)
    with pytest.raises(NonFiniteError, match=r"step 1 .*gradient is not finite in W_y"):
        T.train(seed, steps=3, val_fraction=0.0, **TINY)


def test_sigint_saves_the_last_completed_step(seed, tmp_path):
    def press_ctrl_c(row):
        if row["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    # The handler that was there before comes back: Python's default in a
    # terminal, SIG_IGN when the tests run as a background job.
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as info:
        T.train(seed, steps=10, out=tmp_path, on_step=press_ctrl_c, **TINY)
    assert isinstance(info.value, T.TrainingInterrupted)
    assert info.value.checkpoint == tmp_path / "ckpt-00000003.npz"
    assert info.value.result.stopped == "interrupted"
    assert signal.getsignal(signal.SIGINT) is before


def test_early_stopping_after_patience_validations(seed):
    # lr 0 keeps the parameters, so the validation loss never improves after the first.
    result = T.train(seed, steps=20, lr=0.0, val_every=1, patience=1, **TINY)
    assert result.stopped == "early_stopping"
    assert result.steps == 3 and result.best_step == 1


def test_wrong_frame_size_in_a_data_file_is_a_data_error(seed, tmp_path):
    path = tmp_path / "small.npy"
    np.save(path, np.zeros((6, 12, 1, 8, 8), dtype=np.float32))
    with pytest.raises(DataError, match=r"1x16x16.*1x8x8"):
        T.train(seed, data=str(path), steps=1, progress=False)


def test_too_short_clips_are_a_data_error(seed, tmp_path):
    path = tmp_path / "short.npy"
    np.save(path, np.zeros((6, 3, 1, 16, 16), dtype=np.float32))
    with pytest.raises(DataError, match=r"3 frames, too short"):
        T.train(seed, data=str(path), steps=1, frames_in=4, progress=False)


def test_data_file_of_the_right_shape_trains(seed, tmp_path):
    path = tmp_path / "clips.npy"
    clips = np.random.default_rng(0).uniform(0, 1, (10, 6, 1, 16, 16)).astype(np.float32)
    np.save(path, clips)
    result = T.train(seed, data=str(path), steps=2, batch_size=4, frames_in=5, progress=False)
    assert result.steps == 2


def test_out_folder_that_cannot_be_made_is_a_convc_error(seed, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConvcError, match="cannot create output folder"):
        T.train(seed, steps=1, out=blocker / "run", **TINY)


def test_settings_come_from_the_train_block_then_arguments(seed):
    cfg = config.resolve_config(seed.MODEL["train"], {"lr": 0.1, "epochs": 2})
    assert cfg["optimizer"] == "sgd" and cfg["lr"] == 0.1 and cfg["clip"] == 1.0
    assert cfg["epochs"] == 2 and cfg["steps"] is None  # epochs replaces the block's steps
    with pytest.raises(ConvcError, match="both steps and epochs"):
        config.resolve_config({}, {"steps": 3, "epochs": 1})


def test_patched_model_gets_patched_synthetic_clips_and_full_frame_pictures(tmp_path):
    spec = tmp_path / "patched.cell"
    spec.write_text(
        "import std\n"
        "model patched {\n"
        "    input x: [4, 8, 8]\n"
        "    target y: [4, 8, 8]\n"
        "    l = ConvLSTMFused(hidden = 4)\n"
        "    h = l(x)\n"
        "    weight W = kernel(4, 1)\n"
        "    pred = sigmoid(conv(h, W))\n"
        "    output pred\n"
        "    loss bce(pred, y)\n"
        "}\n")
    mod = api.load(spec)
    result = T.train(mod, steps=2, out=tmp_path / "run", **TINY)
    assert result.steps == 2
    data = dataset.prepare_data(mod.MODEL, config.resolve_config({}, {"clips": 8, "frames_in": 4}))
    assert data.patch == 2 and data.train_x.shape[2:] == (4, 8, 8)
    x, y, pred = predict_frames(mod, result.params, data.val_x, data.val_y, patch=2)
    assert x.shape[2:] == y.shape[2:] == pred.shape[2:] == (1, 16, 16)
    assert _read_png(tmp_path / "run" / "predictions.png").ndim == 3


def test_forecast_model_trains_on_frames_in_and_frames_out():
    mod = api.load(FORECAST_CELL)
    result = T.train(mod, steps=2, frames_in=3, frames_out=2, clips=8, batch_size=4,
                     progress=False)
    assert result.steps == 2 and all(math.isfinite(v) for v in result.losses)
    data = dataset.prepare_data(mod.MODEL, config.resolve_config(mod.MODEL["train"], {
        "frames_in": 3, "frames_out": 2, "clips": 8}))
    assert data.train_x.shape[1] == 3 and data.train_y.shape[1] == 2


def test_progress_prints_plain_lines_when_not_a_terminal(seed, capsys):
    T.train(seed, steps=20, progress=True, clips=16, batch_size=4, frames_in=4)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("step")]
    assert len(lines) == 11 and "\r" not in err  # step 1, then every 10% (2 steps)
    assert "loss" in lines[-1] and "steps/s" in lines[-1]
    T.train(seed, steps=2, **TINY)
    assert capsys.readouterr().err == ""


def _reported(text: str) -> list[tuple[float, int, int]]:
    """(loss, first step, last step) of each "loss X (mean of steps a-b)", "-> X (step a)"."""
    import re

    found = []
    for loss, a, b, one in re.findall(r"(?:loss|->) (\d+\.\d{4}) \((?:mean of steps (\d+)-(\d+)|"
                                      r"step (\d+))\)", text):
        first, last = (int(a), int(b)) if a else (int(one), int(one))
        found.append((float(loss), first, last))
    return found


def _mean(rows, first, last):
    losses = [r["loss"] for r in rows if first <= r["step"] <= last]
    assert len(losses) == last - first + 1
    return sum(losses) / len(losses)


@pytest.mark.parametrize("steps", [4, 25])
def test_reported_losses_say_which_steps_they_average(seed, tmp_path, capsys, steps):
    """Progress lines and the summary name the steps each loss averages, and the
    numbers are those means of log.csv: in train() and in `convc train` alike."""
    from convc import cli

    out = tmp_path / "py"
    result = T.train(seed, steps=steps, progress=True, out=out, clips=16, batch_size=4,
                     frames_in=4)
    err = capsys.readouterr().err
    rows = runlog.read_log(out / "log.csv")
    lines = [line for line in err.splitlines() if line.startswith("step")]
    progress = [_reported(line) for line in lines]
    assert all(len(p) == 1 for p in progress), lines
    spans = [p[0] for p in progress]
    # the windows tile the run: each line averages the steps since the previous one
    assert [first for _, first, _ in spans] == [1] + [last + 1 for _, _, last in spans[:-1]]
    assert spans[-1][2] == steps
    for (loss, first, last), line in zip(spans, lines):
        assert loss == pytest.approx(_mean(rows, first, last), abs=5e-5), line
        assert line.startswith(f"step {last:>{len(str(steps))}}/{steps}  "), line
    val = [r for r in rows if r["val_loss"] is not None][-1]
    assert f"val {val['val_loss']:.4f} (step {val['step']})" in lines[-1]

    summary = result.summary()
    reported = _reported(summary)
    if steps <= T.SUMMARY_STEPS:
        assert [(a, b) for _, a, b in reported] == [(1, steps)]
        assert "->" not in summary
    else:
        assert [(a, b) for _, a, b in reported] == [(1, 10), (steps - 9, steps)]
    for loss, first, last in reported:
        assert loss == pytest.approx(_mean(rows, first, last), abs=5e-5)
    assert summary.startswith(f"trained {steps} steps in ")
    assert summary.endswith(f", validation {val['val_loss']:.4f} (step {val['step']})")

    # the command line prints the same summary, from the same log
    code = cli.main(["train", str(SEED_CELL), "--steps", str(steps), "--clips", "16",
                     "--batch-size", "4", "--frames-in", "4", "--out", str(tmp_path / "cli"),
                     "-q"])
    stdout = capsys.readouterr().out
    assert code == 0
    cli_rows = runlog.read_log(tmp_path / "cli" / "log.csv")
    assert [r["loss"] for r in cli_rows] == [r["loss"] for r in rows]
    (line,) = [line for line in stdout.splitlines() if line.startswith("trained")]
    assert line.split(" s: ", 1)[1] == summary.split(" s: ", 1)[1]


def test_progress_on_a_terminal_redraws_one_line_and_keeps_every_tenth():
    import io

    stream = io.StringIO()
    progress = runlog.Progress(total=100, stream=stream, tty=True)
    for step in range(1, 101):
        progress.last_draw = 0.0  # pretend the redraw interval has passed
        progress.update(step, loss=1.0 / step, lr=0.1)
    progress.close()
    text = stream.getvalue()
    kept = [line.split("\r\x1b[K")[-1] for line in text.split("\n") if "step" in line]
    assert len(kept) == 11 and kept[-1].startswith("step 100/100")
    assert "[" in text and "steps/s" in text and "eta" in text
    assert text.endswith("\r\x1b[K") or text.endswith("\n")


def test_debug_nans_error_keeps_its_location_and_the_last_good_state(seed, tmp_path,
                                                                     monkeypatch):
    real = seed.loss_and_grad
    calls = {"n": 0}

    def raises_at_third_step(params, inputs, targets, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise NonFiniteError("tanh_1 is nan at seed.cell:22 (forward, t=2)", node="tanh_1",
                                 where="seed.cell:22", step=2, direction="forward")
        return real(params, inputs, targets, **kw)

    monkeypatch.setattr(seed, "loss_and_grad", raises_at_third_step)
    with pytest.raises(NonFiniteError) as info:
        T.train(seed, steps=5, val_fraction=0.0, out=tmp_path, **TINY)
    assert info.value.node == "tanh_1" and info.value.where == "seed.cell:22"
    assert info.value.step == 3 and "seed.cell:22" in str(info.value)
    assert latest_valid_checkpoint(tmp_path)[2]["step"] == 2


def test_every_training_setting_is_an_option_and_a_keyword_from_the_schema():
    import inspect

    from convc import cli
    from convc.spec.settings import TRAIN

    train_parser = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    options = {a.dest: a for a in train_parser._actions}
    keywords = inspect.signature(T.train).parameters
    for name, setting in TRAIN.items():
        assert options[name].help, name
        assert keywords[name].default is None, name
        assert f"    {name}: {setting.explain()}"[:40] in T.train.__doc__, name
    assert "--resume" in options["steps"].help and "total" in options["steps"].help
    with pytest.raises(TypeError, match="unexpected keyword argument 'learning_rate'"):
        T.train(None, learning_rate=0.1)

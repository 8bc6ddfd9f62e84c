"""The memory estimate of a training step tracks what a step really allocates,
and train() refuses a step that cannot fit before allocating it."""
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import convc
from convc.errors import ConvcError
from convc.runtime import memory
from convc.runtime.ops_numpy import NumpyBackend

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _measured_step(mod, steps, batch):
    M = mod.MODEL
    B = NumpyBackend()
    rng = np.random.default_rng(0)
    tracemalloc.start()
    try:
        params = mod.init_params(backend=B)

        def batch_of(table):
            return {k: rng.random((batch, steps[M["axes"][k]]) + tuple(s), dtype=np.float32)
                    for k, s in table.items()}
        ins, tg = batch_of(M["inputs"]), batch_of(M["targets"])
        for _ in range(2):
            _, grads, _ = mod.loss_and_grad(params, ins, tg, backend=B)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("name,batch", [("seed", 4), ("seed", 16),
                                        ("encoder_forecaster", 4),
                                        ("encoder_forecaster", 16),
                                        ("shi2015_small", 2), ("shi2015_small", 8)])
def test_estimate_tracks_a_real_step(name, batch):
    mod = convc.load(str(EXAMPLES / f"{name}.cell"))
    M = mod.MODEL
    fo = 5 if M["task"] == "forecast" else None
    steps = memory.step_steps(M, 5 if fo else 10, fo)
    est = memory.estimate(M, batch, steps, optimizer="sgd")
    est = est["total"] - est["grads"] - est["optimizer"]  # loss_and_grad alone, no update
    peak = _measured_step(mod, steps, batch)
    assert 0.7 * peak <= est <= 1.3 * peak, (est / 2 ** 20, peak / 2 ** 20)


def _huge(tmp_path, hidden):
    src = (EXAMPLES / "seed.cell").read_text()
    assert "hidden = 8" in src
    p = tmp_path / "huge.cell"
    p.write_text(src.replace("hidden = 8", f"hidden = {hidden}"))
    return convc.load(str(p))


def test_train_refuses_a_step_that_cannot_fit(tmp_path, monkeypatch):
    mod = _huge(tmp_path, 64)
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)
    with pytest.raises(ConvcError, match=r"needs about .* available.*ignore-memory-limit"):
        convc.runtime.train.train(mod, steps=1, clips=4, batch_size=2, progress=False)


def test_a_huge_hidden_is_refused_before_allocating(tmp_path):
    mod = _huge(tmp_path, 100000)
    tracemalloc.start()
    try:
        with pytest.raises(ConvcError, match="needs about"):
            convc.runtime.train.train(mod, steps=1, clips=4, batch_size=2, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


def test_the_override_trains_anyway(tmp_path, monkeypatch):
    mod = convc.load(str(EXAMPLES / "seed.cell"))
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)
    r = convc.runtime.train.train(mod, steps=1, clips=4, batch_size=2, progress=False,
                                  ignore_memory_limit=True)
    assert len(r.losses) == 1


def test_available_bytes_reads_meminfo():
    avail = memory.available_bytes()
    assert avail is None or avail > 0


def test_cli_refuses_a_huge_input_and_writes_nothing(tmp_path, capsys):
    from convc.cli import main

    src = (EXAMPLES / "seed.cell").read_text()
    src = src.replace("input x: [1, 16, 16]", "input x: [1, 100000, 100000]")
    src = src.replace("target y: [1, 16, 16]", "target y: [1, 100000, 100000]")
    spec = tmp_path / "wide.cell"
    spec.write_text(src)
    out = tmp_path / "run"
    rc = main(["train", str(spec), "--steps", "1", "--out", str(out), "-q"])
    assert rc != 0
    assert "needs about" in capsys.readouterr().err
    assert not out.exists()


def test_every_time_axis_gets_a_length(tmp_path):
    """A model without loops (its arena is keyed by the data's axis) and a forecaster."""
    spec = tmp_path / "plain.cell"
    spec.write_text("model plain {\n    input x: [1, 8, 8]\n    target y: [1, 8, 8]\n"
                    "    weight W = kernel(1, 1)\n    p = conv(x, W)\n    output p\n"
                    "    loss mse(p, y)\n}\n")
    for mod, fo in ((convc.load(spec), None),
                    (convc.load(EXAMPLES / "encoder_forecaster.cell"), 3)):
        steps = memory.step_steps(mod.MODEL, 4, fo)
        assert set(mod.MODEL["memory"]["arena"]) <= set(steps)
        assert memory.estimate(mod.MODEL, 2, steps)["total"] > 0

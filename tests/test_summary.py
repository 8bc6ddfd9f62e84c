"""runtime/summary.py: parameter totals, FLOPs worked out by hand, which cell owns what."""
from pathlib import Path

import numpy as np
import pytest

import convc.api as api
from convc.runtime.summary import summary, summary_rows

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.cell"))

# One cell, one 3x3 convolution over concat(x, h[t-1]): 2 + 4 = 6 input channels,
# 4 output channels, on 8x8 frames; a 1x1 head with 2 output channels.
TINY = """
cell Tiny(hidden) {
    \"\"\"A single 3x3 convolution and a tanh.

    The rest of the docstring is not shown.\"\"\"
    input x
    state h = zeros
    weight W = kernel(hidden, 3)
    h = tanh(conv(concat(x, h[t-1]), W))
    output h
}

model tiny {
    \"\"\"One recurrent convolution and a head.\"\"\"
    input x: [2, 8, 8]
    target y: [2, 8, 8]
    cell1 = Tiny(hidden = 4)
    h = cell1(x)
    weight W_y = kernel(2, 1)
    pred = sigmoid(conv(h, W_y))
    output pred
    loss mse(pred, y)
}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("summary") / "tiny.cell"
    path.write_text(TINY)
    return api.load(path)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_parameter_totals_match_the_parameter_shapes(path):
    mod = api.load(path)
    rows = summary_rows(mod)
    expected = sum(int(np.prod(p["shape"])) for p in mod.MODEL["params"].values())
    assert sum(r.params for r in rows) == expected
    owned = sorted(name for r in rows for name in r.param_names)
    assert owned == sorted(mod.MODEL["params"])  # every parameter in exactly one row
    text = summary(mod)
    total = next(line for line in text.splitlines() if line.startswith("Total"))
    assert int(total.split()[1].replace(",", "")) == expected


def test_flops_of_one_3x3_convolution_by_hand(tiny):
    rows = {r.name: r for r in summary_rows(tiny)}
    cell = rows["cell1"]
    assert cell.kind == "Tiny" and cell.output_shape == (4, 8, 8)
    assert cell.params == 4 * 6 * 3 * 3
    assert cell.flops == 2 * 4 * 6 * 3 * 3 * 8 * 8  # 2 * Cout * Cin * k * k * Ho * Wo
    head = rows["pred"]
    assert head.params == 2 * 4
    assert head.flops == 2 * 2 * 4 * 1 * 1 * 8 * 8
    # the head's only elementwise op is its sigmoid; the cell has at least its tanh
    # (the compiler may split the convolution into one over x plus one over h)
    assert head.elementwise == 2 * 8 * 8
    assert cell.elementwise in (4 * 8 * 8, 2 * 4 * 8 * 8)


def test_activation_memory_counts_what_the_backward_pass_keeps(tiny):
    rows = {r.name: r for r in summary_rows(tiny)}
    # at least the state h (its read and update share one buffer), at most that
    # and concat(x, h[t-1]), which the weight gradient may read; the head keeps
    # pred for the sigmoid's gradient
    assert 4 * 64 * 4 <= rows["cell1"].activation_bytes <= (4 * 64 + 6 * 64) * 4
    assert rows["pred"].activation_bytes == 2 * 64 * 4


def test_summary_text_has_docstrings_and_totals(tiny):
    text = summary(tiny)
    assert "Model: tiny" in text
    assert "One recurrent convolution and a head." in text
    assert "Tiny  A single 3x3 convolution and a tanh." in text
    assert "not shown" not in text
    assert "Parameters: 224" in text


def test_several_instances_of_one_cell_get_their_own_rows():
    mod = api.load(ROOT / "examples" / "encoder_forecaster.cell")
    rows = {r.name: r for r in summary_rows(mod)}
    for inst in ("enc1", "enc2", "fc1", "fc2"):
        assert all(n.startswith(inst + ".") for n in rows[inst].param_names)
        assert rows[inst].output_shape == (8, 16, 16)
    per_conv = 2 * 32 * 8 * 3 * 3 * 16 * 16  # a 3x3 convolution, 8 -> 32 channels
    assert rows["enc1"].flops == 2 * 32 * 1 * 3 * 3 * 16 * 16 + per_conv  # 1-channel input
    assert rows["enc2"].flops == 2 * per_conv
    assert rows["fc1"].flops == per_conv  # runs without input: no input convolution
    assert rows["fc2"].flops == 2 * per_conv
    # the same cell at the same sizes keeps the same activations per step
    assert rows["enc2"].activation_bytes == rows["fc2"].activation_bytes > 0


def test_summary_shows_the_training_memory_estimate():
    import convc
    from convc.runtime import memory
    from convc.runtime.summary import summary
    from pathlib import Path

    mod = convc.load(str(Path(__file__).resolve().parent.parent / "examples" / "seed.cell"))
    M = mod.MODEL
    batch = M["train"].get("batch_size") or 8
    parts = memory.estimate(M, batch, memory.step_steps(M, M["train"].get("frames_in") or 10,
                                                        None),
                            optimizer=M["train"].get("optimizer") or "adam",
                            momentum=M["train"].get("momentum"))
    text = summary(mod)
    assert f"Training step memory (batch {batch}," in text
    assert f"about {memory.fmt_bytes(parts['total'])}" in text

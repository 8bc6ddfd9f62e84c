"""The IR after every stage (`compile_model(snapshots=True)`, `convc compile --emit ir@STAGE`).

Each stage of driver.IR_STAGES leaves a text snapshot of the graph; the
snapshots show what each stage did (folding removes the forecaster's input
path, autodiff adds the backward nodes), the last one is the final IR, and
keeping them changes nothing the compile produces.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from convc.compiler.driver import IR_STAGES, compile_model

ROOT = Path(__file__).resolve().parent.parent
EF = ROOT / "examples" / "encoder_forecaster.cell"


@pytest.fixture(scope="module")
def ef():
    return compile_model(EF, snapshots=True)


def test_every_stage_has_a_snapshot_and_the_last_is_the_final_ir(ef):
    assert list(ef.snapshots) == list(IR_STAGES)
    assert ef.ir_text("schedule") == ef.ir_text()


def test_the_snapshots_show_what_each_stage_did(ef):
    lines = {s: ef.ir_text(s).splitlines() for s in IR_STAGES}
    text = {s: ef.ir_text(s) for s in IR_STAGES}
    # the forecaster runs without input: folding bypasses what its zeros gave, dce removes it
    assert text["fold"] != text["lower"]
    assert len(lines["dce"]) < len(lines["cse"])
    # the sigmoid before the bce loss becomes one bce_logits
    assert "bce_logits(" not in text["fold"] and "bce_logits(" in text["fuse_bce_logits"]
    # shape inference fills in every "?" of the lowered graph
    assert "?" in ef.ir_text("lower") and "?" not in ef.ir_text("shapes")
    # autodiff adds the backward pass
    assert len(lines["autodiff"]) > len(lines["fold_zero_channels"])
    assert not any("grad" in line for line in lines["fold_zero_channels"])
    # the loop rewrites merge sibling activations (and their gradients)
    assert len(lines["loop_rewrites"]) < len(lines["autodiff"])


def test_snapshots_change_nothing_else(ef):
    plain = compile_model(EF)
    assert plain.snapshots == {}
    assert plain.source == ef.source and plain.ir_text() == ef.ir_text()


def test_an_unknown_or_unkept_stage_is_a_clear_error(ef):
    with pytest.raises(ValueError, match="unknown stage 'parse'; the stages are lower, fold"):
        ef.ir_text("parse")
    with pytest.raises(ValueError, match="compile with snapshots=True"):
        compile_model(EF).ir_text("fold")


def _convc(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "convc", *args], capture_output=True,
                          text=True, cwd=cwd)


def test_cli_emits_the_ir_after_a_stage(ef, tmp_path):
    r = _convc("compile", str(EF), "--emit", "ir@fold,ir@autodiff")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ("# ---- ir@fold ----\n" + ef.ir_text("fold")
                        + "# ---- ir@autodiff ----\n" + ef.ir_text("autodiff"))
    out = tmp_path / "m.py"
    r = _convc("compile", str(EF), "--emit", "py,ir@shapes", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.shapes.ir").read_text() == ef.ir_text("shapes")
    assert (tmp_path / "m.py").read_text() == ef.source


def test_cli_names_the_stages_for_an_unknown_one():
    r = _convc("compile", str(EF), "--emit", "ir@parse")
    assert r.returncode == 2
    assert "unknown kind ir@parse" in r.stderr and "ir@STAGE with STAGE one of lower" in r.stderr


# ---------------------------------------------------------------- typed segments and blocks

# how code that parses segment keys itself reads: compiler/ir.py's helpers spell the forms
_SEG_PARSING = re.compile(r"""startswith\(["']@["']\)|seg\[1:\]|seg\[4:\]|["']@["'] \+|"""
                          r"""f["']loop\{|startswith\(["']loop["']\)""")


def test_segment_keys_are_spelled_out_only_in_ir_py():
    found = []
    for package in ("compiler", "runtime", "spec", "convc"):
        for path in sorted((ROOT / package).glob("*.py")):
            if path == ROOT / "compiler" / "ir.py":
                continue
            for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                code = line.split("#")[0]
                if _SEG_PARSING.search(code):
                    found.append(f"{path.relative_to(ROOT)}:{k}: {line.strip()}")
    assert not found, "segment keys parsed outside compiler/ir.py:\n" + "\n".join(found)


def test_blocks_and_segments_are_typed_and_compare_as_their_strings(ef):
    from convc.compiler.ir import DataSeg, LoopSeg
    from convc.compiler.schedule import Block, Kind

    g = ef.lowered.graph
    segs = {g.node(n).seg for n in g.order()}
    assert all(s is None or isinstance(s, (DataSeg, LoopSeg)) for s in segs), segs
    assert {type(s) for s in segs} == {DataSeg, LoopSeg, type(None)}
    assert {s.name for s in segs if isinstance(s, DataSeg)} == {"x", "y"}  # input, target
    assert sorted(s.index for s in segs if isinstance(s, LoopSeg)) == [0, 1]
    assert LoopSeg.of(1) == "loop1" and DataSeg.of("x") == "@x"  # the IR's text is the same
    s = ef.schedule
    assert all(isinstance(b, Block) and isinstance(b.kind, Kind) for b in s.blocks)
    assert set(s.block_of.values()) <= set(s.blocks)
    loops = [b for b in s.blocks if b.kind.is_loop]
    assert {b.kind for b in loops} == {Kind.LOOP, Kind.BLOOP}
    assert all(b.kind.backward for b in s.backward_blocks)
    assert not any(b.kind.backward for b in s.forward_blocks)
    assert Kind.LOOP == "loop" and f"{Kind.BMID}" == "bmid"  # the IR's text reads the same

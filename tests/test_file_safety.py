"""Nothing a user wrote is lost: run folders, the run lock and atomic writes."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from convc import cli
from convc.errors import ConvcError
from convc.runtime import atomic
from convc.runtime import train as T
from convc.runtime.runfolder import LOCK_NAME, MANIFEST_NAME, open_run_folder, read_manifest
from helpers import one_blas_thread  # noqa: F401  (an autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "examples" / "seed.cell"
TINY_ARGS = ["--clips", "16", "--batch-size", "4", "--frames-in", "4", "--threads", "1", "-q",
             "--steps", "2"]


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def user_folder(path: Path) -> dict:
    path.mkdir()
    (path / "model.py").write_text("# my own model\n")
    (path / "log.csv").write_text("my,own,log\n")
    return {p.name: p.read_bytes() for p in path.iterdir()}


@pytest.mark.parametrize("extra", [[], ["--resume"]])
def test_train_refuses_a_folder_with_user_files(capsys, tmp_path, extra):
    out = tmp_path / "userdir"
    before = user_folder(out)
    code, _, err = run(capsys, "train", SEED, "--out", out, *TINY_ARGS, *extra)
    assert code == 1
    assert "would overwrite" in err and "log.csv" in err and "model.py" in err
    assert "Traceback" not in err
    # the folder exactly as it was: not even convc's lock file is left in it
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_train_refuses_a_project_folder(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "train", SEED, "--out", tmp_path, *TINY_ARGS)
    assert code == 1 and "not made by convc" in err and "notes.txt" in err
    assert not list(tmp_path.glob("ckpt-*.npz"))


def test_overwrite_replaces_only_what_convc_writes(capsys, tmp_path):
    out = tmp_path / "userdir"
    user_folder(out)
    (out / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "train", SEED, "--out", out, *TINY_ARGS, "--overwrite")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "model.py").read_text() != "# my own model\n"
    assert {"log.csv", "model.py"} <= set(read_manifest(out)["files"])
    # the folder is convc's now: training again with --overwrite needs no question
    code, _, err = run(capsys, "train", SEED, "--out", out, *TINY_ARGS, "--overwrite")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"


def test_a_second_trainer_is_refused(capsys, tmp_path):
    held, _ = open_run_folder(tmp_path / "run", T.OUTPUT_NAMES, overwrite=False,
                              version="test")
    try:
        code, _, err = run(capsys, "train", SEED, "--out", tmp_path / "run", *TINY_ARGS)
    finally:
        held.close()
    assert code == 1 and "in use by another training run" in err
    assert f"process {os.getpid()}" in err
    assert not list((tmp_path / "run").glob("ckpt-*.npz"))
    code, _, err = run(capsys, "train", SEED, "--out", tmp_path / "run", *TINY_ARGS)
    assert code == 0, err


def test_forged_manifest_cannot_name_files_outside(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text('{"files": ["../victim"]}')
    with pytest.raises(ConvcError, match="not a valid convc run manifest"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("target", ["write", "fsync"])
def test_full_disk_keeps_the_old_file(tmp_path, monkeypatch, target):
    path = tmp_path / "spec.cell"
    path.write_text("old text\n")
    path.chmod(0o640)
    real_write = os.write

    def full(fd, data=b"", *rest):
        if target == "write":
            real_write(fd, bytes(data)[:3])  # part of it lands, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, target, full)
    with pytest.raises(OSError) as failure:
        atomic.write_atomic(path, "new text, longer than the old one\n")
    monkeypatch.undo()
    assert failure.value.errno == errno.ENOSPC
    assert path.read_text() == "old text\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.cell"]
    atomic.write_atomic(path, "new\n")
    assert path.read_text() == "new\n" and (path.stat().st_mode & 0o777) == 0o640


# ---------------------------------------------------------------------------
# Outputs named on the command line never replace a spec
# ---------------------------------------------------------------------------


def _spec_with_import(tmp_path: Path) -> tuple[Path, Path]:
    lib = tmp_path / "lib.cell"
    lib.write_text(SEED.read_text().split("model", 1)[0])
    main = tmp_path / "own.cell"
    main.write_text('import "lib.cell"\n' + "model" + SEED.read_text().split("model", 1)[1])
    return main, lib


@pytest.mark.parametrize("target", ["own.cell", "lib.cell", "other.cell", "link.dot",
                                    "hard.dot"])
def test_compile_never_overwrites_a_spec(capsys, tmp_path, target):
    spec, lib = _spec_with_import(tmp_path)
    (tmp_path / "other.cell").write_text("# someone's spec\n")
    (tmp_path / "link.dot").symlink_to(spec)
    os.link(lib, tmp_path / "hard.dot")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for command in (["compile", spec, "-o", tmp_path / target],
                    ["graph", spec, "-o", tmp_path / target]):
        code, out, err = run(capsys, *command)
        assert code == 1, err
        if command[0] == "graph" and target.endswith(".cell"):
            assert "unknown graph format" in err
            continue
        assert "refusing to write" in err and "Traceback" not in err
        assert ("input of this command" in err) or (".cell file" in err)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_compile_writes_other_outputs_atomically(capsys, tmp_path, monkeypatch):
    spec, _ = _spec_with_import(tmp_path)
    out = tmp_path / "gen.py"
    out.write_text("# the previous module\n")
    real_write = os.write

    def full(fd, data=b"", *rest):
        real_write(fd, bytes(data)[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    code, _, err = run(capsys, "compile", spec, "-o", out)
    monkeypatch.undo()
    assert code == 1 and "cannot write" in err and "No space left" in err
    assert out.read_text() == "# the previous module\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.py", "lib.cell", "own.cell"]
    code, _, err = run(capsys, "compile", spec, "-o", out)
    assert code == 0 and out.read_text().startswith('"""')


def test_fmt_write_on_a_full_disk_keeps_the_spec(capsys, tmp_path, monkeypatch):
    spec = tmp_path / "messy.cell"
    original = SEED.read_text().replace("\n\n", "\n\n\n\n")
    spec.write_text(original)
    real_write = os.write

    def full(fd, data=b"", *rest):
        real_write(fd, bytes(data)[:4096 if len(data) > 4096 else 1])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    code, _, err = run(capsys, "fmt", "--write", spec)
    monkeypatch.undo()
    assert code == 1 and "No space left" in err and "unchanged" in err
    assert spec.read_text() == original
    assert [p.name for p in tmp_path.iterdir()] == ["messy.cell"]
    assert run(capsys, "fmt", "--write", spec)[0] == 0
    assert run(capsys, "fmt", "--check", spec)[0] == 0


def test_eval_json_never_overwrites_its_inputs(capsys, tmp_path):
    spec = tmp_path / "seed.cell"
    spec.write_text(SEED.read_text())
    code, _, err = run(capsys, "train", spec, "--out", tmp_path / "run", *TINY_ARGS)
    assert code == 0, err
    ckpt = sorted((tmp_path / "run").glob("ckpt-*.npz"))[-1]
    before = spec.read_bytes(), ckpt.read_bytes()
    for target in (spec, ckpt):
        code, _, err = run(capsys, "eval", spec, "--checkpoint", ckpt, "--data", "synthetic",
                           "--clips", "4", "--json", target)
        assert code == 1 and "refusing to write" in err, err
    assert (spec.read_bytes(), ckpt.read_bytes()) == before

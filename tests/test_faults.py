"""bench/faults.py at a small size: 20 SIGKILLs of `convc train`, none may cost a bit.

The script trains a tiny model once without interruption, then again while
killing it at random moments (many of them in the middle of a checkpoint
write) and resuming it with --resume; every checkpoint present after a kill
must load, and the final parameters, optimizer state and logged losses must
equal the uninterrupted run's. `--launch fork` starts each run as a fork of
the script, which has already imported convc, so twenty kills fit in well
under a minute; `python bench/faults.py` with no options does a hundred kills
of fresh `python -m convc train` processes.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KILLS = 20


@pytest.mark.skipif(not hasattr(os, "fork"), reason="SIGKILL and fork are POSIX")
def test_twenty_sigkills_lose_no_checkpoint_and_no_bit(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "faults.py"), "--kills", str(KILLS),
         "--steps", "40", "--launch", "fork", "--pause", "0.03", "--cases", "kills",
         "--work", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    report = result.stdout + result.stderr
    print(report)  # shown by pytest -s or on failure: the kills and where they landed
    assert result.returncode == 0, report
    survived = re.search(r"survived (\d+) SIGKILLs", report)
    assert survived and int(survived.group(1)) >= KILLS, report
    assert re.search(r"\b0 unloadable\b", report), report
    assert "final parameters equal the uninterrupted run's bit for bit" in report


# What the file-safety cases must cover: every file convc writes, two trainers, user files.
FILE_CASES = [
    "train, the disk full at the run lock", "train, the disk full at the manifest",
    "train, the disk full at model.py", "train, the disk full at log.csv's header",
    "train, the disk full at a row of log.csv", "train, the disk full at the first checkpoint",
    "train, the disk full at the second checkpoint", "train, the disk full at predictions.png",
    "train, the disk full at loss.png", "train --resume, the disk full at the manifest",
    "train --resume, the disk full at a row of log.csv",
    "train --resume, the disk full at the second checkpoint",
    "compile -o, the disk full at gen.py", "graph -o, the disk full at graph.dot",
    "fmt --write, the disk full at messy.cell",
    "predict: predictions.npy, the disk full at predictions.npy",
    "predict: predictions.png, the disk full at predictions.png",
    "eval --json, the disk full at eval.json", "eval --png, the disk full at eval.png",
    "bench --json, the disk full at bench.json",
    "a second trainer (new, --resume, --overwrite) while one is mid checkpoint",
    "train --out a folder holding the user's model.py and log.csv",
    "train --resume --out a folder holding the user's model.py and log.csv",
    "train --out . in a project folder", "train --overwrite in a folder with the user's files",
]


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32",
                    reason="RLIMIT_FSIZE, flock and fork are POSIX")
def test_file_safety_cases_all_hold(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "faults.py"), "--cases", "files", "--launch",
         "fork", "--work", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    report = result.stdout + result.stderr
    print(report)
    assert result.returncode == 0, report
    for case in FILE_CASES:
        assert re.search(rf"^faults: files: {re.escape(case)}[^\n]*: ok\b", report, re.M), \
            f"{case!r} did not run or did not hold:\n{report}"
    assert re.search(r"file safety: \d+ cases in [\d.]+ s, 0 problems", report), report

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
         "--steps", "40", "--launch", "fork", "--pause", "0.03", "--work", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    report = result.stdout + result.stderr
    print(report)  # shown by pytest -s or on failure: the kills and where they landed
    assert result.returncode == 0, report
    survived = re.search(r"survived (\d+) SIGKILLs", report)
    assert survived and int(survived.group(1)) >= KILLS, report
    assert re.search(r"\b0 unloadable\b", report), report
    assert "final parameters equal the uninterrupted run's bit for bit" in report

"""The README's demo, run as `make demo` runs it: stage one, stage two, and its caption-fidelity score."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_learns_to_follow_captions(tmp_path):
    common = [f"paths.root={tmp_path / 'outputs'}", f"data.root={tmp_path / 'data'}", "trainer.enable_progress_bar=false"]
    for experiment in ("autoencoder_demo", "demo"):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), f"experiment={experiment}", *common],
            capture_output=True, text=True, cwd=tmp_path, timeout=1800,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"caption fidelity: ([0-9.]+) of (\d+)", proc.stdout)
    assert match, proc.stdout[-2000:]
    score, count = float(match.group(1)), int(match.group(2))
    assert count == 90
    assert score >= 0.8, f"caption fidelity {score} (colours and shape: chance is about 1/90)"

"""benchmarks/train_e2e.py runs its three real processes (ldm-cache-latents --text, train.py on cached latents and
on raw shards) at a tiny size on the CPU and prints every row with a measured rate."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "train_e2e.py"


@pytest.mark.slow
def test_the_end_to_end_benchmark_trains_from_cached_and_raw_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--model", "tiny", "--size", "32", "--batch", "4", "--images", "16",
                                      "--steps", "12", "--log-every", "2", "--skip", "1", "--device", "cpu",
                                      "--workers", "1", "--work", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr().out
    assert exit_.value.code == 0, out
    rows = dict(re.findall(r"^(bare step|ldm-cache-latents --text|train\.py, cached latents \+ text|train\.py, raw "
                           r"shards)\b.*?\s([0-9.]+)\s+(?:[0-9]+%|-)", out, re.M))
    assert set(rows) == {"bare step", "ldm-cache-latents --text", "train.py, cached latents + text",
                         "train.py, raw shards"}, out
    assert all(float(rate) > 0 for rate in rows.values()), out
    # the cached run really trained on cached text contexts: its cache holds them
    assert (tmp_path / "latents" / "empty_context.npy").is_file()
    assert "median of 5 intervals" in out, out  # 12 steps logged every 2, the first left out

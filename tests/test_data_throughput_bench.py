"""benchmarks/data_throughput.py runs at a small size on the CPU and prints every row of its table."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "data_throughput.py"


def test_the_data_benchmark_prints_its_table(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--sizes", "64", "--images", "12", "--source", "160",
                                      "--workers", "0", "--batch", "4"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr().out
    rows = {m[1]: float(m[2]) for m in re.finditer(r"^(bare PIL|bare PIL draft|bare torchvision\.io|loader raw|"
                                                     r"loader raw \(pil_draft\)|loader raw \(torchvision\)|"
                                                     r"loader cached)\s+64\s+\d+\s+([0-9.]+)", out, re.M)}
    assert set(rows) == {"bare PIL", "bare PIL draft", "bare torchvision.io", "loader raw", "loader raw (pil_draft)",
                         "loader raw (torchvision)", "loader cached"}, out
    assert all(rate > 0 for rate in rows.values()), out  # every row measured something (nan fails this)

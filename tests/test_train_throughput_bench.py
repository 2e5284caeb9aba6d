"""benchmarks/train_throughput.py runs at a small size on the CPU: every row of its table, with FLOPs and MFU."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "train_throughput.py"


def test_the_training_benchmark_prints_its_table(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--model", "tiny", "--size", "32", "--batch", "2", "--steps", "1",
                                      "--device", "cpu"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr().out
    flops = re.search(r"model FLOPs a step: ([0-9.]+) GFLOP .*diffusers counted ([0-9.]+)\); dense matmul here: "
                      r"([0-9.]+) TFLOP/s", out)
    assert flops, out
    # the same architecture: the flop counter finds the same work in both UNets
    assert float(flops[1]) > 0 and float(flops[1]) == pytest.approx(float(flops[2]), rel=0.01), out
    assert float(flops[3]) > 0, out
    rows = re.findall(r"^(ldm \(ours\)|diffusers)\s+(True|False)\s+(True|False)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.e-]+)"
                      r"\s+([0-9.]+)%", out, re.M)
    # CPU defaults: eager only, with and without gradient checkpointing, EMA on
    assert {(r[0], r[1], r[2]) for r in rows} == {
        (impl, "False", ckpt) for impl in ("ldm (ours)", "diffusers") for ckpt in ("False", "True")}, out
    for _, _, _, seconds, images, tflops, mfu in rows:
        assert float(seconds) > 0 and float(images) == pytest.approx(2 / float(seconds), rel=0.05), out
        assert float(tflops) > 0 and 0 < float(mfu) <= 100, out
    assert "AdamW + EMA" in out and out.count("ours / diffusers speed") == 2, out


def test_order_ab_times_each_side_once_and_prints_rows_as_measured(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    builds: list[str] = []
    namespace = runpy.run_path(str(SCRIPT))  # the module's functions, main not run
    step_time = namespace["step_time"]

    def counted(step, inputs, steps, warmup):  # noqa: ANN001, ANN202
        builds.append(step.ema.__class__.__name__)
        print(f"timing {step.ema.__class__.__name__}")
        return step_time(step, inputs, steps, warmup)

    namespace["main"].__globals__["step_time"] = counted
    namespace["main"](["--model", "tiny", "--size", "32", "--batch", "2", "--steps", "1", "--device", "cpu",
                       "--order", "ab", "--checkpointing", "off"])
    out = capsys.readouterr().out
    assert builds == ["EMA", "EMAModel"], out  # ours, then diffusers', once each
    assert "order AB" in out
    lines = out.splitlines()
    # each row right after its own timing, before the next side is timed
    ours_row = next(i for i, line in enumerate(lines) if line.startswith("ldm (ours)"))
    assert lines[ours_row - 1] == "timing EMA" and lines[ours_row + 1] == "timing EMAModel", out
    assert out.count("ours / diffusers speed") == 1, out

"""benchmarks/device_run.sh keeps to its time budget: stages in order, each under a timeout of what is left,
a cut stage keeps the rows it printed, later ones are skipped, and the summary names the command for the rest.

The script runs from a scratch copy of benchmarks/ with stand-ins for python3 and nvidia-smi on PATH (this
machine has no GPU): each stand-in benchmark prints a row and then sleeps as long as the test says.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "device_run.sh"

FAKE_PYTHON = """#!/bin/sh
case "$*" in
    *train_throughput*) echo "train row"; sleep {train} ;;
    *sample_latency*) echo "sample row"; sleep {sample} ;;
    *) echo "other $*" ;;
esac
"""


def device_run(tmp_path: Path, args: list[str], budget: int, min_s: int, train: float, sample: float):
    root = tmp_path / "repo"
    (root / "benchmarks").mkdir(parents=True)
    (root / "tests").mkdir()
    shutil.copy(SCRIPT, root / "benchmarks" / "device_run.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"python3": FAKE_PYTHON.format(train=train, sample=sample),
                       "nvidia-smi": "#!/bin/sh\necho 'Fake GPU, 1 MiB, 0'\n"}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OUT": str(out),
           "BUDGET_S": str(budget), "MIN_S": str(min_s)}
    proc = subprocess.run(["bash", str(root / "benchmarks" / "device_run.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, out


def test_stages_share_the_budget_and_the_summary_names_what_is_left(tmp_path: Path) -> None:
    proc, out = device_run(tmp_path, [], budget=6, min_s=3, train=1, sample=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    assert "train: done" in summary
    assert "sample: cut at the budget" in summary  # ran under a timeout of what was left, not 60 s
    for stage in ("e2e", "gpu", "check", "data"):
        assert f"{stage}: skipped" in summary, summary
    assert "bash benchmarks/device_run.sh sample e2e gpu check data" in summary
    # what each stage printed before the cut is kept
    assert (out / "train.txt").read_text().strip() == "train row"
    assert (out / "sample.txt").read_text().strip() == "sample row"
    assert (out / "device.txt").read_text().startswith("Fake GPU")


def test_named_stages_run_alone_and_a_wrong_name_is_refused(tmp_path: Path) -> None:
    proc, out = device_run(tmp_path / "a", ["sample", "data"], budget=60, min_s=3, train=0, sample=0)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    assert "sample: done" in summary and "data: done" in summary and "train" not in summary, summary
    assert "data_throughput.py --workers 1 4" in (out / "data.txt").read_text()
    proc, _ = device_run(tmp_path / "b", ["speed"], budget=60, min_s=3, train=0, sample=0)
    assert proc.returncode == 2 and "no stage 'speed'" in proc.stderr and "train sample e2e" in proc.stderr

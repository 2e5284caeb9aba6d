"""How fast the command lines answer: `--help`, `--cfg job`, a config error and a tiny sample run.

    python benchmarks/cli_start.py                # 5 runs of each command
    python benchmarks/cli_start.py --runs 9 --only help

Each command runs in a fresh interpreter (as a user starts it), OMP_NUM_THREADS=1, from a temporary folder;
prints the min and median wall-clock seconds per command. The target on a 2-core CPU machine that is
otherwise idle: `--help`, `--cfg job` and config errors under 3 s (they import neither torch nor the
model code). The sample run writes a tiny random checkpoint first (tests/helpers via tests/test_sample.py)
and is included for comparison: it has to import torch and build the model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def commands(tiny_ckpt: str | None, out_dir: str) -> dict[str, list[str]]:
    py = sys.executable
    cmds = {
        "sample.py --help": [py, str(ROOT / "sample.py"), "--help"],
        "train.py --help": [py, str(ROOT / "train.py"), "--help"],
        "train.py --cfg job": [py, str(ROOT / "train.py"), "--cfg", "job"],
        "train.py trainer.max_step=3 (error)": [py, str(ROOT / "train.py"), "trainer.max_step=3"],
        "sample.py steps= (error)": [py, str(ROOT / "sample.py"), "steps=abc"],
    }
    if tiny_ckpt is not None:
        cmds["sample.py tiny ckpt, 1 step"] = [
            py, str(ROOT / "sample.py"), f"ckpt={tiny_ckpt}", "prompt=a red circle", "steps=1", "height=32",
            "width=32", "device=cpu", f"out_dir={out_dir}", "num_images=1",
        ]
    return cmds


def tiny_checkpoint(folder: Path) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_sample import write_model  # noqa: PLC0415  (imports torch: only when the sample run is timed)

    return str(write_model(folder, "tiny", fmt="single"))


def time_command(cmd: list[str], cwd: str, expect_ok: bool) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if (done.returncode == 0) != expect_ok:
        raise SystemExit(f"{' '.join(cmd)}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", default=None, help="time only the commands whose name contains this")
    parser.add_argument("--no-sample", action="store_true", help="skip the tiny sample run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None if args.no_sample else tiny_checkpoint(Path(tmp) / "ckpt")
        cmds = commands(ckpt, str(Path(tmp) / "out"))
        rows = []
        for name, cmd in cmds.items():
            if args.only and args.only not in name:
                continue
            expect_ok = "error" not in name
            time_command(cmd, tmp, expect_ok)  # warm the file cache (bytecode, shared libraries)
            times = [time_command(cmd, tmp, expect_ok) for _ in range(args.runs)]
            rows.append((name, min(times), statistics.median(times)))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    width = max(len(r[0]) for r in rows)
    print(f"{'command':<{width}}  {'min s':>6}  {'median s':>8}   ({args.runs} runs, load {load:.2f})")
    for name, low, median in rows:
        print(f"{name:<{width}}  {low:6.2f}  {median:8.2f}")


if __name__ == "__main__":
    main()

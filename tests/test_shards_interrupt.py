"""ldm-shards stopped mid-run: Ctrl-C (SIGINT), SIGTERM or SIGHUP end it with one line and 128+N, no traceback;
the shard being written is removed and the whole ones are kept, each a readable tar of its samples. A SIGKILL's
leftover (`shards-NNNNNN.tar.tmp-PID`) is removed by the next run. A process run as a user runs the tool, slowed
once its first shard is whole so the signal lands while the second is being written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
# ldm-shards' own main, with ShardSink.write slowed once a shard is whole: the signal lands mid-shard
SLOW = """
import sys, time
from ldm.data import make_shards as ms
write, finish, done = ms.ShardSink.write, ms.ShardSink._finish_current, []
def finished(self):
    finish(self)
    done.append(1)
def slowed(self, sample):
    write(self, sample)
    if done and self._writer is not None:  # a shard whole, the next one begun
        print("waiting", flush=True)
        time.sleep(300)
ms.ShardSink.write, ms.ShardSink._finish_current = slowed, finished
sys.exit(ms.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(src / f"p{i}.png")
        (src / f"p{i}.txt").write_text(f"photo number {i}")
    return src


def start(photos: Path, out: Path, tmp_path: Path) -> subprocess.Popen[str]:
    script = tmp_path / "slow.py"
    script.write_text(SLOW)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), str(photos), str(out), "--samples-per-shard", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "waiting", proc.stderr.read() if proc.stderr else ""
    return proc


def members(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return sorted(tar.getnames())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_stops_it_in_one_line_keeping_the_whole_shards(photos: Path, tmp_path: Path, signum: int) -> None:
    out = tmp_path / "shards"
    proc = start(photos, out, tmp_path)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"stopped by {signum.name}" in lines[0] and "1 whole shard" in lines[0] and "--overwrite" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["shards-000000.tar"]  # the second one's temporary file removed
    assert members(out / "shards-000000.tar") == [f"{k:09d}.{ext}" for k in range(3) for ext in ("png", "txt")]


def test_a_kills_leftover_is_removed_by_the_next_run(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    proc = start(photos, out, tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    leftover = [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert leftover == [f"shards-000001.tar.tmp-{proc.pid}"], sorted(os.listdir(out))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    again = subprocess.run([sys.executable, "-m", "ldm.data.make_shards", str(photos), str(out), "--samples-per-shard",
                            "3", "--overwrite"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"shards-00000{i}.tar" for i in range(3)]
    assert sum(len(members(out / f"shards-00000{i}.tar")) for i in range(3)) == 2 * 8

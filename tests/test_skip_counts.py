"""Skipped samples are counted exactly, by reason, for any number of loader workers and ranks.

The malformed samples sit at the end of each worker's shard, after its last batch: the case where
counts used to be lost. Training runs through `train(cfg)` (and `train.py` for two DDP ranks); the
logged total (metrics.csv), the summary lines and the run folder's list of skipped samples must all
agree with what the shards hold.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from test_train import BARE, QUIET, column, compose_train, load_ckpt, metrics, run_dir

from ldm.cli.train import train
from ldm.data import webdataset as wdm
from ldm.data.synthetic import random_sample
from ldm.lightning.data_report import LIST_DIR, Counts, summary

REPO = Path(__file__).resolve().parent.parent
GOOD_PER_SHARD = 4  # two batches of 2: every malformed sample comes after a worker's last batch
BATCH = 2
MIN_SIZE = 24
# The example, 5 malformed samples: kind -> how many
MALFORMED = {"truncated image": 1, "not an image": 2, "no caption": 1, "too small": 1}
SUMMARY = re.compile(r"data, (epoch \d+|run total): skipped (\d+) of (\d+) samples read(?:: ([^(]*))?")


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch):
    """One thread here and in the processes started (see tests/test_train.py)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_warning_limiter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wdm, "_warn", wdm._RateLimitedWarning(wdm.WARN_INTERVAL_S))


def _png(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def _malformed(kind: str, key: str, rng: np.random.Generator) -> dict[str, str | bytes]:
    image, caption = random_sample(rng, 32)
    if kind == "truncated image":
        jpeg = _png(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), "JPEG")
        return {"__key__": key, "jpg": jpeg[: len(jpeg) // 2], "txt": caption.encode()}
    if kind == "not an image":
        return {"__key__": key, "jpg": b"<html>403 Forbidden</html>", "txt": caption.encode()}
    if kind == "no caption":
        return {"__key__": key, "png": _png(image)}
    assert kind == "too small"
    return {"__key__": key, "png": _png(random_sample(rng, 16)[0]), "txt": caption.encode()}


def write_shards(folder: Path, num_shards: int) -> tuple[list[str], dict[str, str]]:
    """`num_shards` shards of GOOD_PER_SHARD good samples, then the MALFORMED ones dealt round-robin to
    the shards' ends (every shard ends with at least one). Returns the paths and malformed key -> kind."""
    rng = np.random.default_rng(0)
    kinds = [kind for kind, n in MALFORMED.items() for _ in range(n)]
    assert num_shards <= len(kinds)
    folder.mkdir(parents=True, exist_ok=True)
    paths, bad = [], {}
    for s in range(num_shards):
        samples: list[dict[str, str | bytes]] = []
        for i in range(GOOD_PER_SHARD):
            image, caption = random_sample(rng, 32)
            samples.append({"__key__": f"s{s}-{i:03d}", "png": _png(image), "txt": caption.encode()})
        for j, kind in enumerate(kinds[s::num_shards]):
            key = f"s{s}-bad{j}"
            samples.append(_malformed(kind, key, rng))
            bad[key] = kind
        path = folder / f"shard-{s:06d}.tar"
        with wds.TarWriter(str(path), encoder=False) as writer:
            for sample in samples:
                writer.write(sample)
        paths.append(str(path))
    return paths, bad


def summaries(text: str) -> dict[str, tuple[int, int, Counter[str]]]:
    """what ("epoch 0", "run total") -> (skipped, read, by reason), from the summary lines in `text`."""
    found = {}
    for what, skipped, read, reasons in SUMMARY.findall(text):
        by_reason = Counter()
        for part in filter(None, (p.strip() for p in reasons.split(","))):
            reason, _, n = part.rpartition(" ")
            by_reason[reason] = int(n)
        found[what] = (int(skipped), int(read), by_reason)
    return found


def listed(run: Path) -> list[dict[str, str]]:
    """Every row of the run folder's lists of skipped samples (all ranks)."""
    rows = []
    for path in sorted((run / LIST_DIR).glob("rank*.tsv")):
        header, *lines = path.read_text().splitlines()
        rows += [dict(zip(header.split("\t"), line.split("\t"), strict=True)) for line in lines]
    return rows


def web_overrides(shards: str, num_workers: int, *extra: str) -> list[str]:
    return [
        "data=webdataset",
        f"data.train_shards={shards}",
        "data.resolution=32",
        f"data.batch_size={BATCH}",
        f"data.num_workers={num_workers}",
        "data.shuffle_buffer=0",
        f"data.min_size={MIN_SIZE}",
        "trainer.log_every_n_steps=1",
        *BARE,
        *QUIET,
        *extra,
    ]


def test_summary_line_names_reasons_most_frequent_first(tmp_path: Path) -> None:
    counts = Counts(30, Counter({"truncated image": 1, "not an image": 2, "no caption": 1, "too small": 1}))
    assert summary(counts, "epoch 0", tmp_path) == (
        "data, epoch 0: skipped 5 of 30 samples read: not an image 2, no caption 1, too small 1, "
        f"truncated image 1 (each one listed in {tmp_path}/rank*.tsv)"
    )
    assert summary(Counts(8), "run total") == "data, run total: skipped 0 of 8 samples read"


@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
def test_every_skip_after_each_workers_last_batch_is_counted(
    tmp_path: Path, num_workers: int, caplog: pytest.LogCaptureFixture
) -> None:
    shards, bad = write_shards(tmp_path / "shards", max(1, num_workers))
    cfg = compose_train(
        tmp_path, web_overrides(f"{tmp_path}/shards", num_workers, "trainer.max_steps=-1", "+trainer.max_epochs=1")
    )
    with caplog.at_level(logging.INFO, logger="ldm.lightning.module"):
        train(cfg)
    run = run_dir(tmp_path)
    expected = Counter(bad.values())
    read = len(shards) * GOOD_PER_SHARD + len(bad)
    assert column(metrics(run), "data/skipped_samples")[-1] == len(bad) == 5
    assert column(metrics(run), "data/samples_read")[-1] == read
    found = summaries(caplog.text)
    assert found["epoch 0"] == found["run total"] == (5, read, expected)
    assert {r["key"]: r["reason"] for r in listed(run)} == bad
    assert all(r["shard"].endswith(".tar") for r in listed(run))


def test_counts_by_reason_survive_a_resume(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shards, bad = write_shards(tmp_path / "shards", 2)
    first = compose_train(tmp_path, web_overrides(f"{tmp_path}/shards", 0, "trainer.max_steps=4"))
    train(first)  # one epoch: 2 shards of 2 batches
    saved = load_ckpt(run_dir(tmp_path) / "checkpoints" / "last.ckpt")
    read = len(shards) * GOOD_PER_SHARD + len(bad)
    assert saved["skipped_samples"] == 5
    assert saved["data_counts"]["total"] == {"read": read, "skipped": dict(Counter(bad.values()))}

    resumed = compose_train(
        tmp_path,
        web_overrides(f"{tmp_path}/shards", 0, "trainer.max_steps=8", f"ckpt_path={run_dir(tmp_path)}/checkpoints/last.ckpt"),
        output_dir="${paths.root}/resumed",
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ldm.lightning.module"):
        train(resumed)
    twice = Counter({reason: 2 * n for reason, n in Counter(bad.values()).items()})
    found = summaries(caplog.text)
    assert found["epoch 1"] == (5, read, Counter(bad.values()))
    assert found["run total"] == (10, 2 * read, twice)
    # the resumed run's metrics, wherever it keeps them (its own folder, or the first run's)
    newest = max(tmp_path.glob("runs/**/metrics.csv"), key=lambda p: p.stat().st_mtime_ns)
    with newest.open() as f:
        assert column(list(csv.DictReader(f)), "data/skipped_samples")[-1] == 10


def test_two_ddp_ranks_add_up_their_skips(tmp_path: Path) -> None:
    """train.py on 2 CPU processes (gloo), one loader worker each, `epoch_length` cutting each pass right
    after its last batch; two epochs."""
    shards, bad = write_shards(tmp_path / "shards", 2)  # rank r reads shard r
    command = [
        sys.executable,
        str(REPO / "train.py"),
        "trainer=ddp_cpu",
        "trainer.devices=2",
        "trainer.max_steps=-1",
        "+trainer.max_epochs=2",
        f"paths.root={tmp_path}/runs",
        f"hydra.run.dir={tmp_path}/runs/run",
        "data.epoch_length=2",
        *web_overrides(f"{tmp_path}/shards", 1),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{REPO}"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    run = tmp_path / "runs" / "run"
    by_reason = Counter(bad.values())
    read = len(shards) * GOOD_PER_SHARD + len(bad)
    found = summaries(result.stdout + result.stderr)
    assert found["epoch 0"] == found["epoch 1"] == (5, read, by_reason), result.stdout[-3000:]
    assert found["run total"] == (10, 2 * read, by_reason + by_reason)
    assert column(metrics(run), "data/skipped_samples")[-1] == 10
    rows = listed(run)
    assert sorted((run / LIST_DIR).glob("rank*.tsv")) == [run / LIST_DIR / "rank0.tsv", run / LIST_DIR / "rank1.tsv"]
    assert Counter(r["key"] for r in rows) == Counter({key: 2 for key in bad})
    assert load_ckpt(run / "checkpoints" / "last.ckpt")["data_counts"]["total"]["skipped"] == dict(by_reason + by_reason)

"""Exact counts of the training samples the data loader skipped, by reason, all ranks together.

Batches of ldm.data.webdataset carry `skipped` (reason -> count since the previous batch) and `dropped`
(one `(shard, key, reason, detail)` per skipped sample); every skip reaches some batch, including those
after a worker's last one. `SkipCounts` adds them up per rank with no synchronisation, and `sync` (a
collective: every rank calls it at the same point, as at epoch end, run end or a checkpoint) adds the
ranks' counts into totals every rank then holds. Samples read = samples in batches + samples skipped.

Every skipped sample is listed, as it reaches training, in `<run folder>/skipped_samples/rank<R>.tsv`
(step, shard, key, reason, detail), one file per rank that skipped any. Checkpoints keep the totals (by
reason), so a resumed run's totals include the runs before it.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

LIST_DIR = "skipped_samples"  # under the run folder (the trainer's default_root_dir)


@dataclass
class Counts:
    """Samples read and, of those, skipped by reason."""

    read: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.skipped.values())

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.read + other.read, self.skipped + other.skipped)

    def __sub__(self, other: Counts) -> Counts:
        return Counts(self.read - other.read, self.skipped - other.skipped)

    def state_dict(self) -> dict[str, Any]:
        return {"read": self.read, "skipped": dict(self.skipped)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Counts:
        return cls(int(state.get("read", 0)), Counter({str(k): int(v) for k, v in state.get("skipped", {}).items()}))


def summary(counts: Counts, what: str, list_dir: Path | None = None) -> str:
    """`data, epoch 3: skipped 5 of 30 samples read: not an image 2, no caption 1, ...`, most frequent first."""
    line = f"data, {what}: skipped {counts.total} of {counts.read} samples read"
    if counts.total:
        line += ": " + ", ".join(f"{reason} {n}" for reason, n in sorted(counts.skipped.items(), key=_by_count))
        if list_dir is not None:
            line += f" (each one listed in {list_dir}/rank*.tsv)"
    return line


def _by_count(item: tuple[str, int]) -> tuple[int, str]:
    return -item[1], item[0]


class SkipCounts:
    """This rank's counts since the last `sync`, the totals of all ranks as of it, and the skip list."""

    def __init__(self) -> None:
        self.synced = Counts()  # all ranks, up to the last sync: the same on every rank
        self.epoch_start = Counts()  # `synced` when the current epoch began
        self.local = Counts()  # this rank, since the last sync
        self.seen_counts = False  # batches carry `skipped` (data that counts its skips)
        self.list_dir: Path | None = None
        self._rank = 0

    def start(self, run_dir: str | Path, rank: int) -> None:
        self.list_dir, self._rank = Path(run_dir) / LIST_DIR, rank

    def add(self, batch: dict[str, Any], step: int) -> None:
        """One training batch's skips and samples: host-side dict arithmetic, no device sync."""
        skipped = batch.get("skipped")
        if skipped is None:
            return
        self.seen_counts = True
        self.local.skipped.update(skipped)
        self.local.read += len(batch.get("key") or batch.get("caption") or ()) + sum(skipped.values())
        if batch.get("dropped") and self.list_dir is not None:
            self._write(batch["dropped"], step)

    def _write(self, dropped: list[tuple[str, str, str, str]], step: int) -> None:
        self.list_dir.mkdir(parents=True, exist_ok=True)
        path = self.list_dir / f"rank{self._rank}.tsv"
        new = not path.exists()
        with path.open("a", encoding="utf-8") as f:
            if new:
                f.write("step\tshard\tkey\treason\tdetail\n")
            for entry in dropped:
                f.write("\t".join([str(step), *(" ".join(str(part).split()) for part in entry)]) + "\n")

    def sync(self, world_size: int) -> Counts:
        """Add every rank's counts since the last sync into `synced` (a collective under DDP); returns it."""
        mine = (self.local.read, dict(self.local.skipped), self.seen_counts)
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        for read, skipped, seen in gathered:
            self.synced = self.synced + Counts(read, Counter(skipped))
            self.seen_counts |= seen
        self.local = Counts()
        return self.synced

    def end_epoch(self) -> Counts:
        """This epoch's counts (after a `sync`); the next epoch starts from here."""
        epoch = self.synced - self.epoch_start
        self.epoch_start = self.synced
        return epoch

    def state_dict(self) -> dict[str, Any]:
        """Call after `sync`, so every rank's counts are in."""
        return {"total": self.synced.state_dict(), "epoch_start": self.epoch_start.state_dict()}

    def load_state_dict(self, state: dict[str, Any] | None, skipped_total: int = 0) -> None:
        if state is None:  # a checkpoint from before the counts were kept by reason
            n = skipped_total
            state = {"total": {"read": n, "skipped": {"reason not recorded": n}}} if n else {}
        self.synced = Counts.from_state(state.get("total", {}))
        self.epoch_start = Counts.from_state(state.get("epoch_start", state.get("total", {})))
        self.local = Counts()

"""Two-process DDP on the CPU (gloo) through the real command line: `python train.py trainer=ddp_cpu`.

Lightning starts the second rank by running the same command again, so what each rank saw is
recorded by `RankProbe`, a callback added with `+callbacks.probe=...` and imported by both ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

REPO = Path(__file__).resolve().parent.parent
SAMPLES_PER_SHARD = 8


def digest(state: torch.Tensor) -> str:
    return hashlib.sha256(state.cpu().numpy().tobytes()).hexdigest()


class RankProbe(L.Callback):
    """Writes `<out>/<tag>-rank<R>.json`: the sample keys this rank trained on, the step it started
    at, and its noise generator (seed and state digest) before the first step."""

    def __init__(self, out: str, tag: str) -> None:
        self.out, self.tag = Path(out), tag
        self.record: dict[str, Any] = {"keys": []}

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        generator = pl_module.generator
        self.record.update(
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            start_step=trainer.global_step,
            seed=generator.initial_seed(),
            generator=digest(generator.get_state()),
            broadcast_buffers=getattr(trainer.strategy.model, "broadcast_buffers", None),
        )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.record["keys"] += list(batch["key"])

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{self.tag}-rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


def train_ddp(
    tmp_path: Path, tag: str, *overrides: str, trainer: tuple[str, ...] = ("trainer=ddp_cpu",), runs: str = "runs"
) -> list[dict[str, Any]]:
    """Run train.py on 2 CPU processes; returns each rank's probe record."""
    command = [
        sys.executable,
        str(REPO / "train.py"),
        *trainer,
        "trainer.devices=2",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        f"paths.root={tmp_path}/{runs}",
        f"data.root={tmp_path}/data",
        "data.num_samples=32",
        f"data.samples_per_shard={SAMPLES_PER_SHARD}",
        "data.batch_size=2",
        "data.shuffle_buffer=8",
        "+data.epoch_length=8",
        "callbacks.sample_images.steps=2",
        "callbacks.throughput=null",
        "+callbacks.probe._target_=test_train_ddp.RankProbe",
        f"+callbacks.probe.out={tmp_path}/probe",
        f"+callbacks.probe.tag={tag}",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{REPO}"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((tmp_path / "probe" / f"{tag}-rank{r}.json").read_text()) for r in range(2)]


def test_two_cpu_processes_split_shards_draw_own_noise_and_resume(tmp_path: Path) -> None:
    first = train_ddp(tmp_path, "first", "trainer.max_steps=3")
    assert [r["rank"] for r in first] == [0, 1] and all(r["world_size"] == 2 for r in first)
    shards = [{int(k) // SAMPLES_PER_SHARD for k in r["keys"]} for r in first]
    assert all(len(r["keys"]) == 3 * 2 for r in first)
    assert shards[0] and shards[1] and not shards[0] & shards[1], f"ranks shared shards: {shards}"
    # noise and timesteps: seed + global_rank, so the two ranks do not train on the same noise
    assert [r["seed"] for r in first] == [0, 1] and first[0]["generator"] != first[1]["generator"]
    # the EMA is buffers as large as the UNet: broadcasting them every step would cost more than training
    assert not any(r["broadcast_buffers"] for r in first)

    (last,) = tmp_path.glob("runs/default/*/checkpoints/last.ckpt")
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3
    assert len(saved["noise_generators"]) == 2  # both ranks' streams, gathered into rank 0's file

    resumed = train_ddp(tmp_path, "resumed", "trainer.max_steps=5", "ckpt_path=last")
    assert [r["start_step"] for r in resumed] == [3, 3]
    # each rank picks up its own noise stream where it stopped
    assert [r["generator"] for r in resumed] == [digest(s) for s in saved["noise_generators"]]
    # resumed in its own run folder: the same last.ckpt, now at step 5, and no second run folder
    assert list(tmp_path.glob("runs/default/*/checkpoints/last.ckpt")) == [last]
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 5

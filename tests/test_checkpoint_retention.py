"""How many checkpoints a run keeps on disk. At SD 1.5 size a checkpoint (UNet, EMA, AdamW's two moments,
VAE, text encoder) is ~14.6 GB, so `last.ckpt` is a symlink to the newest step file (Lightning's
`save_last: link`), not a second copy, and the full-size recipes keep the newest 3 step files
(`monitor: step, mode: max, save_top_k: 3`). Runs here are the tiny model, through the real `train.py`
where the command line is the point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from test_train import _one_thread  # noqa: F401 (autouse fixture: tiny models on one thread)

from ldm.cli.train import train

REPO = Path(__file__).resolve().parent.parent
FULL_SIZE_RECIPES = ["sd15_finetune", "sd15_lora", "arcane", "modi", "openjourney", "robo"]
BOUNDED = [
    "callbacks.checkpoint.save_top_k=2",
    "callbacks.checkpoint.monitor=step",
    "callbacks.checkpoint.mode=max",
]




def run_overrides(tmp_path: Path, *overrides: str) -> list[str]:
    """16 demo shapes (4 steps an epoch), checkpoints every 2 steps, nothing else."""
    return [
        f"paths.root={tmp_path}/runs",
        f"data.root={tmp_path}/data",
        "data.num_samples=16",
        "data.samples_per_shard=16",
        "data.batch_size=4",
        "data.shuffle_buffer=0",
        "logger=none",
        "callbacks.sample_images=null",
        "callbacks.throughput=null",
        "callbacks.lr_monitor=null",
        "callbacks.checkpoint.every_n_train_steps=2",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        *overrides,
    ]


def train_cli(tmp_path: Path, run: str, *overrides: str) -> Path:
    """`python train.py ...` into runs/default/RUN; returns that run folder."""
    out = tmp_path / "runs" / "default" / run
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            *run_overrides(tmp_path, f"hydra.run.dir={out}", *overrides),
        ],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def train_here(tmp_path: Path, run: str, *overrides: str) -> Path:
    """The same config through `ldm.cli.train.train` in this process (no interpreter start-up)."""
    out = tmp_path / "runs" / "default" / run
    with initialize_config_module(config_module="ldm.conf", version_base="1.3"):
        cfg = compose("train", overrides=run_overrides(tmp_path, f"paths.output_dir={out}", *overrides))
    train(cfg)
    return out


def step_files(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step-*.ckpt"))


def load_ckpt(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_last_links_to(run: Path, name: str) -> None:
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_symlink(), "last.ckpt is a second full copy, not a link"
    # relative: the run folder can be moved or copied (cp -r, rsync -a) and the link still holds
    assert os.readlink(last) == name
    assert last.resolve() == (run / "checkpoints" / name).resolve()


def test_last_links_to_the_newest_step_file_and_resume_follows_the_link(tmp_path: Path) -> None:
    # recipe-style retention: the newest 2 step files, the oldest deleted as newer ones land
    first = train_cli(tmp_path, "first", "trainer.max_steps=6", *BOUNDED)
    assert step_files(first) == ["step-0000004.ckpt", "step-0000006.ckpt"]
    assert_last_links_to(first, "step-0000006.ckpt")
    assert load_ckpt(first / "checkpoints" / "last.ckpt")["global_step"] == 6

    # ckpt_path=last finds first/checkpoints/last.ckpt (a link) and trains on from step 6 in the first run's
    # folder (one run, one folder), top-k deleting the oldest files from its restored list of them
    train_cli(tmp_path, "second", "trainer.max_steps=10", "ckpt_path=last", *BOUNDED)
    assert step_files(first) == ["step-0000008.ckpt", "step-0000010.ckpt"]  # from 6 on, not from 0
    assert_last_links_to(first, "step-0000010.ckpt")
    assert load_ckpt(first / "checkpoints" / "last.ckpt")["global_step"] == 10

    # resume_in_place=false: a branch in a folder of its own, keeping every step file (the default); the
    # resumed run's files stay as they were
    third = train_cli(tmp_path, "third", "trainer.max_steps=12", "ckpt_path=last", "resume_in_place=false")
    assert step_files(third) == ["step-0000012.ckpt"]  # from 10 on
    assert_last_links_to(third, "step-0000012.ckpt")
    assert step_files(first) == ["step-0000008.ckpt", "step-0000010.ckpt"]
    assert_last_links_to(first, "step-0000010.ckpt")


def test_a_requeued_job_resumes_through_the_link_in_its_own_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SLURM runs a requeued job again in the same folder: it resumes from the link, and top-k goes on
    deleting the oldest files (its restored list of them: a fresh start would leave 4 and 6 behind), the
    one the link pointed at when it resumed included, never the newest."""
    train_here(tmp_path, "job", "trainer.max_steps=6", *BOUNDED)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    job = train_here(tmp_path, "job", "trainer.max_steps=10", *BOUNDED)
    assert step_files(job) == ["step-0000008.ckpt", "step-0000010.ckpt"]
    assert_last_links_to(job, "step-0000010.ckpt")
    assert load_ckpt(job / "checkpoints" / "last.ckpt")["global_step"] == 10


@pytest.mark.parametrize("steps", [1, 3])
def test_a_run_that_ends_between_periodic_checkpoints_saves_its_final_step(tmp_path: Path, steps: int) -> None:
    """max_steps not a multiple of every_n_train_steps (2 here): before its first step file (1), or mid-epoch
    after one (3; 4 steps an epoch), where Lightning's link would point last.ckpt at step 2's file."""
    run = train_here(tmp_path, "short", f"trainer.max_steps={steps}")
    assert step_files(run)[-1] == f"step-{steps:07d}.ckpt"
    assert_last_links_to(run, f"step-{steps:07d}.ckpt")
    assert load_ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == steps


def compose_experiment(name: str, tmp_path: Path) -> Any:
    overrides = [f"experiment={name}", "init_from=x", f"paths.output_dir={tmp_path}"]
    with initialize_config_module(config_module="ldm.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("name", FULL_SIZE_RECIPES)
def test_full_size_recipes_keep_a_bounded_number_of_checkpoints(name: str, tmp_path: Path) -> None:
    cfg = compose_experiment(name, tmp_path)
    checkpoint = cfg.callbacks.checkpoint
    assert checkpoint.save_last == "link"
    assert checkpoint.monitor == "step" and checkpoint.mode == "max"
    assert 1 <= checkpoint.save_top_k <= 3
    # Lightning accepts it (it refuses save_top_k > 1 without a monitor)
    callback = instantiate(checkpoint)
    assert isinstance(callback, ModelCheckpoint) and callback.save_top_k == checkpoint.save_top_k


def test_default_keeps_every_step_file_with_last_as_a_link(tmp_path: Path) -> None:
    with initialize_config_module(config_module="ldm.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}"])
    assert cfg.callbacks.checkpoint.save_last == "link"
    assert cfg.callbacks.checkpoint.save_top_k == -1

"""train.py stops on what it can tell from the config alone before it builds a model, a logger or a wandb run:
a recipe's required init_from left out, trainer=gpu where torch sees no GPU, random crops asked of cached
latents. Each is one line, typed as a user types the command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_sd_file

from ldm.cli.train import ConfigError, check_cached_latents

ROOT = Path(__file__).resolve().parent.parent


def train_py(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("recipe", ["sd15_finetune", "sd15_lora", "openjourney", "arcane"])
def test_a_recipe_that_fine_tunes_names_init_from_when_it_is_left_out(tmp_path: Path, recipe: str) -> None:
    # `init_from: ???` in a recipe used to vanish under train.yaml's null: SD 1.5 trained from random weights
    data = "data.instance_dir=pictures/" if recipe == "arcane" else "data.train_shards=shards/"  # DreamBooth: a folder
    args = [f"experiment={recipe}", "trainer=cpu", data]
    proc = train_py(tmp_path, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("train.py")]
    assert lines == ["train.py: error: missing mandatory value(s): init_from; set them on the command line, "
                     "e.g. python train.py init_from=..."], proc.stderr
    assert not list(tmp_path.glob("outputs/*/*/checkpoints")) and not list(tmp_path.glob("outputs/*/*/wandb"))


def test_module_init_from_gives_the_required_init_from_too(tmp_path: Path) -> None:
    from test_train import compose_train

    from ldm.cli.train import missing_values

    assert missing_values(compose_train(tmp_path, ["experiment=sd15_finetune", "data.train_shards=s/"])) == ["init_from"]
    for given in ("init_from=base.safetensors", "module.init_from=base.safetensors"):
        assert missing_values(compose_train(tmp_path, ["experiment=sd15_finetune", "data.train_shards=s/", given])) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for machines without a GPU")
def test_trainer_gpu_without_a_gpu_stops_before_the_model_and_the_loggers(tmp_path: Path) -> None:
    ckpt = tiny_sd_file(tmp_path / "tiny.safetensors")
    proc = train_py(tmp_path, "experiment=sd15_lora", f"init_from={ckpt}", "data.train_shards=shards/")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "train.py: error: trainer.accelerator=gpu, but torch sees no GPU here: train on the CPU with trainer=cpu" \
        in proc.stderr, proc.stderr
    assert "wandb" not in proc.stdout + proc.stderr  # no run was started to be synced later
    assert not list(tmp_path.glob("outputs/*/*/wandb")) and not list(tmp_path.glob("outputs/*/*/csv"))


def test_random_crop_on_cached_latents_is_refused(tmp_path: Path) -> None:
    data = SimpleNamespace(latents=True, random_crop=True, random_flip=False, train_shards=str(tmp_path / "*.tar"))
    module = SimpleNamespace(first_stage_model=torch.nn.Linear(1, 1))
    with pytest.raises(ConfigError, match=r"data.random_crop=true but data.train_shards hold cached latents.*"
                                          r"set data.random_crop=false"):
        check_cached_latents(data, module)


def test_a_check_inside_fit_gives_its_line_on_each_rank_without_a_traceback(tmp_path: Path) -> None:
    """The data module's own check in its setup (inside trainer.fit, where no instantiate wraps it): 2 ranks
    of trainer=ddp_cpu on the demo's data packed into one shard. Each rank says it in one line, exit 2."""
    proc = train_py(tmp_path, "trainer=ddp_cpu", "trainer.max_steps=2", "data.num_samples=32", "data.batch_size=2",
                    "logger=none")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train.py")]
    assert lines and all(line.startswith("train.py: error: 1 training shard(s) for 2 ranks") for line in lines), lines
    assert "data.samples_per_shard=N" in lines[0] and "data.resampled=true data.epoch_length=" in lines[0]


def test_a_value_error_from_deep_inside_a_library_keeps_its_traceback() -> None:
    """Only this package's own checks are shown alone: a ValueError torch raises is a failure to look into."""
    from ldm.cli.train import user_error
    from ldm.data.webdataset import WebDataModule

    try:
        torch.nn.functional.interpolate(torch.zeros(1, 1, 4, 4), scale_factor=2, mode="nearest-but-unknown")
    except (ValueError, NotImplementedError) as err:
        assert user_error(err) is None, err
    else:
        raise AssertionError("torch accepted an unknown interpolation mode")
    with pytest.raises(ValueError) as ours:
        WebDataModule("x.tar", resolution=30)
    assert user_error(ours.value) is ours.value

"""The size of the sample grids drawn during training (SampleImages, and CaptionFidelity/InputFidelity
through it): the configured `resolution`, else the training data's, else the model's native image_size —
never the autoencoder's ddconfig.resolution (256 for every SD model, so SD 1.5 grids came out at half
size). The model here has SD 1.5's config values where they matter (image_size 512, ddconfig resolution
256, an 8x autoencoder) at tiny widths, so a 512 px grid takes a second on a CPU."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import model_config
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import open_dict
from PIL import Image
from test_train import _one_thread  # noqa: F401 (autouse fixture: tiny models on one thread)

from ldm.cli.train import train
from ldm.lightning.callbacks import CaptionFidelity, SampleImages
from ldm.lightning.module import LatentDiffusion

PROMPTS = ["a red circle on a blue background"]




@pytest.fixture(scope="module")
def sd15_shaped() -> LatentDiffusion:
    """Tiny widths, SD 1.5's sizes: native 512 px, a kl-f8-like autoencoder configured at 256 px."""
    config = model_config("tiny")
    config["image_size"] = 512
    config["first_stage"]["ddconfig"].update(resolution=256, ch_mult=[1, 1, 1, 1])  # 8x down, as SD
    config["unet"]["attention_resolutions"] = [2]  # attention on 32x32 latents only, not 64x64
    return LatentDiffusion(model=config, ema_decay=None)


def stand_in_trainer(resolution: int | None) -> SimpleNamespace:
    return SimpleNamespace(datamodule=SimpleNamespace(resolution=resolution) if resolution else None)


def sizes(images: list[np.ndarray]) -> set[tuple[int, ...]]:
    return {image.shape for image in images}


def test_sd15_shaped_grid_is_at_native_512_px_not_the_autoencoders_256(sd15_shaped: LatentDiffusion) -> None:
    assert sd15_shaped.config["first_stage"]["ddconfig"]["resolution"] == 256
    callback = SampleImages(PROMPTS, steps=2)
    assert callback.sample_resolution(sd15_shaped) == 512  # no trainer, no datamodule
    assert callback.sample_resolution(sd15_shaped, stand_in_trainer(None)) == 512
    assert sizes(callback.sample(sd15_shaped)) == {(512, 512, 3)}


def test_grid_follows_the_training_data_resolution(sd15_shaped: LatentDiffusion) -> None:
    callback = SampleImages(PROMPTS, steps=2)
    assert sizes(callback.sample(sd15_shaped, stand_in_trainer(64))) == {(64, 64, 3)}
    # CaptionFidelity samples through SampleImages, with the same rule
    fidelity = CaptionFidelity(PROMPTS, judge=None, steps=2)
    assert fidelity.sampler.sample_resolution(sd15_shaped, stand_in_trainer(64)) == 64


def test_configured_resolution_wins_and_pinned_inputs_keep_their_size(sd15_shaped: LatentDiffusion) -> None:
    callback = SampleImages(PROMPTS, steps=2, resolution=128)
    assert callback.sample_resolution(sd15_shaped, stand_in_trainer(64)) == 128
    assert sizes(callback.sample(sd15_shaped, stand_in_trainer(64))) == {(128, 128, 3)}
    # an edit or semantic-map model samples the pictures or maps it pinned, at their size
    callback.inputs = torch.zeros(1, 3, 48, 48)
    assert callback.sample_resolution(sd15_shaped, stand_in_trainer(64)) == 48


def test_a_real_run_samples_at_its_datamodules_resolution(tmp_path: Path) -> None:
    """Through Lightning (trainer.datamodule), the tiny model (native 32 px) trained on 16 px shapes."""
    overrides = [
        f"paths.root={tmp_path}/runs",
        "paths.output_dir=${paths.root}/run",
        f"data.root={tmp_path}/data",
        "data.num_samples=8",
        "data.samples_per_shard=8",
        "data.batch_size=4",
        "data.shuffle_buffer=0",
        "data.resolution=16",
        "trainer.max_steps=1",
        "trainer.enable_progress_bar=false",
        "callbacks.throughput=null",
        "callbacks.lr_monitor=null",
        "callbacks.sample_images.steps=2",
    ]
    with initialize_config_module(config_module="ldm.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    train(cfg)
    (grid,) = (tmp_path / "runs" / "run" / "samples").glob("step-*.png")
    # 2 validation prompts side by side, each 16 px
    assert Image.open(grid).size == (2 * 16, 16)


@pytest.mark.parametrize("experiment", ["demo", "demo_edit", "demo_semantic"])
def test_demo_grids_stay_at_the_demo_size(experiment: str) -> None:
    """The demos train at the tiny model's native 32 px: the data rule keeps their grids (and the
    fidelity scores' samples) at 32 px on the CPU."""
    with initialize_config_module(config_module="ldm.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"])
    assert cfg.data.resolution == cfg.model.image_size == 32
    assert cfg.callbacks.sample_images.get("resolution") is None
    with open_dict(cfg):
        cfg.callbacks.sample_images.prompts = PROMPTS
    callback = instantiate(cfg.callbacks.sample_images)
    model = SimpleNamespace(config={"image_size": cfg.model.image_size})
    assert callback.sample_resolution(model, stand_in_trainer(cfg.data.resolution)) == 32

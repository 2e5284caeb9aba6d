"""ldm-cache-latents and data=cached_latents: training on cached latents takes the steps training on the
images takes, and latents from another autoencoder or resolution are refused before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import model_config, randomize_
from test_train import BARE, QUIET, _one_thread, compose_train, load_ckpt  # noqa: F401 (autouse fixture)

from ldm.cli.train import ConfigError, train
from ldm.data.cache_latents import cache_latents, main
from ldm.data.synthetic import ensure_demo_shards
from ldm.models.autoencoder import AutoencoderKL

STREAM = ["data.batch_size=4", "data.shuffle_buffer=16", "data.num_workers=0", "data.random_flip=false"]


def write_autoencoder(path: Path, seed: int) -> Path:
    """A stage-one checkpoint as this project writes them: weights plus ldm_config.first_stage."""
    config = model_config("tiny")["first_stage"]
    vae = randomize_(AutoencoderKL(**config), std=0.05, seed=seed)
    state = {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    torch.save({"state_dict": state, "ldm_config": {"first_stage": config}}, path)
    return path


def test_training_on_cached_latents_takes_the_same_steps_as_on_images(tmp_path: Path) -> None:
    images = tmp_path / "images"
    ensure_demo_shards(str(images), 64, 16, 32, 0)
    ae = write_autoencoder(tmp_path / "ae.ckpt", seed=1)
    # encoded in batches of the training batch size: then even the last bits agree (a convolution's
    # rounding can depend on the batch it runs in)
    info = cache_latents(ae, str(images), tmp_path / "latents", resolution=32, batch_size=4)
    assert info["samples"] == 64 and info["latent_channels"] == 4
    sources = sorted(p.name for p in images.glob("*.tar"))
    assert sorted(p.name for p in (tmp_path / "latents").glob("*.tar")) == sources  # one per source shard

    # lr 1e-3 without warm-up: the weights move by ~1e-3 a step, so a wrong latent would show
    common = ["trainer.max_steps=6", "module.ema_decay=0.9", "module.optimizer.lr=1e-3", "module.lr_scheduler=null", f"module.first_stage_ckpt={ae}", *STREAM, *BARE, *QUIET]
    on_images = ["data=webdataset", f"data.train_shards={images}", "data.resolution=32"]
    on_latents = ["data=cached_latents", f"data.train_shards={tmp_path / 'latents'}", "data.resolution=32"]
    train(compose_train(tmp_path, [*common, *on_images], output_dir="${paths.root}/images"))
    train(compose_train(tmp_path, [*common, *on_latents], output_dir="${paths.root}/latents"))

    ckpt_a = load_ckpt(tmp_path / "runs/images/checkpoints/last.ckpt")
    ckpt_b = load_ckpt(tmp_path / "runs/latents/checkpoints/last.ckpt")
    a, b = ckpt_a["state_dict"], ckpt_b["state_dict"]
    assert ckpt_a["global_step"] == ckpt_b["global_step"] == 6 and int(b["model_ema.num_updates"]) == 6
    trained = [k for k in a if k.startswith(("model.diffusion_model.", "model_ema."))]
    different = [k for k in trained if not torch.equal(a[k], b[k])]
    assert not different, f"cached latents trained differently from images: {different[:3]}"


def test_latents_of_another_autoencoder_or_resolution_are_refused(tmp_path: Path) -> None:
    images = tmp_path / "images"
    ensure_demo_shards(str(images), 16, 16, 32, 0)
    cached_with = write_autoencoder(tmp_path / "a.ckpt", seed=1)
    trained_with = write_autoencoder(tmp_path / "b.ckpt", seed=2)
    assert main([str(cached_with), str(images), str(tmp_path / "latents"), "--resolution", "32"]) == 0
    assert json.loads((tmp_path / "latents" / "cache.json").read_text())["resolution"] == 32
    latents = ["data=cached_latents", f"data.train_shards={tmp_path / 'latents'}", "trainer.max_steps=1", *BARE]
    with pytest.raises(ConfigError, match="cached with another autoencoder"):
        train(compose_train(tmp_path, [*latents, "data.resolution=32", f"module.first_stage_ckpt={trained_with}"]))
    with pytest.raises(ConfigError, match="cached at resolution 32"):
        train(compose_train(tmp_path, [*latents, "data.resolution=64", f"module.first_stage_ckpt={cached_with}"]))
    # a second run into the same folder does not silently overwrite
    with pytest.raises(SystemExit):
        main([str(cached_with), str(images), str(tmp_path / "latents"), "--resolution", "32"])

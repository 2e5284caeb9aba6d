"""Stage one: training the first-stage autoencoder on demo-like shards, its losses, its checkpoint as
the first stage of LatentDiffusion, and the Hydra experiments."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import model_config
from hydra import compose, initialize_config_module
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.data.synthetic import write_shapes_shards
from ldm.data.webdataset import WebDataModule
from ldm.lightning.autoencoder import AutoencoderTraining
from ldm.lightning.module import LatentDiffusion
from ldm.models.autoencoder_losses import LPIPS, load_lpips

TINY = model_config("tiny")


class Recorder(L.Callback):
    """The logged training metrics after every batch, and the discriminator's weights."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.disc_weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        if pl_module.loss.discriminator is not None:
            self.disc_weights.append(pl_module.loss.discriminator.main[0].weight.detach().clone())


def fit(
    module: AutoencoderTraining, shard_dir: Path, max_steps: int, batch_size: int = 8
) -> tuple[L.Trainer, Recorder]:
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    data = WebDataModule(
        str(shard_dir / "shapes-*.tar"), batch_size=batch_size, resolution=32, shuffle_buffer=64
    )
    trainer.fit(module, datamodule=data)
    return trainer, recorder


def adam(lr: float = 2e-3) -> partial:
    return partial(torch.optim.Adam, lr=lr, betas=(0.9, 0.99))


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_shapes_shards(out, num_samples=64, samples_per_shard=32, resolution=32, seed=0)
    return out


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random LPIPS weights saved the way users get them: torchvision's vgg16 state dict (with its
    classifier) and the lpips package's linear layers, in two files."""
    out = tmp_path_factory.mktemp("lpips")
    gen = torch.Generator().manual_seed(0)
    reference = LPIPS()
    trunk = {}
    for key, value in reference.net.state_dict().items():
        _, index, param = key.split(".")  # sliceK.N.weight -> features.N.weight
        trunk[f"features.{index}.{param}"] = torch.randn(value.shape, generator=gen) * 0.05
    trunk["classifier.0.weight"] = torch.zeros(4, 4)
    lins = {
        f"lin{k}.model.1.weight": torch.rand(1, w, 1, 1, generator=gen)
        for k, w in enumerate((64, 128, 256, 512, 512))
    }
    torch.save(trunk, out / "vgg16.pth")
    torch.save(lins, out / "vgg.pth")
    return {"trunk": out / "vgg16.pth", "lins": out / "vgg.pth", "dir": out}


@pytest.fixture(scope="module")
def trained(
    shard_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[AutoencoderTraining, Recorder, Path]:
    torch.manual_seed(0)
    module = AutoencoderTraining(TINY, optimizer=adam())
    trainer, recorder = fit(module, shard_dir, max_steps=150, batch_size=16)
    ckpt = tmp_path_factory.mktemp("ckpt") / "autoencoder.ckpt"
    trainer.save_checkpoint(ckpt)
    return module, recorder, ckpt


def test_training_lowers_the_reconstruction_loss(trained) -> None:
    _, recorder, _ = trained
    rec = [m["train/rec_loss"] for m in recorder.metrics]
    assert len(rec) == 150
    first, last = sum(rec[:5]) / 5, sum(rec[-5:]) / 5
    assert last < 0.8 * first, f"reconstruction loss went from {first:.3f} to {last:.3f}"


def test_checkpoint_is_the_first_stage_of_latent_diffusion(trained, shard_dir: Path) -> None:
    module, _, ckpt = trained
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    scale_factor = saved["ldm_config"]["scale_factor"]
    assert saved["ldm_config"]["first_stage"] == TINY["first_stage"]

    diffusion = LatentDiffusion(model=TINY, first_stage_ckpt=str(ckpt), ema_decay=None)
    ours = module.first_stage_model.state_dict()
    theirs = diffusion.first_stage_model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert diffusion.scale_factor == pytest.approx(scale_factor)

    # The scale factor makes the diffusion model's latents of these images about unit variance.
    batch = next(iter(_loader(shard_dir, batch_size=64)))
    with torch.no_grad():
        latents = diffusion.first_stage_model.encode(batch["image"]).sample(torch.Generator().manual_seed(0))
    assert (scale_factor * latents).std().item() == pytest.approx(1.0, rel=0.15)


def test_init_from_starts_from_a_checkpoints_first_stage(trained) -> None:
    module, _, ckpt = trained
    restarted = AutoencoderTraining(TINY, optimizer=adam(), init_from=str(ckpt))
    ours = module.first_stage_model.state_dict()
    assert all(torch.equal(v, restarted.first_stage_model.state_dict()[k]) for k, v in ours.items())


def _loader(shard_dir: Path, batch_size: int):
    data = WebDataModule(
        str(shard_dir / "shapes-*.tar"), batch_size=batch_size, resolution=32, shuffle_buffer=0
    )
    data.setup("fit")
    return data.train_dataloader()


def test_discriminator_starts_at_disc_start_and_both_optimizers_step(shard_dir: Path, lpips_files) -> None:
    torch.manual_seed(0)
    module = AutoencoderTraining(
        TINY,
        optimizer=adam(1e-3),
        disc_start=2,
        lpips_weight=1.0,
        lpips_path=[str(lpips_files["trunk"]), str(lpips_files["lins"])],
    )
    encoder_before = module.first_stage_model.encoder.conv_in.weight.detach().clone()
    disc_before = module.loss.discriminator.main[0].weight.detach().clone()
    trainer, recorder = fit(module, shard_dir, max_steps=8)  # two optimizer steps per batch: 4 batches

    assert trainer.global_step == 8
    assert len(recorder.metrics) == 4
    assert not torch.equal(module.first_stage_model.encoder.conv_in.weight, encoder_before)
    # Batches 0 and 1 leave the discriminator alone; from batch 2 on it trains.
    assert torch.equal(recorder.disc_weights[1], disc_before)
    assert not torch.equal(recorder.disc_weights[2], disc_before)
    assert recorder.metrics[1]["train/d_loss"] == 0.0 and recorder.metrics[1]["train/g_loss"] == 0.0
    for m in recorder.metrics[2:]:
        assert torch.isfinite(torch.tensor([m["train/d_loss"], m["train/g_loss"], m["train/total"]])).all()
        assert m["train/d_loss"] > 0.0
    state = module.state_dict()
    assert "loss.logvar" in state
    assert any(k.startswith("loss.discriminator.main.") for k in state)
    assert "loss.perceptual_loss.lin0.model.1.weight" in state
    assert "loss.perceptual_loss.net.slice1.0.weight" in state


def test_lpips_weight_without_a_path_names_the_option() -> None:
    with pytest.raises(ValueError, match="lpips_path"):
        AutoencoderTraining(TINY, optimizer=adam(), lpips_weight=1.0)
    with pytest.raises(FileNotFoundError, match="lpips_path"):
        AutoencoderTraining(TINY, optimizer=adam(), lpips_weight=1.0, lpips_path="/nonexistent/vgg.pth")


def test_lpips_reads_the_torchvision_and_lpips_layouts_and_its_own(lpips_files) -> None:
    split = load_lpips([lpips_files["trunk"], lpips_files["lins"]])
    combined_path = lpips_files["dir"] / "lpips_combined.safetensors"
    save_file(split.state_dict(), str(combined_path))
    combined = load_lpips(str(combined_path))

    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    y = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    with torch.no_grad():
        d_split, d_combined = split(x, y), combined(x, y)
        assert d_split.shape == (2, 1, 1, 1)
        assert torch.equal(d_split, d_combined)
        assert (d_split > 0).all()
        assert split(x, x).abs().max().item() < 1e-6

    lins = torch.load(lpips_files["lins"], weights_only=True)
    del lins["lin3.model.1.weight"]
    torch.save(lins, lpips_files["dir"] / "incomplete.pth")
    with pytest.raises(ValueError, match=r"missing keys \['lin3.model.1.weight'\]"):
        load_lpips([lpips_files["trunk"], lpips_files["dir"] / "incomplete.pth"])


@pytest.fixture
def hydra_conf():
    def _compose(overrides: list[str]):
        with initialize_config_module(config_module="ldm.conf", version_base="1.3"):
            return compose("train", overrides=overrides)

    return _compose


def test_demo_experiment_composes_and_trains(hydra_conf, tmp_path: Path) -> None:
    from ldm.cli.train import train

    cfg = hydra_conf(
        [
            "experiment=autoencoder_demo",
            f"paths.root={tmp_path}",
            f"paths.output_dir={tmp_path}/run",
            f"data.root={tmp_path / 'data'}",
            "data.num_samples=32",
            "data.samples_per_shard=32",
            "data.batch_size=8",
            "trainer.max_steps=3",
            "trainer.enable_progress_bar=false",
        ]
    )
    assert cfg.module._target_ == "ldm.lightning.autoencoder.AutoencoderTraining"
    assert cfg.run_name == "autoencoder_demo"
    assert cfg.callbacks.sample_images is None
    assert cfg.module.disc_start is None and cfg.module.lpips_weight == 0

    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3
    assert saved["ldm_config"]["first_stage"] == OmegaConf.to_container(cfg.model.first_stage)
    assert saved["ldm_config"]["scale_factor"] > 0
    assert list((Path(cfg.paths.output_dir) / "reconstructions").glob("*.png"))


def test_kl_f8_experiment_composes_with_ldm_recipe(hydra_conf) -> None:
    cfg = hydra_conf(["experiment=autoencoder_kl_f8"])
    assert cfg.model.first_stage.ddconfig.ch_mult == [1, 2, 4, 4]
    assert cfg.data.resolution == 256
    module = cfg.module
    assert (module.kl_weight, module.disc_start, module.disc_weight, module.lpips_weight) == (
        1e-6,
        50001,
        0.5,
        1.0,
    )
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.gradient_clip_val is None
    # The LPIPS weights are the user's to give: without them the module stops, naming the option.
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model.pop("_target_")  # as train.py passes it
    with pytest.raises(InstantiationException, match="needs lpips_path"):
        instantiate(cfg.module, model=model, _convert_="all")

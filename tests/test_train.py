"""The training loop as a user runs it: composed Hydra configs through `ldm.cli.train.train`, and
`python train.py ...` where the command line itself is the point. Tiny model, demo shards in tmp.

Two-process DDP is in test_train_ddp.py.
"""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from PIL import Image
from safetensors.torch import load_file

from ldm.checkpoint import checkpoint_from_model, ema_key_for, save_ldm_file
from ldm.cli.train import (
    ConfigError,
    missing_values,
    requeued_resume_path,
    resolve_ckpt_path,
    train,
    user_error,
)
from ldm.data.masks import random_masks
from ldm.data.synthetic import ensure_demo_shards, random_sample
from ldm.lightning.module import LatentDiffusion, NonFiniteLossError
from ldm.models.stable_diffusion import StableDiffusion, normalize_config

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(p.stem for p in (REPO / "ldm" / "conf" / "experiment").glob("*.yaml"))

# Small enough that a step of the tiny model takes a few tens of milliseconds.
TINY_DATA = {
    "num_samples": 64,
    "samples_per_shard": 16,
    "batch_size": 4,
    "shuffle_buffer": 16,
    "num_workers": 0,
}
TINY_WEB_DATA = {"resolution": 32, "batch_size": 2, "num_workers": 0}
QUIET = ["trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]
# No callbacks but checkpoints: the test at hand adds what it checks.
BARE = ["callbacks.sample_images=null", "callbacks.throughput=null", "callbacks.lr_monitor=null"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are fastest on one thread, and two threads on a busy 2-core machine are 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compose_train(root: Path, overrides: list[str], output_dir: str = "${paths.root}/run") -> DictConfig:
    """The config a user gets from `python train.py OVERRIDES`, writing only under `root`."""
    base = [f"paths.root={root}/runs", f"paths.output_dir={output_dir}"]
    with initialize_config_module(config_module="ldm.conf", version_base="1.3"):
        cfg = compose("train", overrides=base + overrides, return_hydra_config=False)
    return shrink(cfg, root, overrides)


def shrink(cfg: DictConfig, root: Path, overrides: list[str]) -> DictConfig:
    """Test sizes (unless overridden): demo data in tmp, 32 px images, no loader processes, 2-step
    samplers, wherever the config has them."""
    given = {o.lstrip("+").partition("=")[0] for o in overrides}
    with open_dict(cfg):
        if str(cfg.data.get("_target_", "")).endswith("ShapesDataModule"):
            cfg.data.root = str(root / "data")
            cfg.data.update({k: v for k, v in TINY_DATA.items() if f"data.{k}" not in given})
        elif cfg.model.get("image_size") == 32:
            cfg.data.update({k: v for k, v in TINY_WEB_DATA.items() if f"data.{k}" not in given})
            if "bucket_step" in cfg.data and "data.bucket_step" not in given:
                cfg.data.bucket_step = 8  # aspect-ratio buckets (on in the fine-tune recipes) around 32 px
        for callback in (cfg.get("callbacks") or {}).values():
            if callback is not None and "steps" in callback:
                callback.steps = 2
    return cfg


def run_dir(root: Path) -> Path:
    return root / "runs" / "run"


def metrics(out: Path) -> list[dict[str, str]]:
    (path,) = out.glob("csv/version_*/metrics.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name) not in (None, "")]


def load_ckpt(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def trained_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if k.startswith(("model.diffusion_model.", "model_ema.", "lora."))}


def cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# -- every experiment ----------------------------------------------------------------------------


# Recipes needing inputs no tiny stand-in replaces (pretrained LPIPS weights): the option to name.
NEEDS_REAL_INPUTS = {"autoencoder_kl_f8": "lpips_path"}


@dataclass
class Sweep:
    """One runs root for all experiments, so a recipe finds the stage-one run it names with
    ${latest_ckpt:...}; and tiny stand-ins for the inputs recipes leave `???`."""

    root: Path
    stand_ins: dict[str, str]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    root = tmp_path_factory.mktemp("experiments")
    tiny = OmegaConf.to_container(compose_train(root, ["model=tiny"]).model)
    tiny.pop("_target_")
    weights = root / "tiny-sd.safetensors"  # an SD single file, as a user downloads one, at tiny size
    save_ldm_file(checkpoint_from_model(StableDiffusion(**normalize_config(tiny))), weights)
    ensure_demo_shards(root / "shards", num_samples=32, samples_per_shard=16)
    pictures = root / "pictures"  # a DreamBooth folder (data.instance_dir)
    pictures.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg", "c.png"):
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(pictures / name)
    return Sweep(root, {"init_from": str(weights), "data.train_shards": f"'{root}/shards/shapes-*.tar'",
                        "data.instance_dir": str(pictures)})


# DreamBooth recipes at test sizes: the base model samples 2 class pictures in 2 steps
DREAMBOOTH_TINY = ["data.num_class_images=2", "data.class_steps=2", "data.class_batch_size=2"]


def experiment_config(name: str, root: Path, *overrides: str) -> DictConfig:
    """`experiment=NAME` on the CPU at test sizes: tiny model, CSV logs, two steps."""
    return compose_train(
        root,
        [
            f"experiment={name}",
            "model=tiny",
            "trainer=cpu",
            "logger=csv",
            "trainer.max_steps=2",
            "trainer.log_every_n_steps=1",
            *QUIET,
            *overrides,
        ],
        output_dir="${paths.root}/${run_name}/test",
    )


def run_experiment(name: str, sweep: Sweep, *overrides: str) -> None:
    """Train `name` for 2 steps, after the earlier runs its config reads checkpoints from."""
    cfg = experiment_config(name, sweep.root, *overrides)
    for prerequisite in re.findall(r"latest_ckpt:([\w-]+)", OmegaConf.to_yaml(cfg)):
        if not list((sweep.root / "runs" / prerequisite).glob("*/checkpoints/last.ckpt")):
            run_experiment(prerequisite, sweep)
    train(cfg)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_or_names_what_it_needs(name: str, sweep: Sweep) -> None:
    """A recipe that leaves options `???` (real weights, shards) stops before training and names each;
    given tiny stand-ins for those (where the sweep has one), it trains two steps like any other."""
    cfg = experiment_config(name, sweep.root)
    missing = missing_values(cfg)
    if missing:
        with pytest.raises(ConfigError) as err:
            train(cfg)
        assert all(key in str(err.value) for key in missing), err.value
    if not set(missing) <= sweep.stand_ins.keys():
        return
    stand_ins = [f"{key}={sweep.stand_ins[key]}" for key in missing]
    if str(cfg.data.get("_target_", "")).endswith("DreamBoothDataModule"):
        # the base model samples the class pictures: a recipe that leaves init_from null gets the tiny one too
        stand_ins += DREAMBOOTH_TINY + ([] if "init_from" in missing else [f"init_from={sweep.stand_ins['init_from']}"])
    if name in NEEDS_REAL_INPUTS:
        with pytest.raises(Exception) as err:
            run_experiment(name, sweep, *stand_ins)
        shown = user_error(err.value)  # what train.py prints instead of a traceback
        assert shown is not None and NEEDS_REAL_INPUTS[name] in str(shown), err.value
        assert not list((sweep.root / "runs" / cfg.run_name).glob("test/checkpoints/*.ckpt"))
        return
    run_experiment(name, sweep, *stand_ins)
    (ckpt,) = (sweep.root / "runs" / cfg.run_name).glob("test/checkpoints/last.ckpt")
    assert load_ckpt(ckpt)["global_step"] == 2
    assert list((sweep.root / "runs" / cfg.run_name).glob("test/csv/version_*/metrics.csv"))
    if (cfg.get("callbacks") or {}).get("caption_fidelity") is not None:  # the demos score themselves
        (score,) = (sweep.root / "runs" / cfg.run_name).glob("test/samples/*-fidelity.txt")
        assert 0.0 <= float(score.read_text().splitlines()[0]) <= 1.0


def test_fine_tuning_starts_from_the_init_from_weights(sweep: Sweep, tmp_path: Path) -> None:
    weights = sweep.stand_ins["init_from"]
    cfg = compose_train(
        tmp_path,
        [f"module.init_from={weights}", "module.optimizer.lr=0", "trainer.max_steps=1", *BARE, *QUIET],
    )
    train(cfg)
    saved = load_ckpt(run_dir(tmp_path) / "checkpoints" / "last.ckpt")["state_dict"]
    source = load_file(weights)
    assert [k for k in source if not torch.equal(saved[k], source[k])] == []
    unet = [k for k in source if k.startswith("model.diffusion_model.")]
    assert all(torch.equal(saved[ema_key_for(k)], source[k]) for k in unet)  # the EMA starts there too


def test_demo_without_its_autoencoder_says_to_train_it_first(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["experiment=demo"])
    # raised by the ${latest_ckpt:...} resolver, so OmegaConf wraps it; train.py prints either cleanly
    with pytest.raises((ConfigError, OmegaConfBaseException), match=r"train\.py experiment=autoencoder_demo"):
        train(cfg)


# -- learning and resuming -----------------------------------------------------------------------


@pytest.mark.slow  # ~35 s; tests/test_demo_ci.py shows more in the default suite: captions learned, not only the loss
def test_loss_falls_on_demo_shards(tmp_path: Path) -> None:
    cfg = compose_train(
        tmp_path,
        [
            "trainer.max_steps=200",
            "trainer.log_every_n_steps=1",
            "module.optimizer.lr=1e-3",
            "module.lr_scheduler.total_iters=20",
            *BARE,
            *QUIET,
        ],
    )
    with open_dict(cfg):
        cfg.data.update(num_samples=256, samples_per_shard=64, batch_size=8, shuffle_buffer=64)
    train(cfg)
    loss = column(metrics(run_dir(tmp_path)), "train/loss")
    assert len(loss) == 200
    first, last = np.mean(loss[:20]), np.mean(loss[-20:])
    assert last < 0.7 * first, f"loss went from {first:.3f} to {last:.3f}"


@pytest.mark.parametrize(
    ("epoch_length", "cut_by", "model"),
    [
        (None, "kill", []),
        (4, "kill", []),
        (None, "max_steps", []),
        (4, "max_steps", []),
        (4, "kill", ["model.unet.in_channels=9"]),  # inpainting: its random masks resume too
        (4, "kill", ["conditioning=image_concat", "module.image_dropout=0.5"]),  # edit pairs, picture dropout
        (None, "max_steps", ["conditioning=semantic_map", "model.semantic_classes=4"]),  # class maps
        (4, "kill", ["module.lora={rank:2,alpha:2}", "module.optimizer.lr=1e-2", "LORA_BASE"]),  # LoRA adapters
    ],
)
def test_resume_from_a_mid_run_checkpoint_continues_exactly(
    tmp_path: Path, epoch_length: int | None, cut_by: str, model: list[str]
) -> None:
    """Stopping at step N and resuming gives bit-identical UNet, EMA and noise stream: whether the run
    was killed after its step-N checkpoint, or finished with max_steps=N and is trained on from its
    last.ckpt (which Lightning writes with the ended epoch's batch count still set).

    The cut is at an epoch boundary, N = 4 steps = one epoch of 16 samples in batches of 4, with and
    without `epoch_length`; cuts inside an epoch are in test_midepoch_resume.py.
    """
    n = 4
    if "LORA_BASE" in model:  # LoRA trains from given weights: a fresh UNet's zero output layer passes no gradient
        base = tmp_path / "base.safetensors"
        save_ldm_file(checkpoint_from_model(randomize_unet(compose_train(tmp_path, []))), base)
        model = [m if m != "LORA_BASE" else f"module.init_from={base}" for m in model]
    common = [
        "trainer.max_steps=8",
        f"callbacks.checkpoint.every_n_train_steps={n}",
        "module.ema_decay=0.9",
        "module.caption_dropout=0.5",
        "module.offset_noise=0.1",
        "data.num_samples=16",
        *([f"+data.epoch_length={epoch_length}"] if epoch_length else []),
        *model,
        *BARE,
        *QUIET,
    ]
    train(compose_train(tmp_path, common, output_dir="${paths.root}/straight"))
    ckpts = tmp_path / "runs" / "straight" / "checkpoints"
    cut = ckpts / f"step-{n:07d}.ckpt"
    if cut_by == "max_steps":
        # no step-N checkpoint: last.ckpt is written when the run ends, after its epoch closed
        first = [*common, f"trainer.max_steps={n}", "callbacks.checkpoint.every_n_train_steps=1000"]
        train(compose_train(tmp_path, first, output_dir="${paths.root}/first"))
        cut = tmp_path / "runs" / "first" / "checkpoints" / "last.ckpt"
    assert load_ckpt(cut)["global_step"] == n

    train(compose_train(tmp_path, [*common, f"ckpt_path={cut}"], output_dir="${paths.root}/resumed"))
    # A run's newest checkpoint (last.ckpt) resumes in that run's folder; an older step file in a new one.
    resumed = tmp_path / "runs" / ("first" if cut_by == "max_steps" else "resumed")

    a = load_ckpt(ckpts / f"step-{2 * n:07d}.ckpt")
    b = load_ckpt(resumed / "checkpoints" / f"step-{2 * n:07d}.ckpt")
    assert a["global_step"] == b["global_step"] == 2 * n
    wa, wb = trained_tensors(a["state_dict"]), trained_tensors(b["state_dict"])
    assert any(k.startswith(("model_ema.", "lora.")) for k in wa) and wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"
    # the noise stream went on from where it stopped instead of starting over
    assert all(torch.equal(x, y) for x, y in zip(a["noise_generators"], b["noise_generators"], strict=True))
    fresh = torch.Generator().manual_seed(0).get_state()
    assert not torch.equal(load_ckpt(cut)["noise_generators"][0], fresh)


def randomize_unet(cfg: DictConfig) -> StableDiffusion:
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("_target_")
    model = StableDiffusion(**normalize_config(model_cfg))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


# -- data problems -------------------------------------------------------------------------------


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample.pop("__key__").decode()
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_corrupt_samples_are_skipped_counted_and_logged(tmp_path: Path) -> None:
    """A truncated JPEG and a caption-less sample: training goes on, and the running skip count
    reaches metrics.csv even though the loggers only write every other step."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(18):
        image, caption = random_sample(rng, 32)
        samples.append({"__key__": f"{i:04d}".encode(), "png": png(image), "txt": caption.encode()})
    jpeg = io.BytesIO()
    Image.fromarray(random_sample(rng, 32)[0]).save(jpeg, format="JPEG")
    samples.insert(3, {"__key__": b"truncated", "jpg": jpeg.getvalue()[:200], "txt": b"a red square"})
    samples.insert(9, {"__key__": b"nocaption", "png": png(random_sample(rng, 32)[0])})
    write_tar(tmp_path / "corrupt-000.tar", samples)

    cfg = compose_train(
        tmp_path,
        [
            "data=webdataset",
            f"data.train_shards={tmp_path}/corrupt-000.tar",
            "data.resolution=32",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.shuffle_buffer=0",
            "trainer.max_steps=4",
            "trainer.log_every_n_steps=2",
            *BARE,
            *QUIET,
        ],
    )
    train(cfg)
    rows = metrics(run_dir(tmp_path))
    assert column(rows, "data/skipped_samples")[-1] == 2
    assert len(column(rows, "train/loss")) == 2 and np.isfinite(column(rows, "train/loss")).all()
    assert load_ckpt(run_dir(tmp_path) / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_non_finite_losses_stop_the_run_with_a_finite_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two NaN steps in a row are ridden out; the third of a later streak stops the run (K = 3)."""
    bad_steps = {1, 2} | set(range(5, 100))
    loss = LatentDiffusion.diffusion_loss

    def poisoned(self: LatentDiffusion, z0: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        value = loss(self, z0, context)
        return value * float("nan") if self.global_step in bad_steps else value

    monkeypatch.setattr(LatentDiffusion, "diffusion_loss", poisoned)
    cfg = compose_train(tmp_path, ["trainer.max_steps=20", "module.max_nonfinite_steps=3", *BARE, *QUIET])
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses") as err:
        train(cfg)
    last_good = run_dir(tmp_path) / "checkpoints" / "last-good.ckpt"
    assert str(last_good) in str(err.value)
    ckpt = load_ckpt(last_good)
    assert ckpt["global_step"] == 8  # steps 5, 6, 7 were the streak
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


# -- loggers -------------------------------------------------------------------------------------


def sampled_every_2_steps(logger: str) -> list[str]:
    return [
        f"logger={logger}",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "callbacks.sample_images.every_n_steps=2",
        "callbacks.throughput=null",
        *QUIET,
    ]


def test_csv_logger_gets_scalars_and_sample_grids(tmp_path: Path) -> None:
    train(compose_train(tmp_path, sampled_every_2_steps("csv")))
    out = run_dir(tmp_path)
    rows = metrics(out)
    assert column(rows, "train/loss") and column(rows, "lr-AdamW")
    (grid,) = out.glob("csv/version_*/samples/step-0000002.png")
    assert Image.open(grid).size == (64, 32)  # two validation prompts side by side at 32 px
    assert (out / "samples" / "step-0000002.txt").read_text().splitlines() == list(
        compose_train(tmp_path, []).validation_prompts
    )


def test_tensorboard_logger_gets_scalars_and_sample_grids(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(compose_train(tmp_path, sampled_every_2_steps("tensorboard")))
    (events,) = run_dir(tmp_path).glob("tensorboard/version_*/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    assert "train/loss" in accumulator.Tags()["scalars"]
    (image,) = accumulator.Images("samples")
    assert image.step == 2 and (image.width, image.height) == (64, 32)


def test_wandb_offline_logger_gets_scalars_and_sample_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    train(compose_train(tmp_path, [*sampled_every_2_steps("wandb"), "logger.wandb.offline=true"]))
    wandb.finish()
    (run,) = run_dir(tmp_path).glob("wandb/offline-run-*")
    images = list(run.glob("files/media/images/samples_*.png"))
    assert len(images) == 2  # one per validation prompt
    (log,) = run.glob("*.wandb")  # the offline run's record, what `wandb sync` uploads
    # wandb's writer process can still be flushing it after finish() returns
    deadline = time.monotonic() + 30
    while b"train/loss" not in log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b"train/loss" in log.read_bytes()


# -- bad input through the command line ----------------------------------------------------------


def test_missing_shards_fail_before_training_without_a_traceback(tmp_path: Path) -> None:
    result = cli(
        "data=webdataset",
        f"data.train_shards='{tmp_path}/nowhere/shard-{{000..003}}.tar'",
        "data.num_workers=0",
        f"paths.root={tmp_path}/runs",
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "4 shard(s) not found" in result.stderr and "nowhere/shard-000.tar" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("runs/*/*/checkpoints/*.ckpt"))


def test_resolution_the_model_cannot_take_fails_without_a_traceback(tmp_path: Path) -> None:
    result = cli("data.resolution=36", f"paths.root={tmp_path}/runs", cwd=tmp_path)
    assert result.returncode != 0
    assert "data.resolution=36" in result.stderr and "multiple of 8" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_unet_of_unknown_input_channels_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(Exception) as err:  # noqa: PT011 (Hydra wraps it; train.py shows user_error's)
        train(compose_train(tmp_path, ["model.unet.in_channels=7", *BARE, *QUIET]))
    shown = user_error(err.value)
    assert shown is not None and "7 input channels" in str(shown) and "inpainting (9)" in str(shown)
    assert "semantic_classes=3" in str(shown)
    assert not list(tmp_path.glob("runs/**/*.ckpt"))


def test_random_masks_are_boxes_or_whole_and_reproducible() -> None:
    masks = random_masks(2000, 16, 24, torch.Generator().manual_seed(0), full_rate=0.25, max_boxes=3)
    assert masks.shape == (2000, 1, 16, 24) and set(masks.unique().tolist()) <= {0.0, 1.0}
    cover = masks.mean(dim=(1, 2, 3))
    assert abs((cover == 1).float().mean().item() - 0.25) < 0.04  # whole masks, at about full_rate
    partial = cover[cover < 1]
    # the rest: boxes of 10-80% of each side, 1 to 3 of them, never empty
    assert partial.min() > 0 and partial.max() <= 1 and 0.1 < partial.mean() < 0.7
    again = random_masks(2000, 16, 24, torch.Generator().manual_seed(0), full_rate=0.25, max_boxes=3)
    assert torch.equal(masks, again)


def test_inpainting_training_hides_the_masked_area_and_samples(tmp_path: Path) -> None:
    """A 9-channel model trains on random masks: what the UNet sees of the image is only the unmasked part,
    and the trained checkpoint inpaints with sample.py."""
    from test_sample import sample_config, write_inpainting_inputs

    from ldm.cli.sample import run

    overrides = ["model.unet.in_channels=9", "trainer.max_steps=3", *BARE, *QUIET]
    cfg = compose_train(tmp_path, [*overrides, "module.mask_full_rate=1.0"])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("_target_")
    module = instantiate(cfg.module, model=model_cfg, _convert_="all")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    other = images.clone()
    other[1] = -images[1]  # another picture in the second sample
    z0 = torch.zeros(2, 4, 8, 8)

    def condition(x: torch.Tensor, full_rate: float) -> torch.Tensor:
        module.mask_full_rate = full_rate
        module._generator = None  # the same draws each time
        return module._inpainting_condition({"image": x}, z0)

    whole = [condition(x, 1.0) for x in (images, other)]
    assert whole[0].shape == (2, 5, 8, 8) and (whole[0][:, 0] == 1).all()
    assert torch.equal(whole[0], whole[1]), "the UNet saw the picture under a whole mask"
    boxes = [condition(x, 0.0) for x in (images, other)]
    assert (boxes[0][:, 0] == 0).any() and not torch.equal(boxes[0][1, 1:], boxes[1][1, 1:])

    train(compose_train(tmp_path, overrides))
    image, mask = write_inpainting_inputs(tmp_path, 32, 32)
    ckpt = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    sampled = run(sample_config([f"ckpt={ckpt}", "prompt=a red circle", f"image={image}", f"mask={mask}",
                                 "steps=2", f"out_dir={tmp_path / 'inpainted'}", "device=cpu"]))
    assert Image.open(sampled[0]).size == (32, 32)


def test_ckpt_path_last_finds_single_runs_and_multirun_jobs(tmp_path: Path) -> None:
    """Runs launched with -m (SLURM) live in multirun-<time>/<job>/; `last` looks there too, from either kind."""
    root = tmp_path / "runs" / "default"
    single = root / "2026-01-01_00-00-00" / "checkpoints" / "last.ckpt"
    job = root / "multirun-2026-01-02_00-00-00" / "0" / "checkpoints" / "last.ckpt"
    for age, path in ((2, single), (1, job)):
        path.parent.mkdir(parents=True)
        torch.save({"global_step": age}, path)  # a whole file: ckpt_path=last refuses a cut-off one
        os.utime(path, (time.time() - 60 * age, time.time() - 60 * age))
    new_single = root / "2026-01-03_00-00-00"
    new_job = root / "multirun-2026-01-03_00-00-00" / "0"
    assert resolve_ckpt_path("last", new_single) == resolve_ckpt_path("last", new_job) == str(job)
    os.utime(single)  # now the newest
    assert resolve_ckpt_path("last", new_job) == str(single)
    # None yet: start fresh (job scripts pass ckpt_path=last every time); an explicit missing path is an error.
    assert resolve_ckpt_path("last", tmp_path / "elsewhere" / "run") is None
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_ckpt_path(str(tmp_path / "elsewhere" / "last.ckpt"), tmp_path / "elsewhere" / "run")


def test_a_requeued_slurm_job_resumes_from_its_own_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SLURM sets SLURM_RESTART_COUNT when it runs a requeued job again (in the same run folder)."""
    common = ["trainer.log_every_n_steps=1", *BARE, *QUIET]
    train(compose_train(tmp_path, ["trainer.max_steps=2", *common]))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    train(compose_train(tmp_path, ["trainer.max_steps=3", *common]))
    assert load_ckpt(run_dir(tmp_path) / "checkpoints" / "last.ckpt")["global_step"] == 3
    # the second attempt trained one step, from the first attempt's step 2, logging on in the same CSV
    with (run_dir(tmp_path) / "csv" / "version_0" / "metrics.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")] == [0, 1, 2]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # a first attempt never resumes on its own
    assert requeued_resume_path(run_dir(tmp_path)) is None
    # last.ckpt links to a step file; one deleted by hand is an error, not a silent restart from step 0
    checkpoints = tmp_path / "dangling" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").symlink_to("step-0000004.ckpt")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    with pytest.raises(ConfigError, match="step-0000004.ckpt, which no longer exists"):
        requeued_resume_path(tmp_path / "dangling")


def test_unknown_override_is_refused(tmp_path: Path) -> None:
    result = cli("trainer.max_stepz=3", f"paths.root={tmp_path}/runs", cwd=tmp_path)
    assert result.returncode != 0
    assert "max_stepz" in result.stderr
    assert not (tmp_path / "runs").exists()

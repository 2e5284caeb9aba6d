"""Fine-tuning released checkpoints without silent wrong paths (issue 13): the prediction type a
checkpoint records (or, for SD 2.x single files, what its UNet shows) is the one trained and sampled;
the model config's runtime options (gradient checkpointing) apply on top of the checkpoint's
architecture; a non-finite step moves nothing; `ckpt_path=last` starts fresh when there is nothing yet.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import model_config, randomize_
from safetensors.torch import load_file, save_file
from test_checkpoint_retention import run_overrides
from test_sample import tiny_sd2_config
from test_train import BARE, QUIET, _one_thread, compose_train, load_ckpt, run_dir  # noqa: F401 (autouse fixture)

from ldm.checkpoint import (
    CheckpointError,
    checkpoint_from_model,
    load_model,
    probe_prediction_type,
    read_checkpoint,
    save_checkpoint,
)
from ldm.cli.train import train
from ldm.diffusion.schedule import NoiseSchedule
from ldm.lightning.module import LatentDiffusion
from ldm.models.stable_diffusion import StableDiffusion

REPO = Path(__file__).resolve().parent.parent


def run_cli(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def tiny_cli_run(tmp_path: Path, *overrides: str) -> list[str]:
    """A 2-step tiny run on 16 demo shapes, writing under tmp_path."""
    return run_overrides(tmp_path, "trainer.max_steps=2", *overrides)


def write_folder(tmp_path: Path, prediction_type: str) -> Path:
    """A tiny diffusers folder whose scheduler config records `prediction_type`."""
    cfg = model_config("tiny")
    cfg["prediction_type"] = prediction_type
    model = randomize_(StableDiffusion.from_config(cfg), std=0.05)
    path = tmp_path / f"tiny-{prediction_type}"
    save_checkpoint(checkpoint_from_model(model), path)
    return path


def bare_file(model: StableDiffusion, path: Path) -> Path:
    """The model as an original LDM single file: tensors only, nothing that records the prediction type."""
    save_checkpoint(checkpoint_from_model(model), path)
    save_file(load_file(str(path)), str(path))
    return path


# -- the prediction type --------------------------------------------------------------------------


def test_a_v_prediction_folder_fine_tuned_under_an_epsilon_model_config_trains_and_samples_as_v(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_folder(tmp_path, "v_prediction")
    asked: list[str] = []
    target = NoiseSchedule.target

    def recording(self: NoiseSchedule, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
        asked.append(kind)
        out = target(self, z0, noise, t, kind)
        if kind == "v_prediction":  # the loss target is v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·z0, not ε
            a = self.alphas_cumprod.to(z0.device)[t].sqrt().view(-1, 1, 1, 1)
            torch.testing.assert_close(out, a * noise - (1 - a**2).sqrt() * z0)
            assert not torch.allclose(out, noise)
        return out

    monkeypatch.setattr(NoiseSchedule, "target", recording)
    cfg = compose_train(tmp_path, [f"module.init_from={folder}", "trainer.max_steps=2", *BARE, *QUIET])
    assert cfg.model.prediction_type == "epsilon"  # the tiny model config says epsilon
    train(cfg)
    assert asked and set(asked) == {"v_prediction"}
    last = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    assert load_ckpt(last)["ldm_config"]["prediction_type"] == "v_prediction"
    assert load_model(last).prediction_type == "v_prediction"


def test_train_py_prints_the_recorded_prediction_type_and_refuses_a_contradicting_override(tmp_path: Path) -> None:
    folder = write_folder(tmp_path, "v_prediction")
    ok = run_cli("train.py", *tiny_cli_run(tmp_path, f"module.init_from={folder}"), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "prediction_type=v_prediction: recorded in its scheduler/scheduler_config.json" in ok.stdout + ok.stderr
    for override in ("prediction_type=epsilon", "model.prediction_type=epsilon"):
        bad = run_cli("train.py", *tiny_cli_run(tmp_path, f"module.init_from={folder}", override), cwd=tmp_path)
        assert bad.returncode == 2, (override, bad.stderr[-3000:])
        message = bad.stderr.strip().splitlines()[-1]
        assert "records v_prediction" in message and "force_prediction_type=true" in message, message
        assert "Traceback" not in bad.stderr
    forced = run_cli(
        "train.py",
        *tiny_cli_run(tmp_path, f"module.init_from={folder}", "prediction_type=epsilon", "force_prediction_type=true"),
        cwd=tmp_path,
    )
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "prediction_type=epsilon: forced" in forced.stdout + forced.stderr


def test_sample_py_refuses_a_prediction_type_the_folder_contradicts(tmp_path: Path) -> None:
    folder = write_folder(tmp_path, "v_prediction")
    common = [f"ckpt={folder}", "prompt=a red circle", "steps=1", f"out_dir={tmp_path}/out", "device=cpu"]
    bad = run_cli("sample.py", *common, "prediction_type=epsilon", cwd=tmp_path)
    assert bad.returncode != 0 and "force_prediction_type=true" in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))
    ok = run_cli("sample.py", *common, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "prediction_type=v_prediction: recorded" in ok.stdout + ok.stderr


# SD 2.x single files record nothing, and the 512-base (ε) and 768-v files have the same tensors. Two
# tiny SD 2.x-structured UNets trained on the same latents, one for each target, tell the probe apart.
# The latents are offset from zero, as SD's are (their channel means are far from 0).
def _train_tiny_sd2(prediction_type: str, steps: int = 120) -> StableDiffusion:
    cfg = tiny_sd2_config()
    cfg["prediction_type"] = prediction_type
    cfg["unet"].update(model_channels=32, num_head_channels=32, transformer_depth=1)
    torch.manual_seed(0)
    model = StableDiffusion.from_config(cfg)
    opt = torch.optim.AdamW(model.model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    context = torch.zeros(8, 77, cfg["unet"]["context_dim"])
    for _ in range(steps):
        z0 = (torch.randn(8, 4, 1, 1, generator=gen) * 0.5 + 1.0).expand(8, 4, 8, 8).clone()
        z0[:, :, 2:6, 2:6] += torch.randn(8, 4, 1, 1, generator=gen) * 0.5
        t = torch.randint(0, 1000, (8,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        z_t = model.schedule.q_sample(z0, t, noise)
        loss = (model.model(z_t, t, context=context) - model.schedule.target(z0, noise, t, prediction_type)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def sd2_single_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("sd2")
        return {kind: bare_file(_train_tiny_sd2(kind), root / f"{kind}.safetensors") for kind in ("epsilon", "v_prediction")}
    finally:
        torch.set_num_threads(threads)


def test_sd2_single_files_get_the_prediction_type_their_unet_shows(sd2_single_files: dict[str, Path]) -> None:
    for kind, path in sd2_single_files.items():
        ckpt = read_checkpoint(path)
        assert ckpt.config["prediction_type"] == kind, ckpt.prediction_type_note
        assert "read off the UNet" in ckpt.prediction_type_note
        other = "epsilon" if kind == "v_prediction" else "v_prediction"
        assert f"pass prediction_type={other}" in ckpt.prediction_type_note
        # native size follows: 768 for v (SD 2.x-768), 512 for epsilon (SD 2.x-base)
        assert ckpt.config["image_size"] == (768 if kind == "v_prediction" else 512)
        # an explicit choice wins over the probe: the file records nothing
        assert read_checkpoint(path, prediction_type=other).config["prediction_type"] == other
        # and a model config's default does not: the probe decides for SD 2.x files
        assert read_checkpoint(path, default_prediction_type=other).config["prediction_type"] == kind
    # An untrained UNet (zero output layer, as built) predicts nothing: epsilon, as AUTOMATIC1111 decides.
    untrained = checkpoint_from_model(StableDiffusion.from_config(tiny_sd2_config()))
    assert probe_prediction_type(untrained.config, untrained.state_dict)[0] == "epsilon"


def test_sd1_single_files_take_the_model_config_or_epsilon(tmp_path: Path) -> None:
    path = bare_file(randomize_(StableDiffusion.from_config(model_config("tiny"))), tmp_path / "sd1.safetensors")
    assert read_checkpoint(path).config["prediction_type"] == "epsilon"
    assert read_checkpoint(path, default_prediction_type="v_prediction").config["prediction_type"] == "v_prediction"
    assert "pass prediction_type=" in read_checkpoint(path).prediction_type_note
    with pytest.raises(CheckpointError, match="not one of"):
        read_checkpoint(path, prediction_type="sample")


def test_sample_and_train_print_the_probed_choice_and_train_on_it(
    sd2_single_files: dict[str, Path], tmp_path: Path
) -> None:
    path = sd2_single_files["v_prediction"]
    sampled = run_cli(
        "sample.py", f"ckpt={path}", "prompt=a cat", "steps=1", "height=32", "width=32", f"out_dir={tmp_path}/s",
        "device=cpu", cwd=tmp_path,
    )
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    said = sampled.stdout + sampled.stderr
    assert "prediction_type=v_prediction" in said and "pass prediction_type=epsilon" in said
    # train.py under the tiny (epsilon) model config: the probe's v wins, and is what the checkpoint records
    trained = run_cli(
        "train.py",
        *tiny_cli_run(tmp_path, f"module.init_from={path}", "callbacks.checkpoint.every_n_train_steps=2", "run_name=sd2"),
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "read off the UNet" in trained.stdout + trained.stderr
    (last,) = (tmp_path / "runs" / "sd2").glob("*/checkpoints/last.ckpt")
    assert load_ckpt(last)["ldm_config"]["prediction_type"] == "v_prediction"


# -- runtime options on top of a checkpoint's architecture ----------------------------------------


def saved_activation_bytes(module: LatentDiffusion, batch: dict[str, Any]) -> int:
    """Bytes of the tensors autograd keeps for backward in one training loss: the activation memory."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    module.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z0 = module._latents(batch)
        loss = module.diffusion_loss(z0, module.encode_text(batch["caption"]))
    loss.backward()
    return total


def test_a_fine_tune_of_a_released_file_runs_its_unet_blocks_checkpointed(tmp_path: Path) -> None:
    cfg = model_config("small") if (REPO / "ldm/conf/model/small.yaml").exists() else model_config("tiny")
    cfg["unet"]["use_checkpoint"] = False
    released = bare_file(randomize_(StableDiffusion.from_config(cfg)), tmp_path / "released.safetensors")
    ours = tmp_path / "ours.safetensors"  # our own file records use_checkpoint: false in its ldm_config
    save_checkpoint(read_checkpoint(released), ours)
    with_ckpt = copy.deepcopy(cfg)
    with_ckpt["unet"]["use_checkpoint"] = True
    L.seed_everything(0)
    batch = {"image": torch.rand(2, 3, cfg["image_size"], cfg["image_size"]) * 2 - 1, "caption": ["a", "b"]}
    saved = {}
    for init in (released, ours):
        on = LatentDiffusion(with_ckpt, init_from=str(init), seed=0)
        assert on.unet.gradient_checkpointing
        assert on.config["unet"]["use_checkpoint"] is True  # and recorded so in its checkpoints
        off = LatentDiffusion(cfg, init_from=str(init), seed=0)
        assert not off.unet.gradient_checkpointing
        saved[init.name] = (saved_activation_bytes(on, batch), saved_activation_bytes(off, batch))
        # the same weights either way: only the memory changes
        torch.testing.assert_close(on.state_dict(), off.state_dict())
    for on_bytes, off_bytes in saved.values():
        assert on_bytes < 0.5 * off_bytes, saved


# -- a non-finite step moves nothing ----------------------------------------------------------------


class Snapshots(L.Callback):
    """The trainable state before and after each step: weights, AdamW's state, EMA, LR scheduler."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, Any]] = {}
        self.after: dict[int, dict[str, Any]] = {}

    @staticmethod
    def state(trainer: L.Trainer, module: LatentDiffusion) -> dict[str, Any]:
        return copy.deepcopy(
            {
                "weights": module.model.state_dict(),
                "ema": module.model_ema.state_dict(),
                "optimizer": trainer.optimizers[0].state_dict(),
                "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
                "lr": trainer.optimizers[0].param_groups[0]["lr"],
            }
        )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.fused = bool(trainer.optimizers[0].defaults.get("fused"))
        self.before[batch_idx] = self.state(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # A fused optimizer skips on the device and the host learns it at the next step, when the LR
        # scheduler's step is undone: read it now, to see this step's state as final
        pl_module._read_outcome()
        self.after[batch_idx] = self.state(trainer, pl_module)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])  # skipped by the host, on the device
@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_nan_step_leaves_weights_optimizer_ema_and_lr_schedule_as_they_were(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accumulate: int, fused: bool
) -> None:
    poisoned_batch = 2 * accumulate + accumulate - 1  # the last micro-batch of the third window
    loss = LatentDiffusion.diffusion_loss

    def poisoned(self: LatentDiffusion, z0: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        value = loss(self, z0, context)
        return value * float("nan") if self.trainer.fit_loop.epoch_loop.batch_idx == poisoned_batch else value

    monkeypatch.setattr(LatentDiffusion, "diffusion_loss", poisoned)
    snaps = Snapshots()
    monkeypatch.setattr("ldm.cli.train.build_callbacks", lambda cfg, has_logger=True: [snaps])
    cfg = compose_train(
        tmp_path,
        [
            f"trainer.max_steps={4}",
            f"trainer.accumulate_grad_batches={accumulate}",
            "module.optimizer.weight_decay=0.1",
            f"module.optimizer.fused={str(fused).lower()}",
            "trainer.gradient_clip_val=null",
            *QUIET,
        ],
    )
    train(cfg)
    assert snaps.fused == fused
    window_start = poisoned_batch - accumulate + 1
    assert _same(snaps.before[window_start], snaps.after[poisoned_batch]), "the NaN window moved the state"
    # a healthy window does move each of them, so the check above can fail
    healthy = snaps.before[0], snaps.after[accumulate - 1]
    for part in ("weights", "ema", "optimizer", "scheduler"):
        assert not _same(healthy[0][part], healthy[1][part]), part
    # and the next window trains again
    assert not _same(snaps.before[poisoned_batch + 1]["weights"], snaps.after[poisoned_batch + accumulate]["weights"])


# -- ckpt_path=last on a fresh run ----------------------------------------------------------------


def test_ckpt_path_last_starts_fresh_with_a_warning_then_resumes(tmp_path: Path) -> None:
    first = run_cli("train.py", *tiny_cli_run(tmp_path, "run_name=job", "ckpt_path=last"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "no checkpoints/last.ckpt" in first.stdout + first.stderr and "starting fresh" in first.stdout + first.stderr
    (last,) = (tmp_path / "runs" / "job").glob("*/checkpoints/last.ckpt")
    assert load_ckpt(last)["global_step"] == 2
    again = run_cli(
        "train.py", *tiny_cli_run(tmp_path, "run_name=job", "ckpt_path=last", "trainer.max_steps=4"), cwd=tmp_path
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "starting fresh" not in again.stdout + again.stderr
    # resumed in its own run folder: the same last.ckpt, now at step 4, and no second run folder
    assert list((tmp_path / "runs" / "job").glob("*/checkpoints/last.ckpt")) == [last]
    assert load_ckpt(last)["global_step"] == 4
    # an explicit path that does not exist stays an error, in one line
    missing = run_cli("train.py", *tiny_cli_run(tmp_path, f"ckpt_path={tmp_path}/nope.ckpt"), cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr

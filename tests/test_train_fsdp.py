"""trainer=fsdp (FSDP2) through the real command line, on 2 CPU processes (gloo).

The same run under DDP is the reference: sharding changes where the weights, gradients, AdamW state and
EMA live, not what they are, so after the same steps on the same data both must hold the same numbers.
Both ride out a NaN loss at step 1 (its backward runs through FSDP as any other, on NaN gradients; the
step then takes no optimizer, scheduler or EMA update).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from test_train_ddp import train_ddp

from ldm.checkpoint import load_model

FSDP_ON_CPU = ("trainer=fsdp", "trainer.accelerator=cpu", "trainer.precision=32-true")
COMMON = (
    "++data.epoch_length=2",
    "module.train_text_encoder=true",
    "callbacks.sample_images.every_n_steps=2",
    "+callbacks.poison._target_=test_train_fsdp.PoisonLoss",
    "+callbacks.poison.steps=[1]",
)


class PoisonLoss(L.Callback):
    """Makes the loss NaN at the given steps, as an overflow would, and checks the guard caught it."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        pl_module.__dict__.pop("diffusion_loss", None)
        if trainer.global_step in self.steps:
            clean = type(pl_module).diffusion_loss
            pl_module.diffusion_loss = lambda z0, context: clean(pl_module, z0, context) * float("nan")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        poisoned = trainer.global_step - 1 in self.steps
        assert pl_module._nonfinite_streak == int(poisoned), (trainer.global_step, pl_module._nonfinite_streak)


def last_checkpoint(tmp_path: Path, runs: str) -> dict:
    (path,) = tmp_path.glob(f"{runs}/default/*/checkpoints/last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.slow  # 5 two-process runs (~170 s); FSDP2's gradients against DDP and 1 process, with broken twins, are in
# the default suite (tests/test_grad_equivalence.py)
def test_fsdp_matches_ddp_and_resumes_exactly(tmp_path: Path) -> None:
    train_ddp(tmp_path, "ddp", "trainer.max_steps=4", *COMMON, runs="ddp")
    fsdp = train_ddp(tmp_path, "fsdp", "trainer.max_steps=4", *COMMON, trainer=FSDP_ON_CPU, runs="fsdp")
    assert [r["world_size"] for r in fsdp] == [2, 2]
    assert [r["seed"] for r in fsdp] == [0, 1] and fsdp[0]["generator"] != fsdp[1]["generator"]

    ddp_ckpt, fsdp_ckpt = last_checkpoint(tmp_path, "ddp"), last_checkpoint(tmp_path, "fsdp")
    ddp_sd, fsdp_sd = ddp_ckpt["state_dict"], fsdp_ckpt["state_dict"]
    assert fsdp_ckpt["global_step"] == 4 and sorted(fsdp_sd) == sorted(ddp_sd)
    # gathered into plain full tensors, as any other strategy's checkpoint
    assert all(type(v) is torch.Tensor and v.shape == ddp_sd[k].shape for k, v in fsdp_sd.items())
    for prefix in ("model.diffusion_model.", "model_ema.", "cond_stage_model."):
        keys = [k for k in ddp_sd if k.startswith(prefix) and ddp_sd[k].is_floating_point()]
        assert keys, prefix
        worst = max((fsdp_sd[k] - ddp_sd[k]).abs().max().item() for k in keys)
        assert worst < 1e-5, f"{prefix}: FSDP and DDP differ by {worst}"
    assert all(torch.isfinite(v).all() for v in fsdp_sd.values() if v.is_floating_point())
    # the run trained: weights moved, text encoder included, and the EMA lags behind them
    unet = "model.diffusion_model.out.2.weight"
    ema = "model_ema.diffusion_modelout2weight"
    assert fsdp_ckpt["state_dict"]["model_ema.num_updates"] == 3  # 4 steps; the NaN step 1 moved no EMA
    assert not torch.equal(fsdp_sd[unet], fsdp_sd[ema])
    # the checkpoint is what sample.py and ldm-convert load
    model = load_model(str(next(tmp_path.glob("fsdp/default/*/checkpoints/last.ckpt"))))
    assert torch.equal(model.unet.out[2].weight, fsdp_sd[unet])

    # resume: 2 steps, then 2 more from last.ckpt, equals the 4 straight steps bit for bit
    train_ddp(tmp_path, "half", "trainer.max_steps=2", *COMMON, trainer=FSDP_ON_CPU, runs="resume")
    resumed = train_ddp(
        tmp_path, "resumed", "trainer.max_steps=4", "ckpt_path=last", *COMMON, trainer=FSDP_ON_CPU, runs="resume"
    )
    assert [r["start_step"] for r in resumed] == [2, 2]
    (final,) = sorted(tmp_path.glob("resume/default/*/checkpoints/last.ckpt"))[-1:]
    resumed_sd = torch.load(final, map_location="cpu", weights_only=False)["state_dict"]
    different = [k for k in fsdp_sd if not torch.equal(fsdp_sd[k], resumed_sd[k])]
    assert not different, f"resumed run differs from the straight one in {different[:5]}"

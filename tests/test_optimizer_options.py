"""Optimizer and precision options of the training module: `optimizer.fused` (null: torch's fused
kernel on CUDA where the optimizer takes one, left out where it does not, so `optimizer._target_` can
name another optimizer; false: off), and EMA shadows that stay float32 under precision=bf16-true."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_train import BARE, QUIET, _one_thread, compose_train, load_ckpt, run_dir  # noqa: F401 (autouse fixture)
from torch import nn

from ldm.cli.train import train
from ldm.lightning.ema import EMA
from ldm.lightning.module import LatentDiffusion


class PlainSGD(torch.optim.SGD):
    """An optimizer without a `fused` argument (as bitsandbytes' AdamW8bit)."""

    def __init__(self, params, lr: float = 0.1, weight_decay: float = 0.0):  # noqa: ANN001
        super().__init__(params, lr=lr, weight_decay=weight_decay)


def module_with(tmp_path: Path, *overrides: str) -> LatentDiffusion:
    cfg = compose_train(tmp_path, ["model=tiny", *overrides])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("_target_")
    return instantiate(cfg.module, model=model_cfg, _convert_="all")


def built_optimizer(module: LatentDiffusion, device: str) -> Any:
    """The optimizer factory the module settles on for `device` (only the choice: no CUDA needed)."""
    module._device = torch.device(device, 0) if device == "cuda" else torch.device(device)
    return module._optimizer_factory()


@pytest.mark.parametrize(
    ("setting", "on_cuda", "on_cpu"), [("null", True, None), ("false", False, False), ("true", True, True)]
)
def test_fused_is_on_for_cuda_by_default_and_the_users_choice_otherwise(
    tmp_path: Path, setting: str, on_cuda: bool | None, on_cpu: bool | None
) -> None:
    module = module_with(tmp_path, f"module.optimizer.fused={setting}")
    assert built_optimizer(module, "cuda").keywords["fused"] is on_cuda
    factory = built_optimizer(module, "cpu")
    assert factory.keywords["fused"] is on_cpu
    optimizer = factory(params=module.trainable_parameters())
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is on_cpu


def test_an_optimizer_without_fused_is_built_without_it(tmp_path: Path) -> None:
    overrides = ["module.optimizer._target_=test_optimizer_options.PlainSGD", "~module.optimizer.betas"]
    module = module_with(tmp_path, *overrides)
    for device in ("cuda", "cpu"):
        factory = built_optimizer(module, device)
        assert "fused" not in factory.keywords
    optimizer = built_optimizer(module, "cpu")(params=module.trainable_parameters())
    assert type(optimizer) is PlainSGD and optimizer.defaults["weight_decay"] == 0.01
    # a user who asks for fused with such an optimizer is told which setting to change
    explicit = module_with(tmp_path, *overrides, "module.optimizer.fused=true")
    with pytest.raises(ValueError, match="module.optimizer.fused=null"):
        built_optimizer(explicit, "cpu")


def test_a_run_trains_with_an_optimizer_that_takes_no_fused(tmp_path: Path) -> None:
    train(compose_train(tmp_path, ["module.optimizer._target_=test_optimizer_options.PlainSGD",
                                   "~module.optimizer.betas", "trainer.max_steps=2", *BARE, *QUIET]))
    ckpt = load_ckpt(run_dir(tmp_path) / "checkpoints" / "last.ckpt")
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert ckpt["global_step"] == 2 and "momentum" in group and "betas" not in group


def test_ema_shadows_stay_float32_when_the_module_is_cast_to_bf16() -> None:
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(1 + 2**-12)  # not a bf16 number: a round trip through bf16 would change it
    ema = EMA(model, decay=0.999)
    ema.to(torch.bfloat16)
    assert ema.weight.dtype == torch.float32 and ema.decay.dtype == torch.float32
    assert torch.equal(ema.weight, torch.full((2, 3), 1 + 2**-12))
    assert ema.num_updates.dtype == torch.int32
    # a bf16 model still averages into the float32 shadows: a step a bf16 number could not hold
    model.to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(model)
    assert ema.weight.dtype == torch.float32 and not torch.equal(ema.weight.bfloat16().float(), ema.weight)


def test_bf16_true_training_keeps_float32_ema_in_its_checkpoints(tmp_path: Path) -> None:
    train(compose_train(tmp_path, ["trainer.precision=bf16-true", "trainer.max_steps=2", *BARE, *QUIET]))
    state = load_ckpt(run_dir(tmp_path) / "checkpoints" / "last.ckpt")["state_dict"]
    ema = {k: v for k, v in state.items() if k.startswith("model_ema.") and v.is_floating_point()}
    unet = {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    assert ema and all(v.dtype == torch.float32 for v in ema.values())
    assert unet and all(v.dtype == torch.bfloat16 for v in unet.values())
    assert int(state["model_ema.num_updates"]) == 2
    # the averages hold more than bf16 can: not all of them are bf16 numbers
    assert any(not torch.equal(v.bfloat16().float(), v) for v in ema.values())

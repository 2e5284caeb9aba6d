"""trainer=fsdp's mixed precision (issue 10): under bf16 the UNet's blocks compute on bf16 copies of their
weights, while the sharded weights the optimizer updates and their gradients stay float32 (torch's
MixedPrecisionPolicy, `trainer.strategy.param_dtype` / `reduce_dtype`). Under 32-true nothing is cast.

The sharding runs here on the CPU (gloo, one rank: FSDP2 casts and reduces the same way at any world size;
the gradients' averaging over ranks is tests/test_grad_equivalence.py's).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import model_config, randomize_
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from ldm.lightning.fsdp import FSDPStrategy, shard_latent_diffusion
from ldm.lightning.module import LatentDiffusion


def test_the_policy_follows_the_trainers_precision() -> None:
    auto = FSDPStrategy()
    assert auto.mixed_precision("bf16-mixed").param_dtype == torch.bfloat16
    assert auto.mixed_precision("bf16-true").param_dtype == torch.bfloat16
    assert auto.mixed_precision("32-true").param_dtype is None
    for precision in ("bf16-mixed", "32-true"):
        assert auto.mixed_precision(precision).reduce_dtype == torch.float32
    fp16 = FSDPStrategy(param_dtype="float16", reduce_dtype="bfloat16").mixed_precision("32-true")
    assert (fp16.param_dtype, fp16.reduce_dtype) == (torch.float16, torch.bfloat16)
    assert FSDPStrategy(param_dtype=None).mixed_precision("bf16-mixed").param_dtype is None


@pytest.mark.parametrize(("name", "value"), [("param_dtype", "bf32"), ("reduce_dtype", "auto"), ("reduce_dtype", None)])
def test_a_wrong_dtype_names_the_setting_and_the_choices(name: str, value: str | None) -> None:
    with pytest.raises(ValueError, match=rf"trainer\.strategy\.{name}=.*choose one of .*bfloat16"):
        FSDPStrategy(**{name: value})


def test_trainer_fsdp_composes_the_policy_settings() -> None:
    with initialize_config_module(config_module="ldm.conf", version_base="1.3"):
        cfg = compose("train", overrides=["trainer=fsdp", "trainer.strategy.param_dtype=float16"])
    assert cfg.trainer.strategy.param_dtype == "float16" and cfg.trainer.strategy.reduce_dtype == "float32"
    strategy = instantiate(cfg.trainer.strategy)
    assert strategy.mixed_precision(cfg.trainer.precision).param_dtype == torch.float16
    with initialize_config_module(config_module="ldm.conf", version_base="1.3"):
        default = compose("train", overrides=["trainer=fsdp"])
    assert default.trainer.precision == "bf16-mixed"
    assert instantiate(default.trainer.strategy).mixed_precision(default.trainer.precision).param_dtype == torch.bfloat16


@pytest.fixture
def one_rank(tmp_path: Path):
    """A gloo process group of this process alone and its 1-D mesh; torn down afterwards."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _weight_dtypes_in_forward(unet: torch.nn.Module) -> list[torch.dtype]:
    """Records the dtype of the first input conv's weight each time it runs."""
    seen: list[torch.dtype] = []
    conv = unet.input_blocks[0][0]
    conv.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
    return seen


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_sharded_unet_computes_in_the_policys_dtype_and_keeps_float32_weights(one_rank, precision: str) -> None:
    torch.manual_seed(0)
    module = LatentDiffusion(model=model_config("tiny"), ema_decay=0.99)
    randomize_(module.model.diffusion_model, std=0.05)
    reference = copy.deepcopy(module.model.diffusion_model)
    policy = FSDPStrategy().mixed_precision(precision)
    shard_latent_diffusion(module, one_rank, policy)
    unet = module.model.diffusion_model
    seen = _weight_dtypes_in_forward(unet)

    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    context = torch.randn(2, 77, module.config["unet"]["context_dim"])
    out = unet(x, t, context)
    out.float().pow(2).mean().backward()

    compute = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    assert seen == [compute] and out.dtype == compute
    for name, p in unet.named_parameters():
        assert isinstance(p, DTensor) and p.dtype == torch.float32, name
        assert p.grad is not None and p.grad.dtype == torch.float32, name
    shadows = module.model_ema.shadow_state()
    assert shadows and all(isinstance(s, DTensor) and s.dtype == torch.float32 for s in shadows.values())
    # the same numbers as the unsharded UNet run at that dtype (bf16: its weights rounded to bf16)
    with torch.no_grad():
        expected = reference.to(compute)(x.to(compute), t, context.to(compute))
    tol = 0 if compute == torch.float32 else 1e-2
    assert torch.allclose(out.detach().float(), expected.float(), atol=tol, rtol=0), (
        (out.detach().float() - expected.float()).abs().max()
    )

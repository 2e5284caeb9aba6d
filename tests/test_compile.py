"""GPU speed options, checked on the CPU: `module.compile=true` (torch.compile with inductor) and
`module.channels_last=true` give the training step's loss and gradients of the eager, contiguous UNet
within float32 rounding, and leave the checkpoint's names and tensors as they were."""

from __future__ import annotations

import time

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_train import _one_thread, compose_train  # noqa: F401

from ldm.lightning.module import plain_tensors


def tiny_module(tmp_path, **options):  # noqa: ANN001, ANN201
    cfg = compose_train(tmp_path, [])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("_target_", None)
    module = instantiate(cfg.module, model=model_cfg, _convert_="all", caption_dropout=0.0, **options)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking UNet: the zero-initialised output layer would pass no gradient
        for p in module.model.diffusion_model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return module


def loss_and_grads(module, batch) -> tuple[float, dict[str, torch.Tensor]]:  # noqa: ANN001
    module._generator = torch.Generator().manual_seed(123)
    module.zero_grad(set_to_none=True)
    z0 = module._latents(batch)
    loss = module.diffusion_loss(z0, module.encode_text(batch["caption"]))
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in module.model.diffusion_model.named_parameters()}


# torch.compile's inductor compiles C++ for the CPU: 2-3 minutes on 2 cores, so `make test-all` runs it,
# not the default suite
@pytest.mark.parametrize("option", ["channels_last", pytest.param("compile", marks=pytest.mark.slow)])
def test_speed_options_give_the_eager_loss_and_gradients(tmp_path, option: str) -> None:  # noqa: ANN001
    eager = tiny_module(tmp_path)
    fast = tiny_module(tmp_path, **{option: True})
    fast.load_state_dict(eager.state_dict())
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    batch = {"image": images, "caption": ["a red circle", "a blue square", "", "a green triangle on white"]}
    reference, ref_grads = loss_and_grads(eager, batch)
    fast.on_fit_start()
    unet = fast.model.diffusion_model
    if option == "compile":
        assert unet._compiled_call_impl is not None
    else:
        conv = next(m for m in unet.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    start = time.perf_counter()
    loss, grads = loss_and_grads(fast, batch)
    warm_up = time.perf_counter() - start
    assert abs(loss - reference) <= 1e-5 * abs(reference), (loss, reference)
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    worst_name = max(ref_grads, key=lambda n: float((grads[n] - ref_grads[n]).abs().max()))
    worst = float((grads[worst_name] - ref_grads[worst_name]).abs().max()) / scale
    assert worst < 1e-4, f"largest gradient difference {worst:.2e} of the largest gradient, in {worst_name}"
    # the checkpoint keeps the LDM names and plain tensors, whatever the in-memory form
    assert fast.state_dict().keys() == eager.state_dict().keys()
    assert all(v.is_contiguous() for v in plain_tensors(fast.state_dict()).values())
    print(f"{option}: first step {warm_up:.1f} s, loss {loss:.6f} vs {reference:.6f}, worst grad diff {worst:.1e}")

"""Training throughput of the UNet step: this project's UNet vs diffusers' UNet2DConditionModel, same weights.

    python benchmarks/train_throughput.py                                  # GPU: SD1.5 UNet, 512 px, batch 8, bf16
    python benchmarks/train_throughput.py --model tiny --size 32 --batch 8 --device cpu --dtype fp32   # CPU check

One step = forward on noisy latents with text context, MSE to a target, backward, AdamW step: what dominates
fine-tuning. Both UNets get the same random weights (converted through our diffusers mapping), the same
inputs and the same optimizer, timed in ABBA order (best of two). Prints samples/s and peak memory for each,
with and without gradient checkpointing.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import model_config, randomize_  # noqa: E402

from ldm.formats.unet import unet_config_to_diffusers, unet_to_diffusers  # noqa: E402
from ldm.models.stable_diffusion import downsampling_factor  # noqa: E402
from ldm.models.unet import UNetModel  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def step_time(unet, call, inputs, steps: int, device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    x, t, context, target = inputs

    def one() -> None:
        with autocast:
            loss = F.mse_loss(call(unet, x, t, context).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: kernels, allocator, optimizer state
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latents are size/8)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if torch.cuda.is_available() else "fp32")
    args = parser.parse_args()
    import diffusers

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = model_config(args.model)
    unet_cfg = {**cfg["unet"], "use_checkpoint": False}
    factor = downsampling_factor(cfg["first_stage"])
    ours = randomize_(UNetModel(**unet_cfg), std=0.02)
    theirs = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(unet_cfg))
    theirs.load_state_dict(unet_to_diffusers(ours.state_dict(), unet_cfg), strict=True)

    gen = torch.Generator().manual_seed(0)
    side = args.size // factor
    x = torch.randn(args.batch, unet_cfg["in_channels"], side, side, generator=gen).to(device)
    t = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
    context = torch.randn(args.batch, 77, unet_cfg["context_dim"], generator=gen).to(device)
    target = torch.randn(args.batch, unet_cfg["out_channels"], side, side, generator=gen).to(device)
    inputs = (x, t, context, target)

    def call_ours(unet, x, t, c):
        return unet(x, t, context=c)

    def call_theirs(unet, x, t, c):
        return unet(x, t, encoder_hidden_states=c).sample

    impls = {"ldm (ours)": (ours, call_ours), "diffusers": (theirs, call_theirs)}
    rows = []
    for checkpointing in (False, True):
        # ABBA order and the best of two: neither side gains from running second on a warm machine.
        best: dict[str, tuple[float, float]] = {}
        for label in ("ldm (ours)", "diffusers", "diffusers", "ldm (ours)"):
            unet, call = impls[label]
            unet.to(device).train()
            if label.startswith("ldm"):
                unet.set_gradient_checkpointing(checkpointing)
            elif checkpointing:
                unet.enable_gradient_checkpointing()
            else:
                unet.disable_gradient_checkpointing()
            result = step_time(unet, call, inputs, args.steps, device, dtype)
            best[label] = min(best.get(label, result), result)
            unet.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows += [(label, checkpointing, *best[label]) for label in impls]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{args.model} UNet training step, {args.size}px (latent {side}x{side}), batch {args.batch}, "
          f"{args.dtype}, AdamW, {name}")
    print(f"{'implementation':<16}{'grad ckpt':>10}{'s/step':>10}{'samples/s':>11}{'peak GiB':>10}")
    for label, checkpointing, seconds, peak in rows:
        print(f"{label:<16}{str(checkpointing):>10}{seconds:>10.3f}{args.batch / seconds:>11.2f}{peak:>10.2f}")


if __name__ == "__main__":
    main()

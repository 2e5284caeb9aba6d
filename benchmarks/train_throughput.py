"""Training throughput of the UNet step: this project's UNet vs diffusers' UNet2DConditionModel, same weights.

    python benchmarks/train_throughput.py            # GPU: SD1.5 UNet, 512 px, batch 32, bf16, EMA, eager and compiled
    python benchmarks/train_throughput.py --model small --size 64 --batch 4 --device cpu    # CPU: with grad ckpt too

One step = forward on noisy latents with text context, MSE to a target, backward, AdamW step (fused on a
GPU) and, with `--ema` (the default), the EMA update of the weights: what dominates fine-tuning from cached
latents. Ours uses this project's EMA (ldm.lightning.ema, LDM's layout), diffusers' its EMAModel (foreach).
Both UNets get the same random weights (converted through our diffusers mapping), the same inputs and the
same optimizer, channels-last on a GPU (as the GPU recipes), timed in ABBA order (best of two; `--order ab`,
the GPU default, times each once: half the compiles), warm-up (compilation included) left out. Each row prints as
soon as it is measured.

Columns: seconds a step, images/s, TFLOP/s and MFU from the model's FLOPs a step (torch.utils.flop_counter
on the plain forward and backward: gradient checkpointing's recompute is not counted, as MLPerf counts) over
a dense matmul rate measured in the same run (bf16 8192² on a GPU, the run's dtype 1024² on the CPU), peak
memory (GPU). `--compile both|on|off` (default: both on a GPU, off on the CPU) and `--checkpointing
both|on|off` (default: off on a GPU, both on the CPU) choose the rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import model_config, randomize_  # noqa: E402

from ldm.formats.unet import unet_config_to_diffusers, unet_to_diffusers  # noqa: E402
from ldm.lightning.ema import EMA  # noqa: E402
from ldm.models.stable_diffusion import downsampling_factor  # noqa: E402
from ldm.models.unet import UNetModel  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OURS, THEIRS = "ldm (ours)", "diffusers"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul TFLOP/s on this device in `dtype` (bf16 on a GPU): the MFU's denominator, measured here."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else dtype
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps, start = 0, time.perf_counter()
    while reps < 5 or time.perf_counter() - start < 1.0:
        a @ b
        reps += 1
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


class Step:
    """One training step of a UNet: autocast forward, MSE, backward, AdamW, EMA."""

    def __init__(self, unet, call, device: torch.device, dtype: torch.dtype, ema: str | None) -> None:
        self.unet, self.call, self.device, self.dtype = unet, call, device, dtype
        self.optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=device.type == "cuda")
        self.autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        self.ema = None
        if ema == "ours":
            self.ema = EMA(unet, decay=0.9999).to(device)
        elif ema == "diffusers":
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(unet.parameters(), decay=0.9999, foreach=True)
            self.ema.to(device)

    def loss(self, x, t, context, target):
        with self.autocast:
            return F.mse_loss(self.call(self.unet, x, t, context).float(), target)

    def __call__(self, x, t, context, target) -> None:
        self.loss(x, t, context, target).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(self.ema, EMA):
            self.ema.update(self.unet)
        elif self.ema is not None:
            self.ema.step(self.unet.parameters())


def model_flops(step: Step, inputs) -> int:
    """FLOPs of one forward and backward (no optimizer, no recompute), counted by torch's flop counter."""
    counter = FlopCounterMode(display=False)
    with counter:
        step.loss(*inputs).backward()
    step.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def step_time(step: Step, inputs, steps: int, warmup: int) -> tuple[float, float]:
    """Seconds a step (after `warmup` steps: kernels, compilation, allocator, optimizer state) and peak GiB."""
    device = step.device
    for _ in range(warmup):
        step(*inputs)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(*inputs)
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def _choices(value: str) -> list[bool]:
    return {"off": [False], "on": [True], "both": [False, True]}[value]


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latents are size/8)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32")
    parser.add_argument("--compile", choices=("off", "on", "both"), default=None,
                        help="torch.compile the UNets (default: both on a GPU, off on the CPU)")
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default=None,
                        help="gradient checkpointing (default: off on a GPU, both on the CPU)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA update each step")
    parser.add_argument("--order", choices=("abba", "ab"), default=None,
                        help="abba: each side built and timed twice, best of two (default on the CPU, where other "
                             "work shares the cores); ab: once each, half the builds and compiles (default on a GPU)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels-last weights and inputs (default: on a GPU)")
    args = parser.parse_args(argv)
    import diffusers

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    on_gpu = device.type == "cuda"
    compiles = _choices(args.compile or ("both" if on_gpu else "off"))
    checkpointings = _choices(args.checkpointing or ("off" if on_gpu else "both"))
    channels_last = on_gpu if args.channels_last is None else args.channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    cfg = model_config(args.model)
    unet_cfg = {**cfg["unet"], "use_checkpoint": False}
    factor = downsampling_factor(cfg["first_stage"])
    gen = torch.Generator().manual_seed(0)
    side = args.size // factor
    x = torch.randn(args.batch, unet_cfg["in_channels"], side, side, generator=gen)
    t = torch.randint(0, 1000, (args.batch,), generator=gen)
    context = torch.randn(args.batch, 77, unet_cfg["context_dim"], generator=gen)
    target = torch.randn(args.batch, unet_cfg["out_channels"], side, side, generator=gen)
    inputs = (x.to(device, memory_format=memory_format), t.to(device), context.to(device), target.to(device))

    def call_ours(unet, x, t, c):
        return unet(x, t, context=c)

    def call_theirs(unet, x, t, c):
        return unet(x, t, encoder_hidden_states=c).sample

    def build(label: str, compiled: bool) -> Step:
        """A fresh pair of same weights for each row (so a compiled module never carries over)."""
        ours = randomize_(UNetModel(**unet_cfg), std=0.02)
        if label == OURS:
            unet, call, ema = ours, call_ours, "ours"
        else:
            unet = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(unet_cfg))
            unet.load_state_dict(unet_to_diffusers(ours.state_dict(), unet_cfg), strict=True)
            del ours
            call, ema = call_theirs, "diffusers"
        unet = unet.to(device, memory_format=memory_format).train()
        if compiled:
            unet.compile()
        return Step(unet, call, device, dtype, ema if args.ema else None)

    order = args.order or ("ab" if on_gpu else "abba")
    sequence = (OURS, THEIRS, THEIRS, OURS) if order == "abba" else (OURS, THEIRS)
    peak_rate = matmul_rate(device, dtype)
    flops = {}
    for label in (OURS, THEIRS):  # the model's FLOPs, eager, no checkpointing
        step = build(label, compiled=False)
        flops[label] = model_flops(step, inputs)
        del step
    # The header first and each row as soon as it is measured: a run cut short (a device call's time limit)
    # still shows what it finished.
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    print(f"\n{args.model} UNet training step, {args.size}px (latent {side}x{side}), batch {args.batch}, {args.dtype}, "
          f"AdamW{' + EMA' if args.ema else ''}{', channels-last' if channels_last else ''}, order {order.upper()}, "
          f"{name}")
    print(f"model FLOPs a step: {flops[OURS] / 1e9:.1f} GFLOP ({flops[OURS] / args.batch / 1e9:.2f} an image; "
          f"diffusers counted {flops[THEIRS] / 1e9:.1f}); dense matmul here: {peak_rate:.2f} TFLOP/s")
    print(f"{'implementation':<16}{'compiled':>9}{'grad ckpt':>10}{'s/step':>10}{'images/s':>10}{'TFLOP/s':>9}"
          f"{'MFU':>7}{'peak GiB':>10}", flush=True)
    ratios = []
    for compiled in compiles:
        for checkpointing in checkpointings:
            best: dict[str, tuple[float, float]] = {}
            for i, label in enumerate(sequence):
                step = build(label, compiled)
                if label == OURS:
                    step.unet.set_gradient_checkpointing(checkpointing)
                elif checkpointing:
                    step.unet.enable_gradient_checkpointing()
                result = step_time(step, inputs, args.steps, warmup=3 if compiled else 2)
                best[label] = min(best.get(label, result), result)
                del step
                if on_gpu:
                    torch.cuda.empty_cache()
                if label not in sequence[i + 1:]:  # its last timing: the row is final
                    seconds, peak = best[label]
                    tflops = flops[label] / seconds / 1e12
                    print(f"{label:<16}{str(compiled):>9}{str(checkpointing):>10}{seconds:>10.3f}"
                          f"{args.batch / seconds:>10.2f}{tflops:>9.3g}{tflops / peak_rate:>7.1%}{peak:>10.2f}",
                          flush=True)
            ratios.append(f"ours / diffusers speed, compiled={compiled}, grad ckpt={checkpointing}: "
                          f"{best[THEIRS][0] / best[OURS][0]:.2f}x")
    print("\n".join(ratios))

if __name__ == "__main__":
    main()

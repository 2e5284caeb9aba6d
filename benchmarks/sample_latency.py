"""Text-to-image latency: this project vs diffusers' StableDiffusionPipeline on the same random weights.

    python benchmarks/sample_latency.py                                   # GPU: SD1.5, 512 px, 50 steps, fp16
    python benchmarks/sample_latency.py --model tiny --size 32 --steps 10 --device cpu --dtype fp32   # CPU check
    python benchmarks/sample_latency.py --compile                         # GPU: eager and torch.compile rows

Both sides load the same diffusers folder (random SD1.5-architecture weights written once to a temporary
folder), use DDIM with SD1.5's scheduler config, guidance 7.5 with an empty negative prompt, batch 1 and the
same seed. Prints seconds per image and UNet iterations per second (2 UNet evaluations per step under CFG
count as one iteration, as diffusers' progress bar counts them), plus the largest pixel difference
between the two images as a sanity check. `--compile` adds a row for each side and each of `--compile-mode`'s
modes (default: `default` and `reduce-overhead`, which also captures CUDA graphs on a GPU) with its UNet under
torch.compile, ours through `ldm.sampling.compile_unet` (what `sample.py compile=true` runs); the compile
happens in the untimed warm-up run, so the rows are steady-state latency. Each row prints as soon as it is
measured.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import model_config, randomize_  # noqa: E402

from ldm.checkpoint import checkpoint_from_model, load_model, save_checkpoint  # noqa: E402
from ldm.models.stable_diffusion import StableDiffusion  # noqa: E402
from ldm.sampling import COMPILE_MODES, SamplerSettings, compile_unet, generate, to_uint8  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPT = "a photograph of an astronaut riding a horse"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_runs(fn, repeats: int, device: torch.device) -> tuple[float, np.ndarray]:
    fn()  # warm-up: kernels, allocator, lazy init
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        image = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15", help="a model config name from ldm/conf/model")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--compile", action="store_true", help="also time both UNets under torch.compile")
    parser.add_argument("--compile-mode", nargs="+", default=["default", "reduce-overhead"], choices=COMPILE_MODES,
                        help="torch.compile modes for the --compile rows, both sides in each")
    args = parser.parse_args()
    import diffusers

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pipe"
        model = randomize_(StableDiffusion.from_config(model_config(args.model)), std=0.02)
        save_checkpoint(checkpoint_from_model(model), folder)
        del model
        gc.collect()

        ours = load_model(folder).to(device=device, dtype=dtype)
        settings = SamplerSettings(sampler="ddim", steps=args.steps, guidance_scale=7.5)

        def run_ours() -> np.ndarray:
            gen = torch.Generator("cpu").manual_seed(0)
            images = generate(ours, [PROMPT], "", settings, height=args.size, width=args.size, generator=gen)
            return to_uint8(images)[0]

        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"\n{args.model}, {args.size}x{args.size}, {args.steps} DDIM steps, CFG 7.5, batch 1, {args.dtype}, {name}")
        print(f"{'implementation':<40}{'s/image':>10}{'it/s':>10}", flush=True)
        rows = {}

        def row(label: str, fn) -> np.ndarray:  # noqa: ANN001
            rows[label], image = time_runs(fn, args.repeats, device)
            print(f"{label:<40}{rows[label]:>10.3f}{args.steps / rows[label]:>10.2f}", flush=True)
            return image

        ours_image = row("ldm (ours)", run_ours)

        pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, dtype=dtype)
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        eager_unet = pipe.unet

        def run_diffusers() -> np.ndarray:
            gen = torch.Generator("cpu").manual_seed(0)
            out = pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=7.5, generator=gen,
                       height=args.size, width=args.size, output_type="np")
            return (out.images[0] * 255).round().astype("uint8")

        theirs_image = row("diffusers", run_diffusers)
        print(f"max pixel difference (eager): {np.abs(ours_image.astype(int) - theirs_image.astype(int)).max()}/255")
        print(f"speed-up eager: {rows['diffusers'] / rows['ldm (ours)']:.2f}x", flush=True)
        if args.compile:
            for mode in args.compile_mode:
                compile_unet(ours, mode)  # in place: the weights' names stay as they are
                row(f"ldm compiled ({mode})", run_ours)
                pipe.unet = torch.compile(eager_unet, mode=mode)
                row(f"diffusers compiled ({mode})", run_diffusers)
                torch._dynamo.reset()  # the next mode compiles afresh (and frees this one's graphs)
            best_ours = min(rows[f"ldm compiled ({m})"] for m in args.compile_mode)
            best_theirs = min(rows[f"diffusers compiled ({m})"] for m in args.compile_mode)
            print(f"ours compiled vs diffusers compiled, best mode each: {best_theirs / best_ours:.2f}x (target 1.5x)")


if __name__ == "__main__":
    main()

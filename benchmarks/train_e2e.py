"""End-to-end training throughput: `train.py` from cached latents and from raw shards, beside the bare step.

    python benchmarks/train_e2e.py      # GPU: SD1.5 at 512 px, batch 32, bf16-mixed, compiled, channels-last
    python benchmarks/train_e2e.py --model tiny --size 32 --batch 4 --images 64 --steps 30 --device cpu   # CPU check

What a user runs, in a scratch folder: a random checkpoint of `--model` written as an SD single file, JPEG
shards of photograph-like pictures (4:3, `--source` px wide, with captions), `ldm-cache-latents --text` on
them (latents and text contexts, so neither the autoencoder nor the text encoder runs in training), then
`train.py init_from=...` twice with the recipe's speed settings (EMA on, fused AdamW on a GPU), once on
`data=cached_latents` and once on `data=webdataset` over the raw shards (decode, crop, autoencoder and text
encoder in the loop; `--workers` DataLoader workers for both). Each run's images/s is the median of its train.log
intervals after the first `--skip` (start-up, compilation). The bare step is train_throughput.py's: our UNet
with EMA, AdamW and the same batch, compile and channels-last settings, no data loader and no Lightning.
Prints one table, each row as soon as it is measured; exit status 1 when a run fails.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from data_throughput import write_shards  # noqa: E402
from helpers import model_config, randomize_  # noqa: E402
from train_throughput import Step, step_time  # noqa: E402

from ldm.models.stable_diffusion import downsampling_factor  # noqa: E402
from ldm.models.unet import UNetModel  # noqa: E402

RATE = re.compile(r"step (\d+)\S*.*?\s([0-9.]+) img/s")


def write_checkpoint(model: str, path: Path) -> Path:
    """A random SD checkpoint of the `model` config (all three parts), as an LDM single file."""
    from ldm.checkpoint import checkpoint_from_model, save_checkpoint
    from ldm.models.stable_diffusion import StableDiffusion

    sd = randomize_(StableDiffusion.from_config(model_config(model)), std=0.02)
    save_checkpoint(checkpoint_from_model(sd), path)
    return path


def run(argv: list[str], cwd: Path, timeout: float) -> tuple[int, float, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, time.perf_counter() - start, proc.stdout + proc.stderr


def train_log_rate(log: Path, skip: int) -> tuple[float, int]:
    """The median images/s of a train.log's intervals after the first `skip`, and how many it took."""
    rates = [float(m[2]) for m in RATE.finditer(log.read_text())]
    kept = rates[skip:]
    if not kept:
        raise ValueError(f"{log}: {len(rates)} img/s lines, none after the first {skip} (more --steps)")
    return statistics.median(kept), len(kept)


def bare_rate(model: str, size: int, batch: int, device: torch.device, dtype: torch.dtype, compiled: bool,
              channels_last: bool, steps: int) -> float:
    cfg = model_config(model)
    unet_cfg = {**cfg["unet"], "use_checkpoint": False}
    side = size // downsampling_factor(cfg["first_stage"])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, unet_cfg["in_channels"], side, side, generator=gen).to(device, memory_format=fmt)
    inputs = (x, torch.randint(0, 1000, (batch,), generator=gen).to(device),
              torch.randn(batch, 77, unet_cfg["context_dim"], generator=gen).to(device), torch.randn_like(x))
    unet = randomize_(UNetModel(**unet_cfg), std=0.02).to(device, memory_format=fmt).train()
    if compiled:
        unet.compile()
    step = Step(unet, lambda m, x, t, c: m(x, t, context=c), device, dtype, "ours")
    seconds, _ = step_time(step, inputs, steps, warmup=3 if compiled else 2)
    return batch / seconds


def show(row: tuple[str, str, float | None, str], bare: float) -> None:
    """One row of the table, printed (and flushed) as soon as it is measured: a run cut short by a time limit
    still shows the rows before it."""
    label, wall, rate, note = row
    if rate is None:
        shown = f"{'failed':>10}{'':>9}"
    else:  # the cache tool's rate is its own (encoding), not a training rate
        shown = f"{rate:>10.2f}" + (f"{'-':>9}" if label.startswith("ldm-cache") else f"{rate / bare:>9.0%}")
    print(f"{label:<34}{wall:>8}{shown}  {note}", flush=True)


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--size", type=int, default=512, help="training resolution in pixels")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=512, help="pictures in the shards (cycled over the steps)")
    parser.add_argument("--source", type=int, default=None, help="the pictures' width (default: 1.25 x --size)")
    parser.add_argument("--steps", type=int, default=60, help="training steps a run")
    parser.add_argument("--log-every", type=int, default=10, help="train.log interval (steps)")
    parser.add_argument("--skip", type=int, default=2, help="intervals left out at the start (compilation)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="raw shards' DataLoader workers")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on a GPU")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a train.py run may take")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    compiled = on_gpu if args.compile is None else args.compile
    work = args.work or Path(tempfile.mkdtemp(prefix="ldm-train-e2e-"))
    (work / "raw").mkdir(parents=True, exist_ok=True)
    source = args.source or args.size * 5 // 4
    write_shards(work / "raw", args.images, source, per_shard=64)
    ckpt = write_checkpoint(args.model, work / "model.safetensors")

    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    print(f"\n{args.model} training end to end, {args.size}px, batch {args.batch}, {'bf16-mixed' if on_gpu else 'fp32'}, "
          f"compile {compiled}, EMA, {args.steps} steps, {args.images} pictures of {source}x{source * 3 // 4}, {name}")
    print(f"{'run':<34}{'wall':>8}{'images/s':>10}{'of bare':>9}  note", flush=True)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    bare = bare_rate(args.model, args.size, args.batch, device, dtype, compiled, on_gpu, min(args.steps, 20))
    show(("bare step (UNet + EMA + AdamW)", "-", bare, ""), bare)

    cache = ["-m", "ldm.data.cache_latents", str(ckpt), str(work / "raw"), str(work / "latents"),
             "--resolution", str(args.size), "--text", "--overwrite", "--device", args.device, "--batch-size", str(min(args.batch, 16))]
    code, seconds, out = run(cache, work, args.timeout)
    show(("ldm-cache-latents --text", f"{seconds:.0f} s", args.images / seconds if code == 0 else None,
          "" if code == 0 else out.strip().splitlines()[-1][:90]), bare)

    trainer = ["trainer=gpu"] if on_gpu else ["trainer=cpu"]
    common = [
        str(ROOT / "train.py"), f"init_from={ckpt}", *trainer, f"paths.root={work}/runs", f"trainer.max_steps={args.steps}",
        f"trainer.log_every_n_steps={args.log_every}", "trainer.enable_progress_bar=false", "logger=csv",
        f"data.batch_size={args.batch}", f"data.resolution={args.size}", "callbacks.sample_images=null",
        f"module.compile={str(compiled).lower()}", f"module.channels_last={str(on_gpu).lower()}",
        "callbacks.checkpoint.every_n_train_steps=1000000", f"data.num_workers={args.workers}",
    ]
    runs = {
        "train.py, cached latents + text": ["data=cached_latents", f"data.train_shards={work}/latents", "run_name=cached"],
        "train.py, raw shards": ["data=webdataset", f"data.train_shards={work}/raw", "run_name=raw"],
    }
    status = 0
    for label, extra in runs.items():
        if code != 0 and "cached" in label:
            show((label, "-", None, "no cache"), bare)
            status = 1
            continue
        rc, seconds, out = run([*common, *extra], work, args.timeout)
        run_name = extra[-1].split("=", 1)[1]
        logs = sorted((work / "runs" / run_name).glob("*/train.log"))
        try:
            if rc != 0 or not logs:
                raise ValueError(out.strip().splitlines()[-1][:90] if out.strip() else f"exit {rc}")
            rate, intervals = train_log_rate(logs[-1], args.skip)
            show((label, f"{seconds:.0f} s", rate, f"median of {intervals} intervals"), bare)
        except ValueError as err:
            show((label, f"{seconds:.0f} s", None, str(err)), bare)
            status = 1

    return status


if __name__ == "__main__":
    sys.exit(main())

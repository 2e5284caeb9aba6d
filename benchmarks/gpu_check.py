"""The training paths the CPU test suite cannot reach, run as a user runs them, with a table at the end.

On a GPU: bf16-mixed, fused AdamW and CUDA noise generators (trainer=gpu), exact-step resume with
ckpt_path=last, FSDP2 on CUDA (trainer=fsdp over every visible GPU), sample.py in fp16 on the result,
and an edit model (conditioning=image_concat) trained and sampled, with image-to-image beside it.
Each row is a real `train.py` / `sample.py` run on the tiny demo model and a few synthetic shards.

    python benchmarks/gpu_check.py          # on a GPU machine (a couple of minutes)
    python benchmarks/gpu_check.py --cpu    # the same runs with CPU settings: checks this script itself

Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ldm.checkpoint import read_tensor_file  # noqa: E402 (after the path the line above sets)

TINY = [
    "data.num_samples=64",
    "data.samples_per_shard=16",
    "data.batch_size=4",
    "data.resolution=32",
    "callbacks.sample_images.steps=4",
    "callbacks.sample_images.every_n_steps=10",
    "trainer.log_every_n_steps=5",
    "trainer.enable_progress_bar=false",
]


def run(args: list[str], cwd: Path) -> tuple[int, float, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    return proc.returncode, time.perf_counter() - start, proc.stdout + proc.stderr


def last_checkpoint(root: Path) -> tuple[Path, dict[str, Any]]:
    path = max(root.glob("*/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return path, read_tensor_file(path)[0]  # weights_only, as sample.py reads it


def fused(ckpt: dict[str, Any]) -> bool:
    return bool(ckpt["optimizer_states"][0]["param_groups"][0].get("fused"))


def finite(ckpt: dict[str, Any]) -> bool:
    return all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="CPU settings (to check the script without a GPU)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu to check the script itself", file=sys.stderr)
        return 2
    gpus = 0 if args.cpu else torch.cuda.device_count()
    work = Path(tempfile.mkdtemp(prefix="ldm-gpu-check-"))
    common = [f"paths.root={work}/runs", f"data.root={work}/data", *TINY]
    single = ["trainer=cpu"] if args.cpu else ["trainer=gpu"]
    sharded = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2"] if args.cpu \
        else ["trainer=fsdp", f"trainer.devices={gpus}"]
    rows: list[tuple[str, bool, float, str]] = []

    def check(name: str, argv: list[str], verify) -> None:
        code, seconds, log = run(argv, work)
        if code != 0:
            rows.append((name, False, seconds, log.strip().splitlines()[-1][:100] if log.strip() else f"exit {code}"))
            return
        try:
            ok, detail = verify()
        except Exception as err:  # a missing checkpoint or key is a failed check, not a crash of the table
            ok, detail = False, f"{type(err).__name__}: {err}"[:100]
        rows.append((name, ok, seconds, detail))

    n = args.steps

    def verify_single() -> tuple[bool, str]:
        _, ckpt = last_checkpoint(work / "runs")
        states = ckpt["noise_generators"]
        cuda_state = states[0].numel() < 100  # a CUDA generator's state is 16 bytes, a CPU one's 5056
        ok = ckpt["global_step"] == n and finite(ckpt) and (args.cpu or (fused(ckpt) and cuda_state))
        return ok, f"step {ckpt['global_step']}, fused AdamW {fused(ckpt)}, CUDA generator {cuda_state}"

    check(f"{single[0]} {n} steps", ["train.py", *single, f"trainer.max_steps={n}", *common], verify_single)

    def verify_resume() -> tuple[bool, str]:
        _, ckpt = last_checkpoint(work / "runs")
        return ckpt["global_step"] == n + 10 and finite(ckpt), f"step {ckpt['global_step']}"

    check("resume ckpt_path=last +10", ["train.py", *single, f"trainer.max_steps={n + 10}", "ckpt_path=last", *common],
          verify_resume)

    def verify_sample() -> tuple[bool, str]:
        pngs = sorted((work / "samples").glob("*.png"))
        return len(pngs) >= 2, f"{len(pngs)} PNGs"

    path = max(work.glob("runs/*/*/checkpoints/last.ckpt"), default=work / "missing.ckpt", key=lambda p: p.stat().st_mtime)
    device = ["device=cpu", "dtype=fp32"] if args.cpu else ["device=cuda", "dtype=fp16"]
    check("sample.py on it", ["sample.py", f"ckpt={path}", "prompt=a red circle on a blue background", "steps=10",
                              "num_images=2", "height=32", "width=32", f"out_dir={work}/samples", *device],
          verify_sample)

    def verify_fsdp() -> tuple[bool, str]:
        _, ckpt = last_checkpoint(work / "fsdp")
        plain = all(type(v) is torch.Tensor for v in ckpt["state_dict"].values())
        ema = ckpt["state_dict"]["model_ema.num_updates"].item()
        ok = ckpt["global_step"] == 10 and plain and finite(ckpt) and ema == 10 and (args.cpu or fused(ckpt))
        return ok, f"step {ckpt['global_step']}, EMA updates {ema}, plain tensors {plain}, fused {fused(ckpt)}"

    fsdp_common = [c.replace(f"{work}/runs", f"{work}/fsdp") for c in common]
    check(f"{' '.join(sharded[:1] + sharded[-1:])} 10 steps", ["train.py", *sharded, "trainer.max_steps=10",
                                                              *fsdp_common], verify_fsdp)

    def verify_edit() -> tuple[bool, str]:
        _, ckpt = last_checkpoint(work / "edit")
        channels = ckpt["state_dict"]["model.diffusion_model.input_blocks.0.0.weight"].shape[1]
        ok = ckpt["global_step"] == 10 and finite(ckpt) and channels == 8
        return ok, f"step {ckpt['global_step']}, UNet input channels {channels}"

    edit_common = [c.replace(f"{work}/runs", f"{work}/edit") for c in common]
    check("conditioning=image_concat 10 steps", ["train.py", *single, "conditioning=image_concat",
                                                 "trainer.max_steps=10", *edit_common], verify_edit)

    def verify_pictures(folder: str) -> tuple[bool, str]:
        pngs = sorted((work / folder).glob("0*.png"))
        return len(pngs) == 2, f"{len(pngs)} PNGs"

    picture = work / "picture.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(picture)
    edit_ckpt = max(work.glob("edit/*/*/checkpoints/last.ckpt"), default=work / "missing.ckpt")
    check("sample.py edit (image=)", ["sample.py", f"ckpt={edit_ckpt}", "prompt=make the circle blue", f"image={picture}",
                                      "steps=10", "num_images=2", f"out_dir={work}/edited", *device],
          lambda: verify_pictures("edited"))
    check("sample.py image-to-image", ["sample.py", f"ckpt={path}", "prompt=a red circle", f"image={picture}",
                                       "strength=0.6", "steps=10", "num_images=2", f"out_dir={work}/img2img", *device],
          lambda: verify_pictures("img2img"))

    name = "CPU" if args.cpu else torch.cuda.get_device_name()
    print(f"\n{name}, torch {torch.__version__}, work dir {work}\n")
    print(f"| {'check':40} | ok | seconds | detail")
    print(f"|{'-' * 42}|----|---------|-------")
    for check_name, ok, seconds, detail in rows:
        print(f"| {check_name:40} | {'ok' if ok else 'NO':2} | {seconds:7.1f} | {detail}")
    return 0 if all(ok for _, ok, _, _ in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

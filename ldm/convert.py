"""Convert Stable Diffusion weights between an LDM single file and a diffusers folder.

    python -m ldm.convert SRC DST [--ema] [--dtype fp16] [--prediction-type v_prediction]
    ldm-convert model.safetensors out/diffusers-folder
    ldm-convert out/diffusers-folder model.ckpt

DST's form picks the output: a `.safetensors` or `.ckpt` file is an LDM single file, anything else a
diffusers folder. The architecture is read from SRC; tensors pass through unchanged (bit-identical)
unless `--dtype` casts them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ldm.checkpoint import CheckpointError, read_checkpoint, save_checkpoint

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ldm-convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="LDM .safetensors/.ckpt file, a checkpoint of this project, or a diffusers folder")
    parser.add_argument("dst", help=".safetensors/.ckpt file (LDM layout) or a folder (diffusers layout)")
    parser.add_argument("--ema", action="store_true", help="write the EMA weights of the UNet (model_ema.*)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating tensors")
    parser.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction"],
        default=None,
        help="what the UNet predicts, for files that do not record it (LDM single files; SD 2.x files are "
        "otherwise read off the UNet, as AUTOMATIC1111 does)",
    )
    parser.add_argument(
        "--force-prediction-type",
        action="store_true",
        help="use --prediction-type even where SRC records another (a wrong scheduler config)",
    )
    parser.add_argument("--allow-unsafe-pickle", action="store_true", help="unpickle a .ckpt you trust fully")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST file")
    return parser.parse_args(argv)


def convert(args: argparse.Namespace) -> str:
    for name in ("src", "dst"):  # `ldm-convert src=a.safetensors dst=b`, as train.py and sample.py take settings
        if getattr(args, name).startswith(f"{name}=") and not Path(getattr(args, name)).exists():
            src, dst = (args.src.removeprefix("src="), args.dst.removeprefix("dst="))
            raise CheckpointError(f"SRC and DST are plain paths, without {name}=: ldm-convert {src} {dst}")
    dst = Path(args.dst).expanduser()  # a quoted `~/...` the shell left alone, as SRC is read
    if dst.exists() and not (args.overwrite and dst.is_file()):
        raise CheckpointError(f"{dst} exists; choose another destination (or --overwrite for a file)")
    ckpt = read_checkpoint(
        args.src, args.prediction_type, args.allow_unsafe_pickle, force_prediction_type=args.force_prediction_type
    )
    if args.ema:
        ckpt = ckpt.with_ema_weights()
    save_checkpoint(ckpt, dst, DTYPES.get(args.dtype) if args.dtype else None)
    unet = ckpt.config["unet"]
    summary = (
        f"wrote {dst}: text encoder {ckpt.config['cond_stage']['kind']}, context_dim {unet.get('context_dim')}, "
        f"in_channels {unet['in_channels']} ({ckpt.config['concat'] or 'text-to-image'}), "
        f"prediction_type {ckpt.config['prediction_type']}"
    )
    summary += "; EMA weights kept (model_ema / unet_ema)" if ckpt.has_ema() else ""
    return summary + (f"\n{ckpt.prediction_type_note}" if ckpt.prediction_type_note else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        print(convert(args))
    except CheckpointError as err:
        print(f"ldm-convert: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

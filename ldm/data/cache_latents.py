"""Encode image shards once into latent shards, so training skips the autoencoder's forward pass.

    ldm-cache-latents v1-5-pruned.safetensors 'shards/shards-{000000..000099}.tar' latents/ --resolution 512
    python train.py experiment=sd15_finetune init_from=v1-5-pruned.safetensors \\
        data=cached_latents data.train_shards='latents/*.tar' data.resolution=512

CKPT holds the autoencoder you train with: an SD single file or diffusers folder (a fine-tune's
`init_from`), or a stage-one checkpoint of this project (`module.first_stage_ckpt`). Each source shard
becomes one latent shard of the same name holding the same samples in the same order: `moments.npy`
(the posterior's mean and log-variance, C×2 channels at 1/8 resolution) and the caption. Training draws
z ~ N(mean, var) from them with its own noise generator, as it does after encoding an image, so a run
on cached latents takes the steps a run on the images would take, minus the encoder. Crops and flips are
fixed when caching (centre crop, no flip). `OUT/cache.json` records the autoencoder's fingerprint, and
train.py refuses latents made by another autoencoder.

Aspect-ratio buckets: `--buckets` (with `--bucket-step 64 --bucket-max-ratio 2.0`, as data.bucket_*) encodes
each picture at its bucket (the one of nearest aspect ratio among those of about resolution² pixels; see
ldm.data.buckets), cover-resized and centre-cropped to it, in batches of one bucket; a shard's samples are then
written grouped by bucket (not in the source's order). Train on them with data.buckets=true (batches group by
the latents' shape); cache.json records the buckets, and train.py refuses such latents without it.

    ldm-cache-latents v1-5-pruned.safetensors 'shards/{000000..000099}.tar' latents/ --resolution 512 --buckets
    python train.py experiment=sd15_finetune init_from=v1-5-pruned.safetensors data=cached_latents \\
        data.train_shards=latents/ data.buckets=true

Conditioned models: `--cond-image-key src.jpg` (editing) adds `cond_moments.npy`, the before picture's
moments; `--seg-key seg.png` (semantic maps) keeps the class map, cropped as its image was, as a
single-channel PNG under the same key (`--num-classes K` skips maps with labels >= K). Train with the
same data.cond_image_key or data.seg_key. Samples without them are skipped and counted.

    ldm-cache-latents v1-5-pruned.safetensors 'pairs/{000000..000099}.tar' latents/ --resolution 256 \\
        --cond-image-key src.jpg
    python train.py conditioning=image_concat init_from=v1-5-pruned.safetensors data=cached_latents \\
        data.train_shards=latents/ data.resolution=256 data.cond_image_key=src.jpg
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from ldm.checkpoint import VAE_PREFIX, CheckpointError, read_checkpoint, read_tensor_file
from ldm.data.webdataset import (
    COND_MOMENTS_KEY,
    MOMENTS_KEY,
    _check_buckets,
    _check_conditioning,
    _ShardStream,
    _StreamSpec,
    expand_shard_specs,
)
from ldm.models.autoencoder import AutoencoderKL

CACHE_INFO = "cache.json"
DTYPES = {"fp32": np.float32, "fp16": np.float16}


def load_autoencoder(path: str | Path) -> AutoencoderKL:
    """The autoencoder of any checkpoint the loader takes, or of a stage-one checkpoint of this project."""
    path = Path(path)
    if path.is_file():
        obj, _ = read_tensor_file(path)
        config = obj.get("ldm_config") if isinstance(obj, dict) else None
        if isinstance(config, dict) and "first_stage" in config and "unet" not in config:
            state = obj.get("state_dict", obj)
            weights = {k[len(VAE_PREFIX) :]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
            vae = AutoencoderKL(**config["first_stage"])
            vae.load_state_dict(weights, strict=True)
            return vae.eval()
    ckpt = read_checkpoint(path)
    weights = {k[len(VAE_PREFIX) :]: v for k, v in ckpt.state_dict.items() if k.startswith(VAE_PREFIX)}
    if not weights:
        raise CheckpointError(f"{path} holds no autoencoder ('{VAE_PREFIX}*' weights)")
    vae = AutoencoderKL(**ckpt.config["first_stage"])
    vae.load_state_dict(weights, strict=True)
    return vae.eval()


def fingerprint(vae: torch.nn.Module) -> str:
    """A hash of the autoencoder's weights (as float32), to tell which one made a set of latents."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_cache_info(urls: Sequence[str]) -> dict[str, Any] | None:
    """`cache.json` beside local latent shards (None for remote shards or shards without one)."""
    folders = {os.path.dirname(u.removeprefix("file:")) for u in urls if "://" not in u and not u.startswith("pipe:")}
    for folder in sorted(folders):
        path = Path(folder or ".") / CACHE_INFO
        if path.is_file():
            return json.loads(path.read_text())
    return None


def _npy(array: np.ndarray) -> bytes:
    buffer = BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _caption_member(caption_key: str, caption: str) -> dict[str, bytes]:
    """The caption stored where `caption_key` reads it back: a text member, or a field of a JSON member."""
    extension, _, json_path = caption_key.partition(".")
    if not json_path:
        return {extension: caption.encode()}
    value: Any = caption
    for part in reversed(json_path.split(".")):
        value = {part: value}
    return {extension: json.dumps(value).encode()}


def _label_png(labels: torch.Tensor) -> bytes | None:
    """Class indices HxW as a PNG the loader reads back as they are: 8-bit when they fit, else 16-bit;
    None for labels no PNG holds."""
    array = labels.numpy()
    if array.max() > np.iinfo(np.uint16).max:
        return None
    image = Image.fromarray(array.astype(np.uint8) if array.max() < 256 else array.astype(np.uint16))
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@torch.no_grad()
def cache_latents(
    ckpt: str | Path,
    src: str | Sequence[str],
    out_dir: str | Path,
    resolution: int = 512,
    batch_size: int = 16,
    device: str = "cpu",
    dtype: str = "fp32",
    caption_key: str = "txt",
    overwrite: bool = False,
    cond_image_key: str | None = None,
    seg_key: str | None = None,
    num_classes: int | None = None,
    buckets: bool = False,
    bucket_step: int = 64,
    bucket_max_ratio: float = 2.0,
) -> dict[str, Any]:
    """Write one latent shard per source shard into `out_dir`; returns what `cache.json` records.

    `cond_image_key` adds the conditioning picture's moments, `seg_key` the cropped class map (see the
    module docstring); `num_classes` skips maps with larger labels.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if num_classes is not None and seg_key is None:
        raise ValueError("--num-classes filters class maps: it needs --seg-key")
    _check_conditioning(cond_image_key, seg_key, num_classes)
    flag = lambda setting: "--" + setting.replace("_", "-")  # noqa: E731 - errors in this tool's flags
    bucket_list = tuple(_check_buckets(resolution, bucket_step, bucket_max_ratio, None, flag)) if buckets else None
    # webdataset lower-cases extensions, as WebDataModule does with these keys
    cond_image_key = cond_image_key.lower() if cond_image_key else None
    seg_key = seg_key.lower() if seg_key else None
    urls = expand_shard_specs(src)
    out_dir = Path(out_dir)
    names = [_shard_name(url, i) for i, url in enumerate(urls)]
    existing = [n for n in names if (out_dir / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {len(existing)} of these shards; pass --overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    vae = load_autoencoder(ckpt).to(device)
    skipped: Counter[str] = Counter()
    written = 0
    for url, name in zip(urls, names, strict=True):
        spec = _StreamSpec(
            urls=[url], batch_size=batch_size, resolution=resolution, random_crop=False, random_flip=False,
            caption_key=caption_key, min_size=0, shuffle_buffer=0, resampled=False, rank=0, world_size=1,
            cond_image_key=cond_image_key, seg_key=seg_key, num_classes=num_classes, buckets=bucket_list,
        )
        written += _cache_shard(vae, spec, out_dir / name, DTYPES[dtype], skipped)
    info = {
        "first_stage_fingerprint": fingerprint(vae),
        "latent_channels": vae.embed_dim,
        "resolution": resolution,
        "dtype": dtype,
        "cond_image_key": cond_image_key,
        "seg_key": seg_key,
        "buckets": {"step": bucket_step, "max_ratio": bucket_max_ratio} if buckets else None,
        "samples": written,
        "skipped": dict(skipped),
        "source": [str(u) for u in urls],
        "checkpoint": str(ckpt),
    }
    (out_dir / CACHE_INFO).write_text(json.dumps(info, indent=2))
    return info


def _shard_name(url: str, index: int) -> str:
    name = os.path.basename(url.rstrip("/"))
    return name if name.endswith(".tar") else f"shard-{index:06d}.tar"


def _encoded(vae: AutoencoderKL, images: torch.Tensor, dtype: type) -> list[bytes]:
    """Each image's posterior mean and log-variance, as .npy bytes."""
    param = next(vae.parameters())
    posterior = vae.encode(images.to(device=param.device, dtype=param.dtype))
    moments = torch.cat([posterior.mean, posterior.logvar], dim=1).float().cpu().numpy()
    return [_npy(m.astype(dtype)) for m in moments]


def _cache_shard(
    vae: AutoencoderKL, spec: _StreamSpec, path: Path, dtype: type, skipped: Counter[str]
) -> int:
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    try:
        with wds.TarWriter(str(tmp), encoder=False) as sink:
            for batch in _ShardStream(spec, seed=0):
                skipped.update(batch["skipped"])
                if "image" not in batch:
                    continue
                columns = {MOMENTS_KEY: _encoded(vae, batch["image"], dtype)}
                if spec.cond_image_key:
                    columns[COND_MOMENTS_KEY] = _encoded(vae, batch["cond_image"], dtype)
                if spec.seg_key:
                    columns[spec.seg_key] = [_label_png(labels) for labels in batch["seg"]]
                for i, (key, caption) in enumerate(zip(batch["key"], batch["caption"], strict=True)):
                    members = {name: values[i] for name, values in columns.items()}
                    if spec.seg_key and members[spec.seg_key] is None:
                        skipped["label above 65535"] += 1
                        continue
                    sink.write({"__key__": key, **members, **_caption_member(spec.caption_key, caption)})
                    count += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldm-cache-latents", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="checkpoint holding the autoencoder (SD file, diffusers folder, stage one)")
    parser.add_argument("src", help="image shards: brace pattern, glob, folder or list as for data.train_shards")
    parser.add_argument("out", help="folder for the latent shards and cache.json")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="storage of the moments")
    parser.add_argument("--caption-key", default="txt")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--cond-image-key", help="edit pairs: the before picture's key (e.g. src.jpg)")
    parser.add_argument("--seg-key", help="semantic maps: the class-index map's key (e.g. seg.png)")
    parser.add_argument("--num-classes", type=int, help="with --seg-key: skip maps with labels >= this")
    parser.add_argument("--buckets", action="store_true",
                        help="encode each picture at its aspect-ratio bucket (train with data.buckets=true)")
    parser.add_argument("--bucket-step", type=int, default=64, help="with --buckets: bucket sides are multiples of this")
    parser.add_argument("--bucket-max-ratio", type=float, default=2.0, help="with --buckets: the longest side over the shortest")
    args = parser.parse_args(argv)
    try:
        info = cache_latents(
            args.ckpt, args.src, args.out, args.resolution, args.batch_size, args.device, args.dtype,
            args.caption_key, args.overwrite, args.cond_image_key, args.seg_key, args.num_classes,
            args.buckets, args.bucket_step, args.bucket_max_ratio,
        )
    except (OSError, ValueError, CheckpointError) as exc:
        parser.error(str(exc))
    skipped = ", ".join(f"{n} {reason}" for reason, n in info["skipped"].items()) or "none"
    print(f"cached {info['samples']} samples from {len(info['source'])} shard(s) into {args.out} (skipped: {skipped})")
    return 0 if info["samples"] else 1


if __name__ == "__main__":
    sys.exit(main())

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

from ldm.checkpoint import VAE_PREFIX, CheckpointError, read_checkpoint, read_tensor_file
from ldm.data.webdataset import MOMENTS_KEY, _ShardStream, _StreamSpec, expand_shard_specs
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
) -> dict[str, Any]:
    """Write one latent shard per source shard into `out_dir`; returns what `cache.json` records."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
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
        written += _cache_shard(vae, url, out_dir / name, resolution, batch_size, caption_key, DTYPES[dtype], skipped)
    info = {
        "first_stage_fingerprint": fingerprint(vae),
        "latent_channels": vae.embed_dim,
        "resolution": resolution,
        "dtype": dtype,
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


def _cache_shard(
    vae: AutoencoderKL,
    url: str,
    path: Path,
    resolution: int,
    batch_size: int,
    caption_key: str,
    dtype: type,
    skipped: Counter[str],
) -> int:
    spec = _StreamSpec(
        urls=[url], batch_size=batch_size, resolution=resolution, random_crop=False, random_flip=False,
        caption_key=caption_key, min_size=0, shuffle_buffer=0, resampled=False, rank=0, world_size=1,
    )
    param = next(vae.parameters())
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    try:
        with wds.TarWriter(str(tmp), encoder=False) as sink:
            for batch in _ShardStream(spec, seed=0):
                skipped.update(batch["skipped"])
                if "image" not in batch:
                    continue
                posterior = vae.encode(batch["image"].to(device=param.device, dtype=param.dtype))
                moments = torch.cat([posterior.mean, posterior.logvar], dim=1).float().cpu().numpy()
                for key, caption, m in zip(batch["key"], batch["caption"], moments, strict=True):
                    sink.write({"__key__": key, MOMENTS_KEY: _npy(m.astype(dtype)), caption_key: caption.encode()})
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
    args = parser.parse_args(argv)
    try:
        info = cache_latents(
            args.ckpt, args.src, args.out, args.resolution, args.batch_size, args.device, args.dtype,
            args.caption_key, args.overwrite,
        )
    except (OSError, ValueError, CheckpointError) as exc:
        parser.error(str(exc))
    skipped = ", ".join(f"{n} {reason}" for reason, n in info["skipped"].items()) or "none"
    print(f"cached {info['samples']} samples from {len(info['source'])} shard(s) into {args.out} (skipped: {skipped})")
    return 0 if info["samples"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Encode image shards once into latent shards, so training skips the autoencoder's forward pass.

    ldm-cache-latents v1-5-pruned.safetensors 'shards/shards-{000000..000099}.tar' latents/ --resolution 512
    python train.py experiment=sd15_finetune init_from=v1-5-pruned.safetensors \\
        data=cached_latents data.train_shards='latents/*.tar' data.resolution=512

CKPT holds the autoencoder you train with: an SD single file or diffusers folder (a fine-tune's
`init_from`), or a stage-one checkpoint of this project (`module.first_stage_ckpt`). Each source shard
becomes one latent shard of the same name holding the same samples in the same order: `moments.npy`
(the posterior's mean and log-variance, C×2 channels at 1/8 resolution) and the caption. Training draws
z ~ N(mean, var) from them with its own noise generator, as it does after encoding an image, so a run
on cached latents takes the steps a run on the images would take, minus the encoder. Crops are fixed when
caching (centre crop); flips too, unless `--flip`. `OUT/cache.json` records the autoencoder's fingerprint,
and train.py refuses latents made by another autoencoder.

Speed: `--workers N` DataLoader processes decode and crop the source shards while this process encodes (default:
up to 4, this process's share of the CPUs; 0 decodes here). Each source shard is read whole by one worker and its
latent shard written from its batches alone, so the output is the same for any N (the same samples in the same
order, the same skip counts). A latent shard is written under a temporary name (`.NAME.tmp`) and renamed when
whole: an interrupted run leaves whole shards only. `--precision` runs the
autoencoder's encode under torch.autocast of bf16 (the default on a GPU that has it), fp16, or none (fp32, the
default on the CPU); the moments are made float32 before they are stored in `--dtype`, and cache.json records the
precision. A bf16-mixed training run on the images encodes under the same bf16 autocast; bit for bit equal steps
(above) hold at fp32. fp16 can overflow in some autoencoders: a batch of non-finite moments stops the run, with
what to use instead. The text encoder (`--text`) always runs in float32: a caption is 77 tokens, a small share of
the work beside the autoencoder's, and float32 contexts are what a 32-true run computes (a bf16-mixed run's own
differ by bf16's rounding).

Interrupted (Ctrl-C, SIGTERM, SIGKILL, a failure): run the same command again with `--resume`. A run writes
`OUT/cache.incomplete.json` (its settings) first and removes it after cache.json, last; while it is
there, train.py refuses the folder (read_cache_info raises). `--resume` keeps the shards already whole (each with the
counts recorded beside it, `.NAME.counts.json`), encodes the others, and leaves what an uninterrupted run leaves: the
same shards member for member, cache.json counting them all. It refuses other settings (checkpoint, resolution,
--flip, --text, buckets, ...), naming them; `--overwrite` encodes every shard again. Either removes what a SIGKILL
left under temporary names. Under torchrun each rank resumes its own shards. A `--resume` of a cache that had
finished (cache.json records its settings) has nothing to do and says so, touching nothing.

Every GPU of a node: start it under torchrun. Rank r encodes shards r::world_size on cuda:LOCAL_RANK (`--device
cuda`, the default on a GPU machine), each rank with its own `--workers`; rank 0 writes cache.json, counting every
rank's samples and skips, once all ranks are done (they exchange the counts over gloo, so no GPU collective runs).
On several nodes (torchrun's --nnodes and rendezvous) OUT must be one shared folder. Without torchrun: one process.

    torchrun --standalone --nproc-per-node=8 -m ldm.data.cache_latents v1-5-pruned.safetensors \\
        'shards/{000000..000099}.tar' latents/ --resolution 512 --flip

Flips (`--flip`, as kohya's latent cache for flip_aug): each sample also gets `moments_flip.npy`, the moments
of its mirrored crop (the mirrored picture encoded: the autoencoder is not mirror-symmetric, so mirroring the
latents would not do), and `cond_moments_flip.npy` with `--cond-image-key`; class maps (`--seg-key`) are
stored once and mirrored as they are read. Train with data.random_flip=true: each sample's plain or mirrored
moments, drawn per sample as a picture's flip is drawn (a resumed run draws the same). train.py refuses
data.random_flip=true on latents cached without --flip. Twice the encoder's work and the moments' space.

Text (`--text`): each sample also gets `context.npy`, its caption's cross-attention context (tokens x width,
in `--dtype`) from CKPT's text encoder, tokenized as the model does, so training runs no text encoder: train
from the same checkpoint (init_from) with data=cached_latents (data.cached_text: null uses them whenever
cache.json records them; false encodes the captions). `OUT/empty_context.npy` holds the empty prompt's
context once, which caption dropout puts in the rows it drops; cache.json records it, the text encoder's
fingerprint and the tokenizer's length, and train.py refuses contexts of another text encoder, and runs
that train the text encoder (module.train_text_encoder, module.lora.text_encoder) on them. An SD 1.x
context is 77x768 (230 KB in fp32: --dtype fp16 halves it). Validation (val/loss, sample images) still
encodes its captions and prompts.

    ldm-cache-latents v1-5-pruned.safetensors 'shards/{000000..000099}.tar' latents/ --resolution 512 --flip --text
    python train.py experiment=sd15_finetune init_from=v1-5-pruned.safetensors data=cached_latents \\
        data.train_shards=latents/ data.random_flip=true

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
import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm.checkpoint import (
    TEXT_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    atomic_write,
    parameters_on_meta,
    read_checkpoint,
    read_tensor_file,
)
from ldm.data.webdataset import (
    _STATE,
    CACHE_INCOMPLETE,
    CACHE_INFO,
    COND_MOMENTS_FLIP_KEY,
    COND_MOMENTS_KEY,
    CONTEXT_KEY,
    MOMENTS_FLIP_KEY,
    MOMENTS_KEY,
    _check_buckets,
    _check_conditioning,
    _ShardStream,
    _StreamSpec,
    expand_shard_specs,
    read_cache_info,
)
from ldm.models.autoencoder import AutoencoderKL

__all__ = ["CACHE_INFO", "cache_latents", "default_workers", "fingerprint", "load_autoencoder", "load_encoders", "main", "read_cache_info"]

DTYPES = {"fp32": np.float32, "fp16": np.float16}
# the autoencoder's encode runs under torch.autocast of this dtype (fp32: no autocast); moments are stored in DTYPES
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# ranks wait for the slowest at the end (its last shard): far longer than torch's 30 min default may pass; a
# rank that fails ends the others through torchrun, not through this timeout
BARRIER_TIMEOUT = timedelta(hours=24)
EMPTY_CONTEXT = "empty_context.npy"  # in OUT with --text: the empty prompt's context, which caption dropout puts in
COUNTS = ".{}.counts.json"  # in OUT while caching: a finished shard's counts, for --resume (removed at the end)


def load_encoders(path: str | Path, text: bool = False) -> tuple[AutoencoderKL, torch.nn.Module | None]:
    """The autoencoder of any checkpoint the loader takes, or of a stage-one checkpoint of this project; with
    `text`, also the text encoder (the model's `cond_stage_model`, float32, with the checkpoint's tokenizer)."""
    path = Path(path)
    if path.is_file():
        obj, _ = read_tensor_file(path)
        config = obj.get("ldm_config") if isinstance(obj, dict) else None
        if isinstance(config, dict) and "first_stage" in config and "unet" not in config:
            if text:
                raise CheckpointError(
                    f"{path} is a stage-one checkpoint (an autoencoder alone): --text needs the text encoder, so "
                    "give the SD checkpoint you train from (init_from), or cache without --text"
                )
            state = obj.get("state_dict", obj)
            weights = {k[len(VAE_PREFIX) :]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
            vae = AutoencoderKL(**config["first_stage"])
            vae.load_state_dict(weights, strict=True)
            return vae.eval(), None
    ckpt = read_checkpoint(path)
    weights = {k[len(VAE_PREFIX) :]: v for k, v in ckpt.state_dict.items() if k.startswith(VAE_PREFIX)}
    if not weights:
        raise CheckpointError(f"{path} holds no autoencoder ('{VAE_PREFIX}*' weights)")
    vae = AutoencoderKL(**ckpt.config["first_stage"])
    vae.load_state_dict(weights, strict=True)
    return vae.eval(), (_text_encoder(ckpt, path) if text else None)


def load_autoencoder(path: str | Path) -> AutoencoderKL:
    """The autoencoder of any checkpoint the loader takes, or of a stage-one checkpoint of this project."""
    return load_encoders(path)[0]


def _text_encoder(ckpt: Any, path: Path) -> torch.nn.Module:
    """The checkpoint's text encoder, built as StableDiffusion builds its `cond_stage_model` (same config, same
    tokenizer), its weights as float32 as LatentDiffusion holds them."""
    from ldm.models.stable_diffusion import build_text_encoder

    weights = {k[len(TEXT_PREFIX) :]: v for k, v in ckpt.state_dict.items() if k.startswith(TEXT_PREFIX)}
    if not weights:
        raise CheckpointError(f"{path} holds no text encoder ('{TEXT_PREFIX}*' weights): cache without --text")
    with parameters_on_meta():
        encoder = build_text_encoder(ckpt.config["cond_stage"], ckpt.tokenizer_dir)
    encoder.load_state_dict(weights, strict=True, assign=True)
    return encoder.float().eval()


def fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's weights (as float32), to tell which autoencoder (or text encoder) made a cache."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


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
    flip: bool = False,
    text: bool = False,
    workers: int = 0,
    precision: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Write one latent shard per source shard into `out_dir`; returns what `cache.json` records.

    `cond_image_key` adds the conditioning picture's moments, `seg_key` the cropped class map (see the
    module docstring); `num_classes` skips maps with larger labels. `flip` adds the moments of each mirrored
    crop (and of its mirrored conditioning picture), `text` each caption's text-encoder output. `workers`
    DataLoader processes decode and crop the shards (0: this process does), `precision` is the autocast dtype
    of the autoencoder's encode (None: bf16 on a GPU that has it, else fp32). In a torch.distributed process
    group (torchrun) this rank encodes shards rank::world_size, "cuda" means cuda:LOCAL_RANK, and rank 0 writes
    cache.json, with every rank's counts, once all are done; every rank returns the totals.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"--workers must be 0 (decode in this process) or more, got {workers!r}")
    if num_classes is not None and seg_key is None:
        raise ValueError("--num-classes filters class maps: it needs --seg-key")
    _check_conditioning(cond_image_key, seg_key, num_classes)
    flag = lambda setting: "--" + setting.replace("_", "-")  # noqa: E731 - errors in this tool's flags
    bucket_list = tuple(_check_buckets(resolution, bucket_step, bucket_max_ratio, None, flag)) if buckets else None
    rank, world_size = _rank_and_world()
    target = _rank_device(device, world_size)
    if target.type == "cuda" and target.index is not None:
        torch.cuda.set_device(target)  # so the DataLoader's pinning thread works on this rank's GPU, not on GPU 0
    precision = _check_precision(precision, target)
    # webdataset lower-cases extensions, as WebDataModule does with these keys
    cond_image_key = cond_image_key.lower() if cond_image_key else None
    seg_key = seg_key.lower() if seg_key else None
    urls = expand_shard_specs(src)
    out_dir = Path(out_dir)
    names = [_shard_name(url, i) for i, url in enumerate(urls)]
    if overwrite and resume:
        raise ValueError("--resume keeps the shards of a cut-off run, --overwrite encodes them again: pass one")
    existing = [n for n in names if (out_dir / n).exists()]
    marker = out_dir / CACHE_INCOMPLETE
    recorded = _read_marker(marker) if resume else None
    finished = _finished_cache(out_dir, names) if resume and recorded is None and existing else None
    if resume and recorded is None and existing and finished is None:
        raise FileExistsError(
            f"{out_dir} holds {len(existing)} of these shards but no {CACHE_INCOMPLETE}: it is not a cut-off run of "
            "ldm-cache-latents to --resume (a finished cache, or one of an older version); pass --overwrite"
        )
    if (existing or marker.exists()) and not (overwrite or resume):
        if marker.exists():
            raise FileExistsError(
                f"{out_dir} holds a cache that was cut off ({len(existing)} of {len(names)} shards whole, "
                f"{CACHE_INCOMPLETE} there): pass --resume to encode the missing shards, or --overwrite to start again"
            )
        raise FileExistsError(f"{out_dir} already holds {len(existing)} of these shards; pass --overwrite")
    vae, text_encoder = load_encoders(ckpt, text)
    vae = vae.to(target)
    if text_encoder is not None:
        text_encoder = text_encoder.to(target)
    settings = {
        "first_stage_fingerprint": fingerprint(vae),
        "text_encoder_fingerprint": fingerprint(text_encoder) if text_encoder is not None else None,
        "source": [str(u) for u in urls],
        "resolution": resolution,
        "batch_size": batch_size,
        "dtype": dtype,
        "precision": precision,
        "device": target.type,
        "caption_key": caption_key,
        "cond_image_key": cond_image_key,
        "seg_key": seg_key,
        "num_classes": num_classes,
        "buckets": {"step": bucket_step, "max_ratio": bucket_max_ratio} if buckets else None,
        "flip": flip,
        "text": text,
    }
    if finished is not None:  # --resume after the run had finished (its last shard, then cache.json, were written)
        if finished.get("settings") != settings:
            raise ValueError(f"--resume: {out_dir} is a finished cache, made with other settings: "
                             f"{_differences(finished.get('settings') or {}, settings)}; pass --overwrite to encode it again")
        return {**finished, "already_complete": True}
    if recorded is not None and recorded.get("settings") != settings:
        raise ValueError(f"--resume: {_differences(recorded.get('settings') or {}, settings)}; run it with the cut-off "
                         "run's settings, or pass --overwrite instead of --resume")
    _barrier(world_size)  # every rank has looked for existing shards and the marker before any writes one
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        # a cut-off run's leftovers: shards a SIGKILL left under their temporary name, a finished earlier cache's
        # cache.json (the marker, not it, now says what the folder holds), counts of shards about to be redone
        for pattern in (".*.tar.tmp", ".cache.*.json", f".{COUNTS.format('*')[:-len('.json')]}.*.json"):
            for leftover in out_dir.glob(pattern):  # and atomic_write's names for cache.json, the marker, counts
                leftover.unlink(missing_ok=True)
        (out_dir / CACHE_INFO).unlink(missing_ok=True)
        if not resume:
            _remove_counts(out_dir)
        (out_dir / EMPTY_CONTEXT).unlink(missing_ok=True)  # a run with --text into this folder before: not this cache's
        atomic_write(marker, lambda tmp: tmp.write_text(json.dumps({
            "settings": settings,
            "resume": "the run was cut off: run the same ldm-cache-latents command again with --resume",
        }, indent=2)))
    _barrier(world_size)  # the leftovers are gone and the marker is there before any rank writes a shard
    text_info = None
    if text_encoder is not None:
        if rank == 0:  # the empty prompt's context once (caption dropout's), before the shards: cache.json names it
            empty = _contexts(text_encoder, [""], DTYPES[dtype])[0]
            atomic_write(out_dir / EMPTY_CONTEXT, lambda tmp: tmp.write_bytes(empty))
        text_info = {
            "empty_context": EMPTY_CONTEXT,
            "text_encoder_fingerprint": settings["text_encoder_fingerprint"],
            "max_length": text_encoder.tokenizer.max_length,
            "context_dim": text_encoder.output_dim,
        }
    encoders = _Encoders(vae, text_encoder, flip, DTYPES[dtype], PRECISIONS[precision])
    specs = [
        _StreamSpec(
            urls=[url], batch_size=batch_size, resolution=resolution, random_crop=False, random_flip=False,
            caption_key=caption_key, min_size=0, shuffle_buffer=0, resampled=False, rank=0, world_size=1,
            cond_image_key=cond_image_key, seg_key=seg_key, num_classes=num_classes, buckets=bucket_list,
        )
        for url in urls
    ]
    mine = list(range(len(urls)))[rank::world_size]  # this rank's shards: each read whole, as one process reads it
    skipped: Counter[str] = Counter()
    written = 0
    if resume:  # a visible shard is whole (written under .NAME.tmp, renamed): kept, with the counts it recorded
        todo = []
        for i in mine:
            counts = _read_counts(out_dir / COUNTS.format(names[i])) if (out_dir / names[i]).exists() else None
            if counts is None:
                todo.append(i)
            else:
                written += counts["samples"]
                skipped.update(counts["skipped"])
        mine = todo
    written += _cache_shards(encoders, [(i, specs[i], out_dir / names[i]) for i in mine], workers, skipped, True)
    if world_size > 1:  # waits for every rank to finish its shards
        counts: list[Any] = [None] * world_size
        dist.all_gather_object(counts, (written, dict(skipped)))
        written, skipped = sum(n for n, _ in counts), sum((Counter(s) for _, s in counts), Counter())
    info = {
        "first_stage_fingerprint": settings["first_stage_fingerprint"],
        "latent_channels": vae.embed_dim,
        "resolution": resolution,
        "dtype": dtype,
        "precision": precision,  # the autoencoder's autocast when encoding (the text encoder runs in fp32)
        "cond_image_key": cond_image_key,
        "seg_key": seg_key,
        "buckets": {"step": bucket_step, "max_ratio": bucket_max_ratio} if buckets else None,
        "flip": flip,  # moments_flip.npy (and cond_moments_flip.npy): train with data.random_flip=true
        "text": text_info,  # context.npy: the text encoder does not run in training
        "samples": written,
        "skipped": dict(skipped),
        "source": [str(u) for u in urls],
        "checkpoint": str(ckpt),
        "settings": settings,  # what a --resume of this finished cache compares its own settings with
    }
    if rank == 0:
        atomic_write(out_dir / CACHE_INFO, lambda tmp: tmp.write_text(json.dumps(info, indent=2)))
        marker.unlink(missing_ok=True)  # after cache.json: the cache is whole
        _remove_counts(out_dir)
    _barrier(world_size)  # no rank returns before cache.json is there
    return info


def _finished_cache(out_dir: Path, names: list[str]) -> dict[str, Any] | None:
    """cache.json of a finished cache in `out_dir` that holds every one of `names` and records its settings
    (caches of older versions do not), or None."""
    try:
        info = json.loads((out_dir / CACHE_INFO).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("settings"), dict):
        return None
    return info if all((out_dir / n).is_file() for n in names) else None


def default_workers() -> int:
    """DataLoader workers per process: up to 4, this process's share of the CPUs it may run on (torchrun
    starts LOCAL_WORLD_SIZE processes a node)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def _rank_device(device: str, world_size: int) -> torch.device:
    """The device this process encodes on: with several ranks, "cuda" is cuda:LOCAL_RANK."""
    try:
        target = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r}: {exc}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA GPU here; pass --device cpu")
    if world_size > 1 and target.type == "cuda":
        if target.index is not None:
            raise ValueError(f"--device {device}: under torchrun each rank encodes on cuda:LOCAL_RANK; pass --device cuda")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"local rank {local} has no GPU: this node has {torch.cuda.device_count()}; "
                             "start at most that many processes a node (--nproc-per-node)")
        target = torch.device("cuda", local)
    return target


def _check_precision(precision: str | None, device: torch.device) -> str:
    """--precision checked on the device (None: bf16 on a GPU with bfloat16, else fp32)."""
    if precision is None:
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return precision
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--precision bf16: this GPU has no bfloat16; use --precision fp16 or fp32")
    # torch turns autocast off, with a warning only, for a dtype a device's autocast lacks: tried here instead
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            probe = torch.nn.Conv2d(1, 1, 1).to(device)
            with _autocast(device, PRECISIONS[precision]):
                ran = probe(torch.zeros(1, 1, 1, 1, device=device)).dtype
        except RuntimeError:
            ran = None
    if ran != PRECISIONS[precision]:
        raise ValueError(f"--precision {precision}: torch {torch.__version__} has no {precision} autocast on "
                         f"{device.type}; use --precision fp32")
    return precision


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _shard_name(url: str, index: int) -> str:
    name = os.path.basename(url.rstrip("/"))
    return name if name.endswith(".tar") else f"shard-{index:06d}.tar"


def _read_marker(marker: Path) -> dict[str, Any] | None:
    """What a cut-off run recorded in its marker (None: no marker)."""
    try:
        recorded = json.loads(marker.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{marker} cannot be read ({exc}): pass --overwrite to encode the shards again") from None
    return recorded if isinstance(recorded, dict) else {}


def _differences(recorded: dict[str, Any], settings: dict[str, Any]) -> str:
    """The settings a resumed run changes, in one line."""
    what = {"first_stage_fingerprint": "the autoencoder (checkpoint)", "text_encoder_fingerprint": "the text encoder "
            "(checkpoint)", "source": "the source shards", "buckets": "--buckets/--bucket-step/--bucket-max-ratio"}
    changed = []
    for key, value in settings.items():
        if recorded.get(key) != value:
            if key.endswith("fingerprint") or key == "source":
                changed.append(f"{what[key]} differs from the cut-off run's")
            else:
                flag = what.get(key, "--" + key.replace("_", "-"))
                changed.append(f"{flag} {_shown(value)} (the cut-off run: {_shown(recorded.get(key))})")
    return ", ".join(changed) or "the cut-off run recorded no settings"


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return "none" if value is None else str(value)


def _remove_counts(out_dir: Path) -> None:
    for path in out_dir.glob(COUNTS.format("*")):
        path.unlink(missing_ok=True)


def _read_counts(path: Path) -> dict[str, Any] | None:
    """A finished shard's samples and skips, as its run recorded them (None: not recorded, so encode it again)."""
    try:
        counts = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(counts, dict) and isinstance(counts.get("samples"), int) and isinstance(counts.get("skipped"), dict)
    return counts if ok else None


@dataclass(frozen=True)
class _Encoders:
    vae: AutoencoderKL
    text_encoder: torch.nn.Module | None  # --text
    flip: bool  # --flip
    dtype: type  # storage of what is written
    autocast: torch.dtype = torch.float32  # --precision of the autoencoder's encode


def _encoded(vae: AutoencoderKL, images: torch.Tensor, dtype: type, autocast: torch.dtype = torch.float32) -> list[bytes]:
    """Each image's posterior mean and log-variance, as .npy bytes (encoded under autocast of `autocast`, the
    moments then float32 before they are cast to the storage dtype)."""
    param = next(vae.parameters())
    with _autocast(param.device, autocast):
        posterior = vae.encode(images.to(device=param.device, dtype=param.dtype))
        moments = torch.cat([posterior.mean, posterior.logvar], dim=1)
    moments = moments.float().cpu().numpy()
    if not np.isfinite(moments).all():
        raise ValueError(f"the autoencoder gave non-finite latents under --precision {_name(autocast)}"
                         + ("; try --precision bf16 or fp32" if autocast == torch.float16 else ""))
    return [_npy(m.astype(dtype)) for m in moments]


def _name(autocast: torch.dtype) -> str:
    return next(name for name, d in PRECISIONS.items() if d == autocast)


def _mirrored(images: torch.Tensor) -> torch.Tensor:
    """The pictures mirrored left-right, as the loader's random_flip mirrors a crop (the same pixels)."""
    return torch.flip(images, dims=[-1])


def _contexts(text_encoder: torch.nn.Module, captions: list[str], dtype: type) -> list[bytes]:
    """Each caption's cross-attention context (tokens x width) as .npy bytes: what LatentDiffusion's text
    conditioner gives for it, `cond_stage_model.encode` of the model's own tokenization (in float32, whatever
    --precision)."""
    device = next(text_encoder.parameters()).device
    context = text_encoder.encode(text_encoder.tokenize(captions).to(device)).float().cpu().numpy()
    return [_npy(c.astype(dtype)) for c in context]


class _Shards(IterableDataset):
    """Whole shards as batches: `(index, batch)` for each of a shard's batches, in its order, then `(index, None)`
    when it ends. Each shard is read by one _ShardStream of its own (one worker, one pass, seed 0), as a run in
    one process reads it, so its batches, crops and skips are the same wherever it is decoded; in DataLoader
    worker w of n, the shards w::n."""

    def __init__(self, shards: list[tuple[int, _StreamSpec]]) -> None:
        super().__init__()
        self.shards = shards

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any] | None]]:
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        for index, spec in mine:
            # the stream played as worker 0 of 1 in any DataLoader worker: the shard whole, in order
            for batch in _ShardStream(spec, seed=0)._batches(0, 0, 1, None):
                batch.pop(_STATE, None)  # positions to resume a training pass from: not needed here
                batch.pop("dropped", None)
                yield index, batch
            yield index, None


def _as_is(item: Any) -> Any:
    return item


class _ShardWriter:
    """One latent shard written under a temporary name, renamed when complete: an interrupted run leaves no
    half shard (`abort` removes it)."""

    def __init__(self, path: Path) -> None:
        self.path, self.tmp = path, path.with_name(f".{path.name}.tmp")
        self.sink = wds.TarWriter(str(self.tmp), encoder=False)
        self.count = 0

    def write(self, sample: dict[str, Any]) -> None:
        self.sink.write(sample)
        self.count += 1

    def commit(self, skipped: Counter[str], record: bool = False) -> int:
        """The shard renamed into place; with `record`, its counts written beside it first (so that a shard there
        has them, for a --resume to count it)."""
        self.sink.close()
        if record:
            counts = {"samples": self.count, "skipped": dict(skipped)}
            atomic_write(self.path.with_name(COUNTS.format(self.path.name)),
                         lambda tmp: tmp.write_text(json.dumps(counts)))
        os.replace(self.tmp, self.path)
        return self.count

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.sink.close()
        self.tmp.unlink(missing_ok=True)


def _cache_shards(
    encoders: _Encoders, shards: list[tuple[int, _StreamSpec, Path]], workers: int, skipped: Counter[str],
    record: bool = False,
) -> int:
    """Encode `shards` (index, spec, output path): decoded in `workers` DataLoader processes (0: here), each
    output shard written from its own stream's batches while other shards' batches come in between; each
    finished shard's counts added to `skipped` (and, with `record`, written beside it for a --resume)."""
    if not shards:
        return 0
    specs, paths = {i: spec for i, spec, _ in shards}, {i: path for i, _, path in shards}
    dataset = _Shards([(i, spec) for i, spec, _ in shards])
    workers = min(workers, len(shards))
    device = next(encoders.vae.parameters()).device
    items: Any = iter(dataset) if workers == 0 else iter(DataLoader(
        dataset, batch_size=None, num_workers=workers, collate_fn=_as_is, pin_memory=device.type == "cuda",
    ))
    writers: dict[int, _ShardWriter] = {}
    shard_skipped: dict[int, Counter[str]] = {}
    count = 0
    try:
        for index, batch in items:
            if index not in writers:
                writers[index], shard_skipped[index] = _ShardWriter(paths[index]), Counter()
            if batch is None:  # the shard's end
                counts = shard_skipped.pop(index)
                count += writers.pop(index).commit(counts, record)
                skipped.update(counts)
                continue
            shard_skipped[index].update(batch["skipped"])
            if "image" in batch:
                _write_batch(encoders, specs[index], batch, writers[index], shard_skipped[index])
    finally:
        for writer in writers.values():
            writer.abort()
        if hasattr(items, "_shutdown_workers"):  # a failure: stop the workers now, not when the iterator is freed
            items._shutdown_workers()
    return count


def _write_batch(
    encoders: _Encoders, spec: _StreamSpec, batch: dict[str, Any], writer: _ShardWriter, skipped: Counter[str]
) -> None:
    vae, dtype, autocast = encoders.vae, encoders.dtype, encoders.autocast
    columns = {MOMENTS_KEY: _encoded(vae, batch["image"], dtype, autocast)}
    if encoders.flip:  # the mirrored picture encoded: the autoencoder is not mirror-symmetric
        columns[MOMENTS_FLIP_KEY] = _encoded(vae, _mirrored(batch["image"]), dtype, autocast)
    if spec.cond_image_key:
        columns[COND_MOMENTS_KEY] = _encoded(vae, batch["cond_image"], dtype, autocast)
        if encoders.flip:
            columns[COND_MOMENTS_FLIP_KEY] = _encoded(vae, _mirrored(batch["cond_image"]), dtype, autocast)
    if spec.seg_key:  # one copy: a label map is mirrored as it is read (data.random_flip)
        columns[spec.seg_key] = [_label_png(labels) for labels in batch["seg"]]
    if encoders.text_encoder is not None:
        columns[CONTEXT_KEY] = _contexts(encoders.text_encoder, batch["caption"], dtype)
    for i, (key, caption) in enumerate(zip(batch["key"], batch["caption"], strict=True)):
        members = {name: values[i] for name, values in columns.items()}
        if spec.seg_key and members[spec.seg_key] is None:
            skipped["label above 65535"] += 1
            continue
        writer.write({"__key__": key, **members, **_caption_member(spec.caption_key, caption)})


def _workers(value: str) -> int:
    try:
        workers = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {value!r}") from None
    if workers < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (decode in this process) or more, got {workers}")
    return workers


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldm-cache-latents", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="checkpoint holding the autoencoder (SD file, diffusers folder, stage one)")
    parser.add_argument("src", help="image shards: brace pattern, glob, folder or list as for data.train_shards")
    parser.add_argument("out", help="folder for the latent shards and cache.json")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="under torchrun, cuda is each rank's cuda:LOCAL_RANK")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="storage of the moments")
    parser.add_argument("--precision", choices=sorted(PRECISIONS),
                        help="autocast dtype of the autoencoder's encode (default: bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--workers", type=_workers, default=default_workers(),
                        help="DataLoader processes decoding and cropping the shards while the autoencoder encodes "
                             "(0: in this process; default: %(default)s)")
    parser.add_argument("--caption-key", default="txt")
    parser.add_argument("--overwrite", action="store_true", help="encode every shard again into a folder holding some")
    parser.add_argument("--resume", action="store_true",
                        help="finish a cut-off run (same command): keep its whole shards, encode the missing ones")
    parser.add_argument("--cond-image-key", help="edit pairs: the before picture's key (e.g. src.jpg)")
    parser.add_argument("--seg-key", help="semantic maps: the class-index map's key (e.g. seg.png)")
    parser.add_argument("--num-classes", type=int, help="with --seg-key: skip maps with labels >= this")
    parser.add_argument("--buckets", action="store_true",
                        help="encode each picture at its aspect-ratio bucket (train with data.buckets=true)")
    parser.add_argument("--bucket-step", type=int, default=64, help="with --buckets: bucket sides are multiples of this")
    parser.add_argument("--bucket-max-ratio", type=float, default=2.0, help="with --buckets: the longest side over the shortest")
    parser.add_argument("--flip", action="store_true",
                        help="also encode each mirrored crop (moments_flip.npy; train with data.random_flip=true)")
    parser.add_argument("--text", action="store_true",
                        help="also store each caption's text-encoder output (context.npy), from CKPT's text encoder, "
                             "so training does not run it")
    args = parser.parse_args(argv)
    rank, world_size = 0, 1
    main_thread = threading.current_thread() is threading.main_thread()  # only it can take signal handlers
    # SIGTERM stops as Ctrl-C does: the shard being written is removed
    previous = signal.signal(signal.SIGTERM, _interrupted) if main_thread else None
    try:
        started = _init_distributed()
        try:
            rank, world_size = _rank_and_world()
            try:
                info = cache_latents(
                    args.ckpt, args.src, args.out, args.resolution, args.batch_size, args.device, args.dtype,
                    args.caption_key, args.overwrite, args.cond_image_key, args.seg_key, args.num_classes,
                    args.buckets, args.bucket_step, args.bucket_max_ratio, args.flip, args.text, args.workers,
                    args.precision, args.resume,
                )
            except (OSError, ValueError, CheckpointError) as exc:
                parser.error(str(exc) if world_size == 1 else f"rank {rank}: {exc}")
        finally:
            if started:
                dist.destroy_process_group()
    except _Stopped as stop:
        return _stopped(parser.prog, stop.signum, args.out, rank, world_size)
    except KeyboardInterrupt:
        return _stopped(parser.prog, signal.SIGINT, args.out, rank, world_size)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if info.get("already_complete"):
        if rank == 0:
            print(f"{args.out} is already a finished cache of these {len(info['source'])} shard(s) with these "
                  f"settings ({info['samples']} samples): nothing to resume")
        return 0
    if rank == 0:
        skipped = ", ".join(f"{n} {reason}" for reason, n in info["skipped"].items()) or "none"
        processes = f" on {world_size} processes" if world_size > 1 else ""
        print(f"cached {info['samples']} samples from {len(info['source'])} shard(s) into {args.out}{processes} "
              f"(skipped: {skipped})")
    return 0 if info["samples"] else 1


class _Stopped(BaseException):
    """SIGTERM, raised where the process is, so the shard being written is removed as on Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupted(signum: int, frame: Any) -> None:
    raise _Stopped(signum)


def _stopped(prog: str, signum: int, out: str, rank: int, world_size: int) -> int:
    """One line for a run stopped by a signal, and 128+N."""
    if rank == 0:
        print(f"{prog}: stopped by {signal.Signals(signum).name}: the whole shards in {out} are kept; run the same "
              "command again with --resume (in place of any --overwrite) to encode the rest", file=sys.stderr)
    return 128 + signum


def _init_distributed() -> bool:
    """Under torchrun (WORLD_SIZE > 1): join its process group; gloo, as the ranks exchange a few counts only.
    True when this call started it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    return True


if __name__ == "__main__":
    sys.exit(main())

"""Stream image-caption pairs from WebDataset tar shards as `{"image", "caption"}` batches.

    dm = WebDataModule("data/shards-{000000..000099}.tar", batch_size=32, num_workers=8, resolution=512)

Batches: `image` float32 Bx3xHxW in [-1, 1], `caption` list[str], `key` list[str] (sample keys),
`skipped` dict reason -> count of samples dropped since the previous batch of the same worker, and
`dropped` one `(shard, key, reason, detail)` per sample counted in `skipped`.
With `latents=True` (shards written by `ldm-cache-latents`) a batch holds `moments` (Bx2Cxhxw, the
autoencoder's posterior mean and log-variance) instead of `image`.

Image conditioning; keys are sample-key extensions, so a tar member
`000001.src.jpg` is key `000001`, extension `src.jpg` (webdataset lower-cases extensions):
- `cond_image_key="src.jpg"` adds `cond_image` float32 Bx3xHxW in [-1, 1] (InstructPix2Pix's "before"
  picture), resized, cropped and flipped exactly as its `image` (one random draw for both).
- `seg_key="seg.png"` adds `seg` int64 BxHxW, class indices read from a single-channel PNG (mode L or P:
  raw indices, not palette colours), same geometry as `image` but resampled nearest, so labels stay
  labels. With `num_classes`, a map holding a label >= num_classes is skipped ("label out of range").
A conditioning image or map of another size than its image is stretched to the image's size first.
With `latents=True` the conditioning was cropped and encoded when caching: `cond_image_key` (any value)
adds `cond_moments` Bx2Cxhxw, the before picture's posterior, from `cond_moments.npy`; `seg_key` reads
the map as above, already cropped to `resolution`.

Shard specs: a brace pattern, a glob, a local path or folder of `.tar` files, a URL webdataset
can open (`https://...`, `pipe:curl -s ...`), or a list of these. Local files are checked at
`setup()`, so a typo fails before training starts.

Several GPUs/nodes: shards are shuffled with one seed shared by all ranks, then dealt out by
rank and by DataLoader worker, so ranks read disjoint shards. Ranks that get different numbers
of samples would otherwise finish at different steps and hang DDP, so for multi-GPU runs set
`epoch_length` (batches per rank per epoch; the stream is repeated to fill it), and preferably
`resampled=True`, where every rank draws shards at random with replacement, an endless stream
cut into epochs of `epoch_length`. Validation shards are read whole by every rank (no rank
waits on another, results are identical), which suits the small validation sets of diffusion.

Bad samples are skipped, never fatal, and counted by reason: "truncated image", "not an image" (bytes
no image format reads), "unreadable image" (other decoding errors), "no image", "no caption", "too small"
(shorter side below `min_size`), "unreadable shard" (counted once per shard that fails to open or read);
missing or unreadable conditioning image or segmentation map. A warning is logged at most once every
`WARN_INTERVAL_S` seconds per process (it counts by reason those it held back). Every skip reaches a
batch: a worker's skips after its last batch come as a `{"skipped", "dropped"}`-only item, which the
loader folds into the batch it yields next (it holds each batch until the next item arrives, so skips at
the very end of a pass ride on its last batch). Whatever trains on the batches sees every skip among the
samples read before its last batch, for any number of workers (LatentDiffusion sums them over ranks and
reports them at each epoch's end). `WebDataModule.skipped_samples` adds up, in the main process, what
this process's loaders received (training and validation).

Resume: a stream has no position to save. Each pass over the data is shuffled with a seed drawn
from (`seed`, the trainer's global step when the pass starts), so a run resumed at an epoch boundary sees
the same order as an uninterrupted one, and one resumed mid-epoch restarts the stream with a new
order (samples seen just before the stop may come again). `state_dict` keeps this process's skip counts.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import braceexpand
import lightning
import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm.data.transforms import apply_crop, decode_label_map, plan_crop, to_tensor

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
MOMENTS_KEY = "moments.npy"  # cached posterior moments, written by ldm.data.cache_latents
COND_MOMENTS_KEY = "cond_moments.npy"  # ... and the before picture's, whatever its key in the image shards
WARN_INTERVAL_S = 60.0
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://", "ais://")


def expand_shard_specs(specs: str | Sequence[str]) -> list[str]:
    """Shard URLs from brace patterns, globs, paths, folders and URLs; local files must exist."""
    spec_list = [specs] if isinstance(specs, str) else list(specs)
    urls: list[str] = []
    missing: list[str] = []
    for spec in spec_list:
        for url in braceexpand.braceexpand(str(spec)):
            found, absent = _resolve_one(url)
            urls += found
            missing += absent
    hint = "fix the data's shard setting, or write shards with `ldm-shards SRC OUT`"
    if missing:
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"shard spec {specs!r}: {len(missing)} shard(s) not found: {listed}; {hint}")
    if not urls:
        raise FileNotFoundError(f"shard spec {specs!r} matches no shards; {hint}")
    return urls


def _resolve_one(url: str) -> tuple[list[str], list[str]]:
    """(found urls, missing paths) for one brace-expanded spec."""
    if url.startswith(_REMOTE_PREFIXES):
        return [url], []
    path = url.removeprefix("file:")
    if any(c in path for c in "*?["):
        return sorted(glob.glob(path)), []
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*.tar"))), []
    return ([path], []) if os.path.isfile(path) else ([], [path])


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers; unlike hash(), stable across processes and runs."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def caption_from(sample: dict[str, Any], caption_key: str) -> str | None:
    """The caption under `caption_key`: an extension ("txt") or a dotted JSON path ("json.caption")."""
    extension, _, json_path = caption_key.partition(".")
    raw = sample.get(extension)
    if raw is None:
        return None
    if not json_path:
        value: Any = raw.decode("utf-8", errors="replace")
    else:
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        for part in json_path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
    return (value.strip() or None) if isinstance(value, str) else None


class _RateLimitedWarning:
    """Logs at most one warning per interval and says how many it held back, by reason."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last = -math.inf
        self._held_back: Counter[str] = Counter()

    def __call__(self, message: str, reason: str = "other") -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._held_back[reason] += 1
            return
        if self._held_back:
            reasons = ", ".join(f"{r} {n}" for r, n in self._held_back.most_common())
            message += f" ({self._held_back.total()} more skipped since the last warning: {reasons})"
        logger.warning(message)
        self._last, self._held_back = now, Counter()


_warn = _RateLimitedWarning(WARN_INTERVAL_S)


class _Skips:
    """What one stream skipped since its last batch: counts by reason, and each skip's shard and key."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.dropped: list[tuple[str, str, str, str]] = []

    def add(self, reason: str, shard: str, key: str, detail: str) -> None:
        self.counts[reason] += 1
        self.dropped.append((shard, key, reason, detail))

    def take(self) -> dict[str, Any]:
        """`skipped` and `dropped` for the next batch; starts counting afresh."""
        taken = {"skipped": dict(self.counts), "dropped": self.dropped}
        self.counts, self.dropped = Counter(), []
        return taken


class _ShardErrorHandler:
    """webdataset's exception handler for shards that cannot be opened or read: count and go on."""

    def __init__(self, skips: _Skips) -> None:
        self.skips = skips

    def __call__(self, exc: Exception) -> bool:
        # no key; webdataset puts the shard's url in the exception's text
        self.skips.add("unreadable shard", "", "", repr(exc))
        _warn(f"skipping (the rest of) a shard: {exc!r}", "unreadable shard")
        return True


class _SkipSample(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class _StreamSpec:
    urls: list[str]
    batch_size: int
    resolution: int
    random_crop: bool
    random_flip: bool
    caption_key: str
    min_size: int
    shuffle_buffer: int
    resampled: bool
    rank: int  # this process's share of the shards: rank::world_size
    world_size: int
    latents: bool = False
    cond_image_key: str | None = None
    seg_key: str | None = None
    num_classes: int | None = None


class _ShardStream(IterableDataset):
    """One pass over the shards, as batches; runs in each DataLoader worker.

    After its last batch a worker yields `{"skipped": ..., "dropped": ...}` alone, so skips after that
    batch still reach the main process (the loader folds it into a batch).
    """

    def __init__(self, spec: _StreamSpec, seed: int) -> None:
        super().__init__()
        self.spec, self.seed = spec, seed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skips = _Skips()
        rng = random.Random(_mix_seed(self.seed, self.spec.rank, worker))
        raw = wds.tarfile_samples(self._shards(worker, num_workers, rng), handler=_ShardErrorHandler(skips))
        if self.spec.shuffle_buffer > 1:
            # shuffle encoded samples: a buffer of decoded float images would take GBs per worker
            raw = wds.shuffle(self.spec.shuffle_buffer, initial=min(100, self.spec.shuffle_buffer), rng=rng)(
                raw
            )
        samples = self._decoded(raw, skips, rng)
        batch: list[dict[str, Any]] = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == self.spec.batch_size:
                yield _collate(batch, skips)
                batch = []
        if batch:
            yield _collate(batch, skips)
        if skips.counts:
            yield skips.take()

    def _shards(self, worker: int, num_workers: int, rng: random.Random) -> Iterator[dict[str, str]]:
        urls = self.spec.urls
        if self.spec.resampled:
            # rng is seeded per rank and worker: each draws its own endless sequence of shards
            return (dict(url=rng.choice(urls)) for _ in itertools.count())
        if self.spec.shuffle_buffer > 1:
            # the same seed on every rank, so the split below stays disjoint
            urls = random.Random(self.seed).sample(urls, len(urls))
        mine = urls[self.spec.rank :: self.spec.world_size][worker::num_workers]
        return (dict(url=u) for u in mine)

    def _decoded(
        self, raw_samples: Iterator[dict[str, Any]], skips: _Skips, rng: random.Random
    ) -> Iterator[dict[str, Any]]:
        for raw in raw_samples:
            try:
                yield self._decode(raw, rng)
            except _SkipSample as skip:
                key, url = str(raw.get("__key__")), str(raw.get("__url__"))
                skips.add(skip.reason, url, key, skip.detail)
                _warn(f"skipping sample {key} in {url}: {skip.reason} {skip.detail}", skip.reason)

    def _decode(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        caption = caption_from(raw, self.spec.caption_key)
        if caption is None:
            raise _SkipSample("no caption", f"(no {self.spec.caption_key!r}; keys {sorted(raw)})")
        if self.spec.latents:
            return self._cached(raw, caption)
        spec = self.spec
        rgb = self._image(raw)
        # everything is decoded and checked before the random draw: a skipped sample draws nothing
        cond = _cond_image(raw, spec.cond_image_key) if spec.cond_image_key else None
        seg = _seg_map(raw, spec.seg_key, spec.num_classes) if spec.seg_key else None
        plan = plan_crop(rgb.size, spec.resolution, spec.random_crop, spec.random_flip, rng)
        sample = {"image": to_tensor(apply_crop(rgb, plan)), "caption": caption, "key": raw["__key__"]}
        if cond is not None:
            sample["cond_image"] = to_tensor(apply_crop(cond, plan))
        if seg is not None:
            labels = apply_crop(seg, plan, Image.Resampling.NEAREST)
            sample["seg"] = torch.from_numpy(np.asarray(labels).astype(np.int64))
        return sample

    def _cached(self, raw: dict[str, Any], caption: str) -> dict[str, Any]:
        spec = self.spec
        moments = _moments(raw, MOMENTS_KEY, "latents", "not a shard of ldm-cache-latents")
        sample = {"moments": moments, "caption": caption, "key": raw["__key__"]}
        if spec.cond_image_key:
            what = "cached conditioning latents"
            cond = _moments(raw, COND_MOMENTS_KEY, what, "cached without --cond-image-key")
            if cond.shape != moments.shape:
                shapes = f"(shape {tuple(cond.shape)}, latents {tuple(moments.shape)})"
                raise _SkipSample(f"unreadable {what}", shapes)
            sample["cond_moments"] = cond
        if spec.seg_key:
            labels = _seg_map(raw, spec.seg_key, spec.num_classes)
            if labels.size != (spec.resolution, spec.resolution):
                # cropped when caching: another size means shards cached at another resolution
                size = f"({labels.size[0]}x{labels.size[1]}, resolution {spec.resolution})"
                raise _SkipSample("segmentation map of another size", size)
            sample["seg"] = torch.from_numpy(np.asarray(labels).astype(np.int64))
        return sample

    def _image(self, raw: dict[str, Any]) -> Image.Image:
        data = next((raw[k] for k in IMAGE_KEYS if k in raw), None)
        if data is None:
            raise _SkipSample("no image", f"(keys {sorted(raw)})")
        try:
            with Image.open(BytesIO(data)) as image:
                if min(image.size) < self.spec.min_size:
                    raise _SkipSample(
                        "too small", f"({image.size[0]}x{image.size[1]} < {self.spec.min_size})"
                    )
                return image.convert("RGB")  # decodes fully: truncated files fail here
        except _DECODE_ERRORS as exc:
            reason = _image_error(exc)
            detail = f"({len(data)} bytes: {data[:16]!r}...)" if reason == "not an image" else f"({exc})"
            raise _SkipSample(reason, detail) from exc


def _image_error(exc: BaseException) -> str:
    """The skip reason for an image PIL cannot read."""
    if isinstance(exc, UnidentifiedImageError):  # no image format recognises the bytes
        return "not an image"
    if "truncated" in str(exc).lower():  # "image file is truncated", "Truncated File Read"
        return "truncated image"
    return "unreadable image"


def _cond_image(raw: dict[str, Any], key: str) -> Image.Image:
    data = raw.get(key)
    if data is None:
        raise _SkipSample("no conditioning image", f"(no {key!r}; keys {sorted(raw)})")
    try:
        with Image.open(BytesIO(data)) as image:
            return image.convert("RGB")
    except _DECODE_ERRORS as exc:
        raise _SkipSample("unreadable conditioning image", f"({exc})") from exc


def _seg_map(raw: dict[str, Any], key: str, num_classes: int | None) -> Image.Image:
    data = raw.get(key)
    if data is None:
        raise _SkipSample("no segmentation map", f"(no {key!r}; keys {sorted(raw)})")
    try:
        labels = decode_label_map(data)
    except _DECODE_ERRORS as exc:
        raise _SkipSample("unreadable segmentation map", f"({exc})") from exc
    if num_classes is not None:
        highest = int(np.asarray(labels).max())
        if highest >= num_classes:
            raise _SkipSample("label out of range", f"(label {highest} >= num_classes={num_classes})")
    return labels


def _moments(raw: dict[str, Any], key: str, what: str, why_missing: str) -> torch.Tensor:
    data = raw.get(key)
    if data is None:
        raise _SkipSample(f"no {what}", f"(no {key!r}: {why_missing}; keys {sorted(raw)})")
    try:
        array = np.load(BytesIO(data), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise _SkipSample(f"unreadable {what}", f"({exc})") from exc
    if array.ndim != 3:
        raise _SkipSample(f"unreadable {what}", f"(shape {array.shape}, expected channels x height x width)")
    return torch.from_numpy(array.astype(np.float32, copy=False))


def _collate(samples: list[dict[str, Any]], skips: _Skips) -> dict[str, Any]:
    tensors = [k for k in ("moments", "cond_moments", "image", "cond_image", "seg") if k in samples[0]]
    return {
        **{k: torch.stack([s[k] for s in samples]) for k in tensors},
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        **skips.take(),
    }


def _fold_skips(
    batch: dict[str, Any], counts: Counter[str], dropped: list[tuple[str, str, str, str]]
) -> dict[str, Any]:
    """`batch` with the skips that came without a batch (workers' trailing items) added to its own."""
    if counts:
        batch["skipped"] = dict(Counter(batch["skipped"]) + counts)
        batch["dropped"] = [*batch.get("dropped", []), *dropped]
    return batch


class ShardLoader:
    """Iterable of batches over a shard stream; Lightning takes any iterable as a dataloader.

    Each `iter()` is one epoch: a fresh DataLoader over a freshly seeded stream. With
    `epoch_length` the stream is repeated (new seed each pass) and cut at exactly that many batches.
    """

    def __init__(
        self,
        spec: _StreamSpec,
        num_workers: int,
        seed: int,
        epoch_length: int | None = None,
        clock: Callable[[], tuple[int, int] | None] = lambda: None,
        skipped: Counter[str] | None = None,
    ) -> None:
        self.spec, self.num_workers, self.seed = spec, num_workers, seed
        self.epoch_length = epoch_length
        self.clock = clock
        self.skipped: Counter[str] = Counter() if skipped is None else skipped
        self._iterations = 0

    def __len__(self) -> int:
        if self.epoch_length is None:
            raise TypeError("a shard stream without epoch_length has no length")
        return self.epoch_length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Seeded by the global step the pass starts at (not the epoch: without a known length Lightning
        # asks for the next epoch's iterator before it counts the epoch), so a run resumed at an epoch
        # boundary reads the order an uninterrupted run reads.
        clock = self.clock()
        position = clock[1] if clock is not None else self._iterations
        self._iterations += 1
        passes = self._passes(position)
        try:
            yield from passes if self.epoch_length is None else itertools.islice(passes, self.epoch_length)
        finally:
            passes.close()  # shuts the DataLoader's workers down now, not whenever garbage is collected

    def _passes(self, position: int) -> Iterator[dict[str, Any]]:
        for pass_index in itertools.count():
            produced = 0
            for batch in self._one_pass(_mix_seed(self.seed, position, pass_index)):
                produced += 1
                yield batch
            if produced == 0:
                raise RuntimeError(
                    f"no usable samples in {len(self.spec.urls)} shard(s) ({self.spec.urls[0]}, ...); "
                    f"skipped so far: {dict(self.skipped) or 'none'}. Check caption_key={self.spec.caption_key!r}"
                    f" and min_size={self.spec.min_size}, and that this rank has shards."
                )
            if self.epoch_length is None:
                return

    def _one_pass(self, seed: int) -> Iterator[dict[str, Any]]:
        loader = DataLoader(
            _ShardStream(self.spec, seed),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )
        # Each batch is held until the next item arrives, so that skips coming after it without a batch
        # (a worker's trailing item) ride on it: none is lost after the last batch, nor when an
        # `epoch_length` cut stops reading after some batch.
        held: dict[str, Any] | None = None
        counts: Counter[str] = Counter()
        dropped: list[tuple[str, str, str, str]] = []
        for item in loader:
            self.skipped.update(item["skipped"])
            if "key" not in item:  # a trailing item: only skips
                counts.update(item["skipped"])
                dropped += item.get("dropped", [])
                continue
            if held is not None:
                yield _fold_skips(held, counts, dropped)
                counts, dropped = Counter(), []
            held = item
        if held is not None:
            yield _fold_skips(held, counts, dropped)


def _check_conditioning(cond_image_key: str | None, seg_key: str | None, num_classes: int | None) -> None:
    for name, key in (("cond_image_key", cond_image_key), ("seg_key", seg_key)):
        if key is not None and (not key or key.lower() == "__key__" or key.lower() in IMAGE_KEYS):
            raise ValueError(
                f"{name}={key!r} must name the sample's conditioning extension (e.g. 'cond.png'), "
                f"not empty nor one of the image extensions {IMAGE_KEYS}"
            )
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1")
    if num_classes is not None and seg_key is None:
        raise ValueError(
            f"num_classes={num_classes} (a semantic-map model's classes) needs the class maps: set data.seg_key "
            "to their key in the shards (e.g. seg.png)"
        )


class WebDataModule(lightning.LightningDataModule):
    """Training (and optional validation) batches from WebDataset shards; see the module docstring."""

    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        resolution: int = 256,
        random_crop: bool = False,
        random_flip: bool = False,
        caption_key: str = "txt",
        min_size: int = 0,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        epoch_length: int | None = None,
        seed: int = 0,
        latents: bool = False,
        cond_image_key: str | None = None,
        seg_key: str | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if resolution <= 0 or resolution % 8:
            raise ValueError(
                f"resolution must be a positive multiple of 8 (the VAE downsamples 8x), got {resolution}"
            )
        if batch_size < 1 or num_workers < 0 or min_size < 0:
            raise ValueError(
                f"need batch_size >= 1, num_workers >= 0, min_size >= 0; got {batch_size}, "
                f"{num_workers}, {min_size}"
            )
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"epoch_length must be a positive number of batches, got {epoch_length}")
        if resampled and epoch_length is None:
            raise ValueError("resampled=True streams forever: set epoch_length (batches per epoch per rank)")
        _check_conditioning(cond_image_key, seg_key, num_classes)
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.num_workers, self.resolution = batch_size, num_workers, resolution
        self.random_crop, self.random_flip = random_crop, random_flip
        self.caption_key, self.min_size, self.shuffle_buffer = caption_key, min_size, shuffle_buffer
        self.resampled, self.epoch_length, self.seed = resampled, epoch_length, seed
        self.latents = latents
        # webdataset lower-cases extensions, so "SRC.JPG" would never match
        self.cond_image_key = cond_image_key.lower() if cond_image_key else None
        self.seg_key = seg_key.lower() if seg_key else None
        self.num_classes = num_classes
        self.skipped_samples: Counter[str] = Counter()
        self._train_urls: list[str] | None = None
        self._val_urls: list[str] | None = None

    def setup(self, stage: str | None = None) -> None:
        self._train_urls = expand_shard_specs(self.train_shards)
        self._val_urls = expand_shard_specs(self.val_shards) if self.val_shards is not None else None
        _, world_size = self._rank_and_world_size()
        if not self.resampled and len(self._train_urls) < world_size:
            raise ValueError(
                f"{len(self._train_urls)} training shard(s) for {world_size} ranks: each rank needs at least one. "
                "Write more, smaller shards (ldm-shards --samples-per-shard) or set resampled=true and epoch_length."
            )
        if world_size > 1 and self.epoch_length is None:
            logger.warning(
                "training on %d ranks without epoch_length: ranks whose shards hold fewer samples finish "
                "the epoch first and DDP may hang; set epoch_length (and resampled=true)",
                world_size,
            )

    def _spec(self, urls: list[str] | None, train: bool) -> _StreamSpec:
        if urls is None:
            raise RuntimeError("call setup() before asking for dataloaders")
        rank, world_size = self._rank_and_world_size()
        return _StreamSpec(
            urls=urls,
            batch_size=self.batch_size,
            resolution=self.resolution,
            random_crop=self.random_crop and train,
            random_flip=self.random_flip and train,
            caption_key=self.caption_key,
            min_size=self.min_size,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            resampled=self.resampled and train,
            rank=rank if train else 0,
            world_size=world_size if train else 1,
            latents=self.latents,
            cond_image_key=self.cond_image_key,
            seg_key=self.seg_key,
            num_classes=self.num_classes,
        )

    def _rank_and_world_size(self) -> tuple[int, int]:
        # Asked in the main process: DataLoader workers started by spawn know nothing of DDP.
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        rank, world_size, _, _ = wds.utils.pytorch_worker_info()
        return rank, world_size

    def _trainer_clock(self) -> tuple[int, int] | None:
        if self.trainer is None:
            return None
        return self.trainer.current_epoch, self.trainer.global_step

    def train_dataloader(self) -> ShardLoader:
        return ShardLoader(
            self._spec(self._train_urls, train=True),
            self.num_workers,
            self.seed,
            self.epoch_length,
            clock=self._trainer_clock,
            skipped=self.skipped_samples,
        )

    def val_dataloader(self) -> ShardLoader | list:
        if self.val_shards is None:
            return []
        return ShardLoader(
            self._spec(self._val_urls, train=False), self.num_workers, self.seed, skipped=self.skipped_samples
        )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_samples": dict(self.skipped_samples)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_samples.clear()
        self.skipped_samples.update(state_dict.get("skipped_samples", {}))

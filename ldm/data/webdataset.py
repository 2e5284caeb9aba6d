"""Stream image-caption pairs from WebDataset tar shards as `{"image", "caption"}` batches.

    dm = WebDataModule("data/shards-{000000..000099}.tar", batch_size=32, num_workers=8, resolution=512)

Batches: `image` float32 Bx3xHxW in [-1, 1], `caption` list[str], `key` list[str] (sample keys),
`skipped` dict reason -> count of samples dropped since the previous batch of the same worker, and
`dropped` one `(shard, key, reason, detail)` per sample counted in `skipped`.
With `latents=True` (shards written by `ldm-cache-latents`) a batch holds `moments` (Bx2Cxhxw, the
autoencoder's posterior mean and log-variance) instead of `image`. With `random_flip` (shards cached with
`--flip`) each training sample's moments are its plain crop's or its mirrored crop's (`moments_flip.npy`),
drawn from the sample's own generator as an image's flip is (so a resume draws them again); its
conditioning moments follow, its class map is mirrored. With cached text contexts (`--text`; `cached_text`
true, or null: whenever cache.json records them) training batches add `context` float32 BxTxD, each
caption's text-encoder output, and `empty_context` (TxD) holds the empty prompt's, for caption dropout.

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

Aspect-ratio buckets (`buckets=True`, with `bucket_step`, `bucket_max_ratio`; see ldm.data.buckets): each picture
is cover-resized and cropped (centre, or at random with `random_crop`) to the bucket of nearest aspect ratio, its
`cond_image`/`seg` with the same plan, and each worker's `BucketQueue` (capacity `bucket_buffer`, by default
batch_size x buckets, which never forces a short batch) makes batches of one bucket: short ones when the queue is
full (its fullest bucket) and at the end of a pass (what is left). Buckets are per worker and per rank; with
`epoch_length` every rank still yields exactly that many batches. With `latents=True` batches group by the cached
latents' shape (`ldm-cache-latents --buckets`); without buckets, latents of several shapes stop with one line.

Decoding (`decoder`, settings' `data.decoder`): "pil" (default) decodes with PIL and resizes bicubic: the
reference pixels. "pil_draft" first asks libjpeg (`Image.draft`) for the smallest DCT scale (1/2, 1/4, 1/8) whose
picture still covers the planned resize, then resizes that as "pil" does (pixels about 1/255 off on average).
"torchvision" decodes with torchvision.io's libjpeg-turbo `decode_jpeg` and resizes with an antialiased bicubic
tensor resize, PIL's filter (pixels within a rounding of "pil"'s; torchvision 0.29 marks its image decoders
deprecated in favour of TorchCodec). Under each the crop plan is made from the full size read from the picture's
header (`min_size` is checked on it too) with the same random draws, so crops, flips, skips and a resume are the
same; only JPEGs (for torchvision: RGB or grey ones) take the faster paths, other images, conditioning images and
segmentation maps (nearest-resized labels) decode with PIL as under "pil", and so does a JPEG torchvision refuses
(every decoder skips what "pil" skips, for its reasons) or of an extreme aspect ratio (resized from its crop's part
alone: see transforms.apply_crop). Under every decoder a picture is turned upright by its EXIF orientation (the
plan, buckets and min_size use its upright size), its transparency is composited onto white and 16-bit greys are
scaled to 8 bits (transforms.to_rgb: what "pil" has always given for opaque, upright 8-bit pictures); colour
profiles are not applied. Pictures are identified by their bytes (PNG bytes named .jpg load), among the raster
formats of transforms.PICTURE_FORMATS; a member is read as the picture if its extension is one of IMAGE_KEYS (the first there, in that order; a
GIF's, WebP's or TIFF's first frame).

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
no image format reads, an empty file), "image too large" (a header declaring more than transforms.max_pixels():
a decompression bomb, refused before decoding), "unreadable image" (other decoding errors), "no image" (no
member of an IMAGE_KEYS extension), "no caption" (no caption member, or no such JSON field), "unreadable caption"
(not UTF-8 text, invalid JSON, a field that is not text), "empty caption", "too small" (shorter side below
`min_size`), "unreadable shard" (counted once per shard that fails to open or read); missing or unreadable
conditioning image or segmentation map. Each skip's detail (in `dropped`) says what is wrong with that sample. A warning is logged at most once every
`WARN_INTERVAL_S` seconds per process (it counts by reason those it held back). Every skip reaches a
batch: a worker's skips after its last batch come as a `{"skipped", "dropped"}`-only item, which the
loader folds into the batch it yields next (it holds each batch until the next item arrives, so skips at
the very end of a pass ride on its last batch). Whatever trains on the batches sees every skip among the
samples read before its last batch, for any number of workers (LatentDiffusion sums them over ranks and
reports them at each epoch's end). `WebDataModule.skipped_samples` adds up, in the main process, the
skips of the batches this process's loaders handed out (training and validation).

Resume is exact at any step, mid-epoch included, for any number of workers and ranks. Each pass over the
data is shuffled with a seed drawn from (`seed`, the trainer's global step when the epoch's stream starts,
the pass's number within the epoch), and each DataLoader worker's stream has a position it can go on from
(`_WorkerStream`): its generator's state (shuffle picks, and shard draws when `resampled`), the shard and
sample it has read up to, and the places (shard, sample number) of the samples in its shuffle buffer. Crops
and flips are drawn per sample, from (pass seed, rank, worker, the sample's number), so none has to be
replayed. Every training batch carries the position after it (`stream_position`: the pass, the epoch's
batches so far, whose turn it is among the workers, every worker's position), which `on_before_batch_transfer`
takes out as the batch reaches the model, so `state_dict` saves the position after the last batch trained
on (not the ones read ahead), gathered from every rank into the checkpoint, with the skip counts up to that
batch. Resumed from a checkpoint written mid-epoch (a step file, the last.ckpt of an interrupt, a run ended by
max_steps), each rank's loader re-creates that pass and every worker goes on from its position: it reads
again the shards holding samples of its shuffle buffer (up to the last one it needs) and its current shard up
to where it was, without decoding any of them, so a resume reads the bytes of a few shards per worker
(those the last ~shuffle_buffer·ln(shuffle_buffer) samples came from, at worst); the DataLoader starts at the
worker whose turn it was. The resumed run then reads the samples the uninterrupted run reads, in its order,
with the same crops, flips and skip counts. With buckets a worker's position also lists the samples its
BucketQueue holds (bucket, arrival, place, `taken` number: 48 bytes each, no pixels), read again with the
shuffle buffer's and decoded with the same draws. Checkpoints grow by about 16 bytes per buffered sample per worker
per rank. The saved position is used only with the same shards, ranks, workers, batch size, shuffle buffer,
`resampled`, `epoch_length` and seed; otherwise a warning says so and the resumed epoch reads a new order.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import math
import os
import pickle
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import braceexpand
import lightning
import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm.data.buckets import Bucket, BucketQueue, bucket_sizes, nearest_bucket
from ldm.data.transforms import (
    CropPlan,
    PictureTooLarge,
    apply_crop,
    crops_first,
    decode_label_map,
    decode_text,
    exif_orientation,
    load_rgb,
    open_picture,
    plan_cover_crop,
    to_rgb,
    to_tensor,
    upright_size,
)

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")  # the first found is the picture
MOMENTS_KEY = "moments.npy"  # cached posterior moments, written by ldm.data.cache_latents
COND_MOMENTS_KEY = "cond_moments.npy"  # ... and the before picture's, whatever its key in the image shards
MOMENTS_FLIP_KEY = "moments_flip.npy"  # ... of the mirrored crop (ldm-cache-latents --flip)
COND_MOMENTS_FLIP_KEY = "cond_moments_flip.npy"  # ... and of the mirrored before picture
CONTEXT_KEY = "context.npy"  # the text encoder's output for the caption (ldm-cache-latents --text)
CACHE_INFO = "cache.json"  # beside latent shards: what ldm-cache-latents made them with
# beside latent shards while ldm-cache-latents writes them (its settings), removed once cache.json is written: there,
# the cache was cut off and holds only some of its shards
CACHE_INCOMPLETE = "cache.incomplete.json"
WARN_INTERVAL_S = 60.0
# what reading a seg map may raise; a picture's decode catches any Exception (PIL's plugins raise struct.error,
# EOFError, IndexError... on malformed files): a sample is skipped, never the run stopped
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# data.decoder: "pil" (PIL decode, bicubic resize), "pil_draft" (libjpeg's reduced-size DCT decode first),
# "torchvision" (torchvision.io's libjpeg-turbo decode, antialiased bicubic tensor resize)
DECODERS = ("pil", "pil_draft", "torchvision")
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
    """The caption under `caption_key`: an extension ("txt") or a dotted JSON path ("json.caption"); None
    when there is none, it is empty, or it cannot be read (`_caption` says which)."""
    try:
        return _caption(sample, caption_key)
    except _SkipSample:
        return None


def _caption(sample: dict[str, Any], caption_key: str) -> str:
    """The caption under `caption_key`, stripped, or _SkipSample saying what is wrong with it: "no caption"
    (no such member, or no such JSON field), "unreadable caption" (not UTF-8 text, invalid JSON, a field
    that is not text), "empty caption". Text is UTF-8, or UTF-16 with a byte-order mark (see decode_text)."""
    extension, _, json_path = caption_key.partition(".")
    raw = sample.get(extension)
    if raw is None:
        raise _SkipSample("no caption", f"(no {extension!r} member; keys {_members(sample)})")
    try:
        text = decode_text(raw)
    except UnicodeDecodeError as exc:
        raise _SkipSample("unreadable caption", f"({extension!r} is not UTF-8 text: {exc.reason} at byte {exc.start}: "
                                                f"{raw[max(0, exc.start - 8) : exc.start + 8]!r})") from exc
    value: Any = text
    if json_path:
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise _SkipSample("unreadable caption", f"({extension!r} is not valid JSON: {exc})") from exc
        for depth, part in enumerate(parts := json_path.split(".")):
            if not isinstance(value, dict) or part not in value:
                where = ".".join([extension, *parts[:depth]])
                fields = sorted(value)[:10] if isinstance(value, dict) else f"a {type(value).__name__}"
                raise _SkipSample("no caption", f"(no {part!r} in {where}: its fields {fields})")
            value = value[part]
        if not isinstance(value, str):
            raise _SkipSample("unreadable caption", f"({caption_key} is a {type(value).__name__}, not text: {str(value)[:40]})")
    value = value.strip()
    if not value:
        raise _SkipSample("empty caption", f"({caption_key} holds {len(raw)} bytes, none but whitespace)")
    return value


def _members(sample: dict[str, Any]) -> list[str]:
    """A raw sample's member extensions (its keys less webdataset's __key__, __url__ and the stream's tags)."""
    return sorted(k for k in sample if not k.startswith("__"))


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

    def __init__(self, skips: _Skips, quiet: bool = False) -> None:
        self.skips, self.quiet = skips, quiet

    def __call__(self, exc: Exception) -> bool:
        # no key; webdataset puts the shard's url in the exception's text
        self.skips.add("unreadable shard", "", "", repr(exc))
        if not self.quiet:
            _warn(f"skipping (the rest of) a shard: {exc!r}", "unreadable shard")
        return True


class _SkipSample(Exception):
    """Why a sample is skipped: `reason` (counted) and `detail` (its own particulars, for the dropped list)."""

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
    text: bool = False  # with latents: each sample's cached text-encoder output (`context.npy`) as `context`
    cond_image_key: str | None = None
    seg_key: str | None = None
    num_classes: int | None = None
    # aspect-ratio buckets (None: every picture a `resolution` square); with `latents`, batches group by the
    # cached latents' shape instead. `bucket_buffer`: a worker's BucketQueue capacity (None: unbounded)
    buckets: tuple[Bucket, ...] | None = None
    bucket_buffer: int | None = None
    # captions -> token ids (the training model's tokenizer), run in the workers: batches get `input_ids`
    tokenizer: Callable[[list[str]], torch.Tensor] | None = field(default=None, compare=False, repr=False)
    decoder: str = "pil"  # how JPEGs are decoded and resized: one of DECODERS


def _tar_samples(url: str, handler: _ShardErrorHandler) -> Generator[dict[str, Any], None, None]:
    """The samples of one shard, in order (each tagged `__url__`; webdataset groups members by key)."""
    return wds.tarfile_samples(iter([{"url": url}]), handler=handler)  # type: ignore[return-value]


class _WorkerStream:
    """One DataLoader worker's raw (undecoded) samples in one pass, with a position it can save and go on from.

    Samples come shard after shard, each tagged with its place (the shard's number in this worker's sequence
    of shards, its number in the shard), then through a shuffle buffer (webdataset's algorithm: fill to 100,
    then pick at random from up to `shuffle_buffer`). One numpy PCG64 generator, seeded per pass, rank and
    worker, draws the picks (and the shards, when resampled). `state()`, taken between two samples, is all
    that decides what follows: that generator's state, the places of the samples in the buffer, the place
    reached upstream. `restore(state)` reads the buffered samples back and skips the current shard's first
    members, so it reads at most the shards the buffer holds samples of, and decodes nothing.
    """

    def __init__(self, spec: _StreamSpec, seed: int, worker: int, num_workers: int, skips: _Skips) -> None:
        self.spec, self.worker, self.skips = spec, worker, skips
        self.rng = np.random.Generator(np.random.PCG64(_mix_seed(seed, spec.rank, worker)))
        self.augment_seed = _mix_seed(seed, spec.rank, worker, 1)
        self.urls = None if spec.resampled else self._shard_list(seed, worker, num_workers)
        self.shard, self.member, self.url = -1, 0, ""  # the shard being read and how many samples it gave
        self.exhausted = False
        self.taken = 0  # samples taken out of the shuffle buffer (decoded or skipped)
        self.buffer: list[dict[str, Any]] = []
        self._current: Generator[dict[str, Any], None, None] | None = None

    def _shard_list(self, seed: int, worker: int, num_workers: int) -> list[str]:
        urls = self.spec.urls
        if self.spec.shuffle_buffer > 1:
            # the same seed on every rank, so the split below stays disjoint
            urls = random.Random(seed).sample(urls, len(urls))
        return urls[self.spec.rank :: self.spec.world_size][worker::num_workers]

    def augment_rng(self, taken: int | None = None) -> random.Random:
        """The crop and flip draws of the sample just taken (or of the `taken`-th one): its own generator, so
        a stream that goes on from a saved position draws what the uninterrupted one draws, without replaying
        earlier samples."""
        if not (self.spec.random_crop or self.spec.random_flip):
            return _NO_DRAWS
        return random.Random(_mix_seed(self.augment_seed, self.taken if taken is None else taken))

    def samples(self) -> Iterator[dict[str, Any]]:
        """Raw samples, shuffled; `state()` between two of them says where the stream stands."""
        for sample in self._shuffled():
            self.taken += 1
            yield sample

    def _shuffled(self) -> Iterator[dict[str, Any]]:
        size = self.spec.shuffle_buffer
        if size <= 1:
            while (sample := self._next_raw()) is not None:
                yield sample
            return
        # webdataset's shuffle, over `self.buffer` so that its contents are part of the state; of encoded
        # samples: a buffer of decoded float images would take GBs per worker
        initial, buf = min(100, size), self.buffer
        while (sample := self._next_raw()) is not None:
            buf.append(sample)
            if len(buf) < size and (extra := self._next_raw()) is not None:
                buf.append(extra)
            if len(buf) >= initial:
                yield self._pick()
        while buf:
            yield self._pick()

    def _pick(self) -> dict[str, Any]:
        k = int(self.rng.integers(len(self.buffer)))
        sample = self.buffer[k]
        self.buffer[k] = self.buffer[-1]
        self.buffer.pop()
        return sample

    def _next_raw(self) -> dict[str, Any] | None:
        while not self.exhausted:
            if self._current is None and not self._open(self.shard + 1):
                self.exhausted = True
                break
            assert self._current is not None
            sample = next(self._current, None)
            if sample is None:
                self._current = None
                continue
            sample["__place__"] = (self.shard, self.member)
            self.member += 1
            return sample
        return None

    def _open(self, index: int) -> bool:
        if self.urls is None:  # resampled: each rank and worker draws its own endless sequence of shards
            url = self.spec.urls[int(self.rng.integers(len(self.spec.urls)))]
        elif index < len(self.urls):
            url = self.urls[index]
        else:
            return False
        self.shard, self.member, self.url = index, 0, url
        self._current = _tar_samples(url, _ShardErrorHandler(self.skips))
        return True

    def state(self) -> dict[str, Any]:
        places = [sample["__place__"] for sample in self.buffer]
        return {
            "worker": self.worker,
            "rng": self.rng.bit_generator.state,
            "taken": self.taken,
            "shard": self.shard,
            "member": self.member,
            "url": self.url,
            "open": self._current is not None,
            "exhausted": self.exhausted,
            "buffer": torch.tensor(places, dtype=torch.int64).reshape(-1, 2),
            "buffer_urls": {place[0]: sample["__url__"] for place, sample in zip(places, self.buffer, strict=True)},
        }

    def restore(
        self,
        state: dict[str, Any],
        held: Sequence[tuple[int, int]] = (),
        held_urls: dict[int, str] | None = None,
    ) -> dict[tuple[int, int], dict[str, Any]]:
        """Go on from `state()` of an earlier run of this same stream (same pass seed, rank and worker).

        `held`: places (shard, sample number) of samples taken out of the buffer before `state()` but not yet
        batched (a BucketQueue's), read again on the same way as the buffer's (`held_urls`: their shards' urls);
        returns those found, by place."""
        self.rng.bit_generator.state = state["rng"]
        self.taken, self.exhausted = int(state["taken"]), bool(state["exhausted"])
        self.shard, self.member, self.url = int(state["shard"]), int(state["member"]), str(state["url"])
        places = [(int(s), int(m)) for s, m in state["buffer"].tolist()]
        urls = {**(held_urls or {}), **state["buffer_urls"]}
        wanted: dict[int, set[int]] = {}
        for shard, member in [*places, *held]:
            wanted.setdefault(shard, set()).add(member)
        found: dict[tuple[int, int], dict[str, Any]] = {}
        # what reading again finds wrong with a shard was counted (and warned about) when it was first read
        quiet = _ShardErrorHandler(_Skips(), quiet=True)
        complete = True
        for shard in sorted(wanted):
            if state["open"] and shard == self.shard:
                continue  # read below, on the way to the upstream position
            samples = _tar_samples(urls[shard], quiet)
            complete &= _collect(samples, shard, wanted[shard], found, max(wanted[shard]) + 1)
            samples.close()
        if state["open"]:
            handler = _ShardErrorHandler(_Skips(), quiet=True)
            current = _tar_samples(self.url, handler)
            complete &= _collect(current, self.shard, wanted.get(self.shard, set()), found, self.member)
            handler.skips, handler.quiet = self.skips, False  # from here on the shard is read for the first time
            self._current = current
        self.buffer = [found[place] for place in places if place in found]
        if not complete or len(self.buffer) < len(places):
            logger.warning(
                "resuming the data stream of rank %d, worker %d: a shard holds fewer samples than when it was "
                "read (%d of %d buffered samples found); the shards changed since the checkpoint, so the order "
                "differs from the uninterrupted run's",
                self.spec.rank, self.worker, len(self.buffer), len(places),
            )
        return {place: found[place] for place in held if place in found}


def _collect(
    samples: Iterator[dict[str, Any]],
    shard: int,
    members: set[int],
    found: dict[tuple[int, int], dict[str, Any]],
    count: int,
) -> bool:
    """Read `count` samples of a shard, keeping `members` (by number) in `found`; False if it ends first."""
    for member in range(count):
        sample = next(samples, None)
        if sample is None:
            return False
        if member in members:
            sample["__place__"] = (shard, member)
            found[(shard, member)] = sample
    return True


_NO_DRAWS = random.Random(0)  # handed to plan_crop when neither crop nor flip is random: never drawn from
_STATE = "__stream_state__"  # a worker's item -> the loader: the worker's position after it


def _sendable(state: dict[str, Any]) -> dict[str, Any]:
    """A worker's stream position on its way to the training process, its int64 index tensors (the shuffle
    buffer's places, a bucket queue's held samples) as raw bytes: pickled with the item they ride on, where
    each tensor would cross as shared memory of its own (a file descriptor passed over a socket connection,
    pinned too on a GPU machine), a fixed cost per batch for a few hundred bytes. Bytes, not numpy arrays,
    which the DataLoader turns back into tensors in the worker. `_received` undoes it."""
    sent = {**state, "buffer": _index_bytes(state["buffer"])}
    if "buckets" in state:
        sent["buckets"] = {**state["buckets"], "held": _index_bytes(state["buckets"]["held"])}
    return sent


def _received(state: dict[str, Any]) -> dict[str, Any]:
    """`_sendable`'s position as the worker took it: the same int64 tensors (what checkpoints save)."""
    state["buffer"] = _index_tensor(state["buffer"])
    if "buckets" in state:
        state["buckets"] = {**state["buckets"], "held": _index_tensor(state["buckets"]["held"])}
    return state


def _index_bytes(rows: torch.Tensor) -> tuple[int, bytes]:
    return rows.shape[1], rows.numpy().tobytes()


def _index_tensor(sent: tuple[int, bytes]) -> torch.Tensor:
    columns, data = sent
    return torch.from_numpy(np.frombuffer(data, dtype=np.int64).reshape(-1, columns).copy())


class _ShardStream(IterableDataset):
    """One pass over the shards, as batches; runs in each DataLoader worker.

    After its last batch a worker yields `{"skipped": ..., "dropped": ...}` alone, so skips after that
    batch still reach the main process (the loader folds it into a batch). Every item also carries the
    worker's position after it (`_STATE`, taken out by the loader). `rotation` and `starts` resume a pass:
    DataLoader worker i plays the pass's worker (i + rotation) % num_workers, from `starts[that worker]`.

    With `passes` (one queue per DataLoader worker, for persistent workers) the pass is not fixed: each
    `iter()` in worker i takes (seed, rotation, its start) from `passes[i]`, put there by the loader before
    it starts the pass. DataLoader calls `iter()` once per worker per pass, in order with the pass's
    requests (at the worker's start and at each new iteration), so each pass takes exactly its own item.
    """

    def __init__(
        self,
        spec: _StreamSpec,
        seed: int = 0,
        rotation: int = 0,
        starts: dict[int, dict[str, Any]] | None = None,
        passes: list[Any] | None = None,
    ) -> None:
        super().__init__()
        self.spec, self.seed = spec, seed
        self.rotation, self.starts = rotation, starts or {}
        self.passes = passes

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Not a generator itself: the pass's parameters are taken now, when DataLoader asks for the iterator.
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.passes is not None:
            seed, rotation, start = self.passes[loader_worker].get()
        else:
            seed, rotation = self.seed, self.rotation
            start = self.starts.get((loader_worker + rotation) % num_workers)
        return self._batches(seed, (loader_worker + rotation) % num_workers, num_workers, start)

    def _batches(
        self, seed: int, worker: int, num_workers: int, start: dict[str, Any] | None
    ) -> Iterator[dict[str, Any]]:
        skips = _Skips()
        stream = _WorkerStream(self.spec, seed, worker, num_workers, skips)
        if self.spec.buckets is not None:
            yield from self._bucket_batches(stream, skips, start)
            return
        if start is not None:
            stream.restore(start)
        batch: list[dict[str, Any]] = []
        for raw in stream.samples():
            sample = self._decode_or_skip(raw, stream.augment_rng(), skips)
            if sample is None:
                continue
            batch.append(sample)
            if len(batch) == self.spec.batch_size:
                yield {**self._collate(batch, skips), _STATE: _sendable(stream.state())}
                batch = []
        if batch:
            yield {**self._collate(batch, skips), _STATE: _sendable(stream.state())}
        if skips.counts:
            yield {**skips.take(), _STATE: _sendable(stream.state())}

    def _decode_or_skip(self, raw: dict[str, Any], rng: random.Random, skips: _Skips) -> dict[str, Any] | None:
        try:
            return self._decode(raw, rng)
        except _SkipSample as skip:
            key, url = str(raw.get("__key__")), str(raw.get("__url__"))
            skips.add(skip.reason, url, key, skip.detail)
            _warn(f"skipping sample {key} in {url}: {skip.reason} {skip.detail}", skip.reason)
            return None

    def _bucket_batches(
        self, stream: _WorkerStream, skips: _Skips, start: dict[str, Any] | None
    ) -> Iterator[dict[str, Any]]:
        """One-bucket batches through a BucketQueue: a bucket's batch when it holds `batch_size` samples, the
        fullest bucket's as a short batch when the queue is full, what is left (fullest first) at the pass's
        end. Each item's state describes the queue too: each held sample's bucket, arrival, place and `taken`
        number, so a restored worker reads the held samples again and decodes them with the same draws."""
        queue: BucketQueue[dict[str, Any]] = BucketQueue(self.spec.batch_size, self.spec.bucket_buffer)

        def state() -> dict[str, Any]:
            return {**stream.state(), "buckets": _queue_state(queue)}

        def out(ready: tuple[Any, list[dict[str, Any]]] | None) -> Iterator[dict[str, Any]]:
            if ready is not None:
                yield {**self._collate(ready[1], skips), _STATE: _sendable(state())}

        if start is not None:
            saved = start.get("buckets") or {"arrivals": 0, "held": torch.zeros(0, 6, dtype=torch.int64), "urls": {}}
            held = [tuple(int(v) for v in row) for row in saved["held"].tolist()]
            found = stream.restore(start, [(s, m) for _, _, _, s, m, _ in held], saved["urls"])
            kept, items = [], []
            for width, height, order, shard, member, taken in held:
                raw = found.get((shard, member))
                sample = None if raw is None else self._decode_or_skip(raw, stream.augment_rng(taken), _Skips())
                if sample is not None:
                    sample.pop("bucket")
                    tag = (shard, member, taken, saved["urls"][shard])
                    kept.append(((width, height), order, tag))
                    items.append(sample)
            if len(kept) < len(held):
                logger.warning(
                    "resuming the data stream of rank %d, worker %d: %d of %d samples held for bucketed batches "
                    "found again; the shards changed since the checkpoint, so batches differ from the "
                    "uninterrupted run's", self.spec.rank, stream.worker, len(kept), len(held),
                )
            queue.restore({"arrivals": saved["arrivals"], "held": kept}, items)
        for raw in stream.samples():
            sample = self._decode_or_skip(raw, stream.augment_rng(), skips)
            if sample is None:
                continue
            tag = (*raw["__place__"], stream.taken, str(raw["__url__"]))
            yield from out(queue.put(sample.pop("bucket"), sample, tag))
            yield from out(queue.overflow())
        for ready in queue.drain():
            yield from out(ready)
        if skips.counts:
            yield {**skips.take(), _STATE: _sendable(state())}

    def _collate(self, samples: list[dict[str, Any]], skips: _Skips) -> dict[str, Any]:
        batch = _collate(samples, skips, bucketed=self.spec.buckets is not None)
        if self.spec.tokenizer is not None:  # here, in the worker: the training process only copies the ids
            batch["input_ids"] = self.spec.tokenizer(batch["caption"])
        return batch

    def _decode(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        caption = _caption(raw, self.spec.caption_key)
        if self.spec.latents:
            return self._cached(raw, caption, rng)
        spec = self.spec

        def plan_for(size: tuple[int, int]) -> CropPlan:
            # from the picture's full size, read from its header before decoding (a draft decode needs it);
            # each sample has draws of its own, so drawing before the checks below changes no other sample's
            target = (spec.resolution, spec.resolution) if spec.buckets is None else nearest_bucket(size, spec.buckets)
            return plan_cover_crop(size, target, spec.random_crop, spec.random_flip, rng)

        image, plan = self._image(raw, plan_for)
        target = plan.box[2] - plan.box[0], plan.box[3] - plan.box[1]
        cond = _cond_image(raw, spec.cond_image_key) if spec.cond_image_key else None
        seg = _seg_map(raw, spec.seg_key, spec.num_classes) if spec.seg_key else None
        sample = {"image": image, "caption": caption, "key": raw["__key__"], "bucket": target}
        if cond is not None:
            sample["cond_image"] = to_tensor(apply_crop(cond, plan))
        if seg is not None:
            labels = apply_crop(seg, plan, Image.Resampling.NEAREST)
            sample["seg"] = torch.from_numpy(np.asarray(labels).astype(np.int64))
        return sample

    def _cached(self, raw: dict[str, Any], caption: str, rng: random.Random) -> dict[str, Any]:
        spec = self.spec
        # random_flip: the moments of the plain or of the mirrored crop (ldm-cache-latents --flip encoded both;
        # latents are not mirrored, the autoencoder is not mirror-symmetric), drawn from the sample's own
        # generator as plan_cover_crop draws an image's flip; checked before the draw, both read only if chosen
        if spec.random_flip and MOMENTS_FLIP_KEY not in raw:
            raise _SkipSample("no cached mirrored latents", f"(no {MOMENTS_FLIP_KEY!r}: cached without --flip; keys {sorted(raw)})")
        if spec.random_flip and spec.cond_image_key and COND_MOMENTS_FLIP_KEY not in raw:
            what = "cached mirrored conditioning latents"
            raise _SkipSample(f"no {what}", f"(no {COND_MOMENTS_FLIP_KEY!r}: cached without --flip; keys {sorted(raw)})")
        flip = spec.random_flip and rng.random() < 0.5
        moments = _moments(raw, MOMENTS_FLIP_KEY if flip else MOMENTS_KEY, "latents", "not a shard of ldm-cache-latents")
        # (width, height) of the latent: bucketed caches (ldm-cache-latents --buckets) hold several
        sample = {"moments": moments, "caption": caption, "key": raw["__key__"],
                  "bucket": (moments.shape[2], moments.shape[1])}
        if spec.cond_image_key:
            what = "cached conditioning latents"
            cond = _moments(raw, COND_MOMENTS_FLIP_KEY if flip else COND_MOMENTS_KEY, what, "cached without --cond-image-key")
            if cond.shape != moments.shape:
                shapes = f"(shape {tuple(cond.shape)}, latents {tuple(moments.shape)})"
                raise _SkipSample(f"unreadable {what}", shapes)
            sample["cond_moments"] = cond
        if spec.seg_key:
            labels = _seg_map(raw, spec.seg_key, spec.num_classes)
            if spec.buckets is not None:  # the map was cropped to its latent's bucket: the same aspect
                if labels.size[0] * moments.shape[1] != labels.size[1] * moments.shape[2]:
                    size = f"({labels.size[0]}x{labels.size[1]}, latents {moments.shape[2]}x{moments.shape[1]})"
                    raise _SkipSample("segmentation map of another shape than its latents", size)
            elif labels.size != (spec.resolution, spec.resolution):
                # cropped when caching: another size means shards cached at another resolution
                size = f"({labels.size[0]}x{labels.size[1]}, resolution {spec.resolution})"
                raise _SkipSample("segmentation map of another size", size)
            if flip:  # a label map is pixels: mirrored here, as its picture was when cached (one copy stored)
                labels = labels.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            sample["seg"] = torch.from_numpy(np.asarray(labels).astype(np.int64))
        if spec.text:
            sample["context"] = _context(raw)
        return sample

    def _image(
        self, raw: dict[str, Any], plan_for: Callable[[tuple[int, int]], CropPlan]
    ) -> tuple[torch.Tensor, CropPlan]:
        """The sample's picture resized, cropped and flipped as `plan_for(its upright size)` says, as a 3xHxW
        tensor in [-1, 1], decoded by `spec.decoder`; and the plan (its conditioning follows it).

        Every decoder reads the header with PIL (size, EXIF orientation, the checks), turns the picture upright
        and composites transparency as `to_rgb` does; a JPEG torchvision refuses is decoded by PIL, so every
        decoder skips the samples "pil" skips, for the same reasons."""
        key = next((k for k in IMAGE_KEYS if k in raw), None)
        if key is None:
            raise _SkipSample("no image", f"(no {', '.join(IMAGE_KEYS)} member; keys {_members(raw)})")
        data, decoder = raw[key], self.spec.decoder
        try:
            with open_picture(data) as image:  # reads the header only
                if min(image.size) < self.spec.min_size:
                    raise _SkipSample(
                        "too small", f"({image.size[0]}x{image.size[1]} < {self.spec.min_size})"
                    )
                turn = exif_orientation(image)  # a PNG decodes here (its EXIF may follow its pixels)
                plan = plan_for(upright_size(image.size, turn))
                # an extreme aspect ratio crops before it resizes (apply_crop): PIL's path under every decoder
                jpeg = image.format == "JPEG" and not crops_first(plan)
                if decoder == "torchvision" and jpeg and image.mode in ("RGB", "L"):
                    tensor = _torchvision_crop(data, plan, turn)
                    if tensor is not None:
                        return tensor, plan
                if decoder == "pil_draft" and jpeg:
                    # libjpeg decodes at the smallest DCT scale (1/8, 1/4, 1/2) still >= the planned size on
                    # both sides (of the stored picture: turned upright after); apply_crop then resizes that to
                    # the planned size, as it does the full picture
                    image.draft("RGB", upright_size(plan.size, turn))
                rgb = to_rgb(image, turn)  # decodes fully: truncated files fail here
        except _SkipSample:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever a malformed picture makes PIL raise: skipped
            raise _SkipSample(*_image_error(exc, data)) from exc
        return to_tensor(apply_crop(rgb, plan)), plan


def _torchvision_crop(data: bytes, plan: CropPlan, orientation: int = 1) -> torch.Tensor | None:
    """A JPEG decoded by torchvision.io (libjpeg-turbo), turned upright by its EXIF `orientation` (PIL's
    reading of it: `exif_orientation`), resized to the plan's size (bicubic with antialias, PIL's filter),
    cropped and flipped as planned: `to_tensor(apply_crop(...))`'s tensor within a rounding. None where
    torchvision cannot decode it ("Image is incomplete or truncated", "Not a JPEG file: ..."): PIL decides."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    try:
        image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return None
    image = turn_upright(image, orientation)
    width, height = plan.size
    if tuple(image.shape[1:]) != (height, width):
        image = F.resize(image, [height, width], interpolation=InterpolationMode.BICUBIC, antialias=True)
    left, top, right, bottom = plan.box
    image = image[:, top:bottom, left:right]
    if plan.flip:
        image = image.flip(-1)
    return image.float().div(127.5).sub(1.0)


def turn_upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A ...xHxW tensor of a picture's stored pixels turned as PIL turns them for EXIF `orientation`
    (transforms.UPRIGHT: 2 mirror, 3 half turn, 4 flip, 5 transpose, 6 quarter turn clockwise, 7 transverse,
    8 anticlockwise)."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(-1, -2)  # 5; then 6: + mirror, 7: + half turn, 8: + flip
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    if orientation in (2, 3):
        image = image.flip(-1)
    if orientation in (3, 4):
        image = image.flip(-2)
    return image


def _image_error(exc: BaseException, data: bytes) -> tuple[str, str]:
    """The skip reason and detail for a picture PIL cannot read."""
    if isinstance(exc, (PictureTooLarge, Image.DecompressionBombError)):
        return "image too large", f"({exc})"
    if isinstance(exc, UnidentifiedImageError):  # no format it may be read as recognises the bytes
        return "not an image", f"({len(data)} bytes: {data[:16]!r}...)" if data else "(0 bytes: an empty file)"
    if "truncated" in str(exc).lower():  # "image file is truncated", "Truncated File Read"
        return "truncated image", f"({exc})"
    return "unreadable image", f"({type(exc).__name__}: {exc})"


def _cond_image(raw: dict[str, Any], key: str) -> Image.Image:
    data = raw.get(key)
    if data is None:
        raise _SkipSample("no conditioning image", f"(no {key!r}; keys {_members(raw)})")
    try:
        return load_rgb(data)  # upright, transparency on white: as its image
    except Exception as exc:  # noqa: BLE001 - any malformed picture: skipped
        reason, detail = _image_error(exc, data)
        raise _SkipSample("unreadable conditioning image", f"({reason}: {detail[1:-1]})") from exc


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


def _cached_array(raw: dict[str, Any], key: str, what: str, why_missing: str, axes: tuple[str, ...]) -> torch.Tensor:
    """A cached .npy member as float32 with one dimension per name in `axes`; a missing or unreadable one
    skips the sample, naming `what` and, when missing, `why_missing`."""
    data = raw.get(key)
    if data is None:
        raise _SkipSample(f"no {what}", f"(no {key!r}: {why_missing}; keys {sorted(raw)})")
    try:
        array = np.load(BytesIO(data), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise _SkipSample(f"unreadable {what}", f"({exc})") from exc
    if array.ndim != len(axes):
        raise _SkipSample(f"unreadable {what}", f"(shape {array.shape}, expected {' x '.join(axes)})")
    return torch.from_numpy(array.astype(np.float32, copy=False))


def _moments(raw: dict[str, Any], key: str, what: str, why_missing: str) -> torch.Tensor:
    return _cached_array(raw, key, what, why_missing, ("channels", "height", "width"))


def _context(raw: dict[str, Any]) -> torch.Tensor:
    """A caption's cached text-encoder output, tokens x width, as float32."""
    return _cached_array(raw, CONTEXT_KEY, "cached text context", "cached without --text", ("tokens", "width"))


def _collate(samples: list[dict[str, Any]], skips: _Skips, bucketed: bool = False) -> dict[str, Any]:
    tensors = [k for k in ("moments", "cond_moments", "image", "cond_image", "seg", "context") if k in samples[0]]
    if "moments" in samples[0] and not bucketed:
        shapes = sorted({tuple(s["moments"].shape) for s in samples})
        if len(shapes) > 1:
            raise ValueError(
                f"cached latents of several shapes {shapes} (shards written by ldm-cache-latents --buckets): "
                "train on them with data.buckets=true"
            )
    return {
        **{k: torch.stack([s[k] for s in samples]) for k in tensors},
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        **skips.take(),
    }


def _queue_state(queue: BucketQueue[Any]) -> dict[str, Any]:
    """A BucketQueue's `state()`, small: one int64 row (bucket width, height, arrival, shard, sample number,
    taken) per held sample, 48 bytes, and the urls of their shards; no image."""
    state = queue.state()
    rows = [(*bucket, order, shard, member, taken) for bucket, order, (shard, member, taken, _) in state["held"]]
    urls = {shard: url for _, _, (shard, _, _, url) in state["held"]}
    held = torch.tensor(rows, dtype=torch.int64).reshape(-1, 6)
    return {"arrivals": state["arrivals"], "held": held, "urls": urls}


def _fold_skips(
    batch: dict[str, Any], counts: Counter[str], dropped: list[tuple[str, str, str, str]]
) -> dict[str, Any]:
    """`batch` with the skips that came without a batch (workers' trailing items) added to its own."""
    if counts:
        batch["skipped"] = dict(Counter(batch["skipped"]) + counts)
        batch["dropped"] = [*batch.get("dropped", []), *dropped]
    return batch


POSITION = "stream_position"  # in training batches: where the stream stands after this batch (see ShardLoader)


class ShardLoader:
    """Iterable of batches over a shard stream; Lightning takes any iterable as a dataloader.

    Each `iter()` is one epoch over a freshly seeded stream. With `epoch_length` the stream is repeated
    (new seed each pass) and cut at exactly that many batches. With `persistent=True` (the training loader)
    and workers, one DataLoader with persistent workers serves every pass of the run: a pass hands each
    worker its seed and start through a queue (see `_ShardStream`), so no pass waits for workers to start
    and import torch again, and the batches are those of a fresh DataLoader per pass, item for item.
    Otherwise each pass gets a DataLoader of its own.

    With `track=True` (the training loader) each batch carries under `POSITION` where the stream stands once
    that batch is trained on. The loader reads ahead (it holds a batch until the next item, DataLoader
    workers prefetch, so does Lightning), so whoever trains says which batch it took: `consumed(position)`
    (WebDataModule does, as the batch reaches the model). `resume`, set to such a position, makes the next
    `iter()` go on right after that batch.
    """

    def __init__(
        self,
        spec: _StreamSpec,
        num_workers: int,
        seed: int,
        epoch_length: int | None = None,
        clock: Callable[[], tuple[int, int] | None] = lambda: None,
        skipped: Counter[str] | None = None,
        track: bool = False,
        batches_done: Callable[[], int | None] = lambda: None,
        persistent: bool = False,
    ) -> None:
        self.spec, self.num_workers, self.seed = spec, num_workers, seed
        self.persistent = persistent and num_workers > 0
        self._loader: DataLoader | None = None  # the persistent one, made at the first pass
        self._pass_queues: list[Any] = []
        self.epoch_length = epoch_length
        self.clock = clock
        self.skipped: Counter[str] = Counter() if skipped is None else skipped
        self.track, self.batches_done = track, batches_done
        self.resume: dict[str, Any] | None = None
        self.position: dict[str, Any] | None = None  # of the last batch trained on
        self._iterations = 0
        self._serial = 0
        self._unconsumed: deque[tuple[int, Counter[str]]] = deque(maxlen=64)  # (serial, skips) handed out, not taken

    def __len__(self) -> int:
        if self.epoch_length is None:
            raise TypeError("a shard stream without epoch_length has no length")
        return self.epoch_length

    # Lightning's protocol for resumable loaders: without it Lightning warns that a mid-epoch resume is
    # unreliable. What Lightning keeps of it is rank 0's alone, so the position of every rank goes in
    # WebDataModule's state instead.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass

    def consumed(self, position: dict[str, Any]) -> None:
        """The batch that carried `position` is being trained on."""
        self.position = position
        while self._unconsumed and self._unconsumed[0][0] <= position["serial"]:
            self._unconsumed.popleft()

    def unconsumed_skips(self) -> Counter[str]:
        """Skips of the batches handed out (and counted in `skipped`) that training has not taken yet."""
        total: Counter[str] = Counter()
        for _, counts in self._unconsumed:
            total.update(counts)
        return total

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start = self._take_resume()
        if start is None:
            # Seeded by the global step the pass starts at (not the epoch: without a known length Lightning
            # asks for the next epoch's iterator before it counts the epoch), so a run resumed at an epoch
            # boundary reads the order an uninterrupted run reads.
            clock = self.clock()
            origin = clock[1] if clock is not None else self._iterations
            first_pass, done, within = 0, 0, None
        else:
            # mid-epoch: the pass the saved batch came from, right after it
            origin, first_pass, done = int(start["origin"]), int(start["pass"]), int(start["batches"])
            within = None if start["final"] else start
            if start["final"]:
                if self.epoch_length is None:
                    return  # that batch ended the epoch; Lightning has not counted the epoch's end yet
                first_pass += 1
        self._iterations += 1
        passes = self._passes(origin, first_pass, done, within)
        try:
            yield from passes if self.epoch_length is None else itertools.islice(passes, self.epoch_length - done)
        finally:
            passes.close()  # shuts the DataLoader's workers down now, not whenever garbage is collected

    def _take_resume(self) -> dict[str, Any] | None:
        saved, self.resume = self.resume, None
        if saved is None:
            return None
        done = self.batches_done()  # the batches of this epoch Lightning has already trained on
        if done == 0 or (self.epoch_length is not None and saved["batches"] >= self.epoch_length):
            return None  # the saved batch ended its epoch: this is the next one
        if done is not None and done != saved["batches"]:
            logger.warning(
                "the checkpoint's training loop is at batch %d of its epoch but its data stream after batch %d: "
                "the stream starts anew (another order than the uninterrupted run's)",
                done,
                saved["batches"],
            )
            return None
        return saved

    def _passes(
        self, origin: int, first_pass: int, done: int, within: dict[str, Any] | None
    ) -> Iterator[dict[str, Any]]:
        for pass_index in itertools.count(first_pass):
            start, within = within, None
            produced = 0
            for batch in self._one_pass(origin, pass_index, done, start):
                produced += 1
                done += 1
                yield batch
            if produced == 0 and start is None:
                raise RuntimeError(
                    f"no usable samples in {len(self.spec.urls)} shard(s) ({self.spec.urls[0]}, ...); "
                    f"skipped so far: {dict(self.skipped) or 'none'}. Check caption_key={self.spec.caption_key!r}"
                    f" and min_size={self.spec.min_size}, and that this rank has shards."
                )
            if self.epoch_length is None:
                return

    def _one_pass(
        self, origin: int, pass_index: int, done: int, start: dict[str, Any] | None
    ) -> Iterator[dict[str, Any]]:
        """One pass's batches, from its beginning or (`start`) right after a batch of an earlier run of it."""
        # Each worker's position, as of the items received so far; a resumed pass starts from the saved ones,
        # and its DataLoader starts at the worker whose turn it was (DataLoader takes the workers' items in
        # turn, skipping those that have ended, so the order goes on as it would have).
        workers: dict[int, dict[str, Any]] = dict(start["workers"]) if start else {}
        rotation = int(start["next_worker"]) if start else 0
        seed = _mix_seed(self.seed, origin, pass_index)
        if self.persistent:
            loader = self._persistent_loader()
            for loader_worker, passes in enumerate(self._pass_queues):
                passes.put((seed, rotation, workers.get((loader_worker + rotation) % self.num_workers)))
        else:
            loader = self._data_loader(_ShardStream(self.spec, seed, rotation, workers))
        # Each batch is held until the next item arrives, so that skips coming after it without a batch
        # (a worker's trailing item) ride on it: none is lost after the last batch, nor when an
        # `epoch_length` cut stops reading after some batch.
        held: dict[str, Any] | None = None
        counts: Counter[str] = Counter()
        dropped: list[tuple[str, str, str, str]] = []
        for item in loader:
            state = _received(item.pop(_STATE))
            if "key" not in item:  # a trailing item: only skips
                counts.update(item["skipped"])
                dropped += item.get("dropped", [])
                workers[state["worker"]] = state
                continue
            if held is not None:
                done += 1
                where = (origin, pass_index, done, state["worker"], False)
                yield self._hand_out(_fold_skips(held, counts, dropped), where, workers)
                counts, dropped = Counter(), []
            held = item
            workers[state["worker"]] = state
        if held is not None:
            done += 1
            yield self._hand_out(_fold_skips(held, counts, dropped), (origin, pass_index, done, 0, True), workers)
        else:
            self.skipped.update(counts)  # a pass without a single batch (an error follows): counted still

    def _data_loader(self, dataset: _ShardStream, persistent: bool = False) -> DataLoader:
        # pinned on a GPU machine: Lightning's copy to the device is non_blocking, and from pinned memory
        # it does not wait for the device either
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=persistent,
        )

    def _persistent_loader(self) -> DataLoader:
        if self._loader is None:
            self._pass_queues = [torch.multiprocessing.SimpleQueue() for _ in range(self.num_workers)]
            self._loader = self._data_loader(_ShardStream(self.spec, passes=self._pass_queues), persistent=True)
        return self._loader

    def close(self) -> None:
        """Stop the persistent workers (the end of the run); a later pass starts new ones."""
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._pass_queues = []

    def _hand_out(
        self, batch: dict[str, Any], where: tuple[int, int, int, int, bool], workers: dict[int, dict[str, Any]]
    ) -> dict[str, Any]:
        self.skipped.update(batch["skipped"])
        if self.track:
            origin, pass_index, done, next_worker, final = where
            self._serial += 1
            self._unconsumed.append((self._serial, Counter(batch["skipped"])))
            batch[POSITION] = {
                "serial": self._serial,
                "origin": origin,  # the global step (or iteration) the epoch's stream was seeded with
                "pass": pass_index,  # passes in the epoch before this batch's (epoch_length repeats the stream)
                "batches": done,  # batches of the epoch up to this one
                "final": final,  # the pass's last batch
                "next_worker": next_worker,  # whose turn it is next
                "workers": dict(workers),  # each worker's position after its items up to here
            }
        return batch


def _gather_over_ranks(value: Any, world_size: int) -> list[Any]:
    """Every rank's `value`, in rank order (every rank calls this)."""
    if world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [value]
    values: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(values, value)
    return values


def workers_can_take(tokenizer: Callable[[list[str]], torch.Tensor], num_workers: int) -> bool:
    """Whether DataLoader workers get this tokenizer: always when forked (or with none), else only if it pickles."""
    if num_workers > 0 and torch.multiprocessing.get_start_method(allow_none=True) not in (None, "fork"):
        try:
            pickle.dumps(tokenizer)
        except (pickle.PicklingError, TypeError, AttributeError):
            return False
    return True


def _check_decoder(decoder: str) -> None:
    if decoder not in DECODERS:
        raise ValueError(f"data.decoder must be one of {', '.join(DECODERS)}; got {decoder!r}")
    if decoder == "torchvision":
        try:
            import torchvision.io  # noqa: F401
            import torchvision.transforms.v2  # noqa: F401
        except ImportError as exc:
            raise ValueError(f"data.decoder=torchvision needs torchvision ({exc}): install it, or use pil_draft") from exc


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


def _check_buckets(
    resolution: int, step: int, max_ratio: float, buffer: int | None,
    name: Callable[[str], str] = lambda setting: f"data.{setting}",
) -> list[Bucket]:
    """The buckets of data.buckets=true, or a one-line ValueError naming the setting to fix (`name` spells
    a setting as the caller's user sets it: `data.bucket_step` here, `--bucket-step` in ldm-cache-latents)."""
    if step <= 0 or step % 8:
        raise ValueError(f"{name('bucket_step')}={step} must be a positive multiple of 8 (the VAE downsamples 8x), e.g. 64")
    if resolution % step:
        raise ValueError(
            f"{name('resolution')}={resolution} is not a multiple of {name('bucket_step')}={step}: buckets are "
            f"multiples of the step around resolution², so set {name('bucket_step')} to a divisor of it "
            f"(e.g. {math.gcd(resolution, 64)})"
        )
    if max_ratio < 1:
        raise ValueError(f"{name('bucket_max_ratio')}={max_ratio} must be >= 1 (the long side over the short side), e.g. 2.0")
    if buffer is not None and buffer < 1:
        raise ValueError(f"{name('bucket_buffer')}={buffer} must be a positive number of pictures, or null (one batch per bucket)")
    return bucket_sizes(resolution, step, max_ratio)


def _local_folders(urls: Sequence[str]) -> set[str]:
    return {os.path.dirname(u.removeprefix("file:")) for u in urls if "://" not in u and not u.startswith("pipe:")}


def cache_folder(urls: Sequence[str]) -> str | None:
    """The folder whose `cache.json` describes these local latent shards (None for remote shards or none found)."""
    for folder in sorted(_local_folders(urls)):
        if os.path.isfile(os.path.join(folder or ".", CACHE_INFO)):
            return folder or "."
    return None


def read_cache_info(urls: Sequence[str]) -> dict[str, Any] | None:
    """`cache.json` beside local latent shards (None for remote shards or shards without one). A ValueError for
    shards beside the marker of a cut-off ldm-cache-latents run (`cache.incomplete.json`): only some are there."""
    for folder in sorted(_local_folders(urls)):
        marker = os.path.join(folder or ".", CACHE_INCOMPLETE)
        if os.path.isfile(marker):
            raise ValueError(
                f"{folder or '.'} holds a latent cache that was cut off before it finished ({marker} is there, "
                "so only some of its shards are): run the same ldm-cache-latents command again with --resume"
            )
    folder = cache_folder(urls)
    if folder is None:
        return None
    with open(os.path.join(folder, CACHE_INFO)) as f:
        return json.load(f)


def uses_cached_text(cached_text: bool | None, info: dict[str, Any] | None) -> bool:
    """Whether training takes the text contexts cached with `ldm-cache-latents --text` instead of running the
    text encoder: data.cached_text, or (null) whenever the shards' cache.json records them."""
    recorded = bool(info and info.get("text"))
    if cached_text is None:
        return recorded
    if cached_text and not recorded:
        raise ValueError(
            "data.cached_text=true but data.train_shards hold no cached text contexts (their cache.json records "
            "none): re-run ldm-cache-latents with --text, or set data.cached_text=null to encode the captions"
        )
    return bool(cached_text)


def read_empty_context(urls: Sequence[str], info: dict[str, Any]) -> torch.Tensor:
    """The empty prompt's cached text context (tokens x width, float32), which caption dropout puts in."""
    folder, name = cache_folder(urls), info["text"]["empty_context"]
    path = os.path.join(folder or ".", name)
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: the empty prompt's cached text context cannot be read ({exc}); re-run ldm-cache-latents --text") from exc
    return torch.from_numpy(array.astype(np.float32, copy=False))


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
        buckets: bool = False,
        bucket_step: int = 64,
        bucket_max_ratio: float = 2.0,
        bucket_buffer: int | None = None,
        cached_text: bool | None = None,
        decoder: str = "pil",
    ) -> None:
        super().__init__()
        _check_decoder(decoder)
        if cached_text and not latents:
            raise ValueError(
                "data.cached_text=true takes the text contexts of latent shards (ldm-cache-latents --text): "
                "use data=cached_latents, or set data.cached_text=null"
            )
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
        # cached latents were cropped to their buckets when cached: batches group by the latents' shape
        self.bucket_list: list[Bucket] | None = None
        if buckets:
            self.bucket_list = [] if latents else _check_buckets(resolution, bucket_step, bucket_max_ratio, bucket_buffer)
        self.buckets, self.bucket_step, self.bucket_max_ratio = bool(buckets), bucket_step, bucket_max_ratio
        # None: one batch per bucket, which never forces a short batch (a bucket's batch goes out as soon as it
        # holds batch_size pictures, so a worker holds at most batch_size - 1 per bucket); unbounded for latents
        if bucket_buffer is None and self.bucket_list:
            bucket_buffer = batch_size * len(self.bucket_list)
        self.bucket_buffer = bucket_buffer
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.num_workers, self.resolution = batch_size, num_workers, resolution
        self.random_crop, self.random_flip = random_crop, random_flip
        self.caption_key, self.min_size, self.shuffle_buffer = caption_key, min_size, shuffle_buffer
        self.resampled, self.epoch_length, self.seed = resampled, epoch_length, seed
        self.latents = latents
        # cached text contexts (ldm-cache-latents --text): True/False, or None for whatever cache.json records;
        # settled at setup(), when `text_contexts` says whether training batches carry `context` and
        # `empty_context` (tokens x width) is the empty prompt's, for the rows caption dropout blanks
        self.cached_text = cached_text
        self.text_contexts = False
        self.empty_context: torch.Tensor | None = None
        # webdataset lower-cases extensions, so "SRC.JPG" would never match
        self.cond_image_key = cond_image_key.lower() if cond_image_key else None
        self.seg_key = seg_key.lower() if seg_key else None
        self.num_classes = num_classes
        self.decoder = decoder
        self.skipped_samples: Counter[str] = Counter()
        self._train_urls: list[str] | None = None
        self._val_urls: list[str] | None = None
        self._train_loader: ShardLoader | None = None
        self._saved_streams: dict[str, Any] | None = None  # from a checkpoint, for the next train_dataloader()
        self.tokenizer: Callable[[list[str]], torch.Tensor] | None = None

    def tokenize_with(self, tokenizer: Callable[[list[str]], torch.Tensor]) -> bool:
        """Tokenize captions in the loader's workers with the training model's own tokenizer (the same
        object, so the same ids): batches get `input_ids` beside `caption`. Returns whether it will: a
        tokenizer that cannot be pickled reaches workers only where they are forked."""
        if not workers_can_take(tokenizer, self.num_workers):
            return False
        self.tokenizer = tokenizer
        return True

    def setup(self, stage: str | None = None) -> None:
        self._train_urls = expand_shard_specs(self.train_shards)
        self._val_urls = expand_shard_specs(self.val_shards) if self.val_shards is not None else None
        if self.latents:
            info = read_cache_info(self._train_urls)
            self.text_contexts = uses_cached_text(self.cached_text, info)
            self.empty_context = read_empty_context(self._train_urls, info) if self.text_contexts and info else None
        _, world_size = self._rank_and_world_size()
        if not self.resampled and len(self._train_urls) < world_size:
            raise ValueError(
                f"{len(self._train_urls)} training shard(s) for {world_size} ranks: each rank needs at least one. "
                "Write more, smaller shards (ldm-shards --samples-per-shard N; the demo's data: data.samples_per_shard=N), "
                "or draw shards with replacement: data.resampled=true data.epoch_length=STEPS"
            )
        if world_size > 1 and self.epoch_length is None:
            logger.warning(
                "training on %d ranks without epoch_length: ranks whose shards hold fewer samples finish "
                "the epoch first and DDP may hang; set data.epoch_length (and data.resampled=true)",
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
            # training only: validation's val/loss encodes its captions (its shards may be cached without --text)
            text=self.text_contexts and train,
            cond_image_key=self.cond_image_key,
            seg_key=self.seg_key,
            num_classes=self.num_classes,
            buckets=None if self.bucket_list is None else tuple(self.bucket_list),
            bucket_buffer=self.bucket_buffer,
            tokenizer=None if self.text_contexts and train else self.tokenizer,  # no text encoder reads the ids
            decoder=self.decoder,
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

    def _batches_done(self) -> int | None:
        """Batches of the current epoch the trainer has trained on (restored from a checkpoint, on resume)."""
        loop = getattr(getattr(self.trainer, "fit_loop", None), "epoch_loop", None)
        return None if loop is None else int(loop.batch_progress.current.ready)

    def train_dataloader(self) -> ShardLoader:
        loader = ShardLoader(
            self._spec(self._train_urls, train=True),
            self.num_workers,
            self.seed,
            self.epoch_length,
            clock=self._trainer_clock,
            skipped=self.skipped_samples,
            track=True,
            batches_done=self._batches_done,
            persistent=True,
        )
        loader.resume = self._saved_position()
        if self._train_loader is not None:
            self._train_loader.close()
        self._train_loader = loader
        return loader

    def teardown(self, stage: str) -> None:
        if self._train_loader is not None:
            self._train_loader.close()

    def val_dataloader(self) -> ShardLoader | list:
        if self.val_shards is None:
            return []
        return ShardLoader(
            self._spec(self._val_urls, train=False), self.num_workers, self.seed, skipped=self.skipped_samples
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this for each batch it is about to train on (not the ones it prefetched):
        # where the stream stands after it is what a checkpoint written after this step saves.
        if isinstance(batch, dict) and POSITION in batch:
            position = batch.pop(POSITION)
            if self._train_loader is not None:
                self._train_loader.consumed(position)
        return batch

    def _stream_settings(self) -> dict[str, Any]:
        """What a saved stream position is only valid for."""
        _, world_size = self._rank_and_world_size()
        urls = "\n".join(self._train_urls or [])
        settings: dict[str, Any] = {
            "shards": hashlib.sha256(urls.encode()).hexdigest()[:16],
            "num_shards": len(self._train_urls or []),
            "world_size": world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "shuffle_buffer": self.shuffle_buffer,
            "resampled": self.resampled,
            "epoch_length": self.epoch_length,
            "seed": self.seed,
        }
        if self.buckets:  # only then: a checkpoint from before buckets existed still resumes without them
            settings["buckets"] = [self.bucket_step, self.bucket_max_ratio, self.bucket_buffer]
        return settings

    def _saved_position(self) -> dict[str, Any] | None:
        """This rank's position from the checkpoint being resumed, if the stream it came from is this one."""
        saved, self._saved_streams = self._saved_streams, None
        if not saved:
            return None
        settings = self._stream_settings()
        changed = {k: (saved["settings"].get(k), v) for k, v in settings.items() if saved["settings"].get(k) != v}
        if changed:
            listed = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            logger.warning(
                "the data stream differs from the checkpoint's (%s): a mid-epoch resume reads another order "
                "than the uninterrupted run would",
                listed,
            )
            return None
        rank, _ = self._rank_and_world_size()
        return saved["positions"][rank]

    def state_dict(self) -> dict[str, Any]:
        """Skip counts up to the batch trained on last, and every rank's stream position after that batch.

        Every rank calls this when a checkpoint is written (Lightning's dump_checkpoint); the positions are
        gathered from all ranks into the file rank 0 writes."""
        skipped = Counter(self.skipped_samples)
        position = None
        if self._train_loader is not None and self._train_loader.position is not None:
            skipped -= self._train_loader.unconsumed_skips()  # handed out but not trained on: counted again
            position = {k: v for k, v in self._train_loader.position.items() if k != "serial"}
        _, world_size = self._rank_and_world_size()
        positions = _gather_over_ranks(position, world_size)
        state: dict[str, Any] = {"skipped_samples": dict(skipped)}
        if any(p is not None for p in positions):
            state["streams"] = {"settings": self._stream_settings(), "positions": positions}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_samples.clear()
        self.skipped_samples.update(state_dict.get("skipped_samples", {}))
        self._saved_streams = state_dict.get("streams")

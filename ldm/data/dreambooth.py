"""DreamBooth training data (issue 11, item 1): a few pictures of one subject or style, and, for prior
preservation, the base model's own pictures of the subject's class.

    dm = DreamBoothDataModule("dog/", instance_prompt="a photo of sks dog", resolution=512,
                              class_prompt="a photo of dog", num_class_images=200)

`instance_dir` holds the pictures (jpg, jpeg, png, webp, bmp, gif, tif, tiff, ppm; a GIF's or TIFF's first frame); `NAME.txt` beside `NAME.jpg` is its caption,
otherwise `instance_prompt` is. With `class_prompt`, `setup("fit")` makes (once, cached: see
`ldm.dreambooth.class_images`) `num_class_images` pictures of the class prompt with the BASE weights, the
LightningModule's `init_from`, so a resumed run and a later run from the same base find them in `class_cache`.

Batches: `image` float32 Bx3xHxW in [-1, 1], `caption` list[str], `prior` bool B (True for class rows): the
`batch_size` instance rows first, then (prior preservation) `batch_size` class rows, as diffusers'
train_dreambooth.py concatenates them; `input_ids` too when the model tokenizes in the loader's workers
(`tokenize_with`). LatentDiffusion's `prior_loss_weight` weighs the class rows' loss.

The stream is endless (DreamBooth trains for a number of steps over a handful of pictures, cycled) and its
sample k (k counts samples over the whole run, all ranks) is a pure function of (seed, k): it is picture
`perm_e[k % N]` of N, where `perm_e` is a permutation seeded by (seed, e = k // N), resized so its shorter
side is `resolution` and cropped (centre, or at random) and flipped with draws seeded by (seed, k); class
samples likewise, by their own seeds. Rank r's b-th batch holds samples `(b * world_size + r) * batch_size
+ j`: ranks take disjoint slices of each global batch. The loader starts at batch `global_step *
accumulate_grad_batches` of the trainer, so a run resumed from a checkpoint (`ckpt_path=last`) reads
exactly the samples the uninterrupted run reads, with no data state in the checkpoint.

Pictures smaller than `resolution` (with buckets: than their bucket) are upscaled and trained on, never
skipped (a DreamBooth folder is a handful of pictures: each one counts); setup warns with their number.
Pictures are read as the WebDataset loader reads them (ldm.data.transforms.load_rgb: turned upright by their
EXIF orientation, and bucketed by that size; transparency composited onto white; 16-bit greys scaled). One that
cannot be read (truncated, not a picture, a decompression bomb) or a caption file that is not UTF-8 stops setup
with a UsageError naming the file, rather than training on fewer pictures than the folder holds.

Aspect-ratio buckets (`buckets=True`, with `bucket_step`, `bucket_max_ratio`; kohya's sd-scripts bucket
DreamBooth pictures so): each instance picture belongs to the bucket of nearest aspect ratio among the
WebDataset loader's buckets for the same settings (`ldm.data.buckets.bucket_sizes`, `nearest_bucket`; at
512: 512x512, 576x448, 640x384 and their transposes), is cover-resized and cropped to it (centre, or at
random) and flipped as above, and every batch holds one bucket. Batch b of rank r is global batch q = b *
world_size + r, still a pure function of (seed, q): position q mod N of cycle q // N, where a cycle is
`batch_size` passes over the N pictures, N batches. Bucket g, of n_g pictures, has n_g of a cycle's batches,
cut in order from `batch_size` permutations of its own pictures laid end to end (seeded by (seed, cycle);
where a batch spans two permutations, the second puts the pictures the batch already holds after the
others); the cycle's N batches then go in a seeded random order. So no batch is short or filled with another
bucket's pictures, none holds a picture twice unless its bucket has fewer than `batch_size` pictures (it then
repeats its own, with their own crops and flips), each bucket's share of batches (and samples) is its share
of pictures, exactly, in every cycle, and each picture is shown `batch_size` times a cycle, as once a pass
without buckets. Ranks take disjoint batches; each rank's batch is of one bucket, but ranks may train
different buckets in the same step (DDP averages gradients, not shapes). The crops and flips of row j, and
the class picture beside it, are those of sample k = q * batch_size + j, seeded as without buckets.
Prior preservation's class rows share the tensor of the batch's instance rows, so they take its shape: the
(square, `resolution`) class pictures are cover-resized and centre-cropped to the batch's bucket (one
trained at 640x384 loses strips at its top and bottom; sampling the class pictures at each bucket's shape
would keep them whole, and is not done).
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ldm.cli.sample import UsageError
from ldm.data.buckets import Bucket, nearest_bucket
from ldm.data.transforms import apply_crop, decode_text, load_rgb, plan_cover_crop, to_tensor
from ldm.data.webdataset import _check_buckets, _mix_seed

logger = logging.getLogger(__name__)

PICTURE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
MANY_TOKENS = 3  # a trigger word of this many CLIP tokens or more gets a warning
_INSTANCE, _CLASS = 0, 1  # the two sample streams' seeds
NO_BASE = ("prior preservation samples the base model: set module.init_from=... (init_from=, the checkpoint you "
           "fine-tune), or data.class_prompt= (empty) to train without class pictures")


def instance_pictures(folder: Path) -> list[Path]:
    """The pictures in `folder` (not its subfolders), by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PICTURE_SUFFIXES)


def trigger_words(instance_prompt: str, class_prompt: str | None) -> list[str]:
    """The words of the instance prompt that name the subject: those the class prompt lacks ("sks" of "a
    photo of sks dog" against "a photo of dog"), or every word without a class prompt."""
    words = re.findall(r"[\w'-]+", instance_prompt.lower())
    known = set(re.findall(r"[\w'-]+", (class_prompt or "").lower()))
    return list(dict.fromkeys(w for w in words if w not in known))


def token_count(tokenizer: Callable[[list[str]], torch.Tensor], word: str) -> int | None:
    """How many tokens `word` is, between the tokenizer's start and end tokens (None: cannot tell)."""
    eot = getattr(tokenizer, "eot_id", None)
    if eot is None:
        return None
    ids = tokenizer([word])[0].tolist()
    return ids.index(eot, 1) - 1 if eot in ids[1:] else None


class _Pictures:
    """One stream of samples over a fixed set of pictures: sample k is a pure function of (seed, k)."""

    def __init__(self, pictures: list[Image.Image] | list[Path], captions: list[str], seed: int, stream: int,
                 resolution: int, random_crop: bool, random_flip: bool) -> None:
        self.pictures, self.captions = pictures, captions
        self.seed, self.stream = seed, stream
        self.resolution, self.random_crop, self.random_flip = resolution, random_crop, random_flip
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.pictures)

    def index(self, k: int) -> int:
        """Which picture sample k is: a new permutation each pass over the set."""
        n = len(self.pictures)
        epoch = k // n
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(_mix_seed(self.seed, self.stream, epoch)))
            self._perm = (epoch, rng.permutation(n))
        return int(self._perm[1][k % n])

    def sample(self, k: int, index: int | None = None, target: Bucket | None = None) -> tuple[torch.Tensor, str]:
        """Sample k: picture `index` (default: the k-th of the passes' permutations) cover-resized and cropped to
        `target` (width, height; default the `resolution` square), with crop and flip draws seeded by (seed, k)."""
        i = self.index(k) if index is None else index
        picture = self.pictures[i]
        if isinstance(picture, Path):  # a class picture: read as the instance pictures are
            picture = load_rgb(picture)
        rng = random.Random(_mix_seed(self.seed, self.stream, 1, k))
        target = target or (self.resolution, self.resolution)
        plan = plan_cover_crop(picture.size, target, self.random_crop, self.random_flip, rng)
        return to_tensor(apply_crop(picture, plan)), self.captions[i]


class _BucketSchedule:
    """Which pictures global batch q holds, all of one bucket: a pure function of (seed, q). A cycle is
    `batch_size` passes over the N pictures, N batches: bucket g's n_g of them cut from `batch_size` seeded
    permutations of its pictures laid end to end (no picture twice in a batch where n_g >= batch_size), then
    the cycle's batches in a seeded order (see the module docstring)."""

    def __init__(self, buckets: Sequence[Bucket], batch_size: int, seed: int) -> None:
        self.batch_size, self.seed = batch_size, seed
        self.groups: dict[Bucket, list[int]] = {}
        for i, bucket in enumerate(buckets):
            self.groups.setdefault(bucket, []).append(i)
        self.groups = dict(sorted(self.groups.items(), key=lambda kv: (kv[0][0] / kv[0][1], kv[0])))
        self.num_pictures = len(buckets)
        self._cycle: tuple[int, list[tuple[Bucket, list[int]]]] | None = None

    def __len__(self) -> int:
        """Batches a cycle."""
        return self.num_pictures

    def batch(self, q: int) -> tuple[Bucket, list[int]]:
        """Global batch q's bucket and pictures (indices into the instance pictures)."""
        cycle, position = divmod(q, self.num_pictures)
        if self._cycle is None or self._cycle[0] != cycle:
            self._cycle = (cycle, self._plan(cycle))
        return self._cycle[1][position]

    def _plan(self, cycle: int) -> list[tuple[Bucket, list[int]]]:
        rng = np.random.Generator(np.random.PCG64(_mix_seed(self.seed, _INSTANCE, 2, cycle)))
        batches = []
        size = self.batch_size
        for bucket, members in self.groups.items():
            stream: list[int] = []
            for _ in range(size):
                order = [members[i] for i in rng.permutation(len(members))]
                tail = stream[len(stream) - len(stream) % size:]  # the batch this pass's first pictures complete
                if tail and len(members) >= size:  # none of its pictures again in it: the others first
                    head = [i for i in order if i not in tail][:size - len(tail)]
                    order = head + [i for i in order if i not in head]
                stream += order
            batches += [(bucket, stream[at:at + size]) for at in range(0, len(stream), size)]
        return [batches[i] for i in rng.permutation(len(batches))]


class _Batches(Dataset):
    """Batch b of this rank (map-style: any batch on its own, in any worker)."""

    def __init__(self, instances: _Pictures, classes: _Pictures | None, batch_size: int, rank: int,
                 world_size: int, tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
                 schedule: _BucketSchedule | None = None) -> None:
        self.instances, self.classes = instances, classes
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.tokenizer = tokenizer
        self.schedule = schedule

    def sample_indices(self, b: int) -> list[int]:
        """The sample numbers of this rank's batch b (what seeds their crops, flips and class pictures)."""
        first = (b * self.world_size + self.rank) * self.batch_size
        return list(range(first, first + self.batch_size))

    def plan(self, b: int) -> tuple[Bucket | None, list[int]]:
        """This rank's batch b: its bucket (None without buckets) and its instance pictures (indices)."""
        if self.schedule is None:
            return None, [self.instances.index(k) for k in self.sample_indices(b)]
        return self.schedule.batch(b * self.world_size + self.rank)

    def __getitem__(self, b: int) -> dict[str, Any]:
        ks = self.sample_indices(b)
        bucket, pictures = self.plan(b)
        rows = [self.instances.sample(k, i, bucket) for k, i in zip(ks, pictures, strict=True)]
        if self.classes is not None:
            rows += [self.classes.sample(k, target=bucket) for k in ks]
        captions = [caption for _, caption in rows]
        batch = {
            "image": torch.stack([image for image, _ in rows]),
            "caption": captions,
            "prior": torch.tensor([False] * len(ks) + [True] * (len(rows) - len(ks))),
        }
        if self.tokenizer is not None:  # here, in the worker: the training process only copies the ids
            batch["input_ids"] = self.tokenizer(captions)
        return batch


class DreamBoothLoader:
    """The endless training stream from the batch `start()` says (read when iteration starts, after a
    resumed run restored its step). Lightning takes any iterable as a dataloader; this one has no length."""

    def __init__(self, batches: _Batches, num_workers: int, start: Callable[[], int]) -> None:
        self.batches, self.num_workers, self.start = batches, num_workers, start

    # Lightning's protocol for resumable loaders (without it Lightning warns that a mid-epoch resume is
    # unreliable): the position needs no state, it follows from the trainer's step.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = DataLoader(
            self.batches, batch_size=None, sampler=_CountFrom(self.start()), num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )
        iterator = iter(loader)
        try:
            yield from iterator
        finally:
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


class _CountFrom:
    """Batch numbers start, start + 1, ... (a sampler without end)."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        b = self.start
        while True:
            yield b
            b += 1


class DreamBoothDataModule(lightning.LightningDataModule):
    """Instance pictures (and, with `class_prompt`, the base model's class pictures); see the module docstring."""

    def __init__(
        self,
        instance_dir: str,
        instance_prompt: str | None = None,
        resolution: int = 512,
        center_crop: bool = False,
        random_flip: bool = False,
        batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        class_prompt: str | Sequence[str] | None = None,
        num_class_images: int = 100,
        class_cache: str = "outputs/class_images",
        class_steps: int = 50,
        class_guidance_scale: float = 7.5,
        class_sampler: str = "ddim",
        class_batch_size: int = 4,
        class_negative_prompt: str = "",
        class_dtype: str = "fp16",
        buckets: bool = False,
        bucket_step: int = 64,
        bucket_max_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        if not isinstance(resolution, int) or resolution <= 0 or resolution % 8:
            raise UsageError(f"data.resolution must be a positive multiple of 8 (the VAE downsamples 8x), got {resolution}")
        # the WebDataset loader's buckets and checks: the same list, the same one-line errors
        self.bucket_list: list[Bucket] | None = (
            _check_buckets(resolution, bucket_step, bucket_max_ratio, None) if buckets else None)
        self.buckets, self.bucket_step, self.bucket_max_ratio = bool(buckets), bucket_step, bucket_max_ratio
        if batch_size < 1 or num_workers < 0:
            raise UsageError(f"need data.batch_size >= 1 and data.num_workers >= 0, got {batch_size}, {num_workers}")
        for name, text in (("instance_prompt", instance_prompt), ("class_prompt", class_prompt)):
            if isinstance(text, str) and text.strip().lower() in ("null", "none"):
                # train.py takes prompts verbatim, so `data.class_prompt=null` is the text "null"
                raise UsageError(f"data.{name}={text!r} would be taken as text: to leave it unset give data.{name}= "
                                 "(empty)")
        folder = Path(instance_dir)
        if not folder.is_dir():
            raise UsageError(f"data.instance_dir={instance_dir} is not a folder: give the folder of the subject's "
                             f"pictures ({', '.join(PICTURE_SUFFIXES)})")
        self.paths = instance_pictures(folder)
        if not self.paths:
            raise UsageError(f"data.instance_dir={instance_dir} holds no pictures: put the subject's pictures there "
                             f"as {', '.join(PICTURE_SUFFIXES)} files")
        if instance_prompt is not None and not str(instance_prompt).strip():
            instance_prompt = None
        uncaptioned = [p.name for p in self.paths if not p.with_suffix(".txt").is_file()]
        if instance_prompt is None and uncaptioned:
            raise UsageError(f"{len(uncaptioned)} picture(s) in data.instance_dir have no caption ({uncaptioned[0]} has no "
                             f"{Path(uncaptioned[0]).stem}.txt): set data.instance_prompt, e.g. 'a photo of sks dog'")
        if class_prompt is not None and not isinstance(class_prompt, str):
            # a list of class prompts: class picture i is of prompt i mod their number (ldm.dreambooth)
            class_prompt = [str(p) for p in class_prompt] or None
            if class_prompt is not None and not all(p.strip() for p in class_prompt):
                raise UsageError("data.class_prompt holds an empty prompt: give each class prompt its text")
        elif class_prompt is not None and not str(class_prompt).strip():
            class_prompt = None
        if class_prompt is not None and int(num_class_images) < 1:
            raise UsageError(f"data.num_class_images must be at least 1 (DreamBooth uses 100-200), got {num_class_images}")
        self.instance_dir, self.instance_prompt = folder, instance_prompt
        self.resolution, self.center_crop, self.random_flip = resolution, bool(center_crop), bool(random_flip)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, int(seed)
        self.class_prompt, self.num_class_images = class_prompt, int(num_class_images)
        self.class_cache = class_cache
        self.class_settings = {
            "steps": int(class_steps), "guidance_scale": float(class_guidance_scale), "sampler": class_sampler,
            "batch_size": int(class_batch_size), "negative_prompt": class_negative_prompt or "", "dtype": class_dtype,
        }
        self.captions = [self._caption(p) for p in self.paths]
        self.class_paths: list[Path] | None = None
        self.tokenizer: Callable[[list[str]], torch.Tensor] | None = None
        self._instances: list[Image.Image] | None = None
        self.picture_buckets: list[Bucket] | None = None  # each instance picture's bucket (with buckets, after setup)

    @property
    def prior_preservation(self) -> bool:
        return self.class_prompt is not None

    def _caption(self, path: Path) -> str:
        text = path.with_suffix(".txt")
        if text.is_file():
            try:
                caption = decode_text(text.read_bytes()).strip()
            except UnicodeDecodeError as err:
                raise UsageError(f"{text} is not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8") from None
            if caption:
                return caption
        if self.instance_prompt is None:
            raise UsageError(f"{text} is empty: write the picture's caption in it, or set data.instance_prompt")
        return self.instance_prompt

    def tokenize_with(self, tokenizer: Callable[[list[str]], torch.Tensor]) -> bool:
        """Tokenize captions in the loader's workers with the training model's own tokenizer (the same ids):
        batches get `input_ids`. Workers are forked (or the tokenizer pickles), as WebDataModule's."""
        from ldm.data.webdataset import workers_can_take

        if not workers_can_take(tokenizer, self.num_workers):
            return False
        self.tokenizer = tokenizer
        return True

    # -- the base model's class pictures ----------------------------------------------------------------

    def _module(self) -> Any:
        return getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None

    def _base(self) -> tuple[str, str | None]:
        """The base weights (the module's init_from) and its prediction type, or a usage error."""
        module = self._module()
        base = getattr(module, "init_from", None)
        if not base:
            raise UsageError(NO_BASE)
        return str(base), getattr(module, "prediction_type", None)

    def _check_module(self) -> None:
        module = self._module()
        weight = getattr(module, "prior_loss_weight", None)
        if weight and not self.prior_preservation:
            raise UsageError(f"module.prior_loss_weight={weight} weighs the class pictures' loss, but data.class_prompt "
                             "is not set: give it (e.g. data.class_prompt='a photo of dog') or set module.prior_loss_weight=0")
        if self.prior_preservation and not weight:
            logger.warning("data.class_prompt is set but module.prior_loss_weight is 0: the class pictures train with "
                           "weight 0 (set module.prior_loss_weight=1.0 for prior preservation)")

    def _class_images(self) -> list[Path]:
        from ldm.dreambooth import class_images

        base, prediction_type = self._base()
        settings = dict(self.class_settings)
        return class_images(
            base, self.class_prompt, self.num_class_images, self.class_cache, resolution=self.resolution,
            seed=self.seed, prediction_type=prediction_type, **settings,
        )

    def prepare_data(self) -> None:
        # Once per node (local rank 0), before setup on any rank: the class pictures are made here.
        if self.prior_preservation and self._module() is not None:
            self._class_images()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the base model sampled them; the trained one needs the memory

    def setup(self, stage: str | None = None) -> None:
        if stage not in (None, "fit"):
            return
        self._check_module()
        if self.prior_preservation:
            self.class_paths = self._class_images()  # made by prepare_data: here they are found
        if self._instances is None:
            self._instances = [self._load(p) for p in self.paths]
            if self.bucket_list is None:
                small = sum(min(image.size) < self.resolution for image in self._instances)
                if small:
                    logger.warning("%d of %d instance picture(s) are smaller than data.resolution=%d: upscaled "
                                   "(better pictures of at least that size)", small, len(self._instances),
                                   self.resolution)
            else:
                self.picture_buckets = [nearest_bucket(image.size, self.bucket_list) for image in self._instances]
                counts: dict[Bucket, int] = {}
                for bucket in self.picture_buckets:
                    counts[bucket] = counts.get(bucket, 0) + 1
                logger.info("instance pictures by bucket (width x height: pictures): %s", ", ".join(
                    f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items(), key=lambda kv: kv[0][0] / kv[0][1])))
                small = sum(image.size[0] < w or image.size[1] < h
                            for image, (w, h) in zip(self._instances, self.picture_buckets, strict=True))
                if small:
                    logger.warning("%d of %d instance picture(s) are smaller than their bucket (data.resolution=%d, "
                                   "buckets): upscaled (better pictures of at least that size)", small,
                                   len(self._instances), self.resolution)
        self._check_trigger_words()

    def _load(self, path: Path) -> Image.Image:
        """An instance picture as the WebDataset loader reads one (transforms.load_rgb: upright by its EXIF
        orientation, transparency on white); one that cannot be read stops the run at setup, naming it (a
        DreamBooth folder is a handful of pictures: none is dropped unseen)."""
        try:
            return load_rgb(path)
        except Exception as err:  # noqa: BLE001 - truncated, not a picture, a decompression bomb, a malformed file
            raise UsageError(f"cannot read the instance picture {path}: {err}; fix or remove it") from None

    def _check_trigger_words(self) -> None:
        module = self._module()
        tokenizer = getattr(getattr(module, "cond_stage_model", None), "tokenizer", None)
        if tokenizer is None or self.instance_prompt is None:
            return
        class_text = self.class_prompt if not isinstance(self.class_prompt, list) else " ".join(self.class_prompt)
        for word in trigger_words(self.instance_prompt, class_text):
            count = token_count(tokenizer, word)
            if count is not None and count >= MANY_TOKENS:
                logger.warning("the trigger word %r of data.instance_prompt splits into %d tokens: a rare word the "
                               "tokenizer keeps whole (e.g. 'sks') binds the subject better", word, count)

    # -- loaders ------------------------------------------------------------------------------------

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def _start_batch(self) -> int:
        """This rank's batches trained on before: the trainer's step times the accumulated batches."""
        if self.trainer is None:
            return 0
        return int(self.trainer.global_step) * int(self.trainer.accumulate_grad_batches)

    def batches(self) -> _Batches:
        """The stream's batches (batch b of this rank: `batches()[b]`)."""
        if self._instances is None:
            raise RuntimeError("call setup('fit') before asking for batches")
        random_crop = not self.center_crop
        instances = _Pictures(self._instances, self.captions, self.seed, _INSTANCE, self.resolution, random_crop,
                              self.random_flip)
        schedule = None
        if self.picture_buckets is not None:
            schedule = _BucketSchedule(self.picture_buckets, self.batch_size, self.seed)
        classes = None
        if self.class_paths is not None:
            from ldm.dreambooth import class_captions

            # with buckets the (square) class pictures are centre-cropped to the batch's bucket
            classes = _Pictures(list(self.class_paths), class_captions(self.class_paths), self.seed, _CLASS,
                                self.resolution, random_crop and schedule is None, self.random_flip)
        rank, world_size = self._rank_and_world_size()
        return _Batches(instances, classes, self.batch_size, rank, world_size, self.tokenizer, schedule)

    def train_dataloader(self) -> DreamBoothLoader:
        return DreamBoothLoader(self.batches(), self.num_workers, self._start_batch)

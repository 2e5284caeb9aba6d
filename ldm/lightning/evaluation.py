"""FID, KID, CLIP score and Inception score during training, beside `val/loss` on every logger.

    python train.py ... data.val_shards=VAL_SHARDS +callbacks/evaluate=default

`EvaluateDuringTraining` generates a fixed prompt set every `every_n_steps` (and at the end of training) with
the EMA weights when the module has them: prompt i from z_T seeded `seed + i` (as ldm-eval makes image i),
the same prompts and noise at every evaluation, so the numbers move only with the weights. It scores the
images with ldm.metrics (torchmetrics' own FID, KID, CLIP score and Inception score, weights from local paths
only) against a reference set whose Inception features are computed once, at the start (and cached on disk
as ldm-eval caches them: the next run against the same set reads none of its images), and logs `val/fid`,
`val/kid_mean`, `val/kid_std`, `val/clip_score`, `val/inception_score_mean`, `val/inception_score_std` to
every logger at the step `val/loss` of the same step lands on (`ldm.lightning.callbacks.log_scores`).

Prompts: image-caption shards (by default `data.val_shards`: captions and reference pictures both from
them), a .txt/.csv/.tsv/.jsonl prompt file as ldm-eval reads it, or a list of prompts. Under DDP or FSDP every
rank generates its share (image i on rank i mod world size, the same number of batches on every rank) and
rank 0 scores; with one process the images are the same ones.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from ldm.lightning.callbacks import log_scores, sample_resolution

log = logging.getLogger(__name__)


def _prompt_specs(prompts: Any) -> tuple[list[str] | None, list[str]]:
    """(literal prompts, or None; prompt-file or shard specs). A string is a file or shard pattern; a list is
    prompts, unless every entry is an existing path or a shard pattern (`prompts=FILE` on the command line
    arrives as a list of one)."""
    from ldm.metrics import looks_like_shards

    if prompts is None:
        return None, []
    if isinstance(prompts, str):
        return None, [prompts]
    entries = [str(p) for p in prompts]
    if entries and all(os.path.exists(e) or looks_like_shards(e) for e in entries):
        return None, entries
    return entries, []


class EvaluateDuringTraining(L.Callback):
    """Every `every_n_steps` (0: never) and at the end of training (`on_train_end`), generate `num_images`
    prompts with fixed seeds and log the configured metrics as `val/<metric>` (see the module)."""

    def __init__(
        self,
        prompts: Any,
        metrics: Sequence[str] = ("fid", "kid", "clip_score"),
        inception_weights: str | None = None,
        clip_model: str | None = None,
        clip_arch: str = "ViT-H-14",
        reference: str | None = None,
        image_template: str | None = None,
        caption_key: str = "txt",
        num_images: int | None = 500,
        every_n_steps: int = 500,
        on_train_end: bool = True,
        sampler: str = "ddim",
        steps: int = 25,
        guidance_scale: float = 7.5,
        negative_prompt: str = "",
        seed: int = 0,
        batch_size: int = 8,
        resolution: int | None = None,
        use_ema: bool = True,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        inception_splits: int = 10,
        inception_antialias: bool = True,
        metric_seed: int = 0,
        metric_batch_size: int = 32,
        cache_dir: str | None = None,
        save_images: bool = False,
        prefix: str = "val/",
    ):
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        from ldm.cli.sample import UsageError
        from ldm.evaluate import PromptSet, read_prompt_set, resolve_reference
        from ldm.metrics import ImageMetrics, ImageSet, check_metric_names, check_weight_paths
        from ldm.sampling import SamplerSettings

        # Everything that can be wrong with the settings fails here, before the trainer starts: one line each.
        self.names = check_metric_names(metrics)
        check_weight_paths(self.names, inception_weights, clip_model)
        if batch_size < 1 or (num_images is not None and num_images < 1) or every_n_steps < 0:
            raise UsageError("the evaluation callback needs batch_size >= 1, num_images >= 1 (or null) and "
                             f"every_n_steps >= 0; got {batch_size}, {num_images}, {every_n_steps}")
        literal, specs = _prompt_specs(prompts)
        if literal is None and not specs:
            raise UsageError("the evaluation callback has no prompts: give data.val_shards=SHARDS (its captions and "
                             "pictures) or callbacks.evaluate.prompts=FILE|SHARDS")
        if literal is not None:
            prompt_set, source = PromptSet(literal, None), "callbacks.evaluate.prompts"
        else:
            sets = [read_prompt_set(s, caption_key, image_template) for s in specs]
            source = ", ".join(specs)
            shards = [p.shards for p in sets if p.shards is not None]
            merged = None
            if len(shards) == len(sets):  # all shards (data.val_shards may list several patterns)
                merged = ImageSet([i for s in shards for i in s.items], source, [u for s in shards for u in s.shards])
            images = [i for p in sets for i in (p.images or [])] if all(p.images for p in sets) else None
            prompt_set = PromptSet([c for p in sets for c in p.captions], images, merged)
        count = len(prompt_set.captions) if num_images is None else min(len(prompt_set.captions), int(num_images))
        self.captions = prompt_set.captions[:count]
        self.reference = resolve_reference(self.names, reference, prompt_set, source, count, caption_key,
                                           what="callbacks.evaluate.reference")
        self.settings = SamplerSettings(sampler=sampler, steps=steps, guidance_scale=guidance_scale)
        self.negative_prompt = negative_prompt or ""
        self.every_n_steps, self.evaluate_on_train_end = int(every_n_steps), bool(on_train_end)
        self.seed, self.batch_size, self.resolution, self.use_ema = int(seed), int(batch_size), resolution, use_ema
        self.metric_batch_size, self.cache_dir, self.prefix = int(metric_batch_size), cache_dir, prefix
        self.save_images = bool(save_images)
        self.metric_config = {
            "metrics": self.names, "inception_weights": inception_weights, "clip_model": clip_model,
            "clip_arch": clip_arch, "kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size,
            "inception_splits": inception_splits, "inception_antialias": inception_antialias, "metric_seed": metric_seed,
        }
        # Rank 0 scores. Its networks load now (on the CPU), so weights of the wrong architecture stop the run
        # before the first step, with ldm.metrics' one line; the other ranks only generate.
        self.metrics: ImageMetrics | None = None
        if rank_zero_only.rank == 0:
            self.metrics = ImageMetrics.from_config(self.metric_config)
        self._reference_ready = False
        self._said: set[str] = set()  # notes (a KID subset shrunk, ...) are logged once, not every evaluation
        self._last_step = -1
        self.history: list[dict[str, float]] = []  # what was logged, per evaluation (tests, notebooks)

    # ------------------------------------------------------------------------------------------ hooks

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        concat = getattr(pl_module, "concat", None)
        if concat not in (None, "inpainting"):
            from ldm.cli.sample import UsageError

            raise UsageError(f"the evaluation callback generates from text alone; this is a {concat} model "
                             "(each prompt would need its input picture): leave +callbacks/evaluate out")

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.is_global_zero and self.metrics is None:  # the environment did not say the rank at __init__
            from ldm.metrics import ImageMetrics

            self.metrics = ImageMetrics.from_config(self.metric_config)
        if trainer.is_global_zero and self.reference is not None and not self._reference_ready:
            self._load_reference(pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        from ldm.lightning.interrupt import interrupted_by

        if interrupted_by(trainer):
            return  # stopped on a signal: the checkpoint is written, and a preempted job has seconds left
        if self.evaluate_on_train_end and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    # ------------------------------------------------------------------------------------------- work

    def _load_reference(self, device: torch.device) -> None:
        from ldm.metrics import ReferenceCache, reference_features

        started = time.monotonic()
        self.metrics.to(device)
        cache = ReferenceCache(self.cache_dir)
        features, cached, notes = reference_features(self.reference, self.metrics, cache, self.metric_batch_size,
                                                     progress=None)
        self.metrics.set_reference_features(features)
        self.metrics.to("cpu")
        self._reference_ready = True
        for note in notes:
            log.info("evaluation: %s", note)
        where = f"from the cache {cache.path(ReferenceCache.key(self.reference, self.metrics))}" if cached else (
            f"in {time.monotonic() - started:.1f}s")
        log.info("evaluation: reference features of %d images of %s %s", len(self.reference), self.reference.source,
                 where)

    def _rank_slots(self, trainer: L.Trainer) -> tuple[int, int, int]:
        """(rank, world size, images per rank): image i is slot i // world of rank i % world."""
        world = max(int(getattr(trainer, "world_size", 1) or 1), 1)
        rank = int(getattr(trainer, "global_rank", 0) or 0)
        return rank, world, math.ceil(len(self.captions) / world)

    @torch.no_grad()
    def generate(self, trainer: L.Trainer, pl_module: Any, on_batch: Any) -> None:
        """Generate this rank's share, batch by batch; `on_batch(indices, uint8 B×3×H×W)` gets every batch of
        the whole set on rank 0, in index order (batches gathered from all ranks)."""
        from ldm.evaluate import batch_noise
        from ldm.metrics import to_uint8_batch
        from ldm.sampling import generate, inpainting_condition, to_uint8

        n = len(self.captions)
        rank, world, per_rank = self._rank_slots(trainer)
        side = sample_resolution(pl_module, trainer, self.resolution)
        was_training = pl_module.training
        pl_module.eval()
        ema = getattr(pl_module, "model_ema", None) if self.use_ema else None
        try:
            swap = ema.swapped_into(pl_module.model) if ema is not None else contextlib.nullcontext()
            with swap:
                for start in range(0, per_rank, self.batch_size):
                    slots = range(start, min(start + self.batch_size, per_rank))
                    wanted = [s * world + rank for s in slots]
                    indices = [i if i < n else n - 1 for i in wanted]  # past the end: a stand-in, dropped below
                    generator, noise = batch_noise(pl_module, indices, self.seed, side, side)
                    concat = None
                    if getattr(pl_module, "inpainting", False):  # asked for the whole picture: all masked
                        blank = torch.zeros(1, 3, side, side, device=pl_module.device)
                        concat = inpainting_condition(pl_module, blank, torch.ones_like(blank[:, :1]), generator)
                    images = generate(pl_module, [self.captions[i] for i in indices], self.negative_prompt,
                                      self.settings, height=side, width=side, generator=generator, noise=noise,
                                      concat=concat)
                    batch = to_uint8_batch(np.stack(to_uint8(images)))
                    if world > 1:  # (world, B, 3, H, W): slot s of rank r is image s * world + r
                        gathered = trainer.strategy.all_gather(batch.to(pl_module.device)).cpu()
                        batch = gathered.transpose(0, 1).reshape(-1, *batch.shape[1:])
                        wanted = [s * world + r for s in slots for r in range(world)]
                    if trainer.is_global_zero:
                        keep = [k for k, i in enumerate(wanted) if i < n]
                        on_batch([wanted[k] for k in keep], batch[keep])
        finally:
            pl_module.train(was_training)

    def evaluate(self, trainer: L.Trainer, pl_module: Any) -> dict[str, float]:
        """Generate the set, score it on rank 0 and log `val/<metric>`; returns what was logged (rank 0)."""
        self._last_step = trainer.global_step
        started = time.monotonic()
        metrics = self.metrics
        if trainer.is_global_zero:
            if self.reference is not None and not self._reference_ready:
                self._load_reference(pl_module.device)
            metrics.reset(keep_reference=True)
            metrics.to(pl_module.device)

        out = Path(trainer.default_root_dir) / "evaluation" / f"step-{trainer.global_step:07d}"

        def score(indices: list[int], batch: torch.Tensor) -> None:
            metrics.update(batch, [self.captions[i] for i in indices] if metrics.needs_captions else None)
            if self.save_images:  # what was scored, as ldm-eval names it: `ldm-eval images=` scores them again
                from PIL import Image

                out.mkdir(parents=True, exist_ok=True)
                for i, image in zip(indices, batch, strict=True):
                    Image.fromarray(image.permute(1, 2, 0).numpy()).save(out / f"{i:05d}.png")

        try:
            self.generate(trainer, pl_module, score)
            if not trainer.is_global_zero:
                return {}
            values = metrics.compute()
        finally:
            if metrics is not None:
                metrics.to("cpu")  # CLIP ViT-H/14 is 4 GB: off the GPU between evaluations
        for note in metrics.notes:
            if note not in self._said:
                log.info("evaluation: %s", note)
                self._said.add(note)
        finite = {k: v for k, v in values.items() if math.isfinite(v)}
        for key in sorted(set(values) - set(finite)):
            log.warning("evaluation: %s is not a finite number (%s); not logged (are these the right weights?)",
                        key, values[key])
        logged = log_scores(trainer, finite, self.prefix)
        self.history.append({"step": trainer.global_step, **logged})
        shown = ", ".join(f"{k} {v:.4g}" for k, v in logged.items())
        log.info("evaluation at step %d (%d images, %.1fs): %s", trainer.global_step, metrics.num_images,
                 time.monotonic() - started, shown)
        return logged


"""Callbacks: sample images during training with pinned prompts and noise, the demos' caption-fidelity
judges, and the batch-size hook of Lightning's ThroughputMonitor. Scores computed during training (the
judges here, FID/KID/CLIP score of ldm.lightning.evaluation) reach every logger through `log_scores`, as
`val/<name>` beside `val/loss`."""

from __future__ import annotations

import logging
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image

from ldm.data.transforms import to_uint8 as tensor_to_uint8
from ldm.sampling import (
    SamplerSettings,
    generate,
    image_condition,
    image_grid,
    initial_noise,
    inpainting_condition,
    semantic_condition,
    to_uint8,
)

log = logging.getLogger(__name__)


def image_batch_size(batch: dict[str, Any]) -> int:
    return int((batch["image"] if "image" in batch else batch["moments"]).shape[0])


def logged_step(trainer: L.Trainer) -> int:
    """The step Lightning gives what is logged now: during a training batch's hooks the batch's own index
    (where `val/loss` of a validation after that batch lands), after training the number of steps."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))


def log_scores(trainer: L.Trainer, scores: dict[str, float], prefix: str = "val/") -> dict[str, float]:
    """Log `scores` as `<prefix><name>` to every logger (CSV, TensorBoard, wandb) at `logged_step`, and put them
    in `trainer.callback_metrics` (what ModelCheckpoint's `monitor=` reads); on global rank 0 only."""
    named = {f"{prefix}{k}": float(v) for k, v in scores.items() if v is not None}
    if not trainer.is_global_zero or not named:
        return named
    step = logged_step(trainer)
    for logger in trainer.loggers:
        logger.log_metrics(named, step=step)
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in named.items()})
    return named


def sample_resolution(pl_module: Any, trainer: L.Trainer | None = None, resolution: int | None = None) -> int:
    """The side of pictures sampled during training: `resolution` when given; else the training data's (a run
    at another size than the model's samples at the size it trains at); else the model's native `image_size`
    (512 for SD 1.x, 768 for SD 2.x-768). Never the autoencoder's `ddconfig.resolution`: that is 256 for every
    SD model."""
    if resolution:
        return int(resolution)
    if trainer is None:
        trainer = getattr(pl_module, "_trainer", None)  # `pl_module.trainer` raises when detached
    data_resolution = getattr(getattr(trainer, "datamodule", None), "resolution", None)
    if data_resolution:
        return int(data_resolution)
    return int(pl_module.config["image_size"])


def colour_maps(maps: np.ndarray) -> np.ndarray:
    """Class-index maps (N×H×W) as N×H×W×3 uint8 pictures: class 0 black, the others fixed colours."""
    palette = np.random.default_rng(0).integers(64, 256, (int(maps.max()) + 1, 3), dtype=np.uint8)
    palette[0] = 0
    return palette[maps]


class SampleImages(L.Callback):
    """Every `every_n_steps`, sample the validation prompts with the same noise (EMA weights when present)
    and log a captioned grid to every logger; the PNG also lands in `<run dir>/samples/`.

    Pinning the prompts and z_T makes grids comparable across steps: the change is the training.
    Grids are drawn at `resolution` if given, else at the training data's resolution, else at the
    model's native `image_size` (see `sample_resolution`).
    Models conditioned on a picture or a semantic map sample the pictures or maps of the run's first
    training batch with their captions (as many as there are prompts, pinned from then on); their grids
    show each input picture or (coloured) map beside its output.
    """

    # The batch entry that conditions each kind of model (see LatentDiffusion.concat).
    INPUT_KEYS = {"image": "cond_image", "semantic_map": "seg"}

    def __init__(
        self,
        prompts: list[str],
        every_n_steps: int = 500,
        sampler: str = "ddim",
        steps: int = 25,
        guidance_scale: float = 5.0,
        seed: int = 0,
        resolution: int | None = None,
        use_ema: bool = True,
        on_train_end: bool = True,
        image_guidance_scale: float = 1.5,
    ):
        if not prompts:
            raise ValueError("SampleImages needs at least one validation prompt")
        self.prompts = list(prompts)
        self.every_n_steps = every_n_steps
        self.settings = SamplerSettings(
            sampler=sampler, steps=steps, guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale
        )
        self.seed = seed
        self.resolution = resolution
        self.use_ema = use_ema
        self.sample_on_train_end = on_train_end
        self._last_step = -1
        self.inputs: torch.Tensor | None = None  # pinned conditioning pictures or maps, one per prompt

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        key = self.INPUT_KEYS.get(getattr(pl_module, "concat", None))
        if key is not None and self.inputs is None and key in batch:
            # A picture or map and its caption go together: both are pinned, in place of the prompts.
            rows = torch.arange(len(self.prompts)) % len(batch[key])
            self.inputs = batch[key][rows.to(batch[key].device)].detach().cpu()
            self.prompts = [batch["caption"][i] for i in rows.tolist()]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.log_samples(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        from ldm.lightning.interrupt import interrupted_by

        if interrupted_by(trainer):
            return  # stopped on a signal: the checkpoint is written, and a preempted job has seconds left
        if self.sample_on_train_end and trainer.global_step != self._last_step:
            self.log_samples(trainer, pl_module)

    def sample_resolution(self, pl_module: Any, trainer: L.Trainer | None = None) -> int:
        """The side of the sampled pictures: the pinned inputs' size for models conditioned on them; else
        `resolution` when configured; else the training data's (a run at another size than the model's
        samples at the size it trains at); else the model's native `image_size` (512 for SD 1.x, 768 for
        SD 2.x-768). Never the autoencoder's `ddconfig.resolution`: that is 256 for every SD model."""
        if self.inputs is not None:
            return int(self.inputs.shape[-1])
        return sample_resolution(pl_module, trainer, self.resolution)

    def sample(self, pl_module: Any, trainer: L.Trainer | None = None) -> list[np.ndarray]:
        resolution = self.sample_resolution(pl_module, trainer)
        generator = torch.Generator("cpu").manual_seed(self.seed)
        noise = initial_noise(
            len(self.prompts), pl_module.latent_channels, resolution, resolution, pl_module.downsampling_factor, generator
        )
        was_training = pl_module.training
        pl_module.eval()
        try:
            concat = None
            if getattr(pl_module, "inpainting", False):
                # an inpainting model asked for the whole picture: everything masked, nothing to keep
                blank = torch.zeros(1, 3, resolution, resolution, device=pl_module.device)
                concat = inpainting_condition(pl_module, blank, torch.ones_like(blank[:, :1]), generator)
            elif getattr(pl_module, "concat", None) in self.INPUT_KEYS:
                concat = self._input_condition(pl_module, noise.shape[-2:])
            run = partial(generate, pl_module, self.prompts, "", self.settings, generator=generator, noise=noise,
                          concat=concat)
            if self.use_ema and getattr(pl_module, "model_ema", None) is not None:
                with pl_module.model_ema.swapped_into(pl_module.model):
                    images = run()
            else:
                images = run()
        finally:
            pl_module.train(was_training)
        return to_uint8(images)

    def _input_condition(self, pl_module: Any, latent_size: tuple[int, int]) -> torch.Tensor:
        if self.inputs is None:
            raise RuntimeError(
                f"a {pl_module.concat} model samples with the inputs of a training batch, and none was seen yet"
            )
        inputs = self.inputs.to(pl_module.device)
        if pl_module.concat == "image":
            return image_condition(pl_module, inputs)
        return semantic_condition(inputs, pl_module.config["semantic_classes"], tuple(latent_size))

    def log_samples(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._last_step = trainer.global_step
        # Every rank samples: under trainer=fsdp each forward gathers the weights from all ranks.
        images = self.sample(pl_module, trainer)
        concat = getattr(pl_module, "concat", None)
        if concat in self.INPUT_KEYS and self.inputs is not None:
            shown = tensor_to_uint8(self.inputs) if concat == "image" else colour_maps(self.inputs.numpy())
            images = [np.concatenate([given, made], axis=1) for given, made in zip(shown, images, strict=True)]
        if not trainer.is_global_zero:
            return
        grid = image_grid(images)
        step = trainer.global_step
        out = Path(trainer.default_root_dir) / "samples"
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(out / f"step-{step:07d}.png")
        (out / f"step-{step:07d}.txt").write_text("\n".join(self.prompts) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples", [Image.fromarray(im) for im in images], step=step, caption=self.prompts)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid, step, dataformats="HWC")
                logger.experiment.add_text("samples/prompts", "\n\n".join(self.prompts), step)
            elif isinstance(logger, CSVLogger):
                target = Path(logger.log_dir) / "samples"
                target.mkdir(parents=True, exist_ok=True)
                Image.fromarray(grid).save(target / f"step-{step:07d}.png")
        log.info("sampled %d validation prompts at step %d", len(images), step)


class CaptionFidelity(L.Callback):
    """At the end of training, sample one image per prompt (EMA weights) and score how many follow their
    caption, with a judge `(images, captions) -> share` — for the demo, the shapes' colour judge. The score is
    printed and logged as `val/caption_fidelity` (`val/edit_fidelity`, ...: `val/<name>`) to every logger."""

    def __init__(
        self,
        prompts: list[str],
        judge: Any,
        sampler: str = "ddim",
        steps: int = 25,
        guidance_scale: float = 5.0,
        seed: int = 1234,
        image_guidance_scale: float = 1.5,
    ):
        self.sampler = SampleImages(prompts, every_n_steps=0, sampler=sampler, steps=steps,
                                    guidance_scale=guidance_scale, seed=seed, on_train_end=False,
                                    image_guidance_scale=image_guidance_scale)
        self.judge = judge
        self.score: float | None = None

    name = "caption fidelity"

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.sampler.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def _judge(self, images: list[np.ndarray]) -> float:
        return self.judge(images, self.sampler.prompts)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        images = self.sampler.sample(pl_module, trainer)  # on every rank, as SampleImages
        if not trainer.is_global_zero:
            return
        self.score = float(self._judge(images))
        stem = self.name.replace(" ", "-")
        out = Path(trainer.default_root_dir) / "samples"
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image_grid(images)).save(out / f"{stem}.png")
        (out / f"{stem}.txt").write_text(f"{self.score:.4f}\n" + "\n".join(self.sampler.prompts) + "\n")
        log_scores(trainer, {stem.replace("-", "_"): self.score})  # val/caption_fidelity, beside val/loss and val/fid
        message = f"{self.name}: {self.score:.3f} of {len(images)} generated images match their prompt"
        log.info(message)
        print(message)


class InputFidelity(CaptionFidelity):
    """CaptionFidelity for conditioned models: each prompt sampled with its own fixed input — a before
    picture (N×H×W×3 uint8, edit models) or a class map (N×H×W integers, semantic-map models) — and
    scored by a judge `(images, inputs, prompts) -> share` (the demos: `edit_fidelity`, `layout_fidelity`)."""

    def __init__(self, eval_set: tuple[np.ndarray, list[str]], judge: Any, name: str = "edit fidelity", **kwargs: Any):
        inputs, prompts = eval_set
        super().__init__(list(prompts), judge, **kwargs)
        self.name = name
        self.inputs = np.asarray(inputs)
        if self.inputs.ndim == 4:  # pictures, as the sampler takes them: [-1, 1], channels first
            self.sampler.inputs = torch.from_numpy(self.inputs).permute(0, 3, 1, 2).float() / 127.5 - 1
        else:
            self.sampler.inputs = torch.from_numpy(self.inputs.astype(np.int64))

    def _judge(self, images: list[np.ndarray]) -> float:
        return self.judge(images, self.inputs, self.sampler.prompts)


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with `save_last: link` relinking last.ckpt in one rename.

    Lightning removes last.ckpt and then makes the new link; a kill between the two leaves no last.ckpt, and
    `ckpt_path=last` then resumes an older run or starts afresh. Here the new link is made under a hidden
    name beside it and renamed over last.ckpt (atomic on POSIX): at every moment last.ckpt names a whole step
    file. Where symlinks are not allowed, Lightning's copy stands in, as before."""

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            if os.path.isdir(linkpath) and not os.path.islink(linkpath):
                shutil.rmtree(linkpath)
            folder = os.path.dirname(linkpath)
            hidden = os.path.join(folder, f".{os.path.basename(linkpath)}.partial-{os.getpid()}")  # a resume removes
            try:
                if os.path.lexists(hidden):
                    os.remove(hidden)
                os.symlink(os.path.relpath(filepath, folder), hidden)
                os.replace(hidden, linkpath)
            except OSError:
                if os.path.lexists(hidden):
                    os.remove(hidden)
                ModelCheckpoint._link_checkpoint(trainer, filepath, linkpath)  # it copies; it waits at the barrier
                return
        trainer.strategy.barrier()

"""LatentDiffusion: the LightningModule that trains the UNet of a StableDiffusion model.

It *is* a StableDiffusion (same attributes, so the same LDM key names in its checkpoints) with the
training step of DESIGN.md's data flow:

    z0 = scale_factor · E(image)                  frozen first stage, eval mode, no grads (or cached moments)
    c  = text_encoder(caption, dropped w.p. p)    frozen unless train_text_encoder (or adapted: lora.text_encoder);
                                                  or the batch's cached `context` (ldm-cache-latents --text), the
                                                  dropped rows the cached empty prompt's (`empty_context`)
    t, ε ~ generator seeded seed + global_rank    (so every GPU draws different noise)
    z_t = q_sample(z0, t, ε + offset_noise · ε')
    image-conditioned UNets also see, concatenated to z_t (model config `concat`):
      inpainting (2C+1 channels): [mask, scale_factor · E(image · (1 - mask))], random masks
      image (2C, InstructPix2Pix): mode(E(cond_image)), unscaled; text and image dropped as InstructPix2Pix
      semantic_map (C+K): the one-hot map of batch["seg"], area-averaged to latent size
    loss = mean(w(t) · |unet(z_t, t, c) - target|²),  target ε or v,  w = min-SNR-γ or 1
    DreamBooth batches (`prior`: True for class rows, ldm.data.dreambooth): loss = mean over the instance rows
      + prior_loss_weight · mean over the class rows (diffusers' prior preservation), per-sample w(t) as above
    EMA update of the UNet after each optimizer step (LDM's `model_ema.*`)

Data samples the loader skipped are counted by reason on every rank from the batches' `skipped`, summed over
ranks at each epoch's end, the run's end and checkpoints, logged as `data/skipped_samples` and summarised
(ldm.lightning.data_report): `data, epoch 0: skipped 5 of 30 samples read: not an image 2, ...`.

With `lora={rank, alpha, targets}` only low-rank adapters of the UNet train (ldm.lora); checkpoints hold
them as `lora.adapters.*` (merged into the UNet when read), and train.py exports them as a kohya file.
`lora.text_encoder={rank, alpha, targets, lr, max_steps}` adds adapters of the frozen text encoder (CLIP or
OpenCLIP), in an optimizer group of their own (`lr`, the optimizer's when null) that stops updating after
`max_steps` optimizer steps; checkpoints hold them as `text_lora.adapters.*` (merged into the text encoder
when read), and the kohya file gets them as its `lora_te_*` part.

With `train_text_encoder=true` the whole text encoder trains, in an optimizer group of its own
(`text_encoder={lr, max_steps}`: its LR, the optimizer's when null, and no updates after `max_steps` optimizer
steps, all steps when null), as kohya's `--learning_rate_te` / `--stop_text_encoder_training` and diffusers'
DreamBooth `--train_text_encoder`; the LR scheduler scales its group as the UNet's.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ldm.checkpoint import (
    EMA_PREFIX,
    UNET_PREFIX,
    CheckpointError,
    read_checkpoint,
)
from ldm.data.masks import random_masks
from ldm.lightning.data_report import SkipCounts, summary
from ldm.lightning.ema import EMA
from ldm.lightning.resume import start_next_epoch_fresh
from ldm.lora import TextEncoderLoRA, UNetLoRA
from ldm.models.autoencoder import DiagonalGaussianDistribution
from ldm.models.stable_diffusion import StableDiffusion, normalize_config, with_concat, with_runtime_options
from ldm.sampling import apply_with_concat, semantic_condition

log = logging.getLogger(__name__)


# Epoch-level values every rank already holds: "synced" with max, which keeps them as they are (and keeps
# Lightning from warning that epoch-level values are not reduced across devices).
_SAME_ON_EVERY_RANK = {"on_step": False, "on_epoch": True, "sync_dist": True, "reduce_fx": "max"}

TEXT_LORA_GROUP = "text_encoder_lora"  # the optimizer param group of the text encoder's adapters (lr-AdamW/<name>)
TEXT_LORA_KEYS = ("rank", "alpha", "targets", "lr", "max_steps")  # what module.lora.text_encoder takes
TEXT_ENCODER_GROUP = "text_encoder"  # the optimizer param group of the whole text encoder (train_text_encoder)
TEXT_ENCODER_KEYS = ("lr", "max_steps")  # what module.text_encoder takes


def plain_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """`state` with channels-last (or otherwise strided) tensors made contiguous, in place."""
    for key, value in state.items():
        if isinstance(value, Tensor) and not value.is_contiguous():
            state[key] = value.contiguous()
    return state


def text_encoder_settings(settings: dict[str, Any] | None, train_text_encoder: bool) -> tuple[float | None, int | None]:
    """module.text_encoder={lr, max_steps} of the whole text encoder (train_text_encoder): checked, as (lr, max_steps)."""
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(TEXT_ENCODER_KEYS))
    if unknown:
        raise ValueError(f"module.text_encoder takes {list(TEXT_ENCODER_KEYS)}, not {unknown}")
    lr, max_steps = settings.get("lr"), settings.get("max_steps")
    if not train_text_encoder:
        given = [f"module.text_encoder.{k}" for k in TEXT_ENCODER_KEYS if settings.get(k) is not None]
        if given:
            raise ValueError(
                f"{' and '.join(given)} set but the text encoder does not train: set module.train_text_encoder=true "
                "to train the whole encoder with them, or use module.lora.text_encoder={lr, max_steps} for LoRA adapters of it"
            )
        return None, None
    if lr is not None and float(lr) < 0:
        raise ValueError(f"module.text_encoder.lr must be at least 0 (null: optimizer.lr), got {lr}")
    if max_steps is not None and int(max_steps) < 0:
        raise ValueError(f"module.text_encoder.max_steps must be at least 0 (null: all steps), got {max_steps}")
    return (None if lr is None else float(lr)), (None if max_steps is None else int(max_steps))


def cached_text_conflict(module: Any) -> str | None:
    """Why `module` cannot train on text contexts cached by ldm-cache-latents --text (it trains the text
    encoder, which would then never run), or None."""
    if getattr(module, "train_text_encoder", False):
        what = "module.train_text_encoder=true trains the text encoder"
    elif getattr(module, "text_lora", None) is not None:
        what = "module.lora.text_encoder trains adapters of the text encoder"
    else:
        return None
    return (
        f"{what}, but data.train_shards hold text contexts cached with ldm-cache-latents --text, which the run would "
        "train on instead of running the encoder: set data.cached_text=false to encode the captions, or keep the "
        "text encoder frozen"
    )


def _takes_keyword(func: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return True  # cannot tell: let the call decide
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class NonFiniteLossError(RuntimeError):
    """Training stopped after too many consecutive non-finite losses."""


class _StepOutcome:
    """Whether an optimizer step was skipped for a non-finite loss, on its way to the host: copied into
    pinned memory behind the step's work, read at the next step (by then long done, so the read does not
    wait for the device), together with what its LR scheduler steps would need undone."""

    def __init__(self, skipped: Tensor, step: int):
        self.step = step
        self.event = None
        if skipped.device.type == "cuda":
            self.host = torch.empty(skipped.shape, dtype=skipped.dtype, pin_memory=True)
            self.host.copy_(skipped, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = skipped.to("cpu")  # on the CPU already (other devices: a copy)
        self.schedulers: list[tuple[Any, dict[str, Any], list[Any]]] = []  # (scheduler, its state, its groups' lr) before

    def skipped(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.host.numpy())

    def undo_schedulers(self) -> None:
        for scheduler, state, lrs in reversed(self.schedulers):
            scheduler.load_state_dict(state)
            for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr


class LatentDiffusion(StableDiffusion, L.LightningModule):
    def __init__(
        self,
        model: dict[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        caption_dropout: float = 0.1,
        ema_decay: float | None = 0.9999,
        ema_warmup: bool = True,
        min_snr_gamma: float | None = None,
        offset_noise: float = 0.0,
        train_text_encoder: bool = False,
        seed: int = 0,
        init_from: str | None = None,
        first_stage_ckpt: str | None = None,
        scale_by_std: bool = False,
        max_nonfinite_steps: int = 10,
        mask_full_rate: float = 0.25,
        image_dropout: float = 0.1,
        lora: dict[str, Any] | None = None,
        prediction_type: str | None = None,
        force_prediction_type: bool = False,
        compile: bool = False,
        channels_last: bool = False,
        prior_loss_weight: float | None = None,
        text_encoder: dict[str, Any] | None = None,
    ):
        model = dict(model)
        model.pop("_target_", None)
        init = None
        if init_from:
            # What the checkpoint records wins over the model config's prediction_type, which applies only
            # where it records nothing; `prediction_type` is the user's explicit choice (see read_checkpoint).
            init = read_checkpoint(
                init_from,
                prediction_type,
                force_prediction_type=force_prediction_type,
                default_prediction_type=model.get("prediction_type"),
            )
            log.info("init_from %s", init.prediction_type_note)
            if init.has_ema():
                log.info("init_from=%s holds EMA weights too (model_ema.*): training starts from the non-EMA UNet; "
                         "for the EMA one, ldm-convert --ema it to a file and start from that", init_from)
            config = normalize_config(with_runtime_options(init.config, model))
        else:
            config = normalize_config({**model, **({"prediction_type": prediction_type} if prediction_type else {})})
        if init is not None and model.get("concat") and model["concat"] != config["concat"]:
            # e.g. init_from=sd15.safetensors conditioning=image_concat: SD's weights, a wider conv_in
            config = with_concat(config, model["concat"], model.get("semantic_classes"))
        super().__init__(**config, tokenizer_dir=init.tokenizer_dir if init else None)
        if not 0.0 <= mask_full_rate <= 1.0:
            raise ValueError(f"mask_full_rate must be in [0, 1], got {mask_full_rate}")
        self.mask_full_rate = mask_full_rate
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        if not 0.0 <= image_dropout <= 1.0 - caption_dropout / 2:
            raise ValueError(f"image_dropout must be in [0, 1 - caption_dropout / 2], got {image_dropout}")
        self.image_dropout = image_dropout
        if prior_loss_weight is not None and float(prior_loss_weight) < 0:
            raise ValueError(f"module.prior_loss_weight must be at least 0 (DreamBooth: 1.0), got {prior_loss_weight}")
        self.prior_loss_weight = float(prior_loss_weight or 0.0)
        self.init_from = init_from  # the base weights (DreamBooth's class pictures are sampled from them)
        self._loss_parts: tuple[Tensor, Tensor] | None = None
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.caption_dropout = caption_dropout
        self.min_snr_gamma = min_snr_gamma
        self.offset_noise = offset_noise
        self.train_text_encoder = train_text_encoder
        self.text_encoder_lr, self.text_encoder_max_steps = text_encoder_settings(text_encoder, train_text_encoder)
        self.seed = seed
        # the empty prompt's text context (tokens x width) for batches with cached contexts (see _text_context)
        self.empty_context: Tensor | None = None
        self.scale_by_std = scale_by_std
        self.max_nonfinite_steps = max_nonfinite_steps
        self.compile_unet = compile  # torch.compile the UNet when fitting starts (after any sharding)
        self.channels_last = channels_last
        self._generator: torch.Generator | None = None
        self._generator_state: Tensor | None = None
        self._nonfinite_streak = 0  # consecutive optimizer steps skipped, as far as the host knows
        self._window_bad: Tensor | None = None  # on the device: a non-finite loss in this accumulation window
        self._outcome: _StepOutcome | None = None  # the last step's, not yet read (device-side skips)
        self._skip_scheduler_step = False
        # Data samples the loader skipped so far, all ranks together: a running total each step (on the
        # device), exact at each epoch's end, the run's end and checkpoints, where `_skip_counts` sums the
        # ranks' counts.
        self._skipped_host = 0
        self._skipped_total: Tensor | None = None
        self._skip_counts = SkipCounts()
        self._skipped_logged: int | None = None  # the exact total last logged at an epoch's end
        self._skipped_step_logged = False  # data/skipped_samples logged at a step yet (see on_train_batch_end)
        self._batch_rows = 0
        self._scale_measured = False
        self.stop_reason: str | None = None
        self._sharded = False
        if init is not None:
            self._load_weights(init.without_ema().state_dict, init.source)
        if first_stage_ckpt:
            self._load_first_stage(first_stage_ckpt)
        self.first_stage_model.requires_grad_(False)
        self.cond_stage_model.requires_grad_(train_text_encoder)
        self.lora: UNetLoRA | None = None
        self.text_lora: TextEncoderLoRA | None = None
        self.text_lora_lr: float | None = None
        self.text_lora_max_steps: int | None = None
        if lora:
            lora = dict(lora)
            text = lora.pop("text_encoder", None)
            # Only the adapters train; an EMA of the frozen UNet would be a second copy of constants.
            self.model.requires_grad_(False)
            self.lora = UNetLoRA(self.unet, **lora)  # targets=[]: no UNet adapters (the text encoder's only)
            if text is not None and text is not False:
                self._add_text_lora({} if text is True else dict(text), train_text_encoder)
            ema_decay = None
        self.model_ema = EMA(self.model, ema_decay, ema_warmup) if ema_decay is not None else None
        self.train()  # Lightning never calls train() before fitting: this puts the frozen parts in eval

    def _add_text_lora(self, text: dict[str, Any], train_text_encoder: bool) -> None:
        """Adapters of the frozen text encoder (module.lora.text_encoder), rank and alpha the UNet's unless given."""
        if train_text_encoder:
            raise ValueError(
                "module.lora.text_encoder and module.train_text_encoder=true both train the text encoder: "
                "set one (LoRA adapters of the frozen encoder, or the whole encoder)"
            )
        unknown = sorted(set(text) - set(TEXT_LORA_KEYS))
        if unknown:
            raise ValueError(f"module.lora.text_encoder takes {list(TEXT_LORA_KEYS)}, not {unknown}")
        lr, max_steps = text.pop("lr", None), text.pop("max_steps", None)
        if lr is not None and float(lr) < 0:
            raise ValueError(f"module.lora.text_encoder.lr must be at least 0, got {lr}")
        if max_steps is not None and int(max_steps) < 0:
            raise ValueError(f"module.lora.text_encoder.max_steps must be at least 0 (or null), got {max_steps}")
        self.text_lora_lr = None if lr is None else float(lr)
        self.text_lora_max_steps = None if max_steps is None else int(max_steps)
        assert self.lora is not None
        text.setdefault("rank", self.lora.rank)
        text.setdefault("alpha", self.lora.alpha)
        self.text_lora = TextEncoderLoRA(self.cond_stage_model, **text)

    @property
    def text_lora_training(self) -> bool:
        """Whether the text encoder's adapters still take optimizer steps (before `max_steps`)."""
        if self.text_lora is None:
            return False
        return self.text_lora_max_steps is None or self.global_step < self.text_lora_max_steps

    @property
    def text_encoder_training(self) -> bool:
        """Whether the whole text encoder (train_text_encoder) still takes optimizer steps (before its max_steps)."""
        if not self.train_text_encoder:
            return False
        return self.text_encoder_max_steps is None or self.global_step < self.text_encoder_max_steps

    @property
    def skipped_samples(self) -> int:
        """Data samples skipped so far, all ranks together (a device read when counted on the device)."""
        if self._skipped_total is not None:
            return int(self._skipped_total)
        return self._skipped_host

    @skipped_samples.setter
    def skipped_samples(self, value: int) -> None:
        self._skipped_host, self._skipped_total = int(value), None

    # -- weights --------------------------------------------------------------------------------

    def _load_weights(self, state_dict: dict[str, Tensor], source: str) -> None:
        # Runs before model_ema exists, so the module's keys are exactly the checkpoint's.
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise CheckpointError(f"init_from={source}: missing {missing[:10]}, unexpected {unexpected[:10]}")
        state_dict = dict(state_dict)
        conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
        given, wanted = state_dict[conv_in], own[conv_in]
        if given.shape[1] < wanted.shape[1] and given.shape[::2] == wanted.shape[::2]:
            # New input channels start at zero, so the model starts out as the checkpoint's (as SD's
            # inpainting and InstructPix2Pix models were made from SD).
            state_dict[conv_in] = torch.cat([given, given.new_zeros(given.shape[0], wanted.shape[1] - given.shape[1], *given.shape[2:])], dim=1)
        self.load_state_dict(state_dict, strict=True)

    def _load_first_stage(self, path: str) -> None:
        """The autoencoder from a stage-one checkpoint, an SD file, a standalone VAE file (vae-ft-mse) or a
        diffusers VAE (see read_vae_weights)."""
        from ldm.checkpoint import read_vae_weights

        vae, recorded = read_vae_weights(path, self.config["first_stage"])
        self.first_stage_model.load_state_dict(vae, strict=True)
        if recorded is not None and "scale_factor" in recorded:
            self.config["scale_factor"] = float(recorded["scale_factor"])
            self._scale_measured = True

    @property
    def inpainting(self) -> bool:
        return self.concat == "inpainting"

    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError(
                "Lightning's FSDPStrategy (FSDP1) is not supported: use trainer=fsdp, which shards with FSDP2"
            )
        # Captions tokenized in the data loader's workers, by this model's own tokenizer (the same ids),
        # where the data module can (WebDataModule): the training process only copies the ids over.
        datamodule = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(self.cond_stage_model, "tokenizer", None)
        if tokenizer is not None and callable(getattr(datamodule, "tokenize_with", None)):
            datamodule.tokenize_with(tokenizer)
        # Text contexts cached by ldm-cache-latents --text (WebDataModule's setup, which runs first, read them):
        # the text encoder does not run in training; caption dropout puts in the empty prompt's cached context.
        if getattr(datamodule, "text_contexts", False):
            conflict = cached_text_conflict(self)
            if conflict:
                raise ValueError(conflict)
            self.empty_context = datamodule.empty_context

    def configure_model(self) -> None:
        """Under trainer=fsdp (a device mesh is set), shard the UNet and its EMA; otherwise nothing."""
        mesh = self.device_mesh
        if mesh is None or self._sharded:
            return
        if self.lora is not None:
            raise ValueError("LoRA training under trainer=fsdp is not supported: use trainer=ddp (adapters are small)")
        from ldm.lightning.fsdp import shard_latent_diffusion

        strategy = self.trainer.strategy
        policy = strategy.mixed_precision(self.trainer.precision) if hasattr(strategy, "mixed_precision") else None
        shard_latent_diffusion(self, mesh["data_parallel"], policy)
        self._sharded = True

    def on_fit_start(self) -> None:
        """GPU speed options: channels-last UNet weights and inputs, and torch.compile of the UNet, in
        place (`Module.compile`), so its state_dict keys stay the LDM names. Compiled after configure_model,
        so a sharded (FSDP2) UNet compiles as sharded."""
        unet = self.model.diffusion_model
        if self.channels_last:
            unet.to(memory_format=torch.channels_last)
        if self.compile_unet and getattr(unet, "_compiled_call_impl", None) is None:
            unet.compile()

    def train(self, mode: bool = True) -> LatentDiffusion:
        # Whoever switches the module back to training (the sampling callbacks) leaves the frozen parts in eval.
        super().train(mode)
        self.first_stage_model.eval()
        if not self.train_text_encoder:
            self.cond_stage_model.eval()
        return self

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.param_groups() for p in group["params"]]

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: the UNet's (or its adapters'); the whole text encoder's when
        train_text_encoder, or the text encoder's adapters', each in a group of its own, at its own LR."""
        params = list(self.lora.parameters() if self.lora is not None else self.model.parameters())
        text: dict[str, Any] | None = None
        if self.train_text_encoder:
            text = {"params": list(self.cond_stage_model.parameters()), "name": TEXT_ENCODER_GROUP}
            lr = self.text_encoder_lr
        elif self.text_lora is not None:
            text = {"params": list(self.text_lora.parameters()), "name": TEXT_LORA_GROUP}
            lr = self.text_lora_lr
        if text is None:
            return [{"params": params}]
        if lr is not None:
            text["lr"] = lr
        return ([{"params": params, "name": "unet"}] if params else []) + [text]

    def _stop_finished_text_lora(self, optimizer: Any) -> None:
        """After its max_steps optimizer steps (module.text_encoder.max_steps, module.lora.text_encoder.max_steps)
        the text encoder, or its adapters, stop: their group's LR is 0 and their gradients are dropped before
        the step, so no optimizer touches them (no weight decay, no moment update, no new state)."""
        if self.train_text_encoder and not self.text_encoder_training:
            name, steps, what = TEXT_ENCODER_GROUP, self.text_encoder_max_steps, "text encoder"
            key = "module.text_encoder.max_steps"
        elif self.text_lora is not None and not self.text_lora_training:
            name, steps, what = TEXT_LORA_GROUP, self.text_lora_max_steps, "text-encoder LoRA"
            key = "module.lora.text_encoder.max_steps"
        else:
            return
        inner = getattr(optimizer, "optimizer", optimizer)
        for group in inner.param_groups:
            if group.get("name") == name:
                if group["lr"] != 0.0 and self.global_step == steps:
                    log.info("%s: stopped after %d steps (%s)", what, steps, key)
                group["lr"] = 0.0
                for p in group["params"]:
                    p.grad = None

    # -- randomness -----------------------------------------------------------------------------

    @property
    def generator(self) -> torch.Generator:
        """Noise, timesteps and caption dropout all come from here: seed + global_rank, saved in checkpoints."""
        # Compare device types: "cuda" and "cuda:0" are the same place, and a fresh generator would
        # replay the same noise every step.
        if self._generator is None or self._generator.device.type != self.device.type:
            self._generator = torch.Generator(device=self.device).manual_seed(self.seed + self.global_rank)
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)
                self._generator_state = None
        return self._generator

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every rank runs this hook. The last step's outcome first: were it skipped, the LR scheduler's
        # step is undone, and the file gets the scheduler and optimizer (its groups' LR) as undone.
        if self._read_outcome() and "lr_schedulers" in checkpoint:
            trainer = self.trainer
            checkpoint["lr_schedulers"] = [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs]
            if "optimizer_states" in checkpoint:
                checkpoint["optimizer_states"] = [trainer.strategy.optimizer_state(o) for o in trainer.optimizers]
        checkpoint["ldm_config"] = self.config
        if self.channels_last:  # files hold plain contiguous tensors (safetensors refuses others)
            plain_tensors(checkpoint.get("state_dict") or {})
        checkpoint["scale_factor_measured"] = self._scale_measured
        # Every rank runs this hook: all of them add their skip counts in (by reason, and samples read).
        self._sync_skip_counts()
        checkpoint["skipped_samples"] = self.skipped_samples
        checkpoint["data_counts"] = self._skip_counts.state_dict()
        # Every rank runs this hook but only rank 0 writes: gather each rank's stream into the file.
        state = self.generator.get_state()
        states = self.all_gather(state.to(self.device)) if self.trainer.world_size > 1 else state[None]
        # clone: rows of one gathered tensor share its storage, and set_state on such a view crashes
        checkpoint["noise_generators"] = [s.cpu().clone() for s in states]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        start_next_epoch_fresh(checkpoint)
        if "ldm_config" in checkpoint:
            self.config["scale_factor"] = checkpoint["ldm_config"]["scale_factor"]
            self._scale_measured = bool(checkpoint.get("scale_factor_measured", False))
        self.skipped_samples = int(checkpoint.get("skipped_samples", 0))
        self._skip_counts.load_state_dict(checkpoint.get("data_counts"), self.skipped_samples)
        states = checkpoint.get("noise_generators", [])
        self._generator = None
        if self.global_rank < len(states):
            self._generator_state = states[self.global_rank].cpu().clone()
        else:
            # More ranks than when saved: a fresh stream that differs per rank and from the first run's.
            self.seed += 100_003 * int(checkpoint.get("global_step", 0))

    # -- training -------------------------------------------------------------------------------

    @torch.no_grad()
    def _latents(self, batch: dict[str, Any]) -> Tensor:
        if "moments" in batch:  # cached by ldm-cache-latents: the encoder's output, sampled as below
            posterior = DiagonalGaussianDistribution(batch["moments"].to(self.dtype))
        else:
            posterior = self.first_stage_model.encode(batch["image"].to(self.dtype))
        z = posterior.sample(self.generator)
        if self.scale_by_std and not self._scale_measured:
            # LDM's rescaling: unit-variance latents from the first batch, agreed across ranks.
            std = self.trainer.strategy.reduce(z.float().std(), reduce_op="mean")
            self.config["scale_factor"] = float(1.0 / std)
            self._scale_measured = True
            log.info("scale_factor set to %.5f from the first batch", self.config["scale_factor"])
        return self.scale_factor * z

    def _kept_captions(self, n: int, draw: Tensor | None = None) -> Tensor | None:
        """Which of the batch's `n` captions stay (a boolean on the device), or None: all of them. The
        others become "" (caption dropout), in the text encoder's input, with no host read."""
        if self.caption_dropout <= 0:
            return None
        if draw is None:
            draw = torch.rand(n, generator=self.generator, device=self.device)
        return draw >= self.caption_dropout

    def _text_context(self, batch: dict[str, Any], keep: Tensor | None) -> Tensor:
        """The text encoder's output for the batch's captions, "" where `keep` is False: the same ids (so
        the same output) as tokenizing the list with those captions blanked. The batch's `input_ids`, when
        the loader's workers tokenized the captions already, are those same ids. A batch's `context` (cached by
        ldm-cache-latents --text) is that output already: the text encoder does not run, and the rows `keep`
        drops get the cached empty prompt's context (`empty_context`), chosen on the device."""
        if "context" in batch:
            context = batch["context"].to(device=self.device, dtype=self.dtype)
            if keep is None:
                return context
            return torch.where(keep.to(context.device)[:, None, None], context, self._empty_context_on(context))
        tokens = self.text_tokens(batch["input_ids"] if "input_ids" in batch else batch["caption"])
        if keep is not None:
            tokens = torch.where(keep.to(tokens.device)[:, None], tokens, self._empty_prompt_tokens(tokens.device))
        return self.cond_stage_model.encode(tokens)

    def _empty_context_on(self, context: Tensor) -> Tensor:
        """The cached empty prompt's context (1 x tokens x width) on `context`'s device and dtype."""
        if self.empty_context is None:
            raise ValueError(
                "the batches carry cached text contexts (ldm-cache-latents --text) but the module has no empty-prompt "
                "context for caption dropout: WebDataModule gives it (empty_context.npy beside the shards' cache.json) at setup; "
                "set LatentDiffusion.empty_context to it, or module.caption_dropout=0"
            )
        cached = getattr(self, "_empty_context_cached", None)
        if cached is None or cached.device != context.device or cached.dtype != context.dtype:
            cached = self._empty_context_cached = self.empty_context.to(device=context.device, dtype=context.dtype)[None]
        if cached.shape[1:] != context.shape[1:]:
            raise ValueError(
                f"the cached empty-prompt context is {tuple(cached.shape[1:])}, the batch's contexts "
                f"{tuple(context.shape[1:])}: they come from different caches; re-run ldm-cache-latents --text"
            )
        return cached

    def _empty_prompt_tokens(self, device: torch.device) -> Tensor:
        cached = getattr(self, "_empty_tokens", None)
        if cached is None or cached.device != device:
            cached = self._empty_tokens = self.text_tokens([""]).to(device)
        return cached

    def _batch_part(self, batch: dict[str, Any], key: str, data_key: str) -> Tensor:
        if key not in batch:
            raise ValueError(
                f"a {self.concat} model trains on batches with {key!r}: set data.{data_key} to the shards' "
                f"key for it (or use the conditioning={self.concat} config group)"
            )
        return batch[key]

    @torch.no_grad()
    def _image_condition(self, batch: dict[str, Any], drop: Tensor) -> Tensor:
        """The conditioning picture's unscaled posterior mode (InstructPix2Pix), zeroed where `drop`; from
        its cached moments (`cond_moments`, written by ldm-cache-latents) when the batch has them."""
        if "cond_moments" in batch:
            latents = DiagonalGaussianDistribution(batch["cond_moments"].to(self.dtype)).mode()
        else:
            cond = self._batch_part(batch, "cond_image", "cond_image_key").to(self.dtype)
            latents = self.first_stage_model.encode(cond).mode()
        return latents * (~drop).to(latents.dtype)[:, None, None, None]

    @torch.no_grad()
    def _inpainting_condition(self, batch: dict[str, Any], z0: Tensor) -> Tensor:
        """What an inpainting UNet sees besides z_t: a random mask at latent size and the latents of
        the image with the masked area blanked (LDM's LatentInpaintDiffusion)."""
        if "image" not in batch:
            raise ValueError(
                "an inpainting model encodes the masked image at every step: train it on image shards, "
                "not data=cached_latents"
            )
        images = batch["image"].to(self.dtype)
        masks = random_masks(len(images), *images.shape[-2:], self.generator, self.mask_full_rate).to(images)
        masked = self.first_stage_model.encode(images * (1 - masks)).sample(self.generator)
        return torch.cat([F.interpolate(masks, size=z0.shape[-2:]), self.scale_factor * masked], dim=1)

    def _network(self, z_t: Tensor, t: Tensor, context: Tensor | dict[str, Tensor]) -> Tensor:
        if self.channels_last:
            z_t = z_t.contiguous(memory_format=torch.channels_last)
        if isinstance(context, dict):  # {"crossattn": ..., "concat": ...}: concat joins z_t's channels
            return apply_with_concat(self, z_t, t, context)
        return self.apply_model(z_t, t, context)

    def diffusion_loss(self, z0: Tensor, context: Tensor | dict[str, Tensor], prior: Tensor | None = None) -> Tensor:
        """The batch's loss; with `prior` (True for DreamBooth's class rows) the mean of the instance rows' plus
        prior_loss_weight x the mean of the class rows' (diffusers' train_dreambooth.py), both kept in
        `_loss_parts` for the log."""
        g = self.generator
        t = torch.randint(0, self.schedule.num_timesteps, (z0.shape[0],), generator=g, device=self.device)
        noise = torch.randn(z0.shape, generator=g, device=self.device, dtype=z0.dtype)
        if self.offset_noise:
            offset = torch.randn((*z0.shape[:2], 1, 1), generator=g, device=self.device, dtype=z0.dtype)
            noise = noise + self.offset_noise * offset
        z_t = self.schedule.q_sample(z0, t, noise)
        target = self.schedule.target(z0, noise, t, self.prediction_type)
        pred = self._network(z_t, t, context)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.min_snr_gamma:
            per_sample = per_sample * self.schedule.min_snr_weight(t, self.min_snr_gamma, self.prediction_type)
        if prior is None:
            return per_sample.mean()
        is_class = prior.to(device=per_sample.device, dtype=per_sample.dtype)  # on the device: no host read
        is_instance = 1.0 - is_class
        instance = (per_sample * is_instance).sum() / is_instance.sum().clamp_min(1.0)
        prior_part = (per_sample * is_class).sum() / is_class.sum().clamp_min(1.0)
        self._loss_parts = (instance, prior_part)
        return instance + self.prior_loss_weight * prior_part

    def _concat_and_captions(self, batch: dict[str, Any], z0: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The UNet's concat input (or None) and which captions stay (see `_kept_captions`)."""
        n = len(batch["caption"])
        if self.concat == "image":
            # One draw per sample decides both drops, as InstructPix2Pix: with caption_dropout = image_dropout
            # = 2p, text alone, both and image alone are each dropped for a share p of the samples.
            draw = torch.rand(n, generator=self.generator, device=self.device)
            start = self.caption_dropout / 2
            concat = self._image_condition(batch, (draw >= start) & (draw < start + self.image_dropout))
            return concat, self._kept_captions(n, draw)
        if self.concat == "inpainting":
            concat = self._inpainting_condition(batch, z0)
        elif self.concat == "semantic_map":
            seg = self._batch_part(batch, "seg", "seg_key")
            # no range check here (a host read every step): the loader skipped maps with labels >= data.num_classes
            concat = semantic_condition(seg, self.config["semantic_classes"], tuple(z0.shape[-2:]), check=False).to(z0)
        else:
            concat = None
        return concat, self._kept_captions(n)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        z0 = self._latents(batch)
        concat, keep = self._concat_and_captions(batch, z0)
        # The text encoder (or its adapters) keeps its gradients past its max_steps under DDP, whose all-reduce
        # expects every trainable parameter's (they are dropped before the step, see _stop_finished_text_lora).
        trains_text = self.train_text_encoder or self.text_lora is not None
        text_grads = self.text_encoder_training or self.text_lora_training or (trains_text and self.trainer.world_size > 1)
        with torch.set_grad_enabled(text_grads):
            context = self._text_context(batch, keep)
        context = context if concat is None else {"crossattn": context, "concat": concat}
        prior = batch.get("prior")  # DreamBooth's class rows (ldm.data.dreambooth)
        loss = self.diffusion_loss(z0, context) if prior is None else self.diffusion_loss(z0, context, prior=prior)
        # On the device, summed over ranks: whether any rank's loss is non-finite (every rank then skips
        # this window's optimizer step alike, see optimizer_step) and the samples the loader skipped.
        skipped = sum((batch.get("skipped") or {}).values())
        flags = self._sum_over_ranks(
            torch.stack([(~torch.isfinite(loss.detach())).float(), torch.full((), float(skipped), device=self.device)])
        )
        bad = flags[0] > 0
        self._window_bad = bad if self._window_bad is None else self._window_bad | bad
        # A running total: a per-batch count would be lost on the steps the loggers do not write.
        if self._skipped_total is None:
            self._skipped_total = torch.full((), self._skipped_host, dtype=torch.int64, device=self.device)
        self._skipped_total = self._skipped_total + flags[1].long()
        self._skip_counts.add(batch, self.global_step)
        self.log("train/loss", loss, prog_bar=True, batch_size=z0.shape[0])
        if prior is not None and self._loss_parts is not None:
            instance, prior_part = self._loss_parts
            self._loss_parts = None
            self.log("train/instance_loss", instance, batch_size=z0.shape[0])
            self.log("train/prior_loss", prior_part, batch_size=z0.shape[0])
        self._batch_rows = z0.shape[0]  # data/skipped_samples is logged in on_train_batch_end
        # A non-finite loss is returned as it is: its backward runs on every rank alike (DDP's all-reduce,
        # FSDP's reduce-scatter), and optimizer_step makes the window's update a no-op.
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """The running total of skipped samples as `data/skipped_samples`, on the steps the loggers write
        (and the run's first and last): each self.log costs Lightning about half a millisecond of host time,
        and the value, a running total, is read nowhere else. After the callbacks' hooks, where whether
        this step's metrics are written (a callback can stop the run) is settled."""
        if self._skipped_total is None:  # no training_step of ours ran
            return
        if self._step_metrics_logged():
            self.log("data/skipped_samples", self._skipped_total.float(), batch_size=self._batch_rows)
            self._skipped_step_logged = True

    def _step_metrics_logged(self) -> bool:
        """Whether Lightning writes this training step's metrics to the loggers (its own test), or this is
        the run's first or last step (so `callback_metrics` hold the value a run of any length ends with)."""
        trainer = self.trainer
        if not self._skipped_step_logged:
            return True
        if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
            return True
        connector = getattr(trainer, "_logger_connector", None)
        try:
            return bool(connector.should_update_logs) or bool(trainer.fast_dev_run)
        except (AttributeError, NotImplementedError):  # another Lightning: log at every step, as before
            return True

    # -- validation loss ----------------------------------------------------------------------------

    VAL_SEED = 1_000_003

    @contextmanager
    def _validation_draws(self, batch_idx: int) -> Iterator[None]:
        """Noise, timesteps, latent samples and masks of validation batch `batch_idx` from a generator of
        their own, seeded by (rank, batch): the same at every validation, so `val/loss` moves only with the
        weights; the training stream is left where it was. No caption or image dropout."""
        generator = torch.Generator(device=self.device).manual_seed(self.VAL_SEED + 7919 * self.global_rank + batch_idx)
        saved = self._generator, self.caption_dropout, self.image_dropout, self.scale_by_std
        self._generator, self.caption_dropout, self.image_dropout, self.scale_by_std = generator, 0.0, 0.0, False
        try:
            yield
        finally:
            self._generator, self.caption_dropout, self.image_dropout, self.scale_by_std = saved

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """The training loss on `data.val_shards` (EMA weights when present), at fixed noise and timesteps."""
        with self._validation_draws(batch_idx), torch.no_grad():
            z0 = self._latents(batch)
            concat, keep = self._concat_and_captions(batch, z0)
            context = self._text_context(batch, keep)
            loss = self.diffusion_loss(z0, context if concat is None else {"crossattn": context, "concat": concat})
        self.log("val/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=z0.shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._validation_ema = None
        if self.model_ema is not None:
            self._validation_ema = self.model_ema.swapped_into(self.model)
            self._validation_ema.__enter__()

    def on_validation_epoch_end(self) -> None:
        swapped, self._validation_ema = getattr(self, "_validation_ema", None), None
        if swapped is not None:
            swapped.__exit__(None, None, None)  # the trained weights again

    # -- data counts --------------------------------------------------------------------------------

    def on_train_start(self) -> None:
        self._skip_counts.start(self.trainer.default_root_dir, self.global_rank)

    def on_train_epoch_start(self) -> None:
        # Not called when a run resumes mid-epoch: that epoch's start comes from the checkpoint.
        self._skip_counts.epoch_start = self._skip_counts.synced

    def _sync_skip_counts(self) -> None:
        """All ranks' skip counts into `_skip_counts.synced` and `skipped_samples`: every rank calls this."""
        total = self._skip_counts.sync(self.trainer.world_size)
        self.skipped_samples = total.total

    def on_train_epoch_end(self) -> None:
        self._read_outcome()  # every rank, before the callbacks' on_train_end look at stop_reason
        self._sync_skip_counts()
        epoch = self._skip_counts.end_epoch()
        if not self._skip_counts.seen_counts:
            return  # data that does not count skips
        self.log("data/skipped_samples", float(self.skipped_samples), **_SAME_ON_EVERY_RANK)
        self._skipped_logged = self.skipped_samples
        self.log("data/samples_read", float(self._skip_counts.synced.read), **_SAME_ON_EVERY_RANK)
        if self.trainer.is_global_zero and epoch.total:  # the run's end says it when none were skipped
            log.info(summary(epoch, f"epoch {self.current_epoch}", self._skip_counts.list_dir))

    def on_train_end(self) -> None:
        self._read_outcome()
        self._sync_skip_counts()
        if not self._skip_counts.seen_counts or not self.trainer.is_global_zero:
            return
        if self.skipped_samples != self._skipped_logged:  # not logged at an epoch's end: the loggers get it here
            for logger in self.trainer.loggers:
                logger.log_metrics({"data/skipped_samples": float(self.skipped_samples)}, step=self.global_step)
        log.info(summary(self._skip_counts.synced, "run total", self._skip_counts.list_dir))

    def _sum_over_ranks(self, values: Tensor) -> Tensor:
        """`values` added up over the ranks, on the device: the host does not wait (torch.distributed's
        all-reduce directly; Lightning's `reduce` puts a barrier before it, which waits for the device)."""
        if self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(values)
        return values

    @staticmethod
    def _skips_on_device(optimizer: Any, precision: Any) -> bool:
        """Whether `optimizer` can skip its update on the device: torch's fused optimizers take a
        `found_inf` tensor (as GradScaler gives them) and then change nothing, step counts included.
        Not under a GradScaler, which sets `found_inf` itself (and would shrink its scale)."""
        return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and getattr(precision, "scaler", None) is None

    def _note_outcome(self, skipped: bool, step: int) -> None:
        """Count consecutive skipped steps; at `max_nonfinite_steps` in a row the run is to stop."""
        if not skipped:
            self._nonfinite_streak = 0
            return
        self._nonfinite_streak += 1
        log.warning(
            "non-finite loss at step %d (%d in a row): skipped its optimizer, LR scheduler and EMA step",
            step,
            self._nonfinite_streak,
        )
        if self._nonfinite_streak >= self.max_nonfinite_steps and self.stop_reason is None:
            self.stop_reason = (
                f"{self._nonfinite_streak} consecutive non-finite losses at step {step}: "
                "lower the learning rate, use bf16 instead of fp16, or check the data"
            )

    def _read_outcome(self) -> bool:
        """Read the last step's outcome, if not read yet (done by now: no wait for the device), and undo
        its LR scheduler step if it was skipped. Every rank reads the same value. Returns whether an
        unread step was skipped."""
        outcome, self._outcome = self._outcome, None
        if outcome is None:
            return False
        skipped = outcome.skipped()
        if skipped:
            outcome.undo_schedulers()
        self._note_outcome(skipped, outcome.step)
        return skipped

    def _skip_window(self, optimizer: Any) -> None:
        self._skip_scheduler_step = True
        optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        if optimizer_closure is None:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
            return
        # The closure runs this batch's training_step and backward. A window with a non-finite loss on any
        # rank (agreed on the device in training_step) takes no optimizer step: AdamW's momentum and weight
        # decay would move the weights even on zero gradients. Nor does the LR scheduler or the EMA move.
        loss = optimizer_closure()
        self._stop_finished_text_lora(optimizer)
        bad, self._window_bad = self._window_bad, None
        inner = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper keeps its own attributes
        if bad is None:  # no training_step of ours ran (a subclass's): nothing to guard
            bad = torch.zeros((), dtype=torch.bool, device=self.device)
        if not self._skips_on_device(inner, self.trainer.precision_plugin):
            # e.g. bitsandbytes' 8-bit AdamW, or torch's foreach AdamW: the host reads the flag, once a step
            # (after the backward is queued).
            skipped = bool(bad)
            self._note_outcome(skipped, self.global_step)
            if self.stop_reason is not None:
                self.trainer.should_stop = True
            if skipped:
                self._skip_window(optimizer)
                return
            self._skip_scheduler_step = False
            super().optimizer_step(epoch, batch_idx, optimizer, lambda: loss)
            if self.model_ema is not None:
                self.model_ema.update(self.model)
            return
        # Fused optimizers skip on the device, the EMA too, so the host reads the outcome a step late
        # (nothing waits): an LR scheduler step it took is undone before this step's update uses the LR.
        self._read_outcome()
        if self.stop_reason is not None:  # known now: this step is skipped too, and the run stops after it
            self.trainer.should_stop = True
            self._skip_window(optimizer)
            return
        self._skip_scheduler_step = False
        inner.found_inf = bad.float()
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, lambda: loss)
        finally:
            del inner.found_inf
        # Here, not in on_train_batch_end: callbacks' on_train_batch_end (ModelCheckpoint) run before the
        # module's, so a checkpoint written at step N would miss step N's EMA update and resume would differ.
        if self.model_ema is not None:
            self.model_ema.update(self.model, skip=bad)
        self._outcome = _StepOutcome(bad, self.global_step)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        if self._skip_scheduler_step:  # the optimizer step it follows was skipped
            self._skip_scheduler_step = False
            return
        if self._outcome is not None:  # skipped or not is not known yet: keep what undoing the step needs
            lrs = [group["lr"] for group in scheduler.optimizer.param_groups]
            self._outcome.schedulers.append((scheduler, copy.deepcopy(scheduler.state_dict()), lrs))
        super().lr_scheduler_step(scheduler, metric)

    def _optimizer_factory(self) -> Callable[..., torch.optim.Optimizer]:
        """The configured optimizer with `fused` settled: null is on for CUDA when the optimizer takes
        a `fused` argument (torch's fused kernels, which also skip a non-finite step on the device) and
        left out when it does not (`optimizer._target_` naming e.g. bitsandbytes' 8-bit AdamW);
        true or false is the user's."""
        factory = self.optimizer_factory
        keywords = getattr(factory, "keywords", None)
        if not isinstance(factory, functools.partial) or keywords is None or "fused" not in keywords:
            return factory
        takes_fused = _takes_keyword(factory.func, "fused")
        fused = keywords["fused"]
        rest = {k: v for k, v in keywords.items() if k != "fused"}
        if fused is None:
            if not takes_fused:
                return functools.partial(factory.func, *factory.args, **rest)
            return functools.partial(factory.func, *factory.args, **rest, fused=True if self.device.type == "cuda" else None)
        if not takes_fused:
            name = getattr(factory.func, "__qualname__", factory.func)
            raise ValueError(f"optimizer {name} takes no `fused` argument: set module.optimizer.fused=null")
        return factory

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError("no optimizer configured (set optimizer=... in the training config)")
        optimizer = self._optimizer_factory()(params=self.param_groups())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def ema_state(self) -> dict[str, Tensor]:
        if self.model_ema is None:
            return {}
        return {k: v for k, v in self.state_dict().items() if k.startswith(EMA_PREFIX)}


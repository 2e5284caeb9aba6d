"""The parts of a latent diffusion model under their original LDM names.

`StableDiffusion` owns `model.diffusion_model` (UNet), `first_stage_model` (KL autoencoder) and
`cond_stage_model` (text encoder), so `state_dict()` has exactly the key names of the original
SD 1.x/2.x single-file checkpoints. The noise schedule is a non-persistent buffer set: it is
rebuilt from the config, never read from or written to checkpoints.

The config is a plain dict (what a Hydra `model/*.yaml` holds, and what checkpoints store):

    unet:         UNetModel kwargs (LDM names)
    first_stage:  {"ddconfig": {...}, "embed_dim": 4}
    cond_stage:   {"kind": "clip" | "openclip", ...embedder kwargs}
    scale_factor: 0.18215
    prediction_type: epsilon | v_prediction
    schedule:     {"beta_schedule": "scaled_linear", "linear_start": 0.00085, "linear_end": 0.012,
                   "num_train_timesteps": 1000}
    image_size:   the native resolution in pixels (512; 768 for SD 2.x-768), the default for sampling
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ldm.diffusion.schedule import NoiseSchedule, make_betas
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.encoders import CLIPTextEmbedder, OpenCLIPTextEmbedder
from ldm.models.unet import UNetModel

PREDICTION_TYPES = ("epsilon", "v_prediction")
TEXT_ENCODERS = {"clip": CLIPTextEmbedder, "openclip": OpenCLIPTextEmbedder}
DEFAULT_SCHEDULE = {
    "beta_schedule": "scaled_linear",
    "linear_start": 0.00085,
    "linear_end": 0.012,
    "num_train_timesteps": 1000,
}


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model`, which gives LDM's `model.diffusion_model.*` names."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        return self.diffusion_model(x, t, context=context, y=y)


def downsampling_factor(first_stage: dict[str, Any]) -> int:
    """Pixels per latent along each side: 2^(levels-1) of the autoencoder (8 for SD)."""
    return 2 ** (len(first_stage["ddconfig"]["ch_mult"]) - 1)


def build_text_encoder(cfg: dict[str, Any], tokenizer_dir: str | None = None) -> nn.Module:
    kwargs = dict(cfg)
    kind = kwargs.pop("kind")
    if kind not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder kind {kind!r}; known: {sorted(TEXT_ENCODERS)}")
    if tokenizer_dir is not None:
        kwargs["tokenizer_dir"] = tokenizer_dir
    return TEXT_ENCODERS[kind](**kwargs)


def normalize_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A deep copy with defaults filled in and the prediction type checked."""
    cfg = copy.deepcopy(dict(cfg))
    cfg.setdefault("scale_factor", 0.18215)
    cfg.setdefault("prediction_type", "epsilon")
    cfg.setdefault("image_size", 768 if cfg["prediction_type"] == "v_prediction" else 512)
    cfg["schedule"] = {**DEFAULT_SCHEDULE, **(cfg.get("schedule") or {})}
    if cfg["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type={cfg['prediction_type']!r} is not one of {PREDICTION_TYPES} "
            "(diffusers' names: epsilon for SD 1.x and SD 2.x-base, v_prediction for SD 2.x-768)"
        )
    return cfg


class StableDiffusion(nn.Module):
    """UNet + first stage + text encoder, wired as in LDM's `LatentDiffusion` (no training logic)."""

    def __init__(
        self,
        unet: dict[str, Any],
        first_stage: dict[str, Any],
        cond_stage: dict[str, Any],
        scale_factor: float = 0.18215,
        prediction_type: str = "epsilon",
        schedule: dict[str, Any] | None = None,
        image_size: int | None = None,
        tokenizer_dir: str | None = None,
    ):
        super().__init__()
        self.config = normalize_config(
            {
                "unet": dict(unet),
                "first_stage": dict(first_stage),
                "cond_stage": dict(cond_stage),
                "scale_factor": scale_factor,
                "prediction_type": prediction_type,
                "schedule": dict(schedule or {}),
                **({"image_size": image_size} if image_size else {}),
            }
        )
        self.model = DiffusionWrapper(UNetModel(**self.config["unet"]))
        self.first_stage_model = AutoencoderKL(**self.config["first_stage"])
        self.cond_stage_model = build_text_encoder(self.config["cond_stage"], tokenizer_dir)
        sched = self.config["schedule"]
        self.schedule = NoiseSchedule(
            make_betas(
                sched["beta_schedule"],
                sched["num_train_timesteps"],
                linear_start=sched["linear_start"],
                linear_end=sched["linear_end"],
            )
        )

    @classmethod
    def from_config(cls, cfg: dict[str, Any], tokenizer_dir: str | None = None) -> StableDiffusion:
        return cls(**normalize_config(cfg), tokenizer_dir=tokenizer_dir)

    @property
    def scale_factor(self) -> float:
        return self.config["scale_factor"]

    @property
    def prediction_type(self) -> str:
        return self.config["prediction_type"]

    @property
    def latent_channels(self) -> int:
        return self.config["first_stage"]["embed_dim"]

    @property
    def downsampling_factor(self) -> int:
        return downsampling_factor(self.config["first_stage"])

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    def encode_text(self, prompts: list[str]) -> Tensor:
        tokens = self.cond_stage_model.tokenize(prompts).to(self.device_of_text())
        return self.cond_stage_model.encode(tokens)

    def device_of_text(self) -> torch.device:
        return next(self.cond_stage_model.parameters()).device

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] to scaled latents (a posterior sample, as in training)."""
        return self.scale_factor * self.first_stage_model.encode(images).sample(generator)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents to images in [-1, 1] (unclamped)."""
        return self.first_stage_model.decode(latents / self.scale_factor)

    def apply_model(self, x: Tensor, t: Tensor, context: Tensor | None) -> Tensor:
        return self.model(x, t, context=context)

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
    concat:       what joins z_t's channels at the UNet input (see `CONCAT_KINDS`); inferred from the
                  UNet's in_channels when absent, and sets them when they are null
    semantic_classes: K, the classes of a semantic-map model (concat: semantic_map)
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
# What a UNet sees besides z_t, concatenated to its channels (C = the latent channels):
#   None          text-to-image: C channels
#   inpainting    the mask and the masked image's latents (SD inpainting): 2C + 1
#   image         the conditioning image's latents, unscaled posterior mode (InstructPix2Pix): 2C
#   semantic_map  a one-hot map of K classes at latent size: C + K
CONCAT_KINDS = (None, "inpainting", "image", "semantic_map")
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


def concat_channels(kind: str | None, latent_channels: int, semantic_classes: int | None = None) -> int:
    """The UNet's in_channels for a concat kind."""
    if kind == "semantic_map":
        if not semantic_classes or semantic_classes < 1:
            raise ValueError("concat=semantic_map needs semantic_classes (the number of classes in the maps)")
        return latent_channels + semantic_classes
    return {None: latent_channels, "inpainting": 2 * latent_channels + 1, "image": 2 * latent_channels}[kind]


def _concat_kind(cfg: dict[str, Any]) -> str | None:
    """The config's concat kind, inferred from the UNet's in_channels when not given, and checked."""
    latent, in_channels = cfg["first_stage"]["embed_dim"], cfg["unet"]["in_channels"]
    kind = cfg.get("concat")
    if kind not in CONCAT_KINDS:
        raise ValueError(f"concat={kind!r} is not one of {list(CONCAT_KINDS)}")
    if in_channels is None:  # derived: what the conditioning/ configs leave to the concat kind
        cfg["unet"]["in_channels"] = concat_channels(kind, latent, cfg.get("semantic_classes"))
        return kind
    if kind is None:
        inferred = {latent: None, 2 * latent + 1: "inpainting", 2 * latent: "image"}
        if in_channels not in inferred:
            raise ValueError(
                f"the UNet takes {in_channels} input channels: neither text-to-image ({latent}, the latent "
                f"channels), inpainting ({2 * latent + 1}) nor InstructPix2Pix-style image conditioning "
                f"({2 * latent}); a semantic-map model needs concat=semantic_map and "
                f"semantic_classes={in_channels - latent}"
            )
        return inferred[in_channels]
    expected = concat_channels(kind, latent, cfg.get("semantic_classes"))
    if in_channels != expected:
        raise ValueError(
            f"concat={kind} with {latent} latent channels needs a UNet of {expected} input channels, "
            f"not {in_channels}: set model.unet.in_channels={expected}"
        )
    return kind


# UNet options that change no weights: a fine-tune's model config sets them on top of the architecture
# read from its checkpoint (gradient checkpointing saves activation memory; dropout is a training choice).
RUNTIME_UNET_OPTIONS = ("use_checkpoint", "dropout")


def with_runtime_options(cfg: dict[str, Any], model_cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` (a checkpoint's architecture) with the runtime options that `model_cfg` sets."""
    cfg = copy.deepcopy(cfg)
    given = model_cfg.get("unet") or {}
    cfg["unet"].update({k: given[k] for k in RUNTIME_UNET_OPTIONS if given.get(k) is not None})
    return cfg


def with_concat(cfg: dict[str, Any], kind: str | None, semantic_classes: int | None = None) -> dict[str, Any]:
    """`cfg` retargeted to another concat kind: the UNet's in_channels follow (all else stays)."""
    cfg = copy.deepcopy(cfg)
    cfg.update(concat=kind, semantic_classes=semantic_classes)
    cfg["unet"]["in_channels"] = concat_channels(kind, cfg["first_stage"]["embed_dim"], semantic_classes)
    return normalize_config(cfg)


def normalize_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A deep copy with defaults filled in and the prediction type and input channels checked."""
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
    cfg["concat"] = _concat_kind(cfg)
    if cfg["concat"] == "semantic_map":
        cfg["semantic_classes"] = int(cfg["semantic_classes"])
    else:
        cfg.pop("semantic_classes", None)
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
        concat: str | None = None,
        semantic_classes: int | None = None,
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
                "concat": concat,
                **({"semantic_classes": semantic_classes} if semantic_classes else {}),
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
    def concat(self) -> str | None:
        """What joins z_t at the UNet input: None, "inpainting", "image" or "semantic_map"."""
        return self.config["concat"]

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
        return self.cond_stage_model.encode(self.text_tokens(prompts))

    def text_tokens(self, prompts: list[str] | Tensor) -> Tensor:
        """The prompts' token ids (or ids tokenized already) on the text encoder's device."""
        tokens = prompts if isinstance(prompts, Tensor) else self.cond_stage_model.tokenize(prompts)
        device = self.device_of_text()
        if device.type == "cuda" and tokens.device.type == "cpu":
            # from pinned memory the copy does not wait for the GPU to drain
            tokens = (tokens if tokens.is_pinned() else tokens.pin_memory()).to(device, non_blocking=True)
        return tokens.to(device)

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

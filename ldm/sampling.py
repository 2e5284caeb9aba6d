"""Text-to-image generation with a StableDiffusion model: seed → z_T → sampler(UNet ∘ CFG) → z_0 → image.

Initial latents follow diffusers' convention, so the same weights, prompt, seed and sampler settings
give the same image as its StableDiffusionPipeline: `torch.randn((n, C, H/f, W/f),
generator=torch.Generator("cpu").manual_seed(seed))` in float32, then moved to the device, and the
sampler draws any further noise from the same generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ldm.diffusion.samplers import SAMPLERS, classifier_free_guidance, sample
from ldm.models.stable_diffusion import StableDiffusion


@dataclass
class SamplerSettings:
    """What decides the image besides weights, prompt and seed."""

    sampler: str = "ddim"
    steps: int = 50
    guidance_scale: float = 7.5
    eta: float = 0.0
    karras: bool = False
    timestep_spacing: str | None = None
    steps_offset: int | None = None

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {sorted(SAMPLERS)}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")


def initial_noise(
    n: int, channels: int, height: int, width: int, factor: int, generator: torch.Generator
) -> Tensor:
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor} (the autoencoder's downsampling)")
    return torch.randn((n, channels, height // factor, width // factor), generator=generator, dtype=torch.float32)


@torch.no_grad()
def generate(
    model: StableDiffusion,
    prompts: list[str],
    negative_prompt: str = "",
    settings: SamplerSettings | None = None,
    *,
    height: int = 512,
    width: int = 512,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    callback: Callable | None = None,
) -> Tensor:
    """Images in [0, 1], shape (len(prompts), 3, height, width).

    `noise` (unit Gaussian latents) may be given to pin z_T, e.g. for validation images during training;
    otherwise it is drawn from `generator` (a CPU generator).
    """
    settings = settings or SamplerSettings()
    if model.config["unet"]["in_channels"] != model.latent_channels:
        raise ValueError(
            f"this UNet takes {model.config['unet']['in_channels']} input channels (an inpainting or other "
            "image-conditioned model); text-to-image sampling needs one with "
            f"{model.latent_channels} (the latent channels)"
        )
    param = next(model.model.parameters())
    device, dtype = param.device, param.dtype
    if generator is None:
        generator = torch.Generator("cpu").manual_seed(0)
    if noise is None:
        noise = initial_noise(
            len(prompts), model.latent_channels, height, width, model.downsampling_factor, generator
        )
    noise = noise.to(device=device, dtype=dtype)
    context = model.encode_text(list(prompts)).to(dtype)
    uncond = model.encode_text([negative_prompt] * len(prompts)).to(dtype) if settings.guidance_scale != 1 else None
    denoiser = classifier_free_guidance(model.apply_model, context, uncond, settings.guidance_scale)
    sched = model.config["schedule"]
    latents = sample(
        settings.sampler,
        denoiser,
        noise,
        model.schedule.alphas_cumprod,
        settings.steps,
        spacing=settings.timestep_spacing or sched.get("timestep_spacing", "leading"),
        steps_offset=settings.steps_offset if settings.steps_offset is not None else sched.get("steps_offset", 1),
        prediction_type=model.prediction_type,
        generator=generator,
        eta=settings.eta,
        karras=settings.karras,
        callback=callback,
    )
    images = model.decode_latents(latents)
    return (images.float() / 2 + 0.5).clamp(0, 1)


def to_uint8(images: Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) in [0, 1] to a list of H×W×3 uint8 arrays, rounded as diffusers rounds."""
    arrays = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return list(arrays)


def image_grid(images: list[np.ndarray]) -> np.ndarray:
    """H×W×3 uint8 images tiled row by row into a near-square grid."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    h, w, c = images[0].shape
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, image in enumerate(images):
        grid[(i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = image
    return grid

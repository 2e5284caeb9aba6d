"""Image generation with a StableDiffusion model: seed → z_T → sampler(UNet ∘ CFG) → z_0 → image.

Text-to-image, and the image-conditioned models whose UNet also sees something concatenated to z_t
(`StableDiffusion.concat`):
- inpainting (9-channel UNets, SD inpainting checkpoints): the mask and the latents of the image with
  the masked area blanked, as in LDM's LatentInpaintDiffusion and diffusers'
  StableDiffusionInpaintPipeline (with its strength);
- image (8 channels, InstructPix2Pix): the unscaled posterior mode of the conditioning image, with
  guidance over text and image as in diffusers' StableDiffusionInstructPix2PixPipeline;
- semantic_map (C + K channels): a one-hot map of K classes, area-averaged to latent size.

Initial latents follow diffusers' convention, so the same weights, prompt, seed and sampler settings
give the same image as its StableDiffusionPipeline: `torch.randn((n, C, H/f, W/f),
generator=torch.Generator("cpu").manual_seed(seed))` in float32, then moved to the device, and the
sampler draws any further noise from the same generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

from ldm.data.transforms import ORIENTATION
from ldm.diffusion.samplers import SAMPLERS, classifier_free_guidance, image_text_guidance, sample
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
    image_guidance_scale: float = 1.5  # InstructPix2Pix-style models only (diffusers' default)
    strength: float = 0.8  # image-to-image and inpainting: the share of the steps run from the noised picture

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


def image_to_tensor(image: Image.Image, height: int, width: int) -> Tensor:
    """A picture as a (1, 3, H, W) tensor in [-1, 1], resized (Lanczos) to width × height."""
    image = image.convert("RGB").resize((width, height), resample=Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1


def mask_to_tensor(mask: Image.Image, height: int, width: int) -> Tensor:
    """An inpainting mask as (1, 1, H, W) of 0 and 1: 1 (white, grey at least half) is repainted."""
    mask = mask.convert("L").resize((width, height), resample=Image.Resampling.LANCZOS)
    return (torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0) >= 0.5).float()[None, None]


@torch.no_grad()
def inpainting_condition(
    model: StableDiffusion, image: Tensor, mask: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """The extra UNet input of an inpainting model, (1, 1 + C, H/f, W/f): the mask at latent size
    (nearest) and the latents of the image with the masked area blanked (a posterior sample drawn from
    `generator`, after the initial noise, as diffusers draws it). `image` in [-1, 1], `mask` in {0, 1}."""
    if image.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape[-2:])} and mask {tuple(mask.shape[-2:])} differ in size")
    param = next(model.first_stage_model.parameters())
    factor = model.downsampling_factor
    small_mask = F.interpolate(mask.float(), size=(mask.shape[-2] // factor, mask.shape[-1] // factor))
    masked = (image.float() * (mask < 0.5)).to(device=param.device, dtype=param.dtype)
    latents = model.encode_images(masked, generator)
    return torch.cat([small_mask.to(latents), latents], dim=1)


@torch.no_grad()
def image_condition(model: StableDiffusion, image: Tensor) -> Tensor:
    """The extra UNet input of an InstructPix2Pix-style model, (B, C, H/f, W/f): the posterior mode of
    the conditioning image, unscaled (as InstructPix2Pix trained it). `image` in [-1, 1]."""
    param = next(model.first_stage_model.parameters())
    return model.first_stage_model.encode(image.to(device=param.device, dtype=param.dtype)).mode()


def semantic_condition(seg: Tensor, num_classes: int, size: tuple[int, int], check: bool = True) -> Tensor:
    """Class-index maps (B, H, W) as (B, K, h, w): one-hot, area-averaged to the latent size `size`
    (each latent pixel holds the share of each class in its footprint). `check=False` skips the range
    check, a read of the labels on the host (a GPU stall): for training, whose loader has already skipped
    maps with labels >= data.num_classes."""
    if seg.dtype.is_floating_point or seg.dim() != 3:
        raise ValueError(
            f"a semantic map is an integer (B, H, W) tensor of class indices, got {seg.dtype} {tuple(seg.shape)}"
        )
    if check and seg.numel() and (seg.min() < 0 or seg.max() >= num_classes):
        raise ValueError(
            f"semantic map labels must lie in [0, {num_classes}) for this model, "
            f"found {int(seg.min())}..{int(seg.max())}"
        )
    one_hot = F.one_hot(seg.long(), num_classes).permute(0, 3, 1, 2).float()
    return F.interpolate(one_hot, size=size, mode="area")


# What sample.py asks for, per concat kind.
_CONCAT_INPUTS = {"inpainting": "image=PATH and mask=PATH", "image": "image=PATH", "semantic_map": "seg=PATH"}


def _check_concat(model: StableDiffusion, concat: Tensor | None) -> None:
    kind, expected = model.concat, model.config["unet"]["in_channels"]
    if concat is None:
        if kind is not None:
            raise ValueError(
                f"this is a {kind} model (its UNet takes {expected} input channels): give {_CONCAT_INPUTS[kind]}"
            )
        return
    if kind is None:
        raise ValueError("this is a text-to-image model: it takes no image, mask or seg input; drop them")
    if model.latent_channels + concat.shape[1] != expected:
        raise ValueError(
            f"this {kind} model's UNet takes {expected} input channels, not {model.latent_channels} latent + "
            f"{concat.shape[1]} conditioning channels"
        )


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs on a GPU


def compile_unet(model: StableDiffusion, mode: str = "default") -> None:
    """torch.compile the model's UNet in place for sampling (its state_dict keys stay LDM's), in `mode`.

    The first image waits for the compilation; later ones at the same size and batch reuse it. Under the
    modes that capture CUDA graphs (`reduce-overhead`, `max-autotune`) a UNet output lives in the graph's own
    memory, which the next step overwrites, so `generate` copies each denoiser output out of it.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
    model.model.diffusion_model.compile(mode=mode)
    model.sampling_compile_mode = mode


def apply_with_concat(model: StableDiffusion, x: Tensor, t: Tensor, context: dict[str, Tensor]) -> Tensor:
    """The UNet on z_t with `context["concat"]` joined to its channels (z_t first, as LDM and diffusers)."""
    return model.apply_model(torch.cat([x, context["concat"]], dim=1), t, context["crossattn"])


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
    concat: Tensor | None = None,
    init_latents: Tensor | None = None,
    callback: Callable | None = None,
) -> Tensor:
    """Images in [0, 1], shape (len(prompts), 3, height, width).

    `noise` (unit Gaussian latents) may be given to pin z_T, e.g. for validation images during training;
    otherwise it is drawn from `generator` (a CPU generator). `concat` (1 or B, k, h, w) is appended to
    z_t's channels at every step, as the model's `concat` kind asks: `inpainting_condition(...)`,
    `image_condition(...)` (guided by `settings.image_guidance_scale` too) or `semantic_condition(...)`.
    `init_latents` (1 or B, C, h, w; scaled, e.g. `model.encode_images(picture, generator)`) makes it
    image-to-image: `noise` noises them to the step that `settings.strength` starts from.
    """
    settings = settings or SamplerSettings()
    _check_concat(model, concat)
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
    uncond = model.encode_text([negative_prompt] * len(prompts)).to(dtype) if settings.guidance_scale > 1 else None
    network: Callable = model.apply_model
    if concat is not None:
        if concat.shape[-2:] != noise.shape[-2:]:
            raise ValueError(f"concat {tuple(concat.shape[-2:])} does not match the latents {tuple(noise.shape[-2:])}")
        extra = concat.to(device=device, dtype=dtype).expand(len(prompts), -1, -1, -1)
        network = partial(apply_with_concat, model)
        if model.concat == "image":
            # InstructPix2Pix: a third pass sees neither text nor image (zero latents). Without guidance
            # (g <= 1) only the conditional pass runs and `negative` goes unused.
            negative = uncond if uncond is not None else context
            denoiser = image_text_guidance(
                network,
                {"crossattn": context, "concat": extra},
                {"crossattn": negative, "concat": extra},
                {"crossattn": negative, "concat": torch.zeros_like(extra)},
                settings.guidance_scale,
                settings.image_guidance_scale,
            )
        else:  # the mask, image or map is part of the input: guidance is over the text alone
            context = {"crossattn": context, "concat": extra}
            uncond = None if uncond is None else {"crossattn": uncond, "concat": extra}
    if concat is None or model.concat != "image":
        denoiser = classifier_free_guidance(network, context, uncond, settings.guidance_scale)
    if getattr(model, "sampling_compile_mode", None) in CUDA_GRAPH_MODES:
        denoiser = _copied_out(denoiser)  # without guidance it returns the UNet's output itself
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
        init_latents=None if init_latents is None else init_latents.to(noise).expand_as(noise),
        strength=settings.strength,
    )
    images = model.decode_latents(latents)
    return (images.float() / 2 + 0.5).clamp(0, 1)


def _copied_out(denoiser: Callable) -> Callable:
    """The denoiser with its output copied, so a sampler may keep it past the next step (PLMS keeps old
    outputs) when the UNet runs in a CUDA graph."""

    def copied(*args, **kwargs):  # noqa: ANN002, ANN003
        return denoiser(*args, **kwargs).clone()

    return copied


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


# ----------------------------------------------------------------------------------------------
# From pictures and settings to images: what sample.py does, for Python users
#
#     from ldm import load_model, generate
#     model = load_model("v1-5-pruned-emaonly.safetensors")
#     images = generate(model, ["a castle on a hill, oil painting"], seed=42)          # text to image
#     images = generate(model, ["a watercolour castle"], image="sketch.png", strength=0.6)
#     images = generate(inpaint_model, ["a red sofa"], image="room.png", mask="mask.png")


class InputError(ValueError):
    """A picture, mask, map or setting a model cannot take; the message names it and the fix."""


def read_picture(source: str | Path | Image.Image, what: str, upright: bool = True) -> Image.Image:
    """A PIL image from a path (or the image itself); `what` names the input in errors (image, mask, seg).
    With `upright`, a file's EXIF orientation turns it upright, as diffusers' load_image and AUTOMATIC1111
    read a phone photo (a file without one is returned as opened, its text chunks kept)."""
    if isinstance(source, Image.Image):
        return source
    try:
        image = Image.open(source)
        if upright and image.getexif().get(ORIENTATION, 1) != 1:
            return ImageOps.exif_transpose(image)
        return image
    except FileNotFoundError:
        raise InputError(f"{what}={source} does not exist") from None
    except OSError as err:
        raise InputError(f"{what}={source} is not an image PIL can read ({err})") from None


def read_segmentation(source: str | Path | Image.Image, height: int, width: int) -> Tensor:
    """A class-index PNG (mode L or P: the pixel values are the labels) as a (1, H, W) int64 tensor."""
    seg = read_picture(source, "seg")
    if seg.mode not in ("L", "P", "I", "I;16"):
        raise InputError(
            f"seg={source} is a {seg.mode} image: a semantic map is a single-channel PNG whose pixel values are "
            "class indices (mode L or P)"
        )
    seg = seg.resize((width, height), resample=Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(seg).astype(np.int64))[None]


def output_size(
    model: StableDiffusion, image: str | Path | Image.Image | None = None, height: int | None = None,
    width: int | None = None,
) -> tuple[int, int]:
    """(height, width): as asked; else the input picture's size for image-to-image and edit models
    (rounded down to the autoencoder's multiple, as diffusers' img2img and InstructPix2Pix pipelines
    do); else the model's native size."""
    for name, value in (("height", height), ("width", width)):
        if value is not None and value < 1:  # not 0 as "unset": `height or native` would take it so
            raise InputError(f"{name} must be at least 1, got {value} (or leave it out: {name}=null)")
    if model.concat in (None, "image") and image is not None and (height is None or width is None):
        factor = model.downsampling_factor
        w, h = (v - v % factor for v in read_picture(image, "image").size)
        return height or h, width or w
    return height or model.config["image_size"], width or model.config["image_size"]


def resolve_strength(model: StableDiffusion, strength: float | None, image: object | None) -> float:
    """The strength a run uses: as given, else diffusers' defaults (img2img 0.8, inpainting 1)."""
    img2img = model.concat is None and image is not None
    if strength is not None and not (img2img or model.concat == "inpainting"):
        raise InputError(
            "strength applies to image-to-image (a text-to-image checkpoint with image=) and inpainting only"
        )
    if strength is None:
        return 0.8 if img2img else 1.0
    return float(strength)


def _wrong_inputs(model: StableDiffusion, given: set[str], wanted: set[str]) -> str:
    kind, channels = model.concat, model.config["unet"]["in_channels"]
    extra = " and ".join(f"{k}=" for k in sorted(given - wanted))
    if kind is None:
        return (
            f"this is a text-to-image model ({channels} UNet input channels), not an inpainting model or another "
            f"image-conditioned one: it takes image=PATH alone (image-to-image, with strength=); drop "
            + " and ".join(f"{k}=" for k in sorted(given - {"image"}))
        )
    if kind == "inpainting" and given and given < wanted:
        return "inpainting needs both image=PATH and mask=PATH (white = the area to repaint)"
    needs = " and ".join(f"{k}=PATH" for k in sorted(wanted))
    article = "an" if kind[0] in "aeiou" else "a"
    return f"this is {article} {kind} model (its UNet takes {channels} input channels): give {needs}" + (
        f" and drop {extra}" if extra else ""
    )


def check_inputs(model: StableDiffusion, image: object = None, mask: object = None, seg: object = None) -> None:
    """The pictures a model takes, or one line saying which it takes."""
    given = {k for k, v in (("image", image), ("mask", mask), ("seg", seg)) if v is not None}
    wanted = {None: set(), "inpainting": {"image", "mask"}, "image": {"image"}, "semantic_map": {"seg"}}[model.concat]
    if model.concat is None and given <= {"image"}:
        return  # text to image, or image to image
    if given != wanted:
        raise InputError(_wrong_inputs(model, given, wanted))


@torch.no_grad()
def start_latents(
    model: StableDiffusion, image: object, mask: object, height: int, width: int, generator: torch.Generator,
    strength: float,
) -> Tensor | None:
    """The picture's scaled latents where the run starts from it: a text-to-image model given an image
    (image-to-image), or inpainting below strength 1. A posterior sample, drawn before the noise, as
    diffusers' img2img and inpainting pipelines draw it; None otherwise."""
    img2img = model.concat is None and image is not None and mask is None
    if not (img2img or (model.concat == "inpainting" and image is not None and strength < 1)):
        return None
    picture = image_to_tensor(read_picture(image, "image"), height, width)
    param = next(model.first_stage_model.parameters())
    return model.encode_images(picture.to(device=param.device, dtype=param.dtype), generator)


def concat_input(
    model: StableDiffusion, image: object, mask: object, seg: object, height: int, width: int,
    generator: torch.Generator,
) -> Tensor | None:
    """What the model's UNet sees besides z_t, from the image, mask or map; None for text-to-image. Drawn
    after the initial noise (inpainting samples the masked picture's posterior), as diffusers does."""
    check_inputs(model, image, mask, seg)
    if model.concat is None:
        return None
    factor = model.downsampling_factor
    if model.concat == "semantic_map":
        labels = read_segmentation(seg, height, width)
        return semantic_condition(labels, model.config["semantic_classes"], (height // factor, width // factor))
    picture = image_to_tensor(read_picture(image, "image"), height, width)
    if model.concat == "image":
        return image_condition(model, picture)
    return inpainting_condition(model, picture, mask_to_tensor(read_picture(mask, "mask"), height, width), generator)


def generate_images(
    model: StableDiffusion,
    prompts: str | list[str],
    negative_prompt: str = "",
    *,
    image: str | Path | Image.Image | None = None,
    mask: str | Path | Image.Image | None = None,
    seg: str | Path | Image.Image | None = None,
    strength: float | None = None,
    settings: SamplerSettings | None = None,
    seed: int = 0,
    num_images: int = 1,
    batch_size: int | None = None,
    height: int | None = None,
    width: int | None = None,
    up_to: int | None = None,
    callback: Callable | None = None,
    **sampler: object,
) -> list[list[Image.Image]]:
    """For each prompt, `num_images` PIL images: exactly what `sample.py` writes for the same settings.

    `image` starts from a picture (image-to-image, `strength` default 0.8) on a text-to-image model, or is
    the picture an inpainting (with `mask`: white is repainted) or edit model works on; `seg` is a
    semantic-map model's class map. `settings` (or its fields as keywords: `sampler="dpmpp_2m"`,
    `steps=25`, `guidance_scale=7.5`, ...) is the sampler. One CPU generator per prompt, seeded `seed`:
    the same prompt and seed give the same images wherever they stand. `up_to=i` stops after the batch
    holding image i (to regenerate one image of a larger run)."""
    if settings is None:
        settings = SamplerSettings(**sampler)  # type: ignore[arg-type]
    elif sampler:
        raise TypeError(f"give settings or sampler keywords ({sorted(sampler)}), not both")
    if num_images < 1:
        raise InputError(f"num_images must be at least 1, got {num_images}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    check_inputs(model, image, mask, seg)
    height, width = output_size(model, image, height, width)
    settings.strength = resolve_strength(model, strength, image)
    batch_size = batch_size or num_images
    out: list[list[Image.Image]] = []
    for prompt in prompts:
        generator = torch.Generator("cpu").manual_seed(seed)
        init_latents = start_latents(model, image, mask, height, width, generator, settings.strength)
        noise = initial_noise(num_images, model.latent_channels, height, width, model.downsampling_factor, generator)
        concat = concat_input(model, image, mask, seg, height, width, generator)
        images: list[Image.Image] = []
        for start in range(0, num_images if up_to is None else up_to + 1, batch_size):
            chunk = noise[start : start + batch_size]
            batch = generate(
                model, [prompt] * len(chunk), negative_prompt, settings, height=height, width=width,
                generator=generator, noise=chunk, concat=concat, init_latents=init_latents,
                callback=None if callback is None else partial(callback, prompt, start),
            )
            images.extend(Image.fromarray(a) for a in to_uint8(batch))
        out.append(images)
    return out

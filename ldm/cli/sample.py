"""`python sample.py ckpt=PATH prompt="..."`: images from any checkpoint, with Hydra overrides.

    python sample.py ckpt=sd15.safetensors prompt="a castle on a hill" sampler=dpmpp_2m steps=25 seed=42
    python sample.py ckpt=sd21-768.safetensors prediction_type=v_prediction height=768 width=768 prompt="..."
    python sample.py ckpt=out/diffusers prompt_file=prompts.txt num_images=4 \\
        "negative_prompt='blurry, low quality'"
    python sample.py ckpt=sd15.safetensors prompt="a watercolour castle" image=sketch.png strength=0.6
    python sample.py ckpt=sd15-inpainting.safetensors prompt="a red sofa" image=room.png mask=mask.png
    python sample.py ckpt=instruct-pix2pix.safetensors prompt="make it snowy" image=street.png image_guidance_scale=1.5
    python sample.py ckpt=outputs/layout/.../last.ckpt prompt="..." seg=layout.png

Writes numbered PNGs (prompt and settings in their text metadata) and a grid per prompt to `out_dir`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from ldm.checkpoint import CheckpointError, load_model
from ldm.lora import merge_lora_file
from ldm.sampling import (
    SamplerSettings,
    generate,
    image_condition,
    image_grid,
    image_to_tensor,
    initial_noise,
    inpainting_condition,
    mask_to_tensor,
    semantic_condition,
    to_uint8,
)

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UsageError(ValueError):
    """A bad setting, reported as one line that names the fix."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def read_prompts(cfg: DictConfig) -> list[str]:
    if cfg.prompt_file:
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise UsageError(f"prompt_file={path} does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise UsageError(f"prompt_file={path} holds no prompts (one per line)")
        return prompts
    if cfg.prompt is None:
        raise UsageError('give prompt="..." or prompt_file=PATH')
    return [_as_text(cfg.prompt)]


def _as_text(value: Any) -> str:
    # Hydra reads an unquoted `a, b` list override as a sequence: join it back into the text it was.
    if isinstance(value, (list, ListConfig)):
        return ", ".join(str(v) for v in value)
    return str(value)


def read_picture(path: str, what: str) -> Image.Image:
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise UsageError(f"{what}={path} does not exist") from None
    except OSError as err:
        raise UsageError(f"{what}={path} is not an image PIL can read ({err})") from None


def apply_loras(cfg: DictConfig, model: Any) -> None:
    """Merge the `lora` file(s) into the UNet's weights, each at its `lora_scale`."""
    if not cfg.get("lora"):
        return
    paths = list(cfg.lora) if isinstance(cfg.lora, (list, ListConfig)) else [cfg.lora]
    scales = list(cfg.lora_scale) if isinstance(cfg.lora_scale, (list, ListConfig)) else [cfg.lora_scale] * len(paths)
    if len(scales) != len(paths):
        raise UsageError(f"{len(paths)} LoRA files but {len(scales)} lora_scale values: give one, or one per file")
    for path, scale in zip(paths, scales, strict=True):
        try:
            merge_lora_file(model, path, float(scale))
        except FileNotFoundError as err:
            raise UsageError(str(err)) from None


def output_size(cfg: DictConfig, model: Any) -> tuple[int, int]:
    """(height, width): as asked; else the input picture's size for image-to-image and edit models
    (rounded down to the autoencoder's multiple, as diffusers' img2img and InstructPix2Pix pipelines
    do); else the model's native size."""
    if model.concat in (None, "image") and cfg.image is not None and (cfg.height is None or cfg.width is None):
        factor = model.downsampling_factor
        width, height = (v - v % factor for v in read_picture(cfg.image, "image").size)
        return cfg.height or height, cfg.width or width
    return cfg.height or model.config["image_size"], cfg.width or model.config["image_size"]


def read_segmentation(path: str, height: int, width: int) -> torch.Tensor:
    """A class-index PNG (mode L or P: the pixel values are the labels) as a (1, H, W) int64 tensor."""
    seg = read_picture(path, "seg")
    if seg.mode not in ("L", "P", "I", "I;16"):
        raise UsageError(
            f"seg={path} is a {seg.mode} image: a semantic map is a single-channel PNG whose pixel values are "
            "class indices (mode L or P)"
        )
    seg = seg.resize((width, height), resample=Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(seg).astype(np.int64))[None]


def _wrong_inputs(model: Any, given: set[str], wanted: set[str]) -> str:
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


def strength_of(cfg: DictConfig, model: Any) -> float:
    """The strength a run uses: as given, else diffusers' defaults (img2img 0.8, inpainting 1)."""
    img2img = model.concat is None and cfg.image is not None
    if cfg.strength is not None and not (img2img or model.concat == "inpainting"):
        raise UsageError(
            "strength applies to image-to-image (a text-to-image checkpoint with image=) and inpainting only"
        )
    if cfg.strength is None:
        return 0.8 if img2img else 1.0
    return float(cfg.strength)


def img2img_latents(
    cfg: DictConfig, model: Any, height: int, width: int, generator: torch.Generator, strength: float
) -> torch.Tensor | None:
    """The picture's scaled latents where the run starts from it: a text-to-image model given image=
    (image-to-image), or inpainting below strength 1. A posterior sample, drawn before the noise, as
    diffusers' img2img and inpainting pipelines draw it; None otherwise."""
    img2img = model.concat is None and cfg.image is not None and cfg.mask is None and cfg.get("seg") is None
    if not (img2img or (model.concat == "inpainting" and cfg.image is not None and strength < 1)):
        return None
    picture = image_to_tensor(read_picture(cfg.image, "image"), height, width)
    param = next(model.first_stage_model.parameters())
    with torch.no_grad():
        return model.encode_images(picture.to(device=param.device, dtype=param.dtype), generator)


def concat_input(
    cfg: DictConfig, model: Any, height: int, width: int, generator: torch.Generator
) -> torch.Tensor | None:
    """What the model's UNet sees besides z_t, from image=, mask= and seg=; None for text-to-image."""
    given = {k: cfg.get(k) for k in ("image", "mask", "seg") if cfg.get(k) is not None}
    wanted = {None: set(), "inpainting": {"image", "mask"}, "image": {"image"}, "semantic_map": {"seg"}}[model.concat]
    if model.concat is None and set(given) == {"image"}:
        return None  # image-to-image: the picture starts the run (see img2img_latents), nothing is concatenated
    if set(given) != wanted:
        raise UsageError(_wrong_inputs(model, set(given), wanted))
    if model.concat is None:
        return None
    factor = model.downsampling_factor
    if model.concat == "semantic_map":
        seg = read_segmentation(cfg.seg, height, width)
        return semantic_condition(seg, model.config["semantic_classes"], (height // factor, width // factor))
    image = image_to_tensor(read_picture(cfg.image, "image"), height, width)
    if model.concat == "image":
        return image_condition(model, image)
    mask = mask_to_tensor(read_picture(cfg.mask, "mask"), height, width)
    return inpainting_condition(model, image, mask, generator)


def png_metadata(settings: dict[str, Any]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in settings.items():
        info.add_text(key, str(value))
    info.add_text("parameters", json.dumps(settings))
    return info


def save_png(image: Image.Image, path: Path, info: PngImagePlugin.PngInfo | None = None) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp, pnginfo=info)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def next_index(out_dir: Path) -> int:
    """Numbering continues after the PNGs already there, so a second run never overwrites the first."""
    taken = [int(p.stem) for p in out_dir.glob("*.png") if p.stem.isdigit()]
    return max(taken, default=-1) + 1


def run(cfg: DictConfig) -> list[Path]:
    prompts = read_prompts(cfg)
    negative = _as_text(cfg.negative_prompt)
    if cfg.dtype not in DTYPES:
        raise UsageError(f"dtype={cfg.dtype} is not one of {sorted(DTYPES)}")
    if cfg.num_images < 1:
        raise UsageError(f"num_images must be at least 1, got {cfg.num_images}")
    batch_size = cfg.batch_size or cfg.num_images
    settings = SamplerSettings(
        sampler=cfg.sampler.name,
        steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        eta=cfg.sampler.get("eta", 0.0),
        karras=cfg.sampler.get("karras", False),
        timestep_spacing=cfg.timestep_spacing,
        steps_offset=cfg.steps_offset,
        image_guidance_scale=cfg.image_guidance_scale,
    )
    device = resolve_device(cfg.device)
    model = load_model(
        cfg.ckpt, cfg.prediction_type, cfg.ema, cfg.allow_unsafe_pickle,
        force_prediction_type=bool(cfg.get("force_prediction_type", False)),
    )
    apply_loras(cfg, model)
    model.to(device=device, dtype=DTYPES[cfg.dtype])
    height, width = output_size(cfg, model)
    settings.strength = strength_of(cfg, model)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = next_index(out_dir)
    written: list[Path] = []
    for prompt in prompts:
        # One generator per prompt: the same prompt and seed give the same images wherever they stand.
        generator = torch.Generator("cpu").manual_seed(cfg.seed)
        init_latents = img2img_latents(cfg, model, height, width, generator, settings.strength)
        noise = initial_noise(
            cfg.num_images, model.latent_channels, height, width, model.downsampling_factor, generator
        )
        concat = concat_input(cfg, model, height, width, generator)
        images = []
        for start in range(0, cfg.num_images, batch_size):
            chunk = noise[start : start + batch_size]
            bar = tqdm(total=settings.steps, desc=f"{prompt[:40]!r} {start + 1}/{cfg.num_images}", leave=False)
            batch = generate(
                model,
                [prompt] * len(chunk),
                negative,
                settings,
                height=height,
                width=width,
                generator=generator,
                noise=chunk,
                concat=concat,
                init_latents=init_latents,
                callback=lambda *_, bar=bar: bar.update(),
            )
            bar.close()
            images.extend(Image.fromarray(a) for a in to_uint8(batch))
        meta = {
            "prompt": prompt,
            "negative_prompt": negative,
            "sampler": settings.sampler,
            "steps": settings.steps,
            "guidance_scale": settings.guidance_scale,
            "seed": cfg.seed,
            "height": height,
            "width": width,
            "checkpoint": str(cfg.ckpt),
            **{k: str(cfg.get(k)) for k in ("image", "mask", "seg") if cfg.get(k) is not None},
            **({"image_guidance_scale": settings.image_guidance_scale} if model.concat == "image" else {}),
            **({"strength": settings.strength} if init_latents is not None else {}),
            **({"lora": str(cfg.lora), "lora_scale": str(cfg.lora_scale)} if cfg.get("lora") else {}),
        }
        for i, image in enumerate(images):
            path = out_dir / f"{index:05d}.png"
            save_png(image, path, png_metadata({**meta, "image_index": i}))
            written.append(path)
            index += 1
        if cfg.grid and len(images) > 1:
            grid_path = out_dir / f"grid-{index - len(images):05d}.png"
            save_png(Image.fromarray(image_grid([np.asarray(im) for im in images])), grid_path, png_metadata(meta))
            written.append(grid_path)
    return written


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    try:
        written = run(cfg)
    except (CheckpointError, UsageError, ValueError) as err:
        raise SystemExit(f"sample.py: error: {err}") from None
    log.info("wrote %d files to %s", len(written), cfg.out_dir)
    print(f"wrote {len(written)} images to {cfg.out_dir}")


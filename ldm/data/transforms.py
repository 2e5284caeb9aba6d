"""Image transforms between PIL images, model tensors in [-1, 1] and uint8 arrays.

`plan_crop` makes the random draws of a resize-and-crop once, and `apply_crop` applies them to
any image of the same picture (the image, its conditioning image, its label map), so all stay
pixel-aligned; `resize_and_crop` does both for a single image.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from io import BytesIO

import numpy as np
import torch
from PIL import Image

# single-channel modes whose pixel values are class indices (a "P" image's indices, not its palette)
LABEL_MODES = ("L", "P", "I", "I;16")


@dataclass(frozen=True)
class CropPlan:
    """Resize to `size`, crop `box` (left, top, right, bottom) from it, then flip if `flip`."""

    size: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool


def plan_crop(
    size: tuple[int, int],
    resolution: int,
    random_crop: bool = False,
    random_flip: bool = False,
    rng: random.Random | None = None,
) -> CropPlan:
    """Where to crop a `resolution` square from an image of `size` (width, height) after resizing.

    The shorter side is resized to `resolution`, which keeps as much of the picture as a square can
    hold (what captions describe). Draws from `rng` in a fixed order (crop left, crop top, flip), so
    a seeded stream stays reproducible.
    """
    return plan_cover_crop(size, (resolution, resolution), random_crop, random_flip, rng)


def plan_cover_crop(
    size: tuple[int, int],
    target: tuple[int, int],
    random_crop: bool = False,
    random_flip: bool = False,
    rng: random.Random | None = None,
) -> CropPlan:
    """Resize an image of `size` (width, height) to cover `target` (width, height), then crop `target` out
    of it (centre, or at random), maybe flipped. Draws crop left, crop top, flip, in that order."""
    rng = rng or random.Random()
    (width, height), (tw, th) = size, target
    scale = max(tw / width, th / height)
    resized = (max(tw, round(width * scale)), max(th, round(height * scale)))
    spare_x, spare_y = resized[0] - tw, resized[1] - th
    if random_crop:
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    else:
        left, top = spare_x // 2, spare_y // 2
    flip = random_flip and rng.random() < 0.5
    return CropPlan(resized, (left, top, left + tw, top + th), flip)


def apply_crop(
    image: Image.Image, plan: CropPlan, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> Image.Image:
    """`image` resized, cropped and flipped as `plan` says.

    An image of another size than the one planned for (a conditioning image, a label map) is resized
    straight to the planned size, so it lines up with the planned image. PIL's bicubic filters over the
    whole footprint when shrinking; label maps need `Image.Resampling.NEAREST` so labels stay labels.
    """
    if image.size != plan.size:
        image = image.resize(plan.size, resample)
    image = image.crop(plan.box)
    if plan.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def resize_and_crop(
    image: Image.Image,
    resolution: int,
    random_crop: bool = False,
    random_flip: bool = False,
    rng: random.Random | None = None,
) -> Image.Image:
    """Resize the shorter side to `resolution`, crop a square (centre or random), maybe flip."""
    return apply_crop(image, plan_crop(image.size, resolution, random_crop, random_flip, rng))


def decode_label_map(data: bytes) -> Image.Image:
    """A segmentation map's class indices as a mode-"I" image, from single-channel image bytes.

    Raises ValueError naming the problem for colour (e.g. RGB) maps: their colours are not indices.
    """
    with Image.open(BytesIO(data)) as image:
        if image.mode not in LABEL_MODES:
            raise ValueError(
                f"mode {image.mode}: a segmentation map must be a single-channel image of class indices "
                f"(mode {' or '.join(LABEL_MODES)}), not colours"
            )
        indices = np.asarray(image)  # decodes fully: truncated files fail here
    return Image.fromarray(indices.astype(np.int32))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor 3xHxW in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """Tensor 3xHxW (or Bx3xHxW) in [-1, 1] -> uint8 array HxWx3 (or BxHxWx3), clamped."""
    scaled = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return scaled.movedim(-3, -1).numpy()

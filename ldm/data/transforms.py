"""Image transforms between PIL images, model tensors in [-1, 1] and uint8 arrays."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image


def resize_and_crop(
    image: Image.Image,
    resolution: int,
    random_crop: bool = False,
    random_flip: bool = False,
    rng: random.Random | None = None,
) -> Image.Image:
    """Resize the shorter side to `resolution`, crop a square (centre or random), maybe flip.

    Resizing before cropping keeps as much of the picture as a square can hold, which is what
    captions describe; PIL's bicubic resize filters over the whole footprint when shrinking.
    """
    rng = rng or random.Random()
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    spare_x, spare_y = size[0] - resolution, size[1] - resolution
    if random_crop:
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    else:
        left, top = spare_x // 2, spare_y // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor 3xHxW in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """Tensor 3xHxW (or Bx3xHxW) in [-1, 1] -> uint8 array HxWx3 (or BxHxWx3), clamped."""
    scaled = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return scaled.movedim(-3, -1).numpy()

"""Random inpainting masks for training inpainting models (1 = the area the model repaints).

SD's inpainting models were trained on synthetic masks, and on a fully masked image for a share of the
samples, which keeps them usable for plain text-to-image. Here a mask is the union of 1 to `max_boxes`
axis-aligned boxes, each side between `min_side` and `max_side` of the image's, at a uniform position;
with probability `full_rate` it covers the whole image. Everything is drawn from the given generator,
so a training run's masks are reproducible and resume with its noise stream.
"""

from __future__ import annotations

import torch
from torch import Tensor


def random_masks(
    n: int,
    height: int,
    width: int,
    generator: torch.Generator,
    full_rate: float = 0.25,
    max_boxes: int = 3,
    min_side: float = 0.1,
    max_side: float = 0.8,
) -> Tensor:
    """(n, 1, height, width) float masks of 0 and 1, drawn on the generator's device."""
    if not 0.0 <= full_rate <= 1.0:
        raise ValueError(f"full_rate must be in [0, 1], got {full_rate}")
    if max_boxes < 1 or not 0.0 < min_side <= max_side <= 1.0:
        raise ValueError(
            f"need max_boxes >= 1 and 0 < min_side <= max_side <= 1; got {max_boxes}, {min_side}, {max_side}"
        )
    device = generator.device

    def uniform(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, device=device)

    full = uniform(n) < full_rate
    count = torch.randint(1, max_boxes + 1, (n,), generator=generator, device=device)
    sides = min_side + (max_side - min_side) * uniform(n, max_boxes, 2)  # (h, w) as shares of the image
    corners = (1 - sides) * uniform(n, max_boxes, 2)
    ys = (torch.arange(height, device=device) + 0.5) / height
    xs = (torch.arange(width, device=device) + 0.5) / width
    top, left = corners[..., 0, None], corners[..., 1, None]
    inside_y = (ys >= top) & (ys < top + sides[..., 0, None])  # (n, boxes, height)
    inside_x = (xs >= left) & (xs < left + sides[..., 1, None])  # (n, boxes, width)
    boxes = inside_y[..., :, None] & inside_x[..., None, :]  # (n, boxes, height, width)
    used = torch.arange(max_boxes, device=device)[None, :] < count[:, None]
    masks = (boxes & used[..., None, None]).any(dim=1) | full[:, None, None]
    return masks[:, None].float()

"""Image transforms between PIL images, model tensors in [-1, 1] and uint8 arrays.

`plan_crop` makes the random draws of a resize-and-crop once, and `apply_crop` applies them to
any image of the same picture (the image, its conditioning image, its label map), so all stay
pixel-aligned; `resize_and_crop` does both for a single image.

Pictures as found in the wild (`open_picture`, `to_rgb`): every loader (WebDataset shards under each
decoder, ldm-cache-latents, DreamBooth folders) reads a picture's pixels the same way:
- turned upright by its EXIF orientation (tag 0x0112, values 2-8: phone photos are stored sideways),
  and sized, bucketed and cropped by its upright size;
- transparency (RGBA, LA, PA, a PNG/GIF palette or colour key) composited onto white, as a viewer
  shows it on a white page, rather than dropped (which shows whatever colour the encoder left under
  the transparent pixels, often black);
- 16-bit greys (PNG "I;16") scaled to 8 bits by their high byte, as PIL reads 16-bit RGB, instead of
  clipped at 255 (nearly white); CMYK, YCCK, greys, palettes and 1-bit as PIL converts them to RGB;
- only the raster formats of `PICTURE_FORMATS` are identified, whatever the file's name says (so bytes
  named .jpg reach no PostScript interpreter), and a header declaring more than `max_pixels()` pixels
  (a decompression bomb) is refused before any pixel is allocated, even where PIL's own limit is off.
Colour profiles (ICC) are not applied, by any decoder. Animated pictures give their first frame.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# single-channel modes whose pixel values are class indices (a "P" image's indices, not its palette)
LABEL_MODES = ("L", "P", "I", "I;16")
# what Image.open may identify a picture as (content decides, not the name): raster formats only
PICTURE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")  # JPEG covers MPO (multi-picture) files
ORIENTATION = 0x0112  # the EXIF tag
# EXIF orientation -> the transpose that turns the stored pixels upright (PIL.ImageOps.exif_transpose's)
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_PIL_MAX_IMAGE_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS (it refuses twice that)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_GREYS = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# apply_crop resizes only the crop's part of the picture when the planned resize is this many times the crop
CROP_FIRST_RATIO = 8
WHITE = (255, 255, 255)


class PictureTooLarge(ValueError):
    """A picture's header declares more pixels than `max_pixels()`."""


def max_pixels() -> int:
    """The most pixels a picture may have: twice PIL's Image.MAX_IMAGE_PIXELS (where PIL itself refuses),
    or twice PIL's default where that limit was turned off (None, as some libraries set it)."""
    return 2 * (Image.MAX_IMAGE_PIXELS or _PIL_MAX_IMAGE_PIXELS)


def check_pixels(size: tuple[int, int]) -> None:
    """PictureTooLarge for a size over `max_pixels()`: decoding it would allocate gigabytes."""
    width, height = size
    if width * height > max_pixels():
        raise PictureTooLarge(
            f"{width}x{height} = {width * height} pixels, over the limit of {max_pixels()} (twice "
            "PIL.Image.MAX_IMAGE_PIXELS): a decompression bomb, or a picture too large to train on"
        )


def open_picture(source: bytes | str | Path) -> Image.Image:
    """A picture opened lazily (header read, pixels not yet decoded) from its bytes or its path, of one of
    `PICTURE_FORMATS` (UnidentifiedImageError otherwise) and at most `max_pixels()` (PictureTooLarge)."""
    image = Image.open(BytesIO(source) if isinstance(source, bytes) else source, formats=PICTURE_FORMATS)
    try:
        check_pixels(image.size)
    except PictureTooLarge:
        image.close()
        raise
    return image


def exif_orientation(image: Image.Image) -> int:
    """The picture's EXIF orientation, 1 (stored upright) to 8; 1 when it has none or it is malformed.

    Read from the header, except for a PNG without EXIF before its pixels: its eXIf chunk may follow them,
    so PIL decodes it first (and decoding errors, a truncated file's, propagate)."""
    if image.format == "PNG" and "exif" not in image.info:
        image.load()
    try:
        value = image.getexif().get(ORIENTATION, 1)
        return value if isinstance(value, int) and value in UPRIGHT else 1
    except Exception:  # noqa: BLE001 - a malformed EXIF block: the picture itself is fine, taken as stored
        return 1


def upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """The (width, height) of a picture of stored `size` once turned upright."""
    return (size[1], size[0]) if orientation >= 5 else size


def to_rgb(image: Image.Image, orientation: int = 1) -> Image.Image:
    """The picture's pixels as training sees them: 8-bit RGB, transparency composited onto white, turned
    upright by `orientation` (`exif_orientation(image)`). Decodes fully: truncated files fail here. For an
    opaque picture stored upright this is `image.convert("RGB")`, pixel for pixel."""
    transparency = image.info.get("transparency")
    if image.mode in _SIXTEEN_BIT_GREYS:
        values = np.asarray(image).astype(np.int64)
        grey = (values.clip(0, 65535) >> 8).astype(np.uint8)
        if isinstance(transparency, int):  # a colour key: that grey level is transparent
            alpha = np.where(values == transparency, 0, 255).astype(np.uint8)
            image = Image.fromarray(np.stack([grey, alpha], axis=-1), "LA")
        else:
            image = Image.fromarray(grey, "L")
        transparency = None
    if image.mode in _ALPHA_MODES or (transparency is not None and image.mode in ("P", "L", "RGB")):
        rgba = image.convert("RGBA")
        rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (*WHITE, 255)), rgba).convert("RGB")
    else:
        rgb = image.convert("RGB")
    return rgb.transpose(UPRIGHT[orientation]) if orientation in UPRIGHT else rgb


def load_rgb(source: bytes | str | Path) -> Image.Image:
    """`open_picture` then `to_rgb`, upright: a picture file's pixels as every loader reads them."""
    with open_picture(source) as image:
        return to_rgb(image, exif_orientation(image))


def decode_text(data: bytes) -> str:
    """Caption bytes as text: UTF-8 (a leading byte-order mark dropped), or UTF-16 with its byte-order
    mark (as Windows editors save "Unicode" text). UnicodeDecodeError for anything else."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    return data.decode("utf-8-sig")


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
    Where the planned resize is over `CROP_FIRST_RATIO` times the crop (a 4000x10 strip covering a
    square: 204800x512 at 512, 400 MB), only the crop's part of the picture is resized, with the same
    filter footprint (pixels within a rounding of the full resize's), so no strip allocates the whole.
    """
    if image.size != plan.size:
        if crops_first(plan):
            left, top, right, bottom = plan.box
            sx, sy = image.size[0] / plan.size[0], image.size[1] / plan.size[1]
            image = image.resize((right - left, bottom - top), resample, box=(left * sx, top * sy, right * sx, bottom * sy))
            return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if plan.flip else image
        image = image.resize(plan.size, resample)
    image = image.crop(plan.box)
    if plan.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def crops_first(plan: CropPlan) -> bool:
    """Whether `apply_crop` resizes only the crop's part of the picture (a planned resize far larger than
    the crop: an extreme aspect ratio)."""
    left, top, right, bottom = plan.box
    return plan.size[0] * plan.size[1] > CROP_FIRST_RATIO * (right - left) * (bottom - top)


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
    with open_picture(data) as image:
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

"""Synthetic demo data: coloured shapes on coloured backgrounds, and a judge for them.

Each sample is a PNG of one shape (circle, square, triangle) in one palette colour on a
background of another, captioned "a red circle on a blue background". The palette is small and
its colours far apart, so `judge_colours` can read both colours back from pixel statistics alone;
`judge_shape` fits every shape, at every placement the data can draw, to the pixels of the shape's
colour. `caption_fidelity`, the demo's score of how well generated images follow prompts, asks of
each image the caption's colours, its shape (fitting best, IoU >= 0.5), and a clean picture (the
caption drawn at that fit agrees with 95% of the pixels off the shape's edge): colour noise with the
right mean colours fails. `colour_fidelity` asks the colours alone.

    ensure_demo_shards("data/demo", num_samples=2000)   # writes data/demo/shapes-00000{0..3}.tar once

A smaller vocabulary (`colours=`, `shapes=`: subsets of `PALETTE` and `SHAPES`) makes a set that a
model learns in fewer steps (the CI demo, experiment=demo_ci); `all_captions` takes the same subsets.
The judge is unchanged: it still reads every palette colour and fits all three shapes.

`shuffle_captions=True` is an ablation control: the same images, with the captions permuted across
them, so a caption says nothing about its image. A model trained on it should follow its prompts only
by chance (1 in `len(all_captions(...))`); if it scores like the model trained on the true captions,
the score is not measuring whether captions are learned.

Variants (`variant=`), for the conditionings besides text:
- "caption": the image (`png`) and its caption (`txt`).
- "semantic": the same samples (same seed, same images) plus `seg.png`, a mode-L label map at the
  image's resolution: 0 background, 1 + SHAPES.index(shape) on the shape (`SEMANTIC_CLASSES` classes).
- "edit": InstructPix2Pix-style pairs: `cond.png` is a shape of one colour on a background, `png` the
  same shape at the same place and size in another colour on the same background, and the caption the
  instruction "make the circle green"; `edit_fidelity` scores edits.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from ldm.data.dreambooth import DreamBoothDataModule
from ldm.data.make_shards import ShardSink
from ldm.data.webdataset import WebDataModule

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
SEMANTIC_CLASSES = 1 + len(SHAPES)  # background, then one class per shape
VARIANTS = ("caption", "semantic", "edit")
Variant = Literal["caption", "semantic", "edit"]
SHARD_PREFIX = "shapes"
MANIFEST = "MANIFEST.json"
_SUPERSAMPLE = 4  # draw large, then shrink: smooth edges without blending in foreign colours
_SIZE_RANGE = (0.4, 0.7)  # a shape's side (its bounding square's) as a share of the image's
_JUDGE_SIDE = 32  # the caption judge compares shapes at this side at most (larger images are shrunk)
_JUDGE_MIN_SIDE = 16  # below, a circle and a square differ by a pixel or two (at 16 px, 1 small circle in ~100 ties)
_CAPTION = re.compile(r"an? (\w+) (\w+) on an? (\w+) background")
_INSTRUCTION = re.compile(r"make the (\w+) (\w+)")
_PALETTE_ARRAY = np.array(list(PALETTE.values()), dtype=np.int32)
_PALETTE_NAMES = list(PALETTE)


def make_caption(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def vocabulary(
    colours: Sequence[str] | None = None, shapes: Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """(colours, shapes) a data set draws from: the whole palette and every shape, or the subsets given
    (in the given order, no repeats, at least two colours and one shape)."""
    colours = _PALETTE_NAMES if colours is None else [str(c) for c in colours]
    shapes = list(SHAPES) if shapes is None else [str(s) for s in shapes]
    unknown = [c for c in colours if c not in PALETTE] + [s for s in shapes if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown colours or shapes {unknown}; colours: {_PALETTE_NAMES}, shapes: {list(SHAPES)}")
    if len(set(colours)) != len(colours) or len(set(shapes)) != len(shapes) or len(colours) < 2 or not shapes:
        raise ValueError(f"need at least 2 different colours and 1 shape, no repeats; got {colours} and {shapes}")
    return colours, shapes


def all_captions(
    colours: Sequence[str] | None = None, shapes: Sequence[str] | None = None, repeats: int = 1
) -> list[str]:
    """Every caption the demo data can hold (shape x colour x different background): the demo's test prompts.
    With `colours`/`shapes`, those of a data set of that smaller vocabulary; `repeats` > 1 lists them all
    that many times over (more images per caption, each from its own noise: a steadier score)."""
    colours, shapes = vocabulary(colours, shapes)
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    captions = [
        make_caption(shape, colour, background)
        for shape in shapes
        for colour in colours
        for background in colours
        if colour != background
    ]
    return captions * repeats


def parse_caption(caption: str) -> tuple[str, str, str]:
    """'a red circle on a blue background' -> ('circle', 'red', 'blue')."""
    match = _CAPTION.fullmatch(caption.strip().lower())
    if match is None or match[1] not in PALETTE or match[2] not in SHAPES or match[3] not in PALETTE:
        raise ValueError(
            f"caption {caption!r} is not of the form 'a <colour> <shape> on a <colour> background' "
            f"with colours {_PALETTE_NAMES} and shapes {list(SHAPES)}"
        )
    return match[2], match[1], match[3]


def edit_instruction(shape: str, colour: str) -> str:
    return f"make the {shape} {colour}"


def all_edit_prompts() -> list[str]:
    """Every instruction the edit variant can hold (shape x colour)."""
    return [edit_instruction(shape, colour) for shape in SHAPES for colour in PALETTE]


def parse_instruction(text: str) -> tuple[str, str]:
    """'make the circle green' -> ('circle', 'green')."""
    match = _INSTRUCTION.fullmatch(text.strip().lower())
    if match is None or match[1] not in SHAPES or match[2] not in PALETTE:
        raise ValueError(
            f"instruction {text!r} is not of the form 'make the <shape> <colour>' "
            f"with shapes {list(SHAPES)} and colours {_PALETTE_NAMES}"
        )
    return match[1], match[2]


@dataclass(frozen=True)
class Placement:
    """Where a shape sits: its bounding square on the supersampled canvas (`_SUPERSAMPLE` x resolution)."""

    left: int
    top: int
    size: int


def random_placement(resolution: int, rng: np.random.Generator) -> Placement:
    """A random size (40-70% of the side) and position, clear of the border ring the judge reads."""
    canvas = resolution * _SUPERSAMPLE
    margin = canvas // 16
    size = int(rng.uniform(*_SIZE_RANGE) * canvas)
    left = int(rng.integers(margin, canvas - margin - size + 1))
    top = int(rng.integers(margin, canvas - margin - size + 1))
    return Placement(left, top, size)


def placement_grid(resolution: int) -> list[Placement]:
    """The placements `random_placement` can draw, on a grid of sizes and positions 1/32 of the side
    apart (a pixel at 32 px, half a pixel at 16): the judge's search space, every size from the
    smallest to the largest, every position clear of the ring."""
    canvas = resolution * _SUPERSAMPLE
    margin = canvas // 16
    smallest = int(_SIZE_RANGE[0] * canvas)
    largest = int(np.nextafter(_SIZE_RANGE[1], 0) * canvas)
    step = max(1, canvas // 32)
    grid = []
    for size in _steps(smallest, largest, step):
        for top in _steps(margin, canvas - margin - size, step):
            grid.extend(Placement(left, top, size) for left in _steps(margin, canvas - margin - size, step))
    return grid


def _steps(first: int, last: int, step: int) -> list[int]:
    """first, first + step, ... and always `last` (first <= last)."""
    values = list(range(first, last + 1, step))
    return values if values[-1] == last else [*values, last]


def _shape_index(shape: str) -> int:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPES)}")
    return SHAPES.index(shape)


def _drawn(shape: str, mode: str, background: Any, fill: Any, resolution: int, at: Placement) -> Image.Image:
    """`shape` drawn on the supersampled canvas, in any mode (colours for images, indices for labels)."""
    _shape_index(shape)  # an unknown shape fails here, by name
    canvas = resolution * _SUPERSAMPLE
    left, top, size = at.left, at.top, at.size
    box = (left, top, left + size - 1, top + size - 1)
    image = Image.new(mode, (canvas, canvas), background)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(left + size / 2, top), (box[2], box[3]), (left, box[3])], fill=fill)
    return image


def draw_shape(shape: str, colour: str, background: str, resolution: int, at: Placement) -> np.ndarray:
    """A uint8 HxWx3 image of `shape` in `colour` at `at` on `background`."""
    image = _drawn(shape, "RGB", PALETTE[background], PALETTE[colour], resolution, at)
    return np.asarray(image.resize((resolution, resolution), Image.Resampling.BOX))


def draw_labels(shape: str, resolution: int, at: Placement) -> np.ndarray:
    """The uint8 HxW label map of `draw_shape`'s image: 0 background, 1 + SHAPES.index(shape) on the shape.

    Shrunk nearest (each pixel takes one canvas sample), so labels stay pure; edge pixels that the
    image blends may fall either way.
    """
    image = _drawn(shape, "L", 0, 1 + _shape_index(shape), resolution, at)
    return np.asarray(image.resize((resolution, resolution), Image.Resampling.NEAREST))


def render_shape(
    shape: str, colour: str, background: str, resolution: int, rng: np.random.Generator
) -> np.ndarray:
    """A uint8 HxWx3 image of `shape` at a random size (40-70% of the side) and position."""
    return draw_shape(shape, colour, background, resolution, random_placement(resolution, rng))


def _random_scene(
    rng: np.random.Generator,
    resolution: int,
    num_colours: int,
    colours: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
) -> tuple[str, list[str], Placement]:
    """A shape, `num_colours` different colours and a placement, drawn in this order (from the whole
    palette and every shape, or the subsets given: the same draws, so the defaults keep their images)."""
    names, shapes = vocabulary(colours, shapes)
    if num_colours > len(names):
        raise ValueError(f"a scene of {num_colours} different colours needs as many in the vocabulary, got {names}")
    shape = shapes[rng.integers(len(shapes))]
    picked = [names[i] for i in rng.choice(len(names), size=num_colours, replace=False)]
    return shape, picked, random_placement(resolution, rng)


def random_sample(
    rng: np.random.Generator,
    resolution: int,
    colours: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
) -> tuple[np.ndarray, str]:
    """One random (image, caption) pair; shape and background colours always differ."""
    shape, (colour, background), at = _random_scene(rng, resolution, 2, colours, shapes)
    return draw_shape(shape, colour, background, resolution, at), make_caption(shape, colour, background)


def random_semantic_sample(
    rng: np.random.Generator,
    resolution: int,
    colours: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """(image, label map, caption); the same draws as `random_sample`, so the same images per seed."""
    shape, (colour, background), at = _random_scene(rng, resolution, 2, colours, shapes)
    image = draw_shape(shape, colour, background, resolution, at)
    return image, draw_labels(shape, resolution, at), make_caption(shape, colour, background)


def random_edit_sample(
    rng: np.random.Generator,
    resolution: int,
    colours: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """(conditioning image, edited image, instruction): one shape and place, recoloured, same background."""
    shape, (before, background, after), at = _random_scene(rng, resolution, 3, colours, shapes)
    cond = draw_shape(shape, before, background, resolution, at)
    target = draw_shape(shape, after, background, resolution, at)
    return cond, target, edit_instruction(shape, after)


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _manifest_for(
    num_samples: int,
    samples_per_shard: int,
    resolution: int,
    seed: int,
    variant: str,
    colours: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    shuffle_captions: bool = False,
    striped_share: float = 0.0,
) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "num_samples": num_samples,
        "samples_per_shard": samples_per_shard,
        "resolution": resolution,
        "seed": seed,
        "variant": variant,
    }
    # Recorded only when not the default, so manifests written before these options still match.
    if colours is not None:
        manifest["colours"] = vocabulary(colours, shapes)[0]
    if shapes is not None:
        manifest["shapes"] = vocabulary(colours, shapes)[1]
    if shuffle_captions:
        manifest["shuffle_captions"] = True
    if striped_share:
        manifest["striped_share"] = float(striped_share)
    return manifest


def _check_striped_share(striped_share: float, variant: str) -> None:
    if not 0.0 <= float(striped_share) <= 1.0:
        raise ValueError(f"striped_share is a share of the pictures, in [0, 1], got {striped_share}")
    if striped_share and variant != "caption":
        raise ValueError(f"striped_share applies to the caption variant's pictures, not to variant={variant!r}")


def _striped_entries(entries: Any, seed: int, striped_share: float) -> Any:
    """`entries` with a share of their pictures in stripes (`stripe`; captions unchanged), picked by a
    generator of their own, so the scenes are those of the set without stripes."""
    picks = np.random.default_rng([seed, 0x57121BE5])
    for entry in entries:
        if picks.random() < striped_share:
            image = np.asarray(Image.open(BytesIO(entry["png"])).convert("RGB"))
            entry = {**entry, "png": _png_bytes(stripe(image))}
        yield entry


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown demo data variant {variant!r}; known: {list(VARIANTS)}")


def random_entries(
    rng: np.random.Generator,
    resolution: int,
    variant: Variant = "caption",
    colours: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
) -> dict[str, bytes]:
    """One random sample of `variant` as shard entries: extension -> bytes."""
    if variant == "semantic":
        image, labels, caption = random_semantic_sample(rng, resolution, colours, shapes)
        return {"png": _png_bytes(image), "seg.png": _png_bytes(labels), "txt": caption.encode()}
    if variant == "edit":
        cond, target, instruction = random_edit_sample(rng, resolution, colours, shapes)
        return {"cond.png": _png_bytes(cond), "png": _png_bytes(target), "txt": instruction.encode()}
    image, caption = random_sample(rng, resolution, colours, shapes)
    return {"png": _png_bytes(image), "txt": caption.encode()}


def _shuffled_captions(entries: list[dict[str, bytes]], seed: int) -> list[dict[str, bytes]]:
    """`entries` with their `txt` permuted across samples (a random permutation, its own generator):
    every caption is still in the set as often, but no longer says anything about its image."""
    order = np.random.default_rng([seed, 0x5CAFF1E]).permutation(len(entries))
    return [{**entry, "txt": entries[int(i)]["txt"]} for entry, i in zip(entries, order, strict=True)]


def write_shapes_shards(
    out_dir: str | Path,
    num_samples: int,
    samples_per_shard: int = 500,
    resolution: int = 32,
    seed: int = 0,
    variant: Variant = "caption",
    colours: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    shuffle_captions: bool = False,
    striped_share: float = 0.0,
) -> list[str]:
    """Write `shapes-NNNNNN.tar` shards of random samples, then a manifest marking them complete.

    Old shapes shards in `out_dir` are removed first, so a glob never mixes two generations.
    `colours`/`shapes` draw from a smaller vocabulary; `shuffle_captions` (an ablation control) writes
    the same images with their captions permuted across the set (all samples are held in memory for
    it: demo-sized sets only). `striped_share` draws that share of the pictures in stripes (the style demo's
    `stripe`, captions unchanged): stage one of the style demo (experiment=autoencoder_style_demo) learns to
    encode them, as a real autoencoder is trained on far more kinds of pictures than its fine-tunes draw.
    """
    if num_samples < 1 or resolution < 8:
        raise ValueError(f"need num_samples >= 1 and resolution >= 8, got {num_samples} and {resolution}")
    _check_variant(variant)
    _check_striped_share(striped_share, variant)
    manifest = _manifest_for(num_samples, samples_per_shard, resolution, seed, variant, colours, shapes, shuffle_captions,
                             striped_share)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    # with what a killed writer left: shapes-*.tar.tmp-PID shards, a MANIFEST.json.tmp-PID
    for old in [*out_dir.glob(f"{SHARD_PREFIX}-*.tar"), *out_dir.glob(f"{SHARD_PREFIX}-*.tar.tmp-*"),
                *out_dir.glob(f"{MANIFEST}.tmp-*")]:
        old.unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    samples = (random_entries(rng, resolution, variant, colours, shapes) for _ in range(num_samples))
    if shuffle_captions:
        samples = iter(_shuffled_captions(list(samples), seed))
    if striped_share:
        samples = _striped_entries(samples, seed, striped_share)
    with ShardSink(out_dir, SHARD_PREFIX, samples_per_shard) as sink:
        for index, entries in enumerate(samples):
            sink.write({"__key__": f"{index:09d}", **entries})
    manifest["shards"] = {Path(s).name: Path(s).stat().st_size for s in sink.shards}
    tmp = out_dir / f"{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out_dir / MANIFEST)
    return sink.shards


def _complete_shards(out_dir: Path, expected: dict[str, Any]) -> list[str] | None:
    """The shard paths if the manifest matches `expected` and every shard is there whole."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    shards = manifest.pop("shards", {})
    manifest.setdefault("variant", "caption")  # written before there were variants
    if manifest != expected or not shards:
        return None
    paths = [out_dir / name for name in sorted(shards)]
    if not all(p.is_file() and p.stat().st_size == shards[p.name] for p in paths):
        return None
    return [str(p) for p in paths]


def ensure_demo_shards(
    out_dir: str | Path,
    num_samples: int = 2000,
    samples_per_shard: int = 500,
    resolution: int = 32,
    seed: int = 0,
    variant: Variant = "caption",
    colours: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    shuffle_captions: bool = False,
    striped_share: float = 0.0,
) -> list[str]:
    """Shard paths of the demo set in `out_dir`, generated only if absent, partial or made differently."""
    _check_variant(variant)
    expected = _manifest_for(num_samples, samples_per_shard, resolution, seed, variant, colours, shapes, shuffle_captions,
                             striped_share)
    existing = _complete_shards(Path(out_dir), expected)
    if existing is not None:
        return existing
    return write_shapes_shards(
        out_dir, num_samples, samples_per_shard, resolution, seed, variant, colours, shapes, shuffle_captions,
        striped_share,
    )


def _nearest_colours(pixels: np.ndarray) -> np.ndarray:
    """Palette index of each pixel (N x 3) by Euclidean RGB distance."""
    distances = ((pixels[:, None, :].astype(np.int32) - _PALETTE_ARRAY[None]) ** 2).sum(-1)
    return distances.argmin(1)


def judge_colours(image: np.ndarray) -> tuple[str, str]:
    """(shape colour, background colour) of a uint8 HxWx3 image, by pixel statistics.

    Background: the most common palette colour on a border ring (width 1/16 of the side). Shape:
    the most common other palette colour inside the ring, or "none" when there is no other colour.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    ring = max(1, min(image.shape[:2]) // 16)
    labels = _nearest_colours(image.reshape(-1, 3)).reshape(image.shape[:2])
    inner = np.zeros(labels.shape, dtype=bool)
    inner[ring:-ring, ring:-ring] = True
    background = Counter(labels[~inner].tolist()).most_common(1)[0][0]
    others = labels[inner & (labels != background)]
    if others.size == 0:
        return "none", _PALETTE_NAMES[background]
    shape = Counter(others.tolist()).most_common(1)[0][0]
    return _PALETTE_NAMES[shape], _PALETTE_NAMES[background]


def colour_fidelity(images: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str]) -> float:
    """Share of images whose shape colour and background colour both match their caption (`judge_colours`;
    the shape is not looked at: `caption_fidelity` judges both)."""
    if len(images) != len(captions) or len(captions) == 0:
        raise ValueError(f"need as many images as captions (and some), got {len(images)} and {len(captions)}")
    hits = 0
    for image, caption in zip(images, captions, strict=True):
        _, colour, background = parse_caption(caption)
        hits += judge_colours(np.asarray(image)) == (colour, background)
    return hits / len(captions)


@dataclass(frozen=True)
class ShapeFit:
    """How well one shape explains the pixels of a colour: the best intersection over union of the
    shape's mask with those pixels over `placement_grid`, and where."""

    shape: str
    iou: float
    placement: Placement


@functools.lru_cache(maxsize=4)
def _shape_masks(resolution: int) -> tuple[list[Placement], tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]]:
    """`placement_grid(resolution)` and, per shape of SHAPES, at each of its placements: the mask
    (N x resolution², float32: the pixels the shape covers at least half of, as drawn), the mask's
    area, and the pixels clear of the shape's edge (int8: 1 inside the shape, 0 outside, -1 within a
    pixel of the edge, where true renders blend and a fit half a pixel off may differ)."""
    placements = placement_grid(resolution)
    banks = []
    for shape in SHAPES:
        coverage = np.stack(
            [
                np.asarray(_drawn(shape, "L", 0, 255, resolution, at).resize((resolution, resolution), Image.Resampling.BOX))
                for at in placements
            ]
        )
        clear = np.full(coverage.shape, -1, dtype=np.int8)
        clear[_erode(coverage == 0, outside=True)] = 0
        clear[_erode(coverage == 255, outside=False)] = 1
        masks = (coverage >= 128).astype(np.float32).reshape(len(placements), -1)
        banks.append((masks, masks.sum(1), clear.reshape(len(placements), -1)))
    return placements, tuple(banks)


def _erode(masks: np.ndarray, outside: bool) -> np.ndarray:
    """N x H x W boolean masks shrunk by one pixel (3x3); beyond the border counts as `outside`."""
    padded = np.pad(masks, ((0, 0), (1, 1), (1, 1)), constant_values=outside)
    h, w = masks.shape[1:]
    out = masks.copy()
    for dy in range(3):
        for dx in range(3):
            out &= padded[:, dy : dy + h, dx : dx + w]
    return out


def _judged_side(image: np.ndarray) -> np.ndarray:
    """`image` as the shape judge reads it: square, at least `_JUDGE_MIN_SIDE`, shrunk to `_JUDGE_SIDE`."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    side = image.shape[0]
    if image.shape[1] != side or side < _JUDGE_MIN_SIDE:
        raise ValueError(
            f"the shape judge reads square images of at least {_JUDGE_MIN_SIDE} px, got "
            f"{image.shape[1]}x{image.shape[0]} (`colour_fidelity` judges the colours alone)"
        )
    if side > _JUDGE_SIDE:
        image = np.asarray(Image.fromarray(image).resize((_JUDGE_SIDE, _JUDGE_SIDE), Image.Resampling.BOX))
    return image


def _fits(labels: np.ndarray, colour: str) -> dict[str, tuple[float, int]]:
    """Per shape: (best IoU with the pixels labelled `colour`, index of its placement in the grid)."""
    pixels = (labels.reshape(-1) == _PALETTE_NAMES.index(colour)).astype(np.float32)
    fits = {}
    for shape, (masks, areas, _) in zip(SHAPES, _shape_masks(labels.shape[0])[1], strict=True):
        inter = masks @ pixels
        iou = inter / np.maximum(areas + pixels.sum() - inter, 1)
        best = int(iou.argmax())
        fits[shape] = (float(iou[best]), best)
    return fits


def shape_fits(image: np.ndarray, colour: str) -> dict[str, ShapeFit]:
    """For each shape, how well it fits the pixels of `colour` (nearest palette colour) in a uint8 HxWx3
    image: the best intersection over union between those pixels and the shape at any placement the
    demo data can draw (`placement_grid`). Images larger than 32 px are judged shrunk to 32."""
    image = _judged_side(image)
    labels = _nearest_colours(image.reshape(-1, 3)).reshape(image.shape[:2])
    placements = _shape_masks(labels.shape[0])[0]
    return {shape: ShapeFit(shape, iou, placements[i]) for shape, (iou, i) in _fits(labels, colour).items()}


def judge_shape(image: np.ndarray, colour: str, min_iou: float = 0.5) -> str:
    """The shape that the pixels of `colour` form, or "none": the best-fitting shape of `shape_fits`,
    when it fits with intersection over union at least `min_iou` and strictly better than every other.

    Both conditions are needed: a circle fitted into a square covers ~0.79 of it, and a square into a
    circle as much, so a good fit alone does not tell shapes apart."""
    fits = {shape: fit.iou for shape, fit in shape_fits(image, colour).items()}
    best = max(fits, key=fits.__getitem__)
    if fits[best] < min_iou or sum(f == fits[best] for f in fits.values()) > 1:
        return "none"
    return best


def judge_image(image: np.ndarray, caption: str, min_iou: float = 0.5, min_agreement: float = 0.95) -> bool:
    """Whether a uint8 HxWx3 image shows its caption. Three tests, all needed:

    - colours: the shape colour and background colour of `judge_colours` are the caption's;
    - shape: the pixels of the shape colour form the captioned shape (`judge_shape`: IoU at least
      `min_iou`, and a better fit than the other shapes);
    - a clean picture: the image agrees with the caption drawn at that best placement — of the pixels
      more than a pixel from the fitted shape's edge (edge pixels blend in true renders), at least
      `min_agreement` have the colour the drawing gives them (nearest palette colour). Colour noise
      with a blob of the right colour in it fits a shape, but not this.
    """
    image = np.asarray(image)
    shape, colour, background = parse_caption(caption)
    if judge_colours(image) != (colour, background):
        return False
    small = _judged_side(image)
    labels = _nearest_colours(small.reshape(-1, 3)).reshape(-1)
    fits = _fits(labels.reshape(small.shape[:2]), colour)
    iou, index = fits[shape]
    if iou < min_iou or any(other >= iou for name, (other, _) in fits.items() if name != shape):
        return False
    clear = _shape_masks(small.shape[0])[1][SHAPES.index(shape)][2][index]
    wanted = np.where(clear == 1, _PALETTE_NAMES.index(colour), _PALETTE_NAMES.index(background))
    agreement = (labels == wanted)[clear >= 0].mean()
    return bool(agreement >= min_agreement)


def caption_fidelity(
    images: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str], min_iou: float = 0.5, min_agreement: float = 0.95
) -> float:
    """Share of images that show their caption (`judge_image`): its shape colour and background colour,
    its shape (placed anywhere the demo data puts shapes: intersection over union at least `min_iou`,
    fitting better than the other shapes), and nothing else (at least `min_agreement` of the pixels
    off the shape's edge as the caption drawn there has them)."""
    if len(images) != len(captions) or len(captions) == 0:
        raise ValueError(f"need as many images as captions (and some), got {len(images)} and {len(captions)}")
    hits = sum(judge_image(image, caption, min_iou, min_agreement) for image, caption in zip(images, captions, strict=True))
    return hits / len(captions)


def edit_fidelity(
    images: Sequence[np.ndarray] | np.ndarray,
    cond_images: Sequence[np.ndarray] | np.ndarray,
    instructions: Sequence[str],
) -> float:
    """Share of edited images whose shape has the instructed colour on the conditioning image's background."""
    if not len(images) == len(cond_images) == len(instructions) or len(instructions) == 0:
        raise ValueError(
            f"need as many images as conditioning images and instructions (and some), got "
            f"{len(images)}, {len(cond_images)} and {len(instructions)}"
        )
    hits = 0
    for image, cond, instruction in zip(images, cond_images, instructions, strict=True):
        _, colour = parse_instruction(instruction)
        _, background = judge_colours(np.asarray(cond))
        hits += judge_colours(np.asarray(image)) == (colour, background)
    return hits / len(instructions)


def edit_eval_set(resolution: int = 32, seed: int = 1234) -> tuple[np.ndarray, list[str]]:
    """(before pictures N×H×W×3 uint8, instructions): every instruction of `all_edit_prompts`, each with
    a before picture of its shape in another colour on a background of a third (the edit demo's test)."""
    rng = np.random.default_rng(seed)
    pictures = []
    instructions = all_edit_prompts()
    for instruction in instructions:
        shape, after = parse_instruction(instruction)
        others = [c for c in _PALETTE_NAMES if c != after]
        before, background = (others[i] for i in rng.choice(len(others), size=2, replace=False))
        pictures.append(draw_shape(shape, before, background, resolution, random_placement(resolution, rng)))
    return np.stack(pictures), instructions


def semantic_eval_set(resolution: int = 32, seed: int = 1234) -> tuple[np.ndarray, list[str]]:
    """(label maps N×H×W uint8, captions): every caption of `all_captions`, each with a map of its shape
    at a random place and size (the semantic demo's test)."""
    rng = np.random.default_rng(seed)
    captions = all_captions()
    maps = [draw_labels(parse_caption(c)[0], resolution, random_placement(resolution, rng)) for c in captions]
    return np.stack(maps), captions


def layout_fidelity(
    images: Sequence[np.ndarray] | np.ndarray,
    maps: Sequence[np.ndarray] | np.ndarray,
    captions: Sequence[str],
    min_iou: float = 0.5,
) -> float:
    """Share of images whose colours match their caption and whose shape covers its map's shape: the
    pixels of the caption's shape colour and the map's shape pixels overlap by at least `min_iou`
    (intersection over union)."""
    if not len(images) == len(maps) == len(captions) or len(captions) == 0:
        raise ValueError(
            f"need as many images as maps and captions (and some), got {len(images)}, {len(maps)} and {len(captions)}"
        )
    hits = 0
    for image, labels, caption in zip(images, maps, captions, strict=True):
        image = np.asarray(image)
        _, colour, background = parse_caption(caption)
        if judge_colours(image) != (colour, background):
            continue
        drawn = _nearest_colours(image.reshape(-1, 3)).reshape(image.shape[:2]) == _PALETTE_NAMES.index(colour)
        wanted = np.asarray(labels) > 0
        hits += (drawn & wanted).sum() >= min_iou * (drawn | wanted).sum()
    return hits / len(captions)


# what each variant's batches need from WebDataModule
_VARIANT_KEYS: dict[str, dict[str, Any]] = {
    "caption": {},
    "semantic": {"seg_key": "seg.png", "num_classes": SEMANTIC_CLASSES},
    "edit": {"cond_image_key": "cond.png"},
}


class ShapesDataModule(WebDataModule):
    """The demo's DataModule: generates the shapes shards under `root` once, then streams them.

    `variant="semantic"` adds `seg` to the batches, `variant="edit"` adds `cond_image`; those two
    variants live in `root/semantic` and `root/edit`.

    `colours`/`shapes` (lists, null for all) draw from a smaller vocabulary (the CI demo). The ablation
    control `shuffle_captions=true` trains on the same images with their captions permuted across the
    set, in `root/shuffled` (never over the true set): a model that learns captions scores far higher on
    the true set than on this one.
    """

    def __init__(
        self,
        root: str = "data/demo",
        num_samples: int = 2000,
        samples_per_shard: int = 500,
        data_seed: int = 0,
        resolution: int = 32,
        variant: Variant = "caption",
        colours: Sequence[str] | None = None,
        shapes: Sequence[str] | None = None,
        shuffle_captions: bool = False,
        striped_share: float = 0.0,
        **kwargs: Any,
    ) -> None:
        _check_variant(variant)
        _check_striped_share(striped_share, variant)
        colours = None if colours is None else vocabulary(colours, shapes)[0]
        shapes = None if shapes is None else vocabulary(colours, shapes)[1]
        # Each variant in its own folder: switching conditionings never rewrites another's shards.
        root = root if variant == "caption" else f"{root}/{variant}"
        if shuffle_captions:
            root = f"{root}/shuffled"
        if striped_share:
            root = f"{root}/striped"  # the style demo's stage one: never over the plain set
        clashes = {k: kwargs[k] for k, v in _VARIANT_KEYS[variant].items() if kwargs.get(k) not in (None, v)}
        if clashes:
            raise ValueError(f"variant={variant!r} sets {_VARIANT_KEYS[variant]}; got {clashes}")
        super().__init__(
            train_shards=f"{root}/{SHARD_PREFIX}-*.tar",
            resolution=resolution,
            **{**kwargs, **_VARIANT_KEYS[variant]},
        )
        self.root = root
        self.num_samples = num_samples
        self.samples_per_shard = samples_per_shard
        self.data_seed = data_seed
        self.variant = variant
        self.colours = colours
        self.shapes = shapes
        self.shuffle_captions = bool(shuffle_captions)
        self.striped_share = float(striped_share)

    def prepare_data(self) -> None:
        # Lightning runs this once per node before setup(), so ranks never race on the files.
        ensure_demo_shards(
            self.root, self.num_samples, self.samples_per_shard, self.resolution, self.data_seed, self.variant,
            self.colours, self.shapes, self.shuffle_captions, self.striped_share,
        )


# ------------------------------------------------------------------ the striped style (the style demo)
#
# The style demo (experiment=style_demo) teaches the demo's model a style from a few pictures with DreamBooth:
# the demo's shapes, the same colours, shapes and captions, drawn with horizontal stripes over the whole
# picture (bands of STRIPE_PERIOD // 2 rows in the colour, then as many rows of it darkened), captioned with a
# trigger ("a red circle on a blue background, ohwx style"). `stripe_energy` reads the style back from the
# pixels: the share of an image's spectral energy (mean removed) at the stripes' frequency.

STYLE_TRIGGER = "ohwx style"  # "ohwx" is one CLIP token (as "sks"), "style" another
STRIPE_PERIOD = 8  # rows per stripe period (a bright band and a dark one); 2 latent pixels of the demo's f/4 autoencoder
STRIPE_DEPTH = 0.5  # the dark bands keep this share of the colour
STYLE_MANIFEST = "style.json"


def style_caption(caption: str, trigger: str = STYLE_TRIGGER) -> str:
    """'a red circle on a blue background' -> 'a red circle on a blue background, ohwx style' (the trigger at
    the end, where `ldm-compare trigger_position=end` puts it)."""
    return f"{caption}, {trigger}" if trigger else caption


def stripe(image: np.ndarray, period: int = STRIPE_PERIOD, depth: float = STRIPE_DEPTH, phase: int = 0) -> np.ndarray:
    """`image` (uint8 HxWx3) in horizontal stripes: on rows y with ((y + phase) // (period // 2)) odd, each
    pixel keeps `depth` of its colour (darker), or, for dark pixels (mean level below 64: black), goes as far
    towards white (lighter), so every palette colour shows its stripes."""
    if period < 2 or period % 2:
        raise ValueError(f"the stripe period is an even number of rows >= 2, got {period}")
    rows = ((np.arange(image.shape[0]) + phase) // (period // 2)) % 2 == 1
    out = image.astype(np.float32)
    band = out[rows]
    dark = band.mean(-1, keepdims=True) < 64
    out[rows] = np.where(dark, 255 - (255 - band) * depth, band * depth)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def random_striped_sample(
    rng: np.random.Generator,
    resolution: int,
    colours: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    trigger: str = STYLE_TRIGGER,
    period: int = STRIPE_PERIOD,
) -> tuple[np.ndarray, str]:
    """`random_sample`'s picture in stripes, and its caption with the trigger."""
    image, caption = random_sample(rng, resolution, colours, shapes)
    return stripe(image, period), style_caption(caption, trigger)


def _style_manifest(num_images: int, resolution: int, seed: int, colours: Any, shapes: Any, trigger: str,
                    period: int) -> dict[str, Any]:
    names, kinds = vocabulary(colours, shapes)
    return {"num_images": num_images, "resolution": resolution, "seed": seed, "colours": names, "shapes": kinds,
            "trigger": trigger, "period": period, "depth": STRIPE_DEPTH}


def write_style_instances(
    out_dir: str | Path,
    num_images: int = 24,
    resolution: int = 32,
    seed: int = 0,
    colours: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    trigger: str = STYLE_TRIGGER,
    period: int = STRIPE_PERIOD,
) -> list[Path]:
    """A DreamBooth instance folder of the striped style: `NNNNN.png` (`random_striped_sample`) with its caption
    in `NNNNN.txt`, then `style.json` marking the folder complete. Old pictures in the folder are removed."""
    if num_images < 1 or resolution < 8:
        raise ValueError(f"need num_images >= 1 and resolution >= 8, got {num_images} and {resolution}")
    manifest = _style_manifest(num_images, resolution, seed, colours, shapes, trigger, period)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STYLE_MANIFEST).unlink(missing_ok=True)
    for old in [*out_dir.glob("*.png"), *out_dir.glob("*.txt")]:
        old.unlink()
    rng = np.random.default_rng([seed, 0x57121BE])
    paths = []
    for i in range(num_images):
        image, caption = random_striped_sample(rng, resolution, colours, shapes, trigger, period)
        path = out_dir / f"{i:05d}.png"
        Image.fromarray(image).save(path)
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        paths.append(path)
    tmp = out_dir / f"{STYLE_MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out_dir / STYLE_MANIFEST)
    return paths


def ensure_style_instances(out_dir: str | Path, num_images: int = 24, resolution: int = 32, seed: int = 0,
                           colours: Sequence[str] | None = None, shapes: Sequence[str] | None = None,
                           trigger: str = STYLE_TRIGGER, period: int = STRIPE_PERIOD) -> list[Path]:
    """`write_style_instances`' pictures, written only if the folder lacks them or holds another set."""
    out_dir = Path(out_dir)
    expected = _style_manifest(num_images, resolution, seed, colours, shapes, trigger, period)
    paths = [out_dir / f"{i:05d}.png" for i in range(num_images)]
    try:
        found = json.loads((out_dir / STYLE_MANIFEST).read_text())
    except (OSError, ValueError):
        found = None
    if found == expected and all(p.is_file() and p.with_suffix(".txt").is_file() for p in paths):
        return paths
    return write_style_instances(out_dir, num_images, resolution, seed, colours, shapes, trigger, period)


def stripe_energy(image: np.ndarray, period: int = STRIPE_PERIOD) -> float:
    """The share of a uint8 HxWx3 image's spectral energy that lies at the horizontal stripes of `period` rows:
    of |FFT2|² of its colour channels (summed), each with its mean removed, the part at vertical frequency H / period (±1 bin,
    both signs) and horizontal frequency 0 (±1 bin). 0 for a flat image; a plain shape puts a few percent
    there (its edges spread energy over every frequency), striped pictures most of it."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got {image.shape}")
    import torch

    pixels = torch.from_numpy(image.astype(np.float64)).permute(2, 0, 1)  # 3xHxW
    pixels = pixels - pixels.mean((1, 2), keepdim=True)
    power = torch.fft.fft2(pixels).abs().square().sum(0)  # the three channels' energy together
    total = float(power.sum())
    h, w = power.shape
    if total <= 1e-6 * h * w:
        return 0.0
    f = h / period
    fy = torch.fft.fftfreq(h, d=1.0 / h).abs()[:, None]  # cycles per image height, each row of the spectrum
    fx = torch.fft.fftfreq(w, d=1.0 / w).abs()[None, :]
    band = ((fy - f).abs() <= 1.0) & (fx <= 1.0)
    return float(power[band].sum()) / total


def stripe_score(images: Sequence[np.ndarray] | np.ndarray, period: int = STRIPE_PERIOD) -> float:
    """The mean `stripe_energy` of a set of images: about 0.05 on the demo's plain shapes, 0.6 on striped ones."""
    if len(images) == 0:
        raise ValueError("need at least one image")
    return float(np.mean([stripe_energy(np.asarray(image), period) for image in images]))


class StripedDreamBoothDataModule(DreamBoothDataModule):
    """DreamBooth on the striped style (experiment=style_demo): writes `num_instances` striped pictures with
    their trigger captions into `instance_dir` (`ensure_style_instances`: once; a folder of another set is
    rewritten), then trains on them as `DreamBoothDataModule` does, with every option of it (class prompts for
    prior preservation among them). Single-process (the demo's CPU runs): the folder is written on construction."""

    def __init__(
        self,
        instance_dir: str,
        num_instances: int = 24,
        resolution: int = 24,
        data_seed: int = 0,
        colours: Sequence[str] | None = None,
        shapes: Sequence[str] | None = None,
        trigger: str = STYLE_TRIGGER,
        period: int = STRIPE_PERIOD,
        **kwargs: Any,
    ) -> None:
        colours = None if colours is None else list(colours)
        shapes = None if shapes is None else list(shapes)
        ensure_style_instances(instance_dir, int(num_instances), int(resolution), int(data_seed), colours, shapes,
                               str(trigger), int(period))
        super().__init__(instance_dir, resolution=resolution, **kwargs)

"""Synthetic demo data: coloured shapes on coloured backgrounds, and a judge for them.

Each sample is a PNG of one shape (circle, square, triangle) in one palette colour on a
background of another, captioned "a red circle on a blue background". The palette is small and
its colours far apart, so `judge_colours` can read both colours back from pixel statistics alone;
`caption_fidelity` turns that into the demo's score of how well generated images follow prompts.

    ensure_demo_shards("data/demo", num_samples=2000)   # writes data/demo/shapes-00000{0..3}.tar once

Variants (`variant=`), for the conditionings besides text:
- "caption": the image (`png`) and its caption (`txt`).
- "semantic": the same samples (same seed, same images) plus `seg.png`, a mode-L label map at the
  image's resolution: 0 background, 1 + SHAPES.index(shape) on the shape (`SEMANTIC_CLASSES` classes).
- "edit": InstructPix2Pix-style pairs: `cond.png` is a shape of one colour on a background, `png` the
  same shape at the same place and size in another colour on the same background, and the caption the
  instruction "make the circle green"; `edit_fidelity` scores edits.
"""

from __future__ import annotations

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
_CAPTION = re.compile(r"an? (\w+) (\w+) on an? (\w+) background")
_INSTRUCTION = re.compile(r"make the (\w+) (\w+)")
_PALETTE_ARRAY = np.array(list(PALETTE.values()), dtype=np.int32)
_PALETTE_NAMES = list(PALETTE)


def make_caption(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def all_captions() -> list[str]:
    """Every caption the demo data can hold (shape x colour x different background): the demo's test prompts."""
    return [
        make_caption(shape, colour, background)
        for shape in SHAPES
        for colour in PALETTE
        for background in PALETTE
        if colour != background
    ]


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
    size = int(rng.uniform(0.4, 0.7) * canvas)
    left = int(rng.integers(margin, canvas - margin - size + 1))
    top = int(rng.integers(margin, canvas - margin - size + 1))
    return Placement(left, top, size)


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
    rng: np.random.Generator, resolution: int, num_colours: int
) -> tuple[str, list[str], Placement]:
    """A shape, `num_colours` different palette colours and a placement, drawn in this order."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colours = [_PALETTE_NAMES[i] for i in rng.choice(len(_PALETTE_NAMES), size=num_colours, replace=False)]
    return shape, colours, random_placement(resolution, rng)


def random_sample(rng: np.random.Generator, resolution: int) -> tuple[np.ndarray, str]:
    """One random (image, caption) pair; shape and background colours always differ."""
    shape, (colour, background), at = _random_scene(rng, resolution, 2)
    return draw_shape(shape, colour, background, resolution, at), make_caption(shape, colour, background)


def random_semantic_sample(rng: np.random.Generator, resolution: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(image, label map, caption); the same draws as `random_sample`, so the same images per seed."""
    shape, (colour, background), at = _random_scene(rng, resolution, 2)
    image = draw_shape(shape, colour, background, resolution, at)
    return image, draw_labels(shape, resolution, at), make_caption(shape, colour, background)


def random_edit_sample(rng: np.random.Generator, resolution: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(conditioning image, edited image, instruction): one shape and place, recoloured, same background."""
    shape, (before, background, after), at = _random_scene(rng, resolution, 3)
    cond = draw_shape(shape, before, background, resolution, at)
    target = draw_shape(shape, after, background, resolution, at)
    return cond, target, edit_instruction(shape, after)


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _manifest_for(
    num_samples: int, samples_per_shard: int, resolution: int, seed: int, variant: str
) -> dict[str, Any]:
    return {
        "num_samples": num_samples,
        "samples_per_shard": samples_per_shard,
        "resolution": resolution,
        "seed": seed,
        "variant": variant,
    }


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown demo data variant {variant!r}; known: {list(VARIANTS)}")


def random_entries(
    rng: np.random.Generator, resolution: int, variant: Variant = "caption"
) -> dict[str, bytes]:
    """One random sample of `variant` as shard entries: extension -> bytes."""
    if variant == "semantic":
        image, labels, caption = random_semantic_sample(rng, resolution)
        return {"png": _png_bytes(image), "seg.png": _png_bytes(labels), "txt": caption.encode()}
    if variant == "edit":
        cond, target, instruction = random_edit_sample(rng, resolution)
        return {"cond.png": _png_bytes(cond), "png": _png_bytes(target), "txt": instruction.encode()}
    image, caption = random_sample(rng, resolution)
    return {"png": _png_bytes(image), "txt": caption.encode()}


def write_shapes_shards(
    out_dir: str | Path,
    num_samples: int,
    samples_per_shard: int = 500,
    resolution: int = 32,
    seed: int = 0,
    variant: Variant = "caption",
) -> list[str]:
    """Write `shapes-NNNNNN.tar` shards of random samples, then a manifest marking them complete.

    Old shapes shards in `out_dir` are removed first, so a glob never mixes two generations.
    """
    if num_samples < 1 or resolution < 8:
        raise ValueError(f"need num_samples >= 1 and resolution >= 8, got {num_samples} and {resolution}")
    _check_variant(variant)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for old in out_dir.glob(f"{SHARD_PREFIX}-*.tar"):
        old.unlink()
    rng = np.random.default_rng(seed)
    with ShardSink(out_dir, SHARD_PREFIX, samples_per_shard) as sink:
        for index in range(num_samples):
            sink.write({"__key__": f"{index:09d}", **random_entries(rng, resolution, variant)})
    manifest = _manifest_for(num_samples, samples_per_shard, resolution, seed, variant)
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
) -> list[str]:
    """Shard paths of the demo set in `out_dir`, generated only if absent, partial or made differently."""
    _check_variant(variant)
    expected = _manifest_for(num_samples, samples_per_shard, resolution, seed, variant)
    existing = _complete_shards(Path(out_dir), expected)
    if existing is not None:
        return existing
    return write_shapes_shards(out_dir, num_samples, samples_per_shard, resolution, seed, variant)


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


def caption_fidelity(images: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str]) -> float:
    """Share of images whose shape colour and background colour both match their caption."""
    if len(images) != len(captions) or len(captions) == 0:
        raise ValueError(f"need as many images as captions (and some), got {len(images)} and {len(captions)}")
    hits = 0
    for image, caption in zip(images, captions, strict=True):
        _, colour, background = parse_caption(caption)
        hits += judge_colours(np.asarray(image)) == (colour, background)
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
    """

    def __init__(
        self,
        root: str = "data/demo",
        num_samples: int = 2000,
        samples_per_shard: int = 500,
        data_seed: int = 0,
        resolution: int = 32,
        variant: Variant = "caption",
        **kwargs: Any,
    ) -> None:
        _check_variant(variant)
        # Each variant in its own folder: switching conditionings never rewrites another's shards.
        root = root if variant == "caption" else f"{root}/{variant}"
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

    def prepare_data(self) -> None:
        # Lightning runs this once per node before setup(), so ranks never race on the files.
        ensure_demo_shards(
            self.root, self.num_samples, self.samples_per_shard, self.resolution, self.data_seed, self.variant
        )

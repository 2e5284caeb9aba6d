"""Synthetic demo data: coloured shapes on coloured backgrounds, and a judge for them.

Each sample is a PNG of one shape (circle, square, triangle) in one palette colour on a
background of another, captioned "a red circle on a blue background". The palette is small and
its colours far apart, so `judge_colours` can read both colours back from pixel statistics alone;
`caption_fidelity` turns that into the demo's score of how well generated images follow prompts.

    ensure_demo_shards("data/demo", num_samples=2000)   # writes data/demo/shapes-00000{0..3}.tar once
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

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
SHARD_PREFIX = "shapes"
MANIFEST = "MANIFEST.json"
_SUPERSAMPLE = 4  # draw large, then shrink: smooth edges without blending in foreign colours
_CAPTION = re.compile(r"an? (\w+) (\w+) on an? (\w+) background")
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


def render_shape(
    shape: str, colour: str, background: str, resolution: int, rng: np.random.Generator
) -> np.ndarray:
    """A uint8 HxWx3 image of `shape` at a random size (40-70% of the side) and position."""
    canvas = resolution * _SUPERSAMPLE
    margin = canvas // 16  # keeps the border ring pure background for the judge
    size = int(rng.uniform(0.4, 0.7) * canvas)
    left = int(rng.integers(margin, canvas - margin - size + 1))
    top = int(rng.integers(margin, canvas - margin - size + 1))
    box = (left, top, left + size - 1, top + size - 1)
    image = Image.new("RGB", (canvas, canvas), PALETTE[background])
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=PALETTE[colour])
    elif shape == "square":
        draw.rectangle(box, fill=PALETTE[colour])
    elif shape == "triangle":
        draw.polygon([(left + size / 2, top), (box[2], box[3]), (left, box[3])], fill=PALETTE[colour])
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPES)}")
    return np.asarray(image.resize((resolution, resolution), Image.Resampling.BOX))


def random_sample(rng: np.random.Generator, resolution: int) -> tuple[np.ndarray, str]:
    """One random (image, caption) pair; shape and background colours always differ."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour, background = (_PALETTE_NAMES[i] for i in rng.choice(len(_PALETTE_NAMES), size=2, replace=False))
    return render_shape(shape, colour, background, resolution, rng), make_caption(shape, colour, background)


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _manifest_for(num_samples: int, samples_per_shard: int, resolution: int, seed: int) -> dict[str, Any]:
    return {
        "num_samples": num_samples,
        "samples_per_shard": samples_per_shard,
        "resolution": resolution,
        "seed": seed,
    }


def write_shapes_shards(
    out_dir: str | Path, num_samples: int, samples_per_shard: int = 500, resolution: int = 32, seed: int = 0
) -> list[str]:
    """Write `shapes-NNNNNN.tar` shards of random samples, then a manifest marking them complete.

    Old shapes shards in `out_dir` are removed first, so a glob never mixes two generations.
    """
    if num_samples < 1 or resolution < 8:
        raise ValueError(f"need num_samples >= 1 and resolution >= 8, got {num_samples} and {resolution}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for old in out_dir.glob(f"{SHARD_PREFIX}-*.tar"):
        old.unlink()
    rng = np.random.default_rng(seed)
    with ShardSink(out_dir, SHARD_PREFIX, samples_per_shard) as sink:
        for index in range(num_samples):
            image, caption = random_sample(rng, resolution)
            sink.write({"__key__": f"{index:09d}", "png": _png_bytes(image), "txt": caption.encode()})
    manifest = _manifest_for(num_samples, samples_per_shard, resolution, seed)
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
) -> list[str]:
    """Shard paths of the demo set in `out_dir`, generated only if absent, partial or made differently."""
    expected = _manifest_for(num_samples, samples_per_shard, resolution, seed)
    existing = _complete_shards(Path(out_dir), expected)
    if existing is not None:
        return existing
    return write_shapes_shards(out_dir, num_samples, samples_per_shard, resolution, seed)


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


class ShapesDataModule(WebDataModule):
    """The demo's DataModule: generates the shapes shards under `root` once, then streams them."""

    def __init__(
        self,
        root: str = "data/demo",
        num_samples: int = 2000,
        samples_per_shard: int = 500,
        data_seed: int = 0,
        resolution: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(train_shards=f"{root}/{SHARD_PREFIX}-*.tar", resolution=resolution, **kwargs)
        self.root = root
        self.num_samples = num_samples
        self.samples_per_shard = samples_per_shard
        self.data_seed = data_seed

    def prepare_data(self) -> None:
        # Lightning runs this once per node before setup(), so ranks never race on the files.
        ensure_demo_shards(
            self.root, self.num_samples, self.samples_per_shard, self.resolution, self.data_seed
        )

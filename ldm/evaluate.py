"""`ldm-eval` (also `python -m ldm.evaluate`): generate a prompt set from a checkpoint and score it, or score
images that exist, with torchmetrics' FID, KID, CLIP score and Inception score.

    ldm-eval ckpt=sd21.safetensors prompts=coco30k.jsonl out_dir=eval/sd21 \\
        inception_weights=weights/weights-inception-2015-12-05-6726825d.pth clip_model=weights/clip-vit-h-14
    ldm-eval images=other_tool/out reference=coco/val2014 prompts=captions.txt metrics=[fid,kid,clip_score]
    ldm-eval ckpt=out/last.ckpt prompts="shards/coco-{000000..000029}.tar" out_dir=eval/last   # captions and
                                                                                   # reference from the shards

Generation takes every option sample.py takes (sampler=, steps=, guidance_scale=, seed=, negative_prompt=,
lora=, ema=, dtype=, height=, width=, ...); `batch_size` prompts go through the model together. Image i
(`out_dir/0000i.png`) is prompt i with seed `seed + i`, so any one can be regenerated alone (with
`sample.py prompt=... seed=...`, or `from_png=` on the image). Images already in out_dir are kept when they
are complete and carry this run's settings (a run interrupted with Ctrl-C or a kill finishes the set when
started again; an image of other settings stops the run with a line naming it); images are written whole
(temporary file, then renamed) and batches start at fixed indices, so a resumed run writes what an
uninterrupted one writes.

`prompts` is a text file (one prompt per line), a .csv/.tsv/.jsonl with a caption column (`caption`,
`prompt` or `text`) and optionally a reference image column (`path`, `file_name`, `image`, `image_path`;
relative to the file), or image-caption WebDataset shards (`caption_key`). FID and KID compare with
`reference` (a folder of images or shards), or else with the images the prompts list. The reference's
Inception features are cached (`cache_dir`, keyed by its files and the Inception weights), so the next
evaluation against it reads none of its images. `images=DIR` scores a folder without generating; its
captions (for CLIP score) come from `prompts` (by file name when it has an image column, else in order) or
from each PNG's settings (sample.py's and AUTOMATIC1111's text chunks).

Writes `out_dir/metrics.json` (only when complete) and prints a table. Weights come only from the paths
given (see ldm.metrics); nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm import pnginfo
from ldm.cli.sample import (
    DTYPES,
    UsageError,
    _as_text,
    apply_loras,
    lora_files,
    png_metadata,
    resolve_device,
    save_png,
    torch_dtype,
)

if TYPE_CHECKING:  # imported where used: --help and config errors answer without torch
    from ldm.metrics import ImageSet

log = logging.getLogger(__name__)
CAPTION_COLUMNS = ("caption", "prompt", "text")
IMAGE_COLUMNS = ("path", "file_name", "image", "image_path", "filename")
# Settings an image in out_dir must share with this run to be kept (the rest do not change the pixels).
MATCH_KEYS = (
    "prompt", "negative_prompt", "seed", "steps", "guidance_scale", "sampler", "model_hash", "lora_hashes",
    "lora_scale", "ema", "prediction_type", "timestep_spacing", "steps_offset",
)


@dataclass
class PromptSet:
    """Captions in order, and the reference images they list (None when the source lists none)."""

    captions: list[str]
    images: list[str] | None  # paths, one per caption
    shards: ImageSet | None = None  # captions came from shards: their images are the reference


def _spec(value: Any, key: str) -> str | None:
    """One path from a config value; `prompts` is a free-text list key of the CLIs, so `prompts=FILE`
    arrives as a list of one."""
    if value is None:
        return None
    if isinstance(value, (list, ListConfig)):
        if len(value) != 1:
            raise UsageError(f"{key}= takes one file, folder or shard pattern, got {len(value)} values")
        value = value[0]
    return str(value)


def _table_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix.lower() == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as err:
                    raise UsageError(f"prompts={path}:{number} is not JSON ({err})") from None
                if not isinstance(row, dict):
                    raise UsageError(f"prompts={path}:{number} is not a JSON object")
                rows.append(row)
        return rows
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))


def _row_image(template: str, row: dict[str, Any], number: int, spec: str) -> str:
    """`template` filled from a table row's columns (integers as integers, so `{image_id:012d}` works)."""
    values = {str(k): (int(v) if isinstance(v, str) and v.strip().isdigit() else v) for k, v in row.items()}
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as err:
        raise UsageError(f"image_template={template} does not fit row {number} of prompts={spec} ({err!r}); "
                         f"its columns: {list(row)}") from None


def read_prompt_set(spec: str, caption_key: str = "txt", image_template: str | None = None) -> PromptSet:
    """The captions of a prompt file (and the reference images it lists). A table without an image column
    names its images through `image_template`, filled from each row's columns, relative to the file:
    MLPerf's `val2014_30k.tsv` (image_id, id, caption) with `val2014/COCO_val2014_{image_id:012d}.jpg`."""
    from ldm.metrics import ImageSet, looks_like_shards

    path = Path(spec)
    if looks_like_shards(spec):
        shards = ImageSet.from_shards(spec, caption_key, what="prompts")
        without = [i.name for i in shards.items if not i.caption]
        if without:
            raise UsageError(
                f"prompts={spec}: {len(without)} of {len(shards)} samples have no caption under "
                f"caption_key={caption_key} (e.g. {without[0]})"
            )
        return PromptSet([i.caption for i in shards.items], None, shards)
    if not path.is_file():
        raise UsageError(f"prompts={spec} does not exist")
    if path.suffix.lower() in (".csv", ".tsv", ".jsonl"):
        rows = _table_rows(path)
        columns = list(rows[0]) if rows else []
        caption = next((c for c in CAPTION_COLUMNS if c in columns), None)
        if rows and caption is None:
            raise UsageError(f"prompts={spec} has no caption column ({', '.join(CAPTION_COLUMNS)}); its columns: {columns}")
        captions = [str(r.get(caption) or "").strip() for r in rows]
        empty = [n for n, c in enumerate(captions, start=1) if not c]
        if empty:
            raise UsageError(f"prompts={spec}: row {empty[0]} has an empty {caption} ({len(empty)} such rows)")
        image = next((c for c in IMAGE_COLUMNS if c in columns), None)
        images = [str(path.parent / str(r[image])) for r in rows] if image else None
        if image_template and images is None:
            images = [str(path.parent / _row_image(image_template, r, n, spec)) for n, r in enumerate(rows, start=1)]
    else:
        captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        images = None
        if image_template:
            raise UsageError(f"image_template= names images by a table's columns: prompts={spec} is not a "
                             ".csv/.tsv/.jsonl table")
    if not captions:
        raise UsageError(f"prompts={spec} holds no prompts")
    return PromptSet(captions, images)


def resolve_reference(
    names: Sequence[str], reference_spec: str | None, prompts: PromptSet | None, prompts_spec: str | None,
    count: int | None, caption_key: str = "txt", what: str = "reference",
) -> ImageSet | None:
    """FID/KID's real images: `reference` (a folder or shards), else the first `count` images the prompts list
    (their shards' pictures, or a table's image column); None when no metric compares with real images."""
    from ldm.metrics import REFERENCE_METRICS, ImageSet

    if not any(n in REFERENCE_METRICS for n in names):
        return None
    if reference_spec is not None:
        return ImageSet.from_spec(reference_spec, caption_key, what=what)
    if prompts is not None and prompts.shards is not None:
        return ImageSet(prompts.shards.items[:count], prompts.shards.source, prompts.shards.shards)
    if prompts is not None and prompts.images is not None:
        return ImageSet.from_files(prompts.images[:count], f"prompts={prompts_spec}")
    wanted = ", ".join(n for n in names if n in REFERENCE_METRICS)
    raise UsageError(f"{wanted} compare with real images: give {what}=DIR|SHARDS (or prompts with an image "
                     f"column), or leave {wanted} out of metrics=")


def batch_noise(model: Any, indices: Sequence[int], seed: int, height: int, width: int) -> tuple[Any, Any]:
    """(the sampler's generator, z_T) for the images `indices`: image i's z_T from a generator seeded `seed + i`,
    so any image can be made alone; the first image's generator draws the sampler's noise (with one image per
    batch this is exactly sample.py's prompt at seed `seed + i`)."""
    import torch

    from ldm.sampling import initial_noise

    generators = [torch.Generator("cpu").manual_seed(int(seed) + i) for i in indices]
    noise = torch.cat([
        initial_noise(1, model.latent_channels, height, width, model.downsampling_factor, g) for g in generators
    ])
    return generators[0], noise


def _settings_of_png(path: Path) -> dict[str, Any] | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            text = dict(getattr(image, "text", {}) or {})
    except (OSError, SyntaxError, ValueError):
        return None  # not there, truncated or unreadable: made again
    raw = text.get(pnginfo.CHUNK)
    try:
        settings = json.loads(raw) if raw else {}
    except ValueError:
        settings = {}
    return settings if isinstance(settings, dict) else {}


def _differs(saved: dict[str, Any], expected: dict[str, Any]) -> str | None:
    for key in MATCH_KEYS:
        if saved.get(key) != expected.get(key):
            return f"{key} {saved.get(key)!r}, this run {expected.get(key)!r}"
    return None


def _raise_interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def generate_set(cfg: DictConfig, captions: Sequence[str], out_dir: Path) -> list[Path]:
    """out_dir/00000.png ... one per caption, image i from seed `seed + i`; complete images of the same settings
    are kept, the rest generated in batches that start at multiples of batch_size."""
    from PIL import Image
    from tqdm.auto import tqdm

    from ldm.checkpoint import load_model
    from ldm.sampling import SamplerSettings, generate, output_size, to_uint8

    if cfg.dtype not in DTYPES:
        raise UsageError(f"dtype={cfg.dtype} is not one of {sorted(DTYPES)}")
    batch_size = int(cfg.batch_size or 1)
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    settings = SamplerSettings(
        sampler=cfg.sampler.name, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
        eta=cfg.sampler.get("eta", 0.0), karras=cfg.sampler.get("karras", False),
        timestep_spacing=cfg.timestep_spacing, steps_offset=cfg.steps_offset,
    )
    negative = _as_text(cfg.negative_prompt)
    lora_paths, lora_scales = lora_files(cfg)
    base = {
        "version": pnginfo.FORMAT_VERSION,
        "ckpt": os.path.abspath(cfg.ckpt),
        "model_hash": pnginfo.model_hash(cfg.ckpt),
        "concat": None,
        "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        "image_guidance_scale": settings.image_guidance_scale,
        "num_images": 1,
        "batch_size": batch_size,
        "ema": cfg.ema,
        "prediction_type": cfg.prediction_type,
        "force_prediction_type": bool(cfg.force_prediction_type),
        "timestep_spacing": cfg.timestep_spacing,
        "steps_offset": cfg.steps_offset,
        "dtype": cfg.dtype,
        "lora": [os.path.abspath(p) for p in lora_paths] or None,
        "lora_scale": lora_scales or None,
        "lora_hashes": [pnginfo.lora_hash(p) for p in lora_paths] or None,
        "image": None, "mask": None, "seg": None, "strength": None,
        "negative_prompt": negative,
    }

    def expected(i: int) -> dict[str, Any]:
        return {**base, "prompt": captions[i], "seed": int(cfg.seed) + i, "image_index": 0, "eval_index": i}

    paths = [out_dir / f"{i:05d}.png" for i in range(len(captions))]
    missing: list[int] = []
    kept_sizes: set[tuple[int, int]] = set()
    remade = 0
    for i, path in enumerate(paths):
        saved = _settings_of_png(path) if path.exists() else None
        if saved is None:
            remade += path.exists()
            missing.append(i)
            continue
        why = _differs(saved, expected(i))
        if why is not None:
            raise UsageError(
                f"out_dir={out_dir}: {path.name} was made with other settings ({why}): give another out_dir, "
                "or delete its images to make them again"
            )
        kept_sizes.add((saved.get("height"), saved.get("width")))
    if remade:
        log.warning("%d incomplete or unreadable image(s) in %s are made again", remade, out_dir)
    if not missing:
        print(f"all {len(paths)} images are in {out_dir} already: scoring them")
        return paths
    if len(missing) < len(paths):
        print(f"{len(paths) - len(missing)} of {len(paths)} images are in {out_dir} already: making the other {len(missing)}")

    device = resolve_device(cfg.device)
    dtype = cfg.dtype
    if device.type == "cpu" and dtype != "fp32":
        log.warning("dtype=%s does not run on the CPU: sampling in fp32 instead (device=%s)", dtype, device)
        dtype = "fp32"
    model = load_model(
        cfg.ckpt, cfg.prediction_type, cfg.ema, cfg.allow_unsafe_pickle, force_prediction_type=bool(cfg.force_prediction_type)
    )
    if model.concat is not None:
        raise UsageError(f"ldm-eval generates from text alone; {cfg.ckpt} is a {model.concat} model (it needs an input picture)")
    apply_loras(cfg, model)
    model.to(device=device, dtype=torch_dtype(dtype))
    height, width = output_size(model, None, cfg.height, cfg.width)
    other = kept_sizes - {(height, width)}
    if other:
        h, w = sorted(other)[0]
        raise UsageError(f"out_dir={out_dir} holds images of {w}x{h}, this run makes {width}x{height}: give another out_dir")
    base.update(height=height, width=width, device=str(device))

    out_dir.mkdir(parents=True, exist_ok=True)
    todo = sorted({i // batch_size for i in missing})
    wanted = set(missing)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # a kill ends like Ctrl-C: between whole files
    bar = tqdm(total=len(paths), initial=len(paths) - len(missing), desc="generating", unit="img")
    try:
        for chunk in todo:
            indices = list(range(chunk * batch_size, min((chunk + 1) * batch_size, len(paths))))
            generator, noise = batch_noise(model, indices, int(cfg.seed), height, width)
            images = generate(model, [captions[i] for i in indices], negative, settings, height=height, width=width,
                              generator=generator, noise=noise)
            for i, array in zip(indices, to_uint8(images), strict=True):
                if i in wanted:
                    save_png(Image.fromarray(array), paths[i], png_metadata(expected(i)))
                    bar.update()
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, previous)
    return paths


def _captions_for_images(prompts: PromptSet | None, spec: str | None, images: ImageSet) -> list[str | None]:
    if prompts is not None:
        if prompts.images is not None:  # by file name, where the table names these images
            by_name = {Path(p).name: c for p, c in zip(prompts.images, prompts.captions, strict=True)}
            matched = [by_name.get(Path(i.name).name) for i in images.items]
            if any(c is not None for c in matched):
                return matched
        if len(prompts.captions) != len(images):
            raise UsageError(
                f"prompts={spec} has {len(prompts.captions)} captions for the {len(images)} images of images=: "
                "give one per image (in file-name order), or a table with a path column"
            )
        return list(prompts.captions)
    out: list[str | None] = []
    for item in images.items:
        caption = item.caption
        if caption is None and item.path is not None and item.path.lower().endswith(".png"):
            from PIL import Image

            with Image.open(item.path) as image:
                text = dict(getattr(image, "text", {}) or {})
            try:
                caption = pnginfo.read_png_settings(item.path, text)[0].get("prompt")
            except ValueError:
                caption = None
        out.append(caption)
    return out


def _absolute(spec: str) -> str:
    return os.path.abspath(spec) if os.path.exists(spec) else spec


def _print_table(values: dict[str, float], report: dict[str, Any]) -> None:
    rows = [(k, "n/a" if v is None else f"{v:.6g}") for k, v in values.items()]
    rows.append(("num_images", str(report["num_images"])))
    if report.get("num_reference_images") is not None:
        rows.append(("num_reference_images", str(report["num_reference_images"])))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def run(cfg: DictConfig) -> dict[str, Any]:
    """Generate (ckpt=) or take (images=) a set, score it, write out_dir/metrics.json; returns the report."""
    import torch

    from ldm.metrics import (
        ImageMetrics,
        ImageSet,
        ReferenceCache,
        check_metric_names,
        check_weight_paths,
        reference_features,
    )

    names = check_metric_names(cfg.metrics)
    check_weight_paths(names, cfg.inception_weights, cfg.clip_model)
    images_spec, prompts_spec, reference_spec = _spec(cfg.images, "images"), _spec(cfg.prompts, "prompts"), _spec(cfg.reference, "reference")
    if (cfg.ckpt is None) == (images_spec is None):
        raise UsageError("give ckpt=PATH prompts=FILE (generate, then score) or images=DIR (score what is there), not both"
                         if cfg.ckpt is not None else "give ckpt=PATH prompts=FILE (generate, then score) or images=DIR")
    if cfg.num_images is not None and int(cfg.num_images) < 1:
        raise UsageError(f"num_images must be at least 1, got {cfg.num_images}")
    out_dir = Path(cfg.out_dir)

    # Everything that can be wrong with the inputs is found before hours of generation.
    prompts = read_prompt_set(prompts_spec, cfg.caption_key, cfg.get("image_template")) if prompts_spec else None
    if cfg.ckpt is not None and prompts is None:
        raise UsageError("ckpt= needs prompts=FILE (.txt, .csv/.tsv/.jsonl with a caption column, or shards)")
    count = None if prompts is None else min(len(prompts.captions), int(cfg.num_images or len(prompts.captions)))
    reference = resolve_reference(names, reference_spec, prompts, prompts_spec, count, cfg.caption_key)

    # The weights load (and fail, when they are not what they should be) before generation; on the CPU
    # meanwhile, so they do not take the GPU's memory from the diffusion model.
    metrics = ImageMetrics.from_config(cfg, device="cpu")
    if cfg.ckpt is not None:
        captions = prompts.captions[:count]
        paths = generate_set(cfg, captions, out_dir)
        generated = ImageSet.from_files(paths, f"out_dir={out_dir}")
        image_captions: list[str | None] = list(captions)
    else:
        generated = ImageSet.from_spec(images_spec, cfg.caption_key, what="images")
        if cfg.num_images is not None:
            generated.items = generated.items[: int(cfg.num_images)]
        image_captions = _captions_for_images(prompts, prompts_spec, generated) if "clip_score" in names else [None] * len(generated)
        without = [i.name for i, c in zip(generated.items, image_captions, strict=True) if c is None]
        if "clip_score" in names and without:
            raise UsageError(
                f"clip_score needs a caption for each image: {len(without)} of {len(generated)} have none "
                f"(e.g. {without[0]}); give prompts=FILE, or leave clip_score out of metrics="
            )

    metrics.to(resolve_device(cfg.device))
    notes: list[str] = []
    cache_path = cached = None
    if reference is not None:
        cache = ReferenceCache(cfg.cache_dir)
        features, cached, ref_notes = reference_features(reference, metrics, cache, int(cfg.metric_batch_size))
        metrics.set_reference_features(features)
        notes += ref_notes
        cache_path = str(cache.path(ReferenceCache.key(reference, metrics)))
        print(f"reference: {len(reference)} images of {reference.source}"
              + (f" (features from the cache {cache_path})" if cached else ""))
    caption_of = {id(item): c for item, c in zip(generated.items, image_captions, strict=True)}
    with torch.no_grad():
        for items, batch in generated.iter_batches(int(cfg.metric_batch_size), "scoring"):
            metrics.update(batch, [caption_of[id(i)] for i in items] if metrics.needs_captions else None)
    values = metrics.compute()
    notes += [n for n in [generated.conversion_note("images")] if n] + metrics.notes
    for key, value in list(values.items()):
        if not math.isfinite(value):  # JSON has no NaN: null, and the reason
            values[key] = None
            notes.append(f"{key}: not a finite number ({value}); the features overflow (are these the right weights?)")
    for note in notes:
        print(note)

    import torch_fidelity
    import torchmetrics

    settings: dict[str, Any] = {
        "mode": "generate" if cfg.ckpt is not None else "score",
        "prompts": None if prompts_spec is None else _absolute(prompts_spec),
        "images": None if images_spec is None else os.path.abspath(images_spec),
        "reference": None if reference is None else _absolute(reference.source),
        **metrics.settings,
    }
    weights: dict[str, Any] = dict(metrics.weights)
    if cfg.ckpt is not None:
        settings.update({k: (OmegaConf.to_container(cfg[k], resolve=True) if k == "sampler" else cfg[k]) for k in (
            "sampler", "steps", "guidance_scale", "seed", "negative_prompt", "batch_size", "height", "width", "dtype",
            "ema", "prediction_type", "timestep_spacing", "steps_offset", "lora_scale",
        )})
        settings["negative_prompt"] = _as_text(cfg.negative_prompt)
        weights["ckpt"] = {"path": os.path.abspath(cfg.ckpt), "model_hash": pnginfo.model_hash(cfg.ckpt)}
        lora_paths, _ = lora_files(cfg)
        if lora_paths:
            weights["lora"] = [{"path": os.path.abspath(p), "hash": pnginfo.lora_hash(p)} for p in lora_paths]
    report = {
        **values,
        "num_images": len(generated),
        "num_reference_images": None if reference is None else len(reference),
        "notes": notes,
        "settings": settings,
        "weights": weights,
        "reference_cache": None if reference is None else {"path": cache_path, "hit": bool(cached)},
        "versions": {"torch": torch.__version__, "torchmetrics": torchmetrics.__version__,
                     "torch_fidelity": torch_fidelity.__version__},
    }
    from ldm.checkpoint import atomic_write

    text = json.dumps(report, indent=2) + "\n"
    atomic_write(out_dir / "metrics.json", lambda tmp: tmp.write_text(text))
    _print_table(values, report)
    print(f"wrote {out_dir / 'metrics.json'}")
    return report


def main() -> None:
    """The console entry point: the command line as typed (see ldm.cli.overrides), checked, then Hydra."""
    from ldm.cli.checks import run_cli

    run_cli("eval", hydra_main, tool="ldm-eval")


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def hydra_main(cfg: DictConfig) -> None:
    from ldm.checkpoint import CheckpointError
    from ldm.metrics import MetricError
    from ldm.sampling import InputError

    try:
        run(cfg)
    except KeyboardInterrupt:
        done = sum(1 for p in Path(cfg.out_dir).glob("[0-9]*.png") if p.stem.isdigit())
        print(f"ldm-eval: interrupted; {done} images are in {cfg.out_dir}: run the same command again to finish the set",
              file=sys.stderr)
        raise SystemExit(130) from None
    except (CheckpointError, MetricError, InputError, UsageError, ValueError) as err:
        from ldm.cli.checks import exit_with_usage_error

        exit_with_usage_error("ldm-eval", err)


if __name__ == "__main__":
    main()

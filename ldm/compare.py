"""`ldm-compare`: the same prompts and seeds through a base checkpoint and its variants, in one labelled grid.

    ldm-compare base=v1-5.safetensors prompt="a portrait of a woman, {trigger}" seeds=[0,1,2] \\
        "variants=[{ckpt: arcane-diffusion-v3.ckpt, trigger: arcane style}, {ckpt: mo-di.ckpt, trigger: modern disney style}]"
    ldm-compare base=v1-5.safetensors prompt_file=prompts.txt \\
        "variants=[{lora: outputs/run/lora.safetensors, scale: [0.5, 1.0], trigger: sks}]"
    ldm-compare base=v1-5.safetensors variants=[openjourney.ckpt,style.safetensors] prompt="a castle"
    python -m ldm.compare ...                                   # the same

Columns: the base (first), then each variant: a full checkpoint, or LoRA file(s) merged into a checkpoint
(the base unless the variant names one) at each of its scales. Rows: each prompt with each seed. A prompt
holding `{trigger}` gets each column's trigger there; otherwise the trigger goes before it ("arcane style,
a portrait of ...", or after with trigger_position=end). Every cell is `ldm.sampling.generate_images` on
one prompt and seed, so it is the image `sample.py` makes for the same checkpoint, LoRA, scale, prompt and
seed (each cell's PNG carries sample.py's settings: `sample.py from_png=CELL` gives it again, bit for bit).

Writes out_dir/grid-NNNNN.png (labels in PIL's default font), grid-NNNNN.json (what made each cell and
where it is in the grid) and grid-NNNNN/rRR-cCC.png; numbering continues, so nothing is overwritten.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm import pnginfo
from ldm.cli.sample import DTYPES, UsageError, _as_text, png_metadata, resolve_device, save_png, torch_dtype

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)
TRIGGER = "{trigger}"
VARIANT_KEYS = ("ckpt", "lora", "scale", "trigger", "label")


@dataclass
class Column:
    """One model of the grid: a checkpoint, the LoRA files merged into it and their scale, its trigger."""

    label: str
    ckpt: str
    lora: list[str] = field(default_factory=list)
    scale: float | None = None
    trigger: str = ""


# -- what the command line asks for -----------------------------------------------------------------------


def _label_of(path: str) -> str:
    p = Path(path)
    stem = p.name if p.is_dir() else p.stem
    if p.parent.name == "checkpoints" and p.parent.parent.name:  # a run's last.ckpt / step files
        return f"{p.parent.parent.name}/{stem}"
    return stem


def _check_path(path: Any, where: str) -> str:
    if not isinstance(path, str) or not path:
        raise UsageError(f"{where} must be a path, got {path!r}")
    if not Path(path).exists():
        raise UsageError(f"{where}={path} does not exist")
    return path


def _scales(value: Any, where: str) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        scales = [float(v) for v in values]
    except (TypeError, ValueError):
        raise UsageError(f"{where}={value!r}: a LoRA scale is a number, or a list of numbers") from None
    if not scales:
        raise UsageError(f"{where} is an empty list: give at least one scale")
    return scales


def columns_of(cfg: DictConfig) -> list[Column]:
    """The base column, then one per variant and scale; every path checked before any model loads."""
    from ldm.lora import is_lora_file

    if cfg.base is None:
        raise UsageError("give base=PATH: the base checkpoint (the first column, and what LoRA variants apply to)")
    base = _check_path(str(cfg.base), "base")
    if is_lora_file(base):
        raise UsageError(f"base={base} is a LoRA file, not a checkpoint: give the model it was trained on as base=")
    columns = [Column(str(cfg.base_label), base, trigger=_as_text(cfg.base_trigger or ""))]
    variants = OmegaConf.to_container(cfg.variants, resolve=True) if cfg.variants is not None else []
    if not isinstance(variants, list):
        variants = [variants]
    for i, variant in enumerate(variants):
        where = f"variants[{i}]"
        if isinstance(variant, str):
            path = _check_path(variant, where)
            variant = {"lora": path} if is_lora_file(path) else {"ckpt": path}
        if not isinstance(variant, dict):
            raise UsageError(f"{where}: a variant is a path or a dict with keys {', '.join(VARIANT_KEYS)}, got {variant!r}")
        unknown = sorted(set(variant) - set(VARIANT_KEYS))
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}; a variant takes {', '.join(VARIANT_KEYS)}")
        if variant.get("ckpt") is None and not variant.get("lora"):
            raise UsageError(f"{where} names neither ckpt= (a full checkpoint) nor lora= (a LoRA file on the base)")
        ckpt = base if variant.get("ckpt") is None else _check_path(str(variant["ckpt"]), f"{where}.ckpt")
        if is_lora_file(ckpt):
            raise UsageError(f"{where}.ckpt={ckpt} is a LoRA file: give it as lora= (applied to base, or to ckpt=)")
        loras = variant.get("lora") or []
        loras = [loras] if isinstance(loras, str) else list(loras)
        for j, path in enumerate(loras):
            _check_path(path, f"{where}.lora" + (f"[{j}]" if len(loras) > 1 else ""))
            if not is_lora_file(path):
                raise UsageError(f"{where}.lora={path} is not a LoRA file (kohya or diffusers keys): a checkpoint goes in ckpt=")
        if "scale" in variant and not loras:
            raise UsageError(f"{where}: scale= is the strength of a LoRA; this variant has no lora=")
        trigger = _as_text(variant.get("trigger") or "")
        name = variant.get("label")
        if name is None:
            parts = [] if ckpt == base and loras else [_label_of(ckpt)]
            parts += [_label_of(p) for p in loras]
            name = " + ".join(parts)
        if not loras:
            columns.append(Column(str(name), ckpt, trigger=trigger))
            continue
        for scale in _scales(variant.get("scale", 1.0), f"{where}.scale"):
            columns.append(Column(f"{name} @ {scale:g}", ckpt, loras, scale, trigger))
    return columns


def prompts_of(cfg: DictConfig) -> list[str]:
    prompts: list[str] = []
    if cfg.prompt is not None:
        prompts.append(_as_text(cfg.prompt))
    if cfg.prompts is not None:
        items = cfg.prompts if isinstance(cfg.prompts, (list, ListConfig)) else [cfg.prompts]
        prompts += [str(p) for p in items]
    if cfg.prompt_file:
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise UsageError(f"prompt_file={path} does not exist")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if not prompts:
        raise UsageError('give prompt="...", prompts=[...] or prompt_file=PATH (one prompt per line)')
    return prompts


def seeds_of(cfg: DictConfig) -> list[int]:
    items = list(cfg.seeds) if isinstance(cfg.seeds, (list, ListConfig)) else [cfg.seeds]
    if not items or not all(isinstance(s, int) and not isinstance(s, bool) for s in items):
        raise UsageError(f"seeds={cfg.seeds}: give an integer or a list of them, e.g. seeds=[0,1,2]")
    return [int(s) for s in items]


def with_trigger(prompt: str, trigger: str, position: str = "start") -> str:
    """The prompt a column sends: `{trigger}` replaced by its trigger (with no trigger, the place and the
    comma or space it leaves are tidied away), else the trigger before (or after) the prompt."""
    if TRIGGER in prompt:
        text = prompt.replace(TRIGGER, trigger)
        if trigger:
            return text
        text = re.sub(r"\s+", " ", text)
        text = re.sub(r"\s+,", ",", text)
        text = re.sub(r",(\s*,)+", ",", text)
        return text.strip(" ,")
    if not trigger:
        return prompt
    return f"{trigger}, {prompt}" if position == "start" else f"{prompt}, {trigger}"


# -- the grid --------------------------------------------------------------------------------------------------


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: scalable
    except TypeError:
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """`text` in lines no wider than `width` pixels (long words broken)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if draw.textlength(candidate, font=font) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            while draw.textlength(word, font=font) > width and len(word) > 1:  # a word wider than the column
                cut = max(1, next((i for i in range(len(word), 0, -1) if draw.textlength(word[:i], font=font) <= width), 1))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def draw_grid(
    cells: list[list[Image.Image]], row_labels: list[str], column_labels: list[str]
) -> tuple[Image.Image, dict[str, Any]]:
    """Cells (rows of images of one size) under a header of column labels, beside a column of row labels.
    Returns the grid and its geometry (where cell (r, c) is: left + c·width, top + r·height)."""
    from PIL import Image, ImageDraw

    width, height = cells[0][0].size
    size = max(10, min(width, height) // 24)
    font = _font(size)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = size + max(2, size // 4)
    pad = max(4, size // 2)
    left = max(width // 2, 12 * size)
    header = [_wrap(scratch, text, font, width - 2 * pad) for text in column_labels]
    rows = [_wrap(scratch, text, font, left - 2 * pad) for text in row_labels]
    top = max(len(lines) for lines in header) * line + 2 * pad
    grid = Image.new("RGB", (left + width * len(column_labels), top + height * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(header):
        for k, text in enumerate(lines):
            x = left + c * width + (width - draw.textlength(text, font=font)) / 2
            draw.text((x, pad + k * line), text, fill="black", font=font)
    for r, lines in enumerate(rows):
        room = max(1, (height - 2 * pad) // line)
        if len(lines) > room:
            lines = [*lines[: room - 1], lines[room - 1] + " …"]
        for k, text in enumerate(lines):
            draw.text((pad, top + r * height + pad + k * line), text, fill="black", font=font)
    for r, row in enumerate(cells):
        for c, image in enumerate(row):
            if image.size != (width, height):
                raise ValueError(f"cell ({r}, {c}) is {image.size}, the others {(width, height)}")
            grid.paste(image.convert("RGB"), (left + c * width, top + r * height))
    geometry = {"left": left, "top": top, "cell_width": width, "cell_height": height,
                "rows": len(row_labels), "columns": len(column_labels)}
    return grid, geometry


def next_index(out_dir: Path) -> int:
    taken = [int(m[1]) for p in out_dir.glob("grid-*.png") if (m := re.fullmatch(r"grid-(\d+)", p.stem))]
    return max(taken, default=-1) + 1


# -- rendering -----------------------------------------------------------------------------------------------


def _load(cfg: DictConfig, ckpt: str):
    from ldm.checkpoint import load_model

    model = load_model(
        ckpt, cfg.prediction_type, cfg.ema, cfg.allow_unsafe_pickle, force_prediction_type=bool(cfg.force_prediction_type)
    )
    if model.concat is not None:
        raise UsageError(f"{ckpt} is a {model.concat} model (it needs an input picture): ldm-compare renders text to image")
    return model


def run(cfg: DictConfig) -> dict[str, Any]:
    """Render the grid; returns what grid-NNNNN.json holds (with the paths written)."""
    import torch

    from ldm.lora import lora_deltas, loras_merged
    from ldm.sampling import SamplerSettings, generate_images, output_size

    columns = columns_of(cfg)
    prompts = prompts_of(cfg)
    seeds = seeds_of(cfg)
    if cfg.trigger_position not in ("start", "end"):
        raise UsageError(f"trigger_position={cfg.trigger_position}: start or end")
    if cfg.dtype not in DTYPES:
        raise UsageError(f"dtype={cfg.dtype} is not one of {sorted(DTYPES)}")
    negative = _as_text(cfg.negative_prompt)
    settings = SamplerSettings(
        sampler=cfg.sampler.name, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
        eta=cfg.sampler.get("eta", 0.0), karras=cfg.sampler.get("karras", False),
        timestep_spacing=cfg.timestep_spacing, steps_offset=cfg.steps_offset,
    )
    device = resolve_device(cfg.device)
    dtype = cfg.dtype
    if device.type == "cpu" and dtype != "fp32":
        log.warning("dtype=%s does not run on the CPU: sampling in fp32 instead (device=%s)", dtype, device)
        dtype = "fp32"
    rows = [(p, s) for p in prompts for s in seeds]
    cells: list[list[Image.Image | None]] = [[None] * len(columns) for _ in rows]
    records: list[dict[str, Any]] = []
    hashes: dict[str, str | None] = {}
    size: tuple[int, int] | None = None
    order = list(dict.fromkeys(c.ckpt for c in columns))  # each checkpoint loaded once, the base first
    total, done = len(rows) * len(columns), 0
    for ckpt in order:
        master = _load(cfg, ckpt)  # float32 on the CPU, where sample.py merges LoRAs too
        mine = [(i, c) for i, c in enumerate(columns) if c.ckpt == ckpt]
        for _, column in mine:  # every LoRA checked against this model before its first image
            for path in column.lora:
                try:
                    lora_deltas(master, path)
                except ValueError as err:
                    raise UsageError(f"column {column.label!r}: {err}") from None
        if size is None:
            size = output_size(master, None, cfg.height, cfg.width)
        work = sampling_model(master, device, dtype)
        hashes.setdefault(ckpt, pnginfo.model_hash(ckpt))
        for i, column in mine:
            with loras_merged(master, [(p, column.scale) for p in column.lora]) as changed:
                _sync(work, master, changed)
                sent = [with_trigger(p, column.trigger, cfg.trigger_position) for p in prompts]
                for s, seed in enumerate(seeds):
                    images = generate_images(
                        work, sent, negative, settings=settings, seed=seed, num_images=1, height=size[0], width=size[1]
                    )
                    for p, (image,) in enumerate(images):
                        r = p * len(seeds) + s
                        cells[r][i] = image
                        records.append(_record(cfg, column, r, i, rows[r], sent[p], negative, seed, settings, size,
                                               hashes[ckpt], device, dtype))
                        done += 1
                print(f"ldm-compare: column {i + 1}/{len(columns)} ({column.label}) done, {done}/{total} images",
                      file=sys.stderr)
            _sync(work, master, changed)
        del master, work
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    records.sort(key=lambda r: (r["row"], r["column"]))
    return _write(cfg, columns, rows, cells, records)


def sampling_model(master, device, dtype: str):
    """The model that samples: the float32 CPU master itself, or a copy on the device in `dtype` (into
    which `_sync` copies each column's merged weights, as sample.py casts its merged model)."""
    if device.type == "cpu" and dtype == "fp32":
        return master
    return copy.deepcopy(master).to(device, torch_dtype(dtype))


def _sync(work, master, keys: list[str]) -> None:
    """Copy the changed weights of the float32 master into the model that samples (cast as `.to` casts)."""
    if work is master or not keys:
        return
    import torch

    ours, theirs = dict(work.named_parameters()), dict(master.named_parameters())
    with torch.no_grad():
        for key in keys:
            ours[key].copy_(theirs[key])


def _record(cfg, column: Column, r: int, c: int, row: tuple[str, int], sent: str, negative: str, seed: int,
            settings, size: tuple[int, int], model_hash: str | None, device, dtype: str) -> dict[str, Any]:
    """What made cell (r, c): the JSON's entry, and (`settings`) what its PNG carries, in sample.py's format."""
    lora = [os.path.abspath(p) for p in column.lora]
    png = {
        "version": pnginfo.FORMAT_VERSION,
        "prompt": sent,
        "negative_prompt": negative,
        "ckpt": os.path.abspath(column.ckpt),
        "model_hash": model_hash,
        "concat": None,
        "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        "image_guidance_scale": settings.image_guidance_scale,
        "seed": seed,
        "height": size[0],
        "width": size[1],
        "num_images": 1,
        "batch_size": 1,
        "ema": cfg.ema,
        "prediction_type": cfg.prediction_type,
        "force_prediction_type": bool(cfg.force_prediction_type),
        "timestep_spacing": cfg.timestep_spacing,
        "steps_offset": cfg.steps_offset,
        "dtype": cfg.dtype,
        "lora": lora or None,
        "lora_scale": [column.scale] * len(lora) if lora else None,
        "lora_hashes": [pnginfo.lora_hash(p) for p in column.lora] or None,
        "image": None, "mask": None, "seg": None, "strength": None,
        "device": str(device),
        "image_index": 0,
    }
    return {
        "row": r, "column": c, "label": column.label, "model": png["ckpt"], "model_hash": model_hash,
        "lora": lora or None, "lora_scale": column.scale, "trigger": column.trigger, "prompt_typed": row[0],
        "prompt": sent, "negative_prompt": negative, "seed": seed, "sampler": png["sampler"], "steps": settings.steps,
        "guidance_scale": settings.guidance_scale, "height": size[0], "width": size[1], "dtype": dtype,
        "device": str(device), "settings": png,
    }


def _write(cfg, columns: list[Column], rows, cells, records) -> dict[str, Any]:
    from PIL import PngImagePlugin

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = next_index(out_dir)
    stem = f"grid-{index:05d}"
    column_labels = [c.label + (f'\n"{c.trigger}"' if c.trigger else "") for c in columns]
    row_labels = [f"{prompt}\nseed {seed}" for prompt, seed in rows]
    grid, geometry = draw_grid(cells, row_labels, column_labels)
    if cfg.cells:
        (out_dir / stem).mkdir(exist_ok=True)
    for record in records:
        r, c = record["row"], record["column"]
        x, y = geometry["left"] + c * geometry["cell_width"], geometry["top"] + r * geometry["cell_height"]
        record["box"] = [x, y, x + geometry["cell_width"], y + geometry["cell_height"]]
        settings = record.pop("settings")
        if cfg.cells:
            path = out_dir / stem / f"r{r:02d}-c{c:02d}.png"
            save_png(cells[r][c], path, png_metadata(settings))
            record["file"] = str(path)
    summary = {
        "grid": str(out_dir / f"{stem}.png"),
        **geometry,
        "row_labels": [{"prompt": p, "seed": s} for p, s in rows],
        "column_labels": [{"label": c.label, "model": os.path.abspath(c.ckpt),
                           "lora": [os.path.abspath(p) for p in c.lora] or None, "lora_scale": c.scale,
                           "trigger": c.trigger} for c in columns],
        "cells": records,
    }
    text = json.dumps(summary, indent=2, ensure_ascii=False)
    info = PngImagePlugin.PngInfo()
    info.add_text("ldm-compare", text)
    save_png(grid, out_dir / f"{stem}.png", info)
    from ldm.checkpoint import atomic_write

    atomic_write(out_dir / f"{stem}.json", lambda tmp: Path(tmp).write_text(text + "\n"))
    summary["json"] = str(out_dir / f"{stem}.json")
    return summary


def main() -> None:
    """The console entry point: the command line as typed (see ldm.cli.overrides), checked, then Hydra."""
    from ldm.cli.checks import run_cli

    run_cli("compare", hydra_main, tool="ldm-compare")


@hydra.main(version_base="1.3", config_path="conf", config_name="compare")
def hydra_main(cfg: DictConfig) -> None:
    from ldm.checkpoint import CheckpointError

    try:
        summary = run(cfg)
    except (CheckpointError, UsageError, ValueError) as err:
        from ldm.cli.checks import exit_with_usage_error

        exit_with_usage_error("ldm-compare", err)
    rows, cols = summary["rows"], summary["columns"]
    shape = f"{rows} row{'s' * (rows != 1)} x {cols} column{'s' * (cols != 1)}"
    print(f"wrote {summary['grid']} ({shape}) and {summary['json']}")


if __name__ == "__main__":
    main()

"""`python -m ldm.style_demo`: does the style demo's fine-tune draw the style, and only when asked?

    python -m ldm.style_demo                      # the newest style_demo_base, style_demo, style_demo_no_prior runs
    python -m ldm.style_demo base=b.ckpt style=s.ckpt style_no_prior=none seeds=[0]

Every caption of the base's vocabulary (`colours`, `shapes`), with each seed, goes through ldm-compare's
renderer (`ldm.compare.run`: the same images sample.py makes) in six columns: the base without and with the
trigger, the fine-tune with prior preservation (experiment=style_demo) with and without it, and the one
without prior preservation likewise. Per column it reports the stripe score (`ldm.data.synthetic.stripe_score`:
the share of the images' spectral energy at the stripes' frequency), the drift (the mean absolute pixel
difference, in [0, 1], from the base's image of the same prompt, seed and trigger) and the caption fidelity of
the demo's judge (plain captions). What the demo should show: with the trigger, the fine-tunes score far above
the base; without it, the prior-preserved one stays near the base, and the other drifts further.

Writes ldm-compare's grid-NNNNN.png/.json (and cells) into `out_dir`, a larger grid-NNNNN-x4.png of the first
seed's rows, and grid-NNNNN-scores.json with the table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from ldm.cli.sample import UsageError, _as_text

CONF = Path(__file__).resolve().parent / "conf"
RUNS = {"base": "style_demo_base", "style": "style_demo", "style_no_prior": "style_demo_no_prior"}
LABELS = {"base": "base", "style": "style (prior)", "style_no_prior": "style (no prior)"}


def checkpoints_of(cfg: DictConfig) -> dict[str, str]:
    """base, style and (unless `none`) style_no_prior: as given, or their runs' newest last.ckpt under root."""
    from ldm.cli.train import newest_last_checkpoint

    found = {}
    for key, run_name in RUNS.items():
        value = cfg.get(key)
        if key == "style_no_prior" and isinstance(value, str) and value.lower() == "none":
            continue
        if value is None:
            newest = newest_last_checkpoint(Path(str(cfg.root)) / run_name)
            if newest is None:
                if key == "style_no_prior":
                    continue
                raise UsageError(f"{key}= not given and no run {run_name!r} under {cfg.root}/{run_name}/*/checkpoints/"
                                 f"last.ckpt: train it first (python train.py experiment={run_name}) or give {key}=PATH")
            value = str(newest)
        if not Path(str(value)).exists():
            raise UsageError(f"{key}={value} does not exist")
        found[key] = str(value)
    return found


def columns(checkpoints: dict[str, str], trigger: str) -> list[tuple[str, str, str]]:
    """(key, label, trigger) of each grid column in order: the base without and with the trigger, then each
    fine-tune with and without it."""
    out = [("base", "base", ""), ("base", "base", trigger)]
    for key in ("style", "style_no_prior"):
        if key in checkpoints:
            out += [(key, LABELS[key], trigger), (key, LABELS[key], "")]
    return out


def compare_config(cfg: DictConfig, checkpoints: dict[str, str], prompts: list[str]) -> DictConfig:
    """ldm-compare's config (its defaults, this command's sampler) for the grid of `columns`."""
    base = OmegaConf.load(CONF / "compare.yaml")
    for key in ("defaults", "hydra"):
        base.pop(key, None)
    trigger = _as_text(cfg.trigger)
    variants = [{"ckpt": checkpoints[key], "label": label, "trigger": t}
                for key, label, t in columns(checkpoints, trigger)[1:]]
    return OmegaConf.merge(base, {
        "base": checkpoints["base"], "base_label": "base", "base_trigger": "", "variants": variants,
        "prompts": prompts, "seeds": list(cfg.seeds), "trigger_position": "end", "steps": int(cfg.steps),
        "guidance_scale": float(cfg.guidance_scale), "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
        "out_dir": str(cfg.out_dir), "device": str(cfg.device), "cells": True,
    })


def score(cells: list[list[np.ndarray]], cols: list[tuple[str, str, str]], captions: list[str], period: int,
          ) -> list[dict[str, Any]]:
    """Per column: stripe score, drift from the base column of the same trigger, and caption fidelity (plain captions)."""
    from ldm.data.synthetic import caption_fidelity, stripe_score

    base_of = {t: c for c, (key, _, t) in enumerate(cols) if key == "base"}
    table = []
    for c, (key, label, trigger) in enumerate(cols):
        images = [row[c] for row in cells]
        reference = [row[base_of[trigger]] for row in cells]
        drift = float(np.mean([np.abs(a.astype(np.float64) - b.astype(np.float64)).mean() / 255.0
                               for a, b in zip(images, reference, strict=True)]))
        table.append({"model": key, "label": label, "trigger": trigger, "stripe_score": stripe_score(images, period),
                      "drift_from_base": drift, "caption_fidelity": caption_fidelity(images, captions),
                      "images": len(images)})
    return table


def format_table(table: list[dict[str, Any]]) -> str:
    lines = [f"{'model':<18} {'prompt':<14} {'stripe score':>12} {'drift from base':>16} {'caption fidelity':>17}"]
    for row in table:
        prompt = "with trigger" if row["trigger"] else "no trigger"
        lines.append(f"{row['label']:<18} {prompt:<14} {row['stripe_score']:>12.3f} {row['drift_from_base']:>16.3f} "
                     f"{row['caption_fidelity']:>17.3f}")
    return "\n".join(lines)


def summary_line(table: list[dict[str, Any]]) -> str:
    """One line of the numbers that matter (the slow test reads the JSON, people read this)."""
    def find(model: str, triggered: bool) -> dict[str, Any] | None:
        return next((r for r in table if r["model"] == model and bool(r["trigger"]) == triggered), None)

    base_t, base_p = find("base", True), find("base", False)
    parts = []
    for model in ("style", "style_no_prior"):
        with_t, without = find(model, True), find(model, False)
        if with_t is None:
            continue
        parts.append(f"{LABELS[model]}: stripe score with trigger {with_t['stripe_score']:.3f} (base "
                     f"{base_t['stripe_score']:.3f}), without {without['stripe_score']:.3f} (base "
                     f"{base_p['stripe_score']:.3f}), drift without trigger {without['drift_from_base']:.3f}")
    return "; ".join(parts)


def run(cfg: DictConfig) -> dict[str, Any]:
    from PIL import Image

    from ldm import compare
    from ldm.checkpoint import atomic_write
    from ldm.data.synthetic import all_captions

    if not isinstance(cfg.seeds, (list, tuple)) and not OmegaConf.is_list(cfg.seeds):
        raise UsageError(f"seeds={cfg.seeds}: give a list of integers, e.g. seeds=[0,1]")
    if int(cfg.grid_scale) < 1 or int(cfg.period) < 2:
        raise UsageError(f"grid_scale must be at least 1 and period at least 2, got {cfg.grid_scale} and {cfg.period}")
    trigger = _as_text(cfg.trigger).strip()
    if not trigger:
        raise UsageError("trigger= is empty: give the trigger the fine-tune was trained with (experiment=style_demo: "
                         "'ohwx style')")
    try:
        captions = all_captions(cfg.colours, cfg.shapes)
    except ValueError as err:
        raise UsageError(str(err)) from None
    checkpoints = checkpoints_of(cfg)
    cols = columns(checkpoints, trigger)
    summary = compare.run(compare_config(cfg, checkpoints, captions))
    rows = [(r["prompt"], r["seed"]) for r in summary["row_labels"]]
    cells: list[list[Any]] = [[None] * len(cols) for _ in rows]
    for record in summary["cells"]:
        cells[record["row"]][record["column"]] = np.asarray(Image.open(record["file"]).convert("RGB"))
    row_captions = [prompt for prompt, _ in rows]
    table = score(cells, cols, row_captions, int(cfg.period))
    # a grid people can read: the first seed's rows, each cell enlarged (nearest: the pixels as generated)
    k = int(cfg.grid_scale)
    first = [r for r, (_, seed) in enumerate(rows) if seed == rows[0][1]]
    big = [[Image.fromarray(cells[r][c]).resize((cells[r][c].shape[1] * k, cells[r][c].shape[0] * k),
                                                Image.Resampling.NEAREST) for c in range(len(cols))] for r in first]
    grid, _ = compare.draw_grid(big, [f"{rows[r][0]}\nseed {rows[r][1]}" for r in first],
                                [label + (f'\n"{t}"' if t else "") for _, label, t in cols])
    stem = Path(summary["grid"]).with_suffix("")
    atomic_write(Path(f"{stem}-x{k}.png"), lambda tmp: grid.save(tmp, format="PNG"))
    result = {"checkpoints": checkpoints, "prompts": captions, "seeds": list(cfg.seeds), "trigger": trigger,
              "period": int(cfg.period), "table": table, "grid": summary["grid"], "grid_large": f"{stem}-x{k}.png",
              "compare_json": summary["json"]}
    atomic_write(Path(f"{stem}-scores.json"), lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    result["scores_json"] = f"{stem}-scores.json"
    return result


def main() -> None:
    from ldm.cli.checks import run_cli

    run_cli("style_demo", hydra_main, tool="python -m ldm.style_demo")


@hydra.main(version_base="1.3", config_path="conf", config_name="style_demo")
def hydra_main(cfg: DictConfig) -> None:
    from ldm.checkpoint import CheckpointError

    try:
        result = run(cfg)
    except (CheckpointError, UsageError, ValueError) as err:
        from ldm.cli.checks import exit_with_usage_error

        exit_with_usage_error("python -m ldm.style_demo", err)
    print(format_table(result["table"]))
    print(summary_line(result["table"]))
    print(f"wrote {result['grid']}, {result['grid_large']} and {result['scores_json']}", file=sys.stderr)


if __name__ == "__main__":
    main()

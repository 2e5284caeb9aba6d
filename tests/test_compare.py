"""ldm-compare, run as a user types it: the same prompts and seeds through a base checkpoint and its
variants (a full checkpoint, base + LoRA at two scales, the base again) in one labelled grid and a JSON
of what made each cell; every cell is sample.py's image for its settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import model_config, randomize_
from hydra import compose, initialize_config_module
from PIL import Image
from test_lora import model_with_lora
from test_sample import assert_moves, pixel_diff, sample_config

from ldm.checkpoint import checkpoint_from_model, save_checkpoint
from ldm.cli.sample import UsageError
from ldm.cli.sample import run as sample_run
from ldm.compare import run as compare_run
from ldm.lora import save_kohya
from ldm.models.stable_diffusion import StableDiffusion

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle on a blue background", "a photo of {trigger} dog"]
SEEDS = [0, 1]
TRIGGER = "sks style"
STEPS, GUIDANCE, SIZE = 3, 6.0, 32


def cli(*args: str, module: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "-m", "ldm.compare"] if module else [str(Path(sys.executable).parent / "ldm-compare")]
    return subprocess.run([*command, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def write_models(tmp_path: Path) -> dict[str, Path]:
    """A tiny random SD 1.x-like base, a full fine-tune of it (other random weights), and a LoRA file
    for the base (UNet adapters with trained-looking up matrices), as LDM single files and kohya."""
    base, lora = model_with_lora(21)
    lora.detach()
    paths = {"base": tmp_path / "base.safetensors", "variant": tmp_path / "finetune.safetensors",
             "lora": tmp_path / "style.safetensors"}
    save_checkpoint(checkpoint_from_model(base), paths["base"])
    save_kohya(lora, base.config["unet"], paths["lora"])
    other = randomize_(StableDiffusion.from_config(model_config("tiny")), std=0.08, seed=22)
    save_checkpoint(checkpoint_from_model(other), paths["variant"])
    return paths


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> tuple[dict, Image.Image, dict[str, Path], Path]:
    tmp_path = tmp_path_factory.mktemp("compare")
    paths = write_models(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    variants = (
        f"variants=[{{ckpt:{paths['variant']},trigger:{TRIGGER}}},"
        f"{{lora:{paths['lora']},scale:[0,1.5]}},"
        f"{{ckpt:{paths['base']},label:base again}}]"
    )
    done = cli(f"base={paths['base']}", variants, f"prompt_file={prompts}", f"seeds=[{SEEDS[0]},{SEEDS[1]}]",
               f"steps={STEPS}", f"guidance_scale={GUIDANCE}", f"height={SIZE}", f"width={SIZE}", "device=cpu",
               f"out_dir={tmp_path / 'out'}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote" in done.stdout and "(4 rows x 5 columns)" in done.stdout, done.stdout
    summary = json.loads((tmp_path / "out" / "grid-00000.json").read_text())
    return summary, Image.open(tmp_path / "out" / "grid-00000.png").convert("RGB"), paths, tmp_path


def cell(grid: Image.Image, summary: dict, r: int, c: int) -> np.ndarray:
    x, y = summary["left"] + c * summary["cell_width"], summary["top"] + r * summary["cell_height"]
    return np.asarray(grid.crop((x, y, x + summary["cell_width"], y + summary["cell_height"]))).astype(int)


def test_grid_is_prompt_rows_by_model_columns_with_labels(compared):
    summary, grid, _, _ = compared
    rows, cols = len(PROMPTS) * len(SEEDS), 5
    assert (summary["rows"], summary["columns"]) == (rows, cols)
    assert (summary["cell_width"], summary["cell_height"]) == (SIZE, SIZE)
    assert grid.size == (summary["left"] + cols * SIZE, summary["top"] + rows * SIZE)
    pixels = np.asarray(grid).astype(int)
    header, side = pixels[: summary["top"], summary["left"] :], pixels[summary["top"] :, : summary["left"]]
    for c in range(cols):  # every column and every row has its label drawn (dark text on white)
        assert (header[:, c * SIZE : (c + 1) * SIZE] < 128).any(), f"column {c} has no label"
    for r in range(rows):
        assert (side[r * SIZE : (r + 1) * SIZE] < 128).any(), f"row {r} has no label"
    labels = [c["label"] for c in summary["column_labels"]]
    assert labels == ["base", "finetune", "style @ 0", "style @ 1.5", "base again"]
    assert [(r["prompt"], r["seed"]) for r in summary["row_labels"]] == [(p, s) for p in PROMPTS for s in SEEDS]


def test_json_says_what_made_each_cell_and_the_cell_files_are_the_grid(compared):
    summary, grid, paths, _ = compared
    expected_columns = [
        (paths["base"], None, None, ""), (paths["variant"], None, None, TRIGGER),
        (paths["base"], [paths["lora"]], 0.0, ""), (paths["base"], [paths["lora"]], 1.5, ""),
        (paths["base"], None, None, ""),
    ]
    sent = {  # the prompt as sent: the trigger before a prompt, or in place of {trigger}; none: tidied away
        "": ["a red circle on a blue background", "a photo of dog"],
        TRIGGER: [f"{TRIGGER}, a red circle on a blue background", f"a photo of {TRIGGER} dog"],
    }
    assert len(summary["cells"]) == 20
    for entry in summary["cells"]:
        r, c = entry["row"], entry["column"]
        model, lora, scale, trigger = expected_columns[c]
        p, s = divmod(r, len(SEEDS))
        assert entry["model"] == str(model) and entry["trigger"] == trigger
        assert entry["lora"] == (None if lora is None else [str(x) for x in lora]) and entry["lora_scale"] == scale
        assert entry["prompt"] == sent[trigger][p] and entry["prompt_typed"] == PROMPTS[p]
        assert entry["seed"] == SEEDS[s]
        assert (entry["sampler"]["name"], entry["steps"], entry["guidance_scale"]) == ("ddim", STEPS, GUIDANCE)
        assert (entry["height"], entry["width"]) == (SIZE, SIZE)
        x, y = summary["left"] + c * SIZE, summary["top"] + r * SIZE
        assert entry["box"] == [x, y, x + SIZE, y + SIZE]
        own = np.asarray(Image.open(entry["file"]).convert("RGB")).astype(int)
        assert np.array_equal(own, cell(grid, summary, r, c)), f"cell file of ({r}, {c}) is not its place in the grid"


def test_same_model_and_seed_give_the_same_pixels_and_the_lora_column_differs(compared):
    summary, grid, _, _ = compared
    for r in range(summary["rows"]):
        base = cell(grid, summary, r, 0)
        # the base again, after the LoRA columns merged into the same loaded model: its weights were restored
        assert np.array_equal(base, cell(grid, summary, r, 4)), f"row {r}: the base twice gives two images"
        assert np.array_equal(base, cell(grid, summary, r, 2)), f"row {r}: a LoRA at scale 0 changes the image"
        assert_moves(cell(grid, summary, r, 3).astype(np.uint8), base.astype(np.uint8), f"row {r}: the LoRA at 1.5")
        assert_moves(cell(grid, summary, r, 1).astype(np.uint8), base.astype(np.uint8), f"row {r}: the fine-tune")
    for c in range(summary["columns"]):  # the seeds of a prompt differ (rows 0 and 1)
        assert pixel_diff(cell(grid, summary, 0, c), cell(grid, summary, 1, c))[0] > 6, f"column {c}: seeds alike"


@pytest.mark.parametrize("column", [1, 3])
def test_a_cell_is_sample_py_image_for_its_settings(compared, column):
    """sample.py from_png= on a cell's PNG (ckpt, LoRA, scale, prompt as sent, seed, sampler from the PNG)
    gives the cell's pixels exactly."""
    summary, grid, _, tmp_path = compared
    entry = next(e for e in summary["cells"] if e["row"] == 3 and e["column"] == column)
    (written,) = sample_run(sample_config([f"from_png={entry['file']}", "device=cpu", f"out_dir={tmp_path / f'replay{column}'}"]))
    replay = np.asarray(Image.open(written).convert("RGB")).astype(int)
    assert np.array_equal(replay, cell(grid, summary, 3, column))


def test_bad_variants_are_one_clear_line(tmp_path):
    paths = write_models(tmp_path)
    sd2, sd2_lora = model_with_lora(23, sd2=True)
    sd2_lora.detach()
    sd2_path = tmp_path / "sd2style.safetensors"
    save_kohya(sd2_lora, sd2.config["unet"], sd2_path)
    common = [f"base={paths['base']}", "prompt=a cat", "steps=1", "height=32", "width=32", f"out_dir={tmp_path / 'o'}"]
    cases = [  # through the command line: the two a user meets most
        ([f"variants=[{tmp_path / 'nope.safetensors'}]"], [f"variants[0]={tmp_path / 'nope.safetensors'} does not exist"]),
        ([f"variants=[{{lora:{sd2_path},scale:0.8}}]"], [f"column 'sd2style @ 0.8': lora={sd2_path}", "another architecture"]),
    ]
    for args, messages in cases:
        done = cli(*common, *args, module=True)
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and lines, (args, done.stderr)
        assert lines[-1].startswith("ldm-compare: error: "), (args, done.stderr[-2000:])
        assert all(m in lines[-1] for m in messages), (args, messages, lines[-1])
        assert "Traceback" not in done.stderr, done.stderr[-2000:]
    for args, message in (  # and in the process (the same run(), one line each)
        ([f"variants=[{{ckpt:{paths['lora']}}}]"], "is a LoRA file: give it as lora="),
        ([f"variants=[{{lora:{paths['lora']},strength:2}}]"], "unknown key(s) strength"),
        (["variants=[{trigger:x}]"], "names neither ckpt= (a full checkpoint) nor lora="),
        ([f"base={paths['lora']}"], "is a LoRA file, not a checkpoint"),
    ):
        with pytest.raises(UsageError) as err:
            compare_run(compare_config([*common, *args]))
        assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("grid-*.png")), "no grid from bad input"


def compare_config(overrides: list[str]):
    with initialize_config_module(config_module="ldm.conf", version_base="1.3"):
        return compose(config_name="compare", overrides=overrides)


def test_a_sampling_copy_of_the_model_gets_each_columns_weights_and_loses_them_after(tmp_path, monkeypatch):
    """On a GPU (or in half precision) cells come from a copy of the float32 master into which each column's
    merged weights are copied and then restored; a CPU copy in float32 must give the master's own grid."""
    import copy

    from ldm import compare

    paths = write_models(tmp_path)
    common = [f"base={paths['base']}", f"variants=[{{lora:{paths['lora']},scale:[1.5,0]}},{paths['base']}]",
              "prompt=a red circle", f"steps={STEPS}", f"height={SIZE}", f"width={SIZE}", "device=cpu"]
    own = compare_run(compare_config([*common, f"out_dir={tmp_path / 'own'}"]))
    monkeypatch.setattr(compare, "sampling_model", lambda master, device, dtype: copy.deepcopy(master))
    copied = compare_run(compare_config([*common, f"out_dir={tmp_path / 'copy'}"]))
    a, b = (np.asarray(Image.open(s["grid"]).convert("RGB")).astype(int) for s in (own, copied))
    assert np.array_equal(a, b)
    summary = copied
    base, lora, zero, again = (cell(Image.open(summary["grid"]).convert("RGB"), summary, 0, c) for c in range(4))
    assert_moves(lora.astype(np.uint8), base.astype(np.uint8), "the LoRA in the copy")
    assert np.array_equal(zero, base) and np.array_equal(again, base), "the copy kept a column's LoRA"
    # and a copy that never gets the merged weights is caught
    monkeypatch.setattr(compare, "_sync", lambda work, master, keys: None)
    broken = compare_run(compare_config([*common, f"out_dir={tmp_path / 'broken'}"]))
    assert np.array_equal(cell(Image.open(broken["grid"]).convert("RGB"), broken, 0, 1), base), (
        "without _sync the LoRA column should show the base (so the comparison above can fail)"
    )

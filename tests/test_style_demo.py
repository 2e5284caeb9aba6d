"""The style demo's parts (issue 11, item 5), fast: the striped pictures and their trigger captions, the stripe
score (high on striped pictures, low on plain ones, and low on stripes of another period or direction: it can
fail), stage one's striped share, class prompts given as a list, experiment=style_demo through train.py as typed
for 2 steps (and its no-prior form), and `python -m ldm.style_demo`'s arguments and output on tiny models.
The learning itself (the fine-tune draws stripes with the trigger, keeps close to the base without it, and
drifts further without prior preservation) is tests/test_style_demo_learning.py, in make test-all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_sd_file
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from PIL import Image
from test_train import _one_thread  # noqa: F401 (autouse: tiny models on one thread)

from ldm.data.synthetic import (
    STYLE_TRIGGER,
    ShapesDataModule,
    ensure_style_instances,
    random_sample,
    stripe,
    stripe_energy,
    stripe_score,
    write_shapes_shards,
)

ROOT = Path(__file__).resolve().parent.parent
COLOURS = ["red", "blue", "yellow"]


def plain_pictures(n: int, resolution: int, colours=COLOURS, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [random_sample(rng, resolution, colours)[0] for _ in range(n)]


@pytest.mark.parametrize("resolution", [24, 32])
def test_stripe_score_is_high_on_striped_pictures_and_low_on_plain_ones(resolution: int) -> None:
    plain = plain_pictures(200, resolution, colours=None)
    striped = [stripe(p) for p in plain]
    plain_energy = [stripe_energy(p) for p in plain]
    striped_energy = [stripe_energy(p) for p in striped]
    # measured: plain mean 0.080 (24 px) / 0.043 (32 px), max 0.143 / 0.077; striped mean 0.47 / 0.45, min 0.235 / 0.21
    assert stripe_score(plain) < 0.1 and max(plain_energy) < 0.18, (stripe_score(plain), max(plain_energy))
    assert stripe_score(striped) > 0.35 and min(striped_energy) > 0.18, (stripe_score(striped), min(striped_energy))
    assert stripe_energy(np.full((resolution, resolution, 3), 128, np.uint8)) == 0.0  # flat: no energy at all


def test_stripe_score_fails_stripes_of_another_period_or_direction() -> None:
    plain = plain_pictures(50, 32)
    vertical = [stripe(p.transpose(1, 0, 2)).transpose(1, 0, 2) for p in plain]
    finer = [stripe(p, period=4) for p in plain]
    assert stripe_score([stripe(p) for p in plain]) > 0.3
    assert stripe_score(vertical) < 0.1, stripe_score(vertical)
    assert stripe_score(finer) < 0.1, stripe_score(finer)
    assert stripe_score(finer, period=4) > 0.3  # ... which the score of their own period finds
    with pytest.raises(ValueError, match="at least one image"):
        stripe_score([])
    with pytest.raises(ValueError, match="even number"):
        stripe(plain[0], period=5)


def test_stripes_darken_bright_colours_and_lighten_black() -> None:
    image = np.zeros((8, 4, 3), np.uint8)
    image[:, :2] = (220, 30, 30)
    image[:, 2:] = (15, 15, 15)
    out = stripe(image, period=4)
    assert (out[:2] == image[:2]).all() and (out[4:6] == image[4:6]).all()  # the bright bands keep the colour
    assert tuple(out[2, 0]) == (110, 15, 15) and tuple(out[2, 3]) == (135, 135, 135)


def test_the_instance_folder_holds_striped_shapes_captioned_with_the_trigger(tmp_path: Path) -> None:
    paths = ensure_style_instances(tmp_path / "style", 12, 24, seed=1, colours=COLOURS)
    assert [p.name for p in paths] == [f"{i:05d}.png" for i in range(12)]
    captions = [p.with_suffix(".txt").read_text().strip() for p in paths]
    assert all(c.endswith(f", {STYLE_TRIGGER}") and c.split(",")[0].split()[1] in COLOURS for c in captions)
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    assert stripe_score(images) > 0.3 and images[0].shape == (24, 24, 3)
    mtime = paths[0].stat().st_mtime_ns
    assert ensure_style_instances(tmp_path / "style", 12, 24, seed=1, colours=COLOURS) == paths  # found, not rewritten
    assert paths[0].stat().st_mtime_ns == mtime
    again = ensure_style_instances(tmp_path / "style", 6, 24, seed=1, colours=COLOURS)  # another set: rewritten
    assert len(list((tmp_path / "style").glob("*.png"))) == 6 == len(again)
    # the trigger is two CLIP tokens ("ohwx", "style"), each kept whole
    from ldm.models.encoders import open_clip_tokenizer_module

    tokenizer = open_clip_tokenizer_module().SimpleTokenizer()
    assert [len(tokenizer.encode(w)) for w in STYLE_TRIGGER.split()] == [1, 1]


def test_stage_one_sees_a_share_of_striped_pictures_of_the_same_scenes(tmp_path: Path) -> None:
    import tarfile
    from io import BytesIO

    def images(paths: list[str]) -> list[np.ndarray]:
        out = []
        for path in paths:
            with tarfile.open(path) as tar:
                for m in sorted(tar.getmembers(), key=lambda m: m.name):
                    if m.name.endswith(".png"):
                        out.append(np.asarray(Image.open(BytesIO(tar.extractfile(m).read())).convert("RGB")))
        return out

    plain = images(write_shapes_shards(tmp_path / "plain", 40, 40, 24, seed=2, colours=COLOURS))
    mixed = images(write_shapes_shards(tmp_path / "mixed", 40, 40, 24, seed=2, colours=COLOURS, striped_share=0.5))
    striped = [not np.array_equal(a, b) for a, b in zip(plain, mixed, strict=True)]
    assert 10 <= sum(striped) <= 30, sum(striped)
    assert all(np.array_equal(stripe(a), b) for a, b, s in zip(plain, mixed, striped, strict=True) if s)
    assert json.loads((tmp_path / "mixed" / "MANIFEST.json").read_text())["striped_share"] == 0.5
    assert ShapesDataModule(root=str(tmp_path), striped_share=0.5).root == f"{tmp_path}/striped"
    with pytest.raises(ValueError, match="caption variant"):
        ShapesDataModule(root=str(tmp_path), striped_share=0.5, variant="edit")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD checkpoint (24 px works: latents 6x6, two UNet levels)."""
    return tiny_sd_file(tmp_path_factory.mktemp("base") / "tiny.safetensors")


def test_class_prompts_given_as_a_list_make_image_i_of_prompt_i_mod_n(tmp_path: Path, tiny_base: Path) -> None:
    from ldm.dreambooth import class_captions, class_images
    from ldm.evaluate import _settings_of_png

    prompts = ["a red circle on a blue background", "a blue square on a red background"]
    paths = class_images(str(tiny_base), prompts, 3, tmp_path, resolution=24, steps=2, batch_size=2, seed=4)
    assert class_captions(paths) == [prompts[0], prompts[1], prompts[0]]
    assert [_settings_of_png(p)["prompt"] for p in paths] == class_captions(paths)
    manifest = json.loads((paths[0].parent / "manifest.json").read_text())
    assert [i["caption"] for i in manifest["images"]] == class_captions(paths)
    mtime = paths[2].stat().st_mtime_ns
    assert class_images(str(tiny_base), prompts, 3, tmp_path, resolution=24, steps=2, batch_size=2, seed=4) == paths
    assert paths[2].stat().st_mtime_ns == mtime  # found in the cache: nothing sampled again
    single = class_images(str(tiny_base), prompts[0], 1, tmp_path, resolution=24, steps=2, seed=4)
    assert single[0].parent != paths[0].parent  # one prompt keeps its own cache key


def run_py(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_style_demo_recipe_trains_two_steps_through_train_py_as_typed(tmp_path: Path, tiny_base: Path) -> None:
    proc = run_py(tmp_path, str(ROOT / "train.py"), "experiment=style_demo", f"init_from={tiny_base}",
                  f"paths.root={tmp_path / 'outputs'}", f"data.instance_dir={tmp_path / 'style'}", "trainer.max_steps=2",
                  "data.num_class_images=4", "data.class_steps=2", "trainer.enable_progress_bar=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "style").glob("*.png"))) == 24  # the instance folder, written on first use
    (ckpt,) = (tmp_path / "outputs" / "style_demo").glob("*/checkpoints/last.ckpt")
    (folder,) = (tmp_path / "outputs" / "class_images").iterdir()
    captions = sorted(p.read_text() for p in folder.glob("*.txt"))  # 4 class pictures of the plain captions
    assert len(captions) == 4 and all(", " not in c and "ohwx" not in c for c in captions), captions


def test_style_demo_without_prior_preservation_composes_to_instance_pictures_only(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    with initialize_config_module(config_module="ldm.conf", version_base="1.3"):
        typed = ["experiment=style_demo", f"data.instance_dir={tmp_path / 'style'}"]
        default = compose("train", overrides=typed)
        on = compose("train", overrides=[*typed, "init_from=base.ckpt"])
        off = compose("train", overrides=[*typed, "init_from=base.ckpt", "data.class_prompt=", "module.prior_loss_weight=0"])
    prompts = instantiate(on.data).class_prompt  # every plain caption of the base's vocabulary
    assert len(prompts) == 18 and prompts[0] == "a red circle on a blue background" and on.module.prior_loss_weight == 2.0
    assert not instantiate(off.data).prior_preservation and off.module.prior_loss_weight == 0
    assert OmegaConf.to_container(default)["init_from"] == "${latest_ckpt:style_demo_base,${paths.root}}"


def test_style_demo_command_scores_and_writes_the_grid(tmp_path: Path, tiny_base: Path) -> None:
    umask = os.umask(0o022)  # a user's usual umask: what the command writes is world-readable
    try:
        proc = run_py(tmp_path, "-m", "ldm.style_demo", f"base={tiny_base}", f"style={tiny_base}",
                      "style_no_prior=none", "colours=[red,blue]", "shapes=[circle]", "seeds=[0]", "steps=2",
                      f"out_dir={tmp_path / 'cmp'}")
    finally:
        os.umask(umask)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stripe score with trigger" in proc.stdout and "drift from base" in proc.stdout, proc.stdout
    scores = json.loads((tmp_path / "cmp" / "grid-00000-scores.json").read_text())
    table = {(r["label"], bool(r["trigger"])): r for r in scores["table"]}
    assert set(table) == {("base", False), ("base", True), ("style (prior)", True), ("style (prior)", False)}
    assert table[("style (prior)", False)]["drift_from_base"] == 0.0  # the same weights, prompts and seeds
    assert scores["prompts"] == ["a red circle on a blue background", "a blue circle on a red background"]
    assert (tmp_path / "cmp" / "grid-00000.png").is_file() and (tmp_path / "cmp" / "grid-00000-x4.png").is_file()
    for name in ("grid-00000.png", "grid-00000-x4.png", "grid-00000-scores.json", "grid-00000.json"):
        assert (tmp_path / "cmp" / name).stat().st_mode & 0o777 == 0o644, name
    assert not list((tmp_path / "cmp").glob(".*"))  # no temporary file left behind
    sent = [c["prompt"] for c in json.loads((tmp_path / "cmp" / "grid-00000.json").read_text())["cells"]]
    assert f"a red circle on a blue background, {STYLE_TRIGGER}" in sent


def test_style_demo_command_bad_input_stops_with_one_line(tmp_path: Path) -> None:
    proc = run_py(tmp_path, "-m", "ldm.style_demo", "bsae=x")  # a typo: one line naming the key it meant
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "base" in lines[0], proc.stderr


@pytest.mark.parametrize(("args", "says"), [
    (["base=/no/such.ckpt", "style=/no/such.ckpt"], "does not exist"),
    ([], "python train.py experiment=style_demo_base"),   # no runs under root: which to train
    (["trigger="], "trigger= is empty"),
    (["colours=[red,mauve]"], "unknown colours"),
])
def test_style_demo_command_says_what_is_wrong(tmp_path: Path, args: list[str], says: str) -> None:
    from ldm.cli.sample import UsageError
    from ldm.style_demo import run

    with initialize_config_module(config_module="ldm.conf", version_base="1.3"):
        cfg = compose("style_demo", overrides=[f"root={tmp_path / 'none'}", *args])
    with pytest.raises(UsageError, match=says):
        run(cfg)

"""The demo learns its captions, in the default suite: experiment=demo_ci (a reduced demo: 3 colours,
18 captions, each judged 5 times by the demo's own judge, `caption_fidelity`) run through train.py as a
user runs it, and its control, the same recipe on the same images with the captions shuffled across them
(data.shuffle_captions=true). A UNet that ignored its captions would score alike on both; chance is 1/18.

Stage one (experiment=autoencoder_demo_ci) reads no caption: it is trained once and both runs use it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data.synthetic import (
    PALETTE,
    ShapesDataModule,
    all_captions,
    caption_fidelity,
    ensure_demo_shards,
    judge_colours,
    random_sample,
    write_shapes_shards,
)

ROOT = Path(__file__).resolve().parent.parent
COLOURS = ["red", "blue", "yellow"]  # experiment=demo_ci's data.colours
LEARNED = 0.25  # the true captions: at least this share of the images shows its caption (measured 0.32-0.39)
CHANCE_LEVEL = 0.15  # the shuffled ones: at most this (measured 0.067; chance 1/18 = 0.056)


def train_py(root: Path, *overrides: str) -> str:
    """`python train.py ...` with outputs and data under `root`; its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "train.py"), f"paths.root={root / 'outputs'}", f"data.root={root / 'data'}",
               "trainer.enable_progress_bar=false", *overrides]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=root, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def caption_fidelity_of(stdout: str) -> tuple[float, int]:
    match = re.search(r"caption fidelity: ([0-9.]+) of (\d+)", stdout)
    assert match, stdout[-2000:]
    return float(match[1]), int(match[2])


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose outputs/ hold a trained autoencoder_demo_ci run (its data/ the true-caption shards)."""
    root = tmp_path_factory.mktemp("demo-ci")
    train_py(root, "experiment=autoencoder_demo_ci")
    assert list((root / "outputs" / "autoencoder_demo_ci").glob("*/checkpoints/last.ckpt"))
    return root


def test_demo_ci_learns_to_follow_its_captions(stage_one: Path) -> None:
    score, count = caption_fidelity_of(train_py(stage_one, "experiment=demo_ci"))
    assert count == 5 * len(all_captions(COLOURS)) == 90
    assert score >= LEARNED, f"caption fidelity {score} (colours and shape; chance 1/18)"


def test_demo_ci_on_shuffled_captions_follows_them_only_by_chance(stage_one: Path) -> None:
    """The control: the same recipe, images, autoencoder and seeds; only each caption belongs to another
    image. What the real run scores above this is what it learned from its captions."""
    stdout = train_py(stage_one, "experiment=demo_ci", "data.shuffle_captions=true", "run_name=demo_ci_shuffled")
    assert (stage_one / "data" / "shuffled" / "MANIFEST.json").is_file()  # trained on the shuffled set
    score, count = caption_fidelity_of(stdout)
    assert count == 90
    assert score <= CHANCE_LEVEL, f"caption fidelity {score} with shuffled captions: the score is not about captions"


# ------------------------------------------------------------------ the data options the CI demo uses


def read_shards(paths: list[str]) -> list[tuple[np.ndarray, str]]:
    samples = []
    for path in paths:
        with tarfile.open(path) as tar:
            members = sorted(tar.getmembers(), key=lambda m: m.name)
            files = {m.name: tar.extractfile(m).read() for m in members}
        for key in sorted({name.split(".")[0] for name in files}):
            image = np.asarray(Image.open(__import__("io").BytesIO(files[f"{key}.png"])).convert("RGB"))
            samples.append((image, files[f"{key}.txt"].decode()))
    return samples


def test_shuffled_captions_are_the_same_images_and_captions_paired_at_random(tmp_path: Path) -> None:
    true = read_shards(write_shapes_shards(tmp_path / "true", 120, 40, 16, seed=5, colours=COLOURS))
    shuffled = read_shards(write_shapes_shards(tmp_path / "shuffled", 120, 40, 16, seed=5, colours=COLOURS,
                                               shuffle_captions=True))
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(true, shuffled, strict=True))  # same images, same order
    assert Counter(c for _, c in true) == Counter(c for _, c in shuffled)  # the same captions, as often
    images = [image for image, _ in true]
    assert caption_fidelity(images, [c for _, c in true]) == 1.0
    matching = caption_fidelity(images, [c for _, c in shuffled])
    assert matching < 0.2, matching  # chance: 1/18
    manifest = json.loads((tmp_path / "shuffled" / "MANIFEST.json").read_text())
    assert manifest["shuffle_captions"] is True and manifest["colours"] == COLOURS


def test_a_smaller_vocabulary_draws_only_its_colours_and_keeps_the_default_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        image, caption = random_sample(rng, 32, colours=COLOURS, shapes=["square", "triangle"])
        assert set(judge_colours(image)) <= set(COLOURS) and "circle" not in caption
    assert len(all_captions(COLOURS)) == 18 and len(all_captions()) == 90
    assert all_captions(COLOURS, repeats=3) == 3 * all_captions(COLOURS)
    # naming the whole palette and every shape is the default: the same draws, the same images
    a, b = np.random.default_rng(1), np.random.default_rng(1)
    for _ in range(20):
        (x, cx), (y, cy) = random_sample(a, 32), random_sample(b, 32, colours=list(PALETTE), shapes=None)
        assert cx == cy and np.array_equal(x, y)
    # a manifest written before these options still matches: the default set is not regenerated
    paths = ensure_demo_shards(tmp_path / "old", 8, 8, 16, 0)
    manifest = json.loads((tmp_path / "old" / "MANIFEST.json").read_text())
    assert not {"colours", "shapes", "shuffle_captions"} & manifest.keys()
    mtime = Path(paths[0]).stat().st_mtime_ns
    assert ensure_demo_shards(tmp_path / "old", 8, 8, 16, 0) == paths and Path(paths[0]).stat().st_mtime_ns == mtime
    ensure_demo_shards(tmp_path / "old", 8, 8, 16, 0, colours=COLOURS)  # another vocabulary: rewritten
    assert json.loads((tmp_path / "old" / "MANIFEST.json").read_text())["colours"] == COLOURS
    with pytest.raises(ValueError, match="unknown colours or shapes"):
        all_captions(["red", "mauve"])
    with pytest.raises(ValueError, match="at least 2 different colours"):
        all_captions(["red"])


def test_the_shuffled_set_lives_beside_the_true_one(tmp_path: Path) -> None:
    true = ShapesDataModule(root=str(tmp_path), num_samples=8, samples_per_shard=8, colours=COLOURS)
    control = ShapesDataModule(root=str(tmp_path), num_samples=8, samples_per_shard=8, colours=COLOURS,
                               shuffle_captions=True)
    assert control.root == f"{true.root}/shuffled"
    true.prepare_data()
    control.prepare_data()
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == sorted(p.name for p in (tmp_path / "shuffled").glob("*.tar"))
    assert "shuffle_captions" not in json.loads((tmp_path / "MANIFEST.json").read_text())

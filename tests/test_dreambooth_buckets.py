"""Aspect-ratio buckets for DreamBooth (issue 11, item 3): with `data.buckets=true` each instance picture trains at
the bucket of nearest aspect ratio (the WebDataset loader's bucket list), every batch holds one bucket, each
bucket's share of batches is its share of pictures, batch b is a pure function of (seed, b) (a loader started at
b reads what one that ran there reads), ranks take disjoint batches, and the class rows of prior preservation are
centre-cropped to the batch's bucket. At 32 px with bucket_step 8 the buckets are 24x40, 32x32 and 40x24.

Every picture has its own caption (NAME.txt), so a batch's captions say which pictures it holds, and each
caption names the picture's shape: what a batch holds is checked against the pictures, not the schedule's code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import lightning as L
import numpy as np
import pytest
import torch
from helpers import tiny_sd_file
from PIL import Image
from test_dreambooth_training import train_py
from test_train import (
    BARE,
    QUIET,
    _one_thread,  # noqa: F401 (autouse: tiny models on one thread)
    compose_train,
    load_ckpt,
    trained_tensors,
)

from ldm.cli.train import train
from ldm.data.buckets import bucket_sizes
from ldm.data.dreambooth import DreamBoothDataModule
from ldm.data.transforms import apply_crop, plan_cover_crop, to_tensor

REPO = Path(__file__).resolve().parent.parent
RES, STEP = 32, 8
WIDE, SQUARE, TALL = (40, 24), (32, 32), (24, 40)  # (width, height) buckets at 32 px, step 8
# (width, height) of each picture, by the bucket it belongs to (the caption says which)
PICTURES = {
    "square": [(32, 32), (48, 44), (34, 38)],
    "wide": [(80, 45), (50, 30)],  # 16:9; 5:3, of shorter side under 32 but not smaller than its bucket
    "tall": [(20, 36)],  # smaller than its 24x40 bucket: upscaled, as a picture smaller than a square is
}
BUCKET_OF = {"square": SQUARE, "wide": WIDE, "tall": TALL}


def write_pictures(folder: Path, pictures: dict[str, list[tuple[int, int]]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for kind, sizes in pictures.items():
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{kind}{i}.png")
            (folder / f"{kind}{i}.txt").write_text(f"a photo of sks dog, {kind} {i}\n")
    return folder


def kind_of(caption: str) -> str:
    return caption.rsplit(", ", 1)[1].split()[0]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pictures(tmp_path_factory.mktemp("dog"), PICTURES)


def module(folder: Path, *, rank: int = 0, world_size: int = 1, step: int = 0, **settings: Any) -> DreamBoothDataModule:
    settings = {"resolution": RES, "batch_size": 2, "buckets": True, "bucket_step": STEP, "random_flip": True,
                "seed": 3, **settings}
    dm = DreamBoothDataModule(str(folder), "a photo of sks dog", **settings)
    dm.setup("fit")
    # what the loader reads of its trainer: rank, world size and the step it resumes at
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size, global_step=step, accumulate_grad_batches=1,
                                 lightning_module=None)
    return dm


def take(dm: DreamBoothDataModule, n: int) -> list[dict[str, Any]]:
    """The first n batches the module's training loader gives (from the trainer's step on)."""
    loader = iter(dm.train_dataloader())
    try:
        return [next(loader) for _ in range(n)]
    finally:
        loader.close()


def shape(batch: dict[str, Any]) -> tuple[int, int]:
    """(width, height) of the batch's images."""
    return batch["image"].shape[3], batch["image"].shape[2]


def test_the_buckets_are_the_webdataset_loaders_and_each_picture_goes_to_its_nearest(pictures: Path) -> None:
    dm = module(pictures)
    assert dm.bucket_list == bucket_sizes(RES, STEP, 2.0) == [TALL, SQUARE, WIDE]
    expected = [BUCKET_OF[p.stem.rstrip("0123456789")] for p in dm.paths]
    assert dm.picture_buckets == expected


def test_every_batch_holds_one_bucket_and_a_portrait_trains_at_a_portrait_shape(
    pictures: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="ldm.data.dreambooth")
    batches = take(module(pictures), 12)  # two cycles of the 6 pictures
    for batch in batches:
        kinds = {kind_of(c) for c in batch["caption"]}
        assert len(kinds) == 1, batch["caption"]  # one bucket a batch
        assert shape(batch) == BUCKET_OF[kinds.pop()]
    tall = [b for b in batches if kind_of(b["caption"][0]) == "tall"]
    assert tall and all(b["image"].shape[2] > b["image"].shape[3] for b in tall)  # taller than wide
    assert {shape(b) for b in batches} == {TALL, SQUARE, WIDE}
    # the one portrait picture is smaller than its bucket: upscaled and trained on, as without buckets
    assert "1 of 6 instance picture(s) are smaller than their bucket" in caplog.text
    assert "24x40: 1, 32x32: 3, 40x24: 2" in caplog.text
    # without buckets every picture is a 32 px square, as before (50x30 is then smaller too)
    assert {shape(b) for b in take(module(pictures, buckets=False), 6)} == {SQUARE}
    assert "2 of 6 instance picture(s) are smaller than data.resolution=32: upscaled" in caplog.text


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_each_buckets_share_of_samples_is_its_share_of_pictures(pictures: Path, batch_size: int) -> None:
    cycles = 3  # a cycle: batch_size passes over the 6 pictures, 6 batches
    batches = take(module(pictures, batch_size=batch_size), 6 * cycles)
    samples = Counter(kind_of(c) for b in batches for c in b["caption"])
    assert samples == {k: len(v) * batch_size * cycles for k, v in PICTURES.items()}  # 3 : 2 : 1
    shown = Counter(c for b in batches for c in b["caption"])
    assert set(shown.values()) == {batch_size * cycles}  # every picture as often as every other
    for b in batches:  # no picture twice in a batch, but where its bucket has fewer than batch_size
        if len(PICTURES[kind_of(b["caption"][0])]) >= batch_size:
            assert len(set(b["caption"])) == batch_size, b["caption"]
    # the order is shuffled, and differs from cycle to cycle
    order = [tuple(b["caption"]) for b in batches]
    assert order[:6] != order[6:12] and order[:6] != sorted(order[:6])


def test_a_batch_spanning_two_passes_holds_no_picture_twice(tmp_path: Path) -> None:
    """5 and 4 pictures in batches of 3: a cycle (3 passes) cuts a bucket's passes across batches, and the
    pass that completes a batch puts that batch's pictures last."""
    folder = write_pictures(tmp_path / "dog", {"square": [(32, 32)] * 5, "wide": [(40, 24)] * 4})
    cycles = 6
    batches = take(module(folder, batch_size=3, random_flip=False), 9 * cycles)
    assert all(len(set(b["caption"])) == 3 for b in batches), [b["caption"] for b in batches]
    assert set(Counter(c for b in batches for c in b["caption"]).values()) == {3 * cycles}


def test_batches_are_a_pure_function_of_the_index(pictures: Path) -> None:
    straight = take(module(pictures), 10)
    # a module built afresh, its loader started at batch 7 (a run resumed at step 7), in a worker process
    resumed = take(module(pictures, step=7, num_workers=1), 3)
    for a, b in zip(straight[7:], resumed, strict=True):
        assert a["caption"] == b["caption"] and torch.equal(a["image"], b["image"])
    again = module(pictures).batches()
    assert torch.equal(again[8]["image"], straight[8]["image"])  # any batch on its own
    assert not torch.equal(straight[0]["image"], straight[6]["image"])  # (the stream moves on)


def test_two_ranks_take_disjoint_batches_each_of_one_bucket(pictures: Path) -> None:
    whole = take(module(pictures), 12)
    ranks = [take(module(pictures, rank=r, world_size=2), 6) for r in range(2)]
    for b in range(6):  # rank r's batch b is global batch 2b + r
        for r in range(2):
            assert ranks[r][b]["caption"] == whole[2 * b + r]["caption"]
            assert torch.equal(ranks[r][b]["image"], whole[2 * b + r]["image"])
    indices = [{k for b in range(6) for k in module(pictures, rank=r, world_size=2).batches().sample_indices(b)}
               for r in range(2)]
    assert len(indices[0]) == len(indices[1]) == 12 and not indices[0] & indices[1]
    # over two cycles the ranks together show every picture equally often: their batches are disjoint shares
    shown = Counter(c for rank in ranks for b in rank for c in b["caption"])
    assert set(shown.values()) == {4}
    # a step's batches need not be of one bucket across ranks (DDP needs no equal shapes)
    assert any(shape(ranks[0][b]) != shape(ranks[1][b]) for b in range(6))


def test_class_rows_are_centre_cropped_to_the_batchs_bucket(pictures: Path, tmp_path: Path) -> None:
    """Square class pictures, cover-resized and centre-cropped to each batch's bucket (whatever crop the
    instance pictures get), so the batch's one tensor holds them."""
    rng = np.random.default_rng(1)
    classes = []
    for i in range(3):
        path = tmp_path / f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)).save(path)
        path.with_suffix(".txt").write_text("a photo of dog")
        classes.append(path)
    dm = module(pictures, random_flip=False, center_crop=False)
    dm.class_paths = classes
    crops = {}  # each class picture centre-cropped to each bucket
    for path in classes:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        for bucket in (TALL, SQUARE, WIDE):
            crops[path.name, bucket] = to_tensor(apply_crop(rgb, plan_cover_crop(rgb.size, bucket)))
    seen = set()
    for batch in take(dm, 8):
        bucket = shape(batch)
        assert batch["image"].shape[0] == 4 and batch["prior"].tolist() == [False, False, True, True]
        assert batch["caption"][2:] == ["a photo of dog"] * 2
        for row in batch["image"][2:]:
            (name,) = [n for n in (p.name for p in classes) if torch.equal(row, crops[n, bucket])]
            seen.add(bucket)
    assert seen == {TALL, SQUARE, WIDE}  # class rows at all three shapes


# -- train.py: the recipes, their settings and a real run ------------------------------------------------------


@pytest.mark.parametrize(("recipe", "buckets"), [("dreambooth", True), ("dreambooth_lora", True), ("arcane", False),
                                                  ("modi", False), ("robo", False)])
def test_the_generic_recipes_bucket_and_the_named_variants_train_squares(
    recipe: str, buckets: bool, tmp_path: Path
) -> None:
    cfg = compose_train(tmp_path, [f"experiment={recipe}", "data.instance_dir=dog/"])
    assert cfg.data.buckets is buckets and cfg.data._target_.endswith("DreamBoothDataModule")
    assert cfg.data.bucket_max_ratio == 2.0
    plain = compose_train(tmp_path, ["data=dreambooth", "data.instance_dir=dog/"])
    assert plain.data.buckets is False  # data=dreambooth alone: squares, as before


@pytest.mark.parametrize(("setting", "expected"), [
    ("data.bucket_step=12", "data.bucket_step=12 cannot go through this model: bucket sides must be multiples of 8"),
    ("data.bucket_step=0", "data.bucket_step=0 must be a positive multiple of 8"),
    ("data.bucket_step=24", "data.resolution=32 is not a multiple of data.bucket_step=24"),
    ("data.bucket_step=8 data.bucket_max_ratio=0.5", "data.bucket_max_ratio=0.5 must be >= 1"),
    ("model=sd15 data.resolution=512 data.bucket_step=32",  # SD's latent halves 3 times: sides of 64 px
     "data.bucket_step=32 cannot go through this model: bucket sides must be multiples of 64"),
])
@pytest.mark.parametrize("data", ["dreambooth", "webdataset"])
def test_bad_bucket_settings_stop_with_the_webdataset_loaders_line(
    setting: str, expected: str, data: str, tmp_path: Path, pictures: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    given = {"dreambooth": [f"data.instance_dir={pictures}"], "webdataset": [f"data.train_shards={tmp_path}/x.tar"]}
    size = [] if "model=" in setting else ["model=tiny", "data.resolution=32"]
    args = [f"data={data}", *size, "trainer=cpu", "data.buckets=true", "data.num_workers=0", "trainer.max_steps=1",
            *given[data], *setting.split()]
    code, err = train_py(tmp_path, capsys, monkeypatch, *args)
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("train.py: error: "), err[-3000:]
    assert expected in errors[0], errors[0]


class ShapeProbe(L.Callback):
    """Records each training batch's captions, `prior` and image shape, per tag."""

    records: ClassVar[dict[str, list[dict[str, Any]]]] = {}

    def __init__(self, tag: str, out: str | None = None) -> None:
        self.tag, self.out = tag, out
        ShapeProbe.records[tag] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        ShapeProbe.records[self.tag].append({
            "caption": list(batch["caption"]), "prior": batch["prior"].tolist(),
            "shape": list(batch["image"].shape), "rank": trainer.global_rank,
        })

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.out is not None:  # a DDP rank's record, for the test process
            mine = [r for r in ShapeProbe.records[self.tag] if r["rank"] == trainer.global_rank]
            Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(mine))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd_file(tmp_path_factory.mktemp("base") / "tiny.safetensors")


# the tiny model at 32 px, buckets of step 8; 2 class pictures sampled in 2 steps
TINY = ["model=tiny", "logger=csv", "module.compile=false", "module.channels_last=false", "data.resolution=32",
        "data.bucket_step=8", "data.num_workers=0", "data.num_class_images=2", "data.class_steps=2",
        "data.class_batch_size=2", "callbacks.sample_images=null"]


def check_batches(records: list[dict[str, Any]]) -> None:
    for record in records:
        (kind,) = {kind_of(c) for c in record["caption"][:2]}
        w, h = BUCKET_OF[kind]
        assert record["shape"] == [4, 3, h, w] and record["prior"] == [False, False, True, True], record
        assert record["caption"][2:] == ["a photo of dog"] * 2


def test_experiment_dreambooth_trains_with_buckets_and_prior_preservation(tmp_path: Path, base: Path, pictures: Path) -> None:
    cfg = compose_train(tmp_path, [
        "experiment=dreambooth", *TINY, "trainer=cpu", "data.batch_size=2", f"init_from={base}",
        f"data.instance_dir={pictures}", "trainer.max_steps=6",
        "+callbacks.probe._target_=test_dreambooth_buckets.ShapeProbe", "+callbacks.probe.tag=run", *BARE, *QUIET,
    ])
    assert cfg.data.buckets is True  # the recipe's own setting
    metrics = train(cfg)
    assert {"train/instance_loss", "train/prior_loss"} <= metrics.keys()
    assert all(np.isfinite(float(metrics[k])) for k in ("train/instance_loss", "train/prior_loss"))
    records = ShapeProbe.records["run"]
    assert len(records) == 6
    check_batches(records)  # instance and class rows at the bucket of the batch's pictures
    assert {tuple(r["shape"][2:]) for r in records} == {(40, 24), (32, 32), (24, 40)}


def test_a_bucketed_run_cut_and_resumed_reads_the_same_batches_and_ends_with_the_same_weights(
    tmp_path: Path, base: Path, pictures: Path
) -> None:
    """No data state in the checkpoint: the resumed loader starts at global_step x accumulate_grad_batches."""
    def run(tag: str, *overrides: str, output_dir: str) -> list[dict[str, Any]]:
        train(compose_train(tmp_path, [
            "experiment=dreambooth", *TINY, "trainer=cpu", "data.batch_size=2", f"init_from={base}",
            f"data.instance_dir={pictures}", "data.random_flip=true", "module.optimizer.lr=1e-3",
            "trainer.accumulate_grad_batches=2", "callbacks.checkpoint.every_n_train_steps=1000",
            "+callbacks.probe._target_=test_dreambooth_buckets.ShapeProbe", f"+callbacks.probe.tag={tag}",
            *BARE, *QUIET, *overrides,
        ], output_dir=output_dir))
        return ShapeProbe.records[tag]

    straight = run("straight", "trainer.max_steps=4", output_dir="${paths.root}/straight")
    first = run("first", "trainer.max_steps=2", output_dir="${paths.root}/cut/first")
    resumed = run("resumed", "trainer.max_steps=4", "ckpt_path=last", output_dir="${paths.root}/cut/new")
    assert len(straight) == 8 and first + resumed == straight  # 2 batches a step: the same pictures and shapes
    assert len({tuple(r["shape"]) for r in straight}) > 1  # (of several buckets)
    a = load_ckpt(tmp_path / "runs" / "straight" / "checkpoints" / "last.ckpt")
    (cut,) = (tmp_path / "runs" / "cut").glob("*/checkpoints/last.ckpt")
    wa, wb = trained_tensors(a["state_dict"]), trained_tensors(load_ckpt(cut)["state_dict"])
    assert wa and wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_two_ddp_processes_train_disjoint_one_bucket_batches(tmp_path: Path, base: Path, pictures: Path) -> None:
    """`trainer=ddp_cpu trainer.devices=2` through train.py: each rank's batches of one bucket, the ranks'
    batches disjoint shares of the cycle (3 steps x 2 ranks = one cycle of the 6 pictures)."""
    out = tmp_path / "probe"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{REPO}"}
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "experiment=dreambooth", *TINY, "trainer=ddp_cpu", "trainer.devices=2",
         f"init_from={base}", f"data.instance_dir={pictures}", "trainer.max_steps=3", "data.batch_size=1",
         f"paths.root={tmp_path}/runs", "+callbacks.probe._target_=test_dreambooth_buckets.ShapeProbe",
         "+callbacks.probe.tag=ddp", f"+callbacks.probe.out={out}", *BARE, *QUIET],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [len(r) for r in ranks] == [3, 3]
    for records in ranks:
        for record in records:
            (kind,) = {kind_of(c) for c in record["caption"][:1]}
            w, h = BUCKET_OF[kind]
            assert record["shape"] == [2, 3, h, w] and record["prior"] == [False, True], record
    shown = Counter(c for records in ranks for r in records for c in r["caption"][:1])
    assert len(shown) == 6 and set(shown.values()) == {1}  # one cycle: every picture once, on one rank
    assert any(ranks[0][i]["shape"] != ranks[1][i]["shape"] for i in range(3))  # a step of two shapes trained

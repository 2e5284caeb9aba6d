"""Aspect-ratio buckets in the training stream (ldm/data/webdataset.py with data.buckets=true): one-bucket
batches whose share per bucket is the data's, portrait pictures trained at portrait shapes through train.py,
exact mid-pass resume with the BucketQueue's held samples, bucketed cached latents, two DDP ranks with
resampled + epoch_length, and one-line errors for settings that cannot work. The pieces alone (bucket sizes,
the queue, the cover crop) are in test_buckets.py.

Data: 48 pictures in 4 shards, of three aspects that the 32 px buckets of step 8 (24x40, 32x32, 40x24) tell
apart, a little larger than their bucket so random crops draw; the key says the aspect.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image
from test_midepoch_resume import write_autoencoder
from test_train import BARE, QUIET, _one_thread, compose_train, load_ckpt  # noqa: F401 (autouse fixture)

from ldm.cli.train import ConfigError, check_resolution, train, user_error
from ldm.data.cache_latents import cache_latents
from ldm.data.webdataset import POSITION, WebDataModule

REPO = Path(__file__).resolve().parent.parent
# (width, height) of each aspect's pictures, the bucket it goes to, and how many of each the data has
PICTURES = {"square": (36, 38), "wide": (52, 30), "tall": (30, 52)}
BUCKET = {"square": (32, 32), "wide": (40, 24), "tall": (24, 40)}
PATTERN = ["square", "wide", "square", "tall", "wide", "square"]  # 24 square, 16 wide, 8 tall in 48
COUNTS = {"square": 24, "wide": 16, "tall": 8}
BUCKETED = {"resolution": 32, "buckets": True, "bucket_step": 8, "batch_size": 4}


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_aspect_shards(folder: Path, shards: int = 4, per_shard: int = 12) -> list[str]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        path = folder / f"aspects-{s:06d}.tar"
        with wds.TarWriter(str(path), encoder=False) as writer:
            for i in range(per_shard):
                aspect = PATTERN[(s * per_shard + i) % len(PATTERN)]
                width, height = PICTURES[aspect]
                image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                writer.write({"__key__": f"{aspect}-{s}-{i}", "png": _png(image), "txt": f"a {aspect} picture".encode()})
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return write_aspect_shards(tmp_path_factory.mktemp("aspects"))


def one_pass(dm: WebDataModule) -> list[dict[str, Any]]:
    dm.setup("fit")
    try:
        return list(dm.train_dataloader())
    finally:
        dm.teardown("fit")  # the persistent workers go now, not when the process ends


def shape_of(batch: dict[str, Any]) -> tuple[int, int]:
    return tuple(batch["image"].shape[-2:])  # (height, width)


def test_batches_hold_one_bucket_each_in_the_datas_shares(shards: list[str]) -> None:
    batches = one_pass(WebDataModule(shards, **BUCKETED, shuffle_buffer=8, random_crop=True, random_flip=True))
    seen: Counter[str] = Counter()
    for batch in batches:
        aspects = {key.split("-")[0] for key in batch["key"]}
        assert len(aspects) == 1, batch["key"]  # one bucket a batch
        (aspect,) = aspects
        width, height = BUCKET[aspect]
        assert shape_of(batch) == (height, width)
        seen[aspect] += len(batch["key"])
    assert dict(seen) == COUNTS  # every picture once, in the bucket of its aspect
    assert {shape_of(b) for b in batches} == {(32, 32), (24, 40), (40, 24)}
    # short batches only at the pass's end (drained, at most one per bucket): the buffer never filled
    sizes = [len(b["key"]) for b in batches]
    assert all(n == 4 for n in sizes[:-3]) and sum(sizes) == 48
    # without buckets: every picture a 32 px square, as before
    squares = one_pass(WebDataModule(shards, resolution=32, batch_size=4, shuffle_buffer=8))
    assert {shape_of(b) for b in squares} == {(32, 32)} and sum(len(b["key"]) for b in squares) == 48


def test_a_full_bucket_buffer_sends_the_fullest_bucket_out_short(shards: list[str]) -> None:
    batches = one_pass(WebDataModule(shards, **BUCKETED, shuffle_buffer=0, bucket_buffer=4))
    sizes = [len(b["key"]) for b in batches]
    assert min(sizes[:-3]) < 4  # short batches mid-pass
    assert all(len({k.split("-")[0] for k in b["key"]}) == 1 for b in batches)
    assert Counter(k.split("-")[0] for b in batches for k in b["key"]) == COUNTS


def _walk_tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _walk_tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _walk_tensors(v)]
    return []


@pytest.mark.parametrize("buffer", [None, 5], ids=["default-buffer", "short-batches"])
def test_a_pass_cut_mid_way_goes_on_exactly_with_two_workers(shards: list[str], buffer: int | None) -> None:
    """Cut after batch k (the next one read ahead, as Lightning does), resumed from the state saved: the rest
    equals the uninterrupted pass's, pixels included (random crops and flips of the held samples, drawn
    again from their own `taken` numbers)."""

    def module() -> WebDataModule:
        return WebDataModule(shards, **BUCKETED, num_workers=2, shuffle_buffer=6, random_crop=True,
                             random_flip=True, bucket_buffer=buffer)

    full = one_pass(module())
    held_at_cuts = []
    for cut in (2, 5, len(full) - 2):
        before = module()
        before.setup("fit")
        stream = iter(before.train_dataloader())
        for _ in range(cut):
            before.on_before_batch_transfer(next(stream), 0)
        next(stream)
        state = before.state_dict()
        stream.close()
        before.teardown("fit")
        (position,) = state["streams"]["positions"]
        held_at_cuts.append(sum(len(w["buckets"]["held"]) for w in position["workers"].values()))
        # small: places and numbers only, no pixels (a few hundred bytes a worker)
        assert all(t.dtype == torch.int64 for t in _walk_tensors(position))
        assert len(pickle.dumps(position)) < 8000
        after = module()
        after.load_state_dict(state)
        rest = one_pass(after)
        assert [b["key"] for b in rest] == [b["key"] for b in full[cut:]], cut
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(rest, full[cut:], strict=True)), cut
    assert max(held_at_cuts) > 0  # the cuts left samples in the bucket queues: their restore was needed
    # and without the queue's state the resumed pass loses the held samples
    before = module()
    before.load_state_dict(state)
    for worker in state["streams"]["positions"][0]["workers"].values():
        del worker["buckets"]
    lost = one_pass(before)
    assert sum(len(b["key"]) for b in lost) < sum(len(b["key"]) for b in full[len(full) - 2 :])


class ShapeProbe(L.Callback):
    """Writes `<out>/<tag>-rank<R>.json`: per training batch its epoch, image (or moments) shape and keys;
    and for the first portrait batch the latent and UNet output shapes the model makes of it."""

    def __init__(self, out: str, tag: str) -> None:
        self.out, self.tag = Path(out), tag
        self.record: dict[str, Any] = {"batches": [], "portrait": None}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        assert POSITION not in batch
        pixels = batch["image"] if "image" in batch else batch["moments"]
        self.record["batches"].append(
            {"epoch": trainer.current_epoch, "shape": list(pixels.shape), "keys": list(batch["key"])}
        )
        height, width = pixels.shape[-2:]
        if height > width and self.record["portrait"] is None and "image" in batch:
            with torch.no_grad():
                z = pl_module.first_stage_model.encode(batch["image"]).mode()
                t = torch.zeros(z.shape[0], dtype=torch.long)
                context = pl_module.cond_stage_model.encode(pl_module.text_tokens(batch["caption"]))
                out = pl_module.model.diffusion_model(z, t, context=context)
            self.record["portrait"] = {"latent": list(z.shape), "unet": list(out.shape)}

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{self.tag}-rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


def probe(tmp_path: Path, tag: str) -> list[str]:
    return ["+callbacks.probe._target_=test_bucket_stream.ShapeProbe", f"+callbacks.probe.out={tmp_path}/probe",
            f"+callbacks.probe.tag={tag}"]


def probed(tmp_path: Path, tag: str, rank: int = 0) -> dict[str, Any]:
    return json.loads((tmp_path / "probe" / f"{tag}-rank{rank}.json").read_text())


WEB = ["data=webdataset", "data.buckets=true", "data.bucket_step=8", "data.resolution=32", "data.batch_size=4",
       "data.num_workers=0", "data.shuffle_buffer=8", "data.random_flip=true"]


def test_portrait_pictures_train_at_portrait_shapes_through_train(shards: list[str], tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, [*WEB, f"data.train_shards={Path(shards[0]).parent}", "trainer.max_steps=12",
                                   *BARE, *QUIET, *probe(tmp_path, "web")])
    train(cfg)
    record = probed(tmp_path, "web")
    shapes = {tuple(b["shape"][-2:]) for b in record["batches"]}
    assert shapes == {(32, 32), (24, 40), (40, 24)}
    for batch in record["batches"]:
        assert all(k.startswith("tall") for k in batch["keys"]) == (batch["shape"][-2] > batch["shape"][-1])
    # the tiny model's autoencoder (4x) and UNet (one halving) keep a 40x24 picture's shape: 10x6 latents
    assert record["portrait"] == {"latent": [4, 4, 10, 6], "unet": [4, 4, 10, 6]}
    assert load_ckpt(tmp_path / "runs" / "run" / "checkpoints" / "last.ckpt")["global_step"] == 12


def test_bucketed_cached_latents_keep_each_pictures_shape(shards: list[str], tmp_path: Path) -> None:
    ae = write_autoencoder(tmp_path / "ae.ckpt")
    info = cache_latents(ae, shards, tmp_path / "latents", resolution=32, batch_size=4, buckets=True, bucket_step=8)
    assert info["buckets"] == {"step": 8, "max_ratio": 2.0} and info["samples"] == 48
    shapes: Counter[tuple[str, tuple[int, ...]]] = Counter()
    for path in sorted((tmp_path / "latents").glob("*.tar")):
        for sample in wds.WebDataset(str(path), shardshuffle=False):
            moments = np.load(io.BytesIO(sample["moments.npy"]))
            shapes[(sample["__key__"].split("-")[0], moments.shape)] += 1
    # encoded at the bucket's size (the tiny autoencoder downsamples 4x): 8 channels of mean and log-variance
    assert shapes == {("square", (8, 8, 8)): 24, ("wide", (8, 6, 10)): 16, ("tall", (8, 10, 6)): 8}
    data = ["data=cached_latents", f"data.train_shards={tmp_path / 'latents'}", "data.resolution=32",
            "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8", f"module.first_stage_ckpt={ae}"]
    train(compose_train(tmp_path, [*data, "data.buckets=true", "trainer.max_steps=6", *BARE, *QUIET,
                                   *probe(tmp_path, "cached")]))
    batches = probed(tmp_path, "cached")["batches"]
    assert len(batches) == 6 and len({tuple(b["shape"][-2:]) for b in batches}) > 1
    for batch in batches:
        (aspect,) = {k.split("-")[0] for k in batch["keys"]}
        assert tuple(batch["shape"][1:]) == {"square": (8, 8, 8), "wide": (8, 6, 10), "tall": (8, 10, 6)}[aspect]
    # the same cache without data.buckets: one line before training, not a torch.stack traceback
    with pytest.raises(ConfigError, match=r"cached with --buckets .* data\.buckets=true"):
        train(compose_train(tmp_path, [*data, "trainer.max_steps=1", *BARE, *QUIET], output_dir="${paths.root}/b"))
    # a model whose UNet halves twice needs bucket sides of multiples of 16: this cache's 8 are refused
    with pytest.raises(ConfigError, match=r"cached with --bucket-step 8, .* multiples of 16 .* --bucket-step 16"):
        train(compose_train(tmp_path, [*data, "data.buckets=true", "model.unet.channel_mult=[1,2,2]",
                                       "trainer.max_steps=1", *BARE, *QUIET], output_dir="${paths.root}/c"))
    # ... and where no cache.json tells (remote shards), the loader says it
    loose = WebDataModule(str(tmp_path / "latents"), latents=True, resolution=32, batch_size=48, shuffle_buffer=0)
    with pytest.raises(ValueError, match=r"several shapes .* data\.buckets=true"):
        one_pass(loose)


def test_two_ddp_ranks_with_buckets_and_resampled_epochs_yield_the_same_batches(shards: list[str], tmp_path: Path) -> None:
    """Buckets are per rank; with resampled=true and epoch_length=5 each rank trains exactly 5 batches an
    epoch (short ones counted as batches), so neither waits for the other: two epochs end inside the timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    command = [
        sys.executable, str(REPO / "train.py"), "trainer=ddp_cpu", "trainer.devices=2", "trainer.max_steps=10",
        f"paths.root={tmp_path}/runs", f"hydra.run.dir={tmp_path}/runs/ddp", *WEB,
        f"data.train_shards={Path(shards[0]).parent}", "data.batch_size=2", "data.resampled=true",
        "data.epoch_length=5", "data.bucket_buffer=4", *BARE, *QUIET, *probe(tmp_path, "ddp"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [probed(tmp_path, "ddp", rank)["batches"] for rank in (0, 1)]
    for batches in records:
        assert Counter(b["epoch"] for b in batches) == {0: 5, 1: 5}
        assert all(len({k.split("-")[0] for k in b["keys"]}) == 1 for b in batches)
    assert [b["keys"] for b in records[0]] != [b["keys"] for b in records[1]]  # each rank its own draws
    assert len({tuple(b["shape"][-2:]) for r in records for b in r}) > 1


def test_settings_that_cannot_bucket_stop_with_one_line(shards: list[str], tmp_path: Path) -> None:
    for settings, says in [
        ({"resolution": 40, "bucket_step": 16}, r"data\.resolution=40 is not a multiple of data\.bucket_step=16"),
        ({"bucket_step": 12}, r"data\.bucket_step=12 must be a positive multiple of 8"),
        ({"bucket_max_ratio": 0.5}, r"data\.bucket_max_ratio=0\.5 must be >= 1"),
        ({"bucket_buffer": 0}, r"data\.bucket_buffer=0 must be a positive"),
    ]:
        with pytest.raises(ValueError, match=says):
            WebDataModule(shards, **{**BUCKETED, **settings})
    # a model whose latents halve twice in the UNet needs bucket sides that are multiples of 16
    deeper = OmegaConf.to_container(compose_train(tmp_path, ["model.unet.channel_mult=[1,2,2]"]).model)
    check_resolution(deeper, 32)
    with pytest.raises(ConfigError, match=r"data\.bucket_step=8 cannot go through this model: .* multiple of 16"):
        check_resolution(deeper, 32, bucket_step=8)
    with pytest.raises(ConfigError, match=r"set data\.bucket_step to a multiple of 16"):
        train(compose_train(tmp_path, [*WEB, f"data.train_shards={shards[0]}", "model.unet.channel_mult=[1,2,2]"]))
    # what train.py prints, without a traceback (train.py: error: ...), for a setting the data module refuses
    with pytest.raises(Exception) as err:
        train(compose_train(tmp_path, [*WEB, f"data.train_shards={shards[0]}", "data.resolution=40",
                                       "data.bucket_step=16"]))
    shown = user_error(err.value)
    assert shown is not None and "\n" not in str(shown)
    assert str(shown).startswith("data.resolution=40 is not a multiple of data.bucket_step=16"), shown


def test_ldm_cache_latents_names_its_own_flags_in_bucket_errors(capsys: pytest.CaptureFixture, tmp_path) -> None:
    from ldm.data.cache_latents import main as cache_main

    with pytest.raises(SystemExit) as exit_info:
        cache_main(["model.safetensors", "shards/", str(tmp_path / "out"), "--resolution", "64", "--buckets",
                    "--bucket-step", "12"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--bucket-step=12 must be a positive multiple of 8" in err, err
    assert "data." not in err, err
    with pytest.raises(SystemExit):
        cache_main(["model.safetensors", "shards/", str(tmp_path / "out"), "--resolution", "72", "--buckets",
                    "--bucket-step", "16"])
    assert "--resolution=72 is not a multiple of --bucket-step=16" in capsys.readouterr().err

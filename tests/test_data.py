"""Data side: demo shards and their judge, the shard writer CLI, and the WebDataset DataModule."""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ldm.data import webdataset as wdm
from ldm.data.make_shards import ShardSink, main, make_shards
from ldm.data.synthetic import (
    ShapesDataModule,
    caption_fidelity,
    colour_fidelity,
    ensure_demo_shards,
    judge_colours,
    make_caption,
    random_sample,
    write_shapes_shards,
)
from ldm.data.transforms import resize_and_crop, to_tensor, to_uint8
from ldm.data.webdataset import WebDataModule, caption_from, expand_shard_specs

RES = 16
NUM_SAMPLES = 48
PER_SHARD = 12


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return write_shapes_shards(tmp_path_factory.mktemp("shapes"), NUM_SAMPLES, PER_SHARD, RES, seed=3)


@pytest.fixture(autouse=True)
def _fresh_warning_limiter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wdm, "_warn", wdm._RateLimitedWarning(wdm.WARN_INTERVAL_S))


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def _write_tar(path: Path, samples: list[dict[str, str | bytes]]) -> str:
    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def _good_sample(key: str, rng: np.random.Generator, resolution: int = RES) -> dict[str, str | bytes]:
    image, caption = random_sample(rng, resolution)
    return {"__key__": key, "png": _encode(image, "PNG"), "txt": caption.encode()}


def _read_all(dm: WebDataModule) -> list[dict]:
    """One pass; the loader's workers closed after it (dropped unclosed, each costs 5 s at collection)."""
    dm.setup("fit")
    loader = dm.train_dataloader()
    try:
        return list(loader)
    finally:
        loader.close()


def _keys(batches: list[dict]) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


# ---------------------------------------------------------------- demo data and judge


def test_judge_reads_colours_of_fresh_samples_and_rejects_shuffled_captions() -> None:
    rng = np.random.default_rng(7)
    images, captions = zip(*(random_sample(rng, 32) for _ in range(600)), strict=True)
    assert caption_fidelity(images, captions) >= 0.98
    shuffled = list(np.random.default_rng(0).permutation(captions))
    chance = 1 / (6 * 5)  # shape colour and background colour, drawn without repeat from 6
    assert caption_fidelity(images, shuffled) < 3 * chance


def test_judge_on_hand_made_image() -> None:
    image = np.zeros((32, 32, 3), np.uint8)
    image[:] = (30, 60, 220)  # blue
    image[8:24, 10:26] = (240, 220, 40)  # yellow
    assert judge_colours(image) == ("yellow", "blue")
    assert caption_fidelity([image], [make_caption("square", "yellow", "blue")]) == 1.0
    assert caption_fidelity([image], [make_caption("square", "blue", "yellow")]) == 0.0
    with pytest.raises(ValueError, match="not of the form"):
        caption_fidelity([image], ["a photo of a cat"])


def test_demo_shards_are_reused_when_complete_and_regenerated_when_not(tmp_path: Path) -> None:
    shards = ensure_demo_shards(tmp_path, num_samples=20, samples_per_shard=8, resolution=RES)
    assert [Path(s).name for s in shards] == ["shapes-000000.tar", "shapes-000001.tar", "shapes-000002.tar"]
    stamp = Path(shards[0]).stat().st_mtime_ns
    assert ensure_demo_shards(tmp_path, num_samples=20, samples_per_shard=8, resolution=RES) == shards
    assert Path(shards[0]).stat().st_mtime_ns == stamp

    Path(shards[1]).write_bytes(Path(shards[1]).read_bytes()[:100])  # a crash mid-copy
    repaired = ensure_demo_shards(tmp_path, num_samples=20, samples_per_shard=8, resolution=RES)
    assert tarfile.open(repaired[1]).getnames()[-1].endswith(".txt")

    smaller = ensure_demo_shards(tmp_path, num_samples=8, samples_per_shard=8, resolution=RES)
    assert (
        sorted(p.name for p in tmp_path.glob("shapes-*.tar"))
        == ["shapes-000000.tar"]
        == [Path(s).name for s in smaller]
    )
    assert not list(tmp_path.glob("*.tmp-*"))


def test_shapes_datamodule_generates_its_shards_once_then_streams_them(tmp_path: Path) -> None:
    dm = ShapesDataModule(
        root=str(tmp_path), num_samples=20, samples_per_shard=8, resolution=RES, batch_size=10
    )
    dm.prepare_data()
    batches = _read_all(dm)
    assert sorted(_keys(batches)) == [f"{i:09d}" for i in range(20)]
    images = np.concatenate([to_uint8(b["image"]) for b in batches])
    assert caption_fidelity(images, [c for b in batches for c in b["caption"]]) >= 0.98


def test_shard_sink_leaves_nothing_behind_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardSink(tmp_path, "x", samples_per_shard=2) as sink:
        sink.write({"__key__": "a", "txt": b"1"})
        sink.write({"__key__": "b", "txt": b"2"})
        sink.write({"__key__": "c", "txt": b"3"})
        raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-000000.tar"]


# ---------------------------------------------------------------- transforms


def test_resize_and_crop_keeps_the_centre_and_random_crop_moves() -> None:
    stripes = np.zeros((32, 96, 3), np.uint8)
    stripes[:, :32], stripes[:, 32:64], stripes[:, 64:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    image = Image.fromarray(stripes)
    centre = np.asarray(resize_and_crop(image, 16))
    assert centre.shape == (16, 16, 3) and (centre.argmax(-1) == 1).all()  # green only
    centre_colours = {
        int(np.asarray(resize_and_crop(image, 16, random_crop=True, rng=random.Random(s)))[8, 8].argmax())
        for s in range(30)
    }
    assert centre_colours == {0, 1, 2}
    flipped = np.asarray(resize_and_crop(image, 32, random_crop=True, random_flip=True, rng=random.Random(3)))
    unflipped = np.asarray(resize_and_crop(image, 32, random_crop=True, rng=random.Random(3)))
    assert (flipped == unflipped[:, ::-1]).all() or (flipped == unflipped).all()
    tensor = to_tensor(image)
    assert tensor.shape == (3, 32, 96) and tensor.min() == -1 and tensor.max() == 1
    assert (to_uint8(tensor) == stripes).all()


# ---------------------------------------------------------------- DataModule


def test_batches_have_the_contract_shapes_and_captions_match_images(shapes: list[str]) -> None:
    spec = str(Path(shapes[0]).parent / "shapes-{000000..000003}.tar")
    batches = _read_all(WebDataModule(spec, batch_size=5, resolution=RES, shuffle_buffer=16))
    assert [b["image"].shape[0] for b in batches] == [5] * 9 + [3]
    for batch in batches:
        assert batch["image"].shape[1:] == (3, RES, RES) and batch["image"].dtype == torch.float32
        assert -1 <= batch["image"].min() < -0.5 and 0.5 < batch["image"].max() <= 1
        assert batch["skipped"] == {}
    keys = _keys(batches)
    assert sorted(keys) == [f"{i:09d}" for i in range(NUM_SAMPLES)]
    assert keys != sorted(keys)  # shuffled
    images = np.concatenate([to_uint8(b["image"]) for b in batches])
    captions = [c for b in batches for c in b["caption"]]
    assert caption_fidelity(images, captions) >= 0.98
    assert caption_fidelity(images, captions[1:] + captions[:1]) < 0.3


def test_downscaled_batches_still_match_captions(shapes: list[str]) -> None:
    batches = _read_all(
        WebDataModule(shapes, batch_size=16, resolution=8, random_flip=True, shuffle_buffer=0)
    )
    assert batches[0]["image"].shape == (16, 3, 8, 8)
    images = np.concatenate([to_uint8(b["image"]) for b in batches])
    # colours alone: at 8 px a circle and a square differ by a pixel or two (the shape judge refuses them)
    assert colour_fidelity(images, [c for b in batches for c in b["caption"]]) >= 0.9


def test_same_seed_same_order_and_new_epoch_new_order(shapes: list[str]) -> None:
    def loader(seed: int) -> wdm.ShardLoader:
        dm = WebDataModule(shapes, batch_size=4, resolution=RES, shuffle_buffer=8, seed=seed)
        dm.setup("fit")
        return dm.train_dataloader()

    first = loader(0)
    epoch0, epoch1 = _keys(list(first)), _keys(list(first))
    assert epoch0 == _keys(list(loader(0)))
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)
    assert epoch0 != _keys(list(loader(1)))


def test_resumed_run_reproduces_the_stream_of_its_epoch_and_step(shapes: list[str]) -> None:
    def resumed_keys() -> list[str]:
        dm = WebDataModule(shapes, batch_size=4, resolution=RES, shuffle_buffer=8)
        dm.trainer = SimpleNamespace(current_epoch=2, global_step=30, global_rank=0, world_size=1)
        dm.setup("fit")
        return _keys(list(dm.train_dataloader()))

    assert resumed_keys() == resumed_keys()


def _corrupt_shards(tmp_path: Path) -> tuple[list[str], set[str]]:
    """Two shards with 8 good samples, a truncated JPEG, a sample without caption and a non-image."""
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    jpeg = _encode(noisy, "JPEG")
    first = [_good_sample(f"a{i}", rng) for i in range(3)]
    first.insert(1, {"__key__": "truncated", "jpg": jpeg[: len(jpeg) // 2], "txt": b"a cut-off photo"})
    first.append({"__key__": "uncaptioned", "png": _encode(noisy, "PNG")})  # last: no batch follows it
    second = [_good_sample(f"b{i}", rng) for i in range(5)]
    second.insert(2, {"__key__": "garbage", "jpg": b"not an image at all", "txt": b"noise"})
    shards = [_write_tar(tmp_path / "c-0.tar", first), _write_tar(tmp_path / "c-1.tar", second)]
    return shards, {f"a{i}" for i in range(3)} | {f"b{i}" for i in range(5)}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_samples_are_skipped_counted_and_warned_about_once(
    tmp_path: Path, num_workers: int, caplog: pytest.LogCaptureFixture
) -> None:
    shards, good = _corrupt_shards(tmp_path)
    dm = WebDataModule(shards, batch_size=3, num_workers=num_workers, resolution=RES, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger=wdm.__name__):
        batches = _read_all(dm)
    assert set(_keys(batches)) == good and len(_keys(batches)) == len(good)
    assert dm.skipped_samples == {"truncated image": 1, "not an image": 1, "no caption": 1}
    # every skip rides on a batch, the caption-less sample after c-0's last one too, with its shard and key
    assert sum(sum(b["skipped"].values()) for b in batches) == 3
    dropped = {(Path(shard).name, key, reason) for b in batches for shard, key, reason, _ in b["dropped"]}
    assert dropped == {
        ("c-0.tar", "truncated", "truncated image"),
        ("c-0.tar", "uncaptioned", "no caption"),
        ("c-1.tar", "garbage", "not an image"),
    }
    if num_workers == 0:  # worker processes log to their own stderr
        assert len([r for r in caplog.records if "skipping sample" in r.message]) == 1


@pytest.mark.parametrize("epoch_length", [None, 2])
def test_skips_of_a_worker_without_batches_and_after_the_last_batch_reach_a_batch(
    tmp_path: Path, epoch_length: int | None
) -> None:
    """Worker 0's shard ends in malformed samples after its last batch; worker 1's holds nothing usable,
    so it yields no batch at all; with epoch_length the pass is cut right after its last batch."""
    rng = np.random.default_rng(0)
    good = [_good_sample(f"g{i}", rng) for i in range(4)]
    tail = [{"__key__": "garbage", "jpg": b"not an image", "txt": b"x"}, {"__key__": "bare", "png": good[0]["png"]}]
    useless = [{"__key__": f"u{i}", "png": good[0]["png"]} for i in range(3)]
    shards = [_write_tar(tmp_path / "w-0.tar", good + tail), _write_tar(tmp_path / "w-1.tar", useless)]
    dm = WebDataModule(
        shards, batch_size=2, num_workers=2, resolution=RES, shuffle_buffer=0, epoch_length=epoch_length
    )
    batches = _read_all(dm)
    assert len(batches) == 2 and all(set(b) >= {"key", "skipped", "dropped"} for b in batches)
    carried = Counter()
    for b in batches:
        carried.update(b["skipped"])
        assert sum(b["skipped"].values()) == len(b["dropped"])
    assert carried == {"not an image": 1, "no caption": 4}
    assert sorted(key for b in batches for _, key, _, _ in b["dropped"]) == ["bare", "garbage", "u0", "u1", "u2"]


def test_rate_limited_warnings_count_what_they_held_back_by_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = iter([0.0, 1.0, 2.0, 3.0, 100.0])
    monkeypatch.setattr(wdm.time, "monotonic", lambda: next(clock))
    warn = wdm._RateLimitedWarning(60.0)
    with caplog.at_level(logging.WARNING, logger=wdm.__name__):
        for reason in ("no caption", "too small", "no caption", "not an image", "truncated image"):
            warn(f"skipping a sample: {reason}", reason)
    assert [r.message for r in caplog.records] == [
        "skipping a sample: no caption",
        "skipping a sample: truncated image (3 more skipped since the last warning: too small 1, "
        "no caption 1, not an image 1)",
    ]


def test_training_runs_through_corrupt_samples_and_checkpoints_the_counts(tmp_path: Path) -> None:
    shards, good = _corrupt_shards(tmp_path)

    class CountBatches(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen: list[str] = []

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            self.seen += batch["key"]
            return (batch["image"].mean() - self.weight) ** 2

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = WebDataModule(shards, batch_size=4, resolution=RES, shuffle_buffer=0)
    module = CountBatches()
    trainer = lightning.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    assert sorted(module.seen) == sorted([*good, *good])
    assert dm.skipped_samples == {"truncated image": 2, "not an image": 2, "no caption": 2}
    checkpoint = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=True)
    assert checkpoint[WebDataModule.__qualname__]["skipped_samples"] == {
        "truncated image": 2,
        "not an image": 2,
        "no caption": 2,
    }


def test_a_truncated_shard_yields_what_it_holds_and_counts_as_unreadable(tmp_path: Path) -> None:
    (shard,) = write_shapes_shards(tmp_path, 10, 10, RES)
    data = Path(shard).read_bytes()
    Path(shard).write_bytes(data[: len(data) // 2])
    dm = WebDataModule(shard, batch_size=4, resolution=RES)
    assert 0 < len(_keys(_read_all(dm))) < 10
    assert dm.skipped_samples["unreadable shard"] == 1


def test_min_size_skips_small_images_and_all_skipped_is_a_clear_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    mixed = [_good_sample(f"s{i}", rng, 16) for i in range(3)] + [
        _good_sample(f"l{i}", rng, 32) for i in range(2)
    ]
    shard = _write_tar(tmp_path / "m.tar", mixed)
    dm = WebDataModule(shard, batch_size=8, resolution=RES, min_size=24)
    assert sorted(_keys(_read_all(dm))) == ["l0", "l1"]
    assert dm.skipped_samples == {"too small": 3}

    nothing = WebDataModule(shard, batch_size=8, resolution=RES, caption_key="json.caption")
    with pytest.raises(RuntimeError, match=r"no usable samples.*no caption.*caption_key='json.caption'"):
        _read_all(nothing)


def test_caption_from_txt_and_dotted_json_paths() -> None:
    sample = {"txt": b" a dog \n", "json": json.dumps({"meta": {"caption": "a cat"}, "n": 3}).encode()}
    assert caption_from(sample, "txt") == "a dog"
    assert caption_from(sample, "json.meta.caption") == "a cat"
    assert caption_from(sample, "json.n") is None
    assert caption_from(sample, "json.missing.caption") is None
    assert caption_from({"txt": b"   "}, "txt") is None


def test_missing_or_empty_shard_specs_fail_at_setup_with_a_hint(tmp_path: Path, shapes: list[str]) -> None:
    folder = Path(shapes[0]).parent
    with pytest.raises(FileNotFoundError, match=r"2 shard\(s\) not found: .*shapes-000005.tar.*ldm-shards"):
        WebDataModule(str(folder / "shapes-{000002..000005}.tar"), resolution=RES).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"matches no shards"):
        WebDataModule(str(tmp_path / "*.tar"), resolution=RES).setup("fit")
    with pytest.raises(FileNotFoundError, match="val.tar"):
        WebDataModule(shapes, val_shards=str(tmp_path / "val.tar"), resolution=RES).setup("fit")
    assert expand_shard_specs([str(folder), "pipe:curl -s https://example.com/a.tar"]) == [
        *shapes,
        "pipe:curl -s https://example.com/a.tar",
    ]


def test_constructor_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        WebDataModule("x.tar", resolution=30)
    with pytest.raises(ValueError, match="multiple of 8"):
        WebDataModule("x.tar", resolution=0)
    with pytest.raises(ValueError, match="set epoch_length"):
        WebDataModule("x.tar", resampled=True)


def test_simulated_ranks_read_disjoint_shards(shapes: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append(
            _keys(_read_all(WebDataModule(shapes, batch_size=4, resolution=RES, epoch_length=None)))
        )
    assert len(per_rank[0]) == len(per_rank[1]) == NUM_SAMPLES // 2
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == [f"{i:09d}" for i in range(NUM_SAMPLES)]

    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(ValueError, match="4 training shard.*8 ranks.*resampled"):
        WebDataModule(shapes, resolution=RES).setup("fit")


@pytest.mark.parametrize(("resampled", "num_workers", "epoch_length"), [(True, 2, 7), (False, 0, 30)])
def test_epoch_length_gives_exactly_that_many_batches(
    shapes: list[str], resampled: bool, num_workers: int, epoch_length: int
) -> None:
    dm = WebDataModule(
        shapes,
        batch_size=4,
        num_workers=num_workers,
        resolution=RES,
        resampled=resampled,
        epoch_length=epoch_length,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == epoch_length
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == epoch_length and all(b["image"].shape == (4, 3, RES, RES) for b in batches)
    loader.close()  # dropped unclosed, its persistent workers cost 5 s each at collection


def test_validation_reads_every_shard_in_order_on_every_rank(
    shapes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dm = WebDataModule(shapes, val_shards=shapes, batch_size=10, resolution=RES, random_flip=True)
    dm.setup("fit")
    assert _keys(list(dm.val_dataloader())) == [f"{i:09d}" for i in range(NUM_SAMPLES)]
    assert WebDataModule(shapes, resolution=RES).val_dataloader() == []


# ---------------------------------------------------------------- make_shards


def _photo(rng: np.random.Generator, size: tuple[int, int] = (24, 20)) -> np.ndarray:
    return rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)


def test_make_shards_from_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    originals = {}
    for name, fmt in [("a.jpg", "JPEG"), ("b.png", "PNG"), ("nested/c.webp", "WEBP"), ("d.jpeg", "JPEG")]:
        originals[name] = _encode(_photo(rng), fmt)
        (src / name).write_bytes(originals[name])
        (src / name).with_suffix(".txt").write_text(f"caption of {name}\n")
    (src / "uncaptioned.png").write_bytes(_encode(_photo(rng), "PNG"))
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (src / "broken.txt").write_text("broken")
    (src / "tiny.png").write_bytes(_encode(_photo(rng, (8, 8)), "PNG"))
    (src / "tiny.txt").write_text("tiny")
    (src / "notes.md").write_text("not an image")

    out = tmp_path / "out"
    assert main([str(src), str(out), "--samples-per-shard", "3", "--min-size", "16"]) == 0
    report = capsys.readouterr().out
    assert "wrote 4 samples in 2 shards" in report
    assert f"{out}/shards-{{000000..000001}}.tar" in report
    assert "skipped 3 (no caption: 1, too small: 1, unreadable image: 1)" in report

    stored = {}
    for shard in sorted(out.glob("shards-*.tar")):
        with tarfile.open(shard) as tar:
            stored.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    assert sorted(stored[k] for k in stored if not k.endswith(".txt")) == sorted(originals.values())
    captions = sorted(v.decode() for k, v in stored.items() if k.endswith(".txt"))
    assert captions == sorted(f"caption of {name}" for name in originals)

    dm = WebDataModule(str(out / "shards-{000000..000001}.tar"), batch_size=8, resolution=RES)
    (batch,) = _read_all(dm)
    assert sorted(batch["caption"]) == captions and dm.skipped_samples == {}

    with pytest.raises(SystemExit) as exit_info:
        main([str(src), str(out)])
    assert exit_info.value.code == 2 and "already holds 2 shards; pass --overwrite" in capsys.readouterr().err
    assert main([str(src), str(out), "--samples-per-shard", "10", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["shards-000000.tar"]


@pytest.mark.parametrize("table", ["list.csv", "list.jsonl"])
def test_make_shards_from_a_csv_or_jsonl(tmp_path: Path, table: str) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(5):
        (tmp_path / "img" / f"{i}.png").write_bytes(_encode(_photo(rng), "PNG"))
        rows.append({"path": f"img/{i}.png", "caption": f"picture {i}"})
    rows.append({"path": "img/missing.png", "caption": "gone"})
    rows.append({"path": "img/0.png", "caption": "  "})
    rows.append({"path": "img/0.heic", "caption": "a type no loader reads"})
    src = tmp_path / table
    if table.endswith(".csv"):
        src.write_text("path,caption\n" + "".join(f'{r["path"]},"{r["caption"]}"\n' for r in rows))
    else:
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))

    summary = make_shards(src, tmp_path / "out", samples_per_shard=2, caption_key="caption")
    assert summary.written == 5 and len(summary.shards) == 3
    assert summary.skipped == {"missing image": 1, "no caption": 1, "unsupported image type": 1}
    dm = WebDataModule(summary.shards, batch_size=8, resolution=RES, caption_key="caption", shuffle_buffer=0)
    (batch,) = _read_all(dm)
    assert batch["caption"] == [f"picture {i}" for i in range(5)]


def test_make_shards_explains_bad_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "list.txt").write_text("a.png")
    (tmp_path / "noheader.csv").write_text("a.png,a caption\n")
    (tmp_path / "bad.jsonl").write_text('{"path": "a.png", "caption": "x"}\n{oops\n')
    cases = {
        "missing": "does not exist",
        "empty": "no images (jpg, jpeg, png, webp, bmp, gif, tif, tiff, ppm) found",
        "list.txt": "unknown type '.txt'",
        "noheader.csv": "header row with columns path,caption",
        "bad.jsonl": "bad.jsonl:2: not valid JSON",
    }
    for name, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main([str(tmp_path / name), str(tmp_path / f"out-{name}")])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out-missing").exists() and not (tmp_path / "out-empty").exists()

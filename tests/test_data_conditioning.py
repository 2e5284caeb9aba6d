"""Data side of image conditioning: `cond_image` and `seg` batches, their sidecars, the demo variants."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import _write_tar

from ldm.data import webdataset as wdm
from ldm.data.make_shards import make_shards
from ldm.data.synthetic import (
    MANIFEST,
    PALETTE,
    SEMANTIC_CLASSES,
    SHAPES,
    ShapesDataModule,
    all_edit_prompts,
    edit_fidelity,
    edit_instruction,
    ensure_demo_shards,
    judge_colours,
    parse_caption,
    parse_instruction,
    random_edit_sample,
    random_semantic_sample,
)
from ldm.data.transforms import apply_crop, decode_label_map, plan_crop, resize_and_crop, to_tensor, to_uint8
from ldm.data.webdataset import WebDataModule

RES = 16
COLOURS = np.array(list(PALETTE.values()), dtype=np.uint8)  # label i is drawn in COLOURS[i]
COND_COLOURS = COLOURS[::-1].copy()  # the conditioning image draws label i in another colour


@pytest.fixture(autouse=True)
def _fresh_warning_limiter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wdm, "_warn", wdm._RateLimitedWarning(wdm.WARN_INTERVAL_S))


def _encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _palette_png(labels: np.ndarray) -> bytes:
    """A mode-P map whose palette colours are unrelated to its indices (index i shows as grey 255 - 40i)."""
    image = Image.frombytes("P", labels.shape[::-1], labels.astype(np.uint8).tobytes())
    image.putpalette([c for i in range(256) for c in (max(0, 255 - 40 * i),) * 3])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _read_all(dm: WebDataModule) -> list[dict]:
    dm.setup("fit")
    return list(dm.train_dataloader())


def _labels_of(pixels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Index into `colours` of each pixel of a uint8 HxWx3 array; -1 where no colour matches exactly."""
    matches = (pixels[..., None, :] == colours).all(-1)
    return np.where(matches.any(-1), matches.argmax(-1), -1)


# ---------------------------------------------------------------- transforms


def test_resize_and_crop_is_plan_then_apply_with_the_same_draws() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8))
    for seed in range(8):
        draws = random.Random(seed)
        expected = (draws.randint(0, 27 - RES), draws.randint(0, 0), draws.random() < 0.5)  # 40x24 -> 27x16
        rng = random.Random(seed)
        plan = plan_crop(image.size, RES, random_crop=True, random_flip=True, rng=rng)
        assert rng.getstate() == draws.getstate()  # the image-only stream draws exactly as before
        assert (plan.box[0], plan.box[1], plan.flip) == expected and plan.size == (27, RES)
        direct = resize_and_crop(image, RES, random_crop=True, random_flip=True, rng=random.Random(seed))
        assert np.array_equal(np.asarray(direct), np.asarray(apply_crop(image, plan)))


def test_label_maps_are_read_as_indices_and_colour_maps_are_refused() -> None:
    labels = np.random.default_rng(0).integers(0, 6, (5, 7)).astype(np.uint8)
    assert np.array_equal(np.asarray(decode_label_map(_encode(labels))), labels)
    assert np.array_equal(np.asarray(decode_label_map(_palette_png(labels))), labels)
    with pytest.raises(ValueError, match="mode RGB.*single-channel.*not colours"):
        decode_label_map(_encode(COLOURS[labels]))


# ---------------------------------------------------------------- WebDataModule


def _aligned_sample(key: str, rng: np.random.Generator, size: tuple[int, int]) -> dict[str, str | bytes]:
    """Random per-pixel labels; the image and the cond image draw them in two colour tables.

    The shorter side is RES, so nothing is resampled: crops and flips must keep labels == colours
    exactly. The map is stored at half size (nearest upscaling doubles it exactly) or as a palette PNG.
    """
    width, height = size
    half = rng.integers(0, len(COLOURS), (height // 2, width // 2))
    labels = half.repeat(2, 0).repeat(2, 1)
    seg = _encode(half.astype(np.uint8)) if key.endswith("half") else _palette_png(labels)
    return {
        "__key__": key,
        "png": _encode(COLOURS[labels]),
        "src.png": _encode(COND_COLOURS[labels]),
        "seg.png": seg,
        "txt": b"labels",
    }


def test_random_crop_and_flip_keep_image_cond_image_and_seg_aligned(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    samples = [_aligned_sample(f"wide{i}", rng, (40, RES)) for i in range(3)]
    samples += [_aligned_sample(f"tall{i}-half", rng, (RES, 36)) for i in range(3)]
    shard = _write_tar(tmp_path / "aligned.tar", samples)
    views: dict[str, set[bytes]] = {}
    for seed in range(6):
        dm = WebDataModule(
            shard,
            batch_size=3,
            resolution=RES,
            random_crop=True,
            random_flip=True,
            seed=seed,
            cond_image_key="src.png",
            seg_key="seg.png",
            num_classes=len(COLOURS),
        )
        for batch in _read_all(dm):
            assert (
                batch["cond_image"].shape == (3, 3, RES, RES) and batch["cond_image"].dtype == torch.float32
            )
            assert batch["seg"].dtype == torch.int64 and batch["seg"].shape == (3, RES, RES)
            for key, image, cond, seg in zip(
                batch["key"],
                to_uint8(batch["image"]),
                to_uint8(batch["cond_image"]),
                batch["seg"],
                strict=True,
            ):
                assert np.array_equal(_labels_of(image, COLOURS), seg.numpy())
                assert np.array_equal(_labels_of(cond, COND_COLOURS), seg.numpy())
                views.setdefault(key, set()).add(image.tobytes())
    assert all(len(seen) >= 3 for seen in views.values())  # crops and flips did vary


def test_a_cond_image_of_another_size_is_stretched_onto_its_image(tmp_path: Path) -> None:
    def picture(width: int, height: int) -> np.ndarray:
        x = np.linspace(0, 1, width)[None, :, None]
        y = np.linspace(0, 1, height)[:, None, None]
        return (255 * np.concatenate([x + 0 * y, y + 0 * x, x * y], axis=-1)).astype(np.uint8)

    sample = {
        "__key__": "a",
        "png": _encode(picture(48, 32)),
        "cond.png": _encode(picture(96, 64)),
        "txt": b"a",
    }
    shard = _write_tar(tmp_path / "sizes.tar", [sample])
    errors, mirrored = [], []
    for seed in range(4):
        dm = WebDataModule(
            shard, resolution=RES, random_crop=True, random_flip=True, seed=seed, cond_image_key="cond.png"
        )
        (batch,) = _read_all(dm)
        image, cond = batch["image"][0], batch["cond_image"][0]
        errors.append((image - cond).abs().mean().item())
        mirrored.append((image - cond.flip(-1)).abs().mean().item())
    assert max(errors) < 0.02 and min(mirrored) > 5 * max(errors)


def test_conditioning_keys_leave_the_image_stream_as_it_was(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    samples = []
    for i in range(10):
        pixels = _encode(rng.integers(0, 255, (RES + 2 * i, 40, 3), dtype=np.uint8))
        samples.append(
            {
                "__key__": f"{i:03d}",
                "png": pixels,
                "cond.png": pixels,
                "seg.png": _encode(np.zeros((RES + 2 * i, 40), np.uint8)),
                "txt": b"x",
            }
        )
    shard = _write_tar(tmp_path / "same.tar", samples)
    settings = dict(
        batch_size=4, resolution=RES, random_crop=True, random_flip=True, shuffle_buffer=5, seed=7
    )
    plain = _read_all(WebDataModule(shard, **settings))
    conditioned = _read_all(WebDataModule(shard, cond_image_key="cond.png", seg_key="seg.png", **settings))
    assert [b["key"] for b in plain] == [b["key"] for b in conditioned]
    for before, after in zip(plain, conditioned, strict=True):
        assert "cond_image" not in before and "seg" not in before
        assert torch.equal(before["image"], after["image"])
        assert torch.equal(after["cond_image"], after["image"])


def test_samples_without_usable_conditioning_are_skipped_and_counted(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    image = _encode(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8))
    good_cond, good_seg = (
        _encode(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)),
        _encode(rng.integers(0, 4, (RES, RES)).astype(np.uint8)),
    )

    def sample(key: str, **entries: bytes) -> dict[str, str | bytes]:
        parts = {"cond.png": good_cond, "seg.png": good_seg, **entries}
        return {"__key__": key, "png": image, "txt": b"x", **{k: v for k, v in parts.items() if v}}

    labels = rng.integers(0, 4, (RES, RES)).astype(np.uint8)
    samples = [
        sample("good0"),
        sample("nocond", **{"cond.png": b""}),
        sample("badcond", **{"cond.png": good_cond[: len(good_cond) // 2]}),
        sample("good1"),
        sample("noseg", **{"seg.png": b""}),
        sample("badseg", **{"seg.png": b"not a png"}),
        sample("rgbseg", **{"seg.png": _encode(COLOURS[labels])}),
        sample("label4", **{"seg.png": _encode(np.where(labels == 0, 4, labels).astype(np.uint8))}),
        sample("good2"),
    ]
    shard = _write_tar(tmp_path / "mixed.tar", samples)
    dm = WebDataModule(
        shard,
        batch_size=2,
        resolution=RES,
        shuffle_buffer=0,
        cond_image_key="cond.png",
        seg_key="seg.png",
        num_classes=4,
    )
    batches = _read_all(dm)
    assert [k for b in batches for k in b["key"]] == ["good0", "good1", "good2"]
    assert dm.skipped_samples == {
        "no conditioning image": 1,
        "unreadable conditioning image": 1,
        "no segmentation map": 1,
        "unreadable segmentation map": 2,
        "label out of range": 1,
    }
    assert sum(sum(b["skipped"].values()) for b in batches) == 6
    without_limit = WebDataModule(shard, batch_size=9, resolution=RES, seg_key="seg.png", shuffle_buffer=0)
    assert "label4" in _read_all(without_limit)[0]["key"]  # fine when num_classes is not set


def test_constructor_rejects_conditioning_it_cannot_serve() -> None:
    with pytest.raises(ValueError, match="num_classes=5 .* set data.seg_key"):
        WebDataModule("x.tar", num_classes=5)
    with pytest.raises(ValueError, match="cond_image_key='png'.*not .*image extensions"):
        WebDataModule("x.tar", cond_image_key="png")


# ---------------------------------------------------------------- make_shards


def _members(shards: list[str]) -> dict[str, bytes]:
    stored = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            stored.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return stored


def test_make_shards_takes_sidecars_from_a_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    files = {
        "a.png": _encode(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)),
        "a.cond.jpg": _encode(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8), "JPEG"),
        "a.seg.png": _encode(rng.integers(0, 3, (20, 24)).astype(np.uint8)),
        "sub/b.jpg": _encode(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8), "JPEG"),
        "sub/b.seg.png": _encode(rng.integers(0, 3, (20, 24)).astype(np.uint8)),
        "c.png": _encode(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)),
        "d.png": _encode(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)),
        "d.seg.png": _encode(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)),  # colours, not indices
        "orphan.cond.png": _encode(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)),  # no orphan.png
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    for name in ("a", "sub/b", "c", "d"):
        (src / f"{name}.txt").write_text(f"caption {name}")

    summary = make_shards(src, tmp_path / "out", samples_per_shard=2)
    assert summary.written == 3
    assert summary.skipped == {"unreadable segmentation map": 1, "no caption": 1}  # d, and the orphan
    assert summary.sidecars == {"cond.jpg": 1, "seg.png": 2}
    assert "with cond.jpg: 1, seg.png: 2" in summary.report()
    stored = _members(summary.shards)
    samples: dict[str, dict[str, bytes]] = {}
    for name, data in stored.items():
        key, _, extension = name.partition(".")
        samples.setdefault(key, {})[extension] = data
    by_caption = {s["txt"].decode(): s for s in samples.values()}
    assert sorted(by_caption["caption a"]) == ["cond.jpg", "png", "seg.png", "txt"]
    assert by_caption["caption a"]["cond.jpg"] == files["a.cond.jpg"]
    assert by_caption["caption a"]["seg.png"] == files["a.seg.png"]
    assert sorted(by_caption["caption sub/b"]) == ["jpg", "seg.png", "txt"]
    assert sorted(by_caption["caption c"]) == ["png", "txt"]

    dm = WebDataModule(summary.shards, batch_size=4, resolution=RES, seg_key="seg.png", shuffle_buffer=0)
    (batch,) = _read_all(dm)
    assert sorted(batch["caption"]) == ["caption a", "caption sub/b"]
    assert dm.skipped_samples == {"no segmentation map": 1}


@pytest.mark.parametrize("table", ["list.csv", "list.jsonl"])
def test_make_shards_takes_cond_path_and_seg_path_columns(tmp_path: Path, table: str) -> None:
    rng = np.random.default_rng(4)
    (tmp_path / "img").mkdir()
    rows, conds, segs = [], {}, {}
    for i in range(4):
        (tmp_path / "img" / f"{i}.png").write_bytes(
            _encode(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8))
        )
        conds[i] = rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)
        segs[i] = rng.integers(0, 5, (RES, RES)).astype(np.uint8)
        (tmp_path / "img" / f"{i}.before.png").write_bytes(_encode(conds[i]))
        (tmp_path / "img" / f"{i}.labels.png").write_bytes(_encode(segs[i]))
        rows.append(
            {
                "path": f"img/{i}.png",
                "caption": f"edit {i}",
                "cond_path": f"img/{i}.before.png",
                "seg_path": f"img/{i}.labels.png",
            }
        )
    rows.append({"path": "img/0.png", "caption": "no sidecars", "cond_path": "", "seg_path": ""})
    rows.append({"path": "img/1.png", "caption": "lost", "cond_path": "img/gone.png", "seg_path": ""})
    rows.append({"path": "img/1.png", "caption": "jpeg map", "cond_path": "", "seg_path": "img/1.labels.jpg"})
    src = tmp_path / table
    if table.endswith(".csv"):
        src.write_text(
            "path,caption,cond_path,seg_path\n" + "".join(",".join(r.values()) + "\n" for r in rows)
        )
    else:
        src.write_text("".join(json.dumps({k: v for k, v in r.items() if v}) + "\n" for r in rows))

    summary = make_shards(src, tmp_path / "out", samples_per_shard=3)
    assert summary.written == 5
    assert summary.skipped == {"missing conditioning image": 1, "unsupported segmentation map type": 1}
    assert summary.sidecars == {"cond.png": 4, "seg.png": 4}
    dm = WebDataModule(
        summary.shards,
        batch_size=8,
        resolution=RES,
        shuffle_buffer=0,
        cond_image_key="cond.png",
        seg_key="seg.png",
    )
    (batch,) = _read_all(dm)
    assert batch["caption"] == [f"edit {i}" for i in range(4)]
    assert dm.skipped_samples == {"no conditioning image": 1}
    for i in range(4):
        assert torch.equal(batch["cond_image"][i], to_tensor(Image.fromarray(conds[i])))
        assert np.array_equal(batch["seg"][i].numpy(), segs[i])


# ---------------------------------------------------------------- demo variants


def test_semantic_labels_are_the_shape_pixels_of_the_image() -> None:
    rng = np.random.default_rng(5)
    for resolution in (RES, 32):
        for _ in range(30):
            image, labels, caption = random_semantic_sample(rng, resolution)
            shape, colour, background = parse_caption(caption)
            assert labels.shape == image.shape[:2] and labels.dtype == np.uint8
            assert set(np.unique(labels)) == {0, 1 + SHAPES.index(shape)}
            # pixels of one pure colour lie wholly inside or outside the shape; blended edges may go either way
            on_shape = (image == PALETTE[colour]).all(-1)
            off_shape = (image == PALETTE[background]).all(-1)
            assert (labels[on_shape] > 0).all() and (labels[off_shape] == 0).all()
            assert (on_shape | off_shape).mean() > 0.7


def test_edit_pairs_recolour_the_same_shape_on_the_same_background() -> None:
    rng = np.random.default_rng(6)
    conds, targets, instructions = zip(*(random_edit_sample(rng, 32) for _ in range(60)), strict=True)
    for cond, target, instruction in zip(conds, targets, instructions, strict=True):
        shape, after = parse_instruction(instruction)
        before, background = judge_colours(cond)
        assert len({before, after, background}) == 3
        assert judge_colours(target) == (after, background)
        pure_background = (cond == PALETTE[background]).all(-1)
        assert np.array_equal(pure_background, (target == PALETTE[background]).all(-1))  # same geometry
        assert np.array_equal((cond == PALETTE[before]).all(-1), (target == PALETTE[after]).all(-1))
    assert edit_fidelity(targets, conds, instructions) == 1.0
    assert edit_fidelity(conds, conds, instructions) == 0.0
    assert edit_fidelity(targets, conds, instructions[1:] + instructions[:1]) < 0.5


def test_instructions_round_trip_and_bad_ones_are_named() -> None:
    prompts = all_edit_prompts()
    assert len(prompts) == len(set(prompts)) == len(SHAPES) * len(PALETTE)
    assert all(edit_instruction(*parse_instruction(p)) == p for p in prompts)
    assert parse_instruction(" Make the Circle GREEN ") == ("circle", "green")
    with pytest.raises(ValueError, match="not of the form 'make the <shape> <colour>'"):
        parse_instruction("make the cat green")
    with pytest.raises(ValueError, match="as many images"):
        edit_fidelity([np.zeros((8, 8, 3), np.uint8)], [], ["make the circle red"])


@pytest.mark.parametrize("variant", ["semantic", "edit"])
def test_shapes_datamodule_serves_each_variant(tmp_path: Path, variant: str) -> None:
    dm = ShapesDataModule(
        root=str(tmp_path), num_samples=12, samples_per_shard=6, resolution=32, batch_size=12, variant=variant
    )
    dm.prepare_data()
    (batch,) = _read_all(dm)
    images = to_uint8(batch["image"])
    if variant == "semantic":
        assert batch["seg"].shape == (12, 32, 32) and batch["seg"].dtype == torch.int64
        assert 0 <= batch["seg"].min() and batch["seg"].max() < SEMANTIC_CLASSES == dm.num_classes
        for image, labels, caption in zip(images, batch["seg"].numpy(), batch["caption"], strict=True):
            shape, colour, _ = parse_caption(caption)
            assert (labels[(image == PALETTE[colour]).all(-1)] == 1 + SHAPES.index(shape)).all()
    else:
        assert batch["cond_image"].shape == (12, 3, 32, 32) and batch["cond_image"].dtype == torch.float32
        assert edit_fidelity(images, to_uint8(batch["cond_image"]), batch["caption"]) == 1.0
    with pytest.raises(ValueError, match="variant='semantic' sets"):
        ShapesDataModule(root=str(tmp_path), variant="semantic", seg_key="labels.png")
    with pytest.raises(ValueError, match="unknown demo data variant 'depth'"):
        ShapesDataModule(root=str(tmp_path), variant="depth")


def test_demo_folder_of_another_variant_is_regenerated_and_an_old_manifest_still_counts(
    tmp_path: Path,
) -> None:
    shards = ensure_demo_shards(tmp_path, num_samples=6, samples_per_shard=6, resolution=RES)
    assert not any(name.endswith("seg.png") for name in _members(shards))
    semantic = ensure_demo_shards(
        tmp_path, num_samples=6, samples_per_shard=6, resolution=RES, variant="semantic"
    )
    assert sum(name.endswith(".seg.png") for name in _members(semantic)) == 6
    stamp = Path(semantic[0]).stat().st_mtime_ns
    assert ensure_demo_shards(tmp_path, 6, 6, RES, variant="semantic") == semantic
    assert Path(semantic[0]).stat().st_mtime_ns == stamp

    caption = ensure_demo_shards(tmp_path, num_samples=6, samples_per_shard=6, resolution=RES)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    del manifest["variant"]  # as written before there were variants
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    stamp = Path(caption[0]).stat().st_mtime_ns
    assert ensure_demo_shards(tmp_path, num_samples=6, samples_per_shard=6, resolution=RES) == caption
    assert Path(caption[0]).stat().st_mtime_ns == stamp
    edit = ensure_demo_shards(tmp_path, 6, 6, RES, variant="edit")
    assert sum(name.endswith(".cond.png") for name in _members(edit)) == 6

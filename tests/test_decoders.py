"""data.decoder: pil (today's pixels), pil_draft (libjpeg's reduced DCT decode) and torchvision (torchvision.io's
libjpeg-turbo decode, antialiased bicubic resize) give batches of the same shapes, keys, crop/flip draws and skip
counts, with pixels close to pil's; pil's are apply_crop/to_tensor's exactly."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data import webdataset as wdm
from ldm.data.transforms import apply_crop, plan_cover_crop, to_tensor

RES = 64
# (width, height): over 2x and 4x the resolution (draft decodes at 1/2 and 1/4), one under it (upscaled)
SIZES = [(300, 200), (400, 300), (210, 280), (48, 40), (520, 260)]
# mean absolute difference from pil's pixels, of the [0, 1] range: measured 0.7-1.1/255 per picture for pil_draft
# (max 6/255), 0.002-0.005/255 for torchvision (max 2/255: its bicubic antialias filter is PIL's, rounded apart)
MAX_MEAN_ABS = {"pil_draft": 2 / 255, "torchvision": 0.1 / 255}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wdm, "_warn", wdm._RateLimitedWarning(wdm.WARN_INTERVAL_S))
    torch.set_num_threads(1)


def photo_like(rng: np.random.Generator, width: int, height: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A smooth random colour field with grain (as benchmarks/data_throughput.py's), JPEG quality 90."""
    coarse = rng.random((height // 32 + 2, width // 32 + 2, 3)).astype(np.float32)
    field = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC))
    pixels = np.clip(field + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    rng = np.random.default_rng(0)
    pictures = {f"{i:04d}": photo_like(rng, w, h) for i, (w, h) in enumerate(SIZES)}
    pictures["0100"] = photo_like(rng, 280, 200, mode="L")  # a grey JPEG
    pictures["0101"] = photo_like(rng, 200, 150, fmt="PNG")  # decoded by PIL under every decoder
    good = pictures["0000"]
    path = tmp_path_factory.mktemp("decoders") / "shard-000000.tar"
    with tarfile.open(path, "w") as tar:
        for key, data in pictures.items():
            _add(tar, f"{key}.{'png' if key == '0101' else 'jpg'}", data)
            _add(tar, f"{key}.txt", f"picture {key}".encode())
        _add(tar, "0900.jpg", good[: len(good) // 2])  # truncated
        _add(tar, "0900.txt", b"truncated")
        _add(tar, "0901.jpg", b"this is not a picture at all" * 4)
        _add(tar, "0901.txt", b"garbage")
    return path, pictures


def _read(path: Path, decoder: str, monkeypatch: pytest.MonkeyPatch, **settings) -> tuple[dict, dict, Counter]:
    """Every sample's image by key, the crop plan each was given, and the skip counts."""
    plans: dict = {}
    real_plan = wdm.plan_cover_crop

    def recording_plan(size, target, random_crop, random_flip, rng):
        plan = real_plan(size, target, random_crop, random_flip, rng)
        plans.setdefault("pending", []).append((size, plan))
        return plan

    monkeypatch.setattr(wdm, "plan_cover_crop", recording_plan)
    dm = wdm.WebDataModule(str(path), batch_size=3, num_workers=0, resolution=RES, shuffle_buffer=0,
                           decoder=decoder, **settings)
    dm.setup("fit")
    images, skipped = {}, Counter()
    for batch in dm.train_dataloader():
        skipped.update(batch["skipped"])
        if "image" not in batch:
            continue
        assert batch["image"].dtype == torch.float32 and batch["image"].shape[1:] == (3, RES, RES)
        assert batch["caption"] == [f"picture {k}" for k in batch["key"]]
        for key, image in zip(batch["key"], batch["image"], strict=True):
            images[key] = image
    recorded = plans.pop("pending", [])
    monkeypatch.setattr(wdm, "plan_cover_crop", real_plan)
    return images, {"plans": recorded}, skipped


@pytest.mark.parametrize("decoder", ["pil", "pil_draft", "torchvision"])
@pytest.mark.parametrize("draws", [False, True])
def test_decoders_match_pil(shard, decoder: str, draws: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    path, pictures = shard
    settings = {"random_crop": draws, "random_flip": draws}
    ref, ref_plans, ref_skipped = _read(path, "pil", monkeypatch, **settings)
    images, plans, skipped = _read(path, decoder, monkeypatch, **settings)
    # today's skips, for the same reasons, under every decoder
    assert ref_skipped == Counter({"truncated image": 1, "not an image": 1})
    assert skipped == ref_skipped
    assert sorted(images) == sorted(ref) == sorted(pictures)
    # the same crop plans from the full size, drawn with the same generator: the same crops and flips
    assert plans == ref_plans
    if draws:
        assert any(p.flip for _, p in ref_plans["plans"]) and not all(p.flip for _, p in ref_plans["plans"])
    for key, image in images.items():
        mean_abs = (image - ref[key]).abs().mean().item() / 2  # [-1, 1] -> fraction of [0, 1]
        if decoder == "pil" or key == "0101":  # PNG: PIL under every decoder
            assert torch.equal(image, ref[key]), key
        else:
            assert 0 < mean_abs < MAX_MEAN_ABS[decoder] or (decoder, key) == ("pil_draft", "0003"), (key, mean_abs * 255)
    if decoder == "pil":  # unchanged: exactly apply_crop/to_tensor of the full PIL decode, plan for plan
        # in shard order; the truncated JPEG's header reads, so its plan comes last (garbage gets none)
        assert len(ref_plans["plans"]) == len(pictures) + 1
        for (size, plan), (key, data) in zip(ref_plans["plans"][:-1], sorted(pictures.items()), strict=True):
            with Image.open(io.BytesIO(data)) as picture:
                assert picture.size == size
                assert torch.equal(images[key], to_tensor(apply_crop(picture.convert("RGB"), plan))), key
            assert plan == plan_cover_crop(size, (RES, RES)) or draws


def test_draft_decodes_smaller_but_not_below_the_plan(shard) -> None:
    """pil_draft really decodes at a reduced scale, never below the planned resize."""
    _, pictures = shard
    for (width, height), key in zip(SIZES, sorted(pictures)[: len(SIZES)], strict=True):
        plan = plan_cover_crop((width, height), (RES, RES))
        with Image.open(io.BytesIO(pictures[key])) as picture:
            picture.draft("RGB", plan.size)
            drafted = picture.size
        if min(width, height) < RES:  # upscaled: decoded whole
            assert drafted == (width, height)
            continue
        assert drafted[0] >= plan.size[0] and drafted[1] >= plan.size[1]
        assert drafted[0] <= (width + 1) // 2  # at least 2x smaller: these are all over 2x the plan


@pytest.mark.parametrize("decoder", ["pil_draft", "torchvision"])
def test_min_size_reads_the_full_size(shard, decoder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """min_size=150 keeps 300x200 (drafted to 150x100 or less) and drops the pictures under 150."""
    path, pictures = shard
    _, _, ref_skipped = _read(path, "pil", monkeypatch, min_size=150)
    images, _, skipped = _read(path, decoder, monkeypatch, min_size=150)
    assert skipped == ref_skipped and skipped["too small"] == 1  # the 48x40
    assert "0000" in images and "0003" not in images


def test_unknown_decoder_is_refused() -> None:
    with pytest.raises(ValueError, match="data.decoder must be one of pil, pil_draft, torchvision"):
        wdm.WebDataModule("x.tar", decoder="opencv")

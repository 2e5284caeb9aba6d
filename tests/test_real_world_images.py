"""Real-world and malformed pictures through every image input path: the WebDataset loader under each decoder
(pil, pil_draft, torchvision), ldm-cache-latents, the DreamBooth folder loader and ldm-shards.

Pinned for every case and decoder: loaded or skipped (and for which reason), the same pixels as "pil" up to
resampling rounding, the same crop plan. Phone photos with an EXIF orientation are turned upright (and planned,
bucketed by their upright size); transparency is composited onto white; 16-bit greys are scaled, not clipped;
decompression bombs and extreme aspect ratios allocate nothing large. All pictures are built here (~64 px)."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image, ImageCms, ImageFile, ImageOps

from ldm.data import webdataset as wdm
from ldm.data.transforms import (
    PICTURE_FORMATS,
    UPRIGHT,
    apply_crop,
    crops_first,
    plan_cover_crop,
    to_tensor,
)

RES = 64
DECODERS = ("pil", "pil_draft", "torchvision")
# mean absolute difference from pil's pixels, of 255 (tests/test_decoders.py's bounds)
MAX_MEAN_ABS = {"pil_draft": 2.5, "torchvision": 0.1}
CAPTION = b"a picture"



def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth random colour field with grain: asymmetric, so a turn or a mirror shows."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((height // 16 + 2, width // 16 + 2, 3)).astype(np.float32)
    field = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC))
    return np.clip(field + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def jpeg(array: np.ndarray, mode: str = "RGB", **options) -> bytes:
    return encode(Image.fromarray(array).convert(mode), "JPEG", quality=92, **options)


def exif_orientation(value: int, big_endian: bool = False) -> bytes:
    """An EXIF block holding only an Orientation tag (II or MM byte order)."""
    if not big_endian:
        exif = Image.Exif()
        exif[0x0112] = value
        return exif.tobytes()
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, value, 0) + struct.pack(">I", 0)
    return b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd


def ycck_jpeg(array: np.ndarray) -> bytes:
    """A YCCK JPEG (Adobe transform 2, as Photoshop writes CMYK): the CMYK picture's C, M, Y as YCbCr."""
    cmyk = np.asarray(Image.fromarray(array).convert("CMYK")).astype(np.float64)
    c, m, y, k = (cmyk[..., i] for i in range(4))
    luma = 0.299 * c + 0.587 * m + 0.114 * y
    cb = 128 - 0.168736 * c - 0.331264 * m + 0.5 * y
    cr = 128 + 0.5 * c - 0.418688 * m - 0.081312 * y
    stored = np.stack([luma, cb, cr, 255 - k], axis=-1).round().clip(0, 255).astype(np.uint8)
    # PIL writes CMYK inverted (Adobe's convention): hand it 255 - what the file should hold
    data = encode(Image.fromarray(255 - stored, "CMYK"), "JPEG", quality=95)
    at = data.find(b"Adobe")
    assert at > 0 and data[at + 11] == 0, "no Adobe marker with transform 0"
    return data[: at + 11] + b"\x02" + data[at + 12 :]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_raw(width: int, height: int, depth: int, colour: int, rows: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b"")


def png_rgb16(array16: np.ndarray) -> bytes:
    height, width, _ = array16.shape
    big = array16.astype(">u2")
    return png_raw(width, height, 16, 2, b"".join(b"\x00" + big[y].tobytes() for y in range(height)))


def png_bomb(side: int = 30000) -> bytes:
    """A PNG whose header declares side x side RGB pixels, with one compressed row of data."""
    return png_raw(side, side, 8, 2, b"\x00" + bytes(3 * side))


def jpeg_bomb(side: int = 30000) -> bytes:
    """A small JPEG whose frame header (SOF0) claims side x side pixels."""
    data = jpeg(photo(16, 16))
    at = data.find(b"\xff\xc0")
    return data[: at + 5] + struct.pack(">HH", side, side) + data[at + 9 :]


def rgba(array: np.ndarray) -> np.ndarray:
    """The picture with an alpha ramp: fully transparent left quarter (hidden colour black), half-transparent middle."""
    height, width, _ = array.shape
    alpha = np.full((height, width), 255, np.uint8)
    alpha[:, : width // 4] = 0
    alpha[:, width // 4 : width // 2] = 128
    colour = array.copy()
    colour[:, : width // 4] = 0
    return np.dstack([colour, alpha])


def animated(fmt: str, frames: list[np.ndarray], **options) -> bytes:
    images = [Image.fromarray(f) for f in frames]
    return encode(images[0], fmt, save_all=True, append_images=images[1:], duration=100, loop=0, **options)


def cases(size: int = 64) -> dict[str, dict[str, bytes]]:
    """name -> members of one sample (caption `txt` unless the case is about the caption)."""
    w, h = 3 * size, 2 * size  # landscape (a quarter turn shows in the size), over 2x the size (pil_draft halves it)
    base = photo(w, h, 1)
    pic = Image.fromarray(base)
    out: dict[str, dict[str, bytes]] = {}
    out["jpeg"] = {"jpg": jpeg(base)}
    for value in range(1, 9):
        out[f"exif{value}"] = {"jpg": jpeg(base, exif=exif_orientation(value))}
    out["exif6_mm"] = {"jpg": jpeg(base, exif=exif_orientation(6, big_endian=True))}
    out["exif6_png"] = {"png": encode(pic, "PNG", exif=exif_orientation(6))}
    out["exif6_webp"] = {"webp": encode(pic, "WEBP", lossless=True, exif=exif_orientation(6))}
    out["cmyk_jpeg"] = {"jpg": jpeg(base, "CMYK")}
    out["ycck_jpeg"] = {"jpg": ycck_jpeg(base)}
    out["grey_jpeg"] = {"jpg": jpeg(base, "L")}
    out["progressive_jpeg"] = {"jpg": jpeg(base, progressive=True)}
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    out["icc_jpeg"] = {"jpg": jpeg(base, icc_profile=srgb)}
    out["jpeg_444"] = {"jpg": jpeg(base, subsampling=0)}
    out["jpeg_422"] = {"jpg": jpeg(base, subsampling=1)}
    out["jpeg_420"] = {"jpg": jpeg(base, subsampling=2)}
    out["png_rgb"] = {"png": encode(pic, "PNG")}
    out["png_p"] = {"png": encode(pic.quantize(64), "PNG")}
    palette = pic.quantize(64)
    out["png_p_transparent"] = {"png": encode(palette, "PNG", transparency=int(np.asarray(palette)[0, 0]))}
    alpha = rgba(base)
    out["png_la"] = {"png": encode(Image.fromarray(alpha).convert("LA"), "PNG")}
    out["png_rgba"] = {"png": encode(Image.fromarray(alpha), "PNG")}
    out["png_rgba_opaque"] = {"png": encode(pic.convert("RGBA"), "PNG")}
    grey16 = (np.asarray(pic.convert("L")).astype(np.uint16) * 257).astype(np.uint16)
    out["png_i16"] = {"png": encode(Image.fromarray(grey16), "PNG")}
    out["png_rgb16"] = {"png": png_rgb16(base.astype(np.uint16) * 257)}
    out["png_1bit"] = {"png": encode(pic.convert("1"), "PNG")}
    out["webp_lossy"] = {"webp": encode(pic, "WEBP", quality=90)}
    out["webp_lossless"] = {"webp": encode(pic, "WEBP", lossless=True)}
    out["webp_alpha"] = {"webp": encode(Image.fromarray(alpha), "WEBP", lossless=True)}
    second = photo(w, h, 2)
    out["webp_animated"] = {"webp": animated("WEBP", [base, second], lossless=True)}
    out["gif_animated"] = {"gif": animated("GIF", [base, second])}
    out["gif_as_jpg"] = {"jpg": animated("GIF", [base, second])}
    out["bmp"] = {"bmp": encode(pic, "BMP")}
    out["tiff"] = {"tiff": encode(pic, "TIFF")}
    out["bmp_as_jpg"] = {"jpg": encode(pic, "BMP")}
    out["heic_named"] = {"heic": encode(pic, "PNG")}
    good = jpeg(base)
    out["truncated_jpeg"] = {"jpg": good[: len(good) // 2]}
    progressive = jpeg(base, progressive=True)
    out["truncated_progressive"] = {"jpg": progressive[: len(progressive) // 2]}
    png = encode(pic, "PNG")
    out["truncated_png"] = {"png": png[: len(png) // 2]}
    out["zero_bytes"] = {"jpg": b""}
    out["html_as_jpg"] = {"jpg": b"<html><body>403 Forbidden</body></html>"}
    out["png_as_jpg"] = {"jpg": png}
    out["jpeg_as_png"] = {"png": good}
    out["one_pixel_jpeg"] = {"jpg": jpeg(base[:1, :1])}
    out["one_pixel_png"] = {"png": encode(Image.fromarray(base[:1, :1]), "PNG")}
    out["small_jpeg"] = {"jpg": jpeg(photo(size // 2 + 3, size // 2 - 5, 3))}
    out["wide_4000x10"] = {"jpg": jpeg(photo(4000, 10, 4))}
    out["tall_10x4000"] = {"png": encode(Image.fromarray(photo(10, 4000, 5)), "PNG")}
    out["png_bomb"] = {"png": png_bomb()}
    out["jpeg_bomb"] = {"jpg": jpeg_bomb()}
    # captions
    out["no_caption"] = {"jpg": good, "txt": None}
    out["caption_latin1"] = {"jpg": good, "txt": "café au lait".encode("latin-1")}
    out["caption_bom"] = {"jpg": good, "txt": b"\xef\xbb\xbf" + CAPTION}
    out["caption_utf16"] = {"jpg": good, "txt": "a picture".encode("utf-16")}
    out["caption_empty"] = {"jpg": good, "txt": b"  \n"}
    out["json_caption"] = {"jpg": good, "txt": None, "json": json.dumps({"caption": "a picture"}).encode()}
    out["json_no_key"] = {"jpg": good, "txt": None, "json": json.dumps({"text": "a picture"}).encode()}
    out["json_invalid"] = {"jpg": good, "txt": None, "json": b"{not json"}
    for members in out.values():
        if "txt" not in members:
            members["txt"] = CAPTION
        if members["txt"] is None:
            del members["txt"]
    return out


# what every decoder does with each case (caption_key "txt"; the json cases with "json.caption")
LOADED = "loaded"
EXPECTED = {
    **{name: LOADED for name in (
        "jpeg", *(f"exif{v}" for v in range(1, 9)), "exif6_mm", "exif6_png", "exif6_webp", "cmyk_jpeg", "ycck_jpeg",
        "grey_jpeg", "progressive_jpeg", "icc_jpeg", "jpeg_444", "jpeg_422", "jpeg_420", "png_rgb", "png_p",
        "png_p_transparent", "png_la", "png_rgba", "png_rgba_opaque", "png_i16", "png_rgb16", "png_1bit",
        "webp_lossy", "webp_lossless", "webp_alpha", "webp_animated", "gif_as_jpg", "bmp_as_jpg", "png_as_jpg",
        "jpeg_as_png", "one_pixel_jpeg", "one_pixel_png", "small_jpeg", "wide_4000x10", "tall_10x4000",
        "caption_bom", "caption_utf16", "json_caption", "gif_animated", "bmp", "tiff")},
    # a member of no picture extension (IMAGE_KEYS) is not read as the picture (bytes decide the format, not the name)
    "heic_named": ("no image", "no jpg, jpeg, png, webp, bmp, gif, tif, tiff, ppm member; keys ['heic', 'txt']"),
    "truncated_jpeg": ("truncated image", "image file is truncated"),
    "truncated_progressive": ("truncated image", "image file is truncated"),
    "truncated_png": ("truncated image", "image file is truncated"),
    "zero_bytes": ("not an image", "0 bytes: an empty file"),
    "html_as_jpg": ("not an image", "39 bytes: b'<html><body>403 '"),
    "png_bomb": ("image too large", "900000000 pixels"),
    "jpeg_bomb": ("image too large", "900000000 pixels"),
    "no_caption": ("no caption", "no 'txt' member; keys ['jpg']"),
    "caption_latin1": ("unreadable caption", "'txt' is not UTF-8 text: invalid continuation byte at byte 3"),
    "caption_empty": ("empty caption", "none but whitespace"),
    "json_no_key": ("no caption", "no 'caption' in json: its fields ['text']"),
    "json_invalid": ("unreadable caption", "'json' is not valid JSON"),
}
CAPTIONS = {"caption_bom": "a picture", "caption_utf16": "a picture", "json_caption": "a picture"}
OPAQUE_UPRIGHT = ("jpeg", "exif1", "cmyk_jpeg", "ycck_jpeg", "grey_jpeg", "progressive_jpeg", "icc_jpeg", "jpeg_444",
                  "jpeg_422", "jpeg_420", "png_rgb", "png_p", "png_rgba_opaque", "png_rgb16", "png_1bit", "webp_lossy",
                  "webp_lossless", "webp_animated", "gif_as_jpg", "bmp_as_jpg", "png_as_jpg", "jpeg_as_png",
                  "one_pixel_jpeg", "one_pixel_png", "small_jpeg", "tall_10x4000", "gif_animated", "bmp", "tiff")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wdm, "_warn", wdm._RateLimitedWarning(wdm.WARN_INTERVAL_S))
    torch.set_num_threads(1)


def _picture(members: dict[str, bytes]) -> bytes | None:
    return next((members[k] for k in wdm.IMAGE_KEYS if k in members), None)


def _write(path: Path, samples: dict[str, dict[str, bytes]]) -> str:
    with wds.TarWriter(str(path), encoder=False) as writer:
        for key, members in samples.items():
            writer.write({"__key__": key, **members})
    return str(path)


def _read(shard: str, decoder: str, caption_key: str, **settings) -> tuple[dict, dict, Counter]:
    """key -> ("ok", image, caption) or (reason, detail); key -> (size planned for, plan); skip counts."""
    outcomes, plans, counts, current = {}, {}, Counter(), {}
    real_plan, real_decode = wdm.plan_cover_crop, wdm._ShardStream._decode

    def recording_plan(size, target, *args):
        plan = real_plan(size, target, *args)
        plans[current["key"]] = (size, plan)
        return plan

    def decode(self, raw, rng):
        current["key"] = raw["__key__"]
        return real_decode(self, raw, rng)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wdm, "plan_cover_crop", recording_plan)
        patch.setattr(wdm._ShardStream, "_decode", decode)
        dm = wdm.WebDataModule(shard, batch_size=2, resolution=RES, shuffle_buffer=0, decoder=decoder,
                               caption_key=caption_key, **settings)
        dm.setup("fit")
        for batch in dm.train_dataloader():
            counts.update(batch["skipped"])
            for _, key, reason, detail in batch["dropped"]:
                outcomes[key] = (reason, detail)
            for key, image, caption in zip(batch.get("key", []), batch.get("image", []), batch.get("caption", []),
                                           strict=True):
                outcomes[key] = ("ok", image, caption)
    return outcomes, plans, counts


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, dict[str, dict[str, bytes]], str]]:
    """name -> (shard, its samples, caption_key): the json-captioned cases in a shard of their own."""
    folder = tmp_path_factory.mktemp("real_world")
    everything = cases()
    groups = {"txt": {k: v for k, v in everything.items() if not k.startswith("json")},
              "json": {k: v for k, v in everything.items() if k.startswith("json")}}
    return {name: (_write(folder / f"{name}.tar", group), group, "txt" if name == "txt" else "json.caption")
            for name, group in groups.items()}


@pytest.fixture(scope="module")
def loaded(shards) -> dict[str, tuple[dict, dict, Counter]]:
    """decoder -> what _read gives, both shards together."""
    out = {}
    for decoder in DECODERS:
        outcomes, plans, counts = {}, {}, Counter()
        for shard, _, caption_key in shards.values():
            o, p, c = _read(shard, decoder, caption_key)
            outcomes.update(o), plans.update(p), counts.update(c)
        out[decoder] = (outcomes, plans, counts)
    return out


def ideal(data: bytes) -> Image.Image:
    """The picture as training should see it, by another route than the loader's: PIL's exif_transpose, a
    float composite onto white, 16-bit greys by their high byte."""
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        image = ImageOps.exif_transpose(opened)
    if image.mode == "I;16":
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA")).astype(np.float64)
        rgb = rgba[..., :3] * rgba[..., 3:] / 255 + 255 * (1 - rgba[..., 3:] / 255)
        image = Image.fromarray(rgb.round().astype(np.uint8))
    return image.convert("RGB")


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().mean().item() / 2 * 255  # [-1, 1] -> of 255


@pytest.mark.parametrize("decoder", DECODERS)
def test_every_case_is_loaded_or_skipped_for_its_reason(shards, loaded, decoder: str) -> None:
    outcomes, _, counts = loaded[decoder]
    everything = {k: v for _, group, _ in shards.values() for k, v in group.items()}
    assert sorted(outcomes) == sorted(everything) == sorted(EXPECTED)
    for name, expected in EXPECTED.items():
        got = outcomes[name]
        if expected == LOADED:
            assert got[0] == "ok", (name, got)
            assert got[1].shape == (3, RES, RES) and got[1].dtype == torch.float32
            assert got[2] == CAPTIONS.get(name, CAPTION.decode()), (name, got[2])
        else:
            reason, detail = expected
            assert got[0] == reason and detail in got[1], (name, got)
    skips = Counter(e[0] for e in EXPECTED.values() if e != LOADED)
    assert counts == skips  # every skip counted once, in the batches' `skipped`


@pytest.mark.parametrize("decoder", ["pil_draft", "torchvision"])
def test_decoders_give_pils_pixels_and_plans(loaded, decoder: str) -> None:
    ref, ref_plans, _ = loaded["pil"]
    outcomes, plans, _ = loaded[decoder]
    assert plans == ref_plans  # the same crops (and bucket targets) from the same upright size
    drafted = []
    for name, got in outcomes.items():
        if got[0] != "ok":
            continue
        error = _mean_abs(got[1], ref[name][1])
        assert error < MAX_MEAN_ABS[decoder], (name, error)
        if error > 0.5:
            drafted.append(name)
    if decoder == "pil_draft":  # the JPEGs over twice the plan really were drafted, EXIF-turned ones too
        assert {"jpeg", "exif6", "exif8", "cmyk_jpeg", "progressive_jpeg"} <= set(drafted)


def test_pil_pixels_are_upright_opaque_and_eight_bit(shards, loaded) -> None:
    """pil's pixels: the ideal picture (upright, on white, 8-bit) resized and cropped, exactly or within the
    composite's rounding."""
    outcomes, plans, _ = loaded["pil"]
    group = {k: v for _, g, _ in shards.values() for k, v in g.items()}
    for name, got in outcomes.items():
        if got[0] != "ok":
            continue
        picture = ideal(_picture(group[name]))
        size, plan = plans[name]
        assert size == picture.size, name  # planned from the upright size
        expected = to_tensor(apply_crop(picture, plan))
        assert (got[1] - expected).abs().max().item() <= 2 / 255 + 1e-6, name  # at most 1/255 apart: rounding
        assert _mean_abs(got[1], expected) < 0.05, name


def test_opaque_upright_pictures_keep_the_pixels_pil_always_gave(shards, loaded) -> None:
    """convert("RGB") of the whole picture, resized and cropped: what "pil" gave before pictures were turned
    and composited, bit for bit."""
    outcomes, plans, _ = loaded["pil"]
    group = shards["txt"][1]
    for name in OPAQUE_UPRIGHT:
        with Image.open(io.BytesIO(_picture(group[name]))) as image:
            expected = to_tensor(apply_crop(image.convert("RGB"), plans[name][1]))
        assert torch.equal(outcomes[name][1], expected), name


def test_exif_orientations_turn_every_decoder_upright(shards, loaded) -> None:
    group = shards["txt"][1]
    stored = Image.open(io.BytesIO(group["exif1"]["jpg"])).convert("RGB")
    for value in range(2, 9):
        upright = stored.transpose(UPRIGHT[value])
        size, plan = loaded["pil"][1][f"exif{value}"]
        assert size == upright.size == ((128, 192) if value >= 5 else (192, 128))
        expected = to_tensor(apply_crop(upright, plan))
        for decoder in DECODERS:
            image = loaded[decoder][0][f"exif{value}"][1]
            assert _mean_abs(image, expected) < MAX_MEAN_ABS.get(decoder, 1e-9), (value, decoder)
    for name in ("exif6_mm", "exif6_png", "exif6_webp"):  # big-endian EXIF; EXIF in a PNG, in a WebP
        assert loaded["pil"][1][name][0] == (128, 192), name


@pytest.mark.parametrize("value", range(1, 9))
def test_torchvision_turns_tensors_as_pil_transposes(value: int) -> None:
    pixels = np.random.default_rng(value).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    turned = wdm.turn_upright(torch.from_numpy(pixels).permute(2, 0, 1), value)
    expected = Image.fromarray(pixels)
    expected = expected.transpose(UPRIGHT[value]) if value in UPRIGHT else expected
    assert torch.equal(turned.permute(1, 2, 0), torch.from_numpy(np.array(expected)))


@pytest.mark.parametrize("decoder", DECODERS)
def test_buckets_take_the_upright_size(shards, decoder: str) -> None:
    """A portrait phone photo (stored landscape, EXIF 6) goes to a portrait bucket, under every decoder."""
    shard, _, caption_key = shards["txt"]
    outcomes, plans, _ = _read(shard, decoder, caption_key, buckets=True, bucket_step=16)
    for name in ("exif5", "exif6", "exif7", "exif8", "exif6_png", "tall_10x4000"):
        left, top, right, bottom = plans[name][1].box
        assert right - left < bottom - top, name
        assert outcomes[name][1].shape[1:] == (bottom - top, right - left)
    for name in ("exif1", "exif2", "jpeg", "wide_4000x10"):
        left, top, right, bottom = plans[name][1].box
        assert right - left > bottom - top, name


def test_a_decompression_bomb_is_refused_even_with_pils_limit_off(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """Some libraries set Image.MAX_IMAGE_PIXELS = None: PIL would then allocate 30000x30000 (2.7 GB) for a
    100 KB file. The loader refuses it from the header, before any decode."""
    shard = _write(tmp_path / "bomb.tar", {"bomb": {"png": png_bomb(), "txt": CAPTION},
                                           "jbomb": {"jpg": jpeg_bomb(), "txt": CAPTION}})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size))
    for decoder in DECODERS:
        dm = wdm.WebDataModule(shard, batch_size=1, resolution=RES, shuffle_buffer=0, decoder=decoder)
        dm.setup("fit")
        with pytest.raises(RuntimeError, match="no usable samples"):
            list(dm.train_dataloader())
        assert dm.skipped_samples == {"image too large": 2}
    assert decoded == []


def test_an_extreme_aspect_ratio_resizes_only_its_crop(monkeypatch: pytest.MonkeyPatch) -> None:
    """4000x10 covering a 512 square would be resized to 204800x512 (400 MB): only the crop's part is."""
    strip = Image.fromarray(photo(4000, 10, 4))
    # at 64 the full resize is affordable (25600x64): the crop-first pixels are its crop's within a rounding
    plan = plan_cover_crop(strip.size, (RES, RES), random_crop=True, rng=__import__("random").Random(3))
    assert crops_first(plan)
    full = np.asarray(strip.resize(plan.size, Image.Resampling.BICUBIC).crop(plan.box)).astype(int)
    assert np.abs(np.asarray(apply_crop(strip, plan)).astype(int) - full).max() <= 1
    plan = plan_cover_crop(strip.size, (512, 512))
    assert plan.size == (204800, 512) and crops_first(plan)
    sizes = []
    real_resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: sizes.append(size) or real_resize(self, size, *a, **k))
    cropped = apply_crop(strip, plan)
    assert cropped.size == (512, 512) and sizes == [(512, 512)]


def test_picture_formats_are_all_known_to_pil() -> None:
    Image.init()
    assert all(name in Image.OPEN for name in PICTURE_FORMATS)


def test_no_postscript_reaches_a_decoder(tmp_path: Path) -> None:
    """EPS bytes named .jpg (PIL would run Ghostscript on them) are not an image here."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    shard = _write(tmp_path / "eps.tar", {"eps": {"jpg": eps, "txt": CAPTION}, "ok": {"jpg": jpeg(photo(64, 64)), "txt": CAPTION}})
    dm = wdm.WebDataModule(shard, batch_size=2, resolution=RES, shuffle_buffer=0)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [k for b in batches for k in b["key"]] == ["ok"] and dm.skipped_samples == {"not an image": 1}


def test_caption_from_keeps_its_contract() -> None:
    assert wdm.caption_from({"txt": b"\xef\xbb\xbf a dog \n"}, "txt") == "a dog"
    assert wdm.caption_from({"txt": b"caf\xe9"}, "txt") is None
    assert wdm.caption_from({"json": b'{"caption": 3}'}, "json.caption") is None
    with pytest.raises(wdm._SkipSample, match="unreadable caption") as info:
        wdm._caption({"json": b'{"meta": {"caption": ["a", "b"]}}'}, "json.meta.caption")
    assert "json.meta.caption is a list, not text" in info.value.detail
    with pytest.raises(wdm._SkipSample, match="no caption") as info:
        wdm._caption({"json": b'{"meta": 3}'}, "json.meta.caption")
    assert "no 'caption' in json.meta: its fields a int" in info.value.detail


def test_cache_latents_writes_and_skips_what_the_loader_does(shards, loaded, tmp_path: Path) -> None:
    from helpers import tiny_sd_file

    from ldm.data.cache_latents import cache_latents

    ckpt = tiny_sd_file(tmp_path / "tiny.safetensors")
    outcomes, _, counts = loaded["pil"]
    total = Counter()
    for name, (shard, group, caption_key) in shards.items():
        info = cache_latents(ckpt, shard, tmp_path / name, resolution=RES, batch_size=8, caption_key=caption_key)
        total.update(info["skipped"])
        with wds.WebDataset(str(tmp_path / name / f"{name}.tar"), shardshuffle=False) as written:
            keys = [sample["__key__"] for sample in written]
        assert keys == [k for k in group if outcomes[k][0] == "ok"], name
        assert info["samples"] == len(keys)
    assert total == counts


def _dreambooth(folder: Path, **settings):
    from ldm.data.dreambooth import DreamBoothDataModule

    dm = DreamBoothDataModule(str(folder), resolution=RES, center_crop=True, **settings)
    dm.setup("fit")
    return dm


def test_dreambooth_reads_pictures_as_the_loader_does(shards, loaded, tmp_path: Path) -> None:
    outcomes, _, _ = loaded["pil"]
    group = shards["txt"][1]
    names = [n for n in group if EXPECTED[n] == LOADED and not n.startswith("caption")]
    folder = tmp_path / "instances"
    folder.mkdir()
    for name in names:
        extension = next(k for k in group[name] if k in wdm.IMAGE_KEYS)
        (folder / f"{name}.{extension}").write_bytes(group[name][extension])
    (folder / "jpeg.txt").write_bytes(b"\xef\xbb\xbfa photo of sks dog\n")  # a BOM (Windows Notepad's)
    dm = _dreambooth(folder, instance_prompt="a photo of sks dog")
    assert sorted(p.stem for p in dm.paths) == sorted(names) and dm.captions[dm.paths.index(folder / "jpeg.jpg")] == "a photo of sks dog"
    for path, picture in zip(dm.paths, dm._instances, strict=True):
        expected = outcomes[path.stem][1]
        image = to_tensor(apply_crop(picture, plan_cover_crop(picture.size, (RES, RES))))
        assert torch.equal(image, expected), path.name


@pytest.mark.parametrize("name", ["truncated_jpeg", "truncated_png", "zero_bytes", "html_as_jpg", "png_bomb", "jpeg_bomb"])
def test_dreambooth_names_an_unreadable_picture(shards, tmp_path: Path, name: str) -> None:
    from ldm.cli.sample import UsageError

    members = shards["txt"][1][name]
    extension = next(k for k in members if k in wdm.IMAGE_KEYS)
    (tmp_path / f"x.{extension}").write_bytes(members[extension])
    with pytest.raises(UsageError, match=rf"cannot read the instance picture .*x\.{extension}: .*fix or remove it"):
        _dreambooth(tmp_path, instance_prompt="a photo of sks dog")


def test_dreambooth_names_a_caption_that_is_not_utf8(tmp_path: Path) -> None:
    from ldm.cli.sample import UsageError

    (tmp_path / "x.jpg").write_bytes(jpeg(photo(64, 64)))
    (tmp_path / "x.txt").write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(UsageError, match=r"x\.txt is not UTF-8 text \(invalid continuation byte at byte 3\)"):
        _dreambooth(tmp_path)


def test_make_shards_skips_what_it_cannot_read(shards, loaded, tmp_path: Path) -> None:
    from ldm.data.make_shards import make_shards

    group = shards["txt"][1]
    src = tmp_path / "src"
    src.mkdir()
    names = ("jpeg", "exif6", "png_rgba", "bmp", "tiff", "gif_animated", "truncated_png", "zero_bytes", "html_as_jpg",
             "png_bomb", "caption_latin1")
    for name in names:
        extension = next(k for k in group[name] if k in wdm.IMAGE_KEYS)
        (src / f"{name}.{extension}").write_bytes(group[name][extension])
        (src / f"{name}.txt").write_bytes(group[name]["txt"])
    (src / "photo.heic").write_bytes(group["jpeg"]["jpg"])  # a type no loader reads: not listed at all
    (src / "photo.txt").write_bytes(CAPTION)
    summary = make_shards(src, tmp_path / "out", min_size=100)  # exif6 is 128x192 upright: kept
    assert summary.written == 6
    assert summary.skipped == {"unreadable image": 4, "unreadable caption": 1}
    # the pictures stored as they were (BMP, TIFF and GIF bytes under their own extension) load from these shards
    # as from any shard: the same pixels; keys number the written pictures in the folder's sorted order
    written = [p.stem for p in sorted(src.iterdir()) if p.suffix != ".txt" and p.suffix != ".heic"
               and p.stem in ("jpeg", "exif6", "png_rgba", "bmp", "tiff", "gif_animated")]
    dm = wdm.WebDataModule(summary.shards, batch_size=8, resolution=RES, shuffle_buffer=0)
    dm.setup("fit")
    (batch,) = list(dm.train_dataloader())
    outcomes, _, _ = loaded["pil"]
    assert batch["key"] == [f"{i:09d}" for i in range(6)] and len(written) == 6
    for name, image in zip(written, batch["image"], strict=True):
        assert torch.equal(image, outcomes[name][1]), name

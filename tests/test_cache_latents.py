"""ldm-cache-latents and data=cached_latents: training on cached latents takes the steps training on the
images takes, and latents from another autoencoder or resolution are refused before training."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import model_config, randomize_
from PIL import Image
from test_data import _read_all, _write_tar
from test_train import BARE, QUIET, _one_thread, compose_train, load_ckpt  # noqa: F401 (autouse fixture)

from ldm.cli.train import ConfigError, train
from ldm.data.cache_latents import cache_latents, load_autoencoder, main
from ldm.data.synthetic import ensure_demo_shards
from ldm.data.webdataset import WebDataModule
from ldm.models.autoencoder import AutoencoderKL

STREAM = ["data.batch_size=4", "data.shuffle_buffer=16", "data.num_workers=0", "data.random_flip=false"]


def write_autoencoder(path: Path, seed: int) -> Path:
    """A stage-one checkpoint as this project writes them: weights plus ldm_config.first_stage."""
    config = model_config("tiny")["first_stage"]
    vae = randomize_(AutoencoderKL(**config), std=0.05, seed=seed)
    state = {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    torch.save({"state_dict": state, "ldm_config": {"first_stage": config}}, path)
    return path


def test_training_on_cached_latents_takes_the_same_steps_as_on_images(tmp_path: Path) -> None:
    images = tmp_path / "images"
    ensure_demo_shards(str(images), 64, 16, 32, 0)
    ae = write_autoencoder(tmp_path / "ae.ckpt", seed=1)
    # encoded in batches of the training batch size: then even the last bits agree (a convolution's
    # rounding can depend on the batch it runs in)
    info = cache_latents(ae, str(images), tmp_path / "latents", resolution=32, batch_size=4)
    assert info["samples"] == 64 and info["latent_channels"] == 4
    sources = sorted(p.name for p in images.glob("*.tar"))
    assert sorted(p.name for p in (tmp_path / "latents").glob("*.tar")) == sources  # one per source shard

    # lr 1e-3 without warm-up: the weights move by ~1e-3 a step, so a wrong latent would show
    common = ["trainer.max_steps=6", "module.ema_decay=0.9", "module.optimizer.lr=1e-3", "module.lr_scheduler=null", f"module.first_stage_ckpt={ae}", *STREAM, *BARE, *QUIET]
    on_images = ["data=webdataset", f"data.train_shards={images}", "data.resolution=32"]
    on_latents = ["data=cached_latents", f"data.train_shards={tmp_path / 'latents'}", "data.resolution=32"]
    train(compose_train(tmp_path, [*common, *on_images], output_dir="${paths.root}/images"))
    train(compose_train(tmp_path, [*common, *on_latents], output_dir="${paths.root}/latents"))

    ckpt_a = load_ckpt(tmp_path / "runs/images/checkpoints/last.ckpt")
    ckpt_b = load_ckpt(tmp_path / "runs/latents/checkpoints/last.ckpt")
    a, b = ckpt_a["state_dict"], ckpt_b["state_dict"]
    assert ckpt_a["global_step"] == ckpt_b["global_step"] == 6 and int(b["model_ema.num_updates"]) == 6
    trained = [k for k in a if k.startswith(("model.diffusion_model.", "model_ema."))]
    different = [k for k in trained if not torch.equal(a[k], b[k])]
    assert not different, f"cached latents trained differently from images: {different[:3]}"


def test_latents_of_another_autoencoder_or_resolution_are_refused(tmp_path: Path) -> None:
    images = tmp_path / "images"
    ensure_demo_shards(str(images), 16, 16, 32, 0)
    cached_with = write_autoencoder(tmp_path / "a.ckpt", seed=1)
    trained_with = write_autoencoder(tmp_path / "b.ckpt", seed=2)
    assert main([str(cached_with), str(images), str(tmp_path / "latents"), "--resolution", "32"]) == 0
    assert json.loads((tmp_path / "latents" / "cache.json").read_text())["resolution"] == 32
    latents = ["data=cached_latents", f"data.train_shards={tmp_path / 'latents'}", "trainer.max_steps=1", *BARE]
    with pytest.raises(ConfigError, match="cached with another autoencoder"):
        train(compose_train(tmp_path, [*latents, "data.resolution=32", f"module.first_stage_ckpt={trained_with}"]))
    with pytest.raises(ConfigError, match="cached at resolution 32"):
        train(compose_train(tmp_path, [*latents, "data.resolution=64", f"module.first_stage_ckpt={cached_with}"]))
    # an edit model on latents cached without the before pictures: said before training, with the fix
    with pytest.raises(ConfigError, match="cached without it: re-run ldm-cache-latents with --cond-image-key cond.png"):
        train(compose_train(tmp_path, [*latents, "data.resolution=32", f"module.first_stage_ckpt={cached_with}",
                                       "conditioning=image_concat", "data.cond_image_key=cond.png"]))
    # a second run into the same folder does not silently overwrite
    with pytest.raises(SystemExit):
        main([str(cached_with), str(images), str(tmp_path / "latents"), "--resolution", "32"])


# ---------------------------------------------------------------- conditioned models

CONDITIONED = {
    "edit": (["conditioning=image_concat"], {"cond_image_key": "cond.png"}),
    "semantic": (["conditioning=semantic_map", "model.semantic_classes=4"], {"seg_key": "seg.png"}),
}


@pytest.mark.parametrize("variant", sorted(CONDITIONED))
def test_conditioned_training_on_cached_latents_takes_the_same_steps_as_on_images(
    tmp_path: Path, variant: str
) -> None:
    conditioning, keys = CONDITIONED[variant]
    images = tmp_path / "images"
    ensure_demo_shards(str(images), 32, 16, 32, 0, variant=variant)
    ae = write_autoencoder(tmp_path / "ae.ckpt", seed=1)
    info = cache_latents(ae, str(images), tmp_path / "latents", resolution=32, batch_size=4, **keys)
    assert info["samples"] == 32 and not info["skipped"]

    common = ["trainer.max_steps=5", "module.optimizer.lr=1e-3", "module.lr_scheduler=null",
              f"module.first_stage_ckpt={ae}", "data.resolution=32", *conditioning, *STREAM, *BARE, *QUIET]
    common += [f"data.{name}={key}" for name, key in keys.items()]
    on_images = ["data=webdataset", f"data.train_shards={images}"]
    on_latents = ["data=cached_latents", f"data.train_shards={tmp_path / 'latents'}"]
    train(compose_train(tmp_path, [*common, *on_images], output_dir="${paths.root}/images"))
    cfg = compose_train(tmp_path, [*common, *on_latents], output_dir="${paths.root}/latents")
    assert cfg.data.num_classes == (4 if variant == "semantic" else None)
    train(cfg)

    a = load_ckpt(tmp_path / "runs/images/checkpoints/last.ckpt")["state_dict"]
    b = load_ckpt(tmp_path / "runs/latents/checkpoints/last.ckpt")["state_dict"]
    trained = [k for k in a if k.startswith(("model.diffusion_model.", "model_ema."))]
    different = [k for k in trained if not torch.equal(a[k], b[k])]
    assert not different, f"cached {variant} latents trained differently from images: {different[:3]}"


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _members(shard: Path) -> dict[str, dict[str, bytes]]:
    """sample key -> extension -> bytes"""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, _, extension = member.name.partition(".")
            samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def test_cli_keeps_before_pictures_and_class_maps_cropped_as_their_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)

    def sample(key: str, top_label: int, without: str = "") -> dict[str, str | bytes]:
        labels = rng.integers(0, top_label + 1, (16, 24))  # wider than tall: the centre crop cuts the sides
        labels[8, 12] = top_label  # inside the crop
        parts = {
            "__key__": key,
            "png": _png(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)),
            "src.png": _png(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)),
            "seg.png": _png(labels.astype(np.uint8 if top_label < 256 else np.uint16)),
            "json": json.dumps({"caption": f"caption {key}"}).encode(),
        }
        return {k: v for k, v in parts.items() if k != without}

    samples = [sample("l8", 5), sample("l16", 300), sample("nocond", 5, without="src.png"),
               sample("noseg", 5, without="seg.png"), sample("toohigh", 301), sample("l8b", 255)]
    images = Path(_write_tar(tmp_path / "images.tar", samples))
    ae = write_autoencoder(tmp_path / "ae.ckpt", seed=3)
    out = tmp_path / "latents"
    args = [str(ae), str(images), str(out), "--resolution", "16", "--batch-size", "2"]
    args += ["--caption-key", "json.caption"]
    assert main([*args, "--cond-image-key", "src.png", "--seg-key", "seg.png", "--num-classes", "301"]) == 0

    info = json.loads((out / "cache.json").read_text())
    assert (info["cond_image_key"], info["seg_key"], info["samples"]) == ("src.png", "seg.png", 3)
    assert info["skipped"] == {"no conditioning image": 1, "no segmentation map": 1, "label out of range": 1}
    stored = _members(out / "images.tar")
    assert sorted(stored) == ["l16", "l8", "l8b"]
    assert all(sorted(s) == ["cond_moments.npy", "json", "moments.npy", "seg.png"] for s in stored.values())
    modes = {key: Image.open(io.BytesIO(s["seg.png"])).mode for key, s in stored.items()}
    assert modes["l8"] == modes["l8b"] == "L" and modes["l16"] in ("I;16", "I")

    # what the loader serves from the cache is what it serves from the images, minus the encoder
    settings = dict(batch_size=3, resolution=16, shuffle_buffer=0, caption_key="json.caption",
                    seg_key="seg.png", num_classes=301)
    (from_images,) = _read_all(WebDataModule(str(images), cond_image_key="src.png", **settings))
    (cached,) = _read_all(WebDataModule(str(out), latents=True, cond_image_key="src.png", **settings))
    assert cached["key"] == from_images["key"] and cached["caption"] == from_images["caption"]
    assert cached["seg"].dtype == torch.int64 and torch.equal(cached["seg"], from_images["seg"])
    assert int(cached["seg"].max()) == 300
    vae = load_autoencoder(ae)
    with torch.no_grad():
        expected = vae.encode(from_images["cond_image"]).mean
    assert cached["cond_moments"].dtype == torch.float32
    assert cached["cond_moments"].shape == cached["moments"].shape
    torch.testing.assert_close(cached["cond_moments"][:, :4], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cached["cond_moments"], cached["moments"])

    assert main([*args, "--overwrite"]) == 0  # without the flags: no conditioning kept, none recorded
    info = json.loads((out / "cache.json").read_text())
    assert (info["cond_image_key"], info["seg_key"], info["samples"]) == (None, None, 6)
    assert all(sorted(s) == ["json", "moments.npy"] for s in _members(out / "images.tar").values())
    with pytest.raises(SystemExit):
        main([*args, "--overwrite", "--num-classes", "4"])  # filters maps it is not given


def test_cached_shards_without_their_conditioning_are_skipped_and_counted(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)

    def npy(shape: tuple[int, ...]) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, rng.standard_normal(shape).astype(np.float32))
        return buffer.getvalue()

    def sample(key: str, **parts: bytes | None) -> dict[str, str | bytes]:
        full = {"moments.npy": npy((8, 2, 2)), "cond_moments.npy": npy((8, 2, 2)),
                "seg.png": _png(rng.integers(0, 4, (16, 16)).astype(np.uint8)), **parts}
        return {"__key__": key, "txt": b"x", **{k: v for k, v in full.items() if v is not None}}

    shard = _write_tar(tmp_path / "latents.tar", [
        sample("good0"), sample("nocond", **{"cond_moments.npy": None}),
        sample("badcond", **{"cond_moments.npy": npy((8, 4, 4))}), sample("noseg", **{"seg.png": None}),
        sample("bigseg", **{"seg.png": _png(np.zeros((32, 32), np.uint8))}),
        sample("label4", **{"seg.png": _png(np.full((16, 16), 4, np.uint8))}), sample("good1"),
    ])
    dm = WebDataModule(shard, latents=True, batch_size=4, resolution=16, shuffle_buffer=0,
                       cond_image_key="src.jpg", seg_key="seg.png", num_classes=4)
    (batch,) = _read_all(dm)
    assert batch["key"] == ["good0", "good1"]
    assert batch["cond_moments"].shape == (2, 8, 2, 2) and batch["seg"].shape == (2, 16, 16)
    assert dm.skipped_samples == {
        "no cached conditioning latents": 1,
        "unreadable cached conditioning latents": 1,
        "no segmentation map": 1,
        "segmentation map of another size": 1,
        "label out of range": 1,
    }


def test_class_maps_no_png_can_hold_are_skipped_not_wrapped(tmp_path: Path) -> None:
    def tiff(labels: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(labels.astype(np.int32)).save(buffer, format="TIFF")  # mode I: 32-bit labels
        return buffer.getvalue()

    pixels = _png(np.zeros((16, 16, 3), np.uint8))
    samples = [{"__key__": key, "png": pixels, "seg.tif": tiff(np.full((16, 16), label)), "txt": b"x"}
               for key, label in (("fits", 65535), ("wraps", 65536))]
    images = _write_tar(tmp_path / "images.tar", samples)
    ae = write_autoencoder(tmp_path / "ae.ckpt", seed=3)
    info = cache_latents(ae, images, tmp_path / "latents", resolution=16, seg_key="seg.tif")
    assert info["samples"] == 1 and info["skipped"] == {"label above 65535": 1}
    (batch,) = _read_all(WebDataModule(str(tmp_path / "latents"), latents=True, resolution=16, seg_key="seg.tif"))
    assert batch["key"] == ["fits"] and int(batch["seg"].max()) == 65535

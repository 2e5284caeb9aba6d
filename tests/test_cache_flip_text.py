"""ldm-cache-latents --flip and --text, and training on them (data=cached_latents).

--flip: each sample's mirrored crop encoded (not its latents mirrored), drawn per sample with data.random_flip=true
as a picture's flip is drawn; --text: each caption's text-encoder output, so training runs no text encoder.
Tiny random models at 16 px: each test takes seconds."""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import pytest
import torch
from helpers import model_config, randomize_, tiny_sd_file
from PIL import Image
from test_cache_latents import _members
from test_data import _read_all, _write_tar
from test_train import _one_thread  # noqa: F401 (autouse fixture: one thread)

from ldm.checkpoint import checkpoint_from_model, save_checkpoint
from ldm.cli.train import ConfigError, check_cached_latents
from ldm.data.cache_latents import cache_latents, load_encoders, main
from ldm.data.webdataset import WebDataModule
from ldm.lightning.module import LatentDiffusion
from ldm.models.stable_diffusion import StableDiffusion

RES = 16
KEYS = {"cond_image_key": "src.png", "seg_key": "seg.png"}


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _images(path: Path, n: int = 8, seed: int = 0) -> str:
    """A shard of `n` wider-than-tall pictures (the centre crop cuts their sides), each with a before picture
    and a class map; captions of a few words, some repeated."""
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "circle", "square", "on", "a", "green", "background"]
    samples = [
        {
            "__key__": f"s{i:02d}",
            "png": _png(rng.integers(0, 255, (RES, RES + 8, 3), dtype=np.uint8)),
            "src.png": _png(rng.integers(0, 255, (RES, RES + 8, 3), dtype=np.uint8)),
            "seg.png": _png(rng.integers(0, 4, (RES, RES + 8)).astype(np.uint8)),
            "txt": " ".join(rng.choice(words, 1 + i % 5)).encode(),
        }
        for i in range(n)
    ]
    return _write_tar(path, samples)


def _npy(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data)))


def _moments(vae: Any, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        posterior = vae.encode(images)
    return torch.cat([posterior.mean, posterior.logvar], dim=1)


def _module(ckpt: Path, **kwargs: Any) -> LatentDiffusion:
    settings = {"caption_dropout": 0.0, "ema_decay": None, "optimizer": functools.partial(torch.optim.SGD, lr=0.1)}
    return LatentDiffusion(model=model_config("tiny"), init_from=str(ckpt), **{**settings, **kwargs})


# ---------------------------------------------------------------- --flip


@pytest.fixture
def flip_cache(tmp_path: Path) -> tuple[Path, str, Path]:
    """(checkpoint, image shard, latents cached with --flip through the CLI, before pictures and maps too)"""
    sd = tiny_sd_file(tmp_path / "sd.safetensors", seed=0)
    images = _images(tmp_path / "images.tar")
    out = tmp_path / "latents"
    args = [str(sd), images, str(out), "--resolution", str(RES), "--batch-size", "3", "--flip"]
    assert main([*args, "--cond-image-key", "src.png", "--seg-key", "seg.png"]) == 0
    return sd, images, out


def test_flip_stores_the_moments_of_the_mirrored_picture_not_mirrored_moments(flip_cache: tuple[Path, str, Path]) -> None:
    sd, images, out = flip_cache
    info = json.loads((out / "cache.json").read_text())
    assert info["flip"] is True and info["samples"] == 8
    stored = _members(out / "images.tar")
    # one class map per sample (mirrored as it is read), two of each moments
    assert all(sorted(s) == ["cond_moments.npy", "cond_moments_flip.npy", "moments.npy", "moments_flip.npy", "seg.png", "txt"]
               for s in stored.values())
    (plain,) = _read_all(WebDataModule(images, batch_size=8, resolution=RES, shuffle_buffer=0, **KEYS))
    vae, _ = load_encoders(sd)
    for name, pictures in (("moments", plain["image"]), ("cond_moments", plain["cond_image"])):
        cached = torch.stack([_npy(stored[key][f"{name}.npy"]) for key in plain["key"]])
        mirrored = torch.stack([_npy(stored[key][f"{name}_flip.npy"]) for key in plain["key"]])
        torch.testing.assert_close(cached, _moments(vae, pictures), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mirrored, _moments(vae, torch.flip(pictures, dims=[-1])), rtol=1e-5, atol=1e-6)
        # the autoencoder is not mirror-symmetric: mirroring the latents would have been wrong
        assert not torch.allclose(mirrored, torch.flip(cached, dims=[-1]), rtol=1e-3, atol=1e-3)


def _served(batches: list[dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
    return {key: {name: b[name][i] for name in ("moments", "cond_moments", "seg")}
            for b in batches for i, key in enumerate(b["key"])}


def test_random_flip_draws_plain_or_mirrored_moments_per_sample_as_images_draw_flips(
    flip_cache: tuple[Path, str, Path],
) -> None:
    sd, images, out = flip_cache
    stored = _members(out / "images.tar")
    settings = dict(batch_size=2, resolution=RES, shuffle_buffer=4, **KEYS)
    (plain_maps,) = _read_all(WebDataModule(str(out), latents=True, batch_size=8, resolution=RES, shuffle_buffer=0, **KEYS))
    maps = dict(zip(plain_maps["key"], plain_maps["seg"], strict=True))

    def flips(seed: int) -> dict[str, bool]:
        served = _served(_read_all(WebDataModule(str(out), latents=True, random_flip=True, seed=seed, **settings)))
        chosen = {}
        for key, sample in served.items():
            mirrored = torch.equal(sample["moments"], _npy(stored[key]["moments_flip.npy"]))
            assert mirrored or torch.equal(sample["moments"], _npy(stored[key]["moments.npy"]))
            # the before picture's moments and the class map go with their picture's
            assert torch.equal(sample["cond_moments"], _npy(stored[key]["cond_moments_flip.npy" if mirrored else "cond_moments.npy"]))
            assert torch.equal(sample["seg"], torch.flip(maps[key], dims=[-1]) if mirrored else maps[key])
            chosen[key] = mirrored
        return chosen

    first = flips(seed=0)
    assert len(first) == 8 and 0 < sum(first.values()) < 8, first  # both versions over a pass
    assert flips(seed=0) == first  # deterministic for a seed
    assert flips(seed=1) != first
    # the same draws as a run on the pictures with data.random_flip=true: the same steps, minus the encoder
    pictures = _read_all(WebDataModule(images, random_flip=True, seed=0, **settings))
    (plain,) = _read_all(WebDataModule(images, batch_size=8, resolution=RES, shuffle_buffer=0))
    unflipped = dict(zip(plain["key"], plain["image"], strict=True))
    for b in pictures:
        for key, image in zip(b["key"], b["image"], strict=True):
            assert torch.equal(image, torch.flip(unflipped[key], dims=[-1]) if first[key] else unflipped[key]), key


def test_random_flip_choices_replay_on_a_mid_epoch_resume(flip_cache: tuple[Path, str, Path]) -> None:
    _, _, out = flip_cache

    def data() -> WebDataModule:
        return WebDataModule(str(out), latents=True, random_flip=True, batch_size=2, resolution=RES, shuffle_buffer=4)

    full = _read_all(data())
    for cut in (1, 2):
        before = data()
        before.setup("fit")
        stream = iter(before.train_dataloader())
        for _ in range(cut):
            before.on_before_batch_transfer(next(stream), 0)
        next(stream)  # read ahead, as Lightning does: not trained on
        state = before.state_dict()
        stream.close()
        after = data()
        after.load_state_dict(state)
        rest = _read_all(after)
        assert [b["key"] for b in rest] == [b["key"] for b in full[cut:]]
        assert all(torch.equal(x["moments"], y["moments"]) for x, y in zip(rest, full[cut:], strict=True))


def test_random_flip_on_latents_cached_without_flip_is_refused(tmp_path: Path) -> None:
    sd = tiny_sd_file(tmp_path / "sd.safetensors", seed=0)
    images = _images(tmp_path / "images.tar", n=4)
    info = cache_latents(sd, images, tmp_path / "latents", resolution=RES, batch_size=4)
    assert info["flip"] is False
    module = _module(sd)

    def data(**kwargs: Any) -> WebDataModule:
        return WebDataModule(str(tmp_path / "latents"), latents=True, resolution=RES, **kwargs)

    with pytest.raises(ConfigError, match=r"cached without --flip.*re-run ldm-cache-latents with --flip, or set data.random_flip=false"):
        check_cached_latents(data(random_flip=True), module)
    check_cached_latents(data(random_flip=False), module)
    # past the check (no cache.json to check, say): no sample trains on a flip it does not have
    dm = data(random_flip=True)
    with pytest.raises(RuntimeError, match="no usable samples"):
        _read_all(dm)
    assert dm.skipped_samples == {"no cached mirrored latents": 4}


# ---------------------------------------------------------------- --text


class _Steps(lightning.Callback):
    """Each training step's loss and kept-captions mask, and how often the text encoder ran in those steps."""

    def __init__(self, module: LatentDiffusion) -> None:
        self.losses: list[torch.Tensor] = []
        self.keeps: list[torch.Tensor] = []
        self.text_calls = 0
        module.cond_stage_model.transformer.text_model.register_forward_pre_hook(self._count)
        kept = module._kept_captions

        def record(n: int, draw: torch.Tensor | None = None) -> torch.Tensor | None:
            keep = kept(n, draw)
            self.keeps.append(keep)
            return keep

        module._kept_captions = record

    def _count(self, *args: Any) -> None:
        self.text_calls += 1

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach().clone())


def _train_steps(tmp_path: Path, sd: Path, latents: Path, tag: str, steps: int = 2) -> tuple[_Steps, WebDataModule]:
    module = _module(sd, caption_dropout=0.5, seed=3)
    record = _Steps(module)
    dm = WebDataModule(str(latents), latents=True, batch_size=4, resolution=RES, shuffle_buffer=0, seed=0)
    trainer = lightning.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[record], default_root_dir=tmp_path / tag,
    )
    trainer.fit(module, datamodule=dm)
    return record, dm


def test_training_on_cached_text_takes_the_steps_the_text_encoder_takes_without_running_it(tmp_path: Path) -> None:
    sd = tiny_sd_file(tmp_path / "sd.safetensors", seed=0)
    images = _images(tmp_path / "images.tar")
    cache_latents(sd, images, tmp_path / "plain", resolution=RES, batch_size=4)
    assert main([str(sd), images, str(tmp_path / "text"), "--resolution", str(RES), "--batch-size", "4", "--text"]) == 0
    info = json.loads((tmp_path / "text" / "cache.json").read_text())
    assert info["text"]["empty_context"] == "empty_context.npy" and info["text"]["max_length"] == 77
    assert info["text"]["context_dim"] == 64 and len(info["text"]["text_encoder_fingerprint"]) == 64
    assert all("context.npy" in s for s in _members(tmp_path / "text" / "images.tar").values())

    encoded, _ = _train_steps(tmp_path, sd, tmp_path / "plain", "plain")
    cached, dm = _train_steps(tmp_path, sd, tmp_path / "text", "text")
    assert dm.text_contexts and dm.empty_context is not None and tuple(dm.empty_context.shape) == (77, 64)
    assert encoded.text_calls >= 2 and cached.text_calls == 0  # the text encoder never ran on the cached contexts
    keep = torch.cat(cached.keeps)
    assert keep.any() and not keep.all(), keep  # dropped rows (the cached empty prompt's context) and kept ones
    assert torch.equal(keep, torch.cat(encoded.keeps))
    assert len(cached.losses) == len(encoded.losses) == 2
    for a, b in zip(cached.losses, encoded.losses, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _sd_with_another_text_encoder(path: Path) -> Path:
    """tiny_sd_file(seed=0)'s UNet and autoencoder, another text encoder."""
    model = randomize_(StableDiffusion.from_config(model_config("tiny")), std=0.05, seed=0)
    randomize_(model.cond_stage_model, std=0.05, seed=9)
    save_checkpoint(checkpoint_from_model(model), path)
    return path


def test_cached_text_of_another_text_encoder_or_a_training_one_is_refused(tmp_path: Path) -> None:
    sd = tiny_sd_file(tmp_path / "sd.safetensors", seed=0)
    other = _sd_with_another_text_encoder(tmp_path / "other.safetensors")
    images = _images(tmp_path / "images.tar", n=4)
    cache_latents(sd, images, tmp_path / "text", resolution=RES, batch_size=4, text=True)
    cache_latents(sd, images, tmp_path / "plain", resolution=RES, batch_size=4)

    def data(folder: str, **kwargs: Any) -> WebDataModule:
        return WebDataModule(str(tmp_path / folder), latents=True, resolution=RES, **kwargs)

    check_cached_latents(data("text"), _module(sd))
    with pytest.raises(ConfigError, match=r"another text encoder .*re-run ldm-cache-latents --text .* or set data.cached_text=false"):
        check_cached_latents(data("text"), _module(other))  # the same autoencoder: only the text encoder differs
    check_cached_latents(data("text", cached_text=False), _module(other))  # the captions encoded instead
    trains = _module(sd, train_text_encoder=True)
    with pytest.raises(ConfigError, match=r"train_text_encoder=true trains the text encoder.*set data.cached_text=false"):
        check_cached_latents(data("text"), trains)
    check_cached_latents(data("text", cached_text=False), trains)
    with pytest.raises(ConfigError, match=r"data.cached_text=true .* re-run ldm-cache-latents with --text"):
        check_cached_latents(data("plain", cached_text=True), _module(sd))
    # a launcher other than train.py: the module says it at setup, before a step
    trainer = lightning.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, max_steps=1,
                                enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="trains the text encoder"):
        trainer.fit(trains, datamodule=data("text", batch_size=4))
    # an uncached run's batches get no contexts
    dm = data("plain")
    dm.setup("fit")
    assert not dm.text_contexts and dm.empty_context is None
    assert "context" not in _read_all(dm)[0]
    assert not dm.skipped_samples

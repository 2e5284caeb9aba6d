"""DreamBooth class images (issue 11, item 1): `ldm.dreambooth.class_images` makes N images of the class prompt
with the base model, image i from seed + i, into a cache folder keyed by the weights and settings; a second
call samples nothing, an interrupted or damaged set is finished by making only the missing images (the same
pixels as an uninterrupted run), and bad arguments stop with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import model_config, randomize_
from PIL import Image

from ldm import sampling
from ldm.checkpoint import checkpoint_from_model, load_model, save_checkpoint
from ldm.cli.sample import UsageError
from ldm.dreambooth import class_captions, class_images
from ldm.models.stable_diffusion import StableDiffusion

PROMPT = "a photo of a dog"
FAST = {"resolution": 32, "steps": 2, "guidance_scale": 5.0, "sampler": "ddim", "seed": 7, "batch_size": 2,
        "device": "cpu"}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_ckpt(path: Path, seed: int) -> Path:
    model = randomize_(StableDiffusion.from_config(model_config("tiny")), std=0.05, seed=seed)
    save_checkpoint(checkpoint_from_model(model), path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _write_ckpt(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", seed=0)


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory) -> Path:
    return _write_ckpt(tmp_path_factory.mktemp("ckpt") / "other.safetensors", seed=1)


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """The batch size of every sampling call class_images makes."""
    made: list[int] = []
    real = sampling.generate

    def counting(model, prompts, *args, **kwargs):
        made.append(len(prompts))
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(sampling, "generate", counting)
    return made


def pixels(paths: list[Path]) -> list[np.ndarray]:
    out = []
    for path in paths:
        with Image.open(path) as image:
            out.append(np.asarray(image.convert("RGB")).copy())
    return out


def test_makes_num_images_of_the_size_with_captions_and_manifest(ckpt: Path, tmp_path: Path, calls: list[int]) -> None:
    paths = class_images(ckpt, PROMPT, 3, tmp_path, **FAST)
    assert [p.name for p in paths] == ["00000.png", "00001.png", "00002.png"]
    folder = paths[0].parent
    assert folder.parent == tmp_path and folder.name.startswith("a-photo-of-a-dog-")
    assert calls == [2, 1]  # batches of batch_size, the last one short
    for path in paths:
        with Image.open(path) as image:
            assert image.size == (32, 32) and image.mode == "RGB"
            settings = json.loads(image.text["ldm"])
        assert settings["prompt"] == PROMPT and settings["seed"] == FAST["seed"] + int(path.stem)
    arrays = pixels(paths)
    assert all(a.std() > 0 for a in arrays)
    assert not np.array_equal(arrays[0], arrays[1])  # seed + i: each image its own noise
    assert class_captions(paths) == [PROMPT] * 3
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["key"]["class_prompt"] == PROMPT and manifest["key"]["steps"] == 2
    assert manifest["key"]["resolution"] == 32 and manifest["key"]["seed"] == 7
    assert [(m["file"], m["caption"], m["seed"]) for m in manifest["images"]] == [
        ("00000.png", PROMPT, 7), ("00001.png", PROMPT, 8), ("00002.png", PROMPT, 9)]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["manifest.json"] + [f"0000{i}.{ext}" for i in range(3) for ext in ("png", "txt")])  # no temp files


def test_a_second_call_samples_nothing(ckpt: Path, tmp_path: Path, calls: list[int], monkeypatch) -> None:
    first = class_images(ckpt, PROMPT, 3, tmp_path, **FAST)
    assert len(calls) == 2
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in first}
    import ldm.checkpoint

    def no_loading(*args, **kwargs):
        raise AssertionError("the base model was loaded though every class image is there")

    monkeypatch.setattr(ldm.checkpoint, "load_model", no_loading)
    again = class_images(ckpt, PROMPT, 3, tmp_path, **FAST)
    assert again == first
    assert len(calls) == 2  # no sampling call
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in again} == before
    fewer = class_images(ckpt, PROMPT, 2, tmp_path, **FAST)  # a subset is in the cache too
    assert fewer == first[:2] and len(calls) == 2


def test_an_interrupted_set_finishes_with_only_the_missing_images(
    ckpt: Path, tmp_path: Path, calls: list[int], monkeypatch
) -> None:
    whole = pixels(class_images(ckpt, PROMPT, 5, tmp_path / "whole", **FAST))
    calls.clear()

    counting = sampling.generate

    def dies_on_the_third_batch(model, prompts, *args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return counting(model, prompts, *args, **kwargs)

    monkeypatch.setattr(sampling, "generate", dies_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        class_images(ckpt, PROMPT, 5, tmp_path / "cut", **FAST)
    (folder,) = (tmp_path / "cut").iterdir()
    assert sorted(p.name for p in folder.glob("*.png")) == [f"0000{i}.png" for i in range(4)]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no half-written file left
    monkeypatch.setattr(sampling, "generate", counting)

    import ldm.dreambooth

    saved: list[str] = []
    real_save = ldm.dreambooth.save_png
    monkeypatch.setattr(ldm.dreambooth, "save_png", lambda image, path, info=None: (saved.append(path.name),
                                                                                   real_save(image, path, info)))
    calls.clear()
    paths = class_images(ckpt, PROMPT, 5, tmp_path / "cut", **FAST)
    assert calls == [1] and saved == ["00004.png"]  # only the last batch, of one image
    assert all(np.array_equal(a, b) for a, b in zip(pixels(paths), whole, strict=True))

    # Two images deleted and one cut short (as a crash mid-write without the rename would leave it):
    # their batches run again, only those three files are written, with the first run's pixels.
    paths[1].unlink()
    paths[3].unlink()
    data = paths[4].read_bytes()
    paths[4].write_bytes(data[: len(data) // 2])
    calls.clear()
    saved.clear()
    paths = class_images(ckpt, PROMPT, 5, tmp_path / "cut", **FAST)
    assert calls == [2, 2, 1] and saved == ["00001.png", "00003.png", "00004.png"]
    assert all(np.array_equal(a, b) for a, b in zip(pixels(paths), whole, strict=True))

    # Asking for more later writes only the new ones (indices 5 and 6: batches [4, 5] and [6], as an
    # uninterrupted run of 7 would batch them; image 4 is not written again).
    calls.clear()
    saved.clear()
    more = class_images(ckpt, PROMPT, 7, tmp_path / "cut", **FAST)
    assert calls == [2, 1] and saved == ["00005.png", "00006.png"] and more[:5] == paths
    assert len(json.loads((more[0].parent / "manifest.json").read_text())["images"]) == 7


def test_the_cache_folder_is_keyed_by_weights_prompt_and_settings(
    ckpt: Path, other_ckpt: Path, tmp_path: Path, calls: list[int]
) -> None:
    one = dict(FAST, batch_size=1)
    base = class_images(ckpt, PROMPT, 1, tmp_path, **one)[0].parent
    other_prompt = class_images(ckpt, "a photo of a cat", 1, tmp_path, **one)[0].parent
    other_base = class_images(other_ckpt, PROMPT, 1, tmp_path, **one)[0].parent
    other_steps = class_images(ckpt, PROMPT, 1, tmp_path, **dict(one, steps=3))[0].parent
    other_seed = class_images(ckpt, PROMPT, 1, tmp_path, **dict(one, seed=8))[0].parent
    folders = [base, other_prompt, other_base, other_steps, other_seed]
    assert len(set(folders)) == 5 and len(calls) == 5
    assert not np.array_equal(*pixels([base / "00000.png", other_base / "00000.png"]))

    # The key is the weights, not the file's name: a copy elsewhere finds the same images.
    copy = tmp_path / "copy" / "renamed.safetensors"
    copy.parent.mkdir()
    shutil.copyfile(ckpt, copy)
    assert class_images(copy, PROMPT, 1, tmp_path, **one)[0].parent == base and len(calls) == 5

    # A model object is keyed by its state dict: the same model finds its images, a changed weight does not.
    model = load_model(ckpt)
    from_model = class_images(model, PROMPT, 2, tmp_path, **one)
    assert len(calls) == 7 and from_model[0].parent not in folders
    assert np.array_equal(pixels(from_model[:1])[0], pixels([base / "00000.png"])[0])  # same weights, same image
    assert class_images(model, PROMPT, 2, tmp_path, **one) == from_model and len(calls) == 7
    with torch.no_grad():
        next(model.model.parameters()).add_(1e-3)
    assert class_images(model, PROMPT, 1, tmp_path, **one)[0].parent != from_model[0].parent and len(calls) == 8


@pytest.mark.parametrize(
    ("prompt", "num", "words"),
    [("", 3, "class_prompt is empty"), ("   ", 3, "class_prompt is empty"), (PROMPT, 0, "num_images must be at least 1"),
     (PROMPT, -2, "num_images must be at least 1")],
)
def test_bad_arguments_stop_with_one_line(ckpt: Path, tmp_path: Path, calls: list[int], prompt, num, words) -> None:
    with pytest.raises(UsageError, match=words) as err:
        class_images(ckpt, prompt, num, tmp_path / "cache", **FAST)
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)
    assert calls == [] and not (tmp_path / "cache").exists()

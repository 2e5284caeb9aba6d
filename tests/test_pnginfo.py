"""PNG metadata: AUTOMATIC1111's `parameters` infotext (its format, read by its rules) and our `ldm` JSON
chunk, which `sample.py from_png=IMAGE` replays to the same pixels."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file
from test_lora import model_with_lora
from test_sample import ROOT, sample_config, write_model

from ldm.checkpoint import checkpoint_from_model, save_checkpoint
from ldm.cli.sample import UsageError, run
from ldm.lora import save_kohya
from ldm.pnginfo import (
    a1111_parameters,
    a1111_text,
    lora_hash,
    model_hash,
    parse_a1111_parameters,
    settings_from_a1111,
)

# Commas, apostrophes, A1111 emphasis and alternation, double quotes, colons, a newline.
TRICKY_PROMPT = 'a "castle", (on a hill:1.2), it\'s [day|night]\nsecond line: more, words'
TRICKY_NEGATIVE = 'blurry, (low quality:1.4), "text"\nwatermark: [a|b]'

# As AUTOMATIC1111 1.6 writes it (SD 1.5's own file hash), with a quoted value.
A1111_TEXT = (
    "masterpiece, (a castle:1.2), [red|blue] sky\n"
    "on a hill\n"
    "Negative prompt: lowres, bad anatomy\n"
    "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, "
    'Model: v1-5-pruned-emaonly, Clip skip: 2, Lora hashes: "style: 0123456789ab, other: ba9876543210", '
    "Version: v1.6.0"
)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def saved(path: Path) -> dict:
    return json.loads(Image.open(path).text["ldm"])


def config(overrides: list[str], **values):
    """A composed sample config with `values` set directly (text no command line has to carry)."""
    cfg = sample_config(overrides)
    with open_dict(cfg):
        for key, value in values.items():
            cfg[key] = value
    return cfg


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_reads_automatic1111_infotext():
    params = parse_a1111_parameters(A1111_TEXT)
    assert params["Prompt"] == "masterpiece, (a castle:1.2), [red|blue] sky\non a hill"
    assert params["Negative prompt"] == "lowres, bad anatomy"
    assert params["Lora hashes"] == "style: 0123456789ab, other: ba9876543210"
    assert (params["Size-1"], params["Size-2"], params["Model hash"]) == ("512", "768", "6ce0161689")
    ours = settings_from_a1111(params)
    assert ours["sampler"] == {"name": "dpmpp_2m", "karras": True}
    assert (ours["steps"], ours["guidance_scale"], ours["seed"]) == (20, 7.0, 1234)
    assert (ours["width"], ours["height"]) == (512, 768)
    assert ours["ignored"] == ["Clip skip"]
    # A1111 1.9+ spells the schedule apart; no key-value line at all: all of it is the prompt.
    newer = A1111_TEXT.replace("DPM++ 2M Karras", "DPM++ 2M, Schedule type: Karras")
    assert settings_from_a1111(parse_a1111_parameters(newer))["sampler"] == {"name": "dpmpp_2m", "karras": True}
    assert parse_a1111_parameters("just, a prompt") == {"Prompt": "just, a prompt", "Negative prompt": ""}


def test_writes_automatic1111_format():
    settings = {
        "prompt": "a cat", "negative_prompt": "blurry", "ckpt": "/models/sd15.safetensors",
        "model_hash": "0123456789", "sampler": {"name": "ddim", "eta": 0.5}, "steps": 50, "guidance_scale": 7.5,
        "seed": 42, "height": 512, "width": 768, "strength": 0.6, "concat": None, "image_guidance_scale": 1.5,
        "lora": ["/l/style.safetensors", "/l/b,c.safetensors"], "lora_hashes": ["0123456789ab", "ba9876543210"],
    }
    assert a1111_text(settings) == (
        "a cat\nNegative prompt: blurry\n"
        "Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 768x512, Model hash: 0123456789, Model: sd15, "
        'Denoising strength: 0.6, Eta DDIM: 0.5, Lora hashes: "style: 0123456789ab, bc: ba9876543210"'
    )
    edit = {**settings, "negative_prompt": "", "concat": "image", "strength": None, "lora": None, "model_hash": None,
            "sampler": {"name": "euler", "karras": True}, "ckpt": "/models/my, model"}
    assert a1111_text(edit) == (
        "a cat\nSteps: 50, Sampler: Euler, Schedule type: Karras, CFG scale: 7.5, Image CFG scale: 1.5, Seed: 42, "
        'Size: 768x512, Model: "my, model"'
    )


@pytest.mark.parametrize("prompt", ["a castle, on a hill", TRICKY_PROMPT, '"quoted" (x:1.2) [a|b], y'])
@pytest.mark.parametrize("negative", ["", TRICKY_NEGATIVE])
def test_infotext_round_trips_by_a1111_rules(prompt, negative):
    fields = {"Steps": 25, "Sampler": "DPM++ 2M Karras", "CFG scale": 5.5, "Seed": 7, "Size": "64x32",
              "Model": 'odd, "name": x'}
    params = parse_a1111_parameters(a1111_parameters(prompt, negative, fields))
    assert (params["Prompt"], params["Negative prompt"]) == (prompt, negative)
    assert (params["Steps"], params["Sampler"], params["CFG scale"], params["Seed"]) == ("25", "DPM++ 2M Karras", "5.5", "7")
    assert (params["Size-1"], params["Size-2"], params["Model"]) == ("64", "32", 'odd, "name": x')


def test_png_carries_both_and_from_png_gives_the_second_image_again(tmp_path):
    folder = write_model(tmp_path, "tiny")  # a diffusers folder: no single file, so no Model hash
    base = ["steps=3", "height=32", "width=64", "num_images=2", "seed=5", "guidance_scale=6.5", "device=cpu"]
    first = run(config([f"ckpt={folder}", *base, f"out_dir={tmp_path / 'a'}"],
                       prompt=TRICKY_PROMPT, negative_prompt=TRICKY_NEGATIVE))
    assert [p.name for p in first] == ["00000.png", "00001.png", "grid-00000.png"]
    params = parse_a1111_parameters(Image.open(first[1]).text["parameters"])
    assert (params["Prompt"], params["Negative prompt"]) == (TRICKY_PROMPT, TRICKY_NEGATIVE)
    assert (params["Steps"], params["Sampler"], params["CFG scale"], params["Seed"]) == ("3", "DDIM", "6.5", "5")
    assert (params["Size-1"], params["Size-2"]) == ("64", "32")
    assert params["Model"] == folder.name and "Model hash" not in params
    ours = saved(first[1])
    assert ours["ckpt"] == str(folder) and ours["image_index"] == 1 and ours["num_images"] == ours["batch_size"] == 2
    assert "image_index" not in saved(first[2]), "the grid stands for the whole batch"
    assert pixels(first[0]).std() > 5 and not np.array_equal(pixels(first[0]), pixels(first[1]))

    again = run(sample_config([f"from_png={first[1]}", f"out_dir={tmp_path / 'b'}", "device=cpu"]))
    assert len(again) == 1 and np.array_equal(pixels(again[0]), pixels(first[1]))
    assert Image.open(again[0]).text == Image.open(first[1]).text
    whole = run(sample_config([f"from_png={first[2]}", f"out_dir={tmp_path / 'c'}", "device=cpu"]))
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(whole, first, strict=True))


def test_from_png_ancestral_one_per_pass_and_overrides_win(tmp_path):
    single = write_model(tmp_path, "tiny", seed=2, fmt="single")
    base = ["sampler=euler_a", "steps=3", "height=32", "width=32", "num_images=2", "batch_size=1", "device=cpu"]
    first = run(sample_config([f"ckpt={single}", "prompt='a red cat, sitting'", *base, f"out_dir={tmp_path / 'a'}"]))
    params = parse_a1111_parameters(Image.open(first[1]).text["parameters"])
    assert params["Model hash"] == hashlib.sha256(single.read_bytes()).hexdigest()[:10] == model_hash(single)
    assert (params["Model"], params["Sampler"]) == ("tiny", "Euler a")

    again = run(sample_config([f"from_png={first[1]}", f"out_dir={tmp_path / 'b'}", "device=cpu"]))
    assert np.array_equal(pixels(again[0]), pixels(first[1]))
    # seed= on the command line wins; everything else still comes from the image
    reseeded = run(sample_config([f"from_png={first[1]}", "seed=7", f"out_dir={tmp_path / 'c'}", "device=cpu"]))
    direct = run(sample_config([f"ckpt={single}", "prompt='a red cat, sitting'", *base, "seed=7",
                                f"out_dir={tmp_path / 'd'}"]))
    assert saved(reseeded[0])["seed"] == 7
    assert np.array_equal(pixels(reseeded[0]), pixels(direct[1]))
    assert not np.array_equal(pixels(reseeded[0]), pixels(first[1]))


def test_from_png_reapplies_loras(tmp_path):
    model, lora = model_with_lora(1)
    lora.detach()
    lora_file = tmp_path / "style.safetensors"
    save_kohya(lora, model.config["unet"], lora_file)
    ckpt = tmp_path / "base"
    save_checkpoint(checkpoint_from_model(model), ckpt)
    common = ["prompt=a dog", "steps=2", "height=32", "width=32", "device=cpu"]
    first = run(sample_config([f"ckpt={ckpt}", *common, f"lora={lora_file}", "lora_scale=0.7", f"out_dir={tmp_path / 'a'}"]))
    text = Image.open(first[0]).text
    assert f'Lora hashes: "style: {lora_hash(lora_file)}"' in text["parameters"]
    assert (saved(first[0])["lora"], saved(first[0])["lora_scale"]) == ([str(lora_file)], [0.7])
    again = run(sample_config([f"from_png={first[0]}", f"out_dir={tmp_path / 'b'}", "device=cpu"]))
    plain = run(sample_config([f"ckpt={ckpt}", *common, f"out_dir={tmp_path / 'c'}"]))
    assert np.array_equal(pixels(again[0]), pixels(first[0]))
    assert not np.array_equal(pixels(plain[0]), pixels(first[0])), "the LoRA changes the image"


def test_lora_hash_is_a1111s_and_a_folder_has_no_model_hash(tmp_path):
    path = tmp_path / "l.safetensors"
    save_file({"w": torch.arange(6.0)}, str(path), metadata={"ss_note": "changes the header only"})
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    assert lora_hash(path) == hashlib.sha256(data[header:]).hexdigest()[:12]
    assert model_hash(tmp_path) is None


def test_checkpoint_hashes_are_read_once_and_cached_on_disk(tmp_path, monkeypatch):
    """A 4-15 GB checkpoint is hashed once: later runs (new processes) read the hash from the disk cache,
    until the file changes."""
    from ldm import pnginfo

    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"weights" * 1000)
    first = model_hash(ckpt)
    assert first == hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10]
    assert (tmp_path / "cache" / "hashes.json").is_file()
    monkeypatch.setattr(pnginfo, "_HASHES", {})  # as a new process
    monkeypatch.setattr(pnginfo.hashlib, "sha256", lambda: (_ for _ in ()).throw(AssertionError("read again")))
    assert model_hash(ckpt) == first
    monkeypatch.undo()
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    ckpt.write_bytes(b"other weights" * 1000)  # another size: another identity
    assert model_hash(ckpt) == hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10] != first
    # an unwritable cache costs a read, not the run
    monkeypatch.setenv("LDM_CACHE_DIR", str(ckpt))  # a file, not a folder
    monkeypatch.setattr(pnginfo, "_HASHES", {})
    assert model_hash(ckpt) == hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10]


def test_a1111_parameters_alone_need_ckpt(tmp_path):
    single = write_model(tmp_path, "tiny", fmt="single")
    png = tmp_path / "a1111.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a castle\nNegative prompt: fog\nSteps: 2, Sampler: Euler, CFG scale: 4, "
                                "Seed: 9, Size: 64x32, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly")
    Image.new("RGB", (64, 32)).save(png, pnginfo=info)
    with pytest.raises(UsageError, match=r"name the model \('v1-5-pruned-emaonly', hash 6ce0161689\).*give ckpt=PATH"):
        run(sample_config([f"from_png={png}", f"out_dir={tmp_path / 'o'}"]))
    out = run(sample_config([f"from_png={png}", f"ckpt={single}", f"out_dir={tmp_path / 'o'}", "device=cpu"]))
    ours = saved(out[0])
    assert (ours["prompt"], ours["negative_prompt"], ours["steps"], ours["guidance_scale"]) == ("a castle", "fog", 2, 4.0)
    assert (ours["sampler"], ours["seed"], ours["width"], ours["height"]) == ({"name": "euler"}, 9, 64, 32)
    with pytest.raises(UsageError, match="give ckpt=PATH"):
        run(sample_config(["prompt=x"]))
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "x\nSteps: 2, Sampler: DPM++ SDE Karras, CFG scale: 4, Seed: 9, Size: 64x32")
    Image.new("RGB", (64, 32)).save(png, pnginfo=info)
    with pytest.raises(UsageError, match="'DPM\\+\\+ SDE Karras' has no counterpart here: give sampler=NAME"):
        run(sample_config([f"from_png={png}", f"ckpt={single}"]))


def test_cli_sample_then_from_png_elsewhere_gives_the_same_pixels(tmp_path):
    write_model(tmp_path, "tiny", seed=4, fmt="single")
    cmd = [sys.executable, str(ROOT / "sample.py")]
    made = subprocess.run([*cmd, "ckpt=tiny.safetensors", "prompt='a castle, on a hill'", "steps=2", "height=32",
                           "width=32", "device=cpu"], capture_output=True, text=True, cwd=tmp_path, env=env())
    assert made.returncode == 0, made.stderr
    image = tmp_path / "outputs" / "samples" / "00000.png"
    params = parse_a1111_parameters(Image.open(image).text["parameters"])
    assert (params["Prompt"], params["Model"], params["Steps"]) == ("a castle, on a hill", "tiny", "2")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = subprocess.run([*cmd, f"from_png={image}", "device=cpu"], capture_output=True, text=True,
                           cwd=elsewhere, env=env())
    assert again.returncode == 0, again.stderr
    assert np.array_equal(pixels(elsewhere / "outputs" / "samples" / "00000.png"), pixels(image))


def test_missing_or_foreign_png_is_one_line(tmp_path):
    foreign = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(foreign)
    for png, message in ((tmp_path / "nope.png", "does not exist"), (foreign, "holds no generation settings")):
        proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"from_png={png}"],
                              capture_output=True, text=True, cwd=tmp_path, env=env())
        assert proc.returncode != 0
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr

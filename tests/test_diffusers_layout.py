"""Diffusers folders we write have the published layout: the same tensor names and shapes as the hub's SD 1.5
folder (the text encoder's `text_model.*` level included), load in transformers and diffusers, and convert
back to the LDM file bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import model_config, randomize_
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.checkpoint import checkpoint_from_model, read_checkpoint, save_checkpoint
from ldm.convert import main as convert_main
from ldm.models.stable_diffusion import StableDiffusion

REFERENCE = Path(__file__).resolve().parent / "data/diffusers-layout/sd15_folder.json"
WEIGHTS = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
POSITION_IDS = CLIP_PREFIX + "embeddings.position_ids"


def shapes(path: Path) -> dict[str, list[int]]:
    with safe_open(str(path), "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def layout_differences(ours: dict, published: dict) -> list[str]:
    """Names only one side has, and shared names whose shapes differ (empty when the layouts agree)."""
    diffs = [f"only ours: {k} {ours[k]}" for k in sorted(ours.keys() - published.keys())]
    diffs += [f"only published: {k} {published[k]}" for k in sorted(published.keys() - ours.keys())]
    diffs += [
        f"shape of {k}: ours {ours[k]}, published {published[k]}"
        for k in sorted(ours.keys() & published.keys())
        if list(ours[k]) != list(published[k])
    ]
    return diffs


def assert_files_bit_identical(a: Path, b: Path) -> None:
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        for key in fa.keys():
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            assert x.dtype == y.dtype and torch.equal(x, y), key


def assert_text_encoder_loads_in_transformers(text_dir: Path) -> CLIPTextModel:
    model, info = CLIPTextModel.from_pretrained(str(text_dir), output_loading_info=True)
    assert {k: list(v) for k, v in info.items() if v} == {}, info  # missing, unexpected, mismatched, errors
    return model


def original_sd_file(model: StableDiffusion, path: Path) -> None:
    """As released SD files are: tensors only (the architecture is read off the shapes), with CLIP's
    position ids beside the weights."""
    save_checkpoint(checkpoint_from_model(model), path)
    sd = load_file(str(path))
    if model.config["cond_stage"]["kind"] == "clip":
        sd[POSITION_IDS] = torch.arange(77)[None]
    save_file(sd, str(path))


@torch.no_grad()
def test_sd15_folder_has_the_published_layout_loads_and_converts_back(tmp_path):
    """Full size in fp16 (about 2 GB a copy): file -> folder -> file."""
    diffusers = pytest.importorskip("diffusers")
    published = json.loads(REFERENCE.read_text())["tensors"]
    src, folder, back = (
        tmp_path / "sd15.safetensors",
        tmp_path / "sd15-diffusers",
        tmp_path / "back.safetensors",
    )
    model = randomize_(StableDiffusion.from_config(model_config("sd15")), seed=3).half()
    original_sd_file(model, src)
    del model
    assert convert_main([str(src), str(folder)]) == 0
    diffs = {c: layout_differences(shapes(folder / w), published[c]) for c, w in WEIGHTS.items()}
    assert diffs == {c: [] for c in WEIGHTS}

    with safe_open(str(src), "pt") as f:
        ours = {k.removeprefix(CLIP_PREFIX): f.get_tensor(k) for k in f.keys() if k.startswith(CLIP_PREFIX)}
    text = assert_text_encoder_loads_in_transformers(folder / "text_encoder")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        str(folder), safety_checker=None, local_files_only=True
    )
    assert pipe.unet.config.cross_attention_dim == 768 and pipe.text_encoder.config.num_hidden_layers == 12
    for loaded in (text, pipe.text_encoder):  # transformers 5's own names: no `text_model.`
        weights = {k: v for k, v in loaded.state_dict().items() if k != "embeddings.position_ids"}
        assert weights.keys() == ours.keys() - {"embeddings.position_ids"}
        assert all(torch.equal(v.to(ours[k].dtype), ours[k]) for k, v in weights.items())
    del text, pipe

    assert convert_main([str(folder), str(back)]) == 0
    shutil.rmtree(folder)
    assert_files_bit_identical(src, back)
    src.unlink()  # 2 GB each; a failed test's files are kept (tmp_path_retention_policy)
    back.unlink()


def tiny_config(kind: str) -> dict:
    cfg = model_config("tiny")
    if kind == "openclip":  # SD 2.x's structure: OpenCLIP tower (penultimate layer), linear projections
        cfg["unet"].update(num_heads=-1, num_head_channels=32, use_linear_in_transformer=True)
        cfg["cond_stage"] = {"kind": "openclip", "width": 64, "heads": 1, "layers": 3, "layer": "penultimate"}
    return cfg


@pytest.mark.parametrize("kind", ["clip", "openclip"])
@torch.no_grad()
def test_tiny_text_encoder_has_text_model_names_and_round_trips(tmp_path, kind):
    """SD 1 (CLIP) and SD 2 (OpenCLIP) structure: `text_model.*` names, exactly those transformers' CLIPTextModel
    has; the folder converts back bit for bit, and a folder written with transformers 5's flattened names
    (as this project did before) still reads as the same model."""
    src, folder = tmp_path / "src.safetensors", tmp_path / "pipe"
    model = randomize_(StableDiffusion.from_config(tiny_config(kind)), seed=1)
    original_sd_file(model, src)
    assert convert_main([str(src), str(folder)]) == 0

    names = shapes(folder / WEIGHTS["text_encoder"])
    config = CLIPTextConfig.from_pretrained(str(folder / "text_encoder"))
    expected = {
        "text_model." + k: list(v.shape)
        for k, v in CLIPTextModel(config).state_dict().items()
        if k != "embeddings.position_ids"
    }
    assert layout_differences(names, expected) == []
    if kind == "openclip":  # diffusers stops at SD 2's penultimate block
        assert config.num_hidden_layers == 2
    assert_text_encoder_loads_in_transformers(folder / "text_encoder")
    pytest.importorskip("diffusers").StableDiffusionPipeline.from_pretrained(
        str(folder), safety_checker=None, local_files_only=True
    )
    assert convert_main([str(folder), str(tmp_path / "back.safetensors")]) == 0
    assert_files_bit_identical(src, tmp_path / "back.safetensors")

    weights = folder / WEIGHTS["text_encoder"]
    save_file({k.removeprefix("text_model."): v for k, v in load_file(str(weights)).items()}, str(weights))
    assert not any(k.startswith("text_model.") for k in shapes(weights))
    assert convert_main([str(folder), str(tmp_path / "flat.safetensors")]) == 0
    assert_files_bit_identical(src, tmp_path / "flat.safetensors")
    assert read_checkpoint(folder).config["cond_stage"] == read_checkpoint(src).config["cond_stage"]


def test_layout_and_bit_checks_catch_a_renamed_reshaped_or_nudged_tensor(tmp_path):
    """Controls for the checks above: a tensor renamed or reshaped shows in the layout comparison, and
    one value one float step off fails the bit-for-bit comparison."""
    src = tmp_path / "src.safetensors"
    original_sd_file(randomize_(StableDiffusion.from_config(tiny_config("clip")), seed=1), src)
    published = shapes(src)
    key = CLIP_PREFIX + "final_layer_norm.weight"
    renamed = {(k + "_renamed" if k == key else k): v for k, v in published.items()}
    assert layout_differences(renamed, published) == [
        f"only ours: {key}_renamed {published[key]}", f"only published: {key} {published[key]}"
    ]
    reshaped = {**published, key: [published[key][0] + 1]}
    assert layout_differences(reshaped, published) == [
        f"shape of {key}: ours {reshaped[key]}, published {published[key]}"
    ]
    nudged = load_file(str(src))
    nudged[key] = nudged[key].clone()
    nudged[key][0] = torch.nextafter(nudged[key][0], torch.tensor(float("inf")))
    save_file(nudged, str(tmp_path / "nudged.safetensors"))
    with pytest.raises(AssertionError, match=key):
        assert_files_bit_identical(src, tmp_path / "nudged.safetensors")

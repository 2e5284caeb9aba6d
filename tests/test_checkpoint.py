"""Every checkpoint format in and out: architecture read from the files, tensors unchanged, bad files refused."""

from __future__ import annotations

import json
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch
from helpers import model_config, randomize_
from safetensors.torch import load_file, save_file

from ldm.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_from_model,
    ema_key_for,
    read_checkpoint,
    save_checkpoint,
)
from ldm.convert import main as convert_main
from ldm.models.stable_diffusion import StableDiffusion


def tiny_checkpoint(name: str = "tiny", seed: int = 0, ema: bool = False) -> Checkpoint:
    return tiny_checkpoint_from(model_config(name), seed, ema)


def tiny_checkpoint_from(config: dict, seed: int = 0, ema: bool = False) -> Checkpoint:
    model = randomize_(StableDiffusion.from_config(config), seed=seed)
    ckpt = checkpoint_from_model(model)
    if ema:
        gen = torch.Generator().manual_seed(seed + 1)
        for key in [k for k in ckpt.state_dict if k.startswith("model.diffusion_model.")]:
            ckpt.state_dict[ema_key_for(key)] = torch.randn(ckpt.state_dict[key].shape, generator=gen)
        ckpt.state_dict["model_ema.decay"] = torch.tensor(0.9999)
        ckpt.state_dict["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int32)
    return ckpt


def strip_metadata(path: Path) -> None:
    """Rewrite a .safetensors file as an original SD file would be: tensors only, no config."""
    save_file(load_file(str(path)), str(path))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_ldm_file_architecture_is_read_from_tensor_shapes(tmp_path, name):
    ckpt = tiny_checkpoint(name)
    path = tmp_path / "model.safetensors"
    save_checkpoint(ckpt, path)
    strip_metadata(path)
    back = read_checkpoint(path)
    assert back.config["unet"]["channel_mult"] == ckpt.config["unet"]["channel_mult"]
    assert back.config["first_stage"]["ddconfig"]["ch_mult"] == ckpt.config["first_stage"]["ddconfig"]["ch_mult"]
    assert back.config["cond_stage"]["kind"] == "clip"
    model = back.build_model()
    assert_same_tensors(dict(model.state_dict()), ckpt.state_dict)


def test_ldm_to_diffusers_to_ldm_is_bit_identical(tmp_path):
    ckpt = tiny_checkpoint()
    src = tmp_path / "src.safetensors"
    save_checkpoint(ckpt, src)
    strip_metadata(src)
    assert convert_main([str(src), str(tmp_path / "diffusers")]) == 0
    assert convert_main([str(tmp_path / "diffusers"), str(tmp_path / "back.safetensors")]) == 0
    assert_same_tensors(load_file(str(tmp_path / "back.safetensors")), load_file(str(src)))


def original_style_file(path: Path, ckpt: Checkpoint) -> None:
    """As released SD files are: schedule buffers and position ids beside the weights, no config."""
    sd = dict(ckpt.state_dict)
    sd["betas"] = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64).pow(2).float()
    sd["alphas_cumprod"] = torch.cumprod(1 - sd["betas"], 0)
    if ckpt.config["cond_stage"]["kind"] == "clip":
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, str(path))


@pytest.mark.parametrize("kind", ["clip", "openclip"])
def test_original_file_round_trips_through_diffusers_with_every_tensor(tmp_path, kind):
    """SD 1 and SD 2 layouts, EMA included: LDM -> diffusers -> LDM gives back every tensor, bit for bit,
    although diffusers has no place for SD 2's last text block, the schedule buffers or the EMA counters."""
    ckpt = tiny_checkpoint(ema=True)
    if kind == "openclip":
        cfg = dict(ckpt.config, cond_stage={"kind": "openclip", "width": 64, "heads": 1, "layers": 3})
        ckpt = tiny_checkpoint_from(cfg, ema=True)
    src = tmp_path / "orig.safetensors"
    original_style_file(src, ckpt)
    assert convert_main([str(src), str(tmp_path / "pipe")]) == 0
    assert (tmp_path / "pipe" / "unet_ema" / "diffusion_pytorch_model.safetensors").is_file()
    assert convert_main([str(tmp_path / "pipe"), str(tmp_path / "back.safetensors")]) == 0
    assert_same_tensors(load_file(str(tmp_path / "back.safetensors")), load_file(str(src)))
    folder = read_checkpoint(tmp_path / "pipe")
    assert folder.config["cond_stage"] == read_checkpoint(src).config["cond_stage"]
    folder.build_model()
    diffusers = pytest.importorskip("diffusers")
    diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), safety_checker=None)


def test_ckpt_output_and_fp16(tmp_path):
    ckpt = tiny_checkpoint()
    save_checkpoint(ckpt, tmp_path / "model.ckpt", dtype=torch.float16)
    back = read_checkpoint(tmp_path / "model.ckpt")
    assert all(v.dtype == torch.float16 for v in back.state_dict.values() if v.is_floating_point())
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(back.state_dict[key], ckpt.state_dict[key].half())


def test_diffusers_folder_loads_in_diffusers_and_its_single_file_converter(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    ckpt = tiny_checkpoint()
    save_checkpoint(ckpt, tmp_path / "pipe")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), safety_checker=None)
    assert pipe.unet.config.cross_attention_dim == 64

    assert convert_main([str(tmp_path / "pipe"), str(tmp_path / "single.safetensors")]) == 0
    single = load_file(str(tmp_path / "single.safetensors"))
    unet_sd = convert_ldm_unet_checkpoint(single, dict(pipe.unet.config))
    missing, unexpected = pipe.unet.load_state_dict(unet_sd, strict=False)
    assert not missing and not unexpected
    vae_sd = convert_ldm_vae_checkpoint(single, dict(pipe.vae.config))
    missing, unexpected = pipe.vae.load_state_dict(vae_sd, strict=False)
    assert not missing and not unexpected


def test_ema_weights_are_chosen_on_request(tmp_path):
    ckpt = tiny_checkpoint(ema=True)
    save_checkpoint(ckpt, tmp_path / "ema.safetensors")
    assert convert_main([str(tmp_path / "ema.safetensors"), str(tmp_path / "out.safetensors"), "--ema"]) == 0
    out = load_file(str(tmp_path / "out.safetensors"))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(out[key], ckpt.state_dict[ema_key_for(key)])
    assert not any(k.startswith("model_ema.") for k in out)
    kept = read_checkpoint(tmp_path / "ema.safetensors")
    assert kept.has_ema()


def test_original_extras_are_dropped_by_name_and_unknown_keys_are_listed(tmp_path):
    ckpt = tiny_checkpoint()
    sd = dict(ckpt.state_dict)
    sd["alphas_cumprod"] = torch.rand(1000)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, str(tmp_path / "orig.safetensors"))
    back = read_checkpoint(tmp_path / "orig.safetensors")
    assert "alphas_cumprod" in back.extras
    back.build_model()

    sd["some_adapter.weight"] = torch.zeros(3)
    save_file(sd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointError, match="some_adapter.weight"):
        read_checkpoint(tmp_path / "odd.safetensors")


def test_missing_weights_are_listed(tmp_path):
    ckpt = tiny_checkpoint()
    sd = {k: v for k, v in ckpt.state_dict.items() if "middle_block.1" not in k}
    save_checkpoint(Checkpoint(ckpt.config, sd), tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="missing keys: model.diffusion_model.middle_block.1"):
        read_checkpoint(tmp_path / "cut.safetensors").build_model()


def test_not_a_stable_diffusion_file(tmp_path):
    save_file({"encoder.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a Stable Diffusion checkpoint"):
        read_checkpoint(tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "absent.ckpt")


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "executed"))


def test_malicious_ckpt_is_refused_and_not_executed(tmp_path, capsys):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.ckpt"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": {"model.diffusion_model.x": _Payload(marker)}}, f)
    with pytest.raises(CheckpointError, match="allow_unsafe_pickle"):
        read_checkpoint(bad)
    assert convert_main([str(bad), str(tmp_path / "out.safetensors")]) == 2
    assert "refused to unpickle" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_prediction_type_override_and_scheduler_config(tmp_path):
    ckpt = tiny_checkpoint()
    save_checkpoint(ckpt, tmp_path / "m.safetensors")
    assert read_checkpoint(tmp_path / "m.safetensors").config["prediction_type"] == "epsilon"
    # Our file records epsilon: a contradicting choice is refused, naming the way to force it.
    with pytest.raises(CheckpointError, match="records epsilon.*force_prediction_type=true"):
        read_checkpoint(tmp_path / "m.safetensors", prediction_type="v_prediction")
    v = read_checkpoint(tmp_path / "m.safetensors", prediction_type="v_prediction", force_prediction_type=True)
    assert "forced" in v.prediction_type_note
    save_checkpoint(v, tmp_path / "pipe")
    sched = json.loads((tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    assert read_checkpoint(tmp_path / "pipe").config["prediction_type"] == "v_prediction"
    # A bare LDM file records nothing: the explicit choice, else the default, applies.
    strip_metadata(tmp_path / "m.safetensors")
    assert read_checkpoint(tmp_path / "m.safetensors", prediction_type="v_prediction").config["prediction_type"] == "v_prediction"
    assert read_checkpoint(tmp_path / "m.safetensors").config["prediction_type"] == "epsilon"
    with pytest.raises(ValueError, match="prediction_type"):
        read_checkpoint(tmp_path / "m.safetensors", prediction_type="x0")


def test_convert_refuses_to_overwrite_a_folder(tmp_path):
    ckpt = tiny_checkpoint()
    save_checkpoint(ckpt, tmp_path / "m.safetensors")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "keep.txt").write_text("mine")
    assert convert_main([str(tmp_path / "m.safetensors"), str(tmp_path / "pipe")]) == 2
    assert (tmp_path / "pipe" / "keep.txt").read_text() == "mine"


def test_written_files_and_folders_get_the_usual_permissions(tmp_path):
    """Under umask 022 what we write is 0644 (folders 0755), as any new file: not mkstemp's 0600."""
    old = os.umask(0o022)
    try:
        ckpt = tiny_checkpoint()
        save_checkpoint(ckpt, tmp_path / "m.safetensors")
        save_checkpoint(ckpt, tmp_path / "m.ckpt")
        save_checkpoint(ckpt, tmp_path / "pipe")
    finally:
        os.umask(old)
    for path in (tmp_path / "m.safetensors", tmp_path / "m.ckpt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE((tmp_path / "pipe").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mode) == 0o644

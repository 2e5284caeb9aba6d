"""Checkpoints as users have them: the forms SD single files and diffusers folders come in (wrapped or bare
`.ckpt`, 2022 Lightning files with numpy scalars and the ModelCheckpoint class, fp16/bf16, with or without CLIP's
position ids, EMA beside the weights or alone, VAE files given as the VAE), and the broken ones (cut off, LFS
pointers, random keys, a malicious pickle, a folder that lacks a part). Each loads as the layout means, or
stops with one line that names the problem and the fix (exit 2 for the CLIs, no traceback)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import model_config, randomize_, rel_err
from safetensors.torch import load_file, save_file

from ldm.checkpoint import (
    POSITION_IDS,
    CheckpointError,
    checkpoint_from_model,
    ema_key_for,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from ldm.models.stable_diffusion import StableDiffusion

REPO = Path(__file__).resolve().parent.parent
UNET, VAE = "model.diffusion_model.", "first_stage_model."
PROMPTS = ["a red cube on a table", ""]


def sd1_tiny() -> dict:
    """The tiny model with SD 1.x's head conventions (8 UNet heads, 64-wide CLIP heads): what a file without a
    config means, as head counts are not in the weights."""
    cfg = model_config("tiny")
    cfg["unet"]["num_heads"] = 8
    cfg["cond_stage"]["config"]["num_attention_heads"] = 1
    return cfg


@pytest.fixture(scope="module")
def base() -> tuple[StableDiffusion, dict[str, torch.Tensor]]:
    """A tiny SD 1.x-structured model with random weights and its state dict (LDM names)."""
    model = randomize_(StableDiffusion.from_config(sd1_tiny()), seed=0).eval()
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def pipe(base, tmp_path_factory) -> Path:
    """The base model as a diffusers folder, as the hub publishes SD (safety_checker entries included)."""
    folder = tmp_path_factory.mktemp("pipe") / "sd"
    save_checkpoint(checkpoint_from_model(base[0]), folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"])
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "feature_extractor").mkdir()
    (folder / "feature_extractor" / "preprocessor_config.json").write_text("{}")
    return folder


def _lightning_2022_ckpt(sd: dict, path: Path) -> None:
    """As the original SD releases (sd-v1-4.ckpt) were saved by pytorch_lightning 1.x: `global_step` a numpy
    scalar pickled under numpy 1's name, `callbacks` keyed by the ModelCheckpoint class itself."""
    from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint

    obj = {"state_dict": sd, "global_step": np.int64(470000), "epoch": 6, "pytorch-lightning_version": "1.4.2",
           "callbacks": {ModelCheckpoint: {"best_model_score": None, "monitor": None}}}
    torch.save(obj, path)
    with zipfile.ZipFile(path) as old:
        entries = [(info, old.read(info)) for info in old.infolist()]
    assert any(b"numpy._core.multiarray\nscalar" in data for _, data in entries)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as new:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            new.writestr(info, data)


def _cast(sd: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


SINGLE_FILES = {
    "wrapped.ckpt": lambda sd, p: torch.save({"state_dict": sd, "global_step": 470000}, p),
    "bare.ckpt": lambda sd, p: torch.save(sd, p),
    "lightning-2022.ckpt": _lightning_2022_ckpt,
    "plain.safetensors": lambda sd, p: save_file(sd, str(p)),
    "safetensors-named.ckpt": lambda sd, p: save_file(sd, str(p)),  # renamed by a download tool
    "fp16.safetensors": lambda sd, p: save_file(_cast(sd, torch.float16), str(p)),
    "bf16.ckpt": lambda sd, p: torch.save({"state_dict": _cast(sd, torch.bfloat16)}, p),
    "position-ids-int64.safetensors": lambda sd, p: save_file({**sd, POSITION_IDS: torch.arange(77)[None]}, str(p)),
    # some fine-tunes hold them as floats, a few a hair off the integers (read as int, 76.9999 gave 76)
    "position-ids-float.safetensors": lambda sd, p: save_file(
        {**sd, POSITION_IDS: torch.arange(77, dtype=torch.float32)[None] - 1e-4}, str(p)
    ),
}


@pytest.mark.parametrize("name", sorted(SINGLE_FILES))
@torch.no_grad()
def test_ldm_single_file_forms_load_the_weights_they_hold(tmp_path, base, name):
    model, sd = base
    path = tmp_path / name
    SINGLE_FILES[name](dict(sd), path)
    ckpt = read_checkpoint(path)
    assert ckpt.config["cond_stage"]["kind"] == "clip" and ckpt.config["prediction_type"] == "epsilon"
    loaded = ckpt.build_model().eval()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name.split(".")[0], torch.float32)
    own = loaded.state_dict()
    assert own.keys() == sd.keys()
    assert all(own[k].dtype == v.dtype and torch.equal(own[k], v) for k, v in _cast(sd, dtype).items())
    if dtype == torch.float32:
        # the text encoder counts positions itself: a file's position ids (int, float, absent) change nothing
        tokens = model.cond_stage_model.tokenize(PROMPTS)
        context = model.cond_stage_model.encode(tokens)
        assert rel_err(context[0], context[1]) > 1e-3
        assert torch.equal(loaded.cond_stage_model.encode(tokens), context)
        x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([5.0, 900.0])
        assert torch.equal(loaded.unet(x, t, context), model.unet(x, t, context))
    assert POSITION_IDS not in own


def _with_ema(sd: dict) -> dict:
    ema = {ema_key_for(k): v + 0.5 for k, v in sd.items() if k.startswith(UNET)}
    return {**sd, **ema, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)}


def test_a_file_with_both_unets_uses_the_plain_one_and_says_so(tmp_path, base, caplog):
    _, sd = base
    path = tmp_path / "with-ema.safetensors"
    save_file(_with_ema(sd), str(path))
    key = UNET + "input_blocks.0.0.weight"
    with caplog.at_level(logging.INFO, logger="ldm.checkpoint"):
        plain = load_model(path)
    assert torch.equal(plain.state_dict()[key], sd[key])
    assert "holds EMA weights too" in caplog.text and "ema=true" in caplog.text
    ema = load_model(path, ema=True)
    assert torch.equal(ema.state_dict()[key], sd[key] + 0.5)

    save_file(sd, str(tmp_path / "no-ema.safetensors"))
    with pytest.raises(CheckpointError, match="holds no model_ema.*drop ema=true"):
        load_model(tmp_path / "no-ema.safetensors", ema=True)
    only = {k: v for k, v in _with_ema(sd).items() if not k.startswith(UNET)}
    save_file(only, str(tmp_path / "ema-only.safetensors"))
    with pytest.raises(CheckpointError, match="only as EMA weights"):
        read_checkpoint(tmp_path / "ema-only.safetensors")


# ---- a VAE given as the VAE (module.first_stage_ckpt) -----------------------------------------


def _vae_forms(sd: dict, pipe: Path, tmp: Path) -> dict[str, Path]:
    vae = {k: v for k, v in sd.items() if k.startswith(VAE)}
    bare = {k[len(VAE):]: v for k, v in vae.items()}
    save_file(vae, str(tmp / "prefixed.safetensors"))
    save_file(bare, str(tmp / "vae-ft-mse.safetensors"))
    # vae-ft-mse-840000-ema-pruned.ckpt: bare names, with the training loss's weights and the EMA counters
    torch.save({"state_dict": {**bare, "loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight":
                torch.zeros(2, 3, 4, 4), "model_ema.decay": torch.tensor(0.9999)}, "global_step": 840000},
               tmp / "vae-ft-mse.ckpt")
    return {
        "sd-file": _save(sd, tmp / "whole.safetensors"),
        "prefixed": tmp / "prefixed.safetensors",
        "bare-safetensors": tmp / "vae-ft-mse.safetensors",
        "bare-ckpt": tmp / "vae-ft-mse.ckpt",
        "diffusers-vae-folder": pipe / "vae",
        "diffusers-pipeline": pipe,
        "diffusers-vae-weights": pipe / "vae" / "diffusion_pytorch_model.safetensors",
    }


def _save(sd: dict, path: Path) -> Path:
    save_file(sd, str(path))
    return path


def test_first_stage_ckpt_takes_every_vae_form(tmp_path, base, pipe):
    from ldm.lightning.module import LatentDiffusion

    _, sd = base
    expected = {k[len(VAE):]: v for k, v in sd.items() if k.startswith(VAE)}
    for form, path in _vae_forms(sd, pipe, tmp_path).items():
        module = LatentDiffusion(model=model_config("tiny"), first_stage_ckpt=str(path), ema_decay=None)
        got = module.first_stage_model.state_dict()
        assert got.keys() == expected.keys(), form
        assert all(torch.equal(got[k], v) for k, v in expected.items()), form


def test_autoencoder_training_init_from_takes_a_vae_ft_mse_file(tmp_path, base, pipe):
    """Fine-tuning a VAE from vae-ft-mse (stage one's module.init_from): its bare names and loss weights."""
    from ldm.lightning.autoencoder import AutoencoderTraining

    _, sd = base
    expected = {k[len(VAE):]: v for k, v in sd.items() if k.startswith(VAE)}
    path = _vae_forms(sd, pipe, tmp_path)["bare-ckpt"]
    got = AutoencoderTraining(model_config("tiny"), init_from=str(path)).first_stage_model.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())


def test_first_stage_ckpt_refuses_another_vae_or_no_vae_in_one_line(tmp_path, base):
    from ldm.lightning.module import LatentDiffusion

    wider = model_config("tiny")
    wider["first_stage"]["ddconfig"]["ch"] = 64
    other = StableDiffusion.from_config(wider).first_stage_model.state_dict()
    save_file(other, str(tmp_path / "wider.safetensors"))
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "random.safetensors"))
    for name, message in (("wider", "not this model's autoencoder.*of other shapes"),
                          ("random", "holds no autoencoder weights")):
        with pytest.raises(CheckpointError, match=message) as err:
            LatentDiffusion(model=model_config("tiny"), first_stage_ckpt=str(tmp_path / f"{name}.safetensors"))
        assert "\n" not in str(err.value)
    # a VAE file where a whole checkpoint is asked for names the key that takes it
    save_file({k[len(VAE):]: v for k, v in base[1].items() if k.startswith(VAE)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="a VAE file.*module.first_stage_ckpt"):
        read_checkpoint(tmp_path / "vae.safetensors")


# ---- diffusers folders --------------------------------------------------------------------------

WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def _as_bin(folder: Path, text_name: str = "pytorch_model.bin") -> None:
    """As the hub's first SD folders: `.bin` weights, the text encoder's with its position ids (transformers < 4.31)."""
    for part, stem in WEIGHTS.items():
        src = folder / part / f"{stem}.safetensors"
        weights = load_file(str(src))
        if part == "text_encoder":
            weights["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        torch.save(weights, folder / part / (text_name if part == "text_encoder" else f"{stem}.bin"))
        src.unlink()


def _fp16_variant(folder: Path, suffix: str = "safetensors") -> None:
    for part, stem in WEIGHTS.items():
        src = folder / part / f"{stem}.safetensors"
        half = {k: v.half() for k, v in load_file(str(src)).items()}
        if suffix == "bin":
            stem = "pytorch_model" if part == "text_encoder" else stem
            torch.save(half, folder / part / f"{stem}.fp16.bin")
        else:
            save_file(half, str(folder / part / f"{stem}.fp16.safetensors"))
        src.unlink()


FOLDERS = {
    "bin-only": (_as_bin, torch.float32),
    "text-encoder-model-bin": (lambda f: _as_bin(f, "model.bin"), torch.float32),
    "fp16-variant-only": (_fp16_variant, torch.float16),
    "fp16-bin-variant-only": (lambda f: _fp16_variant(f, "bin"), torch.float16),
    "no-model-index": (lambda f: (f / "model_index.json").unlink(), torch.float32),
}


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_diffusers_folder_weight_files_in_every_published_form(tmp_path, base, pipe, name):
    change, dtype = FOLDERS[name]
    folder = tmp_path / "sd"
    shutil.copytree(pipe, folder)
    change(folder)
    loaded = read_checkpoint(folder).build_model().state_dict()
    _, sd = base
    assert loaded.keys() == sd.keys()
    assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in _cast(sd, dtype).items())


@torch.no_grad()
def test_fp16_variant_folder_computes_what_diffusers_computes_from_it(tmp_path, pipe):
    """The `.fp16.safetensors`-only folder, read by diffusers itself with variant="fp16": the same UNet output."""
    diffusers = pytest.importorskip("diffusers")
    folder = tmp_path / "sd"
    shutil.copytree(pipe, folder)
    _fp16_variant(folder)
    ours = read_checkpoint(folder).build_model().float().eval()
    theirs = diffusers.UNet2DConditionModel.from_pretrained(str(folder / "unet"), variant="fp16").float().eval()
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 64, generator=gen)
    t = torch.tensor([3.0, 901.0])
    a, b = ours.unet(x, t, context), theirs(x, t, context).sample
    assert b.abs().max() > 1e-2 and rel_err(a, b) < 1e-4


def test_diffusers_folder_problems_are_named(tmp_path, pipe):
    for part in ("unet", "vae", "text_encoder"):
        folder = tmp_path / f"no-{part}"
        shutil.copytree(pipe, folder)
        shutil.rmtree(folder / part)
        with pytest.raises(CheckpointError, match=f"lacks {part}/config.json"):
            read_checkpoint(folder)
    with pytest.raises(CheckpointError, match=f"one component.*give the folder that holds it, {pipe}$"):
        read_checkpoint(pipe / "unet")
    with pytest.raises(CheckpointError, match=f"weights of one component \\(unet/\\).*holds them all, {pipe}$"):
        read_checkpoint(pipe / "unet" / "diffusion_pytorch_model.safetensors")
    assert read_checkpoint(pipe / "model_index.json").source == str(pipe)  # the index names its folder
    folder = tmp_path / "broken-config"
    shutil.copytree(pipe, folder)
    (folder / "unet" / "config.json").write_text('{"in_channels": 4,')
    with pytest.raises(CheckpointError, match="unet/config.json is not valid JSON"):
        read_checkpoint(folder)
    folder = tmp_path / "sdxl"
    shutil.copytree(pipe, folder)
    shutil.copytree(folder / "text_encoder", folder / "text_encoder_2")
    with pytest.raises(CheckpointError, match="an SDXL pipeline folder"):
        read_checkpoint(folder)


def test_an_sdxl_file_is_named_as_such(tmp_path, base):
    """SDXL's UNet is under model.diffusion_model.* too; its text encoders under conditioner.embedders.*."""
    sd = {k: v for k, v in base[1].items() if k.startswith((UNET, VAE))}
    sd["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(64)
    save_file(sd, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(CheckpointError, match="an SDXL checkpoint.*use an SD 1.x/2.x checkpoint") as err:
        read_checkpoint(tmp_path / "sdxl.safetensors")
    assert "\n" not in str(err.value)


# ---- bad input, through the commands as a user types them -----------------------------------------


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


class _System:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _bad_inputs(tmp: Path, sd: dict, pipe: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, what the error line must say)."""
    shutil.copytree(pipe, tmp / "odd-unet")
    config = json.loads((tmp / "odd-unet" / "unet" / "config.json").read_text())
    (tmp / "odd-unet" / "unet" / "config.json").write_text(json.dumps({**config, "addition_embed_type": "text_time"}))
    marker = tmp / "pwned"
    torch.save({"state_dict": {UNET + "x": _System(f"touch {marker}")}}, tmp / "evil.ckpt")
    save_file(sd, str(tmp / "whole.safetensors"))
    data = (tmp / "whole.safetensors").read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": sd}, tmp / "whole.ckpt")
    data = (tmp / "whole.ckpt").read_bytes()
    (tmp / "cut.ckpt").write_bytes(data[: len(data) // 2])
    (tmp / "lfs.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n")
    save_file({"foo.weight": torch.zeros(3), "bar.bias": torch.zeros(2)}, str(tmp / "random.safetensors"))
    save_file({k: v for k, v in sd.items() if k.startswith(UNET)}, str(tmp / "unet-only.safetensors"))
    (tmp / "empty.ckpt").write_bytes(b"")
    (tmp / "folder").mkdir()
    return {
        "evil": (tmp / "evil.ckpt", "refused to unpickle .*posix.system.*ldm-convert --allow-unsafe-pickle"),
        "cut-safetensors": (tmp / "cut.safetensors", "cannot be read as a safetensors file.*download or copy it again"),
        "cut-ckpt": (tmp / "cut.ckpt", "cannot be read as a torch .* file.*download or copy it again"),
        "lfs": (tmp / "lfs.safetensors", "Git LFS pointer file.*git lfs pull"),
        "random": (tmp / "random.safetensors", "not a Stable Diffusion checkpoint.*'bar', 'foo'"),
        "unet-only": (tmp / "unet-only.safetensors", "a UNet-only file.*give the full checkpoint"),
        "empty": (tmp / "empty.ckpt", "is empty"),
        "folder": (tmp / "folder", "not a diffusers pipeline folder"),
        "odd-unet": (tmp / "odd-unet", "cannot build a model from: .*addition_embed_type='text_time'"),
    }


def _error_line(result: subprocess.CompletedProcess, prog: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_bad_checkpoints_stop_every_command_with_one_line(tmp_path, base, pipe):
    import re

    cases = _bad_inputs(tmp_path, base[1], pipe)
    for name, (path, message) in cases.items():
        if name in ("evil", "random", "unet-only"):  # sample.py as typed; the rest via ldm-convert, quicker
            result = _run("sample.py", f"ckpt={path}", "prompt=a cat", f"out_dir={tmp_path / 'out'}", cwd=REPO)
            line = _error_line(result, "sample.py")
        else:
            result = _run("-m", "ldm.convert", str(path), str(tmp_path / f"{name}-out.safetensors"), cwd=tmp_path)
            line = _error_line(result, "ldm-convert")
        assert re.search(message, line), (name, line)
    result = _run(str(REPO / "train.py"), "model=tiny", "trainer=cpu", "logger=none",
                  f"module.init_from={cases['evil'][0]}", cwd=tmp_path)
    assert re.search(cases["evil"][1], _error_line(result, "train.py"))
    assert not (tmp_path / "pwned").exists()
    assert not list(tmp_path.glob("*-out.safetensors"))
    # control: the same commands do run the unsafe pickle when the user opts in (so the marker test can fail)
    result = _run("-m", "ldm.convert", "--allow-unsafe-pickle", str(cases["evil"][0]), str(tmp_path / "x.safetensors"),
                  cwd=tmp_path)
    assert (tmp_path / "pwned").exists() and result.returncode == 2


def test_legacy_torch_save_format_with_numpy_scalars_loads(tmp_path, base):
    """torch.save's pre-1.6 (non-zip) format, as the oldest SD fine-tunes were written."""
    _, sd = base
    torch.save({"state_dict": sd, "global_step": np.int64(3), "epoch": np.float64(1.0)}, tmp_path / "old.ckpt",
               _use_new_zipfile_serialization=False)
    loaded = read_checkpoint(tmp_path / "old.ckpt").build_model().state_dict()
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], v) for k, v in sd.items())

"""Training a text-encoder LoRA (`module.lora.text_encoder`): adapters of the frozen CLIP / OpenCLIP text encoder
train beside the UNet's, in an optimizer group of their own (own LR, no updates after their max_steps), are
saved in checkpoints as `text_lora.adapters.*` (resumed exactly, merged into the text encoder when the file is
read) and exported with the UNet's in the run's one kohya file, which sample.py applies to the base checkpoint
to give the merged checkpoint's images. Tiny models, a few CPU steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import model_config, randomize_
from PIL import Image
from safetensors.torch import load_file, save_file
from test_sample import PROMPT, assert_matches, assert_moves, sample_config, tiny_sd2_config
from test_train import BARE, QUIET, cli, compose_train, load_ckpt

from ldm.checkpoint import checkpoint_from_model, load_model, save_checkpoint
from ldm.cli.sample import run
from ldm.cli.train import train
from ldm.lightning.module import TEXT_LORA_GROUP, LatentDiffusion
from ldm.lora import merge_lora_file
from ldm.models.stable_diffusion import StableDiffusion

UNET_LR, TEXT_LR, TEXT_STEPS, STEPS = 5e-2, 2e-2, 2, 4
# alpha well above rank so that 4 steps train adapters that show in the images; no LR warm-up, so each
# group's LR is the configured one
SD1_LORA = f"module.lora={{rank:2,alpha:128,text_encoder:{{alpha:64,lr:{TEXT_LR},max_steps:{TEXT_STEPS}}}}}"
SD2_TEXT_ONLY = "module.lora={targets:[],text_encoder:{rank:2,alpha:64}}"  # no UNet adapters: the text encoder's only


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def start_checkpoint(path: Path, sd2: bool = False) -> Path:
    """Trained-looking (random) weights to start from: a fresh UNet's zero output layer passes no gradient."""
    cfg = tiny_sd2_config() if sd2 else model_config("tiny")
    save_checkpoint(checkpoint_from_model(randomize_(StableDiffusion.from_config(cfg), std=0.08, seed=7)), path)
    return path


def run_training(root: Path, start: Path, lora: str, out: str, *more: str) -> Path:
    overrides = [lora, f"module.init_from={start}", f"trainer.max_steps={STEPS}", f"module.optimizer.lr={UNET_LR}",
                 "module.lr_scheduler=null", "callbacks.checkpoint.every_n_train_steps=1", *more, *BARE, *QUIET]
    train(compose_train(root, overrides, output_dir=str(root / out)))
    return root / out


def step(out: Path, n: int) -> dict:
    return load_ckpt(out / "checkpoints" / f"step-{n:07d}.ckpt")


def part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def sd1_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("te_lora")
    start = start_checkpoint(root / "start.safetensors")
    return root, start, run_training(root, start, SD1_LORA, "run")


def test_text_encoder_adapters_train_at_their_own_lr_stop_after_max_steps_and_resume_exactly(sd1_run):
    root, start, out = sd1_run
    states = {n: step(out, n) for n in range(1, STEPS + 1)}
    text = {n: part(s["state_dict"], "text_lora.adapters.") for n, s in states.items()}
    unet = {n: part(s["state_dict"], "lora.adapters.") for n, s in states.items()}
    ups = [v for k, v in text[1].items() if k.endswith("up.weight")]
    assert len(ups) == 2 * 6, "every CLIP layer's q, k, v, out_proj, fc1 and fc2 is adapted"
    assert all(v.abs().max() > 0 for v in ups), "the text encoder's adapters got gradients and moved (up starts at 0)"
    assert not same(text[2], text[1]), "the text encoder's adapters train until their max_steps"
    assert same(text[3], text[2]) and same(text[4], text[2]), "after max_steps the text encoder's adapters stop"
    assert not same(unet[4], unet[3]), "the UNet's adapters go on training"
    # the frozen weights stay as they were, bit for bit
    initial = load_file(str(start))
    for prefix in ("cond_stage_model.", "model.diffusion_model."):
        frozen = part(states[STEPS]["state_dict"], prefix)
        assert frozen and all(torch.equal(v, initial[k]) for k, v in frozen.items()), f"{prefix}* moved"
    # two optimizer groups, the text encoder's adapters at their own LR, then at 0 once stopped
    for n, text_lr in ((1, TEXT_LR), (STEPS, 0.0)):
        groups = states[n]["optimizer_states"][0]["param_groups"]
        assert [(g.get("name"), g["lr"]) for g in groups] == [("unet", UNET_LR), (TEXT_LORA_GROUP, text_lr)]
        assert len(groups[1]["params"]) == 2 * len(ups)  # down and up of each adapter
    # resumed from step 1 (before the stop) in a folder of its own: the same adapters at every later step
    again = run_training(root, start, SD1_LORA, "resumed", f"ckpt_path={out / 'checkpoints' / 'step-0000001.ckpt'}",
                         "resume_in_place=false")
    for n in range(2, STEPS + 1):
        resumed = step(again, n)["state_dict"]
        assert same(part(resumed, "text_lora."), part(states[n]["state_dict"], "text_lora."))
        assert same(part(resumed, "lora."), part(states[n]["state_dict"], "lora."))


def sampled(root: Path, name: str, *overrides: str) -> np.ndarray:
    common = [f"prompt='{PROMPT}'", "steps=4", "seed=3", "height=32", "width=32", "num_images=2"]
    paths = run(sample_config([*overrides, *common, f"out_dir={root / name}"]))
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths if not p.name.startswith("grid")])


def check_export(root: Path, start: Path, out: Path, text_prefix: str, unet: bool) -> None:
    """The run's kohya file holds the text encoder's part (and the UNet's when `unet`); merged into the base it
    gives the training checkpoint's weights, and sample.py with lora= its images; the text encoder's part moves
    the images (a file without it is caught)."""
    lora_file = out / "lora.safetensors"
    sd = load_file(str(lora_file))
    assert {k.split("_")[1] for k in sd} == ({"unet", "te"} if unet else {"te"})
    assert all(k.startswith(text_prefix) for k in sd if k.startswith("lora_te"))
    last = out / "checkpoints" / "last.ckpt"
    merged = load_model(last)
    assert merged.config["cond_stage"]["kind"] == load_model(start).config["cond_stage"]["kind"]
    with_file = load_model(start)
    merge_lora_file(with_file, lora_file)
    theirs = dict(merged.named_parameters())
    worst = max((p - theirs[k]).abs().max().item() for k, p in with_file.named_parameters())
    assert worst < 1e-6, f"base + lora.safetensors differs from the merged checkpoint by {worst}"
    tokens = merged.cond_stage_model.tokenize([PROMPT])
    with torch.no_grad():
        trained_text = merged.cond_stage_model.encode(tokens)
        assert (trained_text - load_model(start).cond_stage_model.encode(tokens)).abs().mean() > 1e-3, \
            "the trained text encoder's adapters must change the embeddings"
    images = sampled(root, f"{out.name}-merged", f"ckpt={last}")
    assert_matches(sampled(root, f"{out.name}-file", f"ckpt={start}", f"lora={lora_file}"), images)
    # Control: the file without its text-encoder part misses what the text encoder learned.
    unet_only = {k: v for k, v in sd.items() if k.startswith("lora_unet_")}
    if unet_only:
        save_file(unet_only, str(root / f"{out.name}-unet.safetensors"))
        assert_moves(sampled(root, f"{out.name}-unet", f"ckpt={start}", f"lora={root / f'{out.name}-unet.safetensors'}"),
                     images, "the text encoder's part of the LoRA")
    else:
        assert_moves(sampled(root, f"{out.name}-base", f"ckpt={start}"), images, "the text encoder's LoRA")


def test_kohya_file_holds_the_unet_and_text_encoder_parts_and_samples_as_the_merged_checkpoint(sd1_run):
    root, start, out = sd1_run
    check_export(root, start, out, "lora_te_text_model_encoder_layers_", unet=True)


def test_sd2_openclip_text_encoder_lora_alone_trains_frozen_and_exports(tmp_path):
    """OpenCLIP (SD 2.x): q, k, v sit in the fused in_proj of nn.MultiheadAttention; adapters of the text
    encoder only (`lora.targets=[]`), the UNet frozen."""
    start = start_checkpoint(tmp_path / "sd2.safetensors", sd2=True)
    out = run_training(tmp_path, start, SD2_TEXT_ONLY, "run", "trainer.max_steps=2")
    state = load_ckpt(out / "checkpoints" / "last.ckpt")["state_dict"]
    assert not part(state, "lora.adapters.")
    ups = [v for k, v in part(state, "text_lora.adapters.").items() if k.endswith("up.weight")]
    assert len(ups) == 2 * 6 and all(v.abs().max() > 0 for v in ups)  # none on the unused last of 3 blocks
    initial = load_file(str(start))
    frozen = part(state, "cond_stage_model.") | part(state, "model.diffusion_model.")
    assert all(torch.equal(v, initial[k]) for k, v in frozen.items())
    check_export(tmp_path, start, out, "lora_te_text_model_encoder_layers_", unet=False)


def test_text_encoder_lora_with_full_text_encoder_training_is_one_clear_line(tmp_path):
    result = cli(SD1_LORA, "module.train_text_encoder=true", *BARE, *QUIET, f"paths.root={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "module.lora.text_encoder" in lines[0] and "module.train_text_encoder" in lines[0]
    assert not list(tmp_path.rglob("*.ckpt"))
    # the module says the same to code that builds it directly, and names keys it does not take
    model = model_config("tiny")
    with pytest.raises(ValueError, match=r"module.lora.text_encoder and module.train_text_encoder"):
        LatentDiffusion(model, lora={"rank": 2, "text_encoder": {}}, train_text_encoder=True)
    with pytest.raises(ValueError, match=r"not \['max_step'\]"):
        LatentDiffusion(model, lora={"rank": 2, "text_encoder": {"max_step": 3}})

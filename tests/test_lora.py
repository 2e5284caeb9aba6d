"""LoRA: adapters hooked into the UNet equal their merged weights; kohya files we write give diffusers'
images (load_lora_weights) with sample.py's lora=; LoRA training trains only the adapters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import model_config, randomize_
from PIL import Image
from safetensors.torch import load_file, save_file
from test_sample import (
    NEGATIVE,
    PROMPT,
    assert_caught,
    assert_matches,
    assert_moves,
    sample_config,
    tiny_sd2_config,
)

from ldm import lora as lora_module
from ldm.checkpoint import checkpoint_from_model, save_checkpoint
from ldm.cli.sample import run
from ldm.lora import UNetLoRA, merge_lora_file, read_lora_file, save_kohya
from ldm.models.stable_diffusion import StableDiffusion


def model_with_lora(seed: int, sd2: bool = False, rank: int = 2, alpha: float = 3.0, targets=None):
    cfg = tiny_sd2_config() if sd2 else model_config("tiny")
    model = randomize_(StableDiffusion.from_config(cfg), std=0.08, seed=seed).eval()
    kwargs = {"targets": targets} if targets else {}
    lora = UNetLoRA(model.unet, rank=rank, alpha=alpha, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    for adapter in lora.adapters.values():  # a trained adapter: up is no longer zero
        adapter.up.weight.data = torch.randn(adapter.up.weight.shape, generator=generator) * 0.3
    return model, lora


def test_hooked_adapters_equal_their_merged_weights_and_start_as_no_change(tmp_path):
    model, lora = model_with_lora(0)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 77, 64)
    with torch.no_grad():
        hooked = model.apply_model(x, t, c)
        lora.detach()
        base = model.apply_model(x, t, c)
    assert (hooked - base).abs().max() > 1e-2, "the adapters must change the output, or nothing is compared"
    save_kohya(lora, model.config["unet"], tmp_path / "l.safetensors")
    for key, delta in read_lora_file(tmp_path / "l.safetensors", model.config["unet"]).items():
        weight = dict(model.unet.named_parameters())[key]
        weight.data += delta
    with torch.no_grad():
        torch.testing.assert_close(model.apply_model(x, t, c), hooked, rtol=1e-4, atol=1e-5)
    fresh = UNetLoRA(model.unet, rank=4)
    with torch.no_grad():
        after = model.apply_model(x, t, c)
        fresh.detach()
        torch.testing.assert_close(after, model.apply_model(x, t, c))


@pytest.mark.parametrize(
    ("sd2", "scale", "targets", "fmt"),
    [
        (False, 1.0, None, "kohya"),
        (True, 0.6, ["to_q", "to_v", "proj_in", "proj_out", "ff.net.2"], "kohya"),
        (False, 0.8, None, "peft"),
    ],
)
def test_lora_file_samples_as_diffusers_load_lora_weights(tmp_path, monkeypatch, sd2, scale, targets, fmt):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    model, lora = model_with_lora(3, sd2=sd2, targets=targets)
    lora.detach()
    folder = tmp_path / "base"
    save_checkpoint(checkpoint_from_model(model), folder)
    path = tmp_path / "style.safetensors"
    save_kohya(lora, model.config["unet"], path)
    if fmt == "peft":  # diffusers' own format: unet.<path>.lora_A / lora_B, alpha = rank (here 2 -> scale by 3/2)
        path = to_peft(path, model.config["unet"], tmp_path / "peft.safetensors")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    theirs = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=6.0, height=32, width=32,
                  generator=torch.Generator("cpu").manual_seed(1), num_images_per_prompt=2, output_type="np",
                  cross_attention_kwargs={"scale": scale}).images
    theirs = (theirs * 255).round().astype("uint8")

    def ours(lora_path: Path | None, out: str, at: float = scale) -> np.ndarray:
        overrides = [f"ckpt={folder}", f"prompt='{PROMPT}'", f"negative_prompt='{NEGATIVE}'", "steps=8",
                     "guidance_scale=6.0", "height=32", "width=32", "seed=1", "num_images=2", f"out_dir={tmp_path / out}"]
        overrides += [f"lora={lora_path}", f"lora_scale={at}"] if lora_path else []
        paths = run(sample_config(overrides))
        return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths if not p.name.startswith("grid")])

    mine = ours(path, "with")
    assert_matches(mine, theirs)
    # Controls (measured for the three cases): the LoRA moves the images 16.5, 59.8 and 12.5 of 255 on
    # average, twice its scale 35.0, 60.6 and 24.9; a kohya file's alpha ignored (alpha = rank) fails the
    # comparison (7.5 and 34.4), and so does lora_scale ignored where it is not 1 (49.8 and 4.8).
    assert_moves(ours(None, "without"), mine, "no LoRA")
    assert_moves(ours(path, "twice", at=2 * scale), mine, "twice the LoRA scale")
    delta, merge = lora_module._delta, lora_module.merge_lora_file
    if fmt == "kohya":  # a peft file has no alphas (they are folded into lora_B here)
        with monkeypatch.context() as m:
            m.setattr(lora_module, "_delta", lambda down, up, alpha: delta(down, up, down.shape[0]))
            assert_caught(ours(path, "no-alpha"), theirs, "alpha ignored")
    if scale != 1:
        with monkeypatch.context() as m:
            m.setattr(lora_module, "merge_lora_file", lambda model, lora_path, at=1.0: merge(model, lora_path))
            assert_caught(ours(path, "no-scale"), theirs, "lora_scale ignored")


def to_peft(kohya: Path, unet_config: dict, out: Path) -> Path:
    """The same LoRA in diffusers' peft layout, alphas folded into lora_B (diffusers assumes alpha = rank)."""
    from ldm.formats.unet import diffusers_key_map
    from ldm.lora import _kohya_stems

    stems = _kohya_stems(unet_config)
    to_diffusers = diffusers_key_map(unet_config)
    sd = load_file(str(kohya))
    peft = {}
    for key in sd:
        if key.endswith(".lora_down.weight"):
            stem = key.removesuffix(".lora_down.weight")
            name = to_diffusers[stems[stem] + ".weight"].removesuffix(".weight")
            down, up = sd[key], sd[f"{stem}.lora_up.weight"]
            up = up * (float(sd[f"{stem}.alpha"]) / down.shape[0])
            peft[f"unet.{name}.lora_A.weight"], peft[f"unet.{name}.lora_B.weight"] = down, up
    save_file(peft, str(out))
    return out


def test_bad_lora_files_are_one_clear_line(tmp_path):
    model, lora = model_with_lora(0)
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(checkpoint_from_model(model), ckpt)
    text = tmp_path / "te.safetensors"  # a text-encoder layer this 2-layer CLIP model does not have
    save_file({"lora_te_text_model_encoder_layers_7_self_attn_q_proj.lora_down.weight": torch.zeros(2, 64),
               "lora_te_text_model_encoder_layers_7_self_attn_q_proj.lora_up.weight": torch.zeros(64, 2)}, str(text))
    other = tmp_path / "other.safetensors"
    save_file({"lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 64),
               "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": torch.zeros(64, 2)}, str(other))
    base = [f"ckpt={ckpt}", "prompt=x", "steps=1", f"out_dir={tmp_path / 'o'}"]
    for lora_arg, message in ((tmp_path / "nope.safetensors", "does not exist"),
                              (text, "text-encoder layer lora_te_text_model_encoder_layers_7_self_attn_q_proj"),
                              (other, "LoRA layers this UNet does not have")):
        with pytest.raises(ValueError, match=message):
            run(sample_config([*base, f"lora={lora_arg}"]))


def test_lora_training_trains_only_adapters_and_its_file_samples_as_its_checkpoint(tmp_path):
    from test_train import BARE, QUIET, compose_train, load_ckpt, run_dir

    from ldm.cli.train import train

    # from trained (here: random) weights, as LoRA is used: a fresh UNet's zero output layer passes no gradient
    start = tmp_path / "start.safetensors"
    save_checkpoint(checkpoint_from_model(randomize_(StableDiffusion.from_config(model_config("tiny")), std=0.08)), start)
    lora = ["module.lora={rank:2,alpha:128}", f"module.init_from={start}"]
    train(compose_train(tmp_path, [*lora, "trainer.max_steps=4", "module.optimizer.lr=5e-2", *BARE, *QUIET]))
    out = run_dir(tmp_path)
    saved = load_ckpt(out / "checkpoints" / "last.ckpt")["state_dict"]
    assert not any(k.startswith("model_ema.") for k in saved), "a LoRA run keeps no EMA of the frozen UNet"
    ups = [v for k, v in saved.items() if k.startswith("lora.adapters.") and k.endswith("up.weight")]
    assert ups and all(v.abs().max() > 0 for v in ups), "the adapters trained"
    # the UNet itself did not move
    initial = load_file(str(start))
    unet = [k for k in saved if k.startswith("model.diffusion_model.")]
    assert unet and all(torch.equal(saved[k], initial[k]) for k in unet)

    # the base weights + the exported kohya file = the training checkpoint read with its adapters merged
    base = start
    common = ["prompt='a red circle on a blue background'", "steps=4", "seed=3", "height=32", "width=32"]
    with_file = run(sample_config([f"ckpt={base}", f"lora={out / 'lora.safetensors'}", *common, f"out_dir={tmp_path / 'a'}"]))
    merged = run(sample_config([f"ckpt={out / 'checkpoints' / 'last.ckpt'}", *common, f"out_dir={tmp_path / 'b'}"]))
    plain = run(sample_config([f"ckpt={base}", *common, f"out_dir={tmp_path / 'c'}"]))
    a, b, c = (np.asarray(Image.open(p[0])) for p in (with_file, merged, plain))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    # Control: the trained LoRA moves the images by far more than that 1/255 (measured 13.7/255 on average;
    # alpha 128 so that 4 steps train adapters that show), so sample.py ignoring lora= would fail it.
    assert_moves(c, b, "the trained LoRA")


def test_lora_targets_that_name_no_linear_layer_are_refused():
    model = StableDiffusion.from_config(model_config("tiny"))  # SD 1.x-like: proj_in is a 1x1 convolution
    with pytest.raises(ValueError, match=r"\['proj_in'\] name no Linear layer"):
        UNetLoRA(model.unet, targets=["to_q", "proj_in"])


def with_text_encoder_lora(path: Path, model: StableDiffusion, seed: int) -> None:
    """Add kohya text-encoder entries (q, v and the MLP's fc1 of every layer) to a LoRA file."""
    sd = load_file(str(path))
    generator = torch.Generator().manual_seed(seed)
    for name, layer in model.cond_stage_model.transformer.named_modules():
        if isinstance(layer, torch.nn.Linear) and name.endswith(("q_proj", "v_proj", "fc1")):
            stem = "lora_te_" + name.replace(".", "_")
            sd[f"{stem}.lora_down.weight"] = torch.randn(2, layer.in_features, generator=generator) * 0.3
            sd[f"{stem}.lora_up.weight"] = torch.randn(layer.out_features, 2, generator=generator) * 0.3
            sd[f"{stem}.alpha"] = torch.tensor(1.0)
    save_file(sd, str(path))


def test_text_encoder_lora_matches_peft_on_the_clip_model_and_an_sd1_one_is_refused_by_sd2(tmp_path):
    """kohya text-encoder entries (`lora_te_text_model_*`) merged into our CLIP text model give the text
    embeddings of peft's LoRA layers on the same transformers model. (diffusers 0.42 with transformers 5
    drops the attention part of kohya text-encoder LoRAs on load, so it cannot be the reference here.)"""
    peft = pytest.importorskip("peft")
    import copy

    model, lora = model_with_lora(5)
    lora.detach()
    path = tmp_path / "style.safetensors"
    save_kohya(lora, model.config["unet"], path)
    with_text_encoder_lora(path, model, 5)
    reference = copy.deepcopy(model.cond_stage_model.transformer)
    targets = ["q_proj", "v_proj", "fc1"]
    reference = peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=1, target_modules=targets), reference)
    sd = load_file(str(path))
    with torch.no_grad():
        for name, layer in reference.named_modules():
            if hasattr(layer, "lora_A") and "default" in layer.lora_A:
                stem = "lora_te_" + name.replace(".", "_")
                layer.lora_A["default"].weight.copy_(sd[f"{stem}.lora_down.weight"])
                layer.lora_B["default"].weight.copy_(sd[f"{stem}.lora_up.weight"])
                layer.scaling["default"] = 0.7 * 1.0 / 2  # lora_scale · alpha / rank
    tokens = model.cond_stage_model.tokenize([PROMPT, "a cat"])
    with torch.no_grad():
        before = model.cond_stage_model.encode(tokens)
        merge_lora_file(model, path, 0.7)
        ours = model.cond_stage_model.encode(tokens)
        theirs = reference.text_model(input_ids=tokens).last_hidden_state
    assert (ours - before).abs().max() > 1e-2, "the text-encoder LoRA must change the embeddings"
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)

    sd2, sd2_lora = model_with_lora(6, sd2=True)
    sd2_lora.detach()
    sd2_path = tmp_path / "sd2.safetensors"
    save_kohya(sd2_lora, sd2.config["unet"], sd2_path)
    with_text_encoder_lora(sd2_path, model, 6)  # shaped for the SD 1.x-like CLIP model (MLP 128 wide, not 256)
    before = {k: v.clone() for k, v in sd2.state_dict().items()}
    with pytest.raises(ValueError, match=r"text-encoder LoRA shapes do not fit \(this model's text encoder is OpenCLIP"):
        merge_lora_file(sd2, sd2_path)
    assert all(torch.equal(v, before[k]) for k, v in sd2.state_dict().items()), "a refused file changes nothing"

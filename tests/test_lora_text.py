"""Text-encoder LoRA in sampling: kohya `lora_te_*` entries applied by `sample.py lora=` for SD 1.x's CLIP
and SD 2.x's OpenCLIP tower.

SD 2.x kohya files name the OpenCLIP tower by the transformers CLIPTextModel sd-scripts converts it into
(q, k, v split from the fused in_proj, mlp.c_fc/c_proj as fc1/fc2), so the reference is peft's LoRA
layers on that CLIPTextModel, holding the same weights: what kohya's own network computes. Each parity
has its controls: the LoRA moves the result far past the tolerance, and broken paths fail it."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import randomize_
from PIL import Image
from safetensors.torch import load_file, save_file
from test_encoders import hf_text_model
from test_lora import model_with_lora
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
from ldm.formats.text import text_from_diffusers
from ldm.lora import TextTarget, merge_lora_file, save_kohya
from ldm.models.stable_diffusion import StableDiffusion

ALL_TE = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # kohya's CLIPAttention + CLIPMLP Linears
ATOL, RTOL = 1e-5, 1e-4
MOVES = 1e-2  # a control must move the embeddings this much on average: 1000x the tolerance


def add_text_encoder_lora(
    path: Path, hf_model: torch.nn.Module, seed: int, targets=ALL_TE, std: float = 0.3, alpha: float | None = None
) -> None:
    """kohya text-encoder entries, named from a transformers CLIPTextModel's Linears (as sd-scripts names
    them for SD 1.x and SD 2.x alike), rank 2 and `alpha` (None: 1, 2 or 3, varying by layer), added to a
    LoRA file."""
    sd = load_file(str(path)) if path.exists() else {}
    generator = torch.Generator().manual_seed(seed)
    for i, (name, layer) in enumerate(hf_model.named_modules()):
        if isinstance(layer, torch.nn.Linear) and name.endswith(targets):
            stem = "lora_te_" + ("text_model." + name if not name.startswith("text_model.") else name).replace(".", "_")
            sd[f"{stem}.lora_down.weight"] = torch.randn(2, layer.in_features, generator=generator) * std
            sd[f"{stem}.lora_up.weight"] = torch.randn(layer.out_features, 2, generator=generator) * std
            sd[f"{stem}.alpha"] = torch.tensor(float(alpha) if alpha is not None else 1.0 + i % 3)
    save_file(sd, str(path))


def with_peft_lora(hf_model: torch.nn.Module, path: Path, scale: float, targets=ALL_TE) -> torch.nn.Module:
    """A copy of `hf_model` with peft LoRA layers holding the file's text-encoder matrices at
    scaling = scale · alpha / rank (kohya's multiplier · scale)."""
    peft = pytest.importorskip("peft")
    ref = peft.inject_adapter_in_model(
        peft.LoraConfig(r=2, lora_alpha=2, target_modules=list(targets)), copy.deepcopy(hf_model)
    )
    sd = load_file(str(path))
    found = 0
    with torch.no_grad():
        for name, layer in ref.named_modules():
            if hasattr(layer, "lora_A") and "default" in layer.lora_A:
                full = name if name.startswith("text_model.") else "text_model." + name
                stem = "lora_te_" + full.replace(".", "_")
                layer.lora_A["default"].weight.copy_(sd[f"{stem}.lora_down.weight"])
                layer.lora_B["default"].weight.copy_(sd[f"{stem}.lora_up.weight"])
                layer.scaling["default"] = scale * float(sd[f"{stem}.alpha"]) / 2
                found += 1
    assert found, "peft adapted no layer"
    return ref.eval()


def sd2_model(seed: int) -> StableDiffusion:
    return randomize_(StableDiffusion.from_config(tiny_sd2_config()), std=0.08, seed=seed).eval()


def openclip_as_clip(model: StableDiffusion) -> torch.nn.Module:
    """transformers' CLIPTextModel that sd-scripts trains SD 2.x text-encoder LoRAs on: the OpenCLIP tower up
    to SD 2's penultimate block, q/k/v split from in_proj."""
    return hf_text_model(model.cond_stage_model.state_dict(), "openclip", model.config["cond_stage"])


def hidden(hf_model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return hf_model(input_ids=tokens).last_hidden_state


def test_sd2_openclip_text_encoder_lora_matches_peft_on_the_clip_model_sd_scripts_trains(tmp_path, monkeypatch):
    model = sd2_model(11)
    hf = openclip_as_clip(model)
    path = tmp_path / "te.safetensors"
    add_text_encoder_lora(path, hf, seed=11)
    theirs_model = with_peft_lora(hf, path, scale=0.7)
    tokens = model.cond_stage_model.tokenize([PROMPT, "a cat", ""])
    with torch.no_grad():
        base = model.cond_stage_model.encode(tokens)
        torch.testing.assert_close(hidden(hf, tokens), base, rtol=RTOL, atol=ATOL)  # the same model, unadapted
        theirs = hidden(theirs_model, tokens)

    def ours(scale: float = 0.7) -> torch.Tensor:
        fresh = copy.deepcopy(model)
        merge_lora_file(fresh, path, scale)
        with torch.no_grad():
            return fresh.cond_stage_model.encode(tokens)

    torch.testing.assert_close(ours(), theirs, rtol=RTOL, atol=ATOL)
    # Control: the LoRA moves the embeddings far past the tolerance ...
    moved = (theirs - base).abs().mean().item()
    assert moved > MOVES, f"the LoRA moves the embeddings {moved:.2e} on average, under {MOVES}"
    # ... and broken paths fail the comparison: the user's scale ignored, alpha ignored, q and k rows of
    # the fused in_proj exchanged.
    with pytest.raises(AssertionError):
        torch.testing.assert_close(ours(1.0), theirs, rtol=RTOL, atol=ATOL)
    delta, targets = lora_module._delta, lora_module.text_encoder_targets
    with monkeypatch.context() as m:
        m.setattr(lora_module, "_delta", lambda down, up, alpha: delta(down, up, down.shape[0]))
        with pytest.raises(AssertionError):
            torch.testing.assert_close(ours(), theirs, rtol=RTOL, atol=ATOL)

    def q_k_swapped(text_encoder):
        out = targets(text_encoder)
        for name in [n for n in out if n.endswith("q_proj")]:
            q, k = out[name], out[name.replace("q_proj", "k_proj")]
            out[name], out[name.replace("q_proj", "k_proj")] = (
                TextTarget(q.weight, k.rows, q.in_features, q.out_features),
                TextTarget(k.weight, q.rows, k.in_features, k.out_features),
            )
        return out

    with monkeypatch.context() as m:
        m.setattr(lora_module, "text_encoder_targets", q_k_swapped)
        with pytest.raises(AssertionError):
            torch.testing.assert_close(ours(), theirs, rtol=RTOL, atol=ATOL)


def test_sd2_text_encoder_lora_through_sample_py_gives_the_images_of_its_merged_weights(tmp_path, monkeypatch):
    """`sample.py lora=` on an SD 2.x single file: the images of a checkpoint whose OpenCLIP tower holds
    the peft reference's merged weights (converted back), to 2/255."""
    model = sd2_model(12)
    base = tmp_path / "sd2.safetensors"
    save_checkpoint(checkpoint_from_model(model), base)
    hf = openclip_as_clip(model)
    path = tmp_path / "te.safetensors"
    add_text_encoder_lora(path, hf, seed=12, std=0.5)
    adapted = with_peft_lora(hf, path, scale=0.8)
    sd = dict(hf.state_dict())
    with torch.no_grad():  # peft's own update of each adapted layer (scaling · B @ A)
        for name, layer in adapted.named_modules():
            if hasattr(layer, "lora_A") and "default" in layer.lora_A:
                sd[f"{name}.weight"] = sd[f"{name}.weight"] + layer.get_delta_weight("default")
    # sd-scripts' CLIPTextModel stops at the penultimate block: the tower's unused last block stays as it was.
    reference = copy.deepcopy(model)
    sd = {"text_model." + k if not k.startswith("text_model.") else k: v for k, v in sd.items()}
    sd = text_from_diffusers({k: v for k, v in sd.items() if "position_ids" not in k}, "openclip")
    reference.cond_stage_model.load_state_dict(sd, strict=False)
    missing = set(reference.cond_stage_model.state_dict()) - set(sd)
    assert missing and all(".resblocks.2." in k or k in ("model.text_projection", "model.logit_scale") for k in missing)
    ref_ckpt = tmp_path / "reference.safetensors"
    save_checkpoint(checkpoint_from_model(reference), ref_ckpt)

    def images(ckpt: Path, out: str, *extra: str) -> np.ndarray:
        overrides = [f"ckpt={ckpt}", f"prompt='{PROMPT}'", f"negative_prompt='{NEGATIVE}'", "steps=6",
                     "guidance_scale=6.0", "height=32", "width=32", "seed=2", "prediction_type=v_prediction",
                     f"out_dir={tmp_path / out}", *extra]
        return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in run(sample_config(overrides))])

    theirs = images(ref_ckpt, "reference")
    mine = images(base, "ours", f"lora={path}", "lora_scale=0.8")
    assert_matches(mine, theirs)
    # Controls (measured): the text-encoder LoRA moves the images 67.9/255 on average; dropping it fails.
    assert_moves(images(base, "plain"), mine, "the text-encoder LoRA")
    with monkeypatch.context() as m:  # the text-encoder part dropped, as sampling did before
        m.setattr(lora_module, "_text_deltas", lambda *a: {})
        assert_caught(images(base, "dropped", f"lora={path}", "lora_scale=0.8"), theirs, "text-encoder part ignored")


def test_sd1_file_with_text_encoder_part_gives_diffusers_load_lora_weights_images(tmp_path, monkeypatch):
    """A kohya file with UNet and text-encoder entries, sampled by `sample.py lora=` and by diffusers'
    `load_lora_weights` at lora_scale 0.8: the same images to 2/255. The text-encoder part is the MLP's
    fc1/fc2: diffusers 0.42 with transformers 5 drops kohya's text-encoder attention entries on load (it
    warns of `to_q_lora` keys it does not use), and it loses the text encoder's per-layer alphas (its peft
    alpha_pattern names the `text_model.` level transformers 5 no longer has: every scaling comes out 1), so
    this file keeps alpha = rank there. Attention entries and alphas are checked against peft on the
    embeddings (here for OpenCLIP, in test_lora.py for CLIP)."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    model, lora = model_with_lora(13)
    lora.detach()
    folder = tmp_path / "base"
    save_checkpoint(checkpoint_from_model(model), folder)
    path = tmp_path / "style.safetensors"
    save_kohya(lora, model.config["unet"], path)
    add_text_encoder_lora(path, model.cond_stage_model.transformer, seed=13, targets=("fc1", "fc2"), std=0.5, alpha=2)
    assert any(k.startswith("lora_te_text_model_encoder_layers_1_mlp_fc2") for k in load_file(str(path)))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    theirs = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=6.0, height=32, width=32,
                  generator=torch.Generator("cpu").manual_seed(1), output_type="np",
                  cross_attention_kwargs={"scale": 0.8}).images
    theirs = (theirs * 255).round().astype("uint8")

    def ours(out: str, *extra: str) -> np.ndarray:
        overrides = [f"ckpt={folder}", f"prompt='{PROMPT}'", f"negative_prompt='{NEGATIVE}'", "steps=6",
                     "guidance_scale=6.0", "height=32", "width=32", "seed=1", f"out_dir={tmp_path / out}", *extra]
        return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in run(sample_config(overrides))])

    mine = ours("with", f"lora={path}", "lora_scale=0.8")
    assert_matches(mine, theirs)
    # Controls (measured): the text-encoder part alone moves the images 25.9/255 on average (max 1/255 apart
    # from diffusers with it), and dropping it fails.
    unet_only = tmp_path / "unet_only.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if k.startswith("lora_unet_")}, str(unet_only))
    assert_moves(ours("unet-only", f"lora={unet_only}", "lora_scale=0.8"), mine, "the text-encoder part")
    with monkeypatch.context() as m:
        m.setattr(lora_module, "_text_deltas", lambda *a: {})
        assert_caught(ours("dropped", f"lora={path}", "lora_scale=0.8"), theirs, "text-encoder part ignored")


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", "lora_te1_.*SDXL"),
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj.hada_w1_a", "hada_w1_a.*LoHa"),
        ("lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale", "dora_scale.*DoRA"),
        ("something_else.weight", "keys this LoRA loader does not know: something_else.weight"),
    ],
)
def test_unknown_keys_in_a_lora_file_are_named(tmp_path, key, message):
    model, lora = model_with_lora(0)
    lora.detach()
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(checkpoint_from_model(model), ckpt)
    path = tmp_path / "l.safetensors"
    save_kohya(lora, model.config["unet"], path)
    save_file({**load_file(str(path)), key: torch.zeros(2, 2)}, str(path))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        merge_lora_file(model, path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "a refused file changes nothing"
    with pytest.raises(ValueError, match=message):
        run(sample_config([f"ckpt={ckpt}", "prompt=x", "steps=1", f"out_dir={tmp_path / 'o'}", f"lora={path}"]))


def test_sd2_unet_lora_on_sd1_and_a_missing_up_matrix_are_refused(tmp_path):
    sd1, _ = model_with_lora(0)
    sd2, lora2 = model_with_lora(1, sd2=True)
    lora2.detach()
    path = tmp_path / "sd2.safetensors"
    save_kohya(lora2, sd2.config["unet"], path)
    with pytest.raises(ValueError, match="LoRA layers this UNet does not have|LoRA shapes do not fit this UNet"):
        merge_lora_file(sd1, path)
    sd = load_file(str(path))
    up = next(k for k in sd if k.endswith("lora_up.weight"))
    save_file({k: v for k, v in sd.items() if k != up}, str(path))
    with pytest.raises(ValueError, match=r"lora_up\.weight is missing"):
        merge_lora_file(sd2, path)


# -- training a text-encoder LoRA: hooked adapters, their kohya export, their checkpoint form -------------------


def trained(text_lora, seed: int):
    """A trained-looking TextEncoderLoRA: up no longer zero."""
    generator = torch.Generator().manual_seed(seed)
    for adapter in text_lora.adapters.values():
        adapter.up.weight.data = torch.randn(adapter.up.weight.shape, generator=generator) * 0.3
    return text_lora


@pytest.mark.parametrize("sd2", [False, True])
def test_hooked_text_encoder_adapters_equal_their_kohya_file_and_peft(tmp_path, sd2):
    """TextEncoderLoRA hooked into CLIP / OpenCLIP gives the embeddings of (a) its exported kohya file merged
    by sample.py's loader and (b) peft's LoRA layers with the same matrices on the transformers CLIPTextModel
    (SD 1.x's own; SD 2.x's as sd-scripts converts it). A fresh adapter changes nothing, gradients reach
    every adapter (q, k and v inside OpenCLIP's fused in_proj too) and no frozen weight, and the encoder's
    state_dict keeps its LDM names while hooked."""
    from ldm.lora import TextEncoderLoRA, text_adapter_deltas

    model = sd2_model(31) if sd2 else model_with_lora(31)[0]
    model.requires_grad_(False)
    encoder = model.cond_stage_model
    keys = set(encoder.state_dict())
    tokens = encoder.tokenize([PROMPT, "a cat"])
    with torch.no_grad():
        base = encoder.encode(tokens)
    fresh = TextEncoderLoRA(encoder, rank=2, alpha=3.0)
    assert len(fresh.adapters) == 6 * 2  # SD 2.x: none on the tower's unused last block (of 3)
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode(tokens), base, rtol=0, atol=0)
    fresh.detach()
    text_lora = trained(TextEncoderLoRA(encoder, rank=2, alpha=3.0), 31)
    assert set(encoder.state_dict()) == keys, "hooking the adapters renamed the encoder's weights"
    hooked = encoder.encode(tokens)
    hooked.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in text_lora.parameters() if p.requires_grad)
    assert all(p.grad is None for p in encoder.parameters()), "a frozen weight got a gradient"
    hooked = hooked.detach()
    assert (hooked - base).abs().mean() > MOVES, "the trained adapters must move the embeddings"
    with torch.no_grad():  # inference (nn.MultiheadAttention's fast path may run): the same
        torch.testing.assert_close(encoder.encode(tokens), hooked, rtol=RTOL, atol=ATOL)
    path = tmp_path / "te.safetensors"
    save_kohya(None, model.config["unet"], path, text_lora=text_lora)
    assert all(k.startswith("lora_te_text_model_encoder_layers_") for k in load_file(str(path)))
    text_lora.detach()
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode(tokens), base, rtol=0, atol=0)  # detached: the plain encoder
        reference = openclip_as_clip(model) if sd2 else copy.deepcopy(encoder.transformer)
        adapted = with_peft_lora(reference, path, scale=1.0)
        theirs = hidden(adapted if sd2 else adapted.text_model, tokens)
        merged = copy.deepcopy(model)
        merge_lora_file(merged, path)
        from_file = merged.cond_stage_model.encode(tokens)
        # the checkpoint form (adapters saved beside the frozen encoder) merges to the same weights
        state = {f"text_lora.{k}": v for k, v in text_lora.state_dict().items()}
        deltas = text_adapter_deltas(state, "openclip" if sd2 else "clip")
        assert deltas.keys() == text_lora.deltas().keys()
        for key, delta in deltas.items():
            torch.testing.assert_close(delta, text_lora.deltas()[key], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(hooked, theirs, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(from_file, theirs, rtol=RTOL, atol=ATOL)


def test_unet_and_text_encoder_adapters_in_one_kohya_file(tmp_path):
    from ldm.lora import TextEncoderLoRA

    model, lora = model_with_lora(32)
    text_lora = trained(TextEncoderLoRA(model.cond_stage_model, rank=2, targets=("q_proj", "v_proj")), 32)
    path = tmp_path / "both.safetensors"
    save_kohya(lora, model.config["unet"], path, text_lora=text_lora)
    sd = load_file(str(path))
    assert {k.split("_")[1] for k in sd} == {"unet", "te"}
    assert sum(k.endswith(".lora_down.weight") and k.startswith("lora_te_") for k in sd) == 4  # 2 layers x q, v
    with pytest.raises(ValueError, match=r"\['fc3'\] are not among"):
        TextEncoderLoRA(model.cond_stage_model, targets=("q_proj", "fc3"))

"""Text encoders: parity with transformers / open_clip, LDM key names, diffusers mapping, tokenizers."""

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.formats.text import (
    flat_text_model_names,
    openclip_keys_dropped_in_diffusers,
    text_config_from_diffusers,
    text_config_from_state_dict,
    text_config_to_diffusers,
    text_from_diffusers,
    text_to_diffusers,
)
from ldm.models.encoders import CLIPTextEmbedder, OpenCLIPTextEmbedder, write_clip_tokenizer

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A Painting of a CAT, by Greg Rutkowski!! (trending on ArtStation), 4k; highly-detailed...",
    "Café Müller — naïve façade at night, 東京の夜景 🌃🚀",
    "it's a dog's life: 42% off #sale @home <|endoftext|> x",
    " ".join(f"word{i}" for i in range(60)),  # far more than 77 tokens
    "",
]
# Text CLIP's ftfy/HTML cleaning changes; transformers 5's CLIPTokenizer alone does not.
UNCLEAN_PROMPTS = ["don’t “quote” me &amp; you", "  spaces\tand\nnewlines  "]

FULL_SIZE_PROMPTS = PROMPTS[1:2]  # one prompt keeps full-size forwards quick; tiny tests cover batching
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY_OPENCLIP = {"width": 64, "heads": 4, "layers": 3}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def randomize(module: nn.Module) -> nn.Module:
    """Perturb every parameter, so layer norms and biases are not left at 1/0."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return module.eval()


def clip_layout_keys(layers: int) -> set[str]:
    names = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight"]
    names += ["final_layer_norm.weight", "final_layer_norm.bias"]
    for i in range(layers):
        for mod in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"]:
            names += [f"encoder.layers.{i}.{mod}.{p}" for p in ("weight", "bias")]
        for mod in ["layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"]:
            names += [f"encoder.layers.{i}.{mod}.{p}" for p in ("weight", "bias")]
    return {"transformer.text_model." + n for n in names}


def openclip_layout_keys(layers: int) -> set[str]:
    names = ["token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"]
    names += ["text_projection", "logit_scale"]
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        names += [block + "attn.in_proj_weight", block + "attn.in_proj_bias"]
        for mod in ["attn.out_proj", "ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj"]:
            names += [f"{block}{mod}.{p}" for p in ("weight", "bias")]
    return {"model." + n for n in names}


def hf_text_model(sd_ldm: dict, kind: str, cfg: dict) -> CLIPTextModel:
    """transformers' CLIPTextModel holding our weights, through OUR config and weight conversion."""
    ref = CLIPTextModel(CLIPTextConfig(**text_config_to_diffusers(kind, cfg)))
    ref.load_state_dict(flat_text_model_names(text_to_diffusers(sd_ldm, kind)))
    return ref.eval()


def open_clip_reference(sd_ldm: dict, width: int, heads: int, layers: int) -> CLIP:
    """open_clip's own CLIP model (tiny visual tower removed) holding our `model.*` weights."""
    text_cfg = CLIPTextCfg(width=width, heads=heads, layers=layers)
    vision_cfg = CLIPVisionCfg(layers=1, width=32, head_width=32, patch_size=16, image_size=32)
    ref = CLIP(embed_dim=width, vision_cfg=vision_cfg, text_cfg=text_cfg)
    del ref.visual
    ref.load_state_dict({k.removeprefix("model."): v for k, v in sd_ldm.items()})
    return ref.eval()


def open_clip_hidden(ref: CLIP, tokens: torch.Tensor, block: int) -> torch.Tensor:
    """SD 2's FrozenOpenCLIPEmbedder: output of resblock `block` (0-based), then ln_final."""
    x = ref.token_embedding(tokens) + ref.positional_embedding
    _, hidden = ref.transformer.forward_intermediates(x, attn_mask=ref.attn_mask, indices=[block])
    return ref.ln_final(hidden[0])


@pytest.fixture(scope="module")
def sd1_text() -> CLIPTextEmbedder:
    torch.manual_seed(1)
    return randomize(CLIPTextEmbedder())


@pytest.fixture(scope="module")
def sd2_text() -> OpenCLIPTextEmbedder:
    torch.manual_seed(2)
    return randomize(OpenCLIPTextEmbedder())


# ---- CLIP (SD 1.x) ----------------------------------------------------------------------------


def test_clip_keys_are_ldm_names(sd1_text):
    assert set(sd1_text.state_dict()) == clip_layout_keys(12)
    fc1 = sd1_text.state_dict()["transformer.text_model.encoder.layers.0.mlp.fc1.weight"]
    assert fc1.shape == (3072, 768)


@pytest.mark.parametrize("size", ["tiny", "vit_l"])
@torch.no_grad()
def test_clip_matches_transformers(size, sd1_text):
    cfg = {"config": TINY_CLIP}
    ours = randomize(CLIPTextEmbedder(**cfg)) if size == "tiny" else sd1_text
    if size == "vit_l":
        cfg = text_config_from_state_dict(sd1_text.state_dict())[1]
    prompts = PROMPTS if size == "tiny" else FULL_SIZE_PROMPTS
    tokens = ours.tokenize(prompts)
    out = ours.encode(tokens)
    ref = hf_text_model(ours.state_dict(), "clip", cfg)
    assert out.shape == (len(prompts), 77, ours.output_dim)
    assert rel_err(out, ref(input_ids=tokens).last_hidden_state) < 1e-4


def test_clip_loads_old_file_with_position_ids():
    ours = CLIPTextEmbedder(TINY_CLIP)
    sd = {k: torch.randn_like(v) for k, v in ours.state_dict().items()}
    sd[CLIPTextEmbedder.POSITION_IDS] = torch.arange(77)[None].float() + 0.3  # even a corrupted copy
    holder = nn.Module()
    holder.cond_stage_model = CLIPTextEmbedder(TINY_CLIP)
    holder.load_state_dict({"cond_stage_model." + k: v for k, v in sd.items()})  # strict
    loaded = holder.cond_stage_model
    emb = loaded.transformer.text_model.embeddings
    assert torch.equal(emb.position_ids[0], torch.arange(77))
    ref = CLIPTextEmbedder(TINY_CLIP)
    ref.load_state_dict({k: v for k, v in sd.items() if k != CLIPTextEmbedder.POSITION_IDS})
    tokens = ref.tokenize(PROMPTS[:2])
    assert torch.equal(loaded.encode(tokens), ref.encode(tokens))


def test_clip_load_still_rejects_other_unknown_keys():
    ours = CLIPTextEmbedder(TINY_CLIP)
    sd = {**ours.state_dict(), "transformer.text_model.embeddings.bogus": torch.zeros(1)}
    with pytest.raises(RuntimeError, match="bogus"):
        ours.load_state_dict(sd)


def test_clip_round_trip_is_bit_identical():
    sd = randomize(CLIPTextEmbedder(TINY_CLIP)).state_dict()
    back = text_from_diffusers(text_to_diffusers(sd, "clip"), "clip")
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_clip_from_hub_and_transformers5_names():
    """Hub SD 1.x folders keep `text_model.` (as we write it) and position_ids; transformers 5's
    own state dict drops the level."""
    sd = CLIPTextEmbedder(TINY_CLIP).state_dict()
    hub = text_to_diffusers(sd, "clip")
    assert all(k.startswith("text_model.") for k in hub)
    hub["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    assert text_from_diffusers(hub, "clip").keys() == sd.keys()
    flat = flat_text_model_names(hub)
    assert not any(k.startswith("text_model.") for k in flat) and "embeddings.position_ids" not in flat
    assert text_from_diffusers(flat, "clip").keys() == sd.keys()


def test_clip_config_round_trip():
    kind, cfg = text_config_from_diffusers(text_config_to_diffusers("clip", {"config": TINY_CLIP}))
    assert kind == "clip"
    assert {k: cfg["config"][k] for k in TINY_CLIP} == TINY_CLIP
    assert cfg["config"]["hidden_act"] == "quick_gelu"


def test_clip_config_from_ldm_shapes(sd1_text):
    kind, cfg = text_config_from_state_dict(sd1_text.state_dict())
    assert kind == "clip"
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert cfg["config"][key] == sd1_text.transformer.text_model.config.to_dict()[key]


# ---- OpenCLIP (SD 2.x) ------------------------------------------------------------------------


def test_openclip_keys_are_ldm_names(sd2_text):
    sd = sd2_text.state_dict()
    assert set(sd) == openclip_layout_keys(24)
    assert sd["model.transformer.resblocks.23.attn.in_proj_weight"].shape == (3072, 1024)
    assert sd["model.text_projection"].shape == (1024, 1024)


@pytest.mark.parametrize(
    "size, layer",
    [("tiny", "penultimate"), ("tiny", "last"), ("vit_h", "penultimate")],
)
@torch.no_grad()
def test_openclip_matches_open_clip(size, layer, sd2_text):
    ours = randomize(OpenCLIPTextEmbedder(**TINY_OPENCLIP, layer=layer)) if size == "tiny" else sd2_text
    blocks = len(ours.model.transformer.resblocks)
    heads = ours.model.transformer.resblocks[0].attn.num_heads
    ref = open_clip_reference(ours.state_dict(), ours.output_dim, heads, blocks)
    tokens = ours.tokenize(PROMPTS if size == "tiny" else FULL_SIZE_PROMPTS)
    block = blocks - 1 if layer == "last" else blocks - 2
    assert rel_err(ours.encode(tokens), open_clip_hidden(ref, tokens, block)) < 1e-4


@torch.no_grad()
def test_openclip_loads_an_open_clip_model():
    """open_clip's own CLIP (random, projection to a smaller embed dim) -> our embedder, strictly."""
    vision_cfg = CLIPVisionCfg(layers=1, width=32, head_width=32, patch_size=16, image_size=32)
    ref = randomize(
        CLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=CLIPTextCfg(width=128, heads=2, layers=3))
    )
    sd = {"model." + k: v for k, v in ref.state_dict().items() if not k.startswith("visual.")}
    kind, cfg = text_config_from_state_dict(sd)
    assert (kind, cfg["heads"], cfg["projection"], cfg["layer"]) == ("openclip", 2, 32, "penultimate")
    ours = OpenCLIPTextEmbedder(**cfg)
    ours.load_state_dict(sd)  # strict
    tokens = ours.tokenize(PROMPTS)
    assert rel_err(ours.encode(tokens), open_clip_hidden(ref, tokens, 1)) < 1e-4


@pytest.mark.parametrize("size", ["tiny", "vit_h"])
@torch.no_grad()
def test_openclip_matches_diffusers_sd2_text_encoder(size, sd2_text):
    """diffusers' SD 2 text_encoder: a gelu CLIPTextModel one block short, last hidden state."""
    ours = randomize(OpenCLIPTextEmbedder(**TINY_OPENCLIP)) if size == "tiny" else sd2_text
    cfg = TINY_OPENCLIP if size == "tiny" else {}
    ref = hf_text_model(ours.state_dict(), "openclip", cfg)
    assert ref.config.num_hidden_layers == len(ours.model.transformer.resblocks) - 1
    assert ref.config.hidden_act == "gelu"
    prompts = PROMPTS if size == "tiny" else FULL_SIZE_PROMPTS
    tokens = ours.tokenize(prompts)
    out = ours.encode(tokens)
    assert out.shape == (len(prompts), 77, ours.output_dim)
    assert rel_err(out, ref(input_ids=tokens).last_hidden_state) < 1e-4


@torch.no_grad()
def test_text_parity_sees_the_prompt_and_catches_a_wrong_activation_or_block():
    """Controls for the parity tests above (tiny towers, every parameter perturbed): the prompts' embeddings
    differ by far more than the 1e-4 tolerance, and a reference with CLIP's other activation (gelu for
    quick_gelu), or SD 2's tower read at its last block instead of the penultimate (in open_clip and in
    diffusers' layout), fails the comparison (relative errors measured in the comments)."""
    far = 10 * 1e-4
    clip = randomize(CLIPTextEmbedder(config=TINY_CLIP))
    tokens = clip.tokenize(PROMPTS)
    out = clip.encode(tokens)
    reference = hf_text_model(clip.state_dict(), "clip", {"config": TINY_CLIP})
    assert rel_err(out, reference(input_ids=tokens).last_hidden_state) < 1e-4
    assert rel_err(out[0], out[1]) > far  # measured 0.95
    gelu = hf_text_model(clip.state_dict(), "clip", {"config": {**TINY_CLIP, "hidden_act": "gelu"}})
    assert rel_err(out, gelu(input_ids=tokens).last_hidden_state) > far  # measured 0.016

    sd2 = randomize(OpenCLIPTextEmbedder(**TINY_OPENCLIP))
    tokens = sd2.tokenize(PROMPTS)
    out = sd2.encode(tokens)
    assert rel_err(out[0], out[1]) > far  # measured 1.0
    ref = open_clip_reference(sd2.state_dict(), sd2.output_dim, TINY_OPENCLIP["heads"], TINY_OPENCLIP["layers"])
    assert rel_err(out, open_clip_hidden(ref, tokens, 1)) < 1e-4
    assert rel_err(out, open_clip_hidden(ref, tokens, 2)) > far  # measured 0.68
    last = {**TINY_OPENCLIP, "layer": "last"}
    every_block = CLIPTextModel(CLIPTextConfig(**text_config_to_diffusers("openclip", last)))
    every_block.load_state_dict(flat_text_model_names(text_to_diffusers(sd2.state_dict(), "openclip", layer="last")))
    assert rel_err(out, every_block.eval()(input_ids=tokens).last_hidden_state) > far  # measured 0.68


@torch.no_grad()
def test_openclip_built_from_diffusers_folder_gives_sd2_output():
    """A diffusers SD 2 text_encoder (N-1 blocks) becomes OpenCLIPTextEmbedder(N-1, layer="last")."""
    sd2 = randomize(OpenCLIPTextEmbedder(**TINY_OPENCLIP))
    hf = hf_text_model(sd2.state_dict(), "openclip", TINY_OPENCLIP)
    kind, cfg = text_config_from_diffusers(hf.config.to_dict())
    assert kind == "openclip"
    assert cfg["layers"] == TINY_OPENCLIP["layers"] - 1 and cfg["layer"] == "last"
    rebuilt = OpenCLIPTextEmbedder(**cfg)
    ldm_sd = text_from_diffusers(hf.state_dict(), "openclip")
    rebuilt.load_state_dict(ldm_sd)  # strict
    inferred = text_config_from_state_dict(ldm_sd)[1]  # the same weights saved as an LDM file
    assert (inferred["layers"], inferred["layer"], inferred["projection"]) == (2, "last", False)
    tokens = sd2.tokenize(PROMPTS)
    assert torch.equal(rebuilt.encode(tokens), sd2.encode(tokens))


def test_openclip_round_trip_keeps_all_but_documented_drops():
    sd = randomize(OpenCLIPTextEmbedder(**TINY_OPENCLIP)).state_dict()
    dropped = set(openclip_keys_dropped_in_diffusers(sd))
    last_block = {k for k in sd if k.startswith("model.transformer.resblocks.2.")}
    assert dropped == last_block | {"model.text_projection", "model.logit_scale"}
    hf = text_to_diffusers(sd, "openclip")
    back = text_from_diffusers(hf, "openclip")
    assert back.keys() == sd.keys() - dropped
    assert all(torch.equal(back[k], sd[k]) for k in back)
    again = text_to_diffusers(back, "openclip")  # no text_projection: nothing more is dropped
    assert again.keys() == hf.keys()
    assert all(torch.equal(again[k], hf[k]) for k in hf)


def test_openclip_last_layer_tower_keeps_every_block():
    sd = OpenCLIPTextEmbedder(**TINY_OPENCLIP, layer="last").state_dict()
    hf = text_to_diffusers(sd, "openclip", layer="last")
    assert {int(k.split(".")[3]) for k in hf if k.startswith("text_model.encoder.layers.")} == {0, 1, 2}
    cfg = text_config_to_diffusers("openclip", {**TINY_OPENCLIP, "layer": "last"})
    assert cfg["num_hidden_layers"] == 3


def test_openclip_config_from_ldm_shapes(sd2_text):
    kind, cfg = text_config_from_state_dict(sd2_text.state_dict())
    assert kind == "openclip"
    assert cfg == {
        "width": 1024,
        "heads": 16,
        "layers": 24,
        "vocab_size": 49408,
        "context_length": 77,
        "layer": "penultimate",
        "projection": 1024,
    }


def test_conversion_errors_name_the_bad_keys():
    sd = OpenCLIPTextEmbedder(**TINY_OPENCLIP).state_dict()
    with pytest.raises(ValueError, match="model.visual.proj"):
        text_to_diffusers({**sd, "model.visual.proj": torch.zeros(1)}, "openclip")
    hf = text_to_diffusers(sd, "openclip")
    del hf["text_model.encoder.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match=r"in_proj_weight.*\['k'\]"):
        text_from_diffusers(hf, "openclip")
    with pytest.raises(ValueError, match="not CLIP text-encoder keys"):
        text_to_diffusers(sd, "clip")
    with pytest.raises(ValueError, match="kind"):
        text_to_diffusers(sd, "t5")


# ---- tokenizers -------------------------------------------------------------------------------


def test_tokenizers_follow_sd_conventions():
    sd1, sd2 = (
        CLIPTextEmbedder(TINY_CLIP).tokenize(PROMPTS),
        OpenCLIPTextEmbedder(**TINY_OPENCLIP).tokenize(PROMPTS),
    )
    assert sd1.shape == sd2.shape == (len(PROMPTS), 77) and sd1.dtype == torch.long
    assert (sd1[:, 0] == 49406).all() and (sd1[:, -1] != 0).all()
    assert sd1[-1, :3].tolist() == [49406, 49407, 49407]  # "" padded with <eot>
    assert sd2[-1, :3].tolist() == [49406, 49407, 0]  # ... or with 0
    assert sd1[4, -1] == sd2[4, -1] == 49407  # truncated, <eot> kept last
    assert torch.equal(sd2, open_clip.tokenize(PROMPTS))  # SD 2's own tokenizer


def test_tokenizer_dir_gives_the_same_ids_as_bundled_bpe(tmp_path):
    prompts = PROMPTS + UNCLEAN_PROMPTS + ["wow!! so cool!"]
    for pad_token, embedder in [("<|endoftext|>", CLIPTextEmbedder), ("!", OpenCLIPTextEmbedder)]:
        folder = tmp_path / ("sd1" if embedder is CLIPTextEmbedder else "sd2")
        write_clip_tokenizer(str(folder), pad_token=pad_token)
        kwargs = {"config": TINY_CLIP} if embedder is CLIPTextEmbedder else TINY_OPENCLIP
        bundled = embedder(**kwargs).tokenize(prompts)
        from_dir = embedder(**kwargs, tokenizer_dir=str(folder)).tokenize(prompts)
        assert torch.equal(from_dir, bundled)


@pytest.mark.parametrize("pad_token, pad_id", [("<|endoftext|>", 49407), ("!", 0)])
def test_written_tokenizer_loads_in_transformers(tmp_path, pad_token, pad_id):
    write_clip_tokenizer(str(tmp_path), pad_token=pad_token)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, pad_id)
    # Raw transformers splits out special tokens ("!" is SD 2's pad) and skips CLIP's ftfy cleaning.
    prompts = [p for p in PROMPTS if "!" not in p and "<|" not in p]
    ours = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    reference = open_clip.tokenize(prompts)
    reference[reference == 0] = pad_id
    assert torch.equal(ours, reference)

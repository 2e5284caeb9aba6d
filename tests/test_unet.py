"""The conditional UNet: original LDM layout, parity with diffusers, weight and config conversion."""

import json
from pathlib import Path

import pytest
import torch
from helpers import randomize_, rel_err

from ldm.formats.unet import (
    unet_config_from_diffusers,
    unet_config_from_state_dict,
    unet_config_to_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
)
from ldm.models.unet import UNetModel

LAYOUTS = Path(__file__).resolve().parent / "data/ldm-layout"
PREFIX = "model.diffusion_model."
LAYOUT_NAMES = ["sd15", "sd21", "sd2_inpaint"]

TINY = dict(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[2, 1],
    num_res_blocks=1,
    channel_mult=[1, 2],
    num_heads=2,
    context_dim=32,
)
CONFIGS = {
    "tiny_conv": TINY,
    # SD2 style: linear projections, fixed head width, deeper transformers, a plain deepest level.
    "tiny_linear_3_levels": dict(
        TINY,
        attention_resolutions=[2, 1],
        channel_mult=[1, 2, 2],
        num_res_blocks=2,
        num_heads=-1,
        num_head_channels=16,
        transformer_depth=2,
        use_linear_in_transformer=True,
        context_dim=24,
    ),
    # Inpainting: latent, mask and masked-image latent in; attention only below full resolution.
    "tiny_inpaint": dict(TINY, in_channels=9, attention_resolutions=[2]),
    # Per-level block counts and depths, and a vector condition (unCLIP's label_emb).
    "tiny_adm_per_level": dict(
        TINY,
        channel_mult=[1, 1, 2],
        attention_resolutions=[4, 2, 1],
        num_res_blocks=[1, 2, 1],
        transformer_depth=[1, 2, 3],
        adm_in_channels=12,
    ),
}
DEFAULTS = dict(
    num_heads=-1,
    num_head_channels=-1,
    transformer_depth=1,
    use_linear_in_transformer=False,
    adm_in_channels=None,
    dropout=0.0,
)


def layout(name: str) -> dict:
    return json.loads((LAYOUTS / f"{name}_unet_vae.json").read_text())


def meta_unet(cfg: dict) -> UNetModel:
    with torch.device("meta"):
        return UNetModel(**cfg)


def inputs(cfg: dict, batch: int = 2, size: tuple[int, int] = (8, 8)) -> dict:
    gen = torch.Generator().manual_seed(1)
    return dict(
        x=torch.randn(batch, cfg["in_channels"], *size, generator=gen),
        context=torch.randn(batch, 5, cfg["context_dim"], generator=gen),
        y=torch.randn(batch, cfg["adm_in_channels"], generator=gen) if cfg.get("adm_in_channels") else None,
    )


def diffusers_twin(model: UNetModel, cfg: dict, swap: tuple[str, str] | None = None):
    """diffusers' UNet2DConditionModel holding `model`'s weights, loaded strictly through our mapping;
    `swap` (two name endings) exchanges the first tensor whose name ends so with its namesake (a
    deliberately broken mapping, for the controls)."""
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(cfg, sample_size=8)).eval()
    weights = unet_to_diffusers(model.state_dict(), cfg)
    if swap:
        a = next(k for k in weights if k.endswith(swap[0]))
        b = a.removesuffix(swap[0]) + swap[1]
        weights[a], weights[b] = weights[b], weights[a]
    reference.load_state_dict(weights, strict=True)
    return reference


# Mapping mistakes a conversion could make: tensors of the same shape exchanged.
BROKEN_MAPPINGS = {
    "cross-attention keys and values exchanged": ("attn2.to_k.weight", "attn2.to_v.weight"),
    "the output norm's scale and shift exchanged": ("conv_norm_out.weight", "conv_norm_out.bias"),
}


@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_state_dict_matches_original_checkpoint_layout(name):
    original = layout(name)
    model = meta_unet(original["unet_config"])
    expected = {k.removeprefix(PREFIX): v for k, v in original["shapes"].items() if k.startswith(PREFIX)}
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected


def test_parameter_counts_of_sd_unets():
    counts = {
        n: sum(p.numel() for p in meta_unet(layout(n)["unet_config"]).parameters()) for n in LAYOUT_NAMES
    }
    assert counts["sd15"] == 859_520_964
    assert counts["sd21"] == 865_910_724
    # Inpainting differs only in conv_in's 5 extra input channels (mask + masked-image latent).
    assert counts["sd2_inpaint"] - counts["sd21"] == 5 * 320 * 3 * 3


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_diffusers_on_random_weights(name):
    cfg = CONFIGS[name]
    model = randomize_(UNetModel(**cfg)).eval()
    reference = diffusers_twin(model, cfg)
    batch = inputs(cfg)
    for timesteps in (torch.tensor([3.25, 911.5]), torch.tensor([0, 999])):
        with torch.no_grad():
            ours = model(batch["x"], timesteps, batch["context"], batch["y"])
            theirs = reference(batch["x"], timesteps, batch["context"], class_labels=batch["y"]).sample
        assert theirs.abs().max() > 1e-2
        assert rel_err(ours, theirs) < 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_unet_parity_sees_context_timestep_and_vector_and_catches_broken_mappings(name):
    """Controls for the parity above: with every weight random (`randomize_`: no zero-initialised output
    layer), the text context, the timestep and the vector condition each move the output by far more than
    the 1e-4 tolerance, and tensors exchanged in the mapping fail the comparison. Measured relative
    changes, for the four configs in order: another context 0.045, 0.081, 0.060, 0.13; other timesteps
    0.025, 0.033, 0.031, 0.062; another vector condition 0.046; keys and values exchanged 0.018, 0.022,
    0.029, 0.061; the output norm's scale and shift exchanged 2.1, 1.5, 2.4, 1.7."""
    cfg = CONFIGS[name]
    model = randomize_(UNetModel(**cfg)).eval()
    batch, t = inputs(cfg), torch.tensor([3.25, 911.5])
    changed = {
        "another context": dict(batch, context=torch.randn_like(batch["context"])),
        "other timesteps": dict(batch, t=torch.tensor([500.0, 20.0])),
    }
    if batch["y"] is not None:
        changed["another vector condition"] = dict(batch, y=torch.randn_like(batch["y"]))
    with torch.no_grad():
        base = model(batch["x"], t, batch["context"], batch["y"])
        for what, other in changed.items():
            moved = rel_err(model(other["x"], other.get("t", t), other["context"], other["y"]), base)
            assert moved > 100 * 1e-4, f"{what} moves the output by {moved:.1e} only"
        for what, swap in BROKEN_MAPPINGS.items():
            theirs = diffusers_twin(model, cfg, swap)(batch["x"], t, batch["context"], class_labels=batch["y"]).sample
            assert rel_err(base, theirs) > 100 * 1e-4, what


def test_odd_latent_sizes_match_diffusers():
    cfg = CONFIGS["tiny_linear_3_levels"]
    model = randomize_(UNetModel(**cfg)).eval()
    reference = diffusers_twin(model, cfg)
    batch = inputs(cfg, size=(9, 7))
    t = torch.tensor([10, 500])
    with torch.no_grad():
        ours = model(batch["x"], t, batch["context"])
        theirs = reference(batch["x"], t, batch["context"]).sample
    assert ours.shape == batch["x"].shape
    assert rel_err(ours, theirs) < 1e-4


def test_scalar_timestep_is_broadcast_over_the_batch():
    model = randomize_(UNetModel(**TINY)).eval()
    batch = inputs(TINY)
    with torch.no_grad():
        scalar = model(batch["x"], torch.tensor(250.0), batch["context"])
        per_sample = model(batch["x"], torch.full((2,), 250), batch["context"])
    assert torch.equal(scalar, per_sample)


def test_vector_condition_is_required_exactly_when_configured():
    with_y = UNetModel(**CONFIGS["tiny_adm_per_level"])
    batch = inputs(CONFIGS["tiny_adm_per_level"])
    with pytest.raises(ValueError, match="adm_in_channels"):
        with_y(batch["x"], torch.tensor([1, 2]), batch["context"])
    with pytest.raises(ValueError, match="adm_in_channels"):
        UNetModel(**TINY)(inputs(TINY)["x"], torch.tensor([1, 2]), inputs(TINY)["context"], y=batch["y"])


def test_gradient_checkpointing_recomputes_blocks_and_keeps_gradients():
    """Diffusers' grain: res blocks and transformer blocks are recomputed in backward, the layers between them
    (a transformer's norm and projections, up- and downsampling) are not."""
    model = randomize_(UNetModel(**TINY)).train()
    batch = inputs(TINY)
    middle = model.middle_block
    watched = {"res block": middle[0], "transformer block": middle[1].transformer_blocks[0],
               "transformer norm": middle[1].norm, "transformer proj_in": middle[1].proj_in,
               "upsampling": next(m for m in model.output_blocks.modules() if type(m).__name__ == "Upsample")}
    calls = {name: 0 for name in watched}
    for name, module in watched.items():  # pre-hooks: a recompute stops once it has what backward needs
        module.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))

    def grads(enabled: bool) -> list[torch.Tensor]:
        model.set_gradient_checkpointing(enabled)
        model.zero_grad()
        calls.update(dict.fromkeys(calls, 0))
        model(batch["x"], torch.tensor([5, 700]), batch["context"]).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads(False)
    assert set(calls.values()) == {1}, calls
    checkpointed = grads(True)
    # once forward, once recomputed in backward; the cheap layers between kept their activations
    assert calls == {"res block": 2, "transformer block": 2, "transformer norm": 1, "transformer proj_in": 1,
                     "upsampling": 1}, calls
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(plain, checkpointed, strict=True))


@pytest.mark.parametrize("name", CONFIGS)
def test_weight_round_trip_is_bit_identical_and_key_complete(name):
    cfg = CONFIGS[name]
    sd = randomize_(UNetModel(**cfg)).state_dict()
    back = unet_from_diffusers(unet_to_diffusers(sd, cfg), cfg)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def test_diffusers_projection_of_the_other_kind_is_reshaped():
    cfg = CONFIGS["tiny_linear_3_levels"]
    sd = randomize_(UNetModel(**cfg)).state_dict()
    converted = unet_to_diffusers(sd, cfg)
    as_conv = {
        k: v[:, :, None, None] if k.endswith(("proj_in.weight", "proj_out.weight")) else v
        for k, v in converted.items()
    }
    back = unet_from_diffusers(as_conv, cfg)
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def test_misfit_state_dicts_are_rejected_naming_the_keys():
    sd = UNetModel(**TINY).state_dict()
    extra = {**sd, "input_blocks.1.0.surprise": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected.*input_blocks.1.0.surprise"):
        unet_to_diffusers(extra, TINY)
    missing = {k: v for k, v in sd.items() if k != "out.2.bias"}
    with pytest.raises(ValueError, match="missing.*out.2.bias"):
        unet_to_diffusers(missing, TINY)
    with pytest.raises(ValueError, match="wrong shape.*conv_in.weight"):
        diffusers_sd = unet_to_diffusers(sd, TINY)
        unet_from_diffusers({**diffusers_sd, "conv_in.weight": torch.zeros(32, 9, 3, 3)}, TINY)
    with pytest.raises(ValueError, match="strip"):
        unet_config_from_state_dict({PREFIX + k: v for k, v in sd.items()})


@pytest.mark.parametrize("name", CONFIGS)
def test_config_round_trips_through_diffusers(name):
    cfg = CONFIGS[name]
    assert unet_config_from_diffusers(unet_config_to_diffusers(cfg)) == {**DEFAULTS, **cfg}


# The published diffusers configs (unet/config.json) of SD 1.5 and SD 2.1, options that matter.
SD15_DIFFUSERS = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
SD21_DIFFUSERS = dict(
    SD15_DIFFUSERS,
    attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024,
    dual_cross_attention=False,
    num_class_embeds=None,
    only_cross_attention=False,
    sample_size=96,
    upcast_attention=True,
    use_linear_projection=True,
    _class_name="UNet2DConditionModel",
)


@pytest.mark.parametrize(("name", "dcfg"), [("sd15", SD15_DIFFUSERS), ("sd21", SD21_DIFFUSERS)])
def test_published_diffusers_configs_map_to_the_original_yaml(name, dcfg):
    yaml_params = layout(name)["unet_config"]
    ours = unet_config_from_diffusers(dcfg)
    built, original = meta_unet(ours), meta_unet(yaml_params)
    assert {k: v.shape for k, v in built.state_dict().items()} == {
        k: v.shape for k, v in original.state_dict().items()
    }
    back = unet_config_to_diffusers(ours, sample_size=dcfg["sample_size"])
    assert {k: v for k, v in back.items() if k in dcfg} == {k: v for k, v in dcfg.items() if k in back}
    heads = {k: v for k, v in yaml_params.items() if k in ("num_heads", "num_head_channels")}
    assert heads.items() <= ours.items()


def test_unsupported_diffusers_options_are_named():
    with pytest.raises(ValueError, match="addition_embed_type"):
        unet_config_from_diffusers(dict(SD15_DIFFUSERS, addition_embed_type="text_time"))
    with pytest.raises(ValueError, match="AttnDownBlock2D"):
        unet_config_from_diffusers(dict(SD15_DIFFUSERS, down_block_types=["AttnDownBlock2D"] * 4))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_recovered_from_weights(name):
    cfg = {**DEFAULTS, **CONFIGS[name]}
    heads = {k: cfg[k] for k in ("num_heads", "num_head_channels") if cfg[k] != -1}
    inferred = unet_config_from_state_dict(UNetModel(**cfg).state_dict(), **heads)
    assert inferred == {k: v for k, v in cfg.items() if k != "dropout"}


@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_sd_config_is_recovered_from_weights_by_convention(name):
    yaml_params = layout(name)["unet_config"]
    inferred = unet_config_from_state_dict(meta_unet(yaml_params).state_dict())
    for key, value in inferred.items():
        assert yaml_params.get(key, DEFAULTS.get(key)) == value, key


def full_size_parity(name: str, context_len: int = 77) -> float:
    """Full-size SD UNet parity at a 8x8 latent, holding one copy of the weights (~3.5 GB)."""
    diffusers = pytest.importorskip("diffusers")
    cfg = layout(name)["unet_config"]
    reference = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(cfg)).eval()
    with torch.no_grad():
        for p in reference.parameters():
            if p.ndim == 1:  # default init leaves norms at 1/0, which would hide swapped norms
                p.add_(torch.randn_like(p), alpha=0.05)
    model = meta_unet(cfg)
    model.load_state_dict(unet_from_diffusers(reference.state_dict(), cfg), strict=True, assign=True)
    model.eval()
    x = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, context_len, cfg["context_dim"])
    t = torch.tensor([421])
    with torch.no_grad():
        ours = model(x, t, context)
        theirs = reference(x, t, context).sample
    assert theirs.abs().max() > 1e-2
    return rel_err(ours, theirs)


@pytest.mark.slow  # full size; small-size parity in the default suite
def test_full_size_sd15_matches_diffusers():
    assert full_size_parity("sd15") < 1e-4


@pytest.mark.slow  # full size; small-size parity in the default suite
def test_full_size_sd21_v_matches_diffusers():
    assert full_size_parity("sd21") < 1e-4

"""First-stage VAE: LDM state dicts/configs <-> diffusers `AutoencoderKL` (pure conversion, no IO).

State dicts here use LDM names without the `first_stage_model.` prefix. Our config is
`{"ddconfig": {...LDM ddconfig...}, "embed_dim": int}`, as `ldm.models.autoencoder.AutoencoderKL`
takes it. Name mapping, LDM -> diffusers:

    {en,de}coder.conv_in / conv_out        -> same
    {en,de}coder.norm_out                  -> {en,de}coder.conv_norm_out
    encoder.down.{i}.block.{j}             -> encoder.down_blocks.{i}.resnets.{j}
    encoder.down.{i}.downsample.conv       -> encoder.down_blocks.{i}.downsamplers.0.conv
    decoder.up.{i}.block.{j}               -> decoder.up_blocks.{L-1-i}.resnets.{j}  (diffusers runs
    decoder.up.{i}.upsample.conv           -> decoder.up_blocks.{L-1-i}.upsamplers.0.conv  in order)
    ....nin_shortcut                       -> ....conv_shortcut
    {en,de}coder.mid.block_{1,2}           -> {en,de}coder.mid_block.resnets.{0,1}
    {en,de}coder.mid.attn_1.norm/q/k/v/proj_out
        -> {en,de}coder.mid_block.attentions.0.group_norm/to_q/to_k/to_v/to_out.0
           (1x1 conv weights (C, C, 1, 1) <-> linear weights (C, C))
    quant_conv, post_quant_conv            -> same

diffusers' VAE differs from LDM's in what it can express: no attention outside the mid-block,
the first level as wide as conv_in (ch_mult[0] == 1), and latent_channels doubling as LDM's
z_channels and embed_dim. Configs outside that raise ValueError. LDM's `dropout` is a training
setting with no weights and no diffusers field; it is dropped (and read back as 0.0).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ldm.models.autoencoder import AutoencoderKL

LDM_PREFIX = "first_stage_model."
SD_SCALING_FACTOR = 0.18215
SD_RESOLUTION = 256
_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"
_RESNET_RENAMES = {"nin_shortcut": "conv_shortcut"}  # norm1/conv1/norm2/conv2 keep their names
_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Names of diffusers < 0.14, still found in many published VAE folders (e.g. sd-vae-ft-mse).
_LEGACY_ATTN_PARTS = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTN_LINEAR = re.compile(r"(en|de)coder\.mid\.attn_1\.(q|k|v|proj_out)\.weight")


# ---------------------------------------------------------------------------- state dicts


def vae_to_diffusers(sd: dict[str, Tensor], cfg: dict[str, Any]) -> dict[str, Tensor]:
    """LDM-named VAE weights (no `first_stage_model.` prefix) -> diffusers `AutoencoderKL` names."""
    vae_config_to_diffusers(cfg)  # raises if diffusers cannot express this VAE
    shapes = _ldm_shapes(cfg)
    _check_state_dict(sd, shapes, "LDM VAE")
    num_levels = len(cfg["ddconfig"]["ch_mult"])
    return {_diffusers_key(k, num_levels): v.reshape(_diffusers_shape(k, v.shape)) for k, v in sd.items()}


def vae_from_diffusers(sd: dict[str, Tensor], cfg: dict[str, Any]) -> dict[str, Tensor]:
    """diffusers `AutoencoderKL` weights -> LDM names (no prefix); exact inverse of `vae_to_diffusers`.

    Also accepts the attention names of diffusers < 0.14 (query/key/value/proj_attn).
    """
    vae_config_to_diffusers(cfg)
    shapes = _ldm_shapes(cfg)
    num_levels = len(cfg["ddconfig"]["ch_mult"])
    to_ldm = {_diffusers_key(k, num_levels): k for k in shapes}
    sd = {_modern_attention_key(k): v for k, v in sd.items()}
    diffusers_shapes = {d: _diffusers_shape(k, shapes[k]) for d, k in to_ldm.items()}
    _check_state_dict(sd, diffusers_shapes, "diffusers VAE")
    return {to_ldm[k]: v.reshape(shapes[to_ldm[k]]) for k, v in sd.items()}


def _ldm_shapes(cfg: dict[str, Any]) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = AutoencoderKL(cfg["ddconfig"], cfg["embed_dim"])
    return {k: v.shape for k, v in model.state_dict().items()}


def _diffusers_shape(ldm_key: str, shape: torch.Size) -> torch.Size:
    return shape[:2] if _ATTN_LINEAR.fullmatch(ldm_key) else shape


def _modern_attention_key(key: str) -> str:
    head, sep, tail = key.partition(".attentions.0.")
    if not sep:
        return key
    part, dot, param = tail.rpartition(".")
    return f"{head}{sep}{_LEGACY_ATTN_PARTS.get(part, part)}{dot}{param}"


def _diffusers_key(ldm_key: str, num_levels: int) -> str:
    module, param = ldm_key.rsplit(".", 1)
    for pattern, rename in _MODULE_RULES:
        if match := re.fullmatch(pattern, module):
            return f"{rename(match, num_levels)}.{param}"
    raise ValueError(f"no diffusers name for LDM VAE key {ldm_key!r}")


_Rule = tuple[str, Callable[[re.Match[str], int], str]]
_MODULE_RULES: list[_Rule] = [
    (r"(?:en|de)coder\.conv_(?:in|out)|(?:post_)?quant_conv", lambda m, n: m[0]),
    (r"(encoder|decoder)\.norm_out", lambda m, n: f"{m[1]}.conv_norm_out"),
    (
        r"(encoder|decoder)\.mid\.block_([12])\.(\w+)",
        lambda m, n: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_resnet_part(m[3])}",
    ),
    (
        r"(encoder|decoder)\.mid\.attn_1\.(\w+)",
        lambda m, n: f"{m[1]}.mid_block.attentions.0.{_ATTN_PARTS[m[2]]}",
    ),
    (
        r"encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)",
        lambda m, n: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_resnet_part(m[3])}",
    ),
    (
        r"encoder\.down\.(\d+)\.downsample\.conv",
        lambda m, n: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv",
    ),
    (
        r"decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)",
        lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets.{m[2]}.{_resnet_part(m[3])}",
    ),
    (
        r"decoder\.up\.(\d+)\.upsample\.conv",
        lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0.conv",
    ),
]


def _resnet_part(name: str) -> str:
    return _RESNET_RENAMES.get(name, name)


def _check_state_dict(sd: dict[str, Tensor], expected: dict[str, torch.Size], what: str) -> None:
    missing = sorted(expected.keys() - sd.keys())
    unexpected = sorted(sd.keys() - expected.keys())
    if missing or unexpected:
        hint = ""
        if unexpected and all(k.startswith(LDM_PREFIX) for k in unexpected):
            hint = f" (strip the {LDM_PREFIX!r} prefix first)"
        raise ValueError(
            f"{what} state dict does not fit the config: missing keys {_listing(missing)}; "
            f"unexpected keys {_listing(unexpected)}{hint}"
        )
    wrong = [
        f"{k}: {tuple(sd[k].shape)} != expected {tuple(s)}" for k, s in expected.items() if sd[k].shape != s
    ]
    if wrong:
        raise ValueError(f"{what} state dict has wrong shapes for the config: {_listing(wrong)}")


def _listing(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}{more}]"


# ---------------------------------------------------------------------------- configs


def vae_config_to_diffusers(cfg: dict[str, Any], scaling_factor: float = SD_SCALING_FACTOR) -> dict[str, Any]:
    """Our `{"ddconfig", "embed_dim"}` -> kwargs (and config.json fields) of diffusers `AutoencoderKL`."""
    dd = cfg["ddconfig"]
    problems = []
    if dd["attn_resolutions"]:
        problems.append(
            f"attn_resolutions={list(dd['attn_resolutions'])} (diffusers only has the mid-block attention)"
        )
    if dd["ch_mult"][0] != 1:
        problems.append(
            f"ch_mult[0]={dd['ch_mult'][0]} (diffusers' first level is as wide as conv_in: needs 1)"
        )
    if cfg["embed_dim"] != dd["z_channels"]:
        problems.append(
            f"embed_dim={cfg['embed_dim']} != z_channels={dd['z_channels']} (one latent_channels)"
        )
    if not dd["double_z"]:
        problems.append("double_z=False (the KL autoencoder encodes mean and logvar)")
    if problems:
        raise ValueError("diffusers' AutoencoderKL cannot express this VAE: " + "; ".join(problems))
    num_levels = len(dd["ch_mult"])
    return {
        "in_channels": dd["in_channels"],
        "out_channels": dd["out_ch"],
        "down_block_types": [_DOWN_BLOCK] * num_levels,
        "up_block_types": [_UP_BLOCK] * num_levels,
        "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]],
        "layers_per_block": dd["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": dd["z_channels"],
        "norm_num_groups": 32,
        "sample_size": dd["resolution"],
        "scaling_factor": scaling_factor,
    }


_DIFFUSERS_REQUIRED = (
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "latent_channels",
)


def vae_config_from_diffusers(dcfg: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """diffusers `AutoencoderKL` config (config.json dict) -> (our cfg, scaling_factor).

    A missing `scaling_factor` (configs older than diffusers 0.13) means SD's 0.18215, as in diffusers.
    """
    missing = [k for k in _DIFFUSERS_REQUIRED if k not in dcfg]
    if missing:
        raise ValueError(f"diffusers VAE config lacks {missing}")
    problems = _diffusers_config_problems(dcfg)
    if problems:
        raise ValueError(
            "cannot build an LDM AutoencoderKL from this diffusers config: " + "; ".join(problems)
        )
    widths = list(dcfg["block_out_channels"])
    ch = widths[0]
    ddconfig = {
        "double_z": True,
        "z_channels": dcfg["latent_channels"],
        "resolution": _square_size(dcfg.get("sample_size", SD_RESOLUTION)),
        "in_channels": dcfg["in_channels"],
        "out_ch": dcfg["out_channels"],
        "ch": ch,
        "ch_mult": [w // ch for w in widths],
        "num_res_blocks": dcfg["layers_per_block"],
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    cfg = {"ddconfig": ddconfig, "embed_dim": dcfg["latent_channels"]}
    return cfg, float(dcfg.get("scaling_factor", SD_SCALING_FACTOR))


def _diffusers_config_problems(dcfg: dict[str, Any]) -> list[str]:
    widths = list(dcfg["block_out_channels"])
    down, up = list(dcfg["down_block_types"]), list(dcfg["up_block_types"])
    checks = [
        (
            down == [_DOWN_BLOCK] * len(widths),
            f"down_block_types={down} (need {len(widths)} x {_DOWN_BLOCK})",
        ),
        (up == [_UP_BLOCK] * len(widths), f"up_block_types={up} (need {len(widths)} x {_UP_BLOCK})"),
        (
            all(w % widths[0] == 0 for w in widths),
            f"block_out_channels={widths} are not multiples of the first",
        ),
        (dcfg.get("act_fn", "silu") == "silu", f"act_fn={dcfg.get('act_fn')!r} (LDM uses silu)"),
        (
            dcfg.get("norm_num_groups", 32) == 32,
            f"norm_num_groups={dcfg.get('norm_num_groups')} (LDM uses 32)",
        ),
        (dcfg.get("use_quant_conv", True), "use_quant_conv=False (LDM has quant_conv)"),
        (dcfg.get("use_post_quant_conv", True), "use_post_quant_conv=False (LDM has post_quant_conv)"),
        (dcfg.get("mid_block_add_attention", True), "mid_block_add_attention=False (LDM has it)"),
        (
            dcfg.get("shift_factor") is None,
            f"shift_factor={dcfg.get('shift_factor')} (LDM latents only scale)",
        ),
    ]
    return [problem for ok, problem in checks if not ok]


def _square_size(size: int | Iterable[int]) -> int:
    if isinstance(size, int):
        return size
    sides = set(size)
    if len(sides) != 1:
        raise ValueError(f"LDM's VAE resolution is one side length; got sample_size={list(size)}")
    return sides.pop()


def vae_config_from_state_dict(sd: dict[str, Tensor], resolution: int = SD_RESOLUTION) -> dict[str, Any]:
    """Infer our cfg from the shapes of LDM-named VAE weights (no `first_stage_model.` prefix).

    `resolution` is not stored in weights; it only places attention levels found in `sd`
    (`encoder.down.{i}.attn`) at resolution / 2^i, so SD's 256 is the default.
    """
    needed = [
        "encoder.conv_in.weight",
        "encoder.conv_out.weight",
        "decoder.conv_in.weight",
        "decoder.conv_out.weight",
        "post_quant_conv.weight",
        "encoder.down.0.block.0.conv1.weight",
    ]
    missing = [k for k in needed if k not in sd]
    if missing:
        hint = (
            f" (strip the {LDM_PREFIX!r} prefix first)" if any(k.startswith(LDM_PREFIX) for k in sd) else ""
        )
        raise ValueError(f"not an LDM VAE state dict: missing {missing}{hint}")
    ch, in_channels = sd["encoder.conv_in.weight"].shape[:2]
    z_channels = sd["decoder.conv_in.weight"].shape[1]
    num_levels = _count(sd, r"encoder\.down\.(\d+)\.")
    attn_levels = _indices(sd, r"encoder\.down\.(\d+)\.attn\.")
    ddconfig = {
        "double_z": sd["encoder.conv_out.weight"].shape[0] == 2 * z_channels,
        "z_channels": z_channels,
        "resolution": resolution,
        "in_channels": in_channels,
        "out_ch": sd["decoder.conv_out.weight"].shape[0],
        "ch": ch,
        "ch_mult": [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(num_levels)],
        "num_res_blocks": _count(sd, r"encoder\.down\.0\.block\.(\d+)\."),
        "attn_resolutions": [resolution >> i for i in sorted(attn_levels)],
        "dropout": 0.0,
    }
    return {"ddconfig": ddconfig, "embed_dim": sd["post_quant_conv.weight"].shape[1]}


def _indices(sd: dict[str, Tensor], pattern: str) -> set[int]:
    return {int(m[1]) for k in sd if (m := re.match(pattern, k))}


def _count(sd: dict[str, Tensor], pattern: str) -> int:
    found = _indices(sd, pattern)
    if found != set(range(len(found))):
        raise ValueError(f"LDM VAE state dict has gaps in the indices of {pattern!r}: {sorted(found)}")
    return len(found)

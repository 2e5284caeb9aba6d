"""UNet weights and configs: original LDM names <-> diffusers `UNet2DConditionModel`.

Pure functions on state dicts (without the `model.diffusion_model.` prefix) and config dicts; no
file IO. "cfg" is always our `UNetModel` kwargs (the `params` of an original LDM yaml).

Name mapping (LDM -> diffusers), with level/index counted per resolution level:

    time_embed.{0,2}            time_embedding.linear_{1,2}
    label_emb.0.{0,2}           class_embedding.linear_{1,2}     (class_embed_type="projection")
    input_blocks.0.0            conv_in
    input_blocks.n.0 / .1       down_blocks.L.resnets.j / .attentions.j
    input_blocks.n.0.op         down_blocks.L.downsamplers.0.conv
    middle_block.0 / .1 / .2    mid_block.resnets.0 / .attentions.0 / .resnets.1
    output_blocks.n.0 / .1      up_blocks.U.resnets.j / .attentions.j
    output_blocks.n.k.conv      up_blocks.U.upsamplers.0.conv    (the block's last layer)
    out.0 / out.2               conv_norm_out / conv_out
    in a res block: in_layers.0 norm1, in_layers.2 conv1, emb_layers.1 time_emb_proj,
                    out_layers.0 norm2, out_layers.3 conv2, skip_connection conv_shortcut
    transformer internals keep their names.

Heads: diffusers' `attention_head_dim` is, for historical reasons, the number of heads (an int
for SD1's fixed 8 heads, a per-level list for SD2's 64-channel heads); it is mapped as such.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ldm.models.unet import Downsample, ResBlock, SpatialTransformer, UNetModel, Upsample

_RESBLOCK_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}

# diffusers options our UNet implements one way only: the values accepted (the first is SD's).
_DIFFUSERS_FIXED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "act_fn": ("silu",),
    "norm_num_groups": (32,),
    "norm_eps": (1e-5,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "num_attention_heads": (None,),
    "num_class_embeds": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
}
# Written out by unet_config_to_diffusers so a saved config.json states SD's numerics.
_DIFFUSERS_EMITTED = (
    "center_input_sample",
    "flip_sin_to_cos",
    "freq_shift",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "downsample_padding",
    "mid_block_scale_factor",
    "mid_block_type",
)
# No effect on the weights or on float32 results (upcast_attention only matters in fp16).
_DIFFUSERS_IGNORED = {"sample_size", "upcast_attention", "addition_embed_type_num_heads"}
# diffusers' constructor defaults, for configs that leave a mapped option out.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "cross_attention_dim": 1280,
    "attention_head_dim": 8,
    "use_linear_projection": False,
    "dropout": 0.0,
    "class_embed_type": None,
    "projection_class_embeddings_input_dim": None,
}
_LDM_PREFIX = "model.diffusion_model."


# ---------------------------------------------------------------------------- weights


def unet_to_diffusers(sd: Mapping[str, Tensor], cfg: Mapping[str, Any]) -> dict[str, Tensor]:
    """LDM-named UNet weights -> `UNet2DConditionModel` names (the tensors themselves, not copies)."""
    unet_config_to_diffusers(cfg)  # raises if diffusers cannot express this UNet
    key_map, shapes = _layout(cfg)
    _check_fits(sd, shapes, "LDM")
    return {key_map[k]: v for k, v in sd.items()}


def diffusers_key_map(cfg: Mapping[str, Any]) -> dict[str, str]:
    """LDM key -> `UNet2DConditionModel` key for every weight of the UNet `cfg` describes."""
    unet_config_to_diffusers(cfg)
    return _layout(cfg)[0]


def unet_from_diffusers(sd: Mapping[str, Tensor], cfg: Mapping[str, Any]) -> dict[str, Tensor]:
    """`UNet2DConditionModel` weights -> LDM names; the exact inverse of `unet_to_diffusers`.

    `proj_in`/`proj_out` weights stored as the other kind of projection (1x1 conv vs linear) are
    reshaped to the kind `cfg` asks for.
    """
    unet_config_to_diffusers(cfg)
    key_map, shapes = _layout(cfg)
    expected = {key_map[k]: shape for k, shape in shapes.items()}
    fitted = {k: _as_projection(k, v, expected[k]) if k in expected else v for k, v in sd.items()}
    _check_fits(fitted, expected, "diffusers")
    to_ldm = {d: k for k, d in key_map.items()}
    return {to_ldm[k]: v for k, v in fitted.items()}


def _layout(cfg: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, torch.Size]]:
    """LDM key -> diffusers key, and LDM key -> shape, read off a meta-device model."""
    with torch.device("meta"):
        model = UNetModel(**cfg)
    modules = _module_map(model)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    return {k: _rename(k, modules) for k in shapes}, shapes


def _module_map(model: UNetModel) -> dict[str, str]:
    """LDM module path -> diffusers module path for every module that holds parameters."""
    names = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": "class_embedding.linear_1",
        "label_emb.0.2": "class_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }
    level, j = 0, 0
    for n, block in enumerate(model.input_blocks[1:], start=1):
        for i, layer in enumerate(block):
            names.update(_layer_names(f"input_blocks.{n}.{i}", f"down_blocks.{level}", j, layer))
        level, j = (level + 1, 0) if isinstance(block[0], Downsample) else (level, j + 1)
    for i, j in enumerate((0, 0, 1)):
        names.update(_layer_names(f"middle_block.{i}", "mid_block", j, model.middle_block[i]))
    level, j = 0, 0
    for n, block in enumerate(model.output_blocks):
        for i, layer in enumerate(block):
            names.update(_layer_names(f"output_blocks.{n}.{i}", f"up_blocks.{level}", j, layer))
        level, j = (level + 1, 0) if isinstance(block[-1], Upsample) else (level, j + 1)
    return names


def _layer_names(ldm: str, diffusers_block: str, j: int, layer: Any) -> dict[str, str]:
    if isinstance(layer, ResBlock):
        return {f"{ldm}.{a}": f"{diffusers_block}.resnets.{j}.{b}" for a, b in _RESBLOCK_NAMES.items()}
    if isinstance(layer, SpatialTransformer):
        return {ldm: f"{diffusers_block}.attentions.{j}"}
    if isinstance(layer, Downsample):
        return {f"{ldm}.op": f"{diffusers_block}.downsamplers.0.conv"}
    if isinstance(layer, Upsample):
        return {f"{ldm}.conv": f"{diffusers_block}.upsamplers.0.conv"}
    raise TypeError(f"no diffusers name for {type(layer).__name__} at {ldm}")


def _rename(key: str, modules: Mapping[str, str]) -> str:
    """Replace the longest module path of `key` found in `modules`."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in modules:
            return ".".join([modules[prefix], *parts[cut:]])
    raise KeyError(f"no diffusers name for UNet key {key}")


def _check_fits(sd: Mapping[str, Tensor], shapes: Mapping[str, torch.Size], naming: str) -> None:
    missing = sorted(set(shapes) - set(sd))
    unexpected = sorted(set(sd) - set(shapes))
    wrong = sorted(
        f"{k}: {tuple(sd[k].shape)} != {tuple(shapes[k])}"
        for k in set(sd) & set(shapes)
        if sd[k].shape != shapes[k]
    )
    if missing or unexpected or wrong:
        hint = ""
        if any(k.startswith(_LDM_PREFIX) for k in unexpected):
            hint = f" (strip the '{_LDM_PREFIX}' prefix first)"
        raise ValueError(
            f"{naming} UNet state dict does not fit the config{hint}:"
            + _listing("missing", missing)
            + _listing("unexpected", unexpected)
            + _listing("wrong shape", wrong)
        )


def _as_projection(key: str, t: Tensor, shape: torch.Size) -> Tensor:
    """A 1x1-conv projection weight as a linear one or back, when `shape` asks for the other kind."""
    is_projection = key.endswith(("proj_in.weight", "proj_out.weight"))
    if is_projection and t.shape[:2] == shape[:2] and t.numel() == shape.numel():
        return t.reshape(shape)
    return t


def _listing(what: str, items: Sequence[str], limit: int = 20) -> str:
    if not items:
        return ""
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"\n  {what} ({len(items)}): {', '.join(items[:limit])}{more}"


# ---------------------------------------------------------------------------- configs


def unet_config_to_diffusers(cfg: Mapping[str, Any], sample_size: int = 64) -> dict[str, Any]:
    """Our UNetModel kwargs -> `UNet2DConditionModel` kwargs (its config.json, less `_` keys).

    `sample_size` is the latent size the model was trained at (64 for 512 px SD, 96 for 768 px);
    LDM's `image_size` does not carry it.
    """
    c = _canonical(cfg)
    if c["context_dim"] is None:
        raise ValueError("diffusers' cross-attention blocks need context_dim")
    if c["channel_mult"][0] != 1:
        raise ValueError(
            f"channel_mult[0]={c['channel_mult'][0]}: diffusers' first level is as wide as conv_in (needs 1)"
        )
    widths = [c["model_channels"] * m for m in c["channel_mult"]]
    attends = [2**level in c["attention_resolutions"] for level in range(len(widths))]
    dcfg: dict[str, Any] = {
        "sample_size": sample_size,
        "in_channels": c["in_channels"],
        "out_channels": c["out_channels"],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        "block_out_channels": widths,
        "layers_per_block": c["num_res_blocks"],
        "transformer_layers_per_block": c["transformer_depth"],
        "cross_attention_dim": c["context_dim"],
        "attention_head_dim": _diffusers_heads(c, widths, attends),
        "use_linear_projection": c["use_linear_in_transformer"],
        "dropout": c["dropout"],
        **{k: _DIFFUSERS_FIXED[k][0] for k in _DIFFUSERS_EMITTED},
    }
    if c["adm_in_channels"] is not None:
        dcfg["class_embed_type"] = "projection"
        dcfg["projection_class_embeddings_input_dim"] = c["adm_in_channels"]
    return dcfg


def unet_config_from_diffusers(dcfg: Mapping[str, Any]) -> dict[str, Any]:
    """`UNet2DConditionModel` config -> our UNetModel kwargs; inverse of `unet_config_to_diffusers`.

    Raises ValueError on options our UNet does not implement (SDXL's added embeddings, other
    block types, ...), naming them.
    """
    d = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in dcfg.items() if not k.startswith("_")}}
    _check_diffusers_options(d)
    widths = list(d["block_out_channels"])
    model_channels = widths[0]
    if any(w % model_channels for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first")
    attends = [_attends(t, "DownBlock2D") for t in d["down_block_types"]]
    if [_attends(t, "UpBlock2D") for t in reversed(d["up_block_types"])] != attends:
        raise ValueError(
            f"up_block_types {d['up_block_types']} must mirror down_block_types {d['down_block_types']}"
        )
    depth = _collapse(d["transformer_layers_per_block"], len(widths))
    reverse_depth = d["reverse_transformer_layers_per_block"]
    if reverse_depth is not None and list(reverse_depth) != _per_level(depth, len(widths))[::-1]:
        raise ValueError("reverse_transformer_layers_per_block other than the mirror is not supported")
    context_dim = _collapse(d["cross_attention_dim"], len(widths))
    if not isinstance(context_dim, int):
        raise ValueError(f"cross_attention_dim {context_dim}: one context width per level is not supported")
    if d["class_embed_type"] not in (None, "projection"):
        raise ValueError(f"class_embed_type={d['class_embed_type']!r} is not supported (only 'projection')")
    return {
        "in_channels": d["in_channels"],
        "out_channels": d["out_channels"],
        "model_channels": model_channels,
        "attention_resolutions": [2**level for level in reversed(range(len(widths))) if attends[level]],
        "num_res_blocks": _collapse(d["layers_per_block"], len(widths)),
        "channel_mult": [w // model_channels for w in widths],
        **_ldm_heads(d["attention_head_dim"], widths, attends),
        "transformer_depth": depth,
        "context_dim": context_dim,
        "use_linear_in_transformer": d["use_linear_projection"],
        "adm_in_channels": d["projection_class_embeddings_input_dim"] if d["class_embed_type"] else None,
        "dropout": d["dropout"],
    }


def unet_config_from_state_dict(
    sd: Mapping[str, Tensor], *, num_heads: int | None = None, num_head_channels: int | None = None
) -> dict[str, Any]:
    """Infer UNetModel kwargs from the shapes of LDM-named UNet weights.

    Weights do not record heads; absent an override, the SD convention applies: linear
    `proj_in` (SD2) -> `num_head_channels=64`, 1x1-conv `proj_in` (SD1) -> `num_heads=8`. Where 64
    does not divide a transformer's width (small models), heads of gcd(64, widths) channels
    keep the shapes fitting.
    Raises ValueError, listing the offending keys, if the weights do not form such a UNet.
    """
    if "input_blocks.0.0.weight" not in sd or "out.2.weight" not in sd:
        hint = (
            f"; strip the '{_LDM_PREFIX}' prefix first" if any(k.startswith(_LDM_PREFIX) for k in sd) else ""
        )
        raise ValueError(f"not an LDM UNet state dict: no input_blocks.0.0.weight / out.2.weight{hint}")
    model_channels, in_channels = sd["input_blocks.0.0.weight"].shape[:2]
    levels = _read_levels(sd, model_channels)
    attends = [lv["depth"] > 0 for lv in levels]
    middle_depth = _count_transformer_blocks(sd, "middle_block.1.")
    linear = sd["middle_block.1.proj_in.weight"].ndim == 2
    if num_heads is None and num_head_channels is None:
        # Transformer widths: the attention levels and the middle block (the last level's width).
        widths = [model_channels * lv["mult"] for lv in levels if lv["depth"]]
        head_width = math.gcd(64, model_channels * levels[-1]["mult"], *widths)
        num_heads, num_head_channels = (-1, head_width) if linear else (8, -1)
    cfg: dict[str, Any] = {
        "in_channels": in_channels,
        "out_channels": sd["out.2.weight"].shape[0],
        "model_channels": model_channels,
        "attention_resolutions": [2**level for level in reversed(range(len(levels))) if attends[level]],
        "num_res_blocks": _collapse([lv["res_blocks"] for lv in levels], len(levels)),
        "channel_mult": [lv["mult"] for lv in levels],
        "num_heads": -1 if num_heads is None else num_heads,
        "num_head_channels": -1 if num_head_channels is None else num_head_channels,
        # Levels without attention take the middle block's depth, which the UNet reads off the last.
        "transformer_depth": _collapse([lv["depth"] or middle_depth for lv in levels], len(levels)),
        "context_dim": sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        "use_linear_in_transformer": linear,
        "adm_in_channels": sd["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in sd else None,
    }
    _check_fits(sd, _layout(cfg)[1], "LDM")
    return cfg


def _read_levels(sd: Mapping[str, Tensor], model_channels: int) -> list[dict[str, int]]:
    """Per resolution level: res block count, channel multiplier, transformer depth (0: none)."""
    count = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    levels = [{"res_blocks": 0, "mult": 1, "depth": 0}]
    for n in range(1, count):
        if f"input_blocks.{n}.0.op.weight" in sd:
            levels.append({"res_blocks": 0, "mult": 1, "depth": 0})
            continue
        if f"input_blocks.{n}.0.in_layers.2.weight" not in sd:
            raise ValueError(f"input_blocks.{n} is neither a res block nor a conv downsample")
        levels[-1]["res_blocks"] += 1
        levels[-1]["mult"] = sd[f"input_blocks.{n}.0.in_layers.2.weight"].shape[0] // model_channels
        levels[-1]["depth"] = _count_transformer_blocks(sd, f"input_blocks.{n}.1.")
    return levels


def _count_transformer_blocks(sd: Iterable[str], prefix: str) -> int:
    start = f"{prefix}transformer_blocks."
    return len({k[len(start) :].split(".")[0] for k in sd if k.startswith(start)})


def _canonical(cfg: Mapping[str, Any]) -> dict[str, Any]:
    levels = len(cfg["channel_mult"])
    return {
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "model_channels": cfg["model_channels"],
        "attention_resolutions": list(cfg["attention_resolutions"]),
        "num_res_blocks": _collapse(cfg["num_res_blocks"], levels),
        "channel_mult": list(cfg["channel_mult"]),
        "num_heads": cfg.get("num_heads", -1),
        "num_head_channels": cfg.get("num_head_channels", -1),
        "transformer_depth": _collapse(cfg.get("transformer_depth", 1), levels),
        "context_dim": cfg.get("context_dim"),
        "use_linear_in_transformer": cfg.get("use_linear_in_transformer", False),
        "adm_in_channels": cfg.get("adm_in_channels"),
        "dropout": cfg.get("dropout", 0.0),
    }


def _diffusers_heads(c: Mapping[str, Any], widths: list[int], attends: list[bool]) -> int | list[int]:
    if c["num_head_channels"] == -1:
        return c["num_heads"]
    per_head = c["num_head_channels"]
    for width, has_transformer in zip(widths, _transformer_levels(attends), strict=True):
        if has_transformer and width % per_head:
            raise ValueError(f"{width} channels do not split into heads of {per_head} (diffusers needs it)")
    return [w // per_head for w in widths]


def _ldm_heads(heads: int | Sequence[int], widths: list[int], attends: list[bool]) -> dict[str, int]:
    """diffusers' per-level head counts -> num_head_channels if the head width is constant,
    else num_heads if the count is; the two UNet conventions."""
    if isinstance(heads, int):
        return {"num_heads": heads, "num_head_channels": -1}
    pairs = [(w, h) for w, h, a in zip(widths, heads, _transformer_levels(attends), strict=True) if a]
    head_widths = {w // h for w, h in pairs if w % h == 0}
    if len(head_widths) == 1 and all(w % h == 0 for w, h in pairs):
        return {"num_heads": -1, "num_head_channels": head_widths.pop()}
    if len({h for _, h in pairs}) == 1:
        return {"num_heads": pairs[0][1], "num_head_channels": -1}
    raise ValueError(
        f"attention_head_dim {list(heads)}: neither the head count nor the head width is constant"
    )


def _transformer_levels(attends: list[bool]) -> list[bool]:
    """Levels whose width a transformer has: the attention levels, and the last (middle block)."""
    return [*attends[:-1], True]


def _check_diffusers_options(d: Mapping[str, Any]) -> None:
    unsupported = []
    for key, value in d.items():
        if key in _DIFFUSERS_FIXED:
            values = value if isinstance(value, list | tuple) else [value]
            if any(v not in _DIFFUSERS_FIXED[key] for v in values):
                unsupported.append(f"{key}={value!r}")
        elif key not in _DIFFUSERS_DEFAULTS and key not in _DIFFUSERS_IGNORED:
            unsupported.append(f"{key} (unknown option)")
    if unsupported:
        raise ValueError(
            "diffusers UNet config uses options our UNet does not implement: " + ", ".join(unsupported)
        )


def _attends(block_type: str, plain: str) -> bool:
    if block_type not in (plain, f"CrossAttn{plain}"):
        raise ValueError(f"block type {block_type!r} is not supported (only {plain} and CrossAttn{plain})")
    return block_type != plain


def _per_level(value: int | Sequence[int], levels: int) -> list[int]:
    return [value] * levels if isinstance(value, int) else list(value)


def _collapse(value: int | Sequence[int], levels: int) -> int | list[int]:
    """One value per level -> an int when all levels agree (the usual, yaml-friendly form)."""
    values = _per_level(value, levels)
    if len(values) != levels:
        raise ValueError(f"{values} does not give one value per level ({levels})")
    return values[0] if len(set(values)) == 1 else values

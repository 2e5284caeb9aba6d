"""Text-encoder weights and configs: our LDM names <-> diffusers `text_encoder/` (transformers).

LDM names are those below `cond_stage_model.` (what `CLIPTextEmbedder` / `OpenCLIPTextEmbedder`
hold); diffusers names are those of published SD folders' `text_encoder/model.safetensors`:
`CLIPTextModel` names with the `text_model.` level (`text_model.embeddings.*`,
`text_model.encoder.layers.N.*`, `text_model.final_layer_norm.*`), which transformers 4 and tools
reading the tensors directly expect and transformers 5 maps when loading a folder.
transformers 5's own `CLIPTextModel.state_dict()` drops that level: `text_from_diffusers` accepts
either form, and `flat_text_model_names` turns ours into the form its `load_state_dict` takes.

kind "clip" (SD 1.x): the same tensors, `transformer.text_model.` prefix added or removed.

kind "openclip" (SD 2.x): OpenCLIP's fused attention `in_proj` is split into q/k/v and the
blocks renamed. diffusers' SD 2.x text_encoder is a CLIPTextModel that stops at SD 2's
penultimate block, so `text_to_diffusers` of a `layer="penultimate"` tower DROPS its last block,
and always drops `text_projection` / `logit_scale` (CLIPTextModel has no place for them; SD never
uses them). `openclip_keys_dropped_in_diffusers` lists exactly what is dropped. Conversely,
weights from diffusers lack those two tensors, which is how they are told apart: an OpenCLIP
state dict without `model.text_projection` came from diffusers and its last block is the one SD
uses (`layer="last"`); one with it is an SD 2.x-style tower (`layer="penultimate"`).
"""

from __future__ import annotations

import inspect
import math
import re

import torch

from ldm.models.encoders import (
    CLIP_VIT_L_TEXT_CONFIG,
    OPENCLIP_LAYERS,
    CLIPTextEmbedder,
    OpenCLIPTextEmbedder,
    clip_special_token_ids,
)

KINDS = ("clip", "openclip")
CLIP_PREFIX = "transformer.text_model."
HF_PREFIX = "text_model."  # published SD folders (and transformers 4) keep this level
POSITION_IDS = "embeddings.position_ids"

_CLIP_KEY = re.compile(
    r"embeddings\.(token|position)_embedding\.weight"
    r"|encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|layer_norm[12]|mlp\.fc[12])\.(weight|bias)"
    r"|final_layer_norm\.(weight|bias)"
)
_OC_BLOCK = re.compile(r"model\.transformer\.resblocks\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_OC_TOP = {
    "model.token_embedding.weight": "embeddings.token_embedding.weight",
    "model.positional_embedding": "embeddings.position_embedding.weight",
    "model.ln_final.weight": "final_layer_norm.weight",
    "model.ln_final.bias": "final_layer_norm.bias",
}
_OC_EXTRAS = ("model.text_projection", "model.logit_scale")
# Per block, OpenCLIP module -> CLIPEncoderLayer module (the fused in_proj is handled apart).
_OC_BLOCK_MODULES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_QKV = ("q", "k", "v")


def text_to_diffusers(sd: dict, kind: str, layer: str | None = None) -> dict:
    """LDM text-encoder state dict -> diffusers `text_encoder/` (published `text_model.*` names).

    openclip: `layer` is the tower's output layer; None infers it from `sd` (see module doc).
    A penultimate tower loses its last block; text_projection/logit_scale are dropped.
    """
    _check_kind(kind)
    if kind == "clip":
        return _clip_to_diffusers(sd)
    return _openclip_to_diffusers(sd, _openclip_layer(sd, layer))


def text_from_diffusers(sd: dict, kind: str) -> dict:
    """diffusers `text_encoder/` state dict -> LDM names (inverse of `text_to_diffusers`).

    Accepts transformers 5's flattened names (no `text_model.`) too; a stored `position_ids` is ignored.
    openclip: the result has no text_projection/logit_scale; build the embedder with
    `layer="last", projection=False` (what `text_config_from_diffusers` returns).
    """
    _check_kind(kind)
    sd = _strip_hf_prefix(sd)
    _check_clip_names(sd.keys(), "diffusers text_encoder")
    if kind == "clip":
        return {CLIP_PREFIX + k: v for k, v in sd.items()}
    return _openclip_from_diffusers(sd)


def flat_text_model_names(sd: dict) -> dict:
    """diffusers `text_encoder/` names -> transformers 5 `CLIPTextModel` ones (no `text_model.`
    level, no position_ids), what its `load_state_dict` takes (`from_pretrained` maps them itself)."""
    return _strip_hf_prefix(sd)


def openclip_keys_dropped_in_diffusers(sd: dict, layer: str | None = None) -> list[str]:
    """LDM OpenCLIP keys that `text_to_diffusers(sd, "openclip", layer)` leaves out."""
    dropped = [k for k in _OC_EXTRAS if k in sd]
    if _openclip_layer(sd, layer) == "penultimate":
        last = _count_blocks(sd, _OC_BLOCK) - 1
        dropped += [k for k in sd if (m := _OC_BLOCK.fullmatch(k)) and int(m.group(1)) == last]
    return dropped


def text_config_to_diffusers(kind: str, cfg: dict) -> dict:
    """Our embedder kwargs -> transformers CLIPTextConfig dict (diffusers `text_encoder/config.json`)."""
    _check_kind(kind)
    if kind == "clip":
        config = {**CLIP_VIT_L_TEXT_CONFIG, **(cfg.get("config") or {})}
        special = clip_special_token_ids(config["vocab_size"])
        config = {**special, "pad_token_id": special["eos_token_id"], **config}
    else:
        oc = {**_defaults(OpenCLIPTextEmbedder), **cfg}
        config = {
            "vocab_size": oc["vocab_size"],
            "hidden_size": oc["width"],
            "intermediate_size": 4 * oc["width"],
            "num_hidden_layers": oc["layers"] - 1 if oc["layer"] == "penultimate" else oc["layers"],
            "num_attention_heads": oc["heads"],
            "max_position_embeddings": oc["context_length"],
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": oc["width"],
            **clip_special_token_ids(oc["vocab_size"]),
            "pad_token_id": 0,
        }
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **config}


def text_config_from_diffusers(dcfg: dict) -> tuple[str, dict]:
    """diffusers `text_encoder/config.json` -> (kind, our embedder kwargs).

    OpenAI CLIP (SD 1.x) uses quick_gelu, OpenCLIP (SD 2.x) gelu: that tells the kinds apart in
    published folders. A gelu config is CLIP all the same when OpenCLIP could not hold it (MLP
    not 4x wide) or when it pads with `<eot>` (`pad_token_id == eos_token_id`): SD 1.x's padding,
    which `text_config_to_diffusers` writes for every CLIP and never for OpenCLIP (pads with 0).
    An OpenCLIP tower from diffusers has already lost SD's unused last block, so it maps to
    `layers=num_hidden_layers, layer="last", projection=False`.
    """
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if k not in dcfg]
    if missing:
        raise ValueError(f"text_encoder config lacks {missing}; is it a CLIPTextConfig?")
    if not _is_openclip(dcfg):
        arch = {k: dcfg[k] for k in CLIP_VIT_L_TEXT_CONFIG if k in dcfg}
        return "clip", {"config": arch}
    width = dcfg["hidden_size"]
    return "openclip", {
        "width": width,
        "heads": dcfg["num_attention_heads"],
        "layers": dcfg["num_hidden_layers"],
        "vocab_size": dcfg.get("vocab_size", CLIP_VIT_L_TEXT_CONFIG["vocab_size"]),
        "context_length": dcfg.get(
            "max_position_embeddings", CLIP_VIT_L_TEXT_CONFIG["max_position_embeddings"]
        ),
        "layer": "last",
        "projection": False,
    }


def _is_openclip(dcfg: dict) -> bool:
    width = dcfg["hidden_size"]
    pads_with_eot = "pad_token_id" in dcfg and dcfg["pad_token_id"] == dcfg.get("eos_token_id")
    return (
        dcfg.get("hidden_act", CLIP_VIT_L_TEXT_CONFIG["hidden_act"]) == "gelu"
        and dcfg.get("intermediate_size", 4 * width) == 4 * width
        and not pads_with_eot
    )


def text_config_from_state_dict(sd: dict) -> tuple[str, dict]:
    """(kind, our embedder kwargs) from LDM text-encoder names/shapes (no `cond_stage_model.`).

    Heads are not in the weights: CLIP's convention of 64-wide heads is assumed (narrower ones,
    gcd(64, width), for widths that 64 does not divide; any count fits the shapes). CLIP's
    activation is not either: quick_gelu, as in every OpenAI CLIP. OpenCLIP's output layer
    follows the module doc's rule (penultimate unless the weights came from diffusers).
    """
    if any(k.startswith(CLIP_PREFIX) for k in sd):
        return "clip", {"config": _clip_config_from_state_dict(sd)}
    if any(_OC_BLOCK.fullmatch(k) for k in sd):
        return "openclip", _openclip_config_from_state_dict(sd)
    raise ValueError(
        f"not a text encoder state dict: expected `{CLIP_PREFIX}*` or `model.transformer.resblocks.*` keys, "
        f"got e.g. {sorted(sd)[:5]}"
    )


def _clip_to_diffusers(sd: dict) -> dict:
    foreign = sorted(k for k in sd if not k.startswith(CLIP_PREFIX))
    if foreign:
        raise ValueError(f"not CLIP text-encoder keys (expected `{CLIP_PREFIX}*`): {foreign}")
    out = {k[len(CLIP_PREFIX) :]: v for k, v in sd.items() if k != CLIPTextEmbedder.POSITION_IDS}
    _check_clip_names(out.keys(), "LDM CLIP text encoder")
    return {HF_PREFIX + k: v for k, v in out.items()}


def _openclip_to_diffusers(sd: dict, layer: str) -> dict:
    dropped = set(openclip_keys_dropped_in_diffusers(sd, layer))
    out, unknown = {}, []
    for key, value in sd.items():
        if key in dropped:
            continue
        if key in _OC_TOP:
            out[HF_PREFIX + _OC_TOP[key]] = value
        elif (m := _OC_BLOCK.fullmatch(key)) and (names := _openclip_block_to_hf(m.group(2))):
            prefix = f"{HF_PREFIX}encoder.layers.{m.group(1)}."
            if len(names) == 1:
                out[prefix + names[0]] = value
            else:  # clone: views of one storage cannot be saved as separate safetensors entries
                out.update(
                    {prefix + n: part.clone() for n, part in zip(names, value.chunk(3, dim=0), strict=True)}
                )
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unknown OpenCLIP text-encoder keys: {sorted(unknown)}")
    return out


def _openclip_block_to_hf(name: str) -> tuple[str, ...] | None:
    """One OpenCLIP block parameter -> its CLIPEncoderLayer name(s); in_proj -> q, k, v."""
    if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
        suffix = name.rsplit("_", 1)[1]
        return tuple(f"self_attn.{p}_proj.{suffix}" for p in _QKV)
    module, _, param = name.rpartition(".")
    if module in _OC_BLOCK_MODULES and param in ("weight", "bias"):
        return (f"{_OC_BLOCK_MODULES[module]}.{param}",)
    return None


def _openclip_from_diffusers(sd: dict) -> dict:
    top = {hf: oc for oc, hf in _OC_TOP.items()}
    from_hf = {hf: oc for oc, hf in _OC_BLOCK_MODULES.items()}
    out, qkv = {}, {}
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value
            continue
        index, name = _HF_LAYER.fullmatch(key).groups()
        module, _, param = name.rpartition(".")
        block = f"model.transformer.resblocks.{index}."
        if module in from_hf:
            out[f"{block}{from_hf[module]}.{param}"] = value
        else:  # self_attn.{q,k,v}_proj: fused back into in_proj in q, k, v order
            proj = module.removeprefix("self_attn.").removesuffix("_proj")
            qkv.setdefault(f"{block}attn.in_proj_{param}", {})[proj] = value
    for key, parts in qkv.items():
        missing = [p for p in _QKV if p not in parts]
        if missing:
            raise ValueError(f"cannot build {key}: diffusers weights lack its {missing} projection(s)")
        out[key] = torch.cat([parts[p] for p in _QKV], dim=0)
    return out


def _strip_hf_prefix(sd: dict) -> dict:
    out = {}
    for key, value in sd.items():
        key = key[len(HF_PREFIX) :] if key.startswith(HF_PREFIX) else key
        if key != POSITION_IDS:
            out[key] = value
    return out


def _check_clip_names(keys, source: str) -> None:
    unknown = sorted(k for k in keys if not _CLIP_KEY.fullmatch(k))
    if unknown:
        raise ValueError(f"unknown {source} keys: {unknown}")


def _clip_config_from_state_dict(sd: dict) -> dict:
    tokens = _require(sd, CLIP_PREFIX + "embeddings.token_embedding.weight")
    hidden = tokens.shape[1]
    return {
        **CLIP_VIT_L_TEXT_CONFIG,
        "vocab_size": tokens.shape[0],
        "hidden_size": hidden,
        "intermediate_size": _require(sd, CLIP_PREFIX + "encoder.layers.0.mlp.fc1.weight").shape[0],
        "num_hidden_layers": _count_blocks(sd, re.compile(re.escape(CLIP_PREFIX) + _HF_LAYER.pattern)),
        "num_attention_heads": _heads(hidden),
        "max_position_embeddings": _require(sd, CLIP_PREFIX + "embeddings.position_embedding.weight").shape[
            0
        ],
        "projection_dim": hidden,
    }


def _openclip_config_from_state_dict(sd: dict) -> dict:
    tokens = _require(sd, "model.token_embedding.weight")
    width = tokens.shape[1]
    mlp = _require(sd, "model.transformer.resblocks.0.mlp.c_fc.weight").shape[0]
    if mlp != 4 * width:
        raise ValueError(f"OpenCLIP blocks with MLP width {mlp} != 4 * {width} are not supported")
    projection = sd["model.text_projection"].shape[1] if "model.text_projection" in sd else False
    return {
        "width": width,
        "heads": _heads(width),
        "layers": _count_blocks(sd, _OC_BLOCK),
        "vocab_size": tokens.shape[0],
        "context_length": _require(sd, "model.positional_embedding").shape[0],
        "layer": _openclip_layer(sd, None),
        "projection": projection,
    }


def _openclip_layer(sd: dict, layer: str | None) -> str:
    if layer is None:
        return "penultimate" if "model.text_projection" in sd else "last"
    if layer not in OPENCLIP_LAYERS:
        raise ValueError(f"layer must be one of {OPENCLIP_LAYERS}, got {layer!r}")
    return layer


def _count_blocks(sd: dict, pattern: re.Pattern) -> int:
    indices = {int(m.group(1)) for k in sd if (m := pattern.fullmatch(k))}
    if indices != set(range(len(indices))):
        raise ValueError(f"transformer block indices are not 0..N-1: {sorted(indices)}")
    return len(indices)


def _heads(width: int) -> int:
    # Small custom towers (width 32, 96, ...) still load: the widest heads up to 64 that fit.
    return width // math.gcd(64, width)


def _require(sd: dict, key: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"text-encoder state dict lacks {key}")
    return sd[key]


def _defaults(cls: type) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(cls).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"text encoder kind must be one of {KINDS}, got {kind!r}")

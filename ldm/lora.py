"""LoRA (Hu et al. 2021, arXiv:2106.09685) for the UNet: train a low-rank update of chosen layers while
their weights stay frozen, export it as a kohya/sd-scripts `.safetensors` file (what diffusers'
`load_lora_weights`, AUTOMATIC1111 and ComfyUI read), and merge LoRA files into weights for sampling:
their UNet part and their text-encoder part (`lora_te_*`), for SD 1.x's CLIP and SD 2.x's OpenCLIP.

    lora = UNetLoRA(model.unet, rank=8, alpha=8)     # adapters on the attention projections, hooked in
    ...train lora.parameters()...
    save_kohya(lora, model.config["unet"], "style.safetensors")
    merge_lora_file(model, "style.safetensors", scale=0.8)   # W += 0.8 · (α / r) · up @ down

Layers are named as in LDM (`input_blocks.1.1.transformer_blocks.0.attn1.to_q`); files name them as
diffusers does (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`). The adapters
live beside the UNet (forward hooks add their output), so the UNet's own keys stay those of SD files.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ldm.formats.unet import diffusers_key_map

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
KOHYA_PREFIX = "lora_unet_"
PEFT_PREFIX = "unet."


class LoRAAdapter(nn.Module):
    """x -> (α / r) · up(down(x)); `up` starts at zero, so a new adapter changes nothing."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.down.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x)) * self.scale


def target_layers(unet: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> dict[str, nn.Linear]:
    """The UNet's Linear layers whose names end with one of `targets` (e.g. "to_q", "to_out.0")."""
    def named(name: str, target: str) -> bool:
        return name == target or name.endswith("." + target)

    found = {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, nn.Linear) and any(named(name, t) for t in targets)
    }
    missing = [t for t in targets if not any(named(n, t) for n in found)]
    if missing:
        raise ValueError(
            f"LoRA targets {missing} name no Linear layer of this UNet (LoRA adapts Linear layers; proj_in and "
            "proj_out are 1x1 convolutions in SD 1.x UNets)"
        )
    return found


def _key(name: str) -> str:
    return name.replace(".", "__")  # ModuleDict keys cannot hold dots; no UNet name holds "__"


class UNetLoRA(nn.Module):
    """Adapters for `targets` of `unet`, added to their outputs by forward hooks (see `attach`)."""

    def __init__(self, unet: nn.Module, rank: int = 4, alpha: float | None = None,
                 targets: Sequence[str] = DEFAULT_TARGETS):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.rank, self.alpha, self.targets = rank, float(alpha if alpha is not None else rank), tuple(targets)
        layers = target_layers(unet, targets)
        self.adapters = nn.ModuleDict(
            {_key(n): LoRAAdapter(m.in_features, m.out_features, rank, self.alpha) for n, m in layers.items()}
        )
        self._handles: list[Any] = []
        self.attach(unet)

    def layer_names(self) -> list[str]:
        return [k.replace("__", ".") for k in self.adapters]

    def attach(self, unet: nn.Module) -> None:
        """Hook the adapters into `unet` (again after `detach`)."""
        self.detach()
        modules = dict(unet.named_modules())
        for key, adapter in self.adapters.items():
            hook = _AddAdapter(adapter)
            self._handles.append(modules[key.replace("__", ".")].register_forward_hook(hook))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def deltas(self) -> dict[str, Tensor]:
        """LDM weight key (without the UNet prefix) -> the weight update (α / r) · up @ down."""
        return {
            f"{key.replace('__', '.')}.weight": (a.up.weight @ a.down.weight) * a.scale
            for key, a in self.adapters.items()
        }


class _AddAdapter:
    def __init__(self, adapter: LoRAAdapter):
        self.adapter = adapter

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        return output + self.adapter(inputs[0]).to(output.dtype)


# -- files ----------------------------------------------------------------------------------------


def _kohya_stems(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """kohya stem (`lora_unet_down_blocks_0_..._to_q`) -> LDM layer name, for every UNet weight."""
    return {
        KOHYA_PREFIX + d.removesuffix(".weight").replace(".", "_"): k.removesuffix(".weight")
        for k, d in diffusers_key_map(unet_config).items()
        if k.endswith(".weight")
    }


def save_kohya(
    lora: UNetLoRA | None, unet_config: Mapping[str, Any], path: str | Path, text_lora: TextEncoderLoRA | None = None
) -> None:
    """The adapters as a kohya/sd-scripts LoRA file: `<stem>.lora_down.weight`, `.lora_up.weight`, `.alpha`;
    the UNet's as `lora_unet_*`, a text encoder's (`text_lora`) as `lora_te_*`, in one file."""
    if lora is None and text_lora is None:
        raise ValueError("save_kohya: no adapters to save (give the UNet's, the text encoder's, or both)")
    tensors: dict[str, Tensor] = {}

    def put(stem: str, adapter: LoRAAdapter) -> None:
        tensors[f"{stem}.lora_down.weight"] = adapter.down.weight.detach().float().cpu().contiguous()
        tensors[f"{stem}.lora_up.weight"] = adapter.up.weight.detach().float().cpu().contiguous()
        tensors[f"{stem}.alpha"] = adapter.alpha.detach().float().cpu().reshape(())

    if lora is not None:
        to_stem = {ldm: stem for stem, ldm in _kohya_stems(unet_config).items()}
        for key, adapter in lora.adapters.items():
            put(to_stem[key.replace("__", ".")], adapter)
    if text_lora is not None:
        for key, adapter in text_lora.adapters.items():
            put(kohya_text_stem(key.replace("__", ".")), adapter)
    first = lora if lora is not None else text_lora
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(first.rank), "ss_network_alpha": str(first.alpha)}
    from ldm.checkpoint import atomic_write  # renamed into place, with a new file's usual permissions

    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


# -- reading LoRA files -----------------------------------------------------------------------------
#
# Two layouts, for the UNet and the text encoder alike:
# - kohya/sd-scripts (what A1111, ComfyUI and Civitai use): `<stem>.lora_down.weight`, `<stem>.lora_up.weight`,
#   `<stem>.alpha`, stems `lora_unet_<diffusers path with _>` and `lora_te_<transformers CLIPTextModel path
#   with _>`. SD 2.x files name the OpenCLIP text tower by the CLIPTextModel sd-scripts converts it into
#   (library/model_util.py): OpenCLIP's fused `attn.in_proj` is split in three (q, k, v rows in that order),
#   `attn.out_proj` is `self_attn.out_proj`, `mlp.c_fc` / `mlp.c_proj` are `mlp.fc1` / `mlp.fc2`.
# - diffusers/peft: `unet.<diffusers path>.lora_A/lora_B[.default].weight` and `text_encoder.<CLIPTextModel
#   path>.lora_A/...`, alpha optional (`<path>.alpha`).
# Each layer's update is W += scale · (α / r) · up @ down, r = down's rows, α = the file's alpha (r when the
# file has none), as kohya's LoRAModule.merge_to and A1111's Lora extension compute it.

TEXT_KOHYA_PREFIX = "lora_te_"
TEXT_PEFT_PREFIX = "text_encoder."
UNET_KEY = "model.diffusion_model."  # where the UNet's weights sit in a StableDiffusion model
TEXT_KEY = "cond_stage_model."  # and the text encoder's

_KOHYA_KEY = re.compile(r"(?P<stem>lora_(?P<part>unet|te)_[^.]+)\.(?P<what>lora_down\.weight|lora_up\.weight|alpha)")
_PEFT_KEY = re.compile(
    r"(?P<part>unet|text_encoder)\.(?P<stem>.+?)\.(?P<what>lora_[AB](?:\.default)?\.weight|alpha)"
)
_ROLE = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_CLIP_LINEAR = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")


def _load(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lora={path} does not exist")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for foreign files
        raise ValueError(f"lora={path} is not a safetensors file ({err})") from None


def is_lora_file(path: str | Path) -> bool:
    """Whether `path` is a LoRA file (kohya or peft keys only, read from the header), not a checkpoint."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception:  # not a safetensors file: the checkpoint loader says what it is
        return False
    return bool(keys) and all(_KOHYA_KEY.fullmatch(k) or _PEFT_KEY.fullmatch(k) for k in keys)


def _listed(names: Sequence[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _unknown_keys_hint(keys: Sequence[str]) -> str:
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys):
        return " (lora_te1_/lora_te2_ are SDXL's two text encoders: an SDXL LoRA, for another architecture)"
    if any(re.search(r"\.(hada_|lokr_|dora_scale|diff|lora_mid|b_norm|w_norm)", k) for k in keys):
        return " (LoHa, LoKr, DoRA, LoCon mid weights and full diffs are not supported: only plain LoRA)"
    return ""


def _layers(sd: Mapping[str, Tensor], path: Path | str) -> dict[tuple[str, str, str], dict[str, Tensor]]:
    """(part "unet"|"text", layout "kohya"|"peft", layer name as the file spells it) -> {down, up, alpha}.
    Every key must be one of these; the rest is an error that names them."""
    layers: dict[tuple[str, str, str], dict[str, Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        if m := _KOHYA_KEY.fullmatch(key):
            part, layout, stem, role = ("unet" if m["part"] == "unet" else "text"), "kohya", m["stem"], _ROLE[m["what"]]
        elif m := _PEFT_KEY.fullmatch(key):
            part, layout, stem = ("unet" if m["part"] == "unet" else "text"), "peft", m["stem"]
            role = "alpha" if m["what"] == "alpha" else ("down" if m["what"].startswith("lora_A") else "up")
        else:
            unknown.append(key)
            continue
        layers.setdefault((part, layout, stem), {})[role] = value
    if unknown:
        raise ValueError(
            f"lora={path}: keys this LoRA loader does not know: {_listed(unknown)}{_unknown_keys_hint(unknown)}"
        )
    for (_, layout, stem), parts in layers.items():
        for need in ("down", "up"):
            if need not in parts:
                name = {("kohya", "down"): "lora_down", ("kohya", "up"): "lora_up",
                        ("peft", "down"): "lora_A", ("peft", "up"): "lora_B"}[layout, need]
                raise ValueError(f"lora={path}: {stem}.{name}.weight is missing (each down/A matrix needs its up/B matrix)")
    if not layers:
        raise ValueError(f"lora={path} holds no LoRA weights (expected kohya 'lora_unet_*' or 'unet.*lora_A' keys)")
    return layers


def _alpha(parts: Mapping[str, Tensor]) -> float:
    return float(parts["alpha"]) if "alpha" in parts else float(parts["down"].shape[0])


def _changes_text_encoder(sd: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("lora_te", TEXT_PEFT_PREFIX)) for k in sd)


def _unet_layer_names(layers, unet_config: Mapping[str, Any], path: Path | str) -> dict[tuple, str]:
    """The UNet entries of `layers` -> their LDM layer names (`input_blocks.1.1...attn1.to_q`)."""
    kohya = _kohya_stems(unet_config)
    peft = {d.removesuffix(".weight"): k.removesuffix(".weight") for k, d in diffusers_key_map(unet_config).items()}
    names, unknown = {}, []
    for entry in layers:
        part, layout, stem = entry
        if part != "unet":
            continue
        name = (kohya if layout == "kohya" else peft).get(stem)
        if name is None:
            unknown.append(stem)
        else:
            names[entry] = name
    if unknown:
        raise ValueError(
            f"lora={path}: LoRA layers this UNet does not have: {_listed(unknown)} (a LoRA made for another "
            "architecture? SD 1.x and 2.x UNets differ in depth and width)"
        )
    return names


def read_lora_file(path: str | Path, unet_config: Mapping[str, Any]) -> dict[str, Tensor]:
    """A LoRA file's UNet weight updates, LDM weight key -> (α / r) · up @ down (unscaled by the user's
    scale). Reads kohya/sd-scripts files and diffusers/peft ones (`unet.<path>.lora_A/lora_B.weight`);
    refuses files that also change the text encoder (`merge_lora_file` applies those)."""
    sd = _load(path)
    if _changes_text_encoder(sd):
        raise ValueError(f"lora={path} also changes the text encoder: apply it with merge_lora_file")
    layers = _layers(sd, path)
    return {
        f"{name}.weight": _delta(layers[e]["down"], layers[e]["up"], _alpha(layers[e]))
        for e, name in _unet_layer_names(layers, unet_config, path).items()
    }


@dataclass(frozen=True)
class TextTarget:
    """Where a text-encoder LoRA layer (named as in transformers' CLIPTextModel) lives in our encoder: a
    weight below `cond_stage_model.`, and for OpenCLIP's fused in_proj the rows of q, k or v in it."""

    weight: str
    rows: tuple[int, int] | None
    in_features: int
    out_features: int


def text_encoder_targets(text_encoder: nn.Module) -> dict[str, TextTarget]:
    """The Linear layers kohya's text-encoder LoRA adapts (those of CLIPAttention and CLIPMLP), by their
    CLIPTextModel names (`text_model.encoder.layers.N.self_attn.q_proj`, `...mlp.fc1`), for SD 1.x's
    CLIP (`CLIPTextEmbedder`) and SD 2.x's OpenCLIP tower (`OpenCLIPTextEmbedder`, mapped as sd-scripts
    converts it). Every block is listed, the penultimate-layer tower's unused last one too."""
    holder = getattr(text_encoder, "transformer", None)
    if holder is not None and hasattr(holder, "text_model"):  # CLIP (transformers)
        return {
            name: TextTarget(f"transformer.{name}.weight", None, m.in_features, m.out_features)
            for name, m in holder.named_modules()
            if isinstance(m, nn.Linear) and _CLIP_LINEAR.fullmatch(name)
        }
    tower = getattr(text_encoder, "model", None)
    blocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
    if blocks is None:
        raise ValueError(f"text-encoder LoRA: {type(text_encoder).__name__} is neither a CLIP nor an OpenCLIP text encoder")
    targets: dict[str, TextTarget] = {}
    for i, block in enumerate(blocks):
        ours, theirs = f"model.transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        attn = block.attn
        if getattr(attn, "in_proj_weight", None) is None:
            raise ValueError("text-encoder LoRA: this OpenCLIP tower's attention has no fused in_proj weight")
        width = attn.embed_dim
        for j, proj in enumerate(("q", "k", "v")):
            targets[f"{theirs}self_attn.{proj}_proj"] = TextTarget(
                f"{ours}attn.in_proj_weight", (j * width, (j + 1) * width), width, width
            )
        for hf, oc in (("self_attn.out_proj", attn.out_proj), ("mlp.fc1", block.mlp.c_fc), ("mlp.fc2", block.mlp.c_proj)):
            name = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}[hf]
            targets[theirs + hf] = TextTarget(f"{ours}{name}.weight", None, oc.in_features, oc.out_features)
    return targets


def kohya_text_stem(name: str) -> str:
    """A CLIPTextModel layer name as kohya names it in files: `lora_te_text_model_encoder_layers_0_..._q_proj`."""
    return TEXT_KOHYA_PREFIX + name.replace(".", "_")


def _describe_text_encoder(text_encoder: nn.Module, targets: Mapping[str, TextTarget]) -> str:
    kind = "CLIP (SD 1.x)" if hasattr(text_encoder, "transformer") else "OpenCLIP (SD 2.x)"
    layers = len({n.split(".")[3] for n in targets})
    width = next(iter(targets.values())).in_features if targets else 0
    return f"this model's text encoder is {kind} with {layers} layers of width {width}"


def _text_deltas(layers, text_encoder: nn.Module, path: Path | str) -> dict[str, Tensor]:
    """The text-encoder entries of `layers` as updates of the encoder's weights (keys below
    `cond_stage_model.`); q, k and v updates of one fused in_proj are summed into one full-size update."""
    entries = {e: parts for e, parts in layers.items() if e[0] == "text"}
    if not entries:
        return {}
    targets = text_encoder_targets(text_encoder)
    by_stem = {kohya_text_stem(n): n for n in targets}
    params = dict(text_encoder.named_parameters())
    deltas: dict[str, Tensor] = {}
    unknown, misfit = [], []
    for (_, layout, stem), parts in entries.items():
        if layout == "kohya":
            name = by_stem.get(stem)
        else:  # peft: text_encoder.text_model.encoder... (or transformers 5's names without text_model.)
            name = stem if stem in targets else (f"text_model.{stem}" if f"text_model.{stem}" in targets else None)
        if name is None:
            unknown.append(stem)
            continue
        target, down, up = targets[name], parts["down"], parts["up"]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0] or (
            (up.shape[0], down.shape[1]) != (target.out_features, target.in_features)
        ):
            misfit.append(f"{stem} {tuple(up.shape)}@{tuple(down.shape)} for a {target.in_features}->{target.out_features} layer")
            continue
        update = _delta(down, up, _alpha(parts))
        full = deltas.setdefault(target.weight, torch.zeros(params[target.weight].shape, dtype=torch.float32))
        if target.rows is None:
            full += update
        else:
            full[target.rows[0] : target.rows[1]] += update
    about = _describe_text_encoder(text_encoder, targets)
    if unknown:
        raise ValueError(
            f"lora={path}: text-encoder layer{'s' if len(unknown) > 1 else ''} {_listed(unknown)} "
            f"{'are' if len(unknown) > 1 else 'is'} not in this model ({about}: a LoRA made for another architecture?)"
        )
    if misfit:
        raise ValueError(f"lora={path}: text-encoder LoRA shapes do not fit ({about}; a LoRA for another "
                         f"architecture?): {_listed(misfit)}")
    return deltas


def lora_deltas(model: nn.Module, path: str | Path) -> dict[str, Tensor]:
    """A LoRA file's weight updates for a StableDiffusion model, (α / r) · up @ down unscaled by the user's
    scale, keyed by the model's own parameter names (`model.diffusion_model.*`, `cond_stage_model.*`).
    Every key of the file is read, and every layer checked against the model (names and shapes), so a
    file for another architecture is refused before anything changes."""
    sd = _load(path)
    layers = _layers(sd, path)
    deltas = {TEXT_KEY + k: v for k, v in _text_deltas(layers, model.cond_stage_model, path).items()}
    params = dict(model.named_parameters())
    misfit = []
    for entry, name in _unet_layer_names(layers, model.config["unet"], path).items():
        parts = layers[entry]
        key = f"{UNET_KEY}{name}.weight"
        weight, down, up = params[key], parts["down"], parts["up"]
        if up.shape[0] != weight.shape[0] or down.flatten(1).shape[1] != weight[0].numel() or up.flatten(1).shape[1] != down.shape[0]:
            misfit.append(f"{entry[2]} {tuple(up.shape)}@{tuple(down.shape)} for a {tuple(weight.shape)} weight")
            continue
        deltas[key] = _delta(down, up, _alpha(parts)).reshape(weight.shape)
    if misfit:
        raise ValueError(f"lora={path}: LoRA shapes do not fit this UNet (a LoRA for another architecture? SD 1.x "
                         f"cross-attention reads 768-wide text, SD 2.x 1024): {_listed(misfit)}")
    return deltas


def _delta(down: Tensor, up: Tensor, alpha: float) -> Tensor:
    """(α / r) · up @ down for Linear layers and 1x1 convolutions (kohya stores both)."""
    if down.dim() == 4 and down.shape[-2:] != (1, 1):
        raise ValueError(f"LoRA on a {tuple(down.shape[-2:])} convolution (LoCon) is not supported")
    rank = down.shape[0]
    delta = up.flatten(1).float() @ down.flatten(1).float() * (alpha / rank)
    return delta.reshape(up.shape[0], down.shape[1], *down.shape[2:]) if down.dim() == 4 else delta


@torch.no_grad()
def merge_deltas(unet: nn.Module, deltas: Mapping[str, Tensor], scale: float = 1.0) -> None:
    """W += scale · Δ for each weight key of `deltas` below `unet` (any module: the UNet with LDM keys, or a
    whole StableDiffusion model with `lora_deltas`' keys); shapes must fit, 1x1 convs and Linears mix."""
    params = dict(unet.named_parameters())
    for key, delta in deltas.items():
        if key not in params:
            raise ValueError(f"LoRA layer {key} is not in this model")
        weight = params[key]
        weight += (scale * delta.to(weight.device, torch.float32)).reshape(weight.shape).to(weight.dtype)


def merge_lora_file(model: nn.Module, path: str | Path, scale: float = 1.0) -> None:
    """Merge a LoRA file into a StableDiffusion model at `scale`: its UNet part and its text-encoder part
    (SD 1.x CLIP or SD 2.x OpenCLIP), all checked before any weight changes."""
    merge_deltas(model, lora_deltas(model, path), scale)


@contextmanager
def loras_merged(model: nn.Module, loras: Sequence[tuple[str | Path, float]]) -> Iterator[list[str]]:
    """`model` with the LoRA files merged (each at its scale, in order, as `sample.py lora=` merges them)
    inside the block, and its weights exactly as they were after it. Yields the parameter names changed."""
    deltas = [(lora_deltas(model, path), float(scale)) for path, scale in loras]  # every file checked first
    params = dict(model.named_parameters())
    keys = sorted({k for d, _ in deltas for k in d})
    saved = {k: params[k].detach().clone() for k in keys}
    try:
        for d, scale in deltas:
            merge_deltas(model, d, scale)
        yield keys
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)


def adapter_deltas(state_dict: Mapping[str, Tensor], prefix: str = "lora.adapters.") -> dict[str, Tensor]:
    """The weight updates of adapters saved in a training checkpoint (keys `lora.adapters.<name>.*`)."""
    names: Iterable[str] = {k[len(prefix) :].split(".")[0] for k in state_dict if k.startswith(prefix)}
    return {
        f"{n.replace('__', '.')}.weight": _delta(
            state_dict[f"{prefix}{n}.down.weight"], state_dict[f"{prefix}{n}.up.weight"],
            float(state_dict[f"{prefix}{n}.alpha"]),
        )
        for n in names
    }


# -- training a text-encoder LoRA ---------------------------------------------------------------------------
#
#     text_lora = TextEncoderLoRA(model.cond_stage_model, rank=8, alpha=8)   # hooked in; the encoder stays frozen
#     ...train text_lora.parameters() (its own learning rate)...
#     save_kohya(unet_lora, model.config["unet"], "style.safetensors", text_lora=text_lora)   # lora_unet_* + lora_te_*
#
# Layers are named as kohya names them (transformers CLIPTextModel names, for OpenCLIP too: see
# `text_encoder_targets`). CLIP's Linears get forward hooks that add the adapter's output, as UNetLoRA's do.
# OpenCLIP's q, k, v and out_proj sit inside nn.MultiheadAttention, which reads `in_proj_weight` and
# `out_proj.weight` as tensors (no Linear call to hook), so for the length of its forward those two are
# W + (α / r) · up @ down (q, k, v rows stacked), the Parameters put back after; W itself never changes and
# the encoder's state_dict keeps its LDM names whenever it is read.

TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # kohya: CLIPAttention and CLIPMLP Linears


class TextEncoderLoRA(nn.Module):
    """Adapters for `targets` of every layer of a CLIP or OpenCLIP text encoder, hooked in (see `attach`)."""

    def __init__(self, text_encoder: nn.Module, rank: int = 4, alpha: float | None = None,
                 targets: Sequence[str] = TEXT_TARGETS):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        unknown = sorted(set(targets) - set(TEXT_TARGETS))
        if unknown:
            raise ValueError(f"text-encoder LoRA targets {unknown} are not among {list(TEXT_TARGETS)}")
        self.rank, self.alpha, self.targets = rank, float(alpha if alpha is not None else rank), tuple(targets)
        # SD 2.x's tower skips its last block (penultimate layer): no adapters there, as sd-scripts' 23-layer
        # CLIPTextModel has none (and diffusers' SD 2.x text encoder has no 24th layer to load them into).
        used = getattr(text_encoder, "num_blocks_used", None)
        chosen = {
            n: t for n, t in text_encoder_targets(text_encoder).items()
            if n.rsplit(".", 1)[-1] in self.targets and (used is None or int(n.split(".")[3]) < used)
        }
        self.adapters = nn.ModuleDict(
            {_key(n): LoRAAdapter(t.in_features, t.out_features, rank, self.alpha) for n, t in chosen.items()}
        )
        self._targets = chosen
        self._handles: list[Any] = []
        self.attach(text_encoder)

    def layer_names(self) -> list[str]:
        return [k.replace("__", ".") for k in self.adapters]

    def attach(self, text_encoder: nn.Module) -> None:
        """Hook the adapters into `text_encoder` (again after `detach`)."""
        self.detach()
        modules = dict(text_encoder.named_modules())
        swaps: dict[str, list[tuple[str, TextTarget, LoRAAdapter]]] = {}
        for key, adapter in self.adapters.items():
            target = self._targets[key.replace("__", ".")]
            owner = target.weight.removesuffix(".weight").removesuffix(".in_proj_weight")
            module = modules.get(owner)
            if isinstance(module, nn.Linear) and type(module) is nn.Linear:  # called as a Linear: add its output
                self._handles.append(module.register_forward_hook(_AddAdapter(adapter)))
            else:  # a weight of nn.MultiheadAttention (OpenCLIP in_proj, out_proj): swapped in for its forward
                attention = target.weight.split(".attn.")[0] + ".attn"
                swaps.setdefault(attention, []).append((target.weight[len(attention) + 1 :], target, adapter))
        for attention, parts in swaps.items():
            swap = _SwapWeights(modules[attention], parts)
            self._handles += [modules[attention].register_forward_pre_hook(swap.before),
                              modules[attention].register_forward_hook(swap.after), swap]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def deltas(self) -> dict[str, Tensor]:
        """Weight key below `cond_stage_model.` -> the update (α / r) · up @ down (q, k, v rows stacked in
        OpenCLIP's in_proj), what merging the exported file adds at scale 1."""
        out: dict[str, Tensor] = {}
        for key, adapter in self.adapters.items():
            target = self._targets[key.replace("__", ".")]
            update = (adapter.up.weight @ adapter.down.weight) * adapter.scale
            if target.rows is not None:
                update = _as_rows(update, target.rows, 3 * target.out_features)
            out[target.weight] = out.get(target.weight, 0) + update
        return out


class _SwapWeights:
    """Pre/post forward hooks of an nn.MultiheadAttention: its `in_proj_weight` / `out_proj.weight` read as
    W + the adapters' update during its forward (autograd reaches the adapters), the Parameters after."""

    def __init__(self, attention: nn.Module, parts: list[tuple[str, TextTarget, LoRAAdapter]]):
        self.parts, self.saved = parts, None
        self.attention = attention

    def _owners(self) -> dict[str, tuple[nn.Module, str]]:
        out = {}
        for name, _, _ in self.parts:
            module, attr = (self.attention.out_proj, "weight") if name == "out_proj.weight" else (self.attention, name)
            out[name] = (module, attr)
        return out

    def before(self, module: nn.Module, args: Any) -> None:
        self.restore()
        updates: dict[str, Tensor] = {}
        owners = self._owners()
        for name, target, adapter in self.parts:
            weight = owners[name][0]._parameters[owners[name][1]]
            update = (adapter.up.weight @ adapter.down.weight * adapter.scale).to(weight.dtype)
            if target.rows is not None:
                update = _as_rows(update, target.rows, weight.shape[0])
            updates[name] = updates.get(name, 0) + update
        self.saved = {}
        for name, update in updates.items():
            owner, attr = owners[name]
            weight = owner._parameters.pop(attr)
            self.saved[name] = (owner, attr, weight)
            owner.__dict__[attr] = weight + update

    def after(self, module: nn.Module, args: Any, output: Any) -> None:
        self.restore()

    def restore(self) -> None:
        for owner, attr, weight in (self.saved or {}).values():
            owner.__dict__.pop(attr, None)
            owner._parameters[attr] = weight
        self.saved = None

    def remove(self) -> None:  # a handle of TextEncoderLoRA: detaching puts the Parameters back
        self.restore()


def _as_rows(update: Tensor, rows: tuple[int, int], total: int) -> Tensor:
    """`update` as rows `rows` of a (total, in) tensor of zeros (differentiable)."""
    return torch.nn.functional.pad(update, (0, 0, rows[0], total - rows[1]))


def text_target_of(name: str, kind: str, width: int) -> TextTarget:
    """Where the CLIPTextModel layer `name` lives in a `kind` ("clip" or "openclip") text encoder of hidden
    size `width`, from names alone (a checkpoint's adapters, no module built)."""
    m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])", name)
    if m is None:
        raise ValueError(f"{name} is not a text-encoder LoRA layer (CLIPAttention or CLIPMLP Linear)")
    if kind == "clip":
        return TextTarget(f"transformer.{name}.weight", None, 0, 0)
    block = f"model.transformer.resblocks.{m[1]}."
    if m[3] in ("q", "k", "v"):
        j = "qkv".index(m[3])
        return TextTarget(f"{block}attn.in_proj_weight", (j * width, (j + 1) * width), width, width)
    return TextTarget(block + {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
                               "mlp.fc2": "mlp.c_proj"}[m[2]] + ".weight", None, 0, 0)


def text_adapter_deltas(
    state_dict: Mapping[str, Tensor], kind: str, prefix: str = "text_lora.adapters."
) -> dict[str, Tensor]:
    """The updates of a TextEncoderLoRA saved in a training checkpoint (keys `<prefix><name>.*`), keyed by
    weight names below `cond_stage_model.`; OpenCLIP's q, k, v rows come back as whole in_proj updates
    (zeros outside their rows), to add as they are."""
    names = sorted({k[len(prefix) :].split(".")[0] for k in state_dict if k.startswith(prefix)})
    out: dict[str, Tensor] = {}
    for n in names:
        down, up = state_dict[f"{prefix}{n}.down.weight"], state_dict[f"{prefix}{n}.up.weight"]
        update = _delta(down, up, float(state_dict[f"{prefix}{n}.alpha"]))
        target = text_target_of(n.replace("__", "."), kind, down.shape[1])
        if target.rows is not None:
            update = _as_rows(update, target.rows, 3 * down.shape[1])
        out[target.weight] = out.get(target.weight, 0) + update
    return out

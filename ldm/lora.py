"""LoRA (Hu et al. 2021, arXiv:2106.09685) for the UNet: train a low-rank update of chosen layers while
their weights stay frozen, export it as a kohya/sd-scripts `.safetensors` file (what diffusers'
`load_lora_weights`, AUTOMATIC1111 and ComfyUI read), and merge LoRA files into weights for sampling.

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
from collections.abc import Iterable, Mapping, Sequence
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


def save_kohya(lora: UNetLoRA, unet_config: Mapping[str, Any], path: str | Path) -> None:
    """The adapters as a kohya/sd-scripts LoRA file: `<stem>.lora_down.weight`, `.lora_up.weight`, `.alpha`."""
    to_stem = {ldm: stem for stem, ldm in _kohya_stems(unet_config).items()}
    tensors: dict[str, Tensor] = {}
    for key, adapter in lora.adapters.items():
        stem = to_stem[key.replace("__", ".")]
        tensors[f"{stem}.lora_down.weight"] = adapter.down.weight.detach().float().cpu().contiguous()
        tensors[f"{stem}.lora_up.weight"] = adapter.up.weight.detach().float().cpu().contiguous()
        tensors[f"{stem}.alpha"] = adapter.alpha.detach().float().cpu().reshape(())
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(lora.rank), "ss_network_alpha": str(lora.alpha)}
    from ldm.checkpoint import atomic_write  # renamed into place, with a new file's usual permissions

    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


TEXT_KOHYA_PREFIX = "lora_te_"
TEXT_PEFT_PREFIX = "text_encoder."


def _load(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lora={path} does not exist")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for foreign files
        raise ValueError(f"lora={path} is not a safetensors file ({err})") from None


def _changes_text_encoder(sd: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("lora_te", TEXT_PEFT_PREFIX, "te.")) for k in sd)


def _unet_deltas(sd: Mapping[str, Tensor], unet_config: Mapping[str, Any], path: Path | str) -> dict[str, Tensor]:
    unet_sd = {k: v for k, v in sd.items() if not k.startswith(("lora_te", TEXT_PEFT_PREFIX))}
    kohya = any(k.startswith(KOHYA_PREFIX) for k in unet_sd)
    pairs = _kohya_pairs(unet_sd, unet_config, path) if kohya else _peft_pairs(unet_sd, unet_config, path)
    if not pairs and not _changes_text_encoder(sd):
        raise ValueError(f"lora={path} holds no LoRA weights (expected kohya 'lora_unet_*' or 'unet.*lora_A' keys)")
    return {f"{name}.weight": _delta(*parts) for name, parts in pairs.items()}


def read_lora_file(path: str | Path, unet_config: Mapping[str, Any]) -> dict[str, Tensor]:
    """A LoRA file's UNet weight updates, LDM weight key -> (α / r) · up @ down (unscaled by the user's
    scale). Reads kohya/sd-scripts files and diffusers/peft ones (`unet.<path>.lora_A/lora_B.weight`);
    refuses files that also change the text encoder (`merge_lora_file` applies those)."""
    sd = _load(path)
    if _changes_text_encoder(sd):
        raise ValueError(f"lora={path} also changes the text encoder: apply it with merge_lora_file")
    return _unet_deltas(sd, unet_config, path)


def _text_encoder_deltas(sd: Mapping[str, Tensor], text_encoder: nn.Module, path: Path | str) -> dict[str, Tensor]:
    """Updates of a CLIP text encoder's Linear layers (kohya `lora_te_text_model_*`, peft
    `text_encoder.text_model.*`), keyed by the encoder's own weight names (`transformer.text_model...`)."""
    te = {k: v for k, v in sd.items() if k.startswith(("lora_te", TEXT_PEFT_PREFIX, "te."))}
    if not te:
        return {}
    holder = getattr(text_encoder, "transformer", None)
    if holder is None or not hasattr(holder, "text_model"):
        raise ValueError(
            f"lora={path} changes the text encoder, and text-encoder LoRAs apply to SD 1.x's CLIP text model only "
            "(not to the OpenCLIP tower of SD 2.x)"
        )
    linears = {n: m for n, m in holder.named_modules() if isinstance(m, nn.Linear)}
    stems = {TEXT_KOHYA_PREFIX + n.replace(".", "_"): n for n in linears}
    deltas: dict[str, Tensor] = {}
    for key in te:
        if key.endswith(".lora_down.weight"):
            stem, up_key = key.removesuffix(".lora_down.weight"), key.replace("lora_down", "lora_up")
            name = stems.get(stem)
            alpha_key = f"{stem}.alpha"
        elif re.fullmatch(r".+\.lora_A(?:\.default)?\.weight", key) and key.startswith(TEXT_PEFT_PREFIX):
            base = re.sub(r"\.lora_A(?:\.default)?\.weight$", "", key)
            name = base.removeprefix(TEXT_PEFT_PREFIX) if base.removeprefix(TEXT_PEFT_PREFIX) in linears else None
            up_key, alpha_key, stem = key.replace("lora_A", "lora_B"), f"{base}.alpha", base
        else:
            continue
        if name is None:
            raise ValueError(f"lora={path}: text-encoder layer {stem} is not in this CLIP text model")
        down = te[key]
        alpha = float(te[alpha_key]) if alpha_key in te else float(down.shape[0])
        deltas[f"transformer.{name}.weight"] = _delta(down, _up(te, up_key, path), alpha)
    if not deltas:
        raise ValueError(f"lora={path}: text-encoder keys of an unknown layout ({sorted(te)[:3]})")
    return deltas


def _kohya_pairs(
    sd: Mapping[str, Tensor], unet_config: Mapping[str, Any], path: Path | str
) -> dict[str, tuple[Tensor, Tensor, float]]:
    stems = _kohya_stems(unet_config)
    pairs: dict[str, tuple[Tensor, Tensor, float]] = {}
    unknown = []
    for key in sd:
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key.removesuffix(".lora_down.weight")
        if stem not in stems:
            unknown.append(stem)
            continue
        down, up = sd[key], _up(sd, f"{stem}.lora_up.weight", path)
        alpha = float(sd[f"{stem}.alpha"]) if f"{stem}.alpha" in sd else float(down.shape[0])
        pairs[stems[stem]] = (down, up, alpha)
    if unknown:
        raise ValueError(
            f"lora={path}: LoRA layers this UNet does not have: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
        )
    return pairs


def _peft_pairs(
    sd: Mapping[str, Tensor], unet_config: Mapping[str, Any], path: Path | str
) -> dict[str, tuple[Tensor, Tensor, float]]:
    to_ldm = {d.removesuffix(".weight"): k.removesuffix(".weight") for k, d in diffusers_key_map(unet_config).items()}
    pairs: dict[str, tuple[Tensor, Tensor, float]] = {}
    for key in sd:
        match = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.lora_A(?:\.default)?\.weight", key)
        if match is None:
            continue
        if match[1] not in to_ldm:
            raise ValueError(f"lora={path}: LoRA layer {match[1]} is not in this UNet")
        down = sd[key]
        up = _up(sd, key.replace("lora_A", "lora_B"), path)
        alpha_key = f"{PEFT_PREFIX}{match[1]}.alpha"
        pairs[to_ldm[match[1]]] = (down, up, float(sd[alpha_key]) if alpha_key in sd else float(down.shape[0]))
    return pairs


def _up(sd: Mapping[str, Tensor], key: str, path: Path | str) -> Tensor:
    if key not in sd:
        raise ValueError(f"lora={path}: {key} is missing (each down/A matrix needs its up/B matrix)")
    return sd[key]


def _delta(down: Tensor, up: Tensor, alpha: float) -> Tensor:
    """(α / r) · up @ down for Linear layers and 1x1 convolutions (kohya stores both)."""
    if down.dim() == 4 and down.shape[-2:] != (1, 1):
        raise ValueError(f"LoRA on a {tuple(down.shape[-2:])} convolution (LoCon) is not supported")
    rank = down.shape[0]
    delta = up.flatten(1).float() @ down.flatten(1).float() * (alpha / rank)
    return delta.reshape(up.shape[0], down.shape[1], *down.shape[2:]) if down.dim() == 4 else delta


@torch.no_grad()
def merge_deltas(unet: nn.Module, deltas: Mapping[str, Tensor], scale: float = 1.0) -> None:
    """W += scale · Δ for each LDM weight key of `deltas` (shapes must fit; 1x1 convs and Linears mix)."""
    params = dict(unet.named_parameters())
    for key, delta in deltas.items():
        if key not in params:
            raise ValueError(f"LoRA layer {key} is not in this model")
        weight = params[key]
        weight += (scale * delta.to(weight.device, torch.float32)).reshape(weight.shape).to(weight.dtype)


def merge_lora_file(model: nn.Module, path: str | Path, scale: float = 1.0) -> None:
    """Merge a LoRA file into a StableDiffusion model: its UNet part, and its CLIP text-encoder part if any."""
    sd = _load(path)
    text = _text_encoder_deltas(sd, model.cond_stage_model, path)  # checked first: refuse before changing anything
    unet = _unet_deltas(sd, model.config["unet"], path)
    merge_deltas(model.unet, unet, scale)
    merge_deltas(model.cond_stage_model, text, scale)


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

"""Load and save Stable Diffusion weights in every format we take, reading the architecture off the files.

Formats:
- LDM single file (`.safetensors`, or `.ckpt` read with `torch.load(weights_only=True)`): the original
  SD 1.x/2.x layout (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`,
  optional `model_ema.*`). Our own training checkpoints are LDM files too (a Lightning `.ckpt` whose
  `state_dict` has these names), and carry the model config under `ldm_config`.
- diffusers folder: `unet/ vae/ text_encoder/ tokenizer/ scheduler/` with their `config.json` files.

Everything goes through one neutral form, a `Checkpoint`: the model config (see
`ldm.models.stable_diffusion`) plus a state dict under LDM names. Converting between formats never
builds a module, so tensors pass through untouched.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ldm.formats.text import (
    openclip_keys_dropped_in_diffusers,
    text_config_from_diffusers,
    text_config_from_state_dict,
    text_config_to_diffusers,
    text_from_diffusers,
    text_to_diffusers,
)
from ldm.formats.unet import (
    unet_config_from_diffusers,
    unet_config_from_state_dict,
    unet_config_to_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
)
from ldm.formats.vae import (
    vae_config_from_diffusers,
    vae_config_from_state_dict,
    vae_config_to_diffusers,
    vae_from_diffusers,
    vae_to_diffusers,
)
from ldm.models.stable_diffusion import (
    DEFAULT_SCHEDULE,
    StableDiffusion,
    downsampling_factor,
    normalize_config,
)

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
LORA_PREFIX = "lora.adapters."  # a LoRA run's adapters (see ldm.lora), merged into the UNet when read
TEXT_LORA_PREFIX = "text_lora.adapters."  # its text encoder's (lora.text_encoder), merged into that
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."
# Our beta schedule names that diffusers' scheduler configs spell otherwise.
DIFFUSERS_BETA_SCHEDULE = {"cosine": "squaredcos_cap_v2"}

# Derived buffers that original LDM files carry: recomputed from the config, so dropped on load.
SCHEDULE_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "lvlb_weights",
    }
)
POSITION_IDS = TEXT_PREFIX + "transformer.text_model.embeddings.position_ids"
EMA_BOOKKEEPING = frozenset({EMA_PREFIX + "decay", EMA_PREFIX + "num_updates"})

EXTRAS_FILE = "ldm_extras.safetensors"
DIFFUSERS_WEIGHT_NAMES = {
    "unet": "diffusion_pytorch_model",
    "unet_ema": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says what was found and what to do."""


@dataclass
class Checkpoint:
    """A model config and its weights under LDM names (`model_ema.*` included when present)."""

    config: dict[str, Any]
    state_dict: dict[str, Tensor]
    tokenizer_dir: str | None = None
    source: str = ""
    # Tensors of the original file that no module holds (schedule buffers, position ids): kept so that a
    # conversion writes them back and a round trip leaves every tensor as it was.
    extras: dict[str, Tensor] = field(default_factory=dict)
    # How config["prediction_type"] was decided (see settle_prediction_type): printed by the CLIs.
    prediction_type_note: str = ""

    def has_ema(self) -> bool:
        return any(k.startswith(EMA_PREFIX) and k not in EMA_BOOKKEEPING for k in self.state_dict)

    def with_ema_weights(self) -> Checkpoint:
        """The UNet weights replaced by the EMA weights (LDM stores them with the dots removed)."""
        if not self.has_ema():
            raise CheckpointError(
                f"{self.source}: asked for EMA weights, but the checkpoint holds no model_ema.*: drop ema=true "
                "(ldm-convert: --ema)"
            )
        sd = {k: v for k, v in self.state_dict.items() if not k.startswith(EMA_PREFIX)}
        for key in [k for k in sd if k.startswith(UNET_PREFIX)]:
            ema_key = EMA_PREFIX + key[len("model.") :].replace(".", "")
            if ema_key not in self.state_dict:
                raise CheckpointError(f"{self.source}: EMA weights lack {ema_key} (for {key})")
            sd[key] = self.state_dict[ema_key]
        return replace(self, state_dict=sd)

    def without_ema(self) -> Checkpoint:
        sd = {k: v for k, v in self.state_dict.items() if not k.startswith(EMA_PREFIX)}
        return replace(self, state_dict=sd)

    def build_model(self) -> StableDiffusion:
        """A StableDiffusion module with these weights, loaded strictly."""
        ckpt = self.without_ema()
        with parameters_on_meta():
            model = StableDiffusion.from_config(ckpt.config, tokenizer_dir=ckpt.tokenizer_dir)
        missing, unexpected = _diff_keys(model.state_dict().keys(), ckpt.state_dict.keys())
        if missing or unexpected:
            raise CheckpointError(_key_report(ckpt.source, missing, unexpected))
        model.load_state_dict(ckpt.state_dict, strict=True, assign=True)
        return model


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device, so no time goes into random
    initialisation that loading overwrites. Buffers stay real: non-persistent ones (position ids,
    attention masks, the noise schedule) are not in checkpoints and must be computed as usual."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def ema_key_for(unet_key: str) -> str:
    return EMA_PREFIX + unet_key[len("model.") :].replace(".", "")


def _diff_keys(expected: Iterable[str], found: Iterable[str]) -> tuple[list[str], list[str]]:
    expected, found = set(expected), set(found)
    return sorted(expected - found), sorted(found - expected)


def _key_report(source: str, missing: list[str], unexpected: list[str], limit: int = 20) -> str:
    lines = [f"{source}: the weights do not fit the architecture read from the checkpoint."]
    for name, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
            lines.append(f"  {len(keys)} {name} keys: {shown}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Reading files


def read_tensor_file(path: str | Path, allow_unsafe_pickle: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors (or a pickled dict) and the safetensors metadata of one file.

    `.ckpt`/`.pt`/`.bin` files are unpickled with `weights_only=True`, which refuses anything but
    tensors and plain containers: a pickle can run arbitrary code. The few harmless objects original
    SD `.ckpt` files hold beside the weights (numpy scalars, the class of pytorch_lightning's
    ModelCheckpoint as a dict key) are let through as inert stand-ins. `allow_unsafe_pickle` lifts the
    restriction for a file the user trusts. The format is read off the file's first bytes, not its suffix.
    A file that cannot be read (cut off, not a checkpoint, a Git LFS pointer) is a CheckpointError.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give a weights file (.safetensors/.ckpt) here")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (give a .safetensors/.ckpt file or a diffusers folder)")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(
            f"{path} is a Git LFS pointer file, not the weights: fetch them (git lfs pull) or download the file itself"
        )
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes): a download or copy that did not finish; fetch it again")
    pickled = head[:2] == b"PK" or head[:1] == b"\x80"  # torch.save's zip archive, or its legacy pickle
    if not pickled and path.suffix != ".safetensors" and head[8:9] != b"{":
        # safetensors files start with an 8-byte header length, then the JSON header
        raise CheckpointError(
            f"{path} is not a checkpoint (neither safetensors nor torch.save's format: starts {head[:16]!r}); "
            "give a .safetensors/.ckpt file or a diffusers folder"
        )
    if not pickled:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            return load_file(str(path)), metadata
        except SafetensorError as err:
            raise _unreadable(path, "safetensors", err) from None
    try:
        if allow_unsafe_pickle:
            obj = torch.load(str(path), map_location="cpu", weights_only=False, mmap=False)
        else:
            with torch.serialization.safe_globals(_inert_ckpt_globals()), warnings.catch_warnings():
                # its "Detected pickle protocol 4" note on plain pickles adds nothing for a user
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f"it holds {found.group(1)}, " if found else "it holds objects other than tensors, "
        raise CheckpointError(
            f"refused to unpickle {path}: {what}and unpickling objects could run arbitrary code. If you trust "
            f"this file, convert it once: ldm-convert --allow-unsafe-pickle {path} {path.with_suffix('.safetensors')} "
            "(sample.py takes allow_unsafe_pickle=true)"
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as err:
        raise _unreadable(path, "torch (.ckpt)", err) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj, {}


def _unreadable(path: Path, form: str, err: BaseException) -> CheckpointError:
    first = (str(err).splitlines() or [""])[0].split(". ")[0] or type(err).__name__
    return CheckpointError(
        f"{path} cannot be read as a {form} file ({first[:200]}): it is cut off or not a checkpoint; "
        "download or copy it again"
    )


class _InertObject:
    """What a pickled reference to pytorch_lightning's ModelCheckpoint (a dict key in old Lightning
    checkpoints' `callbacks`) becomes: a class with no behaviour, so nothing of Lightning is imported or run."""


def _inert_ckpt_globals() -> list[Any]:
    """Globals original SD `.ckpt` files hold besides tensors, all harmless: numpy scalars and dtypes (their
    `global_step`, callback scores) and the ModelCheckpoint class (as AUTOMATIC1111's safe unpickler allows)."""
    import codecs

    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allowed: list[Any] = [
        (core.multiarray.scalar, "numpy.core.multiarray.scalar"),
        (core.multiarray.scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        (codecs.encode, "_codecs.encode"),
    ]
    allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType") and n != "ObjectDType"]
    for module in ("pytorch_lightning", "lightning.pytorch"):
        allowed.append((_InertObject, f"{module}.callbacks.model_checkpoint.ModelCheckpoint"))
    return allowed


def _state_dict_of(obj: dict[str, Any]) -> dict[str, Tensor]:
    sd = obj.get("state_dict", obj)
    return {k: v for k, v in sd.items() if isinstance(v, Tensor)}


def _strip(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def read_ldm_file(
    path: str | Path,
    prediction_type: str | None = None,
    allow_unsafe_pickle: bool = False,
    *,
    force_prediction_type: bool = False,
    default_prediction_type: str | None = None,
) -> Checkpoint:
    """An LDM single file or one of our own checkpoints, with the architecture read off the tensors.

    Our own files record the prediction type (their `ldm_config`); original LDM files do not, see
    `settle_prediction_type` for how it is decided then."""
    obj, metadata = read_tensor_file(path, allow_unsafe_pickle)
    sd = _state_dict_of(obj)
    config = obj.get("ldm_config") if isinstance(obj.get("ldm_config"), dict) else None
    if config is None and "ldm_config" in metadata:
        config = json.loads(metadata["ldm_config"])
    if not any(k.startswith(UNET_PREFIX) for k in sd):
        prefixes = sorted({k.split(".")[0] for k in sd})[:10]
        if any(k.startswith(EMA_PREFIX) and k not in EMA_BOOKKEEPING for k in sd):
            raise CheckpointError(
                f"{path}: holds the UNet only as EMA weights ('{EMA_PREFIX}*', no '{UNET_PREFIX}*'), whose "
                "dot-less names do not give the architecture: use a file with the UNet under "
                f"'{UNET_PREFIX}*' (an 'ema-only' release holds its EMA weights there)"
            )
        vae_only = all(k.startswith(VAE_TOP_NAMES + VAE_FILE_EXTRAS) for k in sd) or prefixes == ["first_stage_model"]
        if vae_only and {"encoder.conv_in.weight", VAE_PREFIX + "encoder.conv_in.weight"} & sd.keys():
            raise CheckpointError(
                f"{path}: a VAE file (autoencoder weights only), not a whole Stable Diffusion checkpoint: give it "
                "as the VAE (train.py module.first_stage_ckpt=...) beside a full checkpoint"
            )
        raise CheckpointError(
            f"{path}: not a Stable Diffusion checkpoint of LDM layout: no '{UNET_PREFIX}*' keys "
            f"(top-level names found: {prefixes}). Expected an SD 1.x/2.x single file, a checkpoint of this "
            "project, or a diffusers folder."
        )
    if any(k.startswith("conditioner.embedders.") for k in sd):
        raise CheckpointError(
            f"{path} is an SDXL checkpoint (conditioner.embedders.*, two text encoders): this project loads SD 1.x "
            "and 2.x models; use an SD 1.x/2.x checkpoint"
        )
    extras = {k: sd.pop(k) for k in sorted(sd) if k in SCHEDULE_BUFFERS or k == POSITION_IDS}
    _merge_trained_lora(sd)
    known = (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX, EMA_PREFIX)
    unknown = sorted(k for k in sd if not k.startswith(known))
    if unknown:
        raise CheckpointError(_key_report(str(path), [], unknown))
    recorded = None
    if config is None:
        config = infer_config_from_ldm(sd, str(path))
    elif config.get("prediction_type") is not None:
        recorded = (config["prediction_type"], "the ldm_config it was saved with")
    config = dict(config)
    note = settle_prediction_type(
        config, recorded, prediction_type, force_prediction_type, default_prediction_type, str(path), sd
    )
    try:
        config = normalize_config(config)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return Checkpoint(config, sd, None, str(path), extras, note)


def _merge_trained_lora(sd: dict[str, Tensor]) -> None:
    """A LoRA run's checkpoint holds the frozen UNet and its adapters (`lora.adapters.*`), and the frozen text
    encoder and its adapters when it trained those too (`text_lora.adapters.*`): fold them into the weights,
    so the file samples and converts as the fine-tuned model it is."""
    from ldm.lora import adapter_deltas, text_adapter_deltas

    adapters = {k: sd.pop(k) for k in [k for k in sd if k.startswith(LORA_PREFIX)]}
    for key, delta in adapter_deltas(adapters, LORA_PREFIX).items():
        weight = sd[UNET_PREFIX + key]
        sd[UNET_PREFIX + key] = (weight.float() + delta.reshape(weight.shape)).to(weight.dtype)
    text = {k: sd.pop(k) for k in [k for k in sd if k.startswith(TEXT_LORA_PREFIX)]}
    if text:
        # SD 2.x's OpenCLIP tower sits at cond_stage_model.model.*, SD 1.x's CLIP at cond_stage_model.transformer.*
        kind = "openclip" if any(k.startswith(TEXT_PREFIX + "model.transformer.") for k in sd) else "clip"
        for key, delta in text_adapter_deltas(text, kind, TEXT_LORA_PREFIX).items():
            weight = sd[TEXT_PREFIX + key]
            sd[TEXT_PREFIX + key] = (weight.float() + delta.reshape(weight.shape)).to(weight.dtype)


def infer_config_from_ldm(sd: dict[str, Tensor], source: str = "checkpoint") -> dict[str, Any]:
    """The model config read from the tensor shapes of an LDM-named state dict."""
    text = _strip(sd, TEXT_PREFIX)
    if not text:
        raise CheckpointError(
            f"{source}: no text encoder weights ('{TEXT_PREFIX}*')"
            + (f" nor VAE weights ('{VAE_PREFIX}*')" if not _strip(sd, VAE_PREFIX) else "")
            + ": a UNet-only file is not a whole Stable Diffusion checkpoint; give the full checkpoint it was "
            "made from (or a diffusers folder)"
        )
    try:
        kind, text_cfg = text_config_from_state_dict(text)
        return {
            "unet": unet_config_from_state_dict(_strip(sd, UNET_PREFIX)),
            "first_stage": vae_config_from_state_dict(_strip(sd, VAE_PREFIX)),
            "cond_stage": {"kind": kind, **text_cfg},
        }
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{source}: unknown layout, cannot read the architecture: {err}") from None


def _read_component(folder: Path, component: str, stem: str | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    sub = folder / component
    config_path = sub / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: diffusers folder lacks {component}/config.json")
    config = _read_json(config_path)
    stem = stem or DIFFUSERS_WEIGHT_NAMES[component]
    candidates = [f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bin", f"{stem}.fp16.bin"]
    candidates += ["pytorch_model.bin", "pytorch_model.fp16.bin"] if component == "text_encoder" else []
    for name in candidates:
        if (sub / name).is_file():
            return config, _state_dict_of(read_tensor_file(sub / name)[0])
    for index in sorted(sub.glob("*.index.json")):
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, Tensor] = {}
        for shard in shards:
            sd.update(_state_dict_of(read_tensor_file(sub / shard)[0]))
        return config, sd
    raise CheckpointError(f"{folder}: no weights in {component}/ (looked for {', '.join(candidates)})")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}): restore the file from the model's release") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds {type(value).__name__}, not a JSON object: restore it from the release")
    return value


def read_diffusers_folder(
    path: str | Path,
    prediction_type: str | None = None,
    *,
    force_prediction_type: bool = False,
    default_prediction_type: str | None = None,
) -> Checkpoint:
    folder = Path(path)
    if (folder / "text_encoder_2").is_dir() or (folder / "tokenizer_2").is_dir():
        raise CheckpointError(
            f"{folder} is an SDXL pipeline folder (text_encoder_2/): this project loads SD 1.x and 2.x models; "
            "use an SD 1.x/2.x checkpoint"
        )
    unet_dcfg, unet_sd = _read_component(folder, "unet")
    vae_dcfg, vae_sd = _read_component(folder, "vae")
    text_dcfg, text_sd = _read_component(folder, "text_encoder")
    try:
        unet_cfg = unet_config_from_diffusers(unet_dcfg)
        vae_cfg, scale_factor = vae_config_from_diffusers(vae_dcfg)
        kind, text_cfg = text_config_from_diffusers(text_dcfg)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{folder}: a config.json this project cannot build a model from: {err}") from None
    config: dict[str, Any] = {
        "image_size": unet_dcfg.get("sample_size", 64) * downsampling_factor(vae_cfg),
        "unet": unet_cfg,
        "first_stage": vae_cfg,
        "cond_stage": {"kind": kind, **text_cfg},
        "scale_factor": scale_factor,
    }
    sched_path = folder / "scheduler" / "scheduler_config.json"
    recorded = None
    if sched_path.is_file():
        sched = _read_json(sched_path)
        # diffusers' schedulers default to epsilon when the key is absent, so the file says epsilon then
        recorded = (sched.get("prediction_type", "epsilon"), "its scheduler/scheduler_config.json")
        config["schedule"] = {
            "beta_schedule": _our_beta_schedule(sched.get("beta_schedule", DEFAULT_SCHEDULE["beta_schedule"])),
            "linear_start": sched.get("beta_start", DEFAULT_SCHEDULE["linear_start"]),
            "linear_end": sched.get("beta_end", DEFAULT_SCHEDULE["linear_end"]),
            "num_train_timesteps": sched.get("num_train_timesteps", DEFAULT_SCHEDULE["num_train_timesteps"]),
            "timestep_spacing": sched.get("timestep_spacing", "leading"),
            "steps_offset": sched.get("steps_offset", 1),
        }
    sd: dict[str, Tensor] = {}
    try:
        for prefix, part in (
            (UNET_PREFIX, unet_from_diffusers(unet_sd, unet_cfg)),
            (VAE_PREFIX, vae_from_diffusers(vae_sd, vae_cfg)),
            (TEXT_PREFIX, text_from_diffusers(text_sd, kind)),
        ):
            sd.update({prefix + k: v for k, v in part.items()})
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{folder}: weights do not match their config.json: {err}") from None
    if (folder / "unet_ema" / "config.json").is_file():
        _, ema_sd = _read_component(folder, "unet_ema")
        for key, value in unet_from_diffusers(ema_sd, unet_cfg).items():
            sd[ema_key_for(UNET_PREFIX + key)] = value
    extras = _restore_extras(folder, sd, config)
    note = settle_prediction_type(
        config, recorded, prediction_type, force_prediction_type, default_prediction_type, str(folder), sd
    )
    tokenizer = folder / "tokenizer"
    return Checkpoint(
        normalize_config(config), sd, str(tokenizer) if tokenizer.is_dir() else None, str(folder), extras, note
    )


def _restore_extras(folder: Path, sd: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """Put back what a folder we wrote keeps aside in `ldm_extras.safetensors` (see save_diffusers_folder)."""
    path = folder / EXTRAS_FILE
    if not path.is_file():
        return {}
    tensors, metadata = read_tensor_file(path)
    extras = {k: tensors.pop(k) for k in sorted(tensors) if k in SCHEDULE_BUFFERS or k == POSITION_IDS}
    sd.update(tensors)
    stored = json.loads(metadata.get("ldm_config", "null"))
    if stored and any(k.startswith(TEXT_PREFIX) for k in tensors):
        # The text tower is whole again (SD 2's last block and projection), so its own config applies.
        config["cond_stage"] = stored["cond_stage"]
    return extras


VAE_TOP_NAMES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
# What standalone VAE files (vae-ft-mse-840000-ema-pruned.ckpt and the like) hold besides the autoencoder.
VAE_FILE_EXTRAS = ("loss.", "model_ema.decay", "model_ema.num_updates")


def read_vae_weights(
    path: str | Path, vae_config: dict[str, Any], what: str = "first_stage_ckpt"
) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """An autoencoder's weights under LDM names (no prefix), for a model whose first stage is `vae_config`, and
    the `ldm_config` a `.ckpt` of this project records beside them (else None).

    Takes what users pass as a VAE: a file with `first_stage_model.*` keys (an SD single file, a checkpoint of
    this project), a standalone LDM VAE file (`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`;
    its `loss.*` and EMA counters dropped), a diffusers VAE (its folder, a pipeline folder, or its weights
    file). Weights whose names or shapes do not fit `vae_config` are a CheckpointError naming them."""
    path = Path(path).expanduser()
    recorded = None
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise CheckpointError(
                f"{what}={path} is a folder without a VAE: give a diffusers VAE folder (config.json and "
                "diffusion_pytorch_model.safetensors), a diffusers pipeline folder, or a VAE weights file"
            )
        sd = _read_component(folder.parent, folder.name, "diffusion_pytorch_model")[1]
    else:
        obj, _ = read_tensor_file(path)
        sd = _state_dict_of(obj)
        recorded = obj["ldm_config"] if isinstance(obj.get("ldm_config"), dict) else None
    if any(k.startswith(VAE_PREFIX) for k in sd):
        sd = _strip(sd, VAE_PREFIX)
    else:
        sd = {k: v for k, v in sd.items() if not k.startswith(VAE_FILE_EXTRAS)}
    if not sd or not all(k.startswith(VAE_TOP_NAMES) for k in sd):
        names = sorted({k.split(".")[0] for k in sd})[:10]
        raise CheckpointError(
            f"{what}={path} holds no autoencoder weights (top-level names found: {names}): give a VAE file "
            f"('{VAE_PREFIX}*' keys, or encoder.*/decoder.* as vae-ft-mse files have), or a diffusers VAE"
        )
    if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in sd):
        try:
            sd = vae_from_diffusers(sd, vae_config)
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{what}={path}: a diffusers VAE that does not fit this model's: {err}") from None
    expected = _vae_shapes(vae_config)
    missing, unexpected = _diff_keys(expected, sd)
    wrong = [f"{k} {list(sd[k].shape)} (model: {expected[k]})" for k in sorted(sd.keys() & expected.keys())
             if list(sd[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        report = _key_report(f"{what}={path}", missing, unexpected, limit=5).replace(
            "the weights do not fit the architecture read from the checkpoint", "not this model's autoencoder"
        )
        shapes = f"; {len(wrong)} of other shapes: {', '.join(wrong[:3])}" if wrong else ""
        raise CheckpointError(report.replace("\n", ";") + shapes)
    return sd, recorded


def _vae_shapes(vae_config: dict[str, Any]) -> dict[str, list[int]]:
    from ldm.models.autoencoder import AutoencoderKL

    with parameters_on_meta():
        vae = AutoencoderKL(**vae_config)
    return {k: list(v.shape) for k, v in vae.state_dict().items()}


def is_diffusers_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "unet" / "config.json").is_file()


def read_checkpoint(
    path: str | Path,
    prediction_type: str | None = None,
    allow_unsafe_pickle: bool = False,
    *,
    force_prediction_type: bool = False,
    default_prediction_type: str | None = None,
) -> Checkpoint:
    """Any supported checkpoint: an LDM/our single file or a diffusers folder.

    `prediction_type` is the user's explicit choice: it must agree with what the checkpoint records unless
    `force_prediction_type`. `default_prediction_type` (a model config's value) applies only where the
    checkpoint records nothing. See `settle_prediction_type`."""
    path = Path(path).expanduser()
    how = {"force_prediction_type": force_prediction_type, "default_prediction_type": default_prediction_type}
    if path.name == "model_index.json" and path.is_file():
        path = path.parent  # the pipeline folder's index: the folder is meant
    pipeline = path.parent.parent
    if path.is_file() and (path.parent / "config.json").is_file() and (
        (pipeline / "model_index.json").is_file() or is_diffusers_folder(pipeline)
    ):
        raise CheckpointError(
            f"{path} is the weights of one component ({path.parent.name}/) of a diffusers folder: give the folder "
            f"that holds them all, {pipeline}"
        )
    if path.is_dir():
        parent = path.parent
        if (path / "config.json").is_file() and ((parent / "model_index.json").is_file() or is_diffusers_folder(parent)):
            raise CheckpointError(
                f"{path} is one component ({path.name}/) of a diffusers folder: give the folder that holds it, {parent}"
            )
        if not is_diffusers_folder(path) and (path / "model_index.json").is_file():
            return read_diffusers_folder(path, prediction_type, **how)  # which says what it lacks
        if not is_diffusers_folder(path):
            raise CheckpointError(
                f"{path} is a folder but not a diffusers pipeline folder (no unet/config.json); "
                "give a diffusers folder or a .safetensors/.ckpt file"
            )
        return read_diffusers_folder(path, prediction_type, **how)
    return read_ldm_file(path, prediction_type, allow_unsafe_pickle, **how)


def load_model(
    path: str | Path,
    prediction_type: str | None = None,
    ema: bool = False,
    allow_unsafe_pickle: bool = False,
    *,
    force_prediction_type: bool = False,
) -> StableDiffusion:
    """A ready StableDiffusion module from any supported checkpoint, in eval mode."""
    ckpt = read_checkpoint(path, prediction_type, allow_unsafe_pickle, force_prediction_type=force_prediction_type)
    if ckpt.prediction_type_note:
        log.info("%s", ckpt.prediction_type_note)
    if ema:
        ckpt = ckpt.with_ema_weights()
        log.info("%s: sampling with its EMA weights (model_ema.*)", ckpt.source)
    elif ckpt.has_ema():
        log.info("%s: holds EMA weights too (model_ema.*); using the non-EMA UNet (ema=true for the EMA one)",
                 ckpt.source)
    return ckpt.build_model().eval()


# ----------------------------------------------------------------------------------------------
# The prediction type


def settle_prediction_type(
    config: dict[str, Any],
    recorded: tuple[str, str] | None,
    explicit: str | None,
    force: bool,
    default: str | None,
    source: str,
    sd: dict[str, Tensor],
) -> str:
    """Set `config["prediction_type"]` and return one line saying how it was decided:

    1. what the checkpoint records (a diffusers scheduler config, our own checkpoints' ldm_config) wins;
       an explicit choice that contradicts it is an error unless forced;
    2. else the explicit choice (`prediction_type=`);
    3. else, for an SD 2.x-structured text-to-image model (OpenCLIP text encoder), whose 512-base
       (epsilon) and 768-v files hold the same tensors: read off one UNet evaluation, as AUTOMATIC1111
       does (`probe_prediction_type`);
    4. else `default` (the model config's value when training), else epsilon (SD 1.x files).
    """
    from ldm.models.stable_diffusion import PREDICTION_TYPES

    for name, value in (("prediction_type", explicit), ("model.prediction_type", default)):
        if value is not None and value not in PREDICTION_TYPES:
            raise CheckpointError(
                f"{name}={value!r} is not one of {list(PREDICTION_TYPES)} "
                "(diffusers' names: epsilon for SD 1.x and SD 2.x-base, v_prediction for SD 2.x-768)"
            )
    other = {"epsilon": "v_prediction", "v_prediction": "epsilon"}
    if recorded is not None:
        value, where = recorded
        if explicit is not None and explicit != value and not force:
            raise CheckpointError(
                f"prediction_type={explicit}, but {source} records {value} ({where}). Drop prediction_type= "
                f"to use the recorded {value}; if the record is wrong, add force_prediction_type=true "
                "(ldm-convert: --force-prediction-type)"
            )
        if explicit is not None and explicit != value:
            config["prediction_type"] = explicit
            return f"prediction_type={explicit}: forced; {source} records {value} ({where})"
        config["prediction_type"] = value
        return f"prediction_type={value}: recorded in {where}"
    if explicit is not None:
        config["prediction_type"] = explicit
        return f"prediction_type={explicit}: as given ({source} does not record it)"
    probe = probe_prediction_type(config, sd)
    if probe is not None:
        value, score = probe
        config["prediction_type"] = value
        config.setdefault("image_size", 768 if value == "v_prediction" else 512)
        return (
            f"prediction_type={value}: {source} does not record it, so it was read off the UNet (SD 2.x "
            f"structure; mean(output - input) = {score:.3f} at the last timestep, v_prediction below -1, as "
            f"AUTOMATIC1111 decides). If that is wrong, pass prediction_type={other[value]}"
        )
    value = default or "epsilon"
    config["prediction_type"] = value
    origin = "the model config's value" if default else "the default for SD 1.x files"
    return (
        f"prediction_type={value}: {source} does not record it, {origin}. If the model predicts "
        f"{other[value]}, pass prediction_type={other[value]}"
    )


def probe_prediction_type(config: dict[str, Any], sd: dict[str, Tensor]) -> tuple[str, float] | None:
    """("v_prediction" | "epsilon", score) for an SD 2.x-structured text-to-image UNet; None for others.

    AUTOMATIC1111's test (`is_using_v_parameterization_for_sd2`): at the last timestep, an ε model given a
    flat 0.5 latent predicts about that latent back, a v model predicts far below it; one evaluation on
    an 8×8 latent, with a flat 0.5 context, separates them: v when mean(output − input) < −1."""
    from ldm.models.unet import UNetModel

    unet_cfg = dict(config["unet"])
    latent = config["first_stage"]["embed_dim"]
    if (
        config.get("cond_stage", {}).get("kind") != "openclip"
        or unet_cfg.get("in_channels") != latent
        or unet_cfg.get("adm_in_channels")
        or config.get("concat") not in (None,)
    ):
        return None
    unet_sd = _strip(sd, UNET_PREFIX)
    unet_cfg["use_checkpoint"] = False
    with parameters_on_meta():
        unet = UNetModel(**unet_cfg)
    unet.load_state_dict(unet_sd, strict=True, assign=True)
    unet = unet.float().eval()
    side = max(8, 2 ** (len(unet_cfg["channel_mult"]) - 1))
    steps = int((config.get("schedule") or {}).get("num_train_timesteps", DEFAULT_SCHEDULE["num_train_timesteps"]))
    x = torch.full((1, latent, side, side), 0.5)
    context = torch.full((1, 2, int(unet_cfg["context_dim"])), 0.5)
    with torch.no_grad():
        score = (unet(x, torch.tensor([steps - 1]), context=context) - x).mean().item()
    return ("v_prediction" if score < -1 else "epsilon"), score


# ----------------------------------------------------------------------------------------------
# Writing files


def _cast(sd: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    if dtype is None:
        return {k: v.contiguous() for k, v in sd.items()}
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def _save_safetensors(sd: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses tensors that share storage; give each its own copy where needed.
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    save_file(out, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())  # safetensors creates its files 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """`write(tmp)` to a temporary name beside `path`, then renamed: a crash never leaves half a file. The
    file gets the permissions any new file gets (0644 under umask 022), not mkstemp's 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _copy_as_new(src: Path, dst: Path) -> None:
    """Folder `src` copied to `dst` as files we write: each gets a new file's permissions (the umask's), not
    the source's mode as copytree gives (a 0600 or read-only tokenizer of another folder stayed so)."""
    for folder, _, names in os.walk(src, followlinks=True):
        target = dst / Path(folder).relative_to(src)
        target.mkdir(exist_ok=True)
        for name in names:
            shutil.copyfile(Path(folder) / name, target / name)


def save_ldm_file(ckpt: Checkpoint, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """An LDM single file: `.safetensors` (config in its metadata) or `.ckpt` ({"state_dict", "ldm_config"})."""
    path = Path(path)
    sd = _cast({**ckpt.extras, **ckpt.state_dict}, dtype)
    config_json = json.dumps(ckpt.config)
    if path.suffix == ".safetensors":
        atomic_write(path, lambda tmp: _save_safetensors(sd, tmp, {"format": "pt", "ldm_config": config_json}))
    elif path.suffix in (".ckpt", ".pt"):
        atomic_write(path, lambda tmp: torch.save({"state_dict": sd, "ldm_config": ckpt.config}, tmp))
    else:
        raise CheckpointError(f"{path}: unknown output type; use .safetensors or .ckpt, or a folder for diffusers")


def _our_beta_schedule(name: str) -> str:
    return {v: k for k, v in DIFFUSERS_BETA_SCHEDULE.items()}.get(name, name)


def _scheduler_config(config: dict[str, Any]) -> dict[str, Any]:
    sched = config["schedule"]
    return {
        "_class_name": "PNDMScheduler",
        "beta_schedule": DIFFUSERS_BETA_SCHEDULE.get(sched["beta_schedule"], sched["beta_schedule"]),
        "beta_start": sched["linear_start"],
        "beta_end": sched["linear_end"],
        "num_train_timesteps": sched["num_train_timesteps"],
        "prediction_type": config["prediction_type"],
        "timestep_spacing": sched.get("timestep_spacing", "leading"),
        "steps_offset": sched.get("steps_offset", 1),
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "clip_sample": False,
        "trained_betas": None,
    }


# The diffusers pipeline that feeds each kind of UNet input (see stable_diffusion.CONCAT_KINDS).
PIPELINE_CLASSES = {
    None: "StableDiffusionPipeline",
    "inpainting": "StableDiffusionInpaintPipeline",
    "image": "StableDiffusionInstructPix2PixPipeline",
}


def _model_index(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "_class_name": PIPELINE_CLASSES[config["concat"]],
        # The format's version, not a dependency: the pipeline folder layout is unchanged since then,
        # and diffusers reads this field (e.g. to warn about pre-0.6 inpainting folders).
        "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }


def save_diffusers_folder(ckpt: Checkpoint, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """A diffusers StableDiffusionPipeline folder, written under a temporary name and renamed at the end.

    EMA weights go to `unet_ema/` (as diffusers' training scripts save them). What diffusers has no place
    for (SD 2's unused last text block and projection, the original file's schedule buffers, the EMA's
    counters) goes to `ldm_extras.safetensors`, so converting back gives every tensor as it was.
    """
    from ldm.models.encoders import write_clip_tokenizer

    dst = Path(path)
    if dst.exists():
        raise CheckpointError(f"{dst} exists; remove it or choose another destination")
    cfg = ckpt.config
    if cfg["concat"] not in PIPELINE_CLASSES:
        raise CheckpointError(
            f"no diffusers pipeline takes a {cfg['concat']} input: save this model as an LDM single file "
            "(a .safetensors or .ckpt destination) instead of a folder"
        )
    kind = cfg["cond_stage"]["kind"]
    text_cfg = {k: v for k, v in cfg["cond_stage"].items() if k != "kind"}
    text_sd = _strip(ckpt.state_dict, TEXT_PREFIX)
    # The tower's configured output layer decides which blocks diffusers gets, as it decides the
    # config.json's layer count (guessing it from the weights breaks `layer="last"` towers).
    layer = text_cfg.get("layer", "penultimate") if kind == "openclip" else None
    parts = {
        "unet": (
            unet_config_to_diffusers(cfg["unet"], sample_size=cfg["image_size"] // downsampling_factor(cfg["first_stage"])),
            unet_to_diffusers(_strip(ckpt.state_dict, UNET_PREFIX), cfg["unet"]),
        ),
        "vae": (
            vae_config_to_diffusers(cfg["first_stage"], scaling_factor=cfg["scale_factor"]),
            vae_to_diffusers(_strip(ckpt.state_dict, VAE_PREFIX), cfg["first_stage"]),
        ),
        "text_encoder": (
            text_config_to_diffusers(kind, text_cfg),
            text_to_diffusers(text_sd, kind, layer),
        ),
    }
    aside = dict(ckpt.extras)
    if kind == "openclip":
        aside.update({TEXT_PREFIX + k: text_sd[k] for k in openclip_keys_dropped_in_diffusers(text_sd, layer)})
    aside.update({k: ckpt.state_dict[k] for k in EMA_BOOKKEEPING if k in ckpt.state_dict})
    if ckpt.has_ema():
        ema_unet = _strip(ckpt.with_ema_weights().state_dict, UNET_PREFIX)
        parts["unet_ema"] = (parts["unet"][0], unet_to_diffusers(ema_unet, cfg["unet"]))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        if aside:
            # Tensors diffusers has no place for; diffusers ignores the file, our loader restores them.
            metadata = {"format": "pt", "ldm_config": json.dumps(cfg)}
            _save_safetensors(_cast(aside, dtype), tmp / EXTRAS_FILE, metadata)
        for component, (dconfig, sd) in parts.items():
            (tmp / component).mkdir()
            (tmp / component / "config.json").write_text(json.dumps(dconfig, indent=2))
            weights = tmp / component / f"{DIFFUSERS_WEIGHT_NAMES[component]}.safetensors"
            _save_safetensors(_cast(sd, dtype), weights, {"format": "pt"})
        if ckpt.tokenizer_dir:
            _copy_as_new(Path(ckpt.tokenizer_dir), tmp / "tokenizer")
        else:
            write_clip_tokenizer(str(tmp / "tokenizer"), pad_token="!" if kind == "openclip" else "<|endoftext|>")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(_scheduler_config(cfg), indent=2))
        (tmp / "model_index.json").write_text(json.dumps(_model_index(cfg), indent=2))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is 0700: readable as any new folder instead
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save_checkpoint(ckpt: Checkpoint, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write in the format the destination names: a `.safetensors`/`.ckpt` file, or a folder (diffusers)."""
    if Path(path).suffix in (".safetensors", ".ckpt", ".pt"):
        save_ldm_file(ckpt, path, dtype)
    else:
        save_diffusers_folder(ckpt, path, dtype)


def checkpoint_from_model(model: StableDiffusion, ema_state: dict[str, Tensor] | None = None) -> Checkpoint:
    """The Checkpoint of a live model (optionally with `model_ema.*` tensors added)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    sd.update(ema_state or {})
    return Checkpoint(model.config, sd, getattr(model.cond_stage_model, "tokenizer_dir", None), "model")

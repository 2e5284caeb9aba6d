"""PNG text metadata: AUTOMATIC1111's `parameters` infotext (written and parsed by its rules) and our own
`ldm` chunk (the exact settings of a run, as JSON, which `sample.py from_png=` replays).

AUTOMATIC1111's format (modules/processing.py create_infotext, modules/infotext_utils.py):

    <prompt, any number of lines>
    Negative prompt: <negative prompt, any number of lines>     (only when there is one)
    Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 6ce0161689, Model: v1-5

A value holding `,`, `:` or a newline is written as a JSON string (`Lora hashes: "a: 0123456789ab"`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CHUNK = "ldm"  # our settings, JSON
PARAMETERS = "parameters"  # AUTOMATIC1111's infotext, read by A1111's "PNG Info", ComfyUI, Civitai, ...
FORMAT_VERSION = 1

# Our sampler names -> AUTOMATIC1111's. DPM++ 2M with Karras σs is "DPM++ 2M Karras" (the name A1111 used
# before 1.9 and still parses); other samplers with Karras σs get 1.9's "Schedule type: Karras".
SAMPLER_NAMES = {
    "ddim": "DDIM",
    "plms": "PLMS",
    "dpmpp_2m": "DPM++ 2M",
    "euler": "Euler",
    "euler_a": "Euler a",
    "ddpm": "DDPM",
}
A1111_SAMPLERS = {v: k for k, v in SAMPLER_NAMES.items()}

# A1111's own expressions (modules/infotext_utils.py).
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")

# A1111 fields read back by settings_from_a1111; anything else is reported as not applied.
UNDERSTOOD = {
    "Prompt", "Negative prompt", "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed",
    "Size-1", "Size-2", "Model hash", "Model", "Denoising strength", "Eta DDIM",
}
# Fields that describe the run without changing the image (or that need the user to act anyway).
INFORMATIONAL = {"Version", "Lora hashes", "TI hashes", "Hashes", "User", "VAE hash", "VAE"}


def quote(value: Any) -> Any:
    """A1111's infotext_utils.quote: a value holding `,`, `:` or a newline becomes a JSON string."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return value
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def a1111_parameters(prompt: str, negative_prompt: str, fields: Mapping[str, Any]) -> str:
    """The infotext as A1111 writes it: fields whose value is None are left out."""
    line = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in fields.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """A1111's parse_generation_parameters, without the UI's defaults: {"Prompt", "Negative prompt",
    field: value-as-text}. `Size: WxH` gives "Size-1" (width) and "Size-2" (height), as in A1111."""
    res: dict[str, str] = {}
    prompt = ""
    negative_prompt = ""
    done_with_prompt = False
    *lines, lastline = text.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for key, value in RE_PARAM.findall(lastline):
        if value[:1] == '"' and value[-1:] == '"':
            value = unquote(value)
        size = RE_IMAGESIZE.match(value)
        if size is not None:
            res[f"{key}-1"], res[f"{key}-2"] = size.group(1), size.group(2)
        else:
            res[key] = value
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    return res


def model_name(ckpt: str | Path) -> str:
    """A1111's `Model`: the checkpoint file's stem (a diffusers folder's name)."""
    path = Path(ckpt)
    return path.name if path.is_dir() else path.stem


def a1111_fields(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The key-value line of A1111's infotext for our settings (see sample.py's `meta`), in A1111's order."""
    sampler = settings["sampler"]
    name = sampler["name"]
    label = SAMPLER_NAMES.get(name, name)
    schedule = None
    if sampler.get("karras"):
        if name == "dpmpp_2m":
            label += " Karras"
        else:
            schedule = "Karras"
    eta = sampler.get("eta") or 0.0
    loras = [
        f"{Path(path).stem.replace(':', '').replace(',', '')}: {digest}"
        for path, digest in zip(settings.get("lora") or [], settings.get("lora_hashes") or [], strict=False)
    ]
    return {
        "Steps": settings["steps"],
        "Sampler": label,
        "Schedule type": schedule,
        "CFG scale": settings["guidance_scale"],
        "Image CFG scale": settings.get("image_guidance_scale") if settings.get("concat") == "image" else None,
        "Seed": settings["seed"],
        "Size": f"{settings['width']}x{settings['height']}",
        "Model hash": settings.get("model_hash"),
        "Model": model_name(settings["ckpt"]),
        "Denoising strength": settings.get("strength"),
        "Eta DDIM": eta if name == "ddim" and eta != 0 else None,
        "Lora hashes": ", ".join(loras) or None,
    }


def a1111_text(settings: Mapping[str, Any]) -> str:
    return a1111_parameters(settings["prompt"], settings.get("negative_prompt") or "", a1111_fields(settings))


def settings_from_a1111(params: Mapping[str, str]) -> dict[str, Any]:
    """Our settings from parsed A1111 fields: prompt, negative_prompt, steps, sampler, guidance_scale, seed,
    width, height, strength, image_guidance_scale, and model_hash/model_name (a name, not a path). An A1111
    sampler without a counterpart here gives `sampler: None` and its name under `a1111_sampler`.
    `ignored` lists the fields that change the image but are not applied (Clip skip, Hires ...)."""
    out: dict[str, Any] = {"prompt": params.get("Prompt", ""), "negative_prompt": params.get("Negative prompt", "")}
    number = {"Steps": ("steps", int), "CFG scale": ("guidance_scale", float), "Seed": ("seed", int),
              "Size-1": ("width", int), "Size-2": ("height", int), "Denoising strength": ("strength", float),
              "Image CFG scale": ("image_guidance_scale", float)}
    for field, (key, kind) in number.items():
        if field in params:
            try:
                out[key] = kind(float(params[field])) if kind is int else kind(params[field])
            except ValueError:
                raise ValueError(f"AUTOMATIC1111 field {field}: {params[field]!r} is not a number") from None
    if "Sampler" in params:
        label, karras = params["Sampler"], params.get("Schedule type", "").lower() == "karras"
        if label.endswith(" Karras"):
            label, karras = label[: -len(" Karras")], True
        name = A1111_SAMPLERS.get(label)
        if name is None or (karras and name not in ("dpmpp_2m", "euler")):
            out["sampler"], out["a1111_sampler"] = None, params["Sampler"]
        else:
            out["sampler"] = {"name": name, **({"karras": True} if karras else {})}
            if name == "ddim" and "Eta DDIM" in params:
                out["sampler"]["eta"] = float(params["Eta DDIM"])
    out["model_hash"] = params.get("Model hash")
    out["model_name"] = params.get("Model")
    out["ignored"] = sorted(set(params) - UNDERSTOOD - INFORMATIONAL)
    return out


def read_png_settings(path: str | Path, text: Mapping[str, str]) -> tuple[dict[str, Any], str]:
    """The settings in an image's text chunks and where they came from ("ldm" or "a1111")."""
    if CHUNK in text:
        try:
            settings = json.loads(text[CHUNK])
        except ValueError as err:
            raise ValueError(f"{path}: its '{CHUNK}' chunk is not JSON ({err})") from None
        if not isinstance(settings, dict) or "prompt" not in settings:
            raise ValueError(f"{path}: its '{CHUNK}' chunk does not hold sample.py settings")
        return settings, "ldm"
    if PARAMETERS in text:
        params = parse_a1111_parameters(text[PARAMETERS])
        if "Steps" not in params and "Seed" not in params:
            raise ValueError(f"{path}: its '{PARAMETERS}' text is not in AUTOMATIC1111's format (no Steps/Seed line)")
        return settings_from_a1111(params), "a1111"
    raise ValueError(
        f"{path} holds no generation settings (no '{CHUNK}' or '{PARAMETERS}' text chunk): "
        "it was not written by sample.py or AUTOMATIC1111"
    )


# Hashes, as A1111 computes them. Cached by file identity (real path, size, mtime), in memory and on disk
# (as A1111's cache.json), so a 4-15 GB checkpoint is read once, not at every sample.py run.
_HASHES: dict[tuple[str, str, int, int], str] = {}


def hash_cache_path() -> Path:
    """`$LDM_CACHE_DIR/hashes.json`, else `$XDG_CACHE_HOME/ldm/hashes.json`, else `~/.cache/ldm/hashes.json`."""
    root = os.environ.get("LDM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ldm"
    )
    return Path(root) / "hashes.json"


def _disk_cache() -> dict[str, str]:
    try:
        cached = json.loads(hash_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def _remember(entry: str, digest: str) -> None:
    """Add one hash to the disk cache; a cache that cannot be written only costs the next run a read."""
    path = hash_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cached = _disk_cache()
        cached[entry] = digest
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cached, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def _sha256(path: str | Path, skip_safetensors_header: bool = False) -> str:
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = (real, "addnet" if skip_safetensors_header else "file", stat.st_size, stat.st_mtime_ns)
    entry = "|".join(map(str, key))
    if key not in _HASHES and entry in (cached := _disk_cache()):
        _HASHES[key] = cached[entry]
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(real, "rb") as f:
            if skip_safetensors_header:
                f.seek(8 + int.from_bytes(f.read(8), "little"))
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
        _remember(entry, _HASHES[key])
    return _HASHES[key]


def model_hash(ckpt: str | Path) -> str | None:
    """A1111's `Model hash` ("short hash"): the first 10 hex digits of the sha256 of the checkpoint file.
    None for a diffusers folder: it has no single file, and a hash of one part of it would match no
    checkpoint that A1111, Civitai or other tools know."""
    return None if Path(ckpt).is_dir() else _sha256(ckpt)[:10]


def lora_hash(path: str | Path) -> str:
    """A1111's LoRA short hash: 12 hex digits of the sha256 of a .safetensors file past its header
    (kohya's "addnet" hash, Civitai's AutoV3), of the whole file otherwise."""
    return _sha256(path, skip_safetensors_header=str(path).lower().endswith(".safetensors"))[:12]

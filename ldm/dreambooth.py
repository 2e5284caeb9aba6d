"""DreamBooth prior preservation, part 1 (issue 11): the class images.

DreamBooth (Ruiz et al. 2022) keeps a fine-tuned model from forgetting what its class looks like by mixing,
into training, images of the class prompt ("a photo of a dog") that the base model made before training.

    from ldm.dreambooth import class_images, class_captions
    paths = class_images("v1-5-pruned-emaonly.safetensors", "a photo of a dog", 200, Path("class_cache"),
                         resolution=512, steps=50, guidance_scale=7.5, sampler="ddim", seed=0, batch_size=8)
    captions = class_captions(paths)             # the class prompt, once per image

The images go to `cache_root/<prompt>-<key>/00000.png ...`, where the key hashes everything that decides the
pixels: the base model's weights (the sha256 of the checkpoint file, or of a model's state dict), the class
prompt, negative prompt, resolution, sampler, steps, guidance scale and seed. Image i is made from seed
`seed + i` (ldm-eval's `batch_noise`), so any subset can be made alone, and batches start at multiples of
`batch_size`, so an interrupted run, started again, writes what an uninterrupted one writes. Images already
in the folder are kept: a second call with the same key loads no model and samples nothing; asking for more
images later only makes the new ones. Each PNG is written whole (temporary name, then renamed) with
sample.py's settings chunks, beside it `NNNNN.txt` holds its caption (the folder is one `ldm-make-shards`
takes), and `manifest.json` records the settings and the images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldm.cli.sample import UsageError, png_metadata, resolve_device, save_png, torch_dtype
from ldm.evaluate import _settings_of_png, batch_noise

if TYPE_CHECKING:
    from ldm.models.stable_diffusion import StableDiffusion

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def _file_digest(path: Path) -> str:
    from ldm.pnginfo import _sha256  # cached on disk by (path, size, mtime): a large checkpoint is read once

    return _sha256(path)


def weights_identity(model_or_ckpt: StableDiffusion | str | Path) -> str:
    """sha256 of the base weights: of the checkpoint file, of every file of a diffusers folder (by relative
    name), or of a model's state dict (names, dtypes, shapes and bytes, in name order) and prediction type."""
    digest = hashlib.sha256()
    if isinstance(model_or_ckpt, (str, Path)):
        path = Path(model_or_ckpt)
        if not path.exists():
            raise UsageError(f"base model {path} does not exist: give a checkpoint file, a diffusers folder or a model")
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                digest.update(f"{file.relative_to(path).as_posix()}\0{_file_digest(file)}\0".encode())
        else:
            return _file_digest(path)
        return digest.hexdigest()
    import torch

    digest.update(f"prediction_type={model_or_ckpt.prediction_type}\0".encode())
    for name, tensor in sorted(model_or_ckpt.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}\0{t.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "class"


def class_folder(cache_root: Path, key: dict[str, Any]) -> Path:
    """`cache_root/<prompt slug>-<16 hex digits of the key's sha256>` (a list of prompts: the first one's slug)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    prompt = key["class_prompt"]
    return Path(cache_root) / f"{_slug(prompt if isinstance(prompt, str) else prompt[0])}-{digest}"


def _write_json(path: Path, value: Any) -> None:
    from ldm.checkpoint import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8"))


def _write_text(path: Path, text: str) -> None:
    from ldm.checkpoint import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def class_prompt_list(class_prompt: str | Sequence[str]) -> list[str]:
    """The class prompts: one prompt, or a list of them (class image i is of prompt i mod their number:
    captioned regularisation pictures, as kohya's sd-scripts take them); each non-empty text."""
    prompts = [class_prompt] if isinstance(class_prompt, str) else list(class_prompt or [])
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise UsageError("class_prompt is empty: give the class the subject belongs to, e.g. 'a photo of a dog' (or "
                         "a list of such prompts)")
    return prompts


def class_images(
    model_or_ckpt: StableDiffusion | str | Path,
    class_prompt: str | Sequence[str],
    num_images: int,
    cache_root: str | Path,
    *,
    resolution: int = 512,
    steps: int = 50,
    guidance_scale: float = 7.5,
    sampler: str = "ddim",
    seed: int = 0,
    batch_size: int = 4,
    negative_prompt: str = "",
    eta: float = 0.0,
    karras: bool = False,
    ema: bool = False,
    prediction_type: str | None = None,
    device: str = "auto",
    dtype: str = "fp32",
) -> list[Path]:
    """The `num_images` class images of `class_prompt` from the base model (a StableDiffusion module, or a
    checkpoint file/diffusers folder that is loaded only when an image is missing), made or found in their
    cache folder under `cache_root`; image i from seed `seed + i`. Returns the PNG paths in order; each has its
    caption (the class prompt) in the `.txt` beside it (see `class_captions`). A list of class prompts makes
    image i of prompt i mod their number."""
    from ldm.sampling import SamplerSettings

    prompts = class_prompt_list(class_prompt)
    class_prompt = prompts[0] if len(prompts) == 1 else prompts  # one prompt: its cache key as before lists
    if int(num_images) < 1:
        raise UsageError(f"num_images must be at least 1 (DreamBooth uses 100-200 class images), got {num_images}")
    if int(batch_size) < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    if int(resolution) < 1:
        raise UsageError(f"resolution must be a positive number of pixels (e.g. 512), got {resolution}")
    num_images, batch_size, resolution, seed = int(num_images), int(batch_size), int(resolution), int(seed)
    try:
        settings = SamplerSettings(sampler=sampler, steps=int(steps), guidance_scale=float(guidance_scale),
                                   eta=float(eta), karras=bool(karras))
    except ValueError as err:
        raise UsageError(str(err)) from None
    is_path = isinstance(model_or_ckpt, (str, Path))
    key = {
        "format": FORMAT_VERSION,
        "weights_sha256": weights_identity(model_or_ckpt),
        "ema": bool(ema) if is_path else None,
        "prediction_type": prediction_type if is_path else None,
        "class_prompt": class_prompt,
        "negative_prompt": negative_prompt,
        "resolution": resolution,
        "sampler": {"name": sampler, "eta": settings.eta, "karras": settings.karras},
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        "seed": seed,
    }
    folder = class_folder(Path(cache_root), key)
    paths = [folder / f"{i:05d}.png" for i in range(num_images)]

    def prompt_of(i: int) -> str:
        return prompts[i % len(prompts)]

    def meta(i: int) -> dict[str, Any]:  # sample.py's settings, so `sample.py from_png=` remakes the image
        return {
            "prompt": prompt_of(i), "negative_prompt": negative_prompt, "seed": seed + i,
            "ckpt": str(Path(model_or_ckpt).resolve()) if is_path else "base-model",
            "model_hash": key["weights_sha256"][:10], "sampler": key["sampler"], "steps": settings.steps,
            "guidance_scale": settings.guidance_scale, "height": resolution, "width": resolution,
            "num_images": 1, "batch_size": batch_size, "ema": key["ema"], "prediction_type": prediction_type,
            "concat": None, "class_index": i,
        }

    missing = []
    for i, path in enumerate(paths):
        saved = _settings_of_png(path) if path.exists() else None  # None: absent, truncated or unreadable
        if saved is None or saved.get("seed") != seed + i or saved.get("prompt") != prompt_of(i):
            missing.append(i)
    if missing:
        _generate(model_or_ckpt, folder, paths, missing, meta, settings, key, batch_size, device, dtype, prompt_of)
    else:
        log.info("all %d class images of %r are in %s already", num_images, class_prompt, folder)
    for i, path in enumerate(paths):
        caption = path.with_suffix(".txt")
        if not caption.is_file() or caption.read_text(encoding="utf-8") != prompt_of(i):
            _write_text(caption, prompt_of(i))
    manifest = _read_manifest(folder)
    count = max(num_images, int(manifest.get("num_images") or 0)) if manifest.get("key") == key else num_images
    _write_manifest(folder, key, count, prompt_of)
    return paths


def _read_manifest(folder: Path) -> dict[str, Any]:
    try:
        value = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_manifest(folder: Path, key: dict[str, Any], count: int, prompt_of: Any) -> None:
    """The settings, and every image made so far (a later call may have asked for more than this one)."""
    images = [
        {"file": f"{i:05d}.png", "caption": prompt_of(i), "seed": key["seed"] + i}
        for i in range(count) if (folder / f"{i:05d}.png").is_file()
    ]
    _write_json(folder / MANIFEST, {"key": key, "num_images": count, "images": images})


def _generate(
    model_or_ckpt: Any, folder: Path, paths: Sequence[Path], missing: Sequence[int], meta: Any, settings: Any,
    key: dict[str, Any], batch_size: int, device: str, dtype: str, prompt_of: Any,
) -> None:
    """ldm-eval's generate_set, for one prompt and a model object or file: whole batches at fixed starts,
    only the missing images written."""
    import torch
    from PIL import Image

    from ldm import sampling

    if isinstance(model_or_ckpt, (str, Path)):
        from ldm.checkpoint import load_model

        model = load_model(model_or_ckpt, key["prediction_type"], key["ema"])
        target = resolve_device(device)
        model.to(device=target, dtype=torch_dtype("fp32" if target.type == "cpu" else dtype))
    else:  # a model is used where it is, in its own dtype (device= and dtype= are for a checkpoint)
        model = model_or_ckpt
    if model.concat is not None:
        raise UsageError(f"class images come from text alone: the base model is a {model.concat} model "
                         "(it needs an input picture); give a text-to-image base")
    resolution = key["resolution"]
    if resolution % model.downsampling_factor:
        raise UsageError(f"resolution={resolution} is not a multiple of {model.downsampling_factor} (the "
                         "autoencoder's downsampling): give e.g. "
                         f"{max(1, round(resolution / model.downsampling_factor)) * model.downsampling_factor}")
    folder.mkdir(parents=True, exist_ok=True)
    _write_manifest(folder, key, len(paths), prompt_of)
    wanted = set(missing)
    log.info("making %d of %d class images of %r in %s", len(wanted), len(paths), key["class_prompt"], folder)
    was_training = model.training
    model.eval()
    try:
        for chunk in sorted({i // batch_size for i in missing}):
            indices = list(range(chunk * batch_size, min((chunk + 1) * batch_size, len(paths))))
            generator, noise = batch_noise(model, indices, key["seed"], resolution, resolution)
            with torch.no_grad():
                images = sampling.generate(model, [prompt_of(i) for i in indices], key["negative_prompt"],
                                           settings, height=resolution, width=resolution, generator=generator,
                                           noise=noise)
            for i, array in zip(indices, sampling.to_uint8(images), strict=True):
                if i in wanted:
                    save_png(Image.fromarray(array), paths[i], png_metadata(meta(i)))
    finally:
        model.train(was_training)


def class_captions(paths: Sequence[str | Path]) -> list[str]:
    """The caption of each class image (the `.txt` beside it: the class prompt), for a data loader to mix in."""
    return [Path(p).with_suffix(".txt").read_text(encoding="utf-8") for p in paths]

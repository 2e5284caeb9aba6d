"""`python sample.py ckpt=PATH prompt="..."`: images from any checkpoint, with Hydra overrides.

    python sample.py ckpt=sd15.safetensors prompt="a castle on a hill" sampler=dpmpp_2m steps=25 seed=42
    python sample.py ckpt=sd21-768.safetensors prediction_type=v_prediction height=768 width=768 prompt="..."
    python sample.py ckpt=out/diffusers prompt_file=prompts.txt num_images=4 \\
        "negative_prompt='blurry, low quality'"
    python sample.py ckpt=sd15.safetensors prompt="a watercolour castle" image=sketch.png strength=0.6
    python sample.py ckpt=sd15-inpainting.safetensors prompt="a red sofa" image=room.png mask=mask.png
    python sample.py ckpt=instruct-pix2pix.safetensors prompt="make it snowy" image=street.png image_guidance_scale=1.5
    python sample.py ckpt=outputs/layout/.../last.ckpt prompt="..." seg=layout.png
    python sample.py from_png=outputs/samples/00000.png            # the same image again, bit for bit
    python sample.py from_png=outputs/samples/00000.png seed=7     # its settings, another seed

Writes numbered PNGs and a grid per prompt to `out_dir`. Each PNG carries AUTOMATIC1111's `parameters`
text (read by A1111's PNG Info, ComfyUI, Civitai, ...) and the exact settings as JSON in an `ldm` text
chunk, which `from_png=` replays (see ldm/pnginfo.py).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from ldm import pnginfo

if TYPE_CHECKING:  # imported where used: --help, --cfg job and config errors answer without them
    import torch
    from PIL import Image, PngImagePlugin

log = logging.getLogger(__name__)
# The `dtype` names and the torch dtypes they mean (names, so importing this module needs no torch).
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, DTYPES[name])


class UsageError(ValueError):
    """A bad setting, reported as one line that names the fix."""


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"device={name} is not a device: give auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device={name}: torch sees no CUDA GPU here; use device=cpu (or device=auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device={name}: torch sees {torch.cuda.device_count()} CUDA GPU(s), cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and not (mps is not None and mps.is_available()):
        raise UsageError(f"device={name}: torch sees no Apple GPU (MPS) here; use device=cpu (or device=auto)")
    return device


def read_prompts(cfg: DictConfig) -> list[str]:
    if cfg.prompt_file:
        path = Path(cfg.prompt_file)
        if path.is_dir():
            raise UsageError(f"prompt_file={path} is a folder: give a text file with one prompt per line")
        if not path.is_file():
            raise UsageError(f"prompt_file={path} does not exist")
        try:  # utf-8-sig: a byte-order mark (Windows Notepad's UTF-8) is not part of the first prompt
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise UsageError(f"prompt_file={path} is not UTF-8 text (byte {err.object[err.start]:#x} at offset "
                             f"{err.start}): save it as UTF-8") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise UsageError(f"prompt_file={path} holds no prompts (one per line)")
        return prompts
    if cfg.prompt is None:
        raise UsageError('give prompt="..." or prompt_file=PATH')
    return [_as_text(cfg.prompt)]


def _as_text(value: Any) -> str:
    # Hydra reads an unquoted `a, b` list override as a sequence: join it back into the text it was.
    if isinstance(value, (list, ListConfig)):
        return ", ".join(str(v) for v in value)
    return str(value)


def lora_files(cfg: DictConfig) -> tuple[list[str], list[float]]:
    """The `lora` file(s) and one `lora_scale` for each."""
    if not cfg.get("lora"):
        return [], []
    paths = [str(p) for p in cfg.lora] if isinstance(cfg.lora, (list, ListConfig)) else [str(cfg.lora)]
    scales = list(cfg.lora_scale) if isinstance(cfg.lora_scale, (list, ListConfig)) else [cfg.lora_scale] * len(paths)
    if len(scales) != len(paths):
        raise UsageError(f"{len(paths)} LoRA files but {len(scales)} lora_scale values: give one, or one per file")
    return paths, [float(s) for s in scales]


def apply_loras(cfg: DictConfig, model: Any) -> None:
    """Merge the `lora` file(s) into the UNet's and the text encoder's weights, each at its `lora_scale`."""
    from ldm.lora import merge_lora_file

    for path, scale in zip(*lora_files(cfg), strict=True):
        try:
            merge_lora_file(model, path, float(scale))
        except FileNotFoundError as err:
            raise UsageError(str(err)) from None


def png_metadata(settings: dict[str, Any]) -> PngImagePlugin.PngInfo:
    """AUTOMATIC1111's `parameters` infotext, and our exact settings as JSON in the `ldm` chunk."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(pnginfo.PARAMETERS, pnginfo.a1111_text(settings))
    info.add_text(pnginfo.CHUNK, json.dumps(settings))
    return info


@dataclass
class FromPng:
    """What `from_png=` takes from an image besides config values."""

    path: str
    source: str  # "ldm" (our chunk) or "a1111" (parameters text only)
    prompt: str | None  # None: the command line's prompt or prompt_file
    negative: str | None  # None: the command line's negative_prompt
    image_index: int | None  # the image of the batch to write; None: all of them (and the grid)
    model_hash: str | None
    device: str | None


# What `from_png=` takes from an image's settings, wherever the config still holds sample.yaml's default.
PNG_KEYS = (
    "steps", "guidance_scale", "image_guidance_scale", "seed", "num_images", "batch_size", "height", "width",
    "timestep_spacing", "steps_offset", "dtype", "image", "mask", "seg", "strength",
)
CKPT_KEYS = ("prediction_type", "force_prediction_type", "ema")  # only along with the image's checkpoint


def sample_defaults() -> tuple[DictConfig, DictConfig]:
    """sample.yaml's own values and its default sampler's."""
    conf = Path(__file__).resolve().parent.parent / "conf"
    base = OmegaConf.load(conf / "sample.yaml")
    name = next(d.sampler for d in base.defaults if isinstance(d, DictConfig) and "sampler" in d)
    return base, OmegaConf.load(conf / "sampler" / f"{name}.yaml")


def apply_png_settings(cfg: DictConfig) -> tuple[DictConfig, FromPng | None]:
    """`from_png=IMAGE`: the settings saved in IMAGE (our `ldm` chunk; else A1111's `parameters` text)
    apply wherever `cfg` still holds sample.yaml's default, so what the command line sets wins (a value
    equal to the default counts as not set). Not taken from the image: out_dir, grid, device (where the
    run happens) and allow_unsafe_pickle (a file's say is no consent)."""
    path = cfg.get("from_png")
    if path is None:
        return cfg, None
    from ldm.sampling import read_picture

    picture = read_picture(str(path), "from_png", upright=False)  # its text chunks, as written
    try:
        saved, source = pnginfo.read_png_settings(path, getattr(picture, "text", {}))
    except ValueError as err:
        raise UsageError(f"from_png={err}") from None
    base, base_sampler = sample_defaults()

    def unset(key: str) -> bool:
        return cfg.get(key) == base.get(key)

    values: dict[str, Any] = {}
    if cfg.get("ckpt") is None:
        if saved.get("ckpt") is None:
            raise UsageError(
                f"from_png={path} holds AUTOMATIC1111 settings: they name the model "
                f"({saved.get('model_name')!r}, hash {saved.get('model_hash')}) but not its file: give ckpt=PATH"
            )
        if not Path(saved["ckpt"]).exists():
            raise UsageError(f"from_png={path} was made from ckpt={saved['ckpt']}, which does not exist: give ckpt=PATH")
        values["ckpt"] = saved["ckpt"]
        values.update({k: saved[k] for k in CKPT_KEYS if k in saved and unset(k)})
    values.update({k: saved[k] for k in PNG_KEYS if k in saved and unset(k)})
    if saved.get("lora") and unset("lora"):
        values["lora"] = saved["lora"]
        if unset("lora_scale") and saved.get("lora_scale") is not None:
            values["lora_scale"] = saved["lora_scale"]
    if values.get("strength") is not None and values.get("image", cfg.get("image")) is None:
        del values["strength"]  # A1111's img2img strength, without the picture it started from
    if cfg.sampler.name == base_sampler.name:  # the command line chose no other sampler
        if saved.get("sampler") is None and saved.get("a1111_sampler"):
            raise UsageError(
                f"from_png={path}: AUTOMATIC1111's sampler {saved['a1111_sampler']!r} has no counterpart here: "
                f"give sampler=NAME ({', '.join(pnginfo.SAMPLER_NAMES)})"
            )
        if saved.get("sampler"):
            sampler = dict(saved["sampler"])
            sampler.update({k: v for k, v in cfg.sampler.items() if v != base_sampler.get(k)})
            values["sampler"] = sampler
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for key, value in values.items():
            cfg[key] = value
    index = saved.get("image_index") if source == "ldm" else None
    if index is not None and index >= cfg.num_images:
        raise UsageError(f"from_png={path} is image {index} (from 0) of a batch: num_images={cfg.num_images} ends before it")
    if source == "a1111":
        log.warning(
            "from_png=%s: AUTOMATIC1111 settings; A1111 draws its noise otherwise, so the image is not A1111's%s",
            path, f"; not applied: {', '.join(saved['ignored'])}" if saved.get("ignored") else "",
        )
    use_prompt = cfg.get("prompt") is None and cfg.get("prompt_file") is None
    png = FromPng(
        path=str(path),
        source=source,
        prompt=saved.get("prompt", "") if use_prompt else None,
        negative=saved.get("negative_prompt", "") if unset("negative_prompt") else None,
        image_index=index,
        model_hash=saved.get("model_hash"),
        device=saved.get("device"),
    )
    return cfg, png


def save_png(image: Image.Image, path: Path, info: PngImagePlugin.PngInfo | None = None) -> None:
    from ldm.checkpoint import atomic_write

    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def next_index(out_dir: Path) -> int:
    """Numbering continues after the PNGs already there, so a second run never overwrites the first."""
    taken = [int(p.stem) for p in out_dir.glob("*.png") if p.stem.isdigit()]
    return max(taken, default=-1) + 1


class ProgressBars:
    """One tqdm bar per batch of a prompt (the callback of ldm.sampling.generate_images)."""

    def __init__(self, steps: int, num_images: int):
        self.steps, self.num_images, self.bar, self.start = steps, num_images, None, None

    def __call__(self, prompt: str, start: int, *_: Any) -> None:
        from tqdm.auto import tqdm

        if start != self.start:
            self.close()
            self.bar = tqdm(total=self.steps, desc=f"{prompt[:40]!r} {start + 1}/{self.num_images}", leave=False)
            self.start = start
        self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(cfg: DictConfig) -> list[Path]:
    import numpy as np
    from PIL import Image

    from ldm.checkpoint import load_model
    from ldm.sampling import (
        COMPILE_MODES,
        SamplerSettings,
        check_inputs,
        compile_unet,
        generate_images,
        image_grid,
        output_size,
        resolve_strength,
    )

    cfg, png = apply_png_settings(cfg)
    if cfg.get("ckpt") is None:
        raise UsageError("give ckpt=PATH (a .safetensors/.ckpt file or a diffusers folder), or from_png=IMAGE.png")
    prompts = [png.prompt] if png is not None and png.prompt is not None else read_prompts(cfg)
    negative = png.negative if png is not None and png.negative is not None else _as_text(cfg.negative_prompt)
    if cfg.dtype not in DTYPES:
        raise UsageError(f"dtype={cfg.dtype} is not one of {sorted(DTYPES)}")
    if cfg.num_images < 1:
        raise UsageError(f"num_images must be at least 1, got {cfg.num_images}")
    for key in ("batch_size", "height", "width"):
        if cfg.get(key) is not None and cfg[key] < 1:
            raise UsageError(f"{key} must be at least 1, got {cfg[key]} (or leave it out: {key}=null)")
    compile_mode = cfg.get("compile_mode", "default")
    if cfg.get("compile") and compile_mode not in COMPILE_MODES:
        raise UsageError(f"compile_mode={compile_mode} is not one of {', '.join(COMPILE_MODES)}")
    batch_size = cfg.batch_size or cfg.num_images
    settings = SamplerSettings(
        sampler=cfg.sampler.name,
        steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        eta=cfg.sampler.get("eta", 0.0),
        karras=cfg.sampler.get("karras", False),
        timestep_spacing=cfg.timestep_spacing,
        steps_offset=cfg.steps_offset,
        image_guidance_scale=cfg.image_guidance_scale,
    )
    device = resolve_device(cfg.device)
    dtype = cfg.dtype
    if device.type == "cpu" and dtype != "fp32":
        # Half precision is for GPUs: on the CPU torch's norm layers refuse the mix of half weights and fp32
        # latents ("mixed dtype (CPU)"), and it would be slower than fp32 anyway.
        log.warning("dtype=%s does not run on the CPU: sampling in fp32 instead (device=%s)", dtype, device)
        dtype = "fp32"
    if png is not None and png.device is not None and png.device != str(device):
        log.warning("from_png=%s was made on %s, this run is on %s: pixels may differ", png.path, png.device, device)
    model = load_model(
        cfg.ckpt, cfg.prediction_type, cfg.ema, cfg.allow_unsafe_pickle,
        force_prediction_type=bool(cfg.get("force_prediction_type", False)),
    )
    apply_loras(cfg, model)
    model.to(device=device, dtype=torch_dtype(dtype))
    check_inputs(model, cfg.image, cfg.mask, cfg.get("seg"))
    if cfg.get("compile"):
        compile_unet(model, compile_mode)
    height, width = output_size(model, cfg.image, cfg.height, cfg.width)
    settings.strength = resolve_strength(model, cfg.strength, cfg.image)
    # Once per run: a 4 GB file takes seconds (A1111's "Model hash"; None for a diffusers folder).
    ckpt_hash = pnginfo.model_hash(cfg.ckpt)
    if png is not None and png.model_hash and ckpt_hash and png.model_hash != ckpt_hash:
        log.warning(
            "from_png=%s was made from a checkpoint with hash %s, %s has hash %s: the image will differ",
            png.path, png.model_hash, cfg.ckpt, ckpt_hash,
        )
    lora_paths, lora_scales = lora_files(cfg)
    strength_applies = (model.concat is None and cfg.image is not None) or model.concat == "inpainting"
    meta_base = {
        "version": pnginfo.FORMAT_VERSION,
        "ckpt": os.path.abspath(cfg.ckpt),
        "model_hash": ckpt_hash,
        "concat": model.concat,
        "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        "image_guidance_scale": settings.image_guidance_scale,
        "seed": cfg.seed,
        "height": height,
        "width": width,
        "num_images": cfg.num_images,
        "batch_size": batch_size,
        "ema": cfg.ema,
        "prediction_type": cfg.prediction_type,
        "force_prediction_type": bool(cfg.get("force_prediction_type", False)),
        "timestep_spacing": cfg.timestep_spacing,
        "steps_offset": cfg.steps_offset,
        "dtype": cfg.dtype,
        "lora": [os.path.abspath(p) for p in lora_paths] or None,
        "lora_scale": lora_scales or None,
        "lora_hashes": [pnginfo.lora_hash(p) for p in lora_paths] or None,
        **{k: None if cfg.get(k) is None else os.path.abspath(str(cfg.get(k))) for k in ("image", "mask", "seg")},
        "strength": settings.strength if strength_applies else None,
        "device": str(device),
    }
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = next_index(out_dir)
    # from_png= of one image of a batch: the batches up to its own (ancestral samplers draw step noise
    # per forward pass, and a batch's size can change the arithmetic), then only that image is written.
    keep = png.image_index if png is not None else None
    written: list[Path] = []
    _progress.update(out_dir=out_dir, first=index)  # what a signal's one line reports
    for prompt in prompts:
        progress = ProgressBars(settings.steps, cfg.num_images)
        # ldm.sampling.generate_images: what a Python user calls, so both give the same images.
        (images,) = generate_images(
            model, [prompt], negative, image=cfg.image, mask=cfg.mask, seg=cfg.get("seg"), strength=cfg.strength,
            settings=settings, seed=cfg.seed, num_images=cfg.num_images, batch_size=batch_size, height=height,
            width=width, up_to=keep, callback=progress,
        )
        progress.close()
        meta = {"prompt": prompt, "negative_prompt": negative, **meta_base}
        for i, image in enumerate(images):
            if keep is not None and i != keep:
                continue
            path = out_dir / f"{index:05d}.png"
            save_png(image, path, png_metadata({**meta, "image_index": i}))
            written.append(path)
            index += 1
        if cfg.grid and keep is None and len(images) > 1:
            grid_path = out_dir / f"grid-{index - len(images):05d}.png"
            save_png(Image.fromarray(image_grid([np.asarray(im) for im in images])), grid_path, png_metadata(meta))
            written.append(grid_path)
    return written


# Where `run` writes and the number its first image gets (a signal's line counts the images written since).
_progress: dict[str, Any] = {"out_dir": None, "first": 0}


class Stopped(BaseException):
    """Ctrl-C, SIGTERM or a closed terminal (SIGHUP) in sample.py: it stops between two forward passes; every
    PNG already written is whole (each is renamed into place once complete), the one being written is removed."""

    def __init__(self, signal_name: str):
        self.signal_name = signal_name
        super().__init__(signal_name)


def _install_stop_handlers() -> None:
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise Stopped(signal.Signals(signum).name)

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        signum = getattr(signal, name)
        if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):  # not nohup's ignored SIGHUP
            signal.signal(signum, stop)


def main() -> None:
    """The console entry point: the command line as typed (see ldm.cli.overrides), then Hydra. A signal stops
    it with one line that says what was written, and 128 + the signal's number."""
    import signal
    import sys

    from ldm.cli.checks import run_cli

    _install_stop_handlers()
    try:
        run_cli("sample", hydra_main)
    except Stopped as stop:
        if stop.signal_name == "SIGHUP":
            from ldm.lightning.interrupt import _quiet_closed_terminal

            _quiet_closed_terminal()
        out_dir = _progress["out_dir"]
        images = [] if out_dir is None else [
            p for p in Path(out_dir).glob("*.png") if p.stem.isdigit() and int(p.stem) >= _progress["first"]
        ]
        where = f" to {out_dir}" if out_dir is not None else ""
        try:
            print(f"\nsample.py: {stop.signal_name}: stopped; {len(images)} images written{where} (each whole)",
                  file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass
        raise SystemExit(128 + int(getattr(signal, stop.signal_name))) from None


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def hydra_main(cfg: DictConfig) -> None:
    from ldm.checkpoint import CheckpointError  # the job runs: the model code is imported now

    try:
        written = run(cfg)
    except (CheckpointError, UsageError, ValueError) as err:
        from ldm.cli.checks import exit_with_usage_error

        exit_with_usage_error("sample.py", err)
    log.info("wrote %d files to %s", len(written), cfg.out_dir)
    print(f"wrote {len(written)} images to {cfg.out_dir}")


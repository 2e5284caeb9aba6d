"""sample.py gives diffusers' StableDiffusionPipeline image for image (same weights, prompt, seed, settings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import model_config, randomize_
from hydra import compose, initialize_config_module
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm.checkpoint import checkpoint_from_model, save_checkpoint
from ldm.cli.sample import run
from ldm.convert import main as convert_main
from ldm.models.stable_diffusion import StableDiffusion

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle on a blue background, highly detailed"
NEGATIVE = "blurry, low quality"


def sample_config(overrides: list[str]):
    with initialize_config_module(config_module="ldm.conf", version_base="1.3"):
        return compose(config_name="sample", overrides=overrides)


def tiny_sd2_config() -> dict:
    """SD 2.x-768's structure at tiny size: OpenCLIP text tower (penultimate layer), linear projections,
    heads of fixed width, v-prediction."""
    cfg = model_config("tiny")
    cfg["unet"].update(
        model_channels=64, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True, transformer_depth=2
    )
    cfg["cond_stage"] = {"kind": "openclip", "width": 64, "heads": 1, "layers": 3, "layer": "penultimate"}
    cfg["prediction_type"] = "v_prediction"
    cfg["scale_factor"] = 0.18215  # SD's, which a file without our metadata is assumed to use
    return cfg


def write_model(tmp_path: Path, name: str, seed: int = 0, fmt: str = "diffusers") -> Path:
    cfg = tiny_sd2_config() if name == "tiny_sd2" else model_config(name)
    model = randomize_(StableDiffusion.from_config(cfg), std=0.08, seed=seed)
    path = tmp_path / (f"{name}-diffusers" if fmt == "diffusers" else f"{name}.safetensors")
    save_checkpoint(checkpoint_from_model(model), path)
    return path


def write_pipeline(tmp_path: Path, name: str, seed: int = 0) -> Path:
    return write_model(tmp_path, name, seed)


def diffusers_images(
    folder: Path, scheduler: str, steps: int, guidance: float, seed: int, size: int, n: int,
    pipeline: str = "StableDiffusionPipeline", width: int | None = None, **inputs,
):
    """uint8 images from diffusers' `pipeline` loaded from `folder`, with `scheduler`; `inputs` go to
    the call (e.g. image= and mask_image= for the inpainting pipeline)."""
    diffusers = pytest.importorskip("diffusers")
    pipe = getattr(diffusers, pipeline).from_pretrained(str(folder), safety_checker=None)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        height=size,
        width=width or size,
        num_images_per_prompt=n,
        output_type="np",
        **inputs,
    )
    return (out.images * 255).round().astype("uint8")


def our_images(
    folder: Path, out_dir: Path, sampler: str, steps: int, guidance: float, seed: int, size: int, n: int,
    extra: tuple[str, ...] = (),
):
    cfg = sample_config(
        [
            f"ckpt={folder}",
            f"prompt='{PROMPT}'",
            f"negative_prompt='{NEGATIVE}'",
            f"sampler={sampler}",
            f"steps={steps}",
            f"guidance_scale={guidance}",
            f"seed={seed}",
            f"height={size}",
            f"width={size}",
            f"num_images={n}",
            f"out_dir={out_dir}",
            "device=cpu",
            *extra,
        ]
    )
    paths = [p for p in run(cfg) if not p.name.startswith("grid")]
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


@pytest.mark.parametrize(
    ("sampler", "scheduler", "steps", "guidance", "seed"),
    [
        ("ddim", "DDIMScheduler", 12, 7.5, 0),
        ("dpmpp_2m", "DPMSolverMultistepScheduler", 10, 5.0, 3),
    ],
)
def test_sample_matches_diffusers_pipeline(tmp_path, sampler, scheduler, steps, guidance, seed):
    folder = write_pipeline(tmp_path, "tiny", seed=seed)
    ours = our_images(folder, tmp_path / "out", sampler, steps, guidance, seed, 32, 2)
    theirs = diffusers_images(folder, scheduler, steps, guidance, seed, 32, 2)
    assert ours.shape == theirs.shape == (2, 32, 32, 3)
    assert ours.std() > 5, "random weights should give a non-flat image, or the comparison says nothing"
    diff = np.abs(ours.astype(int) - theirs.astype(int)).max()
    assert diff <= 2, f"max pixel difference {diff}/255"


def test_sd2_structure_v_prediction_matches_diffusers_from_single_file_and_folder(tmp_path):
    single = write_model(tmp_path, "tiny_sd2", seed=5, fmt="single")
    folder = tmp_path / "converted"
    assert convert_main([str(single), str(folder)]) == 0
    theirs = diffusers_images(folder, "EulerDiscreteScheduler", 8, 6.0, 5, 32, 1)
    from_folder = our_images(folder, tmp_path / "a", "euler", 8, 6.0, 5, 32, 1)
    # As released SD 2.x files: tensors only, so the prediction type must be named.
    save_file(load_file(str(single)), str(single))
    from_single = our_images(single, tmp_path / "b", "euler", 8, 6.0, 5, 32, 1, ("prediction_type=v_prediction",))
    as_epsilon = our_images(single, tmp_path / "c", "euler", 8, 6.0, 5, 32, 1)
    assert from_folder.std() > 5
    assert np.abs(from_folder.astype(int) - theirs.astype(int)).max() <= 2
    assert np.abs(from_single.astype(int) - theirs.astype(int)).max() <= 2
    assert np.abs(as_epsilon.astype(int) - theirs.astype(int)).max() > 2, "prediction_type must matter"


def test_sd15_size_sample_matches_diffusers_pipeline(tmp_path):
    folder = write_pipeline(tmp_path, "sd15", seed=1)
    ours = our_images(folder, tmp_path / "out", "ddim", 4, 7.5, 1, 64, 1)
    theirs = diffusers_images(folder, "DDIMScheduler", 4, 7.5, 1, 64, 1)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 2


def test_pngs_carry_settings_and_runs_do_not_overwrite(tmp_path):
    folder = write_pipeline(tmp_path, "tiny")
    cfg = sample_config([f"ckpt={folder}", "prompt=a cat", "steps=2", "height=32", "width=32",
                         "num_images=2", "batch_size=1", f"out_dir={tmp_path / 'o'}", "sampler=euler_a"])
    first = run(cfg)
    second = run(cfg)
    names = sorted(p.name for p in first + second)
    assert names == ["00000.png", "00001.png", "00002.png", "00003.png", "grid-00000.png", "grid-00002.png"]
    text = Image.open(tmp_path / "o" / "00001.png").text
    settings = json.loads(text["ldm"])
    assert settings["prompt"] == "a cat" and settings["sampler"]["name"] == "euler_a" and settings["seed"] == 0
    assert text["parameters"].startswith("a cat\nSteps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 0, Size: 32x32")
    a = np.asarray(Image.open(tmp_path / "o" / "00000.png"))
    b = np.asarray(Image.open(tmp_path / "o" / "00002.png"))
    assert np.array_equal(a, b), "same seed, same prompt, same image"


def test_prompt_file(tmp_path):
    folder = write_pipeline(tmp_path, "tiny")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    cfg = sample_config([f"ckpt={folder}", f"prompt_file={prompts}", "steps=1", "height=32", "width=32",
                         f"out_dir={tmp_path / 'o'}", "guidance_scale=1"])
    assert [p.name for p in run(cfg)] == ["00000.png", "00001.png"]
    assert json.loads(Image.open(tmp_path / "o" / "00001.png").text["ldm"])["prompt"] == "a dog"

    # An unquoted comma list is the negative prompt as typed (tests/test_cli.py has the rest of the typing).
    proc = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), f"ckpt={folder}", "prompt=x", "negative_prompt=blurry, low quality",
         "steps=1", "height=32", "width=32", f"out_dir={tmp_path / 'n'}"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Negative prompt: blurry, low quality" in Image.open(tmp_path / "n" / "00000.png").text["parameters"]


def test_bad_checkpoint_path_is_one_clear_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), f"ckpt={tmp_path / 'nope.safetensors'}", "prompt=x"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def write_inpainting_inputs(tmp_path: Path, height: int, width: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(height * width)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    # Greys on both sides of the half-way line: 100 is kept, 140 repainted (the mask is binarized).
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 :] = 255
    mask[:4, :] = 100
    mask[-4:, :] = 140
    paths = tmp_path / "image.png", tmp_path / "mask.png"
    Image.fromarray(image).save(paths[0])
    Image.fromarray(mask).save(paths[1])
    return paths


@pytest.mark.parametrize(
    ("sampler", "scheduler", "steps", "guidance", "seed", "height", "width"),
    [
        ("ddim", "DDIMScheduler", 8, 6.0, 1, 32, 32),
        ("euler_a", "EulerAncestralDiscreteScheduler", 6, 5.0, 2, 32, 64),
    ],
)
def test_inpainting_matches_diffusers_inpaint_pipeline(tmp_path, sampler, scheduler, steps, guidance, seed, height, width):
    """A 9-channel UNet with image= and mask=: diffusers' StableDiffusionInpaintPipeline, image for image.

    The two draw from one generator in the same order (initial noise, then the masked image's
    posterior sample, then the sampler's noise), so euler_a checks the order too."""
    cfg = model_config("tiny")
    cfg["unet"]["in_channels"] = 9
    folder = tmp_path / "inpaint"
    save_checkpoint(checkpoint_from_model(randomize_(StableDiffusion.from_config(cfg), std=0.08, seed=seed)), folder)
    image, mask = write_inpainting_inputs(tmp_path, height, width)
    theirs = diffusers_images(
        folder, scheduler, steps, guidance, seed, height, 2, pipeline="StableDiffusionInpaintPipeline",
        width=width, image=Image.open(image), mask_image=Image.open(mask),
    )

    def ours(mask_path: Path, out: str) -> np.ndarray:
        overrides = [
            f"ckpt={folder}", f"prompt='{PROMPT}'", f"negative_prompt='{NEGATIVE}'", f"image={image}",
            f"mask={mask_path}", f"sampler={sampler}", f"steps={steps}", f"guidance_scale={guidance}",
            f"seed={seed}", f"height={height}", f"width={width}", "num_images=2",
            f"out_dir={tmp_path / out}", "device=cpu",
            # one image per pass also matches for a deterministic sampler (an ancestral one draws its
            # step noise per pass, so it matches diffusers with the whole batch in one pass only)
            *(["batch_size=1"] if sampler == "ddim" else []),
        ]
        paths = [p for p in run(sample_config(overrides)) if not p.name.startswith("grid")]
        assert json.loads(Image.open(paths[0]).text["ldm"])["mask"] == str(mask_path)
        return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])

    mine = ours(mask, "a")
    assert mine.shape == theirs.shape == (2, height, width, 3)
    assert mine.std() > 5, "random weights should give a non-flat image, or the comparison says nothing"
    diff = np.abs(mine.astype(int) - theirs.astype(int)).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    # the mask reaches the UNet: another mask gives other images
    other = tmp_path / "other-mask.png"
    Image.fromarray(255 - np.asarray(Image.open(mask))).save(other)
    assert np.abs(ours(other, "b").astype(int) - mine.astype(int)).max() > 10


def test_inpainting_inputs_are_checked(tmp_path):
    cfg = model_config("tiny")
    cfg["unet"]["in_channels"] = 9
    folder = tmp_path / "inpaint"
    save_checkpoint(checkpoint_from_model(StableDiffusion.from_config(cfg)), folder)
    image, mask = write_inpainting_inputs(tmp_path, 32, 32)
    base = [f"ckpt={folder}", "prompt=x", "steps=1", "height=32", "width=32", f"out_dir={tmp_path / 'o'}"]
    with pytest.raises(ValueError, match="inpainting model .*image=PATH and mask=PATH"):
        run(sample_config(base))
    with pytest.raises(ValueError, match="needs both image=PATH and mask=PATH"):
        run(sample_config([*base, f"image={image}"]))
    with pytest.raises(ValueError, match="does not exist"):
        run(sample_config([*base, f"image={image}", f"mask={tmp_path / 'nope.png'}"]))
    text_model = write_pipeline(tmp_path, "tiny")
    with pytest.raises(ValueError, match="not an inpainting model"):
        run(sample_config([f"ckpt={text_model}", *base[1:], f"image={image}", f"mask={mask}"]))

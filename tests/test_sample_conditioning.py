"""sample.py with image-conditioned models: InstructPix2Pix-style editing (8-channel UNets) matches
diffusers' StableDiffusionInstructPix2PixPipeline; semantic-map models take `seg=`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import model_config, randomize_
from PIL import Image
from safetensors.torch import load_file, save_file
from test_sample import NEGATIVE, PROMPT, sample_config, tiny_sd2_config

from ldm.checkpoint import CheckpointError, checkpoint_from_model, read_checkpoint, save_checkpoint
from ldm.cli.sample import run
from ldm.models.stable_diffusion import StableDiffusion

ROOT = Path(__file__).resolve().parent.parent


def edit_model(tmp_path: Path, seed: int, fmt: str = "diffusers", sd2: bool = False) -> Path:
    cfg = model_config("tiny")
    cfg["unet"]["in_channels"] = 8  # z_t and the input picture's latents, as InstructPix2Pix
    cfg["scale_factor"] = 0.18215  # SD's: the picture's latents are not scaled by it, z_t's are
    if sd2:
        cfg["unet"].update(num_heads=-1, num_head_channels=16, use_linear_in_transformer=True)
        cfg["cond_stage"] = {"kind": "openclip", "width": 64, "heads": 2, "layers": 3, "layer": "penultimate"}
    model = randomize_(StableDiffusion.from_config(cfg), std=0.08, seed=seed)
    path = tmp_path / ("ip2p" if fmt == "diffusers" else "ip2p.safetensors")
    save_checkpoint(checkpoint_from_model(model), path)
    return path


def write_picture(path: Path, height: int, width: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    Image.fromarray(smooth).resize((width, height), Image.Resampling.BILINEAR).save(path)
    return path


def diffusers_edit(folder: Path, picture: Path, scheduler: str, steps: int, g: float, ig: float, seed: int, n: int):
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        PROMPT,
        image=Image.open(picture),
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        guidance_scale=g,
        image_guidance_scale=ig,
        generator=torch.Generator("cpu").manual_seed(seed),
        num_images_per_prompt=n,
        output_type="np",
    )
    return (out.images * 255).round().astype("uint8")


def our_edit(ckpt: Path, picture: Path, out: Path, sampler: str, steps: int, g: float, ig: float, seed: int, n: int):
    cfg = sample_config(
        [
            f"ckpt={ckpt}",
            f"prompt='{PROMPT}'",
            f"negative_prompt='{NEGATIVE}'",
            f"image={picture}",
            f"sampler={sampler}",
            f"steps={steps}",
            f"guidance_scale={g}",
            f"image_guidance_scale={ig}",
            f"seed={seed}",
            f"num_images={n}",
            f"out_dir={out}",
            "device=cpu",
        ]
    )
    paths = [p for p in run(cfg) if not p.name.startswith("grid")]
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


@pytest.mark.parametrize(
    ("sampler", "scheduler", "steps", "g", "ig", "seed", "height", "width", "sd2"),
    [
        ("ddim", "DDIMScheduler", 10, 7.5, 1.5, 0, 32, 32, False),
        ("euler_a", "EulerAncestralDiscreteScheduler", 8, 5.0, 2.0, 3, 32, 48, False),
        ("dpmpp_2m", "DPMSolverMultistepScheduler", 8, 1.0, 1.5, 1, 40, 32, True),  # no guidance
        ("euler", "EulerDiscreteScheduler", 6, 6.0, 0.5, 2, 32, 32, False),  # g_I < 1: no guidance
    ],
)
def test_edit_matches_diffusers_instruct_pix2pix(tmp_path, sampler, scheduler, steps, g, ig, seed, height, width, sd2):
    folder = edit_model(tmp_path, seed, sd2=sd2)
    assert read_checkpoint(folder).config["concat"] == "image"
    # Not a multiple of 8 on one side: both round the output size down to the autoencoder's multiple.
    picture = write_picture(tmp_path / "in.png", height + 3, width, seed)
    theirs = diffusers_edit(folder, picture, scheduler, steps, g, ig, seed, 2)
    ours = our_edit(folder, picture, tmp_path / "out", sampler, steps, g, ig, seed, 2)
    assert ours.shape == theirs.shape == (2, height, width, 3)
    assert ours.std() > 5, "random weights should give a non-flat image, or the comparison says nothing"
    diff = np.abs(ours.astype(int) - theirs.astype(int)).max()
    assert diff <= 2, f"max pixel difference {diff}/255"


def test_edit_from_a_bare_single_file_and_its_inputs_matter(tmp_path):
    single = edit_model(tmp_path, 4, fmt="single")
    save_file(load_file(str(single)), str(single))  # tensors only, as released files: 8 channels say "image"
    picture = write_picture(tmp_path / "a.png", 32, 32, 1)
    other = write_picture(tmp_path / "b.png", 32, 32, 2)
    base = our_edit(single, picture, tmp_path / "o1", "ddim", 6, 7.5, 1.5, 0, 1)
    assert not np.array_equal(base, our_edit(single, other, tmp_path / "o2", "ddim", 6, 7.5, 1.5, 0, 1))
    assert not np.array_equal(base, our_edit(single, picture, tmp_path / "o3", "ddim", 6, 7.5, 3.0, 0, 1))
    text = Image.open(tmp_path / "o3" / "00000.png").text
    assert json.loads(text["ldm"])["image"] == str(picture) and "Image CFG scale: 3.0, Seed: 0" in text["parameters"]


def semantic_model(tmp_path: Path, classes: int, seed: int = 0) -> Path:
    cfg = model_config("tiny")
    cfg.update(concat="semantic_map", semantic_classes=classes)
    cfg["unet"]["in_channels"] = 4 + classes
    model = randomize_(StableDiffusion.from_config(cfg), std=0.08, seed=seed)
    path = tmp_path / "semantic.safetensors"
    save_checkpoint(checkpoint_from_model(model), path)
    return path


def write_seg(path: Path, labels: np.ndarray, mode: str = "L") -> Path:
    Image.fromarray(labels.astype(np.uint8)).convert(mode).save(path)
    return path


def test_semantic_map_model_samples_from_seg(tmp_path):
    ckpt = semantic_model(tmp_path, classes=5)
    left = np.zeros((32, 32), dtype=np.uint8)
    left[:, :16] = 3
    right = left[:, ::-1]

    def sample(seg: Path, out: str) -> np.ndarray:
        cfg = sample_config([f"ckpt={ckpt}", "prompt=x", f"seg={seg}", "steps=4", f"out_dir={tmp_path / out}"])
        return np.asarray(Image.open(run(cfg)[0]))

    a = sample(write_seg(tmp_path / "l.png", left), "a")
    assert a.shape == (32, 32, 3)
    assert np.array_equal(a, sample(write_seg(tmp_path / "l2.png", left), "a2"))
    assert not np.array_equal(a, sample(write_seg(tmp_path / "r.png", right), "b"))

    # Labels beyond the model's classes, and colour pictures, are refused with the reason.
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        sample(write_seg(tmp_path / "big.png", left + 4), "c")
    with pytest.raises(ValueError, match="single-channel"):
        sample(write_seg(tmp_path / "rgb.png", left, "RGB"), "d")
    with pytest.raises(CheckpointError, match="no diffusers pipeline"):
        save_checkpoint(read_checkpoint(ckpt), tmp_path / "folder")


def test_wrong_inputs_for_a_model_are_one_clear_line(tmp_path):
    edit = edit_model(tmp_path, 0, fmt="single")
    picture = write_picture(tmp_path / "p.png", 32, 32, 0)
    cases = [
        ([f"ckpt={edit}"], "image model (its UNet takes 8 input channels): give image=PATH"),
        ([f"ckpt={edit}", f"image={picture}", f"mask={picture}"], "give image=PATH and drop mask="),
        ([f"ckpt={semantic_model(tmp_path, 3)}", f"image={picture}"], "give seg=PATH and drop image="),
    ]
    for overrides, message in cases:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "sample.py"), *overrides, "prompt=x", "steps=1", f"out_dir={tmp_path}"],
            capture_output=True, text=True, cwd=tmp_path,
        )
        assert proc.returncode != 0
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def text_model(tmp_path: Path, seed: int, sd2: bool = False) -> Path:
    cfg = tiny_sd2_config() if sd2 else model_config("tiny")
    cfg["scale_factor"] = 0.18215  # SD's: the picture's latents are scaled, unlike an edit model's
    model = randomize_(StableDiffusion.from_config(cfg), std=0.08, seed=seed)
    path = tmp_path / "sd"
    save_checkpoint(checkpoint_from_model(model), path)
    return path


@pytest.mark.parametrize(
    ("sampler", "scheduler", "steps", "strength", "g", "seed", "height", "width", "sd2"),
    [
        ("ddim", "DDIMScheduler", 10, 0.8, 7.5, 0, 32, 32, False),
        ("plms", "PNDMScheduler", 10, 0.55, 5.0, 1, 32, 48, False),
        ("dpmpp_2m", "DPMSolverMultistepScheduler", 9, 0.6, 6.0, 2, 40, 32, True),
        ("euler", "EulerDiscreteScheduler", 8, 0.75, 4.0, 3, 32, 32, True),
        ("euler_a", "EulerAncestralDiscreteScheduler", 8, 1.0, 5.0, 4, 48, 32, False),
        ("ddpm", "DDPMScheduler", 7, 0.3, 1.0, 5, 32, 40, False),  # no guidance, 2 of 7 steps
    ],
)
def test_image_to_image_matches_diffusers_img2img(tmp_path, sampler, scheduler, steps, strength, g, seed, height, width, sd2):
    diffusers = pytest.importorskip("diffusers")
    folder = text_model(tmp_path, seed, sd2)
    picture = write_picture(tmp_path / "start.png", height + 3, width, seed)  # rounded down, as diffusers
    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        PROMPT, image=Image.open(picture), strength=strength, negative_prompt=NEGATIVE, num_inference_steps=steps,
        guidance_scale=g, generator=torch.Generator("cpu").manual_seed(seed), num_images_per_prompt=2, output_type="np",
    ).images
    theirs = (theirs * 255).round().astype("uint8")
    cfg = sample_config([
        f"ckpt={folder}", f"prompt='{PROMPT}'", f"negative_prompt='{NEGATIVE}'", f"image={picture}",
        f"strength={strength}", f"sampler={sampler}", f"steps={steps}", f"guidance_scale={g}", f"seed={seed}",
        "num_images=2", f"out_dir={tmp_path / 'out'}", "device=cpu",
    ])
    ours = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in run(cfg) if not p.name.startswith("grid")])
    assert ours.shape == theirs.shape == (2, height, width, 3)
    assert ours.std() > 5
    diff = np.abs(ours.astype(int) - theirs.astype(int)).max()
    assert diff <= 2, f"max pixel difference {diff}/255"


def test_image_to_image_keeps_more_of_the_picture_at_low_strength(tmp_path):
    folder = text_model(tmp_path, 7)
    picture = write_picture(tmp_path / "start.png", 32, 32, 7)
    model = read_checkpoint(folder).build_model()
    with torch.no_grad():  # what the (random) autoencoder makes of the picture: where strength 0 would end
        pixels = torch.from_numpy(np.asarray(Image.open(picture).convert("RGB"))).permute(2, 0, 1)[None] / 127.5 - 1
        start = ((model.first_stage_model.decode(model.first_stage_model.encode(pixels).mode()) + 1) * 127.5)
    start = start.clamp(0, 255)[0].permute(1, 2, 0).numpy()

    def distance(strength: float) -> float:
        cfg = sample_config([f"ckpt={folder}", "prompt=x", f"image={picture}", f"strength={strength}", "steps=10",
                             f"out_dir={tmp_path / str(strength)}"])
        return float(np.abs(np.asarray(Image.open(run(cfg)[0]).convert("RGB")).astype(int) - start).mean())

    assert distance(0.2) < distance(0.6) < distance(1.0)
    with pytest.raises(ValueError, match="strength 0.05 of 10 steps leaves no step"):
        distance(0.05)


@pytest.mark.parametrize(
    ("sampler", "scheduler", "steps", "strength", "seed", "sd2"),
    [
        ("ddim", "DDIMScheduler", 10, 0.6, 0, False),
        ("euler_a", "EulerAncestralDiscreteScheduler", 8, 0.75, 1, False),
        ("dpmpp_2m", "DPMSolverMultistepScheduler", 9, 0.5, 2, True),
        ("plms", "PNDMScheduler", 8, 0.9, 3, False),
    ],
)
def test_inpainting_below_full_strength_matches_diffusers(tmp_path, sampler, scheduler, steps, strength, seed, sd2):
    """Inpainting that starts from the noised picture: the picture's posterior sample, the noise, then the
    masked picture's sample, drawn in that order from one generator, as StableDiffusionInpaintPipeline."""
    from test_sample import diffusers_images, write_inpainting_inputs

    cfg = tiny_sd2_config() if sd2 else model_config("tiny")
    cfg["unet"]["in_channels"] = 9
    cfg["scale_factor"] = 0.18215
    folder = tmp_path / "inpaint"
    save_checkpoint(checkpoint_from_model(randomize_(StableDiffusion.from_config(cfg), std=0.08, seed=seed)), folder)
    image, mask = write_inpainting_inputs(tmp_path, 32, 40)
    theirs = diffusers_images(
        folder, scheduler, steps, 6.0, seed, 32, 2, pipeline="StableDiffusionInpaintPipeline", width=40,
        image=Image.open(image), mask_image=Image.open(mask), strength=strength,
    )
    cfg = sample_config([
        f"ckpt={folder}", f"prompt='{PROMPT}'", f"negative_prompt='{NEGATIVE}'", f"image={image}", f"mask={mask}",
        f"strength={strength}", f"sampler={sampler}", f"steps={steps}", "guidance_scale=6.0", f"seed={seed}",
        "height=32", "width=40", "num_images=2", f"out_dir={tmp_path / 'out'}", "device=cpu",
    ])
    ours = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in run(cfg) if not p.name.startswith("grid")])
    assert ours.shape == theirs.shape == (2, 32, 40, 3)
    diff = np.abs(ours.astype(int) - theirs.astype(int)).max()
    assert diff <= 2, f"max pixel difference {diff}/255"


def test_strength_is_refused_where_it_means_nothing(tmp_path):
    edit = edit_model(tmp_path, 0, fmt="single")
    picture = write_picture(tmp_path / "p.png", 32, 32, 0)
    cfg = sample_config([f"ckpt={edit}", "prompt=x", f"image={picture}", "strength=0.5", f"out_dir={tmp_path}"])
    with pytest.raises(ValueError, match="strength applies to image-to-image .* and inpainting only"):
        run(cfg)

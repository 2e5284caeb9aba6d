"""sample.py gives diffusers' StableDiffusionPipeline image for image (same weights, prompt, seed, settings).

Each parity has its controls: the inputs it compares move the image by far more than the tolerance
(`assert_moves`), and deliberately broken paths fail the comparison (`assert_caught`)."""

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

from ldm import sampling
from ldm.checkpoint import checkpoint_from_model, save_checkpoint
from ldm.cli.sample import run
from ldm.convert import main as convert_main
from ldm.models.encoders import OpenCLIPTextEmbedder
from ldm.models.stable_diffusion import StableDiffusion

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle on a blue background, highly detailed"
NEGATIVE = "blurry, low quality"
OTHER_PROMPT = "a green square on a yellow background"
TOLERANCE = 2  # the largest pixel difference (of 255) an image parity test allows
# What a control must move the image by, on average over all pixels: an input whose change moves the
# mean this far cannot be ignored by one side without the max-difference comparison noticing.
CONTROL = 3 * TOLERANCE


def pixel_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """Mean and largest absolute difference of two uint8 image stacks, in 1/255."""
    diff = np.abs(a.astype(int) - b.astype(int))
    return float(diff.mean()), int(diff.max())


def assert_matches(ours: np.ndarray, theirs: np.ndarray, what: str = "") -> None:
    """The parity comparison: same shape, no pixel more than TOLERANCE/255 apart."""
    assert ours.shape == theirs.shape, f"{what}shapes {ours.shape} and {theirs.shape}"
    mean, worst = pixel_diff(ours, theirs)
    assert worst <= TOLERANCE, f"{what}max pixel difference {worst}/255 (mean {mean:.2f})"


def assert_moves(changed: np.ndarray, base: np.ndarray, what: str) -> None:
    """A control: changing `what` moves the image by far more than the parity tolerance."""
    mean, worst = pixel_diff(changed, base)
    assert mean >= CONTROL, f"{what} moves the image {mean:.1f}/255 on average (max {worst}), under {CONTROL}/255"


def assert_caught(broken: np.ndarray, theirs: np.ndarray, what: str) -> None:
    """A control: a deliberately broken path fails the parity comparison."""
    try:
        assert_matches(broken, theirs)
    except AssertionError:
        return
    raise AssertionError(f"{what} passes the parity comparison (max difference {pixel_diff(broken, theirs)[1]}/255)")


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
    pipeline: str = "StableDiffusionPipeline", width: int | None = None, prompt: str = PROMPT,
    negative: str = NEGATIVE, **inputs,
):
    """uint8 images from diffusers' `pipeline` loaded from `folder`, with `scheduler`; `inputs` go to
    the call (e.g. image= and mask_image= for the inpainting pipeline)."""
    diffusers = pytest.importorskip("diffusers")
    pipe = getattr(diffusers, pipeline).from_pretrained(str(folder), safety_checker=None)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt,
        negative_prompt=negative,
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
    extra: tuple[str, ...] = (), prompt: str = PROMPT, negative: str = NEGATIVE,
):
    cfg = sample_config(
        [
            f"ckpt={folder}",
            f"prompt='{prompt}'",
            f"negative_prompt='{negative}'",
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
    assert_matches(ours, theirs)


def test_pipeline_parity_sees_prompt_negative_and_guidance_and_catches_broken_text_and_schedule(tmp_path, monkeypatch):
    """Controls for the parity above. The random weights (every parameter drawn, `randomize_`: no
    zero-initialised output layer leaves the text path dead) make each input the pipeline takes move
    the image by far more than the tolerance, so a side that ignored one would fail the comparison;
    and deliberately broken text and schedule paths do fail it."""
    folder = write_pipeline(tmp_path, "tiny", seed=0)
    theirs = diffusers_images(folder, "DDIMScheduler", 12, 7.5, 0, 32, 2)
    runs = iter(range(100))

    def ours(guidance: float = 7.5, **kwargs) -> np.ndarray:
        return our_images(folder, tmp_path / str(next(runs)), "ddim", 12, guidance, 0, 32, 2, **kwargs)

    base = ours()
    assert_matches(base, theirs)
    # measured: 12.0, 11.4 and 11.7 of 255 on average, against a 2/255 tolerance
    assert_moves(ours(prompt=OTHER_PROMPT), base, "another prompt")
    assert_moves(ours(negative=""), base, "no negative prompt")
    assert_moves(ours(guidance=3.0), base, "guidance 3 instead of 7.5")

    encode_text = StableDiffusion.encode_text
    broken = {  # measured: 16.9 and 11.4 of 255 on average
        "the text encoder's output zeroed": lambda self, prompts: encode_text(self, prompts) * 0,
        "the negative prompt dropped": lambda self, prompts: encode_text(
            self, ["" if p == NEGATIVE else p for p in prompts]
        ),
    }
    for what, patched in broken.items():
        with monkeypatch.context() as m:
            m.setattr(StableDiffusion, "encode_text", patched)
            assert_caught(ours(), theirs, what)
    guidance, sample = sampling.classifier_free_guidance, sampling.sample
    with monkeypatch.context() as m:  # the prompt's and the negative prompt's passes exchanged: 32.3/255
        m.setattr(sampling, "classifier_free_guidance", lambda net, c, u, g: guidance(net, u, c, g))
        assert_caught(ours(), theirs, "cond and uncond swapped")
    with monkeypatch.context() as m:  # SD's "leading" timesteps without their offset of 1: a subtle change
        # (0.4/255 on average) that the comparison still catches (4/255 at most)
        m.setattr(sampling, "sample", lambda *a, **k: sample(*a, **{**k, "steps_offset": 0}))
        assert_caught(ours(), theirs, "steps_offset ignored")


def test_sd2_structure_v_prediction_matches_diffusers_from_single_file_and_folder(tmp_path, monkeypatch):
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
    assert_matches(from_folder, theirs)
    assert_matches(from_single, theirs)
    assert_caught(as_epsilon, theirs, "v-prediction read as epsilon")  # measured: 51.9/255 on average

    # Controls for SD 2's own text path (OpenCLIP, its penultimate block, padding with 0): the prompt
    # moves the image (measured 47.6/255 on average), and the last block's output, or SD 1's padding
    # with <|endoftext|>, fails the comparison (measured 44.7 and 34.0/255 on average).
    assert_moves(our_images(folder, tmp_path / "d", "euler", 8, 6.0, 5, 32, 1, prompt=OTHER_PROMPT), from_folder,
                 "another prompt")
    encode, tokenize = OpenCLIPTextEmbedder.encode, OpenCLIPTextEmbedder.tokenize

    def last_block(self, tokens):
        self.num_blocks_used = len(self.model.transformer.resblocks)
        return encode(self, tokens)

    def sd1_padding(self, prompts):
        self.tokenizer.pad_id = self.tokenizer.eot_id
        return tokenize(self, prompts)

    for what, method, patched in [
        ("the last block's output", "encode", last_block),
        ("padding with <|endoftext|>", "tokenize", sd1_padding),
    ]:
        with monkeypatch.context() as m:
            m.setattr(OpenCLIPTextEmbedder, method, patched)
            assert_caught(our_images(folder, tmp_path / method, "euler", 8, 6.0, 5, 32, 1), theirs, what)


@pytest.mark.slow  # full size (~45 s); the same pipeline parity runs at small size in the default suite
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
def test_inpainting_matches_diffusers_inpaint_pipeline(
    tmp_path, monkeypatch, sampler, scheduler, steps, guidance, seed, height, width
):
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

    def ours(mask_path: Path, out: str, prompt: str = PROMPT) -> np.ndarray:
        overrides = [
            f"ckpt={folder}", f"prompt='{prompt}'", f"negative_prompt='{NEGATIVE}'", f"image={image}",
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
    assert_matches(mine, theirs)
    # Controls: the mask and the prompt reach the UNet (measured for ddim and euler_a: the inverted mask
    # moves the images 28.1 and 31.4/255 on average, another prompt 9.8 and 13.5); the mask taken as grey
    # levels instead of binarized, or the picture left out of the masked-picture latents, fail the
    # comparison (measured 3.1 and 3.2, 16.3 and 21.7/255 on average).
    other = tmp_path / "other-mask.png"
    Image.fromarray(255 - np.asarray(Image.open(mask))).save(other)
    assert_moves(ours(other, "b"), mine, "the inverted mask")
    assert_moves(ours(mask, "c", prompt=OTHER_PROMPT), mine, "another prompt")
    condition = sampling.inpainting_condition

    def grey_mask(picture, height, width):
        picture = picture.convert("L").resize((width, height), resample=Image.Resampling.LANCZOS)
        return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)[None, None]

    for what, name, patched in [
        ("a grey mask", "mask_to_tensor", grey_mask),
        ("the picture left out", "inpainting_condition", lambda model, pic, keep, gen: condition(model, pic * 0, keep, gen)),
    ]:
        with monkeypatch.context() as m:
            m.setattr(sampling, name, patched)
            assert_caught(ours(mask, name), theirs, what)


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

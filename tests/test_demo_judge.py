"""The demo's caption judge: colours and shape. True renders pass; noise and wrong shapes fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import model_config, randomize_

from ldm.data.synthetic import (
    PALETTE,
    SHAPES,
    Placement,
    caption_fidelity,
    colour_fidelity,
    draw_shape,
    judge_colours,
    judge_image,
    judge_shape,
    make_caption,
    parse_caption,
    placement_grid,
    random_placement,
    random_sample,
    render_shape,
    shape_fits,
)
from ldm.models.stable_diffusion import StableDiffusion
from ldm.sampling import SamplerSettings, generate, initial_noise


def _renders(n: int, resolution: int = 32, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    rng = np.random.default_rng(seed)
    images, captions = zip(*(random_sample(rng, resolution) for _ in range(n)), strict=True)
    return list(images), list(captions)


@pytest.mark.parametrize("resolution", [32, 16, 64])
def test_true_renders_pass_at_random_placements_colours_and_backgrounds(resolution: int) -> None:
    images, captions = _renders(300 if resolution == 32 else 60, resolution, seed=resolution)
    assert caption_fidelity(images, captions) == 1.0


def test_every_shape_colour_and_background_passes_at_the_extreme_placements() -> None:
    canvas, margin = 32 * 4, 32 * 4 // 16
    smallest, largest = int(0.4 * canvas), int(0.7 * canvas - 1e-9)
    corners = [
        Placement(margin, margin, smallest),
        Placement(canvas - margin - smallest, canvas - margin - smallest, smallest),
        Placement(margin, margin, largest),
        Placement(37, 21, 70),  # off the judge's pixel grid
    ]
    for shape in SHAPES:
        for colour in PALETTE:
            for background in PALETTE:
                if colour == background:
                    continue
                for at in corners:
                    image = draw_shape(shape, colour, background, 32, at)
                    assert judge_image(image, make_caption(shape, colour, background)), (shape, colour, background, at)


def test_wrong_shapes_fail_though_their_colours_are_right() -> None:
    images, captions = _renders(300, seed=1)
    for image, caption in zip(images, captions, strict=True):
        shape = caption.split()[2]
        for other in SHAPES:
            if other != shape:
                wrong = caption.replace(f" {shape} ", f" {other} ")
                assert colour_fidelity([image], [wrong]) == 1.0
                assert not judge_image(image, wrong), wrong


def test_a_circle_in_a_square_fits_well_but_the_square_fits_better() -> None:
    """Why the judge asks for the best shape, not just a good fit: a circle covers ~0.79 of a square."""
    image = draw_shape("square", "red", "blue", 32, Placement(16, 16, 80))
    fits = {shape: fit.iou for shape, fit in shape_fits(image, "red").items()}
    assert fits["square"] > 0.95 and 0.7 < fits["circle"] < 0.85
    found = shape_fits(image, "red")["square"].placement  # on the judge's pixel grid: within half a pixel
    assert max(abs(found.left - 16), abs(found.top - 16), abs(found.size - 80)) <= 2
    assert judge_shape(image, "red") == "square"


def test_pure_noise_fails_for_every_shape_even_with_the_colours_it_reads_as() -> None:
    rng = np.random.default_rng(2)
    judged = 0
    for _ in range(100):
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        colour, background = judge_colours(image)
        if colour == "none":
            continue
        judged += 1
        for shape in SHAPES:
            assert not judge_image(image, make_caption(shape, colour, background))
    assert judged > 50


def test_noise_with_the_right_colour_statistics_fails() -> None:
    """A true render's pixels shuffled (the same colours, in the same amounts) and a render in which
    each pixel is the shape's colour at random: the colour judge passes both, the caption judge neither."""
    rng = np.random.default_rng(3)
    images, captions = _renders(100, seed=3)
    shuffled = [rng.permutation(im.reshape(-1, 3)).reshape(im.shape) for im in images]
    sprinkled = []
    for image, caption in zip(images, captions, strict=True):
        _, colour, background = parse_caption(caption)
        dots = rng.random(image.shape[:2]) < 0.3
        noisy = np.where(dots[..., None], PALETTE[colour], PALETTE[background]).astype(np.uint8)
        sprinkled.append(noisy)
    for noisy in (shuffled, sprinkled):
        assert colour_fidelity(noisy, captions) >= 0.95
        assert caption_fidelity(noisy, captions) == 0.0


def test_the_right_shape_in_colour_noise_fails_and_a_few_stray_pixels_do_not() -> None:
    """A true render with colour noise over a share of its pixels: the shape still fits, and its colours
    are still the most common ones, but the picture is not the caption's beyond a few stray pixels."""
    rng = np.random.default_rng(6)
    images, captions = _renders(100, seed=6)
    palette = np.array(list(PALETTE.values()), dtype=np.uint8)
    for share, expected in ((0.02, 1.0), (0.25, 0.0)):
        noisy = []
        for image in images:
            speckled = image.copy()
            where = rng.random(image.shape[:2]) < share
            speckled[where] = palette[rng.integers(len(palette), size=int(where.sum()))]
            noisy.append(speckled)
        assert colour_fidelity(noisy, captions) >= 0.95
        assert caption_fidelity(noisy, captions) == expected, share


def test_one_noise_image_in_four_costs_a_quarter_of_the_score() -> None:
    images, captions = _renders(4, seed=4)
    images[2] = np.random.default_rng(4).integers(0, 256, images[2].shape, dtype=np.uint8)
    assert caption_fidelity(images, captions) == 0.75


def test_the_search_covers_every_placement_the_data_draws() -> None:
    grid = np.array([(p.left, p.top, p.size) for p in placement_grid(32)])
    rng = np.random.default_rng(5)
    drawn = np.array([(at.left, at.top, at.size) for at in (random_placement(32, rng) for _ in range(500))])
    # the nearest grid placement is at most half a step (two canvas units, half a pixel) away in each
    distance = np.abs(drawn[:, None] - grid[None]).max(-1).min(1)
    assert distance.max() <= 2


def test_images_too_small_to_tell_shapes_apart_are_refused() -> None:
    image = render_shape("circle", "red", "blue", 8, np.random.default_rng(0))
    with pytest.raises(ValueError, match="colour_fidelity"):
        caption_fidelity([image], [make_caption("circle", "red", "blue")])
    assert colour_fidelity([image], [make_caption("circle", "red", "blue")]) == 1.0


def test_an_image_depends_on_its_noise_and_prompt_not_on_its_place_in_the_batch() -> None:
    """What the demo's one-in-four noise picture was not: with guidance (the [uncond; cond] batch), the
    image drawn from each z_T is the same alone, in a batch, or at another position in it. (The noise
    picture follows its z_T: seed 0's second draw has channel means 3.5 of their std from zero.)"""
    model = randomize_(StableDiffusion.from_config(model_config("tiny")), std=0.05).eval()
    prompts = [make_caption("circle", "red", "blue"), make_caption("square", "green", "yellow")] * 2
    noise = initial_noise(4, 4, 32, 32, 4, torch.Generator().manual_seed(0))
    settings = SamplerSettings(sampler="ddim", steps=3, guidance_scale=7.5)
    batched = generate(model, prompts, "", settings, noise=noise)
    reversed_ = generate(model, prompts[::-1], "", settings, noise=noise.flip(0)).flip(0)
    alone = torch.cat([generate(model, [p], "", settings, noise=n[None]) for p, n in zip(prompts, noise, strict=True)])
    torch.testing.assert_close(reversed_, batched, atol=1e-4, rtol=0)  # batch-size rounding only
    torch.testing.assert_close(alone, batched, atol=1e-4, rtol=0)  # batch-size rounding only

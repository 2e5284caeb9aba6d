"""Training the conditionings besides text (the conditioning/ config group): InstructPix2Pix-style
editing (image_concat) and semantic maps, on the synthetic shapes data, then sampling the result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from test_sample import sample_config
from test_train import BARE, QUIET, _one_thread, compose_train, load_ckpt, run_dir, user_error  # noqa: F401 (autouse fixture)

from ldm.checkpoint import checkpoint_from_model, read_checkpoint, save_ldm_file
from ldm.cli.sample import run
from ldm.cli.train import train
from ldm.data.synthetic import (
    SEMANTIC_CLASSES,
    SHAPES,
    edit_eval_set,
    edit_fidelity,
    ensure_demo_shards,
    judge_colours,
    layout_fidelity,
    parse_caption,
    parse_instruction,
    random_semantic_sample,
    semantic_eval_set,
)
from ldm.models.stable_diffusion import StableDiffusion, normalize_config

SEMANTIC = ["conditioning=semantic_map", f"model.semantic_classes={SEMANTIC_CLASSES}"]


def module_of(cfg):
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("_target_")
    return instantiate(cfg.module, model=model_cfg, _convert_="all")


def test_edit_model_trains_on_edit_pairs_and_sample_py_takes_its_checkpoint_and_a_picture(tmp_path: Path) -> None:
    """Three training steps leave the condition barely used (it moves the image ~0.001/255): what the
    condition does at sampling is checked on random weights in test_sample_conditioning / test_sampling_api."""
    cfg = compose_train(tmp_path, ["conditioning=image_concat", "trainer.max_steps=3", "callbacks.sample_images.every_n_steps=2", *QUIET])
    assert cfg.data.variant == "edit" and cfg.model.concat == "image"
    train(cfg)
    out = run_dir(tmp_path)
    ckpt = read_checkpoint(out / "checkpoints" / "last.ckpt")
    assert ckpt.config["concat"] == "image" and ckpt.config["unet"]["in_channels"] == 8
    # The sample grid shows each training pair's "before" picture beside the edit: twice as wide.
    grid = Image.open(sorted((out / "samples").glob("step-*.png"))[-1])
    assert grid.size == (2 * 64, 32), "two validation prompts, each a 32x32 pair side by side"
    # ...sampled with the instructions that came with those pictures, not the text-to-image prompts
    captions = sorted((out / "samples").glob("step-*.txt"))[-1].read_text().splitlines()
    assert len(captions) == 2 and all(parse_instruction(c) for c in captions)
    before = tmp_path / "before.png"
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(before)
    (edited,) = run(sample_config([f"ckpt={out / 'checkpoints' / 'last.ckpt'}", "prompt='make the circle red'",
                                   f"image={before}", "steps=2", f"out_dir={tmp_path / 'edited'}"]))
    assert Image.open(edited).size == (32, 32)


def test_edit_dropout_drops_text_image_and_both_as_instruct_pix2pix(tmp_path: Path) -> None:
    module = module_of(compose_train(tmp_path, ["conditioning=image_concat", *BARE]))
    n = 4000
    cond = torch.rand(n, 3, 8, 8) * 2 - 1
    module.first_stage_model.encode = lambda x: type("P", (), {"mode": lambda self: x[:, :1] * 0 + 1})()
    concat, kept = module._concat_and_captions({"cond_image": cond, "caption": ["x"] * n}, torch.zeros(n, 4, 1, 1))
    image_dropped = concat.flatten(1).eq(0).all(1)
    text_dropped = ~kept
    shares = [((text_dropped & ~image_dropped).float().mean()), (text_dropped & image_dropped).float().mean(),
              (~text_dropped & image_dropped).float().mean()]
    assert all(abs(float(s) - 0.05) < 0.015 for s in shares), shares


def test_edit_model_without_before_pictures_says_which_setting(tmp_path: Path) -> None:
    module = module_of(compose_train(tmp_path, ["conditioning=image_concat", *BARE]))
    with pytest.raises(ValueError, match="data.cond_image_key"):
        module._concat_and_captions({"image": torch.zeros(1, 3, 32, 32), "caption": ["x"]}, torch.zeros(1, 4, 8, 8))


def test_init_from_a_text_model_starts_an_edit_model_where_it_was(tmp_path: Path) -> None:
    """InstructPix2Pix and SD inpainting began as SD: the extra input channels start at zero, so the
    new model's first prediction is the text model's whatever the extra input holds."""
    tiny = OmegaConf.to_container(compose_train(tmp_path, ["model=tiny"]).model)
    tiny.pop("_target_")
    text_model = StableDiffusion(**normalize_config(tiny))
    torch.nn.init.normal_(text_model.unet.input_blocks[0][0].weight)
    weights = tmp_path / "sd.safetensors"
    save_ldm_file(checkpoint_from_model(text_model), weights)
    for conditioning, extra in (("image_concat", 4), ("inpainting", 5)):
        module = module_of(compose_train(tmp_path, [f"conditioning={conditioning}", f"module.init_from={weights}", *BARE]))
        assert module.config["unet"]["in_channels"] == 4 + extra
        z, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 64)
        with torch.no_grad():
            ours = module.apply_model(torch.cat([z, torch.randn(2, extra, 8, 8)], 1), t, ctx)
            theirs = text_model.apply_model(z, t, ctx)
        torch.testing.assert_close(ours, theirs)


def test_semantic_model_trains_on_maps_and_sample_py_takes_its_checkpoint_and_a_map(tmp_path: Path) -> None:
    """Three training steps leave the condition barely used (it moves the image ~0.001/255): what the
    condition does at sampling is checked on random weights in test_sample_conditioning / test_sampling_api."""
    cfg = compose_train(tmp_path, [*SEMANTIC, "trainer.max_steps=3", "callbacks.sample_images.every_n_steps=2", *QUIET])
    assert cfg.data.variant == "semantic"
    train(cfg)
    grid = Image.open(sorted((run_dir(tmp_path) / "samples").glob("step-*.png"))[-1])
    assert grid.size == (2 * 64, 32), "each 32x32 sample beside its coloured map"
    ckpt_path = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(ckpt_path)
    assert ckpt.config["concat"] == "semantic_map" and ckpt.config["unet"]["in_channels"] == 4 + SEMANTIC_CLASSES
    assert load_ckpt(ckpt_path)["global_step"] == 3
    seg = np.zeros((32, 32), dtype=np.uint8)
    seg[8:24, 8:24] = 2
    Image.fromarray(seg).save(tmp_path / "seg.png")
    (image,) = run(sample_config([f"ckpt={ckpt_path}", "prompt='a red square on a blue background'",
                                  f"seg={tmp_path / 'seg.png'}", "steps=2", f"out_dir={tmp_path / 's'}"]))
    assert Image.open(image).size == (32, 32)


def test_semantic_map_needs_its_class_count(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["conditioning=semantic_map", "trainer.max_steps=1", *BARE, *QUIET])
    with pytest.raises(Exception) as err:  # noqa: PT011 (train.py prints user_error's message)
        train(cfg)
    shown = user_error(err.value)
    assert shown is not None and "semantic_classes" in str(shown)


def test_edit_eval_set_needs_an_edit_to_score() -> None:
    """The edit demo's test pictures: no instruction is already done, so copying the input scores 0."""
    pictures, instructions = edit_eval_set(resolution=32)
    assert pictures.shape == (len(instructions), 32, 32, 3) and len(set(instructions)) == len(instructions)
    for picture, instruction in zip(pictures, instructions, strict=True):
        _, colour = parse_instruction(instruction)
        assert colour not in judge_colours(picture)
    assert edit_fidelity(pictures, pictures, instructions) == 0.0


def test_layout_fidelity_wants_the_shape_where_the_map_puts_it() -> None:
    rng = np.random.default_rng(0)
    images, maps, captions = zip(*(random_semantic_sample(rng, 32) for _ in range(40)), strict=True)
    assert layout_fidelity(images, maps, captions) == 1.0
    moved = [np.roll(m, 16, axis=1) for m in maps]  # the shape on the other side
    assert layout_fidelity(images, moved, captions) < 0.5
    eval_maps, eval_captions = semantic_eval_set(resolution=32)
    assert eval_maps.shape == (90, 32, 32) and len(eval_captions) == 90
    shapes = {parse_caption(c)[0] for c in eval_captions}
    assert all(set(np.unique(m)) == {0, 1 + SHAPES.index(parse_caption(c)[0])} for m, c in zip(eval_maps, eval_captions, strict=True))
    assert shapes == set(SHAPES)


def test_conditioned_models_on_data_without_their_inputs_stop_before_training(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    ensure_demo_shards(tmp_path / "shards", num_samples=8, samples_per_shard=8)
    web = ["data=webdataset", f"data.train_shards='{tmp_path}/shards/shapes-*.tar'", "trainer.max_steps=1", *BARE, *QUIET]
    for overrides, needed in (
        (["conditioning=image_concat"], "data.cond_image_key"),
        (SEMANTIC, "data.seg_key"),
    ):
        with pytest.raises(Exception) as err:  # noqa: PT011 (train.py prints user_error's message)
            train(compose_train(tmp_path, [*overrides, *web]))
        shown = user_error(err.value)
        assert shown is not None and needed in str(shown), err.value
    assert not list(tmp_path.glob("runs/**/*.ckpt"))

"""Full text-encoder training with its own LR and steps limit (`module.train_text_encoder=true` with
`module.text_encoder={lr, max_steps}`, as kohya's --learning_rate_te / --stop_text_encoder_training and diffusers'
DreamBooth --train_text_encoder): the encoder's parameters are an optimizer group of their own, at their LR (the
LR scheduler scaling it as the UNet's), take no update (nor new AdamW state) after max_steps while the UNet goes
on, and a run resumed before the stop ends as the uninterrupted one, bit for bit. Bad input is one line.
Tiny models, a few CPU steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import model_config
from safetensors.torch import load_file
from test_host_sync import EVERY, ReadGuard, run_with
from test_host_sync import STEPS as GUARDED_STEPS
from test_lora_text_train import part, same, start_checkpoint, step
from test_train import (
    BARE,
    QUIET,
    _one_thread,  # noqa: F401 (autouse: tiny models on one thread)
    cli,
    compose_train,
    load_ckpt,
)

from ldm.cli.train import train
from ldm.lightning.module import TEXT_ENCODER_GROUP, LatentDiffusion

UNET_LR, TEXT_LR, TEXT_STEPS, STEPS = 5e-2, 2e-2, 2, 4
TEXT = "cond_stage_model."
UNET = "model.diffusion_model."
# a linear warm-up over the 4 steps: both groups' LR scaled alike
SCHEDULE = ["module.lr_scheduler.start_factor=0.5", f"module.lr_scheduler.total_iters={STEPS}"]




def run_training(root: Path, start: Path, out: str, *more: str) -> Path:
    overrides = ["module.train_text_encoder=true", f"module.init_from={start}", f"trainer.max_steps={STEPS}",
                 f"module.optimizer.lr={UNET_LR}", "callbacks.checkpoint.every_n_train_steps=1", *more, *BARE, *QUIET]
    train(compose_train(root, overrides, output_dir=str(root / out)))
    return root / out


def text_state(ckpt: dict) -> list[dict[str, torch.Tensor]]:
    """AdamW's state of the text encoder's group (its parameters' moments and step counts)."""
    optimizer = ckpt["optimizer_states"][0]
    (group,) = [g for g in optimizer["param_groups"] if g.get("name") == TEXT_ENCODER_GROUP]
    return [optimizer["state"][i] for i in group["params"] if i in optimizer["state"]]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("te_lr")
    start = start_checkpoint(root / "start.safetensors")
    settings = [f"module.text_encoder.lr={TEXT_LR}", f"module.text_encoder.max_steps={TEXT_STEPS}", *SCHEDULE]
    return root, start, run_training(root, start, "run", *settings)


def test_the_text_encoder_trains_at_its_own_lr_stops_after_max_steps_and_resumes_exactly(stopped_run):
    root, start, out = stopped_run
    states = {n: step(out, n) for n in range(1, STEPS + 1)}
    text = {n: part(s["state_dict"], TEXT) for n, s in states.items()}
    unet = {n: part(s["state_dict"], UNET) for n, s in states.items()}
    initial = load_file(str(start))
    assert not same(text[1], part(initial, TEXT)) and not same(text[2], text[1]), "it trains until max_steps"
    assert same(text[3], text[2]) and same(text[4], text[2]), "after max_steps the text encoder stays as it was"
    # AdamW's first step moves a weight by at most its LR (|m / sqrt(v)| = 1), the warm-up's first LR being half
    # the configured one: the text encoder's at its own LR, the UNet's at optimizer.lr
    for moved, base, lr in ((text[1], part(initial, TEXT), TEXT_LR), (unet[1], part(initial, UNET), UNET_LR)):
        largest = max((moved[k] - base[k]).abs().max().item() for k in moved)
        assert largest == pytest.approx(0.5 * lr, rel=0.05)
    assert not same(unet[3], unet[2]) and not same(unet[4], unet[3]), "the UNet goes on training"
    # two groups, the text encoder's at its own LR, scaled by the warm-up as the UNet's; 0 once stopped
    for n in (1, TEXT_STEPS):
        groups = states[n]["optimizer_states"][0]["param_groups"]
        assert [g.get("name") for g in groups] == ["unet", TEXT_ENCODER_GROUP]
        assert len(groups[1]["params"]) == len(text[1]) and len(groups[0]["params"]) == len(unet[1])
        (unet_lr, text_lr), (unet_base, text_base) = [g["lr"] for g in groups], [g["initial_lr"] for g in groups]
        assert (unet_base, text_base) == (UNET_LR, TEXT_LR)
        assert unet_lr < UNET_LR and text_lr == pytest.approx(TEXT_LR * unet_lr / UNET_LR, rel=1e-12)
    assert states[STEPS]["optimizer_states"][0]["param_groups"][1]["lr"] == 0.0
    # no AdamW update after the stop: the text encoder's moments and step counts are those of max_steps
    before, after = text_state(states[TEXT_STEPS]), text_state(states[STEPS])
    assert len(after) == len(before) == len(text[1])
    assert all(same(a, b) for a, b in zip(after, before, strict=True))
    # resumed from step 1, before the stop, in a folder of its own: every later state as the uninterrupted run's
    settings = [f"module.text_encoder.lr={TEXT_LR}", f"module.text_encoder.max_steps={TEXT_STEPS}", *SCHEDULE]
    again = run_training(root, start, "resumed", *settings, f"ckpt_path={out / 'checkpoints' / 'step-0000001.ckpt'}",
                         "resume_in_place=false")
    for n in range(2, STEPS + 1):
        resumed = step(again, n)
        assert same(resumed["state_dict"], states[n]["state_dict"]), f"step {n}"
        assert all(same(a, b) for a, b in zip(text_state(resumed), text_state(states[n]), strict=True))
    # and from step 3, after the stop: the encoder stays stopped, the UNet ends as the uninterrupted run's
    late = run_training(root, start, "resumed-late", *settings, f"ckpt_path={out / 'checkpoints' / 'step-0000003.ckpt'}",
                        "resume_in_place=false")
    resumed = step(late, STEPS)
    assert same(resumed["state_dict"], states[STEPS]["state_dict"])
    assert resumed["optimizer_states"][0]["param_groups"][1]["lr"] == 0.0


def test_at_lr_0_the_text_encoder_stays_bit_identical_while_the_unet_moves(tmp_path: Path):
    start = start_checkpoint(tmp_path / "start.safetensors")
    out = run_training(tmp_path, start, "run", "module.text_encoder.lr=0", "trainer.max_steps=2", "module.lr_scheduler=null")
    state, initial = step(out, 2)["state_dict"], load_file(str(start))
    assert same(part(state, TEXT), part(initial, TEXT)), "an LR of 0 leaves the text encoder as it was, bit for bit"
    assert not same(part(state, UNET), part(initial, UNET)), "the UNet trains at optimizer.lr"
    assert [(g.get("name"), g["lr"]) for g in step(out, 2)["optimizer_states"][0]["param_groups"]] == [
        ("unet", UNET_LR), (TEXT_ENCODER_GROUP, 0.0)]


def test_steps_before_and_after_the_stop_read_nothing_from_the_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Whether the text encoder still trains is the host's global_step against max_steps: no tensor is read
    on the host between two logging steps, the stop (at step 2 of 8) included."""
    guard = ReadGuard(EVERY)
    ckpt = load_ckpt(run_with(tmp_path, monkeypatch, guard, *GUARDED_STEPS, "module.optimizer.fused=true",
                              "module.train_text_encoder=true", "module.text_encoder.max_steps=2"))
    assert guard.guarded == [0, 1, 2, 4, 5, 6] and ckpt["global_step"] == 2 * EVERY
    assert [g.get("name") for g in ckpt["optimizer_states"][0]["param_groups"]] == ["unet", TEXT_ENCODER_GROUP]
    assert ckpt["optimizer_states"][0]["param_groups"][1]["lr"] == 0.0


def test_text_encoder_settings_without_training_it_are_one_clear_line(tmp_path: Path):
    result = cli("module.text_encoder.lr=1e-6", *BARE, *QUIET, f"paths.root={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "module.text_encoder.lr" in lines[0] and "module.train_text_encoder=true" in lines[0]
    assert "module.lora.text_encoder" in lines[0]
    assert not list(tmp_path.rglob("*.ckpt"))
    # the module says it to code that builds it directly; null settings are the optimizer's LR and all steps
    model = model_config("tiny")
    with pytest.raises(ValueError, match=r"module.text_encoder.max_steps set .* module.train_text_encoder=true"):
        LatentDiffusion(model, text_encoder={"max_steps": 3})
    with pytest.raises(ValueError, match=r"not \['max_step'\]"):
        LatentDiffusion(model, train_text_encoder=True, text_encoder={"max_step": 3})
    module = LatentDiffusion(model, train_text_encoder=True, text_encoder={"lr": None, "max_steps": None})
    unet_group, text_group = module.param_groups()
    assert "lr" not in text_group and text_group["name"] == TEXT_ENCODER_GROUP
    assert module.text_encoder_training and module.text_encoder_max_steps is None
    assert LatentDiffusion(model).param_groups()[0].keys() == {"params"}  # a frozen text encoder: one group

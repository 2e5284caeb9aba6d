"""Our samplers against diffusers' schedulers driven exactly as StableDiffusionPipeline drives them."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

from ldm.diffusion import samplers
from ldm.diffusion.samplers import SAMPLERS, classifier_free_guidance, make_timesteps, sample
from ldm.diffusion.schedule import NoiseSchedule, make_betas

SHAPE = (2, 4, 6, 6)
SEED = 1234


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth nonlinear stand-in for a UNet: mixes channels, depends on t (0-dim or (B,))."""
    t = t.float().reshape(-1, 1, 1, 1) / 1000
    mixed = torch.einsum(
        "bchw,cd->bdhw",
        x,
        torch.tensor([[0.9, 0.1, 0, 0], [0, 0.8, 0.2, 0], [0, 0, 0.7, 0.3], [0.2, 0, 0, 0.8]]),
    )
    return torch.tanh(mixed) * (0.5 + t) + 0.3 * torch.sin(3 * x + 5 * t) - 0.1 * t


def diffusers_scheduler(
    name: str, spacing: str, prediction_type: str, karras: bool = False, steps_offset: int = 1
):
    """The diffusers scheduler our sampler `name` reproduces, with SD's scheduler config."""
    common = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        steps_offset=steps_offset,
    )
    if name == "ddpm":
        return DDPMScheduler(**common, clip_sample=False)
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False)
    if name == "plms":
        return PNDMScheduler(**common, skip_prk_steps=True, set_alpha_to_one=False)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler(
            **common,
            algorithm_type="dpmsolver++",
            solver_order=2,
            solver_type="midpoint",
            lower_order_final=True,
            use_karras_sigmas=karras,
        )
    if name == "euler":
        return EulerDiscreteScheduler(**common, use_karras_sigmas=karras)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler(**common)
    raise KeyError(name)


def run_diffusers(scheduler, num_steps: int, generator: torch.Generator, eta: float = 0.0) -> torch.Tensor:
    """StableDiffusionPipeline's denoising loop (without CFG, which wraps the model)."""
    scheduler.set_timesteps(num_steps)
    latents = randn_tensor(SHAPE, generator=generator, dtype=torch.float32) * scheduler.init_noise_sigma
    step_kwargs = {"generator": generator} if not isinstance(scheduler, PNDMScheduler) else {}
    if isinstance(scheduler, DDIMScheduler):
        step_kwargs["eta"] = eta
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        out = toy_model(model_input, t)
        latents = scheduler.step(out, t, latents, **step_kwargs).prev_sample
    return latents


def run_ours(name: str, num_steps: int, generator: torch.Generator, **kwargs) -> torch.Tensor:
    noise = torch.randn(SHAPE, generator=generator, dtype=torch.float32)
    alphas_cumprod = NoiseSchedule(make_betas("scaled_linear")).alphas_cumprod
    return sample(name, toy_model, noise, alphas_cumprod, num_steps, generator=generator, **kwargs)


TOLERANCE = 1e-5  # relative to the reference's largest value


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = TOLERANCE) -> None:
    err = relative_error(ours, ref)
    assert err < tol, f"relative error {err:.2e}"


def check_parity(name: str, spacing: str, prediction_type: str, num_steps: int, **kwargs) -> None:
    ref_gen, our_gen = torch.Generator().manual_seed(SEED), torch.Generator().manual_seed(SEED)
    scheduler = diffusers_scheduler(name, spacing, prediction_type, kwargs.get("karras", False))
    ref = run_diffusers(scheduler, num_steps, ref_gen, eta=kwargs.get("eta", 0.0))
    ours = run_ours(name, num_steps, our_gen, spacing=spacing, prediction_type=prediction_type, **kwargs)
    assert_close(ours, ref)
    # same number of draws: a generator reused for the next batch stays in step with diffusers
    assert torch.equal(our_gen.get_state(), ref_gen.get_state())


@pytest.mark.parametrize("num_steps", [7, 20, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_matches_diffusers(name: str, spacing: str, prediction_type: str, num_steps: int) -> None:
    check_parity(name, spacing, prediction_type, num_steps)


@pytest.mark.parametrize("num_steps", [7, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["dpmpp_2m", "euler"])
def test_karras_matches_diffusers(name: str, prediction_type: str, num_steps: int) -> None:
    for spacing in ("leading", "trailing", "linspace"):
        check_parity(name, spacing, prediction_type, num_steps, karras=True)


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_eta_matches_diffusers(spacing: str, eta: float) -> None:
    for prediction_type in ("epsilon", "v_prediction"):
        check_parity("ddim", spacing, prediction_type, 20, eta=eta)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_parity_check_catches_a_wrong_offset_prediction_type_or_step_count(name: str, monkeypatch) -> None:
    """Controls for the parity above: a sampler one timestep off (steps_offset ignored), reading the
    model's output as the other parameterization, or taking one step more, fails `check_parity`'s
    comparison by orders of magnitude (relative errors measured for ddim, ddpm, dpmpp_2m, euler, euler_a
    and plms, against a tolerance of 1e-5: offset 4.7, 6.4, 4.2, 4.8, 6.4, 6.4e-3; v 0.91, 0.94, 0.90,
    0.91, 0.94, 0.91; a step more 4.1, 8.5, 1.9, 4.1, 8.5, 4.6e-2), and a stochastic sampler drawing its
    noise out of step with diffusers' fails both the comparison and the generator check."""
    ref_gen = torch.Generator().manual_seed(SEED)
    ref = run_diffusers(diffusers_scheduler(name, "leading", "epsilon"), 20, ref_gen)
    assert_close(run_ours(name, 20, torch.Generator().manual_seed(SEED)), ref)
    for what, steps, kwargs in [
        ("steps_offset ignored", 20, {"steps_offset": 0}),
        ("v read for epsilon", 20, {"prediction_type": "v_prediction"}),
        ("one step more", 21, {}),
    ]:
        err = relative_error(run_ours(name, steps, torch.Generator().manual_seed(SEED), **kwargs), ref)
        assert err > 100 * TOLERANCE, f"{what}: relative error {err:.1e} only"
    if name in ("ddpm", "euler_a"):  # one extra draw before each step's own
        randn = samplers._randn
        monkeypatch.setattr(samplers, "_randn", lambda like, gen: (randn(like[:1, :1, :1, :1], gen), randn(like, gen))[1])
        our_gen = torch.Generator().manual_seed(SEED)
        assert relative_error(run_ours(name, 20, our_gen), ref) > 100 * TOLERANCE
        assert not torch.equal(our_gen.get_state(), ref_gen.get_state())


@pytest.mark.parametrize("name", ["ddpm", "euler_a"])
def test_stochastic_samplers_depend_on_generator(name: str) -> None:
    noise = torch.randn(SHAPE)
    alphas_cumprod = NoiseSchedule(make_betas("scaled_linear")).alphas_cumprod
    a, b = (
        sample(name, toy_model, noise, alphas_cumprod, 10, generator=torch.Generator().manual_seed(seed))
        for seed in (0, 1)
    )
    assert not torch.allclose(a, b)


def test_steps_offset_matches_diffusers() -> None:
    for name in ("ddim", "plms", "dpmpp_2m", "euler"):
        ref_gen, our_gen = torch.Generator().manual_seed(SEED), torch.Generator().manual_seed(SEED)
        ref = run_diffusers(diffusers_scheduler(name, "leading", "epsilon", steps_offset=0), 10, ref_gen)
        assert_close(run_ours(name, 10, our_gen, steps_offset=0), ref)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_make_timesteps_matches_diffusers(spacing: str) -> None:
    for num_steps in (1, 3, 7, 48, 50, 97, 250, 1000):
        scheduler = DDIMScheduler(timestep_spacing=spacing, steps_offset=1)
        scheduler.set_timesteps(num_steps)
        assert torch.equal(make_timesteps(num_steps, 1000, spacing, 1), scheduler.timesteps)


def test_make_timesteps_keeps_step_count_where_diffusers_trailing_overflows() -> None:
    timesteps = make_timesteps(61, 1000, "trailing")
    assert len(timesteps) == 61 and timesteps.min() >= 0 and timesteps[0] == 999


def test_callback_sees_every_step_and_denoised_estimate() -> None:
    seen = []
    alphas_cumprod = NoiseSchedule(make_betas("scaled_linear")).alphas_cumprod
    out = sample("dpmpp_2m", toy_model, torch.randn(SHAPE), alphas_cumprod, 8, callback=seen.append)
    assert [s["i"] for s in seen] == list(range(8))
    assert torch.equal(seen[-1]["x"], out) and torch.equal(seen[-1]["denoised"], out)


def test_bad_arguments_are_named() -> None:
    alphas_cumprod = NoiseSchedule(make_betas("scaled_linear")).alphas_cumprod
    noise = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="known: ddpm, ddim, plms, dpmpp_2m, euler, euler_a"):
        sample("heun", toy_model, noise, alphas_cumprod, 10)
    with pytest.raises(ValueError, match="eta"):
        sample("euler", toy_model, noise, alphas_cumprod, 10, eta=0.5)
    with pytest.raises(ValueError, match="karras"):
        sample("ddim", toy_model, noise, alphas_cumprod, 10, karras=True)
    with pytest.raises(ValueError, match="spacing"):
        sample("ddim", toy_model, noise, alphas_cumprod, 10, spacing="uniform")
    with pytest.raises(ValueError, match="prediction_type"):
        sample("ddim", toy_model, noise, alphas_cumprod, 10, prediction_type="sample")


class RecordingModel:
    """model(x, t, context) that records its calls; output depends on x, t and context."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def __call__(self, x, t, context):
        self.batch_sizes.append(x.shape[0])
        ctx = context["crossattn"] if isinstance(context, dict) else context
        return (
            torch.tanh(x) * ctx.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) + t.float().reshape(-1, 1, 1, 1) / 1000
        )


@pytest.mark.parametrize("as_dict", [False, True])
def test_classifier_free_guidance(as_dict: bool) -> None:
    x, t = torch.randn(SHAPE), torch.tensor([500, 20])
    cond, uncond = torch.randn(2, 77, 8) + 1, torch.randn(2, 77, 8)
    wrap = (lambda c: {"crossattn": c}) if as_dict else (lambda c: c)
    model = RecordingModel()
    guided = classifier_free_guidance(model, wrap(cond), wrap(uncond), 7.5)(x, t)
    assert model.batch_sizes == [4]  # one batched pass
    out_c, out_u = model(x, t, wrap(cond)), model(x, t, wrap(uncond))
    torch.testing.assert_close(guided, out_u + 7.5 * (out_c - out_u))

    for scale in (1.0, 0.5, 0.0):  # diffusers guides only above 1: at or below, the conditional output
        model = RecordingModel()
        plain = classifier_free_guidance(model, wrap(cond), None, scale)(x, t)
        assert model.batch_sizes == [2]  # no unconditional pass
        torch.testing.assert_close(plain, out_c)


def test_classifier_free_guidance_rejects_missing_uncond() -> None:
    with pytest.raises(ValueError, match="unconditional"):
        classifier_free_guidance(RecordingModel(), torch.randn(1, 77, 8), None, 5.0)

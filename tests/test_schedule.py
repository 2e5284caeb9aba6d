"""Betas, forward process and parameterizations against diffusers' DDPMScheduler, and their algebra."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from ldm.diffusion.schedule import NoiseSchedule, make_betas

DIFFUSERS_KIND = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}


@pytest.mark.parametrize(
    ("kind", "timesteps", "start", "end"),
    [
        ("scaled_linear", 1000, 0.00085, 0.012),
        ("scaled_linear", 500, 0.0001, 0.02),
        ("linear", 1000, 0.0001, 0.02),
        ("linear", 250, 0.00085, 0.012),
        ("cosine", 1000, 0.00085, 0.012),
        ("cosine", 300, 0.00085, 0.012),
    ],
)
def test_betas_and_alphas_cumprod_equal_diffusers(
    kind: str, timesteps: int, start: float, end: float
) -> None:
    ref = DDPMScheduler(
        num_train_timesteps=timesteps, beta_start=start, beta_end=end, beta_schedule=DIFFUSERS_KIND[kind]
    )
    betas = make_betas(kind, timesteps, linear_start=start, linear_end=end)
    assert betas.dtype == torch.float32
    assert torch.equal(betas, ref.betas)
    assert torch.equal(NoiseSchedule(betas).alphas_cumprod, ref.alphas_cumprod)


def test_unknown_beta_schedule_is_named() -> None:
    with pytest.raises(ValueError, match="'quadratic'.*scaled_linear, linear, cosine"):
        make_betas("quadratic")


@pytest.fixture
def schedule() -> NoiseSchedule:
    return NoiseSchedule(make_betas("scaled_linear"))


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x0, noise = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    return x0, noise, torch.tensor([0, 1, 250, 777, 999])


def test_q_sample_and_v_equal_diffusers(schedule, batch) -> None:
    x0, noise, t = batch
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(
        schedule.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(
        schedule.v_target(x0, noise, t), ref.get_velocity(x0, noise, t), rtol=1e-6, atol=1e-6
    )
    assert schedule.target(x0, noise, t, "epsilon") is noise
    assert torch.equal(schedule.target(x0, noise, t, "v_prediction"), schedule.v_target(x0, noise, t))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_perfect_prediction_recovers_x0_and_noise(schedule, batch, prediction_type: str) -> None:
    x0, noise, t = batch
    x_t = schedule.q_sample(x0, t, noise)
    target = schedule.target(x0, noise, t, prediction_type)
    x0_hat, eps_hat = schedule.predict_x0_and_eps(x_t, t, target, prediction_type)
    # x_0 from ε divides by sqrt(ᾱ) ≈ 0.07 at t = 999, magnifying float32 rounding of x_t
    torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_hat, noise, rtol=1e-4, atol=1e-4)


def test_unknown_prediction_type_is_named(schedule, batch) -> None:
    x0, noise, t = batch
    with pytest.raises(ValueError, match="'sample'.*epsilon, v_prediction"):
        schedule.target(x0, noise, t, "sample")
    with pytest.raises(ValueError, match="'sample'"):
        schedule.predict_x0_and_eps(x0, t, noise, "sample")


def test_snr_decreases_and_matches_definition(schedule) -> None:
    snr = schedule.snr(torch.arange(1000))
    assert (snr[1:] < snr[:-1]).all()
    torch.testing.assert_close(
        snr, schedule.sqrt_alphas_cumprod**2 / schedule.sqrt_one_minus_alphas_cumprod**2
    )
    torch.testing.assert_close(snr, schedule.sigmas**-2)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighted_loss_is_clipped_snr_times_x0_error(schedule, batch, prediction_type: str) -> None:
    """Hang et al.'s objective: whatever the target, weighted loss = min(SNR, γ) · ‖x̂_0 - x_0‖²."""
    x0, noise, t = batch
    gamma = 5.0
    x_t = schedule.q_sample(x0, t, noise)
    prediction = schedule.target(x0, noise, t, prediction_type) + 0.1 * torch.randn_like(x0)
    x0_hat, _ = schedule.predict_x0_and_eps(x_t, t, prediction, prediction_type)
    target = schedule.target(x0, noise, t, prediction_type)
    weighted = schedule.min_snr_weight(t, gamma, prediction_type) * (prediction - target).pow(2).mean(
        (1, 2, 3)
    )
    expected = schedule.snr(t).clamp(max=gamma) * (x0_hat - x0).pow(2).mean((1, 2, 3))
    torch.testing.assert_close(weighted, expected, rtol=1e-3, atol=1e-6)


def test_min_snr_weights_only_damp_low_noise_steps(schedule) -> None:
    t = torch.arange(1000)
    gamma = 5.0
    eps_w = schedule.min_snr_weight(t, gamma, "epsilon")
    v_w = schedule.min_snr_weight(t, gamma, "v_prediction")
    high_noise = schedule.snr(t) <= gamma
    assert torch.equal(eps_w[high_noise], torch.ones(int(high_noise.sum())))
    assert (eps_w[~high_noise] < 1).all() and (v_w < 1).all() and (v_w > 0).all()
    assert (eps_w[1:] >= eps_w[:-1]).all()  # weight grows with noise, up to 1


def test_buffers_follow_module_but_stay_out_of_state_dict(schedule) -> None:
    assert schedule.state_dict() == {}
    before = schedule.alphas_cumprod.clone()
    # A model cast to half precision keeps its schedule in float32, values untouched.
    moved = schedule.to(torch.float16)
    assert moved.alphas_cumprod.dtype == torch.float32
    assert torch.equal(moved.alphas_cumprod, before)
    assert {name for name, _ in schedule.named_buffers()} == {
        "alphas_cumprod",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "sigmas",
    }
    assert schedule.num_timesteps == 1000

"""Noise schedules and parameterizations of the DDPM forward process.

    q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I),   ᾱ_t = Π_{s≤t} (1 - β_s)

The network predicts either the noise ε ("epsilon") or the velocity v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x_0
("v_prediction", Salimans & Ho 2022, arXiv:2202.00512); the names are diffusers'. k-diffusion's noise
level is σ = sqrt((1 - ᾱ) / ᾱ), the std of x_t / sqrt(ᾱ_t) around x_0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("scaled_linear", "linear", "cosine")


def make_betas(
    kind: str,
    timesteps: int = 1000,
    linear_start: float = 0.00085,
    linear_end: float = 0.012,
    cosine_s: float = 8e-3,
) -> Tensor:
    """β_1..β_T as a float32 tensor, bit-identical to diffusers' betas for the same settings.

    kind: "scaled_linear" (linear in sqrt β; SD 1.x/2.x), "linear" (DDPM), or "cosine" (improved DDPM,
    Nichol & Dhariwal 2021, arXiv:2102.09672; diffusers' "squaredcos_cap_v2", β capped at 0.999).
    The linear kinds are computed in float32 as diffusers does (the original LDM code uses float64, which
    moves ᾱ by ~1e-7 relative); the cosine one in float64 and then rounded, as diffusers does.
    """
    if kind == "scaled_linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float32) ** 2
    if kind == "linear":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float32)
    if kind == "cosine":

        def alpha_bar(u: float) -> float:
            return math.cos((u + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2

        betas = [
            min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), 0.999)
            for i in range(timesteps)
        ]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"unknown beta schedule {kind!r}; known: {', '.join(BETA_SCHEDULES)}")


def x0_and_eps(
    x_t: Tensor, model_output: Tensor, alpha_bar: float | Tensor, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """(x_0, ε) implied by a network output at noise level ᾱ (a float or a tensor broadcasting to x_t)."""
    a, s = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    if prediction_type == "epsilon":
        return (x_t - s * model_output) / a, model_output
    if prediction_type == "v_prediction":
        return a * x_t - s * model_output, a * model_output + s * x_t
    raise ValueError(f"unknown prediction_type {prediction_type!r}; known: {', '.join(PREDICTION_TYPES)}")


class NoiseSchedule(nn.Module):
    """ᾱ and derived quantities as non-persistent buffers: they follow `.to(device)` but stay out of
    checkpoints, being recomputed from the config.

    `t` arguments are (B,) integer timesteps in [0, T); per-sample values broadcast over x's other dims.
    """

    def __init__(self, betas: Tensor) -> None:
        super().__init__()
        # float32 cumprod as diffusers, so samplers fed these ᾱ reproduce its schedulers exactly
        alphas_cumprod = torch.cumprod(1 - betas.float(), dim=0)
        buffers = {
            "alphas_cumprod": alphas_cumprod,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "sigmas": ((1 - alphas_cumprod) / alphas_cumprod).sqrt(),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)
        self._float32_values = {k: v.clone() for k, v in buffers.items()}

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        # Moves with the model but never changes dtype: ᾱ rounded to fp16/bf16 would shift every step.
        super()._apply(fn, recurse)
        for name, value in self._float32_values.items():
            self._buffers[name] = value.to(self._buffers[name].device)
        return self

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @staticmethod
    def _at(values: Tensor, t: Tensor, x: Tensor) -> Tensor:
        return values[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε."""
        return (
            self._at(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def v_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0."""
        return (
            self._at(self.sqrt_alphas_cumprod, t, x0) * noise
            - self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )

    def target(self, x0: Tensor, noise: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """What the network learns to predict: ε or v."""
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.v_target(x0, noise, t)
        raise ValueError(f"unknown prediction_type {prediction_type!r}; known: {', '.join(PREDICTION_TYPES)}")

    def predict_x0_and_eps(
        self, x_t: Tensor, t: Tensor, model_output: Tensor, prediction_type: str
    ) -> tuple[Tensor, Tensor]:
        return x0_and_eps(x_t, model_output, self._at(self.alphas_cumprod, t, x_t), prediction_type)

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) = 1 / σ_t², shape (B,)."""
        alpha_bar = self.alphas_cumprod[t]
        return alpha_bar / (1 - alpha_bar)

    def min_snr_weight(self, t: Tensor, gamma: float, prediction_type: str) -> Tensor:
        """Per-sample loss weights of Min-SNR-γ (Hang et al. 2023, arXiv:2303.09556), shape (B,).

        The paper weights the x_0 error by min(SNR, γ); an ε error is the x_0 error times SNR, a v error
        the x_0 error times SNR + 1, hence these divisors.
        """
        snr = self.snr(t)
        clipped = snr.clamp(max=gamma)
        if prediction_type == "epsilon":
            return clipped / snr
        if prediction_type == "v_prediction":
            return clipped / (snr + 1)
        raise ValueError(f"unknown prediction_type {prediction_type!r}; known: {', '.join(PREDICTION_TYPES)}")

"""Samplers: one pure function per sampler, numerically equal to diffusers' schedulers as
StableDiffusionPipeline drives them (SD's scheduler config: no sample clipping, final ᾱ of DDIM/PLMS = ᾱ_0).

Every sampler has the signature

    sample_x(model, noise, alphas_cumprod, timesteps, *, prediction_type, generator, callback, **specific)

- `model(x_t, t)` returns the raw network output (ε or v, per `prediction_type`); `t` is a (B,) tensor,
  int64 for the discrete samplers, float32 for Euler (whose timesteps may be fractional).
- `noise` is unit Gaussian; the sampler scales it to its starting noise level (diffusers'
  `init_noise_sigma`).
- `alphas_cumprod` is the (T,) training schedule ᾱ; `timesteps` the descending timesteps at which the
  model is evaluated. `sample` builds them from a step count the way each diffusers scheduler does.
- Random draws come from `generator` on its own device (CPU by the project's convention; the global
  CPU generator when None) and are moved to the latents' device, in the order, shape and dtype
  diffusers draws them when the pipeline passes the generator to `scheduler.step`, so equal generator
  states give equal results.
- `callback({"i", "t", "x", "denoised"})` is called after every model evaluation.
- The result is the denoised latents x_0.

Sigma-space samplers (DPM-Solver++, Euler) use σ = sqrt((1 - ᾱ) / ᾱ), interpolated linearly in t at
fractional timesteps, followed by a final σ = 0; they accept explicit `sigmas` (e.g. Karras et al.'s),
in which case `timesteps` are only what the model is told.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ldm.diffusion.schedule import x0_and_eps

Model = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]
SPACINGS = ("leading", "linspace", "trailing")


def make_timesteps(
    num_steps: int, num_train_timesteps: int = 1000, spacing: str = "leading", steps_offset: int = 1
) -> Tensor:
    """Descending int64 timesteps as diffusers' DDPM/DDIM/PNDM schedulers space them
    (Lin et al. 2023, arXiv:2305.08891, table 2).

    leading: 0, k, 2k, ... (k = T // n) shifted by `steps_offset`; linspace: n rounded points from 0 to
    T - 1; trailing: T - 1 downwards in strides of T / n (`steps_offset` applies to leading only, as in
    diffusers). diffusers' trailing rule emits a spurious extra timestep -1 for some n (61, 103, ...);
    we keep n steps.
    """
    return torch.from_numpy(
        _spaced(num_steps, num_train_timesteps, spacing, steps_offset).round().astype(np.int64)
    )


def _spaced(num_steps: int, num_train_timesteps: int, spacing: str, steps_offset: int) -> np.ndarray:
    # numpy, not torch: the same arange/linspace floats as diffusers, so rounding ties fall the same way
    if not 0 < num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if spacing == "leading":
        return np.arange(num_steps)[::-1] * (num_train_timesteps // num_steps) + float(steps_offset)
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_steps)[::-1].copy()
    if spacing == "trailing":
        stride = num_train_timesteps / num_steps
        return np.round(np.arange(num_train_timesteps, 0, -stride)[:num_steps]) - 1
    raise ValueError(f"unknown timestep spacing {spacing!r}; known: {', '.join(SPACINGS)}")


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> Tensor:
    """Noise levels of Karras et al. 2022 (arXiv:2206.00364, eq. 5), descending, float64."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _train_sigmas(alphas_cumprod: Tensor) -> Tensor:
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def _sigmas_at(alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """σ at (possibly fractional) timesteps, linear in t between training steps; float32."""
    sigmas = _train_sigmas(alphas_cumprod.detach().cpu()).double()
    t = timesteps.detach().cpu().double()
    low = t.floor().long().clamp(max=len(sigmas) - 2)
    return torch.lerp(sigmas[low], sigmas[low + 1], t - low).float()


def _sigma_to_timestep(sigmas: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Fractional timesteps whose σ (interpolated linearly in log σ) equals `sigmas`."""
    log_train = _train_sigmas(alphas_cumprod.detach().cpu()).double().log()
    log_sigma = sigmas.double().clamp(min=1e-10).log()
    low = (torch.searchsorted(log_train, log_sigma, right=True) - 1).clamp(0, len(log_train) - 2)
    w = ((log_train[low] - log_sigma) / (log_train[low] - log_train[low + 1])).clamp(0, 1)
    return low + w


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _call(model: Model, x: Tensor, t: Tensor) -> Tensor:
    return model(x, t.to(x.device).expand(x.shape[0]))


def _integers(timesteps: Tensor) -> list[int]:
    if timesteps.is_floating_point():
        raise ValueError(f"this sampler needs integer timesteps, got {timesteps.dtype}")
    return timesteps.tolist()


def _coefficients(values: Tensor) -> list[Tensor]:
    # float32 host scalars as diffusers computes them: results agree to the rounding (DDIM to the bit)
    # and the loop needs no device sync
    return list(values.detach().cpu().float())


def sample_ddpm(
    model: Model,
    noise: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Tensor,
    *,
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    start: int = 0,
) -> Tensor:
    """Ancestral sampling of DDPM (Ho et al. 2020, arXiv:2006.11239, eq. 6-7), strided over `timesteps`.

    Each step samples the posterior q(x_prev | x_t, x̂_0) with its own variance ("fixed_small"); the
    last step goes to ᾱ = 1. Noise is drawn at every step with t > 0.
    """
    ac, ts = _coefficients(alphas_cumprod), _integers(timesteps)
    x = noise
    for i in range(start, len(ts)):
        t = ts[i]
        out = _call(model, x, timesteps[i])
        a_t = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        beta = 1 - a_t / a_prev
        x0, _ = x0_and_eps(x, out, a_t, prediction_type)
        mean = (a_prev**0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
        if t > 0:
            variance = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)
            mean = mean + variance**0.5 * _randn(out, generator)
        x = mean
        if callback is not None:
            callback({"i": i, "t": timesteps[i], "x": x, "denoised": x0})
    return x


def sample_ddim(
    model: Model,
    noise: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Tensor,
    *,
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    start: int = 0,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2020, arXiv:2010.02502, eq. 12); eta = 0 is deterministic, eta = 1 DDPM-like.

    As diffusers' DDIMScheduler, each step goes from t to t - T // n whatever the spacing, and below
    t = 0 to ᾱ_0 (SD's `set_alpha_to_one=False`). With eta > 0 noise is drawn at every step.
    """
    ac, ts = _coefficients(alphas_cumprod), _integers(timesteps)
    stride = len(ac) // len(ts)
    x = noise
    for i in range(start, len(ts)):
        t = ts[i]
        out = _call(model, x, timesteps[i])
        a_t = ac[t]
        a_prev = ac[max(t - stride, 0)]  # below 0: ᾱ_0, SD's set_alpha_to_one=False
        x0, eps = x0_and_eps(x, out, a_t, prediction_type)
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if eta > 0:
            x = x + std * _randn(out, generator)
        if callback is not None:
            callback({"i": i, "t": timesteps[i], "x": x, "denoised": x0})
    return x


def _adams_bashforth(outputs: list[Tensor]) -> Tensor:
    """Linear multistep combination of the last 1-4 outputs, oldest first."""
    if len(outputs) == 1:
        return outputs[0]
    if len(outputs) == 2:
        return (3 * outputs[1] - outputs[0]) / 2
    if len(outputs) == 3:
        return (23 * outputs[2] - 16 * outputs[1] + 5 * outputs[0]) / 12
    return (55 * outputs[3] - 59 * outputs[2] + 37 * outputs[1] - 9 * outputs[0]) / 24


def sample_plms(
    model: Model,
    noise: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Tensor,
    *,
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    start: int = 0,
) -> Tensor:
    """PLMS: pseudo linear multistep (Liu et al. 2022, arXiv:2202.09778, eq. 9-12), as diffusers'
    PNDMScheduler with `skip_prk_steps=True` (what SD uses).

    The first step is redone as a second-order (Heun-like) step with the output at the second
    timestep, which is therefore evaluated twice (n + 1 model calls); then Adams-Bashforth of order up
    to 4 on the raw outputs. Like diffusers: steps go from t to t - T // n whatever the spacing, the
    final ᾱ is ᾱ_0, and for v-prediction the combined v is turned into ε at the step's start.
    `generator` is unused (deterministic); it is accepted for the common signature.
    """
    del generator
    ac = _coefficients(alphas_cumprod)
    stride = len(ac) // len(timesteps)
    _integers(timesteps)
    evaluated = torch.cat([timesteps[:1], timesteps[1:2], timesteps[1:]])
    x, x_start = noise, noise
    outputs: list[Tensor] = []
    for i in range(start, len(evaluated)):
        t = int(evaluated[i])
        out = _call(model, x, evaluated[i])
        if i - start == 1:  # as diffusers' step counter: the second step of the run, wherever it starts
            combined, t_from, t_to, x_from = (outputs[0] + out) / 2, t + stride, t, x_start
        else:
            outputs = [*outputs[-3:], out]
            combined, t_from, t_to, x_from = _adams_bashforth(outputs), t, t - stride, x
        a_t, a_prev = ac[t_from], ac[max(t_to, 0)]
        x0, eps = x0_and_eps(x_from, combined, a_t, prediction_type)
        denominator = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
        x = (a_prev / a_t) ** 0.5 * x_from - ((a_prev - a_t) / denominator) * eps
        if callback is not None:
            callback({"i": i, "t": evaluated[i], "x": x, "denoised": x0})
    return x


def _sigma_schedule(alphas_cumprod: Tensor, timesteps: Tensor, sigmas: Tensor | None) -> list[Tensor]:
    if sigmas is None:
        sigmas = _sigmas_at(alphas_cumprod, timesteps)
    if len(sigmas) != len(timesteps):
        raise ValueError(f"got {len(sigmas)} sigmas for {len(timesteps)} timesteps")
    return [*_coefficients(sigmas), torch.tensor(0.0)]


def sample_dpmpp_2m(
    model: Model,
    noise: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Tensor,
    *,
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    start: int = 0,
    sigmas: Tensor | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, algorithm 2), as diffusers'
    DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint, lower_order_final, final σ = 0).

    Works on x_t = α x_0 + sqrt(1 - α²) ε (so the noise is used unscaled) with λ = -log σ: the first
    step is first order (DDIM), the next ones add the midpoint correction from the previous x̂_0, and the
    last one lands on x̂_0. `sigmas` (one per timestep) replace the interpolated ones, e.g. Karras'.
    `generator` is unused (deterministic); it is accepted for the common signature.
    """
    del generator
    sig = _sigma_schedule(alphas_cumprod, timesteps, sigmas)
    x = noise
    previous: tuple[Tensor, float] | None = None
    for i in range(start, len(timesteps)):
        out = _call(model, x, timesteps[i])
        s, s_next = sig[i], sig[i + 1]
        x0, _ = x0_and_eps(x, out, 1 / (1 + s * s), prediction_type)
        if s_next == 0:
            x = x0
        else:
            h = math.log(s / s_next)
            d = x0 if previous is None else x0 + (h / (2 * previous[1])) * (x0 - previous[0])
            alpha_next = (1 + s_next * s_next) ** -0.5
            alpha = (1 + s * s) ** -0.5
            x = (s_next * alpha_next / (s * alpha)) * x - (alpha_next * math.expm1(-h)) * d
            previous = (x0, h)
        if callback is not None:
            callback({"i": i, "t": timesteps[i], "x": x, "denoised": x0})
    return x


def _euler_denoise(model: Model, x: Tensor, t: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """x̂_0 from x = x_0 + σ ε, the model seeing the variance-preserving x / sqrt(σ² + 1)."""
    alpha_bar = 1 / (1 + sigma * sigma)
    x_vp = x * alpha_bar**0.5
    return x0_and_eps(x_vp, _call(model, x_vp, t), alpha_bar, prediction_type)[0]


def sample_euler(
    model: Model,
    noise: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Tensor,
    *,
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    start: int = 0,
    sigmas: Tensor | None = None,
    init_noise_sigma: float | None = None,
) -> Tensor:
    """Euler's method on the probability-flow ODE dx/dσ = (x - x̂_0) / σ (Karras et al. 2022,
    arXiv:2206.00364, algorithm 2 without churn), as diffusers' EulerDiscreteScheduler.

    The noise is scaled by `init_noise_sigma`, by default the first σ; diffusers uses
    sqrt(σ² + 1) for "leading" spacing, which `sample` passes. `generator` is unused (no churn).
    """
    del generator
    sig = _sigma_schedule(alphas_cumprod, timesteps, sigmas)
    x = noise * (sig[start] if init_noise_sigma is None else init_noise_sigma)
    for i in range(start, len(timesteps)):
        x0 = _euler_denoise(model, x, timesteps[i], sig[i], prediction_type)
        x = x + (x - x0) * ((sig[i + 1] - sig[i]) / sig[i])
        if callback is not None:
            callback({"i": i, "t": timesteps[i], "x": x, "denoised": x0})
    return x


def sample_euler_a(
    model: Model,
    noise: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Tensor,
    *,
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    start: int = 0,
    sigmas: Tensor | None = None,
    init_noise_sigma: float | None = None,
) -> Tensor:
    """Euler ancestral (k-diffusion's `sample_euler_ancestral`; Karras et al. 2022, arXiv:2206.00364),
    as diffusers' EulerAncestralDiscreteScheduler.

    Each step takes an Euler step down to σ_down and adds fresh noise of std σ_up, where
    σ_down² + σ_up² = σ_next² (σ_up chosen as for DDPM's posterior). Noise is drawn at every step,
    the last one included (σ_up = 0 there), as diffusers does. `init_noise_sigma` as in `sample_euler`.
    """
    sig = _sigma_schedule(alphas_cumprod, timesteps, sigmas)
    x = noise * (sig[start] if init_noise_sigma is None else init_noise_sigma)
    for i in range(start, len(timesteps)):
        s, s_next = sig[i], sig[i + 1]
        x0 = _euler_denoise(model, x, timesteps[i], s, prediction_type)
        s_up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
        s_down = (s_next**2 - s_up**2) ** 0.5
        x = x + (x - x0) * ((s_down - s) / s) + s_up * _randn(x0, generator)
        if callback is not None:
            callback({"i": i, "t": timesteps[i], "x": x, "denoised": x0})
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "plms": sample_plms,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "euler_a": sample_euler_a,
}


def _discrete_schedule(
    num_steps: int, alphas_cumprod: Tensor, spacing: str, steps_offset: int
) -> tuple[Tensor, dict[str, Any]]:
    return make_timesteps(num_steps, len(alphas_cumprod), spacing, steps_offset), {}


def _dpm_solver_schedule(
    num_steps: int, alphas_cumprod: Tensor, spacing: str, steps_offset: int, karras: bool
) -> tuple[Tensor, dict[str, Any]]:
    num_train = len(alphas_cumprod)
    if karras:
        # diffusers spans the whole training range here, whatever the spacing
        train = _train_sigmas(alphas_cumprod.detach().cpu())
        sigmas = karras_sigmas(train[0].item(), train[-1].item(), num_steps)
        timesteps = _sigma_to_timestep(sigmas, alphas_cumprod).round().long()
        return timesteps, {"sigmas": sigmas.float()}
    if spacing == "trailing":
        return make_timesteps(num_steps, num_train, spacing, steps_offset), {}
    # DPMSolverMultistepScheduler spaces n + 1 points and drops the smallest
    return make_timesteps(num_steps + 1, num_train, spacing, steps_offset)[:-1], {}


def _euler_schedule(
    num_steps: int, alphas_cumprod: Tensor, spacing: str, steps_offset: int, karras: bool
) -> tuple[Tensor, dict[str, Any]]:
    # Euler keeps linspace timesteps fractional (float32) instead of rounding them
    timesteps = torch.from_numpy(
        _spaced(num_steps, len(alphas_cumprod), spacing, steps_offset).astype(np.float32)
    )
    sigmas = _sigmas_at(alphas_cumprod, timesteps)
    if karras:
        # unlike DPM-Solver, diffusers' Euler spans the range of the spaced timesteps
        sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), num_steps)
        timesteps = _sigma_to_timestep(sigmas, alphas_cumprod).float()
        sigmas = sigmas.float()
    sigma_max = sigmas[0].item()
    init_noise_sigma = (sigma_max**2 + 1) ** 0.5 if spacing == "leading" else sigma_max
    return timesteps, {"sigmas": sigmas, "init_noise_sigma": init_noise_sigma}


def sample(
    name: str,
    model: Model,
    noise: Tensor,
    alphas_cumprod: Tensor,
    num_steps: int,
    *,
    spacing: str = "leading",
    steps_offset: int = 1,
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    karras: bool = False,
    callback: Callback | None = None,
    init_latents: Tensor | None = None,
    strength: float = 1.0,
) -> Tensor:
    """Run sampler `name` for `num_steps` steps with diffusers' timestep and σ construction of the
    matching scheduler; returns the denoised latents.

    Image-to-image (SDEdit, Meng et al. 2021, arXiv:2108.01073): with `init_latents` (scaled x_0), the
    first `num_steps - int(num_steps · strength)` steps are skipped and the run starts from x_0 noised
    with `noise` to the first remaining step, as diffusers' img2img pipelines do (each scheduler's
    `add_noise` at its begin index).

    `eta` applies to "ddim" only; `karras` (Karras σs, diffusers' `use_karras_sigmas`) to "dpmpp_2m"
    and "euler", the schedulers of diffusers that have it. DPM-Solver's Karras timesteps are rounded,
    as diffusers does for every beta schedule but "squaredcos_cap_v2".
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    if eta != 0 and name != "ddim":
        raise ValueError(f"eta applies only to the ddim sampler, not {name!r}")
    if name == "dpmpp_2m":
        timesteps, specific = _dpm_solver_schedule(num_steps, alphas_cumprod, spacing, steps_offset, karras)
    elif name in ("euler", "euler_a"):
        if karras and name == "euler_a":
            raise ValueError("karras sigmas are supported by dpmpp_2m and euler, not euler_a")
        timesteps, specific = _euler_schedule(num_steps, alphas_cumprod, spacing, steps_offset, karras)
    else:
        if karras:
            raise ValueError(f"karras sigmas are supported by dpmpp_2m and euler, not {name!r}")
        timesteps, specific = _discrete_schedule(num_steps, alphas_cumprod, spacing, steps_offset)
    if name == "ddim":
        specific["eta"] = eta
    if init_latents is not None:
        start = img2img_start(num_steps, strength)
        noise = _noised(name, init_latents, noise, alphas_cumprod, timesteps, specific, start)
        specific["start"] = start
        if "init_noise_sigma" in specific:
            specific["init_noise_sigma"] = 1.0  # x is already at the starting σ
    return SAMPLERS[name](
        model,
        noise,
        alphas_cumprod,
        timesteps,
        prediction_type=prediction_type,
        generator=generator,
        callback=callback,
        **specific,
    )


def img2img_start(num_steps: int, strength: float) -> int:
    """The first step an image-to-image run takes (diffusers' `get_timesteps`)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    start = num_steps - min(int(num_steps * strength), num_steps)
    if start >= num_steps:
        raise ValueError(
            f"strength {strength} of {num_steps} steps leaves no step to take: raise strength or steps "
            f"(at least {1 / num_steps:.3g})"
        )
    return start


def _noised(
    name: str, x0: Tensor, noise: Tensor, alphas_cumprod: Tensor, timesteps: Tensor, specific: dict[str, Any],
    start: int,
) -> Tensor:
    """x_0 noised to the sampler's step `start`, in that sampler's own parameterization."""
    if name in ("euler", "euler_a"):  # x = x_0 + σ ε
        return x0 + specific["sigmas"][start].to(x0) * noise
    if name == "dpmpp_2m":  # variance-preserving at σ (its Karras σs or the interpolated ones)
        sigmas = specific.get("sigmas")
        sigma = (sigmas[start] if sigmas is not None else _sigmas_at(alphas_cumprod, timesteps[start : start + 1])[0])
        alpha = (1 + sigma.to(x0) ** 2) ** -0.5
        return alpha * x0 + alpha * sigma.to(x0) * noise
    ts = torch.cat([timesteps[:1], timesteps[1:2], timesteps[1:]]) if name == "plms" else timesteps
    a_t = alphas_cumprod.detach().cpu().float()[int(ts[start])].to(x0)
    return a_t**0.5 * x0 + (1 - a_t) ** 0.5 * noise


def classifier_free_guidance(
    model: Callable[[Tensor, Tensor, Any], Tensor],
    cond: Tensor | Mapping[str, Tensor],
    uncond: Tensor | Mapping[str, Tensor] | None,
    guidance_scale: float,
) -> Model:
    """Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598) as a sampler model.

    `model(x, t, context)` is the conditional network; `context` is a tensor (e.g. the cross-attention
    embeddings, B×77×D) or a dict of tensors (e.g. {"crossattn": ..., "concat": ...}), batched along
    dim 0 like x. The returned model_fn(x, t) = out_u + g·(out_c - out_u), with the unconditional and
    conditional passes in one call on the batch [uncond; cond] as diffusers does. For g <= 1 only the
    conditional pass runs (and `uncond` may be None), as in diffusers' pipelines, which guide only
    above 1 (the original LDM scripts guide at any g != 1).
    """
    if guidance_scale <= 1:
        return lambda x, t: model(x, t, cond)
    if uncond is None:
        raise ValueError(f"guidance_scale {guidance_scale} needs an unconditional context; got None")
    if isinstance(cond, Mapping) != isinstance(uncond, Mapping):
        raise ValueError("cond and uncond must both be tensors or both be dicts")
    if isinstance(cond, Mapping):
        if cond.keys() != uncond.keys():
            raise ValueError(f"cond keys {sorted(cond)} differ from uncond keys {sorted(uncond)}")
        context: Any = {key: torch.cat([uncond[key], cond[key]]) for key in cond}
    else:
        context = torch.cat([uncond, cond])

    def guided(x: Tensor, t: Tensor) -> Tensor:
        out_uncond, out_cond = model(torch.cat([x, x]), torch.cat([t, t]), context).chunk(2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    return guided


def image_text_guidance(
    model: Callable[[Tensor, Tensor, Any], Tensor],
    cond: Mapping[str, Tensor],
    image_only: Mapping[str, Tensor],
    uncond: Mapping[str, Tensor],
    guidance_scale: float,
    image_guidance_scale: float,
) -> Model:
    """InstructPix2Pix's guidance over text and image (Brooks et al. 2023, arXiv:2211.09800, eq. 3).

    Three passes in one call on [cond; image_only; uncond] (text + image, image alone, neither) give
    out_u + g·(out_c − out_i) + g_I·(out_i − out_u). As in diffusers' pipeline, guidance runs only for
    g > 1 and g_I >= 1; otherwise only the conditional pass.
    """
    if guidance_scale <= 1 or image_guidance_scale < 1:
        return lambda x, t: model(x, t, cond)
    keys = cond.keys()
    if image_only.keys() != keys or uncond.keys() != keys:
        raise ValueError(f"cond, image_only and uncond need the same keys, got {sorted(cond)}, "
                         f"{sorted(image_only)}, {sorted(uncond)}")
    context = {key: torch.cat([cond[key], image_only[key], uncond[key]]) for key in keys}

    def guided(x: Tensor, t: Tensor) -> Tensor:
        out_cond, out_image, out_uncond = model(torch.cat([x, x, x]), torch.cat([t, t, t]), context).chunk(3)
        return (
            out_uncond
            + guidance_scale * (out_cond - out_image)
            + image_guidance_scale * (out_image - out_uncond)
        )

    return guided

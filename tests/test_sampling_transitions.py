"""Transitions with log-probs: known answers from diffusers' own scheduler steps, the Gaussian
density of torch.distributions, and Monte Carlo moments (no pipeline needed)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from align.backbones.presets import SD15_SCHEDULE
from align.sampling import (
    SamplerConfig,
    ddim_distribution,
    ddim_step_with_logprob,
    flow_sde_distribution,
    flow_sde_step_with_logprob,
    gaussian_log_prob,
    sample_trajectory,
    step_log_prob,
    take_step,
    transition_for,
)

# fp32: the steps repeat diffusers' own float32 arithmetic; 1e-5 leaves ~100 ulps at |x| ~ 1.
FP32_TOL = 1e-5
SHAPE = (2, 4, 8, 8)

DDIM_CONFIGS = {
    "sd15": dict(SD15_SCHEDULE),  # leading spacing, set_alpha_to_one=False: last step σ > 0
    "trailing_zero_snr": dict(SD15_SCHEDULE, timestep_spacing="trailing", rescale_betas_zero_snr=True),
    "clip_sample": dict(SD15_SCHEDULE, clip_sample=True, clip_sample_range=1.0),
    "thresholding": dict(SD15_SCHEDULE, thresholding=True, sample_max_value=1.5),
}


def _ddim(config: str, prediction_type: str, steps: int = 10) -> DDIMScheduler:
    sched = DDIMScheduler(prediction_type=prediction_type, **DDIM_CONFIGS[config])
    sched.set_timesteps(steps)
    return sched


# zero terminal SNR only with v-/x0-prediction (ε-prediction divides by √ᾱ_T = 0, in diffusers too)
CASES = [
    (c, p)
    for c in DDIM_CONFIGS
    for p in ("epsilon", "v_prediction", "sample")
    if not (c == "trailing_zero_snr" and p == "epsilon")
]


def _ddim_limit(
    sched: DDIMScheduler, model_out: torch.Tensor, t: torch.Tensor, x: torch.Tensor, eta: float, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DDIM step at the exact zero of 1 − ᾱ_{t−1} − σ_t², from diffusers' own parts (its x̂0 and
    variance): mean = √ᾱ_{t−1} x̂0, x_{t−1} = mean + σ_t z. Returns ``(mean, x_{t−1})``."""
    x0 = sched.step(model_out, t, x, eta=eta, variance_noise=z).pred_original_sample
    prev_t = int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
    alpha_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
    mean = alpha_prev**0.5 * x0
    return mean, mean + eta * sched._get_variance(t, prev_t) ** 0.5 * z


@pytest.mark.parametrize("config,prediction_type", CASES)
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_logprob_step_matches_scheduler_step_and_gaussian_density(
    config: str, prediction_type: str, eta: float
) -> None:
    """Against ``DDIMScheduler.step`` where it is finite. Where it is NaN (the first step of a
    zero-SNR schedule at η = 1, when 1 − ᾱ_{t−1} − σ_t² = 0 rounds below 0 on this CPU), ours must be
    finite and equal the exact-zero limit built from diffusers' x̂0 and variance."""
    sched = _ddim(config, prediction_type)
    g = torch.Generator().manual_seed(0)
    for i in [0, 4, 9]:  # first, middle, last (prev timestep < 0 → final_alpha_cumprod)
        t = sched.timesteps[i]
        x, model_out, z = (3 * torch.randn(SHAPE, generator=g) for _ in range(3))
        z = z / 3
        ours = ddim_step_with_logprob(sched, model_out, t, x, eta=eta, noise=z)
        assert torch.isfinite(ours.prev_sample).all() and torch.isfinite(ours.log_prob).all()
        ref = sched.step(model_out, t, x, eta=eta, variance_noise=z).prev_sample
        if torch.isfinite(ref).all():
            torch.testing.assert_close(ours.prev_sample, ref, atol=FP32_TOL, rtol=0)
            # the density, independently: diffusers' mean (its step with zero noise) and its variance
            mean = sched.step(model_out, t, x, eta=eta, variance_noise=torch.zeros_like(z)).prev_sample
        else:  # only where the term is 0 in exact arithmetic: ᾱ_t = 0 at η = 1
            assert (config, eta, i) == ("trailing_zero_snr", 1.0, 0)
            mean, ref = _ddim_limit(sched, model_out, t, x, eta, z)
            torch.testing.assert_close(ours.prev_sample, ref, atol=FP32_TOL, rtol=0)
        prev_t = int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
        std = eta * sched._get_variance(t, prev_t) ** 0.5
        expected = torch.distributions.Normal(mean, std).log_prob(ref).mean(dim=(1, 2, 3))
        torch.testing.assert_close(ours.log_prob, expected, atol=FP32_TOL, rtol=0)
        # the recompute path scores the stored sample to the same value
        again = ddim_step_with_logprob(sched, model_out, t, x, eta=eta, prev_sample=ours.prev_sample)
        torch.testing.assert_close(again.log_prob, ours.log_prob, atol=FP32_TOL, rtol=0)


def _zero_snr_at_the_edge(steps: int, prediction_type: str = "v_prediction") -> DDIMScheduler:
    """A trailing zero-SNR DDIM schedule whose first ᾱ_{t−1} is moved (within 1e-3 of its own value)
    to one where diffusers' 1 − ᾱ_{t−1} − σ_t² at η = 1 rounds below 0 on this CPU, so the clamp is
    exercised whatever the rounding of the unmodified schedule."""
    sched = DDIMScheduler(prediction_type=prediction_type, **DDIM_CONFIGS["trailing_zero_snr"])
    sched.set_timesteps(steps)
    t0 = int(sched.timesteps[0])
    prev = t0 - sched.config.num_train_timesteps // steps
    assert float(sched.alphas_cumprod[t0]) == 0.0  # zero terminal SNR: ᾱ_T = 0
    sched.alphas_cumprod = sched.alphas_cumprod.clone()
    ones = torch.ones(1, 1, 1, 1)
    base = float(sched.alphas_cumprod[prev])
    for candidate in torch.linspace(base * (1 - 1e-3), base * (1 + 1e-3), 257):  # ~½ of them round down
        sched.alphas_cumprod[prev] = candidate
        if torch.isnan(sched.step(ones, t0, ones, eta=1.0, variance_noise=ones).prev_sample).all():
            return sched
    raise AssertionError("no ᾱ_{t-1} near the schedule's own rounds 1 - ᾱ_{t-1} - σ² below zero")


def test_ddim_at_eta_1_on_zero_snr_clamps_the_rounded_negative_term_where_diffusers_gives_nan() -> None:
    sched = _zero_snr_at_the_edge(10)
    g = torch.Generator().manual_seed(8)
    x, model_out, z = (torch.randn(SHAPE, generator=g) for _ in range(3))
    t = sched.timesteps[0]
    assert torch.isnan(sched.step(model_out, t, x, eta=1.0, variance_noise=z).prev_sample).all()
    ours = ddim_step_with_logprob(sched, model_out, t, x, eta=1.0, noise=z)
    mean, expected = _ddim_limit(sched, model_out, t, x, 1.0, z)
    torch.testing.assert_close(ours.mean, mean, atol=FP32_TOL, rtol=0)
    torch.testing.assert_close(ours.prev_sample, expected, atol=FP32_TOL, rtol=0)
    assert torch.isfinite(ours.log_prob).all()


def test_zero_snr_vpred_unet_at_eta_1_samples_finite_latents_and_log_probs(tiny_unet_vpred_pipe) -> None:
    """An SD2.1-v-style zero-terminal-SNR model at η = 1 through the sampler (diffusers' step: NaN)."""
    steps = 4
    tiny_unet_vpred_pipe.scheduler = _zero_snr_at_the_edge(steps)
    traj = sample_trajectory(
        tiny_unet_vpred_pipe,
        ["two red circles", "one blue square"],
        SamplerConfig(num_inference_steps=steps, eta=1.0, output_type="latent"),
        torch.Generator().manual_seed(0),
    )
    assert torch.isfinite(traj.latents).all() and torch.isfinite(traj.log_probs).all()
    assert traj.latents.shape[1] == steps + 1 and traj.latents[:, 1:].abs().max() > 0


def test_ddim_refuses_eta_above_1() -> None:
    """η > 1 is no DDIM process (1 − ᾱ_{t−1} − σ_t² truly < 0); refused rather than clamped."""
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        ddim_distribution(_ddim("sd15", "epsilon"), torch.zeros(SHAPE), 901, torch.zeros(SHAPE), eta=1.5)


def test_ddim_logprob_sum_is_mean_times_dims_and_generator_draws_like_diffusers() -> None:
    sched = _ddim("sd15", "epsilon")
    g = torch.Generator().manual_seed(1)
    x, model_out = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = sched.timesteps[3]
    ours = ddim_step_with_logprob(sched, model_out, t, x, eta=1.0, generator=torch.Generator().manual_seed(7))
    ref = sched.step(model_out, t, x, eta=1.0, generator=torch.Generator().manual_seed(7)).prev_sample
    torch.testing.assert_close(ours.prev_sample, ref, atol=FP32_TOL, rtol=0)
    summed = ddim_step_with_logprob(sched, model_out, t, x, eta=1.0, prev_sample=ref, reduce="sum")
    n = math.prod(SHAPE[1:])
    torch.testing.assert_close(summed.log_prob, ours.log_prob * n, atol=FP32_TOL * n, rtol=0)


def test_ddim_with_alpha_to_one_has_a_deterministic_last_step_with_zero_logprob() -> None:
    sched = DDIMScheduler(**dict(SD15_SCHEDULE, set_alpha_to_one=True))
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(2)
    x, model_out, z = (torch.randn(SHAPE, generator=g) for _ in range(3))
    t = sched.timesteps[-1]
    ours = ddim_step_with_logprob(sched, model_out, t, x, eta=1.0, noise=z)
    assert float(ours.std) == 0.0
    torch.testing.assert_close(
        ours.prev_sample, sched.step(model_out, t, x, eta=1.0, variance_noise=z).prev_sample, atol=FP32_TOL, rtol=0
    )
    assert torch.equal(ours.log_prob, torch.zeros(2))  # point mass: log 1, NaN-free


def test_flow_sde_with_zero_noise_is_the_euler_scheduler_step() -> None:
    ours = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ours.set_timesteps(8)
    ref.set_timesteps(8)
    g = torch.Generator().manual_seed(3)
    x_ours = x_ref = torch.randn(2, 16, 4, 4, generator=g)
    for i, t in enumerate(ref.timesteps):  # the whole schedule, sigma 1 → 0
        v = torch.randn(2, 16, 4, 4, generator=g)
        step = flow_sde_step_with_logprob(ours, v, i, x_ours, noise_level=0.0, generator=g)
        x_ours, x_ref = step.prev_sample, ref.step(v, t, x_ref).prev_sample
        torch.testing.assert_close(x_ours, x_ref, atol=FP32_TOL, rtol=0)
        assert torch.equal(step.log_prob, torch.zeros(2))  # deterministic: defined as 0, never NaN


@pytest.mark.parametrize("step_index", [0, 3, 9])  # 0: t = 1, Flow-GRPO's guard
def test_flow_sde_draws_have_the_stated_mean_and_std(step_index: int) -> None:
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(4)
    x, v = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    a = 0.7
    mean, std = flow_sde_distribution(sched, v, step_index, x, noise_level=a)
    # Flow-GRPO's form: x(1 + σ²Δ/(2t)) + v(1 + σ²(1−t)/(2t))Δ, σ = a√(t/(1−t)), t = 1 → 1 − sigmas[1]
    t, t_next = sched.sigmas[step_index], sched.sigmas[step_index + 1]
    sigma = a * (t / (1 - (sched.sigmas[1] if step_index == 0 else t))).sqrt()
    dt = t_next - t
    expected = x * (1 + sigma**2 / (2 * t) * dt) + v * (1 + sigma**2 * (1 - t) / (2 * t)) * dt
    torch.testing.assert_close(mean, expected, atol=FP32_TOL, rtol=0)
    torch.testing.assert_close(std, sigma * (-dt).sqrt(), atol=FP32_TOL, rtol=0)
    assert torch.isfinite(std) and float(std) > 0
    n = 20_000  # all draws in one batched call
    draws = flow_sde_step_with_logprob(
        sched, v.expand(n, -1, -1, -1), step_index, x.expand(n, -1, -1, -1), noise_level=a, generator=g
    ).prev_sample
    # 5 standard errors of the sample mean (σ/√n) and sample std (≈ σ/√(2n)) per element
    assert ((draws.mean(0) - mean[0]).abs() < 5 * std / math.sqrt(n)).all()
    assert ((draws.std(0) - std).abs() < 5 * std / math.sqrt(2 * n)).all()


def test_gaussian_log_prob_is_the_normal_density() -> None:
    g = torch.Generator().manual_seed(5)
    x, mean = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    std = torch.tensor(0.3)
    dens = torch.distributions.Normal(mean, std).log_prob(x)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), dens.mean(dim=(1, 2, 3)), atol=FP32_TOL, rtol=0)
    torch.testing.assert_close(
        gaussian_log_prob(x, mean, std, reduce="sum"), dens.sum(dim=(1, 2, 3)), atol=FP32_TOL * 256, rtol=0
    )
    with pytest.raises(ValueError, match="reduce"):
        gaussian_log_prob(x, mean, std, reduce="max")


def test_zero_std_log_prob_is_zero_with_finite_gradients() -> None:
    mean = torch.randn(SHAPE, requires_grad=True)
    lp = step_log_prob(torch.randn(SHAPE), mean, torch.tensor(0.0))
    lp.sum().backward()
    assert torch.equal(lp, torch.zeros(2)) and torch.equal(mean.grad, torch.zeros(SHAPE))


def test_take_step_rejects_ambiguous_randomness() -> None:
    mean, std = torch.zeros(SHAPE), torch.tensor(1.0)
    with pytest.raises(ValueError, match="either"):
        take_step(mean, std, noise=torch.zeros(SHAPE), generator=torch.Generator())
    with pytest.raises(ValueError, match="prev_sample"):
        take_step(mean, std, prev_sample=mean, noise=torch.zeros(SHAPE))


def test_transition_for_names_the_supported_schedulers() -> None:
    assert transition_for(DDIMScheduler()) == "ddim"
    assert transition_for(FlowMatchEulerDiscreteScheduler()) == "flow_sde"
    with pytest.raises(TypeError, match="EulerDiscreteScheduler.*supported: DDIMScheduler.*FlowMatchEuler"):
        transition_for(EulerDiscreteScheduler())


def test_flow_sde_refuses_the_schedulers_own_stochastic_sampling() -> None:
    sched = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="stochastic_sampling"):
        flow_sde_distribution(sched, torch.zeros(SHAPE), 0, torch.zeros(SHAPE), noise_level=0.7)


def test_ddim_needs_set_timesteps() -> None:
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_distribution(DDIMScheduler(), torch.zeros(SHAPE), 999, torch.zeros(SHAPE), eta=1.0)

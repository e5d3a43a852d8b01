"""Stochastic transitions with log-probs: the policy π(x_{t-1} | x_t, c) of diffusion RL.

Every transition is split in two so that modifiers can hook between the halves and log-probs stay
consistent with what was sampled (ecg_spec.md §The RL problem):

1. a *distribution* function maps the model output to the Gaussian step ``N(mean, std² I)``;
2. :func:`take_step` draws ``x_{t-1} = mean + std · z`` (or scores a given ``x_{t-1}``) and returns
   its log-density.

Conventions (documented choices):

* ``log_prob`` is the full Gaussian log-density per element, *averaged* over the non-batch dims
  by default (``reduce="mean"``, as DDPO and Flow-GRPO do; it keeps PPO ratios well scaled for
  any resolution). ``reduce="sum"`` gives the exact joint density.
* A deterministic step (std = 0: DDIM η = 0 or flow a = 0) has no density; :func:`take_step`
  then returns ``log_prob = NaN`` so that any attempt to train on it fails loudly.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclasses.dataclass
class StepOutput:
    prev_sample: torch.Tensor  # (B, C, h, w) x_{t-1}
    mean: torch.Tensor         # (B, C, h, w) μ_θ(x_t, t, c)
    std: torch.Tensor          # () or broadcastable: σ_t of the step
    log_prob: torch.Tensor     # (B,) log π(x_{t-1} | x_t, c), reduced over non-batch dims


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """log N(x; mean, std² I), reduced over all but the batch dim (``"mean"`` or ``"sum"``)."""
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    lp = -((x - mean) ** 2) / (2 * std ** 2) - torch.log(std) - _LOG_SQRT_2PI
    dims = tuple(range(1, x.ndim))
    if reduce == "mean":
        return lp.mean(dim=dims)
    if reduce == "sum":
        return lp.sum(dim=dims)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


def take_step(mean: torch.Tensor, std: torch.Tensor, *, prev_sample: Optional[torch.Tensor] = None,
              noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
              reduce: str = "mean") -> StepOutput:
    """Draw ``x_{t-1} = mean + std·z`` (unless ``prev_sample`` is given) and score it."""
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        prev_sample = mean + std * noise
    if bool((std > 0).all()):
        log_prob = gaussian_log_prob(prev_sample.detach(), mean, std, reduce)
    else:
        log_prob = torch.full(mean.shape[:1], float("nan"), dtype=mean.dtype, device=mean.device)
    return StepOutput(prev_sample=prev_sample, mean=mean, std=std, log_prob=log_prob)


def ddim_distribution(scheduler: DDIMScheduler, model_output: torch.Tensor, step_index: int,
                      sample: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM step with η > 0 (Song et al. 2021, eq. 12), as ``DDIMScheduler.step`` computes it.

    x̂0 from ε-, v- or sample-prediction; σ_t = η √((1−ᾱ_{t−1})/(1−ᾱ_t)) √(1−ᾱ_t/ᾱ_{t−1});
    μ = √ᾱ_{t−1} x̂0 + √(1−ᾱ_{t−1}−σ_t²) ε̂. Returns ``(μ, σ_t)``.
    """
    t = int(scheduler.timesteps[step_index])
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = scheduler.alphas_cumprod[t]
    a_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    a_t, a_prev = a_t.to(sample.dtype), torch.as_tensor(a_prev, dtype=sample.dtype)
    b_t = 1 - a_t
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0, eps = (sample - b_t.sqrt() * model_output) / a_t.sqrt(), model_output
    elif kind == "v_prediction":
        x0 = a_t.sqrt() * sample - b_t.sqrt() * model_output
        eps = a_t.sqrt() * model_output + b_t.sqrt() * sample
    elif kind == "sample":
        x0, eps = model_output, (sample - a_t.sqrt() * model_output) / b_t.sqrt()
    else:
        raise ValueError(f"DDIM: unsupported prediction_type {kind!r}")
    if scheduler.config.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)
    if scheduler.config.thresholding or scheduler.config.clip_sample:
        eps = (sample - a_t.sqrt() * x0) / b_t.sqrt()  # diffusers' use_clipped_model_output
    variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
    std = eta * variance.sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std ** 2).sqrt() * eps
    return mean, std


def flow_sde_distribution(scheduler: FlowMatchEulerDiscreteScheduler, model_output: torch.Tensor,
                          step_index: int, sample: torch.Tensor, noise_level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-GRPO's SDE step for rectified flow (x_t = (1−t)x0 + tε, v ≈ ε − x0).

    σ_t = a √(t/(1−t)); x_{t+Δ} = x_t + [v + σ_t²/(2t)(x_t + (1−t)v)]Δ + σ_t √|Δ| z with Δ < 0.
    Same marginals as the ODE; a = 0 is exactly ``FlowMatchEulerDiscreteScheduler.step``.
    At t = 1 (the first step of an unshifted-to-1 schedule) t/(1−t) is infinite; as Flow-GRPO does,
    the denominator then uses the schedule's next sigma instead. Returns ``(mean, std)``.
    """
    sigmas = scheduler.sigmas
    t, t_next = sigmas[step_index].to(sample.dtype), sigmas[step_index + 1].to(sample.dtype)
    dt = t_next - t
    t_safe = sigmas[1].to(sample.dtype) if float(t) >= 1.0 else t
    sigma = noise_level * (t / (1 - t_safe)).sqrt()
    drift = model_output + sigma ** 2 / (2 * t) * (sample + (1 - t) * model_output)
    mean = sample + drift * dt
    return mean, sigma * (-dt).sqrt()


Distribution = Callable[..., tuple[torch.Tensor, torch.Tensor]]
#: Transition name -> step-distribution function ``(scheduler, model_output, step_index, sample, noise)``.
TRANSITIONS: dict[str, Distribution] = {"ddim": ddim_distribution, "flow_sde": flow_sde_distribution}
_BY_SCHEDULER: dict[type, str] = {DDIMScheduler: "ddim", FlowMatchEulerDiscreteScheduler: "flow_sde"}


def transition_for(scheduler: object) -> str:
    """The transition that matches a scheduler class; a clear error for unsupported schedulers."""
    for cls, name in _BY_SCHEDULER.items():
        if isinstance(scheduler, cls):
            return name
    raise TypeError(f"no log-prob transition for scheduler {type(scheduler).__name__}; supported: "
                    + ", ".join(c.__name__ for c in _BY_SCHEDULER))


def ddim_step_with_logprob(scheduler: DDIMScheduler, model_output: torch.Tensor, step_index: int,
                           sample: torch.Tensor, *, eta: float, prev_sample: Optional[torch.Tensor] = None,
                           noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                           reduce: str = "mean") -> StepOutput:
    mean, std = ddim_distribution(scheduler, model_output, step_index, sample, eta)
    return take_step(mean, std, prev_sample=prev_sample, noise=noise, generator=generator, reduce=reduce)


def flow_sde_step_with_logprob(scheduler: FlowMatchEulerDiscreteScheduler, model_output: torch.Tensor,
                               step_index: int, sample: torch.Tensor, *, noise_level: float,
                               prev_sample: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                               generator: Optional[torch.Generator] = None, reduce: str = "mean") -> StepOutput:
    mean, std = flow_sde_distribution(scheduler, model_output, step_index, sample, noise_level)
    return take_step(mean, std, prev_sample=prev_sample, noise=noise, generator=generator, reduce=reduce)

"""Stochastic transitions with log-probs: the policy π(x_{t-1} | x_t, c) of diffusion RL.

Equations: docs/sampling.md, "One transition API". Each transition has two halves, so that modifiers can
hook between them and the log-prob always belongs to the step actually taken:

1. a *distribution* maps the denoiser output to the Gaussian step ``N(mean, std² I)``
   (:func:`ddim_distribution`, :func:`flow_sde_distribution`);
2. :func:`take_step` draws ``x_{t-1} = mean + std · z`` (or scores a given ``x_{t-1}``).

Conventions (documented choices, see docs/sampling.md):

* ``reduce="mean"`` (default): the full per-element Gaussian log-density, *averaged* over the
  non-batch dims, as DDPO and Flow-GRPO do (PPO ratios keep one scale at any resolution);
  ``"sum"`` is the exact joint log-density. The step math (mean, std) and the log-probs are
  computed in float32 even when the model runs in bf16; only the drawn x_{t-1} is stored in the
  latents' dtype, and its log-prob is that of the stored (rounded) value.
* A step with ``std == 0`` (DDIM η = 0, flow a = 0, or DDIM's last step when
  ``set_alpha_to_one=True``) is deterministic: it is not an action of a stochastic policy. Its
  log-prob is defined as 0 (log of probability 1 of its only outcome), element by element, so the
  result is NaN-free and has zero gradient. No std is ever clamped. ``recompute_log_probs``
  refuses trajectories sampled with a zero noise scale.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

LOGPROB_REDUCTIONS = ("mean", "sum")
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclasses.dataclass
class StepOutput:
    """One transition x_t → x_{t-1} and its log-density."""

    prev_sample: torch.Tensor  # (B, C, h, w) x_{t-1} (dtype of the latents)
    mean: torch.Tensor  # (B, C, h, w) μ_θ(x_t, t, c)
    std: torch.Tensor  # () or broadcastable to mean: std of the step
    log_prob: torch.Tensor  # (B,) float32 log π(x_{t-1} | x_t, c), reduced over non-batch dims


def _reduce(per_element: torch.Tensor, reduce: str) -> torch.Tensor:
    dims = tuple(range(1, per_element.ndim))
    if reduce == "mean":
        return per_element.mean(dim=dims)
    if reduce == "sum":
        return per_element.sum(dim=dims)
    raise ValueError(f"log-prob reduce must be one of {LOGPROB_REDUCTIONS}, got {reduce!r}")


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float, reduce: str = "mean"
) -> torch.Tensor:
    """log N(x; mean, std² I) = −(x−μ)²/(2σ²) − log σ − ½ log 2π per element, reduced to (B,).

    ``reduce="mean"`` averages over the non-batch dims (DDPO's convention), ``"sum"`` gives the
    joint density. ``std`` must be > 0 (not checked: a check would synchronise the device).
    """
    x, mean = x.float(), mean.float()
    std = torch.as_tensor(std, device=x.device).float()
    per_element = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return _reduce(per_element, reduce)


def step_log_prob(
    prev_sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float, reduce: str = "mean"
) -> torch.Tensor:
    """:func:`gaussian_log_prob` where ``std > 0``; exactly 0 where ``std == 0`` (a deterministic step).

    Written as −(x−μ)²·c₁ + c₀ with c₁ = 1/(2σ²), c₀ = −log σ − ½ log 2π, both set to 0 where σ = 0:
    no NaN in the value or its gradient, and the masking costs ops on ``std``'s shape only.
    """
    x, mean = prev_sample.float(), mean.float()
    std = torch.as_tensor(std, device=x.device).float()
    stochastic = std > 0
    safe = torch.where(stochastic, std, torch.ones_like(std))
    inv_two_var = torch.where(stochastic, 0.5 / safe**2, torch.zeros_like(std))
    const = torch.where(stochastic, -torch.log(safe) - _LOG_SQRT_2PI, torch.zeros_like(std))
    return _reduce(const - (x - mean) ** 2 * inv_two_var, reduce)


def take_step(
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    prev_sample: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    reduce: str = "mean",
    dtype: Optional[torch.dtype] = None,
) -> StepOutput:
    """Draw x_{t-1} = μ + σ z, z ~ N(0, I) (``noise`` or drawn from ``generator``), or score a given
    ``prev_sample``; the log-prob is that of the stored sample (cast to ``dtype``), detached."""
    if prev_sample is None:
        if noise is not None and generator is not None:
            raise ValueError("take_step: pass either `noise` or `generator`, not both")
        if noise is None:
            noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        prev_sample = mean + std * noise
        if dtype is not None:
            prev_sample = prev_sample.to(dtype)
    elif noise is not None or generator is not None:
        raise ValueError("take_step: `prev_sample` is scored as given; `noise`/`generator` must be None")
    log_prob = step_log_prob(prev_sample.detach(), mean, std, reduce)
    return StepOutput(prev_sample=prev_sample, mean=mean, std=std, log_prob=log_prob)


# --------------------------------------------------------------------------------------- DDIM
def x0_and_eps(
    prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor, alpha_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂0 and ε̂ from ε-, v- or x0-prediction (x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε; v = √ᾱ_t ε − √(1−ᾱ_t) x0)."""
    beta_t = 1 - alpha_t
    if prediction_type == "epsilon":
        return (sample - beta_t**0.5 * model_output) / alpha_t**0.5, model_output
    if prediction_type == "v_prediction":
        return (alpha_t**0.5 * sample - beta_t**0.5 * model_output, alpha_t**0.5 * model_output + beta_t**0.5 * sample)
    if prediction_type == "sample":
        return model_output, (sample - alpha_t**0.5 * model_output) / beta_t**0.5
    raise ValueError(f"DDIM: unsupported prediction_type {prediction_type!r}; supported: epsilon, v_prediction, sample")


def ddim_distribution(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    *,
    eta: float,
    use_clipped_model_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DDIM step (Song et al. 2021, eqs. 12 and 16) as ``(mean, std)``; docs/sampling.md, "One transition API".

    x̂0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t (or from v / x0); σ_t = η √((1−ᾱ_{t−1})/(1−ᾱ_t)) √(1−ᾱ_t/ᾱ_{t−1});
    μ = √ᾱ_{t−1} x̂0 + √(1−ᾱ_{t−1}−σ_t²) ε̂. The previous timestep is t − T_train/N; below 0 it
    uses ``final_alpha_cumprod``, x̂0 is thresholded or clipped per the scheduler config, and
    ``use_clipped_model_output`` re-derives ε̂, all exactly as ``DDIMScheduler.step``.

    One difference from diffusers, where it gives NaN: for η ≤ 1, 1 − ᾱ_{t−1} − σ_t² =
    (1−ᾱ_{t−1})/(1−ᾱ_t) · [(1−ᾱ_t) − η²(1−ᾱ_t/ᾱ_{t−1})] ≥ 0, and it is exactly 0 at η = 1 when
    ᾱ_t = 0 (the first step of a zero-terminal-SNR schedule). In float it can round to −1 ulp, whose
    square root is NaN (in ``DDIMScheduler.step`` too, depending on the CPU's rounding); it is
    clamped at 0 here, so that step stays finite. η > 1 (not a DDIM process, and a truly negative
    term) is refused rather than clamped.

    The math runs in float32 whatever the model's dtype (``model_output`` and ``sample`` are cast
    first): in bf16 the mean's rounding (~3 significant digits) would enter log π and the PPO ratio.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("DDIM: call scheduler.set_timesteps(...) before stepping")
    if not 0 <= eta <= 1:
        raise ValueError(f"DDIM: eta must be in [0, 1] (1 is DDPM's variance), got {eta}")
    timestep = int(timestep)
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_t = scheduler.alphas_cumprod[timestep]
    alpha_prev = scheduler.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else scheduler.final_alpha_cumprod
    model_output, sample = model_output.float(), sample.float()  # the step math in fp32, also for a bf16 model
    x0, eps = x0_and_eps(scheduler.config.prediction_type, model_output, sample, alpha_t)
    if scheduler.config.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    if use_clipped_model_output:
        eps = (sample - alpha_t**0.5 * x0) / (1 - alpha_t) ** 0.5
    std = eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)) ** 0.5
    direction = torch.clamp(1 - alpha_prev - std**2, min=0)  # ≥ 0 in exact arithmetic (η ≤ 1)
    mean = alpha_prev**0.5 * x0 + direction**0.5 * eps
    return mean, std


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    *,
    eta: float,
    prev_sample: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    reduce: str = "mean",
    use_clipped_model_output: bool = False,
) -> StepOutput:
    """``DDIMScheduler.step(model_output, timestep, sample, eta=η, variance_noise=noise)`` plus the
    log-density of x_{t-1} (drawn, or the given ``prev_sample`` when recomputing)."""
    mean, std = ddim_distribution(
        scheduler, model_output, timestep, sample, eta=eta, use_clipped_model_output=use_clipped_model_output
    )
    return take_step(
        mean, std, prev_sample=prev_sample, noise=noise, generator=generator, reduce=reduce, dtype=sample.dtype
    )


# ------------------------------------------------------------------------------ flow-matching SDE
def flow_sde_distribution(
    scheduler: FlowMatchEulerDiscreteScheduler,
    model_output: torch.Tensor,
    step_index: int,
    sample: torch.Tensor,
    *,
    noise_level: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-GRPO's SDE step for rectified flow (x_t = (1−t) x0 + t ε, v ≈ ε − x0) as float32 ``(mean, std)``.

    With t = sigmas[i], Δ = sigmas[i+1] − t < 0 and σ_t = a √(t/(1−t)):
    mean = x_t + [v + σ_t²/(2t) (x_t + (1−t) v)] Δ, std = σ_t √|Δ| (docs/sampling.md, "One transition API").
    It keeps the ODE's marginals; a = 0 is exactly ``FlowMatchEulerDiscreteScheduler.step``.
    At t = 1 (SD3's first sigma) t/(1−t) is infinite; as Flow-GRPO does, the denominator then uses
    sigmas[1], the largest sigma below 1, so the first step has σ = a/√(1−sigmas[1]).
    """
    if scheduler.config.stochastic_sampling:
        raise ValueError(
            "flow_sde: the scheduler has stochastic_sampling=True, a different sampler; "
            "set it to False (the SDE's noise comes from noise_level)"
        )
    sigmas = scheduler.sigmas
    t, t_next = sigmas[step_index], sigmas[step_index + 1]
    dt = t_next - t
    t_den = torch.where(t >= 1, sigmas[1], t)  # Flow-GRPO's guard of the first step
    sigma = noise_level * (t / (1 - t_den)) ** 0.5
    x, v = sample.float(), model_output.float()  # fp32 like diffusers' step (bf16 overflows here)
    drift = v + sigma**2 / (2 * t) * (x + (1 - t) * v)
    return x + drift * dt, sigma * (-dt) ** 0.5


def flow_sde_step_with_logprob(
    scheduler: FlowMatchEulerDiscreteScheduler,
    model_output: torch.Tensor,
    step_index: int,
    sample: torch.Tensor,
    *,
    noise_level: float,
    prev_sample: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    reduce: str = "mean",
) -> StepOutput:
    """One SDE step x_t → x_{t+Δ} with its log-density. ``step_index`` indexes ``scheduler.sigmas``
    (diffusers' own ``step`` keeps it as internal state; this function is stateless)."""
    mean, std = flow_sde_distribution(scheduler, model_output, step_index, sample, noise_level=noise_level)
    return take_step(
        mean, std, prev_sample=prev_sample, noise=noise, generator=generator, reduce=reduce, dtype=model_output.dtype
    )


# ---------------------------------------------------------------------------------- registry
#: ``(scheduler, model_output, step_index, x_t, noise_scale) -> (mean, std)``
Distribution = Callable[[object, torch.Tensor, int, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class Transition:
    """A registered transition: its scheduler class, its step distribution, its noise-scale key."""

    scheduler_cls: type
    distribution: Distribution
    scale_key: str  # the SamplerConfig field holding its noise scale


def _ddim_at(
    scheduler: DDIMScheduler, model_output: torch.Tensor, step_index: int, sample: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return ddim_distribution(scheduler, model_output, scheduler.timesteps[step_index], sample, eta=eta)


def _flow_sde_at(
    scheduler: FlowMatchEulerDiscreteScheduler,
    model_output: torch.Tensor,
    step_index: int,
    sample: torch.Tensor,
    noise_level: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return flow_sde_distribution(scheduler, model_output, step_index, sample, noise_level=noise_level)


TRANSITIONS: dict[str, Transition] = {
    "ddim": Transition(DDIMScheduler, _ddim_at, "eta"),
    "flow_sde": Transition(FlowMatchEulerDiscreteScheduler, _flow_sde_at, "noise_level"),
}


def transition_for(scheduler: object) -> str:
    """The name of the transition for a scheduler's class; a clear error for unsupported ones."""
    for name, transition in TRANSITIONS.items():
        if type(scheduler) is transition.scheduler_cls:
            return name
    supported = ", ".join(f"{t.scheduler_cls.__name__} ({n})" for n, t in TRANSITIONS.items())
    raise TypeError(
        f"no log-prob transition for scheduler {type(scheduler).__name__}; supported: {supported}. "
        f"Swap it with e.g. `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`."
    )

"""Critic steering as modifiers of the sampler (the one hook protocol, align/modifiers/protocol.py).

Both act on the step's Gaussian (mean μ, std σ) before it is drawn, with an exported critic
V_k(x_t, t, c) in normalised-return units and reward weights w_k:

* :class:`CriticGrad` (``grad``): μ ← μ + s · ∇_{x_t} Σ_k w_k V_k(x_t, t, c), the gradient taken at
  x_t (the state the step starts from, what the critic was trained on); the stored log-prob is
  that of the shifted step. s = 0 leaves every step bit-identical (the gradient is still computed).
* :class:`CriticRerank` (``rerank``): at each chosen step i < T−1, M candidates x' ~ N(μ, σ²) from
  its own generator, scored by Σ_k w_k V_k(x', t_{i+1}, c); the best is kept as a point mass
  (σ = 0, log-prob 0). The last step is never reranked (x_0 is no state of the critic).

c is the batch's conditional embeddings as the sampler stores them (after the other modifiers'
embeds hooks). The critic shares the denoiser, so both run their hook with the stock attention
processors (``stock_attention``): with ``sym_attn`` in the stack the critic still reads the features
it was trained on. They are made in code (they hold a loaded critic), not from config, so a
trajectory does not record them; :func:`critics.steering.sample_steered` appends them last.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

import torch
from diffusers.utils.torch_utils import randn_tensor

from align.modifiers.protocol import Modifier
from align.sampling.hooks import StepContext, TransitionHook

if TYPE_CHECKING:
    from critics.export import LoadedCritic

COND_KEYS = ("prompt_embeds", "pooled_prompt_embeds")


def critic_cond(embeds: dict) -> dict:
    """The critic's conditioning c: the conditional branch's embeddings."""
    return {k: embeds.get(k) for k in COND_KEYS}


def grad_step(
    critic: LoadedCritic,
    weights: torch.Tensor,
    scale: float,
    mean: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: dict,
) -> torch.Tensor:
    """μ + s · ∇_{x_t} Σ_k w_k V_k(x_t, t, c)."""
    with torch.enable_grad():
        x = x_t.detach().clone().requires_grad_(True)
        objective = (critic.values(x, t, cond) * weights.to(x)).sum()
        (grad,) = torch.autograd.grad(objective, x)
    return mean + scale * grad.to(mean.dtype)


def _acts(step: int, steps: list) -> bool:
    return not steps or step in steps


@dataclasses.dataclass(eq=False)
class CriticGrad(Modifier):
    """``grad`` steering: μ ← μ + s · ∇_{x_t} Σ_k w_k V_k(x_t, t, c) on ``steps`` (empty: every step)."""

    critic: LoadedCritic
    weights: torch.Tensor  # (K,) w_k
    scale: float = 1.0
    steps: list = dataclasses.field(default_factory=list)
    name = "steer_grad"
    needs_grad = True
    stock_attention = True

    def transition(self, pipe) -> Optional[TransitionHook]:
        def hook(mean: torch.Tensor, std: torch.Tensor, step: StepContext):
            if not _acts(step.step_index, self.steps):
                return mean, std
            cond = critic_cond(step.embeds)
            return grad_step(self.critic, self.weights, self.scale, mean, step.sample, step.timestep, cond), std

        return hook


@dataclasses.dataclass(eq=False)
class CriticRerank(Modifier):
    """``rerank`` steering: keep the best of ``candidates`` draws of each chosen step (point mass)."""

    critic: LoadedCritic
    weights: torch.Tensor  # (K,) w_k
    generator: torch.Generator  # the candidates' noise (keeps the sampler's stream intact)
    candidates: int = 4
    steps: list = dataclasses.field(default_factory=list)
    name = "steer_rerank"
    stock_attention = True

    def transition(self, pipe) -> Optional[TransitionHook]:
        m = self.candidates

        def hook(mean: torch.Tensor, std: torch.Tensor, step: StepContext):
            i, timesteps = step.step_index, pipe.scheduler.timesteps
            if i + 1 >= len(timesteps) or not _acts(i, self.steps):
                return mean, std
            shape = (m, *mean.shape)
            noise = randn_tensor(shape, generator=self.generator, device=mean.device, dtype=mean.dtype)
            cands = mean[None] + std * noise  # (M, B, C, h, w)
            cond = {
                k: None if v is None else v.repeat(m, *[1] * (v.ndim - 1)) for k, v in critic_cond(step.embeds).items()
            }
            values = self.critic.values(cands.flatten(0, 1), timesteps[i + 1], cond)  # (M·B, K), candidate-major
            score = (values * self.weights.to(values)).sum(-1).view(m, -1)  # (M, B)
            best = cands[score.argmax(0), torch.arange(mean.shape[0], device=mean.device)]
            return best, torch.zeros_like(torch.as_tensor(std))

        return hook

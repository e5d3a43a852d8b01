"""Inference-time steering with an exported critic (docs/critic_format.md §Steering), by name.

Every mode samples with the project's log-prob sampler and the caller's modifier stack
(``sampler.modifiers``); ``grad`` and ``rerank`` append their modifier to it
(:mod:`critics.steer_modifiers`, the one hook protocol), so they combine with StayFair and
symmetric attention:

* ``none``: plain sampling (the baseline).
* ``grad``: classifier-guidance style, on the step's mean (so the stored log-prob is that of the
  step actually drawn):  μ ← μ + s · ∇_{x_t} Σ_k w_k V_k(x_t, t, c).
  The gradient is taken at x_t, the state the step starts from, i.e. exactly the (x_t, t, c) the
  critic was trained on (V is not evaluated at μ). V is in normalised-return units (z-scores of
  each reward) and w_k are the run's reward weights (overridable); no extra σ_t² factor, so s is
  latent units per unit of normalised value. s = 0 leaves every step bit-identical (tested).
* ``rerank``: at each chosen step i < T−1, draw M candidates x_{t_{i+1}} ~ N(μ, σ²) from a
  separate generator, score each by Σ_k w_k V_k(x_{t_{i+1}}, t_{i+1}, c) and keep the best. The
  kept step is a selection, not a Gaussian draw: it is recorded as a point mass (log-prob 0).
  The last step is never reranked (its output x_0 has no training state of the critic).
* ``best_of_n``: N whole chains per image; keep the one whose last state scores best by
  V(x_{t_last}, t_last) ("V at t = 1": the last state the critic was trained on).

Cost: ``grad`` adds one critic forward + backward per steered step, ``rerank`` M critic forwards
per chosen step (no extra denoiser calls), ``best_of_n`` N× the denoiser calls + N critic rows.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch

from align.config import field
from align.modifiers.protocol import ModifierStack, build_modifiers
from align.sampling import SamplerConfig, Trajectory, sample_trajectory
from critics.export import LoadedCritic
from critics.steer_modifiers import COND_KEYS, CriticGrad, CriticRerank, grad_step

__all__ = [
    "COND_KEYS",
    "STEERING",
    "CriticGrad",
    "CriticRerank",
    "SteerContext",
    "SteeredBatch",
    "SteeringConfig",
    "final_values",
    "grad_step",
    "register_steering",
    "sample_steered",
]


@dataclasses.dataclass
class SteerContext:
    """What a steering mode needs besides the pipeline and prompts."""

    critic: Optional[LoadedCritic]
    weights: Optional[torch.Tensor]  # (K,) w_k
    cfg: SteeringConfig
    candidate_generator: torch.Generator  # rerank's candidate noise (keeps the sampler's stream intact)
    modifiers: ModifierStack  # the caller's stack (built from sampler.modifiers); a mode may extend it


SteerFn = Callable[..., Trajectory]
STEERING: dict[str, SteerFn] = {}


def register_steering(name: str) -> Callable[[SteerFn], SteerFn]:
    def wrap(fn: SteerFn) -> SteerFn:
        STEERING[name] = fn
        return fn

    return wrap


@register_steering("none")
def steer_none(
    pipe, prompts: list[str], config: SamplerConfig, generator: torch.Generator, ctx: SteerContext
) -> Trajectory:
    return sample_trajectory(pipe, prompts, config, generator, modifiers=ctx.modifiers)


@register_steering("grad")
def steer_grad(
    pipe, prompts: list[str], config: SamplerConfig, generator: torch.Generator, ctx: SteerContext
) -> Trajectory:
    grad = CriticGrad(ctx.critic, ctx.weights, ctx.cfg.scale, list(ctx.cfg.steps))
    return sample_trajectory(pipe, prompts, config, generator, modifiers=ctx.modifiers.extended(grad))


@register_steering("rerank")
def steer_rerank(
    pipe, prompts: list[str], config: SamplerConfig, generator: torch.Generator, ctx: SteerContext
) -> Trajectory:
    rerank = CriticRerank(ctx.critic, ctx.weights, ctx.candidate_generator, ctx.cfg.candidates, list(ctx.cfg.steps))
    return sample_trajectory(pipe, prompts, config, generator, modifiers=ctx.modifiers.extended(rerank))


@register_steering("best_of_n")
def steer_best_of_n(
    pipe, prompts: list[str], config: SamplerConfig, generator: torch.Generator, ctx: SteerContext
) -> Trajectory:
    n = ctx.cfg.candidates
    traj = sample_trajectory(pipe, [p for p in prompts for _ in range(n)], config, generator, modifiers=ctx.modifiers)
    values = final_values(ctx.critic, traj)
    score = (values * ctx.weights.to(values)).sum(-1).view(len(prompts), n)
    return traj.select((torch.arange(len(prompts), device=score.device) * n + score.argmax(1)).cpu())


def final_values(critic: LoadedCritic, traj: Trajectory) -> torch.Tensor:
    """V_k(x_{t_last}, t_last, c): the critic's prediction of each image's normalised rewards, (B, K)."""
    with torch.no_grad():
        cond = {k: getattr(traj, k) for k in COND_KEYS}
        return critic.values(traj.latents[:, -2], traj.timesteps[-1], cond).float()


@dataclasses.dataclass
class SteeringConfig:
    """``steering:`` section of `align sample` (CLI: --critic, --steer, --scale, --candidates, --force)."""

    critic: str = field(
        "", path="dir", help="exported critic directory (`align export` → OUT/critic); empty: no critic"
    )
    steer: str = field(
        "none",
        choices=tuple(STEERING),
        help="none | grad (∇V on the step mean) | rerank (best of M candidate steps) | "
        "best_of_n (best of N chains by V at the last state)",
    )
    scale: float = field(1.0, help="grad: s in μ ← μ + s ∇_{x_t} Σ_k w_k V_k")
    candidates: int = field(4, help="rerank: M candidates per chosen step; best_of_n: N chains per image")
    steps: list = field(default_factory=list, help="step indices 0..T-1 where grad/rerank act; empty: all")
    weights: list = field(
        default_factory=list,
        help="per-reward weight overrides [{name, weight}] (default: the "
        "run's; the old name:weight strings are still read)",
    )
    force: bool = field(False, help="load the critic onto a base whose fingerprint differs (deliberate transfer)")
    score_rewards: bool = field(True, help="score each image with the critic's reward plugins (JSON: rewards)")

    def validate(self) -> None:
        if self.steer != "none" and not self.critic:
            raise ValueError(f"steer={self.steer!r} needs a critic directory (steering.critic / --critic)")
        if self.steer in ("rerank", "best_of_n") and self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")
        if self.scale != self.scale or abs(self.scale) == float("inf"):
            raise ValueError(f"scale must be finite, got {self.scale}")
        bad = [s for s in self.steps if not isinstance(s, int) or s < 0]
        if bad:
            raise ValueError(f"steps must be step indices >= 0, got {bad[0]!r}")


@dataclasses.dataclass
class SteeredBatch:
    traj: Trajectory
    values: Optional[torch.Tensor]  # (B, K) final_values, None without a critic
    critic_rows: int  # critic rows evaluated by the steering itself (not by final_values)


def sample_steered(
    pipe,
    prompts: list[str],
    config: SamplerConfig,
    generator: torch.Generator,
    critic: Optional[LoadedCritic],
    cfg: SteeringConfig,
    candidate_generator: Optional[torch.Generator] = None,
    weights: Optional[Sequence[str]] = None,
    modifiers: Optional[ModifierStack] = None,
) -> SteeredBatch:
    """Sample ``prompts`` with steering mode ``cfg.steer`` on top of ``modifiers`` (None: the stack of
    ``config.modifiers``, built here); values of the results if there is a critic."""
    if cfg.steer not in STEERING:
        raise ValueError(f"unknown steering mode {cfg.steer!r}; available: {', '.join(STEERING)}")
    if cfg.steer != "none" and critic is None:
        raise ValueError(f"steering mode {cfg.steer!r} needs a critic (steering.critic / --critic)")
    stack = modifiers if modifiers is not None else build_modifiers(config.modifiers)
    w = critic.weights_with(cfg.weights if weights is None else weights) if critic is not None else None
    gen2 = candidate_generator or torch.Generator().manual_seed(generator.initial_seed() + 1)
    before = critic.rows if critic is not None else 0
    traj = STEERING[cfg.steer](pipe, prompts, config, generator, SteerContext(critic, w, cfg, gen2, stack))
    rows = (critic.rows - before) if critic is not None else 0
    values = final_values(critic, traj) if critic is not None else None
    return SteeredBatch(traj, values, rows)

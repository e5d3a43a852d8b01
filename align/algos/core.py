"""Advantage estimators and losses as plain functions (CleanRL / verl style; docs/algorithms.md, "Algorithms:
one registered object each").

Indexing along the denoising chain: step i (0 ≤ i < T) moves x_{(i)} = ``latents[:, i]`` to
``latents[:, i + 1]``; the state of step i is s_i = (x_{(i)}, t_i, c); the reward R(x_0, c) arrives
after the last step, and γ = 1.
"""

from __future__ import annotations

from typing import Optional

import torch


def gae_along_chain(values: torch.Tensor, rewards: torch.Tensor, lam: float) -> torch.Tensor:
    """GAE(λ) (Schulman et al., ICLR 2016) along the denoising chain, γ = 1: ECG's advantages
    (docs/algorithms.md, "Algorithms: one registered object each").

    δ_i = V(s_{i+1}) − V(s_i) for inner steps and δ_{T−1} = R − V(s_{T−1}) for the last one;
    A_i = Σ_{l ≥ 0} λ^l δ_{i+l}. λ = 1 gives A_i = R − V(s_i) (Monte Carlo with a value baseline),
    λ = 0 gives one-step TD errors. ``values``: (B, T), ``rewards``: (B,) → advantages (B, T).
    """
    if values.ndim != 2 or rewards.shape != values.shape[:1]:
        raise ValueError(
            f"gae_along_chain: values must be (B, T) and rewards (B,), got "
            f"{tuple(values.shape)} and {tuple(rewards.shape)}"
        )
    next_values = torch.cat([values[:, 1:], rewards[:, None]], dim=1)
    deltas = next_values - values
    adv = torch.zeros_like(values)
    running = torch.zeros_like(rewards)
    for i in range(values.shape[1] - 1, -1, -1):
        running = deltas[:, i] + lam * running
        adv[:, i] = running
    return adv


def ppo_clip_loss(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate: mean over elements of max(−A ρ, −A clip(ρ, 1−ε, 1+ε)), ρ = exp(log π − log π_old).

    Returns the loss and detached stats: ``clip_frac`` (share of elements where the clipped branch
    is the active maximum) and ``approx_kl`` = mean((ρ − 1) − log ρ) (Schulman's k3 estimator).
    """
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "clip_frac": (clipped > unclipped).float().mean(),
            "approx_kl": ((ratio - 1) - log_ratio).mean(),
            "ratio_mean": ratio.mean(),
        }
    return loss, stats


def value_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    old_pred: Optional[torch.Tensor] = None,
    clip_range: Optional[float] = None,
) -> torch.Tensor:
    """0.5 (V − G)², optionally PPO-style clipped around the rollout-time prediction ``old_pred``."""
    loss = (pred - target) ** 2
    if clip_range is not None and old_pred is not None:
        clipped = old_pred + torch.clamp(pred - old_pred, -clip_range, clip_range)
        loss = torch.maximum(loss, (clipped - target) ** 2)
    return 0.5 * loss.mean()


def kl_to_reference(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(π_θ ‖ π_ref) per step from log-probs of the same samples (≥ 0)."""
    log_ratio = ref_log_probs - log_probs
    return (torch.exp(log_ratio) - 1 - log_ratio).mean()


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 − Var[G − V]/Var[G]; 1 is perfect, 0 is no better than a constant, NaN if Var[G] = 0."""
    var = target.float().var(unbiased=False)
    if var == 0:
        return float("nan")
    return float(1 - (target.float() - pred.float()).var(unbiased=False) / var)


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group baseline: (R − mean_group R) / (std_group R + eps) for G samples per prompt."""
    adv = torch.empty_like(rewards)
    for g in torch.unique(group_ids):
        mask = group_ids == g
        r = rewards[mask]
        std = r.std(unbiased=False) if r.numel() > 1 else torch.zeros((), dtype=r.dtype)
        adv[mask] = (r - r.mean()) / (std + eps)
    return adv


class RunningMeanStd:
    """Running mean/variance (Chan et al. parallel update), for per-reward normalisation."""

    def __init__(self, eps: float = 1e-4) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, eps

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        batch_mean, batch_var, n = float(x.mean()), float(x.var(unbiased=False)), x.numel()
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    def normalise(self, x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        return (x - self.mean) / (self.var**0.5 + eps)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


class PerPromptStatTracker:
    """DDPO's per-prompt reward normalisation: (R − mean_p)/(std_p + eps) over a window of the
    last ``buffer_size`` rewards of prompt p; falls back to batch stats below ``min_count``."""

    def __init__(self, buffer_size: int = 32, min_count: int = 16) -> None:
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, list[float]] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        adv = torch.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False) + 1e-6
        for p in set(prompts):
            idx = [i for i, q in enumerate(prompts) if q == p]
            buf = self.buffers.setdefault(p, [])
            buf.extend(float(rewards[i]) for i in idx)
            del buf[: -self.buffer_size]
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                t = torch.tensor(buf, dtype=rewards.dtype)
                mean, std = t.mean(), t.std(unbiased=False) + 1e-6
            adv[idx] = (rewards[idx] - mean) / std
        return adv

    def state_dict(self) -> dict:
        return {"buffers": self.buffers}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {k: list(v) for k, v in state["buffers"].items()}

"""Advantage estimators by algorithm name (a registry, not an if/elif chain).

Each takes the rollout's normalised per-reward scores and returns per-step advantages (B, T).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from align.algos.core import PerPromptStatTracker, gae_along_chain, grpo_advantages


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / (x.std(unbiased=False) + 1e-8)


def ecg_advantages(scores: torch.Tensor, weights: torch.Tensor, num_steps: int, *, values: torch.Tensor,
                   gae_lambda: float, **_) -> torch.Tensor:
    """ECG: per reward head k, GAE(λ) on V_k along the chain, normalised per reward, then Σ_k w_k Â_k.

    ``scores`` (B, K) are the normalised rewards (the value targets), ``values`` (B, T, K).
    """
    heads = [_normalise(gae_along_chain(values[..., k], scores[:, k], gae_lambda)) for k in range(scores.shape[1])]
    return torch.stack(heads, dim=-1) @ weights


def grpo_advantages_per_step(scores: torch.Tensor, weights: torch.Tensor, num_steps: int, *,
                             group_ids: torch.Tensor, **_) -> torch.Tensor:
    """GRPO: group-normalised weighted reward of G samples per prompt, the same at every step."""
    adv = grpo_advantages(scores @ weights, group_ids)
    return adv[:, None].expand(-1, num_steps)


def ddpo_advantages(scores: torch.Tensor, weights: torch.Tensor, num_steps: int, *, prompts: list[str],
                    tracker: Optional[PerPromptStatTracker], **_) -> torch.Tensor:
    """DDPO: per-prompt running normalisation of the weighted reward, the same at every step."""
    if tracker is None:
        raise ValueError("ddpo needs a PerPromptStatTracker")
    adv = tracker.update(prompts, scores @ weights)
    return adv[:, None].expand(-1, num_steps)


ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {"ecg": ecg_advantages, "grpo": grpo_advantages_per_step,
                                                       "ddpo": ddpo_advantages}

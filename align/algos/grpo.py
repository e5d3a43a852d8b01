"""GRPO: G samples per prompt, the group-normalised weighted reward as every step's advantage."""

from __future__ import annotations

import torch

from align.algos.batch import Batch
from align.algos.core import grpo_advantages
from align.algos.registry import Algorithm, register_algorithm


def grpo_step_advantages(
    targets: torch.Tensor, weights: torch.Tensor, group_ids: torch.Tensor, num_steps: int
) -> torch.Tensor:
    """A_i = (R − mean_g R) / (std_g R + ε) for R = Σ_k w_k G_k, the same at each of the T steps: (B, T)."""
    return grpo_advantages(targets @ weights, group_ids)[:, None].expand(-1, num_steps)


@register_algorithm
class GRPO(Algorithm):
    name = "grpo"
    needs_critic = False

    def advantages(self, batch: Batch, weights: torch.Tensor) -> torch.Tensor:
        return grpo_step_advantages(batch.targets, weights, batch.group_ids, batch.num_steps)

"""DDPO: per-prompt running normalisation of the raw weighted reward (its stat tracker), no critic."""

from __future__ import annotations

import torch

from align.algos.batch import Batch
from align.algos.core import PerPromptStatTracker
from align.algos.registry import Algorithm, register_algorithm


def ddpo_step_advantages(
    raw: torch.Tensor, weights: torch.Tensor, prompts: list[str], tracker: PerPromptStatTracker, num_steps: int
) -> torch.Tensor:
    """A_i = (R − mean_p) / (std_p + ε) over prompt p's recent raw rewards R = Σ_k w_k R_k, the same at each
    of the T steps: (B, T). Raw, not running-normalised, rewards: the tracker's window would otherwise
    mix scores normalised with different (drifting) all-time statistics."""
    return tracker.update(prompts, raw @ weights)[:, None].expand(-1, num_steps)


@register_algorithm
class DDPO(Algorithm):
    name = "ddpo"
    needs_critic = False

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.tracker = PerPromptStatTracker()

    def advantages(self, batch: Batch, weights: torch.Tensor) -> torch.Tensor:
        return ddpo_step_advantages(batch.raw, weights, batch.prompts, self.tracker, batch.num_steps)

    def state_dict(self) -> dict:
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state)

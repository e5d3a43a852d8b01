"""``Batch``: the one record an iteration of `align train` fills in, from collection to update.

Shapes: B samples in the whole batch (prompts × G), B_r = B / N on this learner rank, T denoising
steps, K rewards. Fields over the whole batch are the same on every rank; ``traj`` is this rank's
shard ``[shard]`` of it (align/distributed.py).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from align.sampling import Trajectory


@dataclasses.dataclass
class Batch:
    traj: Trajectory  # this rank's B_r chains: latents (B_r, T+1, C, h, w) x_T … x_0, log_probs (B_r, T)
    #                           log π_old(x_{t-1} | x_t, c) of each step taken, prompt embeddings; no pixels
    prompts: list[str]  # (B,) prompts, each repeated G times (grouped)
    group_ids: torch.Tensor  # (B,) long: index of each sample's prompt group
    raw: torch.Tensor  # (B, K) raw rewards R_k(x_0, c)
    targets: torch.Tensor  # (B, K) running-normalised returns G_k (value targets; γ = 1, reward at the end)
    shard: slice  # this rank's samples of the B
    values: Optional[torch.Tensor] = None  # (B, T, K) V_k(s_i) before this iteration's update; None: no critic
    advantages: Optional[torch.Tensor] = None  # (B, T) weighted advantages A_i of each step

    @property
    def num_steps(self) -> int:
        return self.traj.num_steps

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole-batch tensor (B, …) → (B_r, …)."""
        return x[self.shard]

"""The in-process rollout group (``ray.num_rollout_workers=0``): the seeded requests of align/rollout/requests.py
served by one :class:`~align.rollout.worker.RolloutWorker` that shares the learner's pipeline."""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from align.rollout.requests import SyncStats, make_requests
from align.rollout.worker import RolloutWorker
from align.sampling import Trajectory


class LocalRollouts:
    """``ray.num_rollout_workers=0``: the same requests served in-process by one ``RolloutWorker``
    that shares the learner's pipeline (weight sync only stamps the version)."""

    def __init__(self, worker: RolloutWorker, chunk_size: int) -> None:
        self.worker, self.chunk_size = worker, chunk_size
        self.reissued = 0

    def rollout(
        self,
        prompts: list[str],
        seed: int,
        on_dispatch: Optional[Callable[[], None]] = None,
        group_size: int = 0,
    ) -> Trajectory:
        """One trajectory per prompt; ``group_size`` > 0: consecutive groups of that size share x_T."""
        requests = make_requests(prompts, seed, self.chunk_size, self.worker.sampler, group_size)
        parts = [self.worker.rollout(r.prompts, r.seed, r.sde_steps, r.latent_seeds) for r in requests]
        return Trajectory.cat(parts)

    def set_policy(self, state: Optional[dict[str, torch.Tensor]], version: int) -> SyncStats:
        t0 = time.perf_counter()
        self.worker.set_policy(None, version)
        return SyncStats(version, 0, time.perf_counter() - t0)

    def close(self) -> None:
        pass

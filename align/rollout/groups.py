"""The driver's view of rollout and reward workers: one context manager that starts them (local
Ray or a cluster, or in-process when ``ray.num_*_workers=0``) and shuts down what it started."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional, Sequence

import torch

from align.rollout.local import LocalRollouts
from align.rollout.worker import RolloutWorker


@dataclasses.dataclass
class LocalRewards:
    """Score in the driver process with already-built reward plugins."""

    rewards: Sequence

    def score(self, images: torch.Tensor, prompts: list[str], prompt_metadata: Optional[list] = None) -> torch.Tensor:
        from rewards import score

        return score(self.rewards, images, prompts, prompt_metadata=prompt_metadata)[0]

    def close(self) -> None:
        pass


@dataclasses.dataclass
class Workers:
    rollouts: object  # LocalRollouts | RayRollouts: rollout(prompts, seed), set_policy(state, version)
    rewards: object  # LocalRewards | RayRewards: score(images, prompts, prompt_metadata=None) -> (B, K)


@contextlib.contextmanager
def start_workers(cfg, worker: RolloutWorker, reward_fns: Sequence) -> Iterator[Workers]:
    """Rollout and reward workers as ``cfg.ray`` asks; Ray only if some group has actors."""
    r = cfg.ray
    started_ray = False
    opened: list = []
    try:
        if r.num_rollout_workers or r.num_reward_workers:
            from align.rollout.ray_group import connect

            started_ray = connect(
                r.address,
                r.num_rollout_workers * r.cpus_per_rollout_worker + r.num_reward_workers * r.cpus_per_reward_worker,
            )
        if r.num_rollout_workers:
            from align.rollout.ray_group import RayRollouts

            rollouts = RayRollouts(cfg)
        else:
            rollouts = LocalRollouts(worker, r.chunk_size)
        opened.append(rollouts)
        if r.num_reward_workers:
            from align.rollout.ray_group import RayRewards

            rewards = RayRewards(cfg)
        else:
            rewards = LocalRewards(reward_fns)
        opened.append(rewards)
        yield Workers(rollouts, rewards)
    finally:
        for group in reversed(opened):
            group.close()
        if started_ray:
            import ray

            ray.shutdown()

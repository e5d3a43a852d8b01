"""Rollout workers: hold a policy copy, sample trajectories, accept LoRA weight updates.

``RolloutWorker`` (in-process, no Ray); Ray actor groups in ``ray_group`` (Ray imported lazily);
``start_workers`` picks and starts them from ``cfg.ray``."""

from align.rollout.groups import LocalRewards, Workers, start_workers
from align.rollout.local import LocalRollouts
from align.rollout.requests import Request, SyncStats, chunk_seed, make_requests
from align.rollout.worker import RolloutWorker

__all__ = [
    "LocalRewards",
    "LocalRollouts",
    "Request",
    "RolloutWorker",
    "SyncStats",
    "Workers",
    "chunk_seed",
    "make_requests",
    "start_workers",
]

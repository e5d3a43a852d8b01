"""Rollout workers: hold a policy copy, sample trajectories, accept LoRA weight updates."""
from align.rollout.worker import RolloutWorker

__all__ = ["RolloutWorker"]

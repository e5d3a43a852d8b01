"""Reward plugins for the distributed tests, registered in every Ray worker by the setup hook
``distributed_plugins.register`` (tests/test_distributed.py starts Ray with it)."""

from __future__ import annotations

import torch

from rewards import register_reward


class RaisingReward:
    """A plugin whose model 'crashes' on every batch."""

    name = "test_raising_reward"

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: dict) -> torch.Tensor:
        raise RuntimeError("reward model crashed")


def register() -> None:
    register_reward("test_raising_reward")(RaisingReward)


register()

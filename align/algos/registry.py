"""The algorithm registry: each RL algorithm is one registered object (align/algos/{ecg,grpo,ddpo}.py).

An algorithm declares whether it needs a critic, estimates advantages from the batch record with its
own explicit advantage function, runs its update through the shared learner, and owns whatever
state it carries across iterations (DDPO's per-prompt tracker, ECG's value pretraining and replay).
The driver (align/train.py) never branches on the algorithm's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar

import torch

from align.algos.batch import Batch

POLICY, VALUE_PRETRAIN = "policy", "value-pretrain"


class Algorithm:
    """Critic-free default: every iteration is a policy update on the batch's advantages."""

    name: ClassVar[str] = ""
    needs_critic: ClassVar[bool] = False

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def pretrains_value(self) -> bool:
        """Whether the run starts with critic-only iterations (then ``phase`` reads ``state.policy_started``)."""
        return False

    def phase(self, state) -> str:
        """What this iteration trains: ``policy`` or ``value-pretrain`` (only the critic)."""
        return POLICY

    def advantages(self, batch: Batch, weights: torch.Tensor) -> torch.Tensor:
        """(B, T) advantages of every step of the whole batch."""
        raise NotImplementedError

    def update(
        self, learner, batch: Batch, phase: str, normalise: Callable[[torch.Tensor], torch.Tensor]
    ) -> dict[str, float]:
        """One update on ``batch`` (this rank's shard); ``normalise`` maps raw scores (B, K) to value targets."""
        return learner.policy_update(batch.traj, batch.local(batch.advantages))

    def end_iteration(self, state, record: dict, log) -> None:
        """Phase changes after an iteration (ECG: value pretraining → policy)."""

    def state_dict(self) -> dict:
        """JSON state that a resume needs."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def save(self, directory: Path) -> None:
        """Tensor state that a resume needs (this rank's part)."""

    def load(self, directory: Path) -> None:
        pass


ALGORITHMS: dict[str, type[Algorithm]] = {}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: register ``cls`` under ``cls.name``."""
    if not cls.name or cls.name in ALGORITHMS:
        raise ValueError(f"register_algorithm: {cls.__name__} needs a unique name (got {cls.name!r})")
    ALGORITHMS[cls.name] = cls
    return cls


def make_algorithm(cfg) -> Algorithm:
    """The registered algorithm ``cfg.algo``, built for ``cfg``."""
    import align.algos.ddpo  # noqa: F401  (register the built-in algorithms)
    import align.algos.ecg  # noqa: F401
    import align.algos.grpo  # noqa: F401

    if cfg.algo not in ALGORITHMS:
        raise ValueError(f"algo: unknown algorithm {cfg.algo!r}; choose one of: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[cfg.algo](cfg)

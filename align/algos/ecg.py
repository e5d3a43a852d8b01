"""ECG (Liang, Zhang and Yang, arXiv 2605.27736; docs/algorithms.md, "ECG's phases and the sample budget"):
a state-aligned critic V_k(x_t, t, c), GAE(λ) along the chain, value pretraining.

Phases: ``value-pretrain`` iterations (the policy is fixed, only the critic trains, refitting every
pretraining batch so far: they all stay on-policy) until the critic's explained variance on the
late half of the chain reaches ``critic.pretrain_ev_threshold`` or ``critic.pretrain_iterations``
run out; then ``policy`` iterations, each a PPO update of the policy followed by a value update
that keeps the critic current: ``critic.value_epochs`` epochs over the last ``critic.replay_batches``
batches (the newest is on-policy, the older ones are one or two policy versions behind).

Budget: the value-pretraining iterations come *before* ``trainer.iterations`` policy iterations, so at
equal ``trainer.iterations`` ECG makes as many policy updates on as many policy-phase samples as
GRPO and DDPO; its pretraining samples are an up-front cost counted in ``samples_seen``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from align.algos.batch import Batch
from align.algos.core import gae_along_chain
from align.algos.registry import POLICY, VALUE_PRETRAIN, Algorithm, register_algorithm
from align.algos.value_replay import ValueReplay


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / (x.std(unbiased=False) + 1e-8)


def _normalise_per_step(x: torch.Tensor) -> torch.Tensor:
    """(B, T): centre and scale each step's column over the batch."""
    return (x - x.mean(dim=0)) / (x.std(dim=0, unbiased=False) + 1e-8)


#: how ECG normalises each head's GAE advantages: over all (sample, step) pairs, or per step over the batch
ADVANTAGE_NORMS = {"batch": _normalise, "step": _normalise_per_step}


def ecg_step_advantages(
    targets: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, gae_lambda: float, norm: str = "step"
) -> torch.Tensor:
    """Per reward head k, GAE(λ) of V_k along the chain, normalised (``norm``: per step over the batch, or over
    all (sample, step) pairs), then A = Σ_k w_k Â_k: (B, T). ``targets`` (B, K) are the value targets,
    ``values`` (B, T, K). Per step, a critic bias b_i = mean_j A_ij ≠ 0 would multiply the batch's mean
    score Σ_j ∇ log π(step i of j), which is pure noise as large as the whole policy gradient
    (docs/algorithms.md); centring each step removes that term, as GRPO's group mean does."""
    heads = [
        ADVANTAGE_NORMS[norm](gae_along_chain(values[..., k], targets[:, k], gae_lambda))
        for k in range(targets.shape[1])
    ]
    return torch.stack(heads, dim=-1) @ weights


@register_algorithm
class ECG(Algorithm):
    name = "ecg"
    needs_critic = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        c = cfg.critic
        self.replay = ValueReplay(max(1, c.pretrain_replay) if c.pretrain_iterations > 0 else c.replay_batches)

    def pretrains_value(self) -> bool:
        return self.cfg.critic.pretrain_iterations > 0

    def phase(self, state) -> str:
        return POLICY if state.policy_started else VALUE_PRETRAIN

    def advantages(self, batch: Batch, weights: torch.Tensor) -> torch.Tensor:
        return ecg_step_advantages(
            batch.targets, weights, batch.values, self.cfg.critic.gae_lambda, self.cfg.critic.advantage_norm
        )

    def update(
        self, learner, batch: Batch, phase: str, normalise: Callable[[torch.Tensor], torch.Tensor]
    ) -> dict[str, float]:
        """Policy PPO (policy phase only), then the critic on the replay of recent batches."""
        stats = learner.policy_update(batch.traj, batch.local(batch.advantages)) if phase == POLICY else {}
        self.replay.add(batch.traj, batch.local(batch.raw))
        fit, targets = self.replay.batch(normalise)
        epochs = self.cfg.critic.value_epochs if phase == POLICY else self.cfg.critic.pretrain_epochs
        stats.update(learner.value_update(fit, targets, epochs))
        return stats

    def end_iteration(self, state, record: dict, log) -> None:
        """Value pretraining ends once EV on the late half of the chain (held out: values predicted before
        this iteration's update) reaches the threshold, or after ``critic.pretrain_iterations``."""
        c = self.cfg.critic
        if state.policy_started or not (
            record["explained_variance_late"] >= c.pretrain_ev_threshold
            or state.value_iterations >= c.pretrain_iterations
        ):
            return
        state.policy_started = True
        self.replay.capacity = c.replay_batches
        del self.replay.batches[: -c.replay_batches]
        log(
            f"value pretraining done after {state.value_iterations} iterations (explained variance on the late half "
            f"of the chain {record['explained_variance_late']:.3f}); policy updates start"
        )

    def save(self, directory: Path) -> None:
        self.replay.save(directory)

    def load(self, directory: Path) -> None:
        self.replay.load(directory)

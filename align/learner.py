"""The learner: PPO on recomputed step log-probs for the policy, value regression for the critic.

Actor and critic update in separate passes with separate optimisers (AdamW; policy LoRA at
``trainer.lr``, critic LoRA and heads at ``critic.lr``) and separate gradient-norm clips
(``trainer.max_grad_norm``, ``critic.max_grad_norm``), so neither's gradient scale shrinks the
other's step. A pass is epochs × minibatches; per minibatch a random subset of
``trainer.timestep_fraction`` of the denoising steps is recomputed (the policy's from the first
``trainer.step_window`` of the chain), their losses' gradients
accumulate, then one clipped optimiser step. Under DeepSpeed one engine holds both parameter groups:
a pass zeroes the other group's gradients and learning rate and sets ZeRO's clip to its own.
Checkpoints are atomic safetensors + JSON (align/distributed.py ``save_learner``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator

from align.algos.core import kl_to_reference, ppo_clip_loss, value_loss
from align.backbones.adapter import denoiser
from align.backbones.lora import adapters_disabled, set_active_adapters
from align.distributed import (
    clear_stale_gradients,
    is_deepspeed,
    load_learner,
    lora_copy,
    policy_steps,
    prepare_deepspeed,
    save_learner,
    steps_per_update,
)
from align.lr_schedule import lr_factor
from align.modifiers.protocol import build_modifiers
from align.sampling import Trajectory, recompute_log_probs
from align.sampling.sampler import pinned_device
from align.train_config import TrainConfig
from critics.value_model import LatentCritic

#: The conditional branch's embeddings: what the critic reads (it runs without CFG).
CONDITIONAL_EMBEDS = ("prompt_embeds", "pooled_prompt_embeds")
GROUPS = ("policy", "critic")
#: a minibatch loss: (minibatch, its indices in the pass's batch, denoising step i) → (loss, stats: floats or
#: 0-d tensors, read after the minibatch's last backward)
StepLoss = Callable[[Trajectory, torch.Tensor, int], tuple[torch.Tensor, dict[str, "float | torch.Tensor"]]]


def embeds_of(traj: Trajectory) -> dict:
    """The trajectory's :data:`CONDITIONAL_EMBEDS`."""
    return {k: getattr(traj, k) for k in CONDITIONAL_EMBEDS}


class Learner:
    def __init__(self, pipe, critic: Optional[LatentCritic], cfg: TrainConfig, accelerator: Accelerator) -> None:
        self.pipe, self.critic, self.cfg, self.accelerator = pipe, critic, cfg, accelerator
        net = denoiser(pipe)
        self.policy_params = [p for n, p in net.named_parameters() if ".policy." in n and "lora_" in n]
        self.critic_params: list[torch.nn.Parameter] = []
        if critic is not None:
            lora = (
                [p for n, p in net.named_parameters() if f".{critic.adapter}." in n and "lora_" in n]
                if critic.adapter != "policy"
                else []
            )
            self.critic_params = lora + list(critic.heads.parameters())
        for p in self.policy_params + self.critic_params:
            p.requires_grad_(True)
        if cfg.learner.gradient_checkpointing:
            net.enable_gradient_checkpointing()  # the rollout workers sample under no_grad: unaffected
        self.params = {"policy": self.policy_params, "critic": self.critic_params}
        self.lrs = {"policy": cfg.trainer.lr, "critic": cfg.critic.lr}
        # the sampler's modifier stack, built once: its state (StayFair's encoded group direction) is reused by
        # every recomputed step instead of being rebuilt from each trajectory's record
        self.modifiers = build_modifiers(cfg.sampler.modifiers)
        self.lr_factor = lr_factor(cfg.trainer.lr_schedule, cfg.trainer.lr_warmup, cfg.trainer.iterations)
        self.max_norms = {"policy": cfg.trainer.max_grad_norm, "critic": cfg.critic.max_grad_norm}
        self.engine = None  # DeepSpeed engine over the denoiser (+ critic heads) when enabled
        if is_deepspeed(accelerator):
            groups = [{"params": self.params[g], "lr": self.lrs[g], "name": g} for g in GROUPS if self.params[g]]
            modules = {"denoiser": net, **({"heads": critic.heads} if critic is not None else {})}
            self.engine, optimizer = prepare_deepspeed(
                accelerator, cfg, modules, torch.optim.AdamW(groups, weight_decay=0.0)
            )
            self.optimizers = {g: optimizer for g in GROUPS}
            self._grad_scale = {g: torch.ones(()) for g in GROUPS}  # 0 while the other group's pass runs
            for g in GROUPS:
                for p in self.params[g]:
                    p.register_hook(lambda grad, g=g: grad * self._grad_scale[g])
        else:
            self.optimizers = {
                g: accelerator.prepare(torch.optim.AdamW(self.params[g], lr=self.lrs[g], weight_decay=0.0))
                for g in GROUPS
                if self.params[g]
            }
        self.step_generator = torch.Generator().manual_seed(cfg.trainer.seed + 7)
        self.version = 0  # policy version: the number of policy updates so far

    def check_fresh(self, traj: Trajectory) -> None:
        """Refuse rollouts sampled more than ``learner.max_policy_lag`` versions ago (or by a future one)."""
        lag = self.version - traj.policy_version
        if not 0 <= lag <= self.cfg.learner.max_policy_lag:
            raise RuntimeError(
                f"learner: rollouts from policy version {traj.policy_version} while the learner is at "
                f"version {self.version} (lag {lag}); learner.max_policy_lag = "
                f"{self.cfg.learner.max_policy_lag}. Stale data would bias the PPO ratio: sync the "
                "rollout workers after each update or raise learner.max_policy_lag"
            )

    def policy_state(self) -> dict[str, torch.Tensor]:
        """The policy LoRA tensors for weight sync (CPU copies, whole). Under ZeRO-3 a gather every rank joins;
        the copy is kept until the next update, so the driver alone may ask again at the same version."""
        kept = getattr(self, "_policy_copy", None)
        if kept is None or kept[0] != self.version:
            kept = self._policy_copy = (self.version, lora_copy(self, "policy", self.policy_params))
        return dict(kept[1])

    @torch.no_grad()
    def values(self, traj: Trajectory) -> torch.Tensor:
        """V_k at every state of the chain: (B, T, K) (rollout-time values for GAE), ``critic.value_batch_size``
        rows per forward (0: the whole batch)."""
        rows = self.cfg.critic.value_batch_size or traj.batch_size
        parts = []
        for start in range(0, traj.batch_size, rows):
            mb = (
                traj
                if rows >= traj.batch_size
                else traj.select(torch.arange(start, min(start + rows, traj.batch_size)))
            )
            embeds = embeds_of(mb)
            parts.append(
                torch.stack(
                    [self.critic(mb.latents[:, i], mb.timesteps[i], embeds) for i in range(mb.num_steps)], dim=1
                )
            )
        return torch.cat(parts)

    def policy_update(self, traj: Trajectory, advantages: torch.Tensor) -> dict[str, float]:
        """PPO on the policy LoRA: ``trainer.epochs`` over ``traj`` with ``advantages`` (B_r, T), clipped to
        ±``trainer.adv_clip``; bumps the policy version."""
        self.check_fresh(traj)
        adv = advantages.clamp(-self.cfg.trainer.adv_clip, self.cfg.trainer.adv_clip)
        set_active_adapters(self.pipe, ["policy"])  # once: each optimiser step (and the critic) leaves it active
        self._set_policy_lr(self.cfg.trainer.lr * self.lr_factor(self.version))
        stats = self._pass(
            "policy",
            traj,
            self.cfg.trainer.epochs,
            lambda mb, idx, i: self._policy_loss(mb, adv[idx], i),
            candidates=policy_steps(self.cfg, traj),
        )
        self.version += 1
        return {**stats, "lr": self.lrs["policy"]}

    def _set_policy_lr(self, lr: float) -> None:
        """The policy's rate for this update (``trainer.lr_schedule``); under DeepSpeed ``_deepspeed_activate`` puts
        ``self.lrs`` on the engine's parameter group at each pass."""
        self.lrs["policy"] = lr
        if self.engine is None:
            for group in self.optimizers["policy"].param_groups:
                group["lr"] = lr

    def value_update(self, traj: Trajectory, targets: torch.Tensor, epochs: int) -> dict[str, float]:
        """Regress every head V_k(s_i) on its return G_k (``targets`` (B_r, K)) for ``epochs``; value clipping
        (``critic.value_clip``) is around the predictions before this update."""
        old = self.values(traj) if self.cfg.critic.value_clip is not None else None
        return self._pass(
            "critic",
            traj,
            epochs,
            lambda mb, idx, i: self._value_loss(mb, targets[idx], None if old is None else old[idx, i], i),
            candidates=list(range(traj.num_steps)),  # every state, also outside a stochastic window
        )

    def update(
        self,
        traj: Trajectory,
        advantages: torch.Tensor,
        value_targets: Optional[torch.Tensor],
        old_values: Optional[torch.Tensor],
        train_policy: bool,
    ) -> dict[str, float]:
        """A policy pass (if ``train_policy``) then a value pass over the same batch (if targets are given);
        ``old_values`` is unused (value clipping recomputes them). Kept for callers outside the driver."""
        stats = self.policy_update(traj, advantages) if train_policy else {}
        if self.critic is not None and value_targets is not None:
            epochs = self.cfg.trainer.epochs if train_policy else self.cfg.critic.pretrain_epochs
            stats.update(self.value_update(traj, value_targets, epochs))
        return stats

    def _pass(
        self, group: str, traj: Trajectory, epochs: int, step_loss: StepLoss, candidates: list[int]
    ) -> dict[str, float]:
        """``epochs`` × shuffled minibatches of ``traj``; one clipped optimiser step of ``group`` each, on a
        random subset of the step indices ``candidates`` (the same number of steps for policy and critic)."""
        mb_size = self.cfg.trainer.minibatch_size // self.accelerator.num_processes
        n, steps = traj.batch_size, len(candidates)
        k_steps = min(steps, steps_per_update(self.cfg))
        totals: dict[str, float] = {}
        count = 0
        with pinned_device(self.pipe):  # the schedule of every trained step is set on it (sampler.set_schedule)
            for _ in range(epochs):
                order = torch.randperm(n, generator=self.step_generator)
                for start in range(0, n, mb_size):
                    idx = order[start : start + mb_size]
                    picks = torch.randperm(steps, generator=self.step_generator)[:k_steps].sort().values.tolist()
                    step_ids = [candidates[j] for j in picks]
                    stats = self._optimiser_step(group, traj.select(idx), idx, step_ids, step_loss)
                    for key, val in stats.items():
                        totals[key] = totals.get(key, 0.0) + val
                    count += 1
        return {k: v / count for k, v in totals.items()}

    def _optimiser_step(
        self, group: str, mb: Trajectory, idx: torch.Tensor, step_ids: list[int], step_loss: StepLoss
    ) -> dict[str, float]:
        stats: dict[str, float] = {}
        optimizer = self.optimizers[group]
        optimizer.zero_grad(set_to_none=True)
        if self.engine is not None:  # the optimiser steps inside the last backward (DeepSpeed's boundary)
            self._deepspeed_activate(group)
        per_step = []  # the steps' statistics as tensors, read once after the last backward (no host sync per step)
        for j, i in enumerate(step_ids):
            loss, step_stats = step_loss(mb, idx, i)
            per_step.append(step_stats)
            if self.engine is not None:
                self.accelerator.sync_gradients = j == len(step_ids) - 1
                self.accelerator.backward(loss)  # DeepSpeed divides by its gradient_accumulation_steps
            else:
                self.accelerator.backward(loss / len(step_ids))
        for step_stats in per_step:
            _add(stats, {k: float(v) for k, v in step_stats.items()}, len(step_ids))
        norm = self.accelerator.clip_grad_norm_(self.params[group], self.max_norms[group])
        if norm is not None:  # None under DeepSpeed (the engine clips)
            stats[f"grad_norm_{group}"] = float(norm)
        optimizer.step()
        set_active_adapters(self.pipe, ["policy"])
        return stats

    def _deepspeed_activate(self, group: str) -> None:
        """One engine, two parameter groups: only ``group`` gets gradients and a learning rate (so the other
        group's Adam moments cannot move it), and ZeRO clips at ``group``'s norm."""
        zero = self.optimizer_of_engine()
        for g in GROUPS:
            self._grad_scale[g].fill_(float(g == group))
        names = [g for g in GROUPS if self.params[g]]  # the engine's parameter groups, in this order
        for name, pg in zip(names, zero.optimizer.param_groups, strict=True):
            pg["lr"] = self.lrs[name] if name == group else 0.0
        zero.clip_grad = self.max_norms[group]
        clear_stale_gradients(zero)  # ZeRO-3: the other group's last gradients would be stepped again

    def optimizer_of_engine(self):
        """DeepSpeed's ZeRO optimiser under accelerate's wrapper."""
        return self.optimizers["policy"].optimizer

    def _policy_loss(self, mb: Trajectory, adv: torch.Tensor, i: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Clipped PPO surrogate at step i (+ KL to the reference policy when ``trainer.kl_coef`` > 0), with the
        policy adapter active (:meth:`policy_update`); the statistics are detached 0-d tensors."""
        logp = recompute_log_probs(self.pipe, mb, [i], modifiers=self.modifiers)[:, 0]
        loss, pstats = ppo_clip_loss(logp, mb.log_probs[:, i], adv[:, i], self.cfg.trainer.clip_range)
        stats = {"policy_loss": loss.detach(), **{k: v.detach() for k, v in pstats.items()}}
        if self.cfg.trainer.kl_coef > 0:
            with torch.no_grad(), adapters_disabled(self.pipe):
                ref = recompute_log_probs(self.pipe, mb, [i], modifiers=self.modifiers)[:, 0]
            kl = kl_to_reference(logp, ref)
            loss = loss + self.cfg.trainer.kl_coef * kl
            stats["kl_ref"] = kl.detach()
        return loss, stats

    def _value_loss(
        self, mb: Trajectory, targets: torch.Tensor, old: Optional[torch.Tensor], i: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """0.5 (V_k(s_i) − G_k)² averaged over heads, optionally clipped around ``old`` (B, K)."""
        v = self.critic(mb.latents[:, i], mb.timesteps[i], embeds_of(mb))
        vl = value_loss(v, targets, old, self.cfg.critic.value_clip)
        return self.cfg.critic.value_coef * vl, {"value_loss": vl.detach()}

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Weights, optimiser and step-RNG state into ``directory``; every rank calls (align/distributed.py
        ``save_learner``: accelerate's save_state under DeepSpeed)."""
        save_learner(self, directory)

    def partition_dir(self, directory: Path) -> Path:
        """Where this rank's own state goes (its shard of an algorithm's replay)."""
        if self.engine is None:
            return directory
        path = directory / f"rank{self.accelerator.process_index}"
        path.mkdir(exist_ok=True)
        return path

    def load(self, directory: Path) -> None:
        """Inverse of :meth:`save`; every rank calls."""
        load_learner(self, directory)
        self._policy_copy = None


def _add(acc: dict[str, float], values: dict[str, float], n: int) -> None:
    for key, val in values.items():
        acc[key] = acc.get(key, 0.0) + val / n

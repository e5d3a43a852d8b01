"""The learner: PPO on recomputed step log-probs plus the critic's value loss, through accelerate.

One optimiser with two parameter groups (policy LoRA at ``trainer.lr``; critic LoRA and heads at
``critic.lr``). Per minibatch it recomputes log π_θ for a random subset of steps, forms the clipped
PPO loss with the rollout's advantages, the value loss of each head against its normalised
return, and an optional KL to the reference policy (adapters disabled); gradients accumulate over
the steps, then one clipped optimiser step. Checkpoints are atomic safetensors + JSON.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator

from align import checkpoint as ckpt
from align.algos.core import kl_to_reference, ppo_clip_loss, value_loss
from align.algos.value_replay import ValueReplay
from align.backbones.loading import denoiser
from align.backbones.lora import adapters_disabled, load_lora_state_dict, lora_state_dict, set_active_adapters
from align.distributed import is_deepspeed, load_zero_partition, prepare_deepspeed, zero_partition_state
from align.sampling import Trajectory, recompute_log_probs
from align.train_config import TrainConfig
from critics.value_model import LatentCritic

EMBED_KEYS = ("prompt_embeds", "pooled_prompt_embeds")


def embeds_of(traj: Trajectory) -> dict:
    return {k: getattr(traj, k) for k in EMBED_KEYS}


class Learner:
    def __init__(self, pipe, critic: Optional[LatentCritic], cfg: TrainConfig, accelerator: Accelerator) -> None:
        self.pipe, self.critic, self.cfg, self.accelerator = pipe, critic, cfg, accelerator
        net = denoiser(pipe)
        self.policy_params = [p for n, p in net.named_parameters() if ".policy." in n and "lora_" in n]
        groups = [{"params": self.policy_params, "lr": cfg.trainer.lr, "name": "policy"}]
        self.critic_params: list[torch.nn.Parameter] = []
        if critic is not None:
            lora = [p for n, p in net.named_parameters() if f".{critic.adapter}." in n and "lora_" in n] \
                if critic.adapter != "policy" else []
            self.critic_params = lora + list(critic.heads.parameters())
            groups.append({"params": self.critic_params, "lr": cfg.critic.lr, "name": "critic"})
        for p in self.policy_params + self.critic_params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        self.engine = None  # DeepSpeed engine over the denoiser (+ critic heads) when enabled
        if is_deepspeed(accelerator):
            modules = {"denoiser": net, **({"heads": critic.heads} if critic is not None else {})}
            self.engine, self.optimizer = prepare_deepspeed(accelerator, cfg, modules, self.optimizer)
            self._policy_grad_scale = torch.ones(())  # 0 while only the critic trains (see _minibatch)
            for p in self.policy_params:
                p.register_hook(lambda g: g * self._policy_grad_scale)
        else:
            self.optimizer = accelerator.prepare(self.optimizer)
        self.step_generator = torch.Generator().manual_seed(cfg.trainer.seed + 7)
        self.value_replay = ValueReplay(cfg.critic.pretrain_replay)  # value-pretraining batches (train.py)
        self.version = 0  # policy version: the number of policy updates so far

    def check_fresh(self, traj: Trajectory) -> None:
        """Refuse rollouts sampled more than ``learner.max_policy_lag`` versions ago (or by a future one)."""
        lag = self.version - traj.policy_version
        if not 0 <= lag <= self.cfg.learner.max_policy_lag:
            raise RuntimeError(f"learner: rollouts from policy version {traj.policy_version} while the learner is at "
                               f"version {self.version} (lag {lag}); learner.max_policy_lag = "
                               f"{self.cfg.learner.max_policy_lag}. Stale data would bias the PPO ratio: sync the "
                               "rollout workers after each update or raise learner.max_policy_lag")

    def policy_state(self) -> dict[str, torch.Tensor]:
        """The policy LoRA tensors for weight sync (CPU copies; whole on every rank, ZeRO-3 being refused)."""
        return {k: v.detach().cpu().clone() for k, v in lora_state_dict(self.pipe, "policy").items()}

    @torch.no_grad()
    def values(self, traj: Trajectory) -> torch.Tensor:
        """V_k at every state of the chain: (B, T, K) (rollout-time values for GAE)."""
        embeds = embeds_of(traj)
        return torch.stack([self.critic(traj.latents[:, i], traj.timesteps[i], embeds)
                            for i in range(traj.num_steps)], dim=1)

    def update(self, traj: Trajectory, advantages: torch.Tensor, value_targets: Optional[torch.Tensor],
               old_values: Optional[torch.Tensor], train_policy: bool) -> dict[str, float]:
        """One PPO update over ``traj`` (epochs × minibatches × a subset of steps); bumps the policy
        version when the policy trained. Under several processes ``traj`` is this rank's shard and a
        minibatch holds ``minibatch_size / N`` of its samples (DeepSpeed averages over the ranks)."""
        self.check_fresh(traj)
        tc = self.cfg.trainer
        mb_size = tc.minibatch_size // self.accelerator.num_processes
        advantages = advantages.clamp(-tc.adv_clip, tc.adv_clip)
        n, steps = traj.batch_size, traj.num_steps
        k_steps = max(1, round(tc.timestep_fraction * steps))
        totals: dict[str, float] = {}
        count = 0
        epochs = tc.epochs if train_policy else self.cfg.critic.pretrain_epochs
        for _ in range(epochs):
            order = torch.randperm(n, generator=self.step_generator)
            for start in range(0, n, mb_size):
                idx = order[start:start + mb_size]
                step_ids = torch.randperm(steps, generator=self.step_generator)[:k_steps].sort().values.tolist()
                stats = self._minibatch(traj.select(idx), advantages[idx], step_ids,
                                        None if value_targets is None else value_targets[idx],
                                        None if old_values is None else old_values[idx], train_policy)
                for key, val in stats.items():
                    totals[key] = totals.get(key, 0.0) + val
                count += 1
        self.version += int(train_policy)
        return {k: v / count for k, v in totals.items()}

    def _minibatch(self, mb: Trajectory, adv: torch.Tensor, step_ids: list[int], targets: Optional[torch.Tensor],
                   old_values: Optional[torch.Tensor], train_policy: bool) -> dict[str, float]:
        stats: dict[str, float] = {}
        self.optimizer.zero_grad(set_to_none=True)
        if self.engine is not None:  # the optimiser steps inside the last backward (DeepSpeed's boundary)
            self._policy_grad_scale.fill_(float(train_policy))
        for j, i in enumerate(step_ids):
            loss = torch.zeros(())
            if train_policy:
                set_active_adapters(self.pipe, ["policy"])
                logp = recompute_log_probs(self.pipe, mb, [i])[:, 0]
                pg, pstats = ppo_clip_loss(logp, mb.log_probs[:, i], adv[:, i], self.cfg.trainer.clip_range)
                loss = loss + pg
                _add(stats, {"policy_loss": pg.item(), **{k: v.item() for k, v in pstats.items()}}, len(step_ids))
                if self.cfg.trainer.kl_coef > 0:
                    with torch.no_grad(), adapters_disabled(self.pipe):
                        ref = recompute_log_probs(self.pipe, mb, [i])[:, 0]
                    kl = kl_to_reference(logp, ref)
                    loss = loss + self.cfg.trainer.kl_coef * kl
                    _add(stats, {"kl_ref": kl.item()}, len(step_ids))
            if self.critic is not None and targets is not None:
                v = self.critic(mb.latents[:, i], mb.timesteps[i], embeds_of(mb))
                vl = value_loss(v, targets, None if old_values is None else old_values[:, i], self.cfg.critic.value_clip)
                loss = loss + self.cfg.critic.value_coef * vl
                _add(stats, {"value_loss": vl.item()}, len(step_ids))
            if self.engine is not None:
                self.accelerator.sync_gradients = j == len(step_ids) - 1
                self.accelerator.backward(loss)  # DeepSpeed divides by its gradient_accumulation_steps
            else:
                self.accelerator.backward(loss / len(step_ids))
        params = (self.policy_params if train_policy else []) + self.critic_params
        if params:
            self.accelerator.clip_grad_norm_(params, self.cfg.trainer.max_grad_norm)
        if not train_policy:  # value pretraining: the policy must not move
            for p in self.policy_params:
                p.grad = None
        self.optimizer.step()
        set_active_adapters(self.pipe, ["policy"])
        return stats

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Policy LoRA, critic (LoRA + heads) and optimizer tensors into ``directory``."""
        ckpt.save_tensors(directory / "policy_lora.safetensors", lora_state_dict(self.pipe, "policy"))
        if self.critic is not None:
            if self.critic.adapter != "policy":
                ckpt.save_tensors(directory / "critic_lora.safetensors", lora_state_dict(self.pipe, self.critic.adapter))
            ckpt.save_tensors(directory / "critic_heads.safetensors", self.critic.heads.state_dict())
        if self.engine is not None:  # each rank saves its own partition (save_partition)
            ckpt.write_json(directory / "optimizer.json", {"deepspeed": {
                "zero_stage": self.engine.zero_optimization_stage(), "num_processes": self.accelerator.num_processes}})
        else:
            opt_t, opt_meta = ckpt.optimizer_state_split(self._torch_optimizer())
            ckpt.save_tensors(directory / "optimizer.safetensors", opt_t)
            ckpt.write_json(directory / "optimizer.json", opt_meta)
        ckpt.save_tensors(directory / "learner_rng.safetensors", {"steps": self.step_generator.get_state()})
        self.value_replay.save(directory)

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        """The AdamW under accelerate's wrapper (without DeepSpeed)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def save_partition(self, directory: Path) -> None:
        """Under DeepSpeed, what this rank alone holds: its ZeRO optimiser partition (fp32 master
        weights, Adam moments) and its value-replay shard. Every rank calls; no-op otherwise."""
        if self.engine is None:
            return
        rank = self.accelerator.process_index
        tensors, meta = zero_partition_state(self.optimizer)
        ckpt.save_tensors(directory / f"optimizer_rank{rank}.safetensors", tensors)
        ckpt.write_json(directory / f"optimizer_rank{rank}.json", meta)
        (directory / f"rank{rank}").mkdir(exist_ok=True)
        self.value_replay.save(directory / f"rank{rank}")

    def load(self, directory: Path) -> None:
        saved = ckpt.read_json(directory / "optimizer.json").get("deepspeed")
        now = self.accelerator.num_processes
        if (self.engine is None) != (saved is None) or (saved and saved["num_processes"] != now):
            written = f"by {saved['num_processes']} DeepSpeed processes" if saved else "without DeepSpeed"
            current = f"{now} process(es), DeepSpeed {'on' if self.engine is not None else 'off'}"
            raise RuntimeError(f"--resume {directory}: the checkpoint was written {written}; resume with the same "
                               f"launch (now: {current})")
        load_lora_state_dict(self.pipe, ckpt.load_tensors(directory / "policy_lora.safetensors"), "policy")
        if self.critic is not None:
            if self.critic.adapter != "policy":
                load_lora_state_dict(self.pipe, ckpt.load_tensors(directory / "critic_lora.safetensors"),
                                     self.critic.adapter)
            self.critic.heads.load_state_dict(ckpt.load_tensors(directory / "critic_heads.safetensors"))
        if self.engine is not None:
            rank = self.accelerator.process_index
            load_zero_partition(self.optimizer, ckpt.load_tensors(directory / f"optimizer_rank{rank}.safetensors"),
                                ckpt.read_json(directory / f"optimizer_rank{rank}.json"))
        else:
            self._torch_optimizer().load_state_dict(ckpt.optimizer_state_join(
                ckpt.load_tensors(directory / "optimizer.safetensors"), ckpt.read_json(directory / "optimizer.json")))
        self.step_generator.set_state(ckpt.load_tensors(directory / "learner_rng.safetensors")["steps"])
        self.value_replay.load(directory / f"rank{self.accelerator.process_index}" if self.engine is not None
                               else directory)


def _add(acc: dict[str, float], values: dict[str, float], n: int) -> None:
    for key, val in values.items():
        acc[key] = acc.get(key, 0.0) + val / n

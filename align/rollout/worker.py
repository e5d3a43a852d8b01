"""``RolloutWorker``: samples trajectories with the current policy LoRA. Imports neither Ray nor
DeepSpeed: in-process it shares the learner's pipeline (weight sync is then a no-op); the
distributed driver wraps it in a Ray actor that owns its own pipeline copy."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from align.backbones.lora import load_lora_state_dict, set_active_adapters
from align.modifiers.protocol import build_modifiers
from align.sampling import SamplerConfig, Trajectory, initial_latents, resolve_resolution, sample_trajectory
from align.sampling.sampler import pinned_device


class RolloutWorker:
    def __init__(self, pipe, sampler: SamplerConfig, adapter: str = "policy") -> None:
        self.pipe, self.sampler, self.adapter = pipe, sampler, adapter
        resolve_resolution(pipe, sampler.height, sampler.width)  # a bad sampler.height fails before any rollout
        self.modifiers = build_modifiers(sampler.modifiers)  # the policy's modifier stack, built once
        self.policy_version = 0

    def set_policy(self, state: dict[str, torch.Tensor] | None, version: int) -> None:
        """Load a policy LoRA state (None: weights are shared with the learner) and stamp its version."""
        if state is not None:
            load_lora_state_dict(self.pipe, state, self.adapter)
        self.policy_version = version

    def rollout(
        self,
        prompts: list[str],
        seed: int,
        sde_steps: Optional[Sequence[int]] = None,
        latent_seeds: Optional[Sequence[int]] = None,
    ) -> Trajectory:
        """Sample one trajectory per prompt with the policy adapter active, from a seeded generator;
        ``sde_steps``: the batch's stochastic window (None: the sampler's, drawn from ``seed``);
        ``latent_seeds``: each sample's x_T from its own seed (None: from the generator)."""
        set_active_adapters(self.pipe, [self.adapter])
        with pinned_device(self.pipe):  # one device lookup for every x_T, the prompts and the schedule
            generator = torch.Generator(device="cpu").manual_seed(seed)
            latents = None
            if latent_seeds is not None:
                s = self.sampler
                latents = torch.cat(
                    [
                        initial_latents(self.pipe, 1, torch.Generator().manual_seed(int(k)), s.height, s.width)
                        for k in latent_seeds
                    ]
                )
            window = None if sde_steps is None else list(sde_steps)
            return sample_trajectory(
                self.pipe,
                prompts,
                self.sampler,
                generator,
                policy_version=self.policy_version,
                modifiers=self.modifiers,
                latents=latents,
                sde_steps=window,
            )

"""``Trajectory``: one batch of denoising chains with everything needed to recompute log-probs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import torch

from align.checkpoint import load_tensors, read_json, save_tensors, write_json

FORMAT = "align.Trajectory/1"
#: Tensor fields indexed by sample (dim 0 is the batch).
PER_SAMPLE = (
    "latents",
    "log_probs",
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "images",
)
#: Tensor fields shared by the whole batch (the schedule).
SHARED = ("timesteps", "sigmas")
#: Scalar settings, stored in the JSON sidecar; ``cat`` requires them equal.
SETTINGS = (
    "policy_version",
    "guidance_scale",
    "noise_scale",
    "num_inference_steps",
    "transition",
    "logprob_reduce",
    "modifiers",
    "sde_steps",
)


@dataclasses.dataclass
class Trajectory:
    """B chains of T steps sampled by one policy version (OpenRLHF ``Experience``-style record)."""

    latents: torch.Tensor  # (B, T+1, C, h, w) x_T … x_0, in the scheduler's latent space
    timesteps: torch.Tensor  # (T,) scheduler timesteps of the steps (DDIM: int; flow: 1000·sigma)
    log_probs: torch.Tensor  # (B, T) float32 log π_old(x_{t-1} | x_t, c) of each step taken
    prompt_embeds: torch.Tensor  # (B, L, D) text states of the prompts (after the embeds hook)
    prompts: list[str]  # B prompts
    images: Optional[torch.Tensor] = None  # (B, 3, H, W) decoded x_0 in [0, 1]
    negative_prompt_embeds: Optional[torch.Tensor] = None  # (B, L, D) CFG's unconditional branch
    pooled_prompt_embeds: Optional[torch.Tensor] = None  # (B, P) SD3 pooled text embedding
    negative_pooled_prompt_embeds: Optional[torch.Tensor] = None  # (B, P) its unconditional branch
    sigmas: Optional[torch.Tensor] = None  # (T+1,) flow-matching noise levels t_i (last is 0); None for DDIM
    policy_version: int = 0  # version of the policy weights that sampled it
    guidance_scale: float = 1.0  # CFG scale w (no CFG when w <= 1)
    noise_scale: float = 1.0  # DDIM η or flow-SDE a (0: deterministic, no policy)
    num_inference_steps: int = 0  # N of scheduler.set_timesteps(N)
    transition: str = "ddim"  # key of align.sampling.transitions.TRANSITIONS
    logprob_reduce: str = "mean"  # reduction of the per-step log-density: "mean" | "sum"
    modifiers: list = dataclasses.field(default_factory=list)  # sampler.modifiers specs [{name: args}] of π
    sde_steps: Optional[list[int]] = None  # the stochastic steps (window); None: all. Others have log π = 0

    def trainable_steps(self, first: int = 0, stop: Optional[int] = None) -> list[int]:
        """The step indices in [first, stop) that are actions of the stochastic policy (the window's)."""
        stop = self.num_steps if stop is None else stop
        return [i for i in range(first, stop) if self.sde_steps is None or i in self.sde_steps]

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def _map(self, fn, fields: Sequence[str]) -> dict[str, torch.Tensor]:
        return {f: fn(getattr(self, f)) for f in fields if getattr(self, f) is not None}

    def select(self, index: Sequence[int] | torch.Tensor) -> "Trajectory":
        """The sub-batch at ``index`` (list of ints, long tensor or bool mask); schedule kept."""
        idx = torch.as_tensor(index)
        idx = idx.nonzero().flatten() if idx.dtype == torch.bool else idx.long().flatten()
        out = dataclasses.replace(self, **self._map(lambda t: t[idx.to(t.device)], PER_SAMPLE))
        out.prompts = [self.prompts[i] for i in idx.tolist()]
        return out

    def to(self, device: torch.device | str) -> "Trajectory":
        return dataclasses.replace(self, **self._map(lambda t: t.to(device), PER_SAMPLE + SHARED))

    @classmethod
    def cat(cls, parts: Sequence["Trajectory"]) -> "Trajectory":
        """Concatenate along the batch; the parts must share the schedule, settings and fields."""
        if not parts:
            raise ValueError("Trajectory.cat: no trajectories given")
        first = parts[0]
        for p in parts[1:]:
            if settings(p) != settings(first):
                raise ValueError(f"Trajectory.cat: sampling settings differ: {settings(p)} vs {settings(first)}")
            for f in SHARED:
                a, b = getattr(first, f), getattr(p, f)
                if (a is None) != (b is None) or (a is not None and not torch.equal(a.cpu(), b.cpu())):
                    raise ValueError(f"Trajectory.cat: {f} differ between parts")
            if [getattr(p, f) is None for f in PER_SAMPLE] != [getattr(first, f) is None for f in PER_SAMPLE]:
                raise ValueError("Trajectory.cat: parts differ in which optional fields they hold")
        tensors = {f: torch.cat([getattr(p, f) for p in parts]) for f in PER_SAMPLE if getattr(first, f) is not None}
        return dataclasses.replace(first, prompts=[q for p in parts for q in p.prompts], **tensors)

    def save(self, path: str | Path) -> None:
        """``<path>.safetensors`` (tensors) + ``<path>.json`` (prompts, settings); never pickle."""
        path = Path(path)
        save_tensors(path.with_suffix(".safetensors"), self._map(lambda t: t, PER_SAMPLE + SHARED))
        write_json(path.with_suffix(".json"), {"format": FORMAT, "prompts": self.prompts, **settings(self)})

    @classmethod
    def load(cls, path: str | Path) -> "Trajectory":
        path = Path(path)
        meta = read_json(path.with_suffix(".json"))
        if meta.pop("format", None) != FORMAT:
            raise ValueError(f"{path.with_suffix('.json')} is not a saved Trajectory (expected format {FORMAT})")
        return cls(**load_tensors(path.with_suffix(".safetensors")), **meta)


def settings(traj: Trajectory) -> dict:
    """The scalar sampling settings of a trajectory (what recomputation needs besides tensors)."""
    return {k: getattr(traj, k) for k in SETTINGS}

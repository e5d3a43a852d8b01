"""``Trajectory``: one batch of denoising chains with everything needed to recompute log-probs."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from align.checkpoint import load_tensors, read_json, save_tensors, write_json

_TENSOR_FIELDS = ("latents", "timesteps", "log_probs", "prompt_embeds", "negative_prompt_embeds",
                  "pooled_prompt_embeds", "negative_pooled_prompt_embeds", "images")
_PER_SAMPLE = ("latents", "log_probs", "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
               "negative_pooled_prompt_embeds", "images")


@dataclasses.dataclass
class Trajectory:
    """A batch of B chains of T steps sampled by one policy version (shapes in comments)."""
    latents: torch.Tensor                    # (B, T+1, C, h, w) x_T … x_0 in the scheduler's space
    timesteps: torch.Tensor                  # (T,) scheduler timesteps of the steps
    log_probs: torch.Tensor                  # (B, T) log π_old(x_{t-1} | x_t, c); NaN if deterministic
    prompt_embeds: torch.Tensor              # (B, L, D) text-encoder states of the prompts
    images: torch.Tensor                     # (B, 3, H, W) decoded x_0 in [0, 1]
    prompts: list[str]                       # B prompts
    negative_prompt_embeds: Optional[torch.Tensor] = None          # (B, L, D) CFG's unconditional branch
    pooled_prompt_embeds: Optional[torch.Tensor] = None            # (B, P) SD3 pooled text embedding
    negative_pooled_prompt_embeds: Optional[torch.Tensor] = None   # (B, P)
    policy_version: int = 0                  # version of the LoRA weights that sampled it
    guidance_scale: float = 1.0              # CFG scale w (no CFG when w <= 1)
    noise_scale: float = 1.0                 # DDIM η or flow-SDE a
    num_inference_steps: int = 0             # scheduler.set_timesteps(N) of the run
    transition: str = "ddim"                 # key of align.sampling.transitions.TRANSITIONS
    logprob_reduce: str = "mean"             # reduction of the per-step log-density

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def _replace_tensors(self, fn) -> "Trajectory":
        changes = {f: fn(f, getattr(self, f)) for f in _TENSOR_FIELDS if getattr(self, f) is not None}
        return dataclasses.replace(self, **changes)

    def select(self, index: torch.Tensor | list[int]) -> "Trajectory":
        """A sub-batch (per-sample tensors and prompts indexed; shared fields kept)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        out = self._replace_tensors(lambda f, t: t[idx] if f in _PER_SAMPLE else t)
        out.prompts = [self.prompts[i] for i in idx.tolist()]
        return out

    def to(self, device: torch.device | str) -> "Trajectory":
        return self._replace_tensors(lambda f, t: t.to(device))

    @classmethod
    def cat(cls, parts: list["Trajectory"]) -> "Trajectory":
        """Concatenate along the batch; all parts must share timesteps and sampling settings."""
        first = parts[0]
        for p in parts[1:]:
            if not torch.equal(p.timesteps, first.timesteps) or _settings(p) != _settings(first):
                raise ValueError("Trajectory.cat: parts differ in timesteps or sampling settings "
                                 f"({_settings(p)} vs {_settings(first)})")
        changes = {}
        for f in _TENSOR_FIELDS:
            values = [getattr(p, f) for p in parts]
            if values[0] is None:
                continue
            changes[f] = torch.cat(values) if f in _PER_SAMPLE else values[0]
        return dataclasses.replace(first, prompts=[q for p in parts for q in p.prompts], **changes)

    def save(self, path: str | Path) -> None:
        """``path.safetensors`` (tensors) + ``path.json`` (prompts and settings); no pickle."""
        path = Path(path)
        save_tensors(path.with_suffix(".safetensors"),
                     {f: getattr(self, f) for f in _TENSOR_FIELDS if getattr(self, f) is not None})
        write_json(path.with_suffix(".json"), {"prompts": self.prompts, **_settings(self)})

    @classmethod
    def load(cls, path: str | Path) -> "Trajectory":
        path = Path(path)
        tensors = load_tensors(path.with_suffix(".safetensors"))
        meta = read_json(path.with_suffix(".json"))
        return cls(**tensors, **meta)


def _settings(t: Trajectory) -> dict:
    return {"policy_version": t.policy_version, "guidance_scale": t.guidance_scale, "noise_scale": t.noise_scale,
            "num_inference_steps": t.num_inference_steps, "transition": t.transition,
            "logprob_reduce": t.logprob_reduce}

"""The hook points of the sampling loop: what a :class:`~align.modifiers.protocol.ModifierStack`
compiles to. Modifiers (StayFair, symmetric attention, critic steering …) are the one way to hook
the sampler; the caller builds the stack and hands it to ``sample_trajectory`` /
``recompute_log_probs`` (docs/modifiers.md). :class:`SamplerHooks` is the stack's composed form,
read by the loop.

Three places, each optional; the defaults are the identity, and identity hooks give bit-identical
trajectories (tested):

* ``prompt_embeds(embeds) -> embeds``: after ``encode_prompts`` (e.g. StayFair's offset on the
  null embedding). The trajectory stores the hooked embeddings, so recomputation sees them too.
* ``guidance(uncond, cond, w) -> output``: how the two CFG branches combine (default
  :func:`cfg_combine`).
* ``transition(mean, std, ctx) -> (mean, std)``: the Gaussian step before it is drawn (e.g.
  steering the mean with ∇V). The stored log-prob is that of the modified step.

A fourth, ``extra_branch``, adds a third denoiser branch batched with CFG's two (FairCFG's plain
null: docs/modifiers.md, "StayFair"); its ``combine(uncond, cond, extra, w)`` then replaces ``guidance``.

Attention processors are set on the denoiser directly (diffusers' ``set_attn_processor``) by the
stack's ``attention`` context and need no hook here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): out = out_u + w (out_c − out_u)."""
    return uncond + scale * (cond - uncond)


@dataclasses.dataclass
class StepContext:
    """What a transition hook may read about the current step."""

    step_index: int  # i in 0 … T−1
    timestep: torch.Tensor  # () scheduler timestep of the step
    sample: torch.Tensor  # (B, C, h, w) x_t
    model_output: torch.Tensor  # (B, C, h, w) guided denoiser output (ε, v or x0 per the scheduler)
    #: the batch's prompt embeddings (``TRAJECTORY_EMBEDS``, after the embeds hooks: what the trajectory stores)
    embeds: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ExtraBranch:
    """A third CFG branch: ``conditioning(B)`` gives its denoiser inputs for a batch of B
    (``prompt_embeds`` and, for SD3, ``pooled_prompt_embeds``); ``combine(uncond, cond, extra, w)``
    mixes the three outputs."""

    conditioning: Callable[[int], dict]
    combine: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


EmbedsHook = Callable[[dict], dict]
GuidanceFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
TransitionHook = Callable[[torch.Tensor, torch.Tensor, StepContext], tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass
class SamplerHooks:
    """A modifier stack's composed hooks (module docstring); ``needs_grad`` runs sampling under
    ``no_grad`` instead of ``inference_mode`` so a hook can ``torch.enable_grad()`` (critic steering)."""

    prompt_embeds: Optional[EmbedsHook] = None
    guidance: GuidanceFn = cfg_combine
    transition: Optional[TransitionHook] = None
    needs_grad: bool = False
    extra_branch: Optional[ExtraBranch] = None

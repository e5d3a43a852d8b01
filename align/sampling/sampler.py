"""The sampling loop with per-step log-probs over real diffusers pipelines of any registered family.

diffusers' ``pipe(...)`` cannot return log-probs (its callbacks see latents, not the step's
distribution), so we run our own loop on the pipeline's own parts: ``encode_prompt``,
``prepare_latents``, ``scheduler.set_timesteps``, the denoiser, the VAE and its image processor, each
reached through the family's backbone adapter (align/backbones/adapter.py: SD1.5, SDXL, SD3).
Modifiers are the one way to hook it: the caller builds a
:class:`~align.modifiers.protocol.ModifierStack` and passes it as ``modifiers`` (without one, the stack
is built from ``sampler.modifiers`` / the trajectory's record); the loop reads the stack's composed
:class:`~align.sampling.hooks.SamplerHooks`.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from typing import TYPE_CHECKING, Iterator, Optional

import torch
from tqdm.auto import tqdm

from align.backbones.adapter import Backbone, backbone
from align.sampling.config import SamplerConfig
from align.sampling.hooks import ExtraBranch, GuidanceFn, SamplerHooks, StepContext, cfg_combine
from align.sampling.resolution import resolve_resolution
from align.sampling.trajectory import Trajectory
from align.sampling.transitions import TRANSITIONS, take_step, transition_for
from align.sampling.window import stochastic_steps

if TYPE_CHECKING:
    from align.modifiers.protocol import ModifierStack

#: The prompt embeddings a trajectory stores (both CFG branches; the pooled pair where the backbone has one).
TRAJECTORY_EMBEDS = (
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
)


# ---------------------------------------------------------------------- the execution device
_PINNED = threading.local()  # .pipes: id(pipe) -> (pipe, device) of this thread's pinned_device blocks


def execution_device(pipe) -> torch.device:
    """``pipe._execution_device``, or the device looked up on entry to the enclosing :func:`pinned_device`.

    diffusers' property walks every submodule of every component for offload hooks (6–9 ms on the tiny SD
    pipeline, more on a real one) and the loop needs it for the prompts, x_T and the schedule of each batch,
    and the learner for the schedule of each trained step."""
    pinned = getattr(_PINNED, "pipes", {}).get(id(pipe))
    return pinned[1] if pinned is not None and pinned[0] is pipe else pipe._execution_device


@contextlib.contextmanager
def pinned_device(pipe) -> Iterator[torch.device]:
    """Look the pipeline's execution device up once for the block (in this thread; nested blocks reuse the
    outer lookup). Inside it the pipeline must not move devices or change its offloading."""
    pipes = _PINNED.__dict__.setdefault("pipes", {})
    pinned = pipes.get(id(pipe))
    if pinned is not None and pinned[0] is pipe:
        yield pinned[1]
        return
    device = pipe._execution_device
    pipes[id(pipe)] = (pipe, device)
    try:
        yield device
    finally:
        pipes.pop(id(pipe), None)


# ------------------------------------------------------------------------------ public parts
def encode_prompts(pipe, prompts: list[str], negative_prompt: str = "", guidance_scale: float = 1.0) -> dict:
    """Embeddings of both CFG branches via the pipeline's own ``encode_prompt``: a dict with
    :data:`TRAJECTORY_EMBEDS` (None where not used: no CFG, or no pooled embedding for SD1.5)."""
    embeds = dict.fromkeys(TRAJECTORY_EMBEDS)
    negative = [negative_prompt] * len(prompts)
    embeds.update(backbone(pipe).encode(list(prompts), negative, guidance_scale > 1.0, execution_device(pipe)))
    return embeds


def _conditioning(embeds: dict, cfg_on: bool) -> dict:
    """Denoiser inputs for one batched call: [uncond; cond] when CFG is on (diffusers' order)."""
    out = {}
    for key in ("prompt_embeds", "pooled_prompt_embeds"):
        pos, neg = embeds.get(key), embeds.get(f"negative_{key}")
        if cfg_on and pos is not None and neg is None:
            raise ValueError(f"guidance_scale > 1 needs negative_{key}; encode with the same guidance_scale")
        out[key] = torch.cat([neg, pos]) if cfg_on and pos is not None else pos
    return out


def _guided(
    net: Backbone,
    latents: torch.Tensor,
    t: torch.Tensor,
    cond: dict,
    guidance_scale: float,
    guidance: GuidanceFn,
    extra: Optional[tuple[dict, ExtraBranch]] = None,
) -> torch.Tensor:
    cfg_on = guidance_scale > 1.0
    if cfg_on and extra is not None:  # [uncond; cond; extra] in one call, mixed by the branch's combine
        extra_cond, branch = extra
        cond3 = {k: None if v is None else torch.cat([v, extra_cond[k]]) for k, v in cond.items()}
        uncond, cond_out, extra_out = net.denoise(torch.cat([latents] * 3), t, cond3).chunk(3)
        return branch.combine(uncond, cond_out, extra_out, guidance_scale)
    x = torch.cat([latents, latents]) if cfg_on else latents
    out = net.denoise(x, t, cond)
    if not cfg_on:
        return out
    uncond, cond_out = out.chunk(2)
    return guidance(uncond, cond_out, guidance_scale)


def _extra(hooks: SamplerHooks, batch: int) -> Optional[tuple[dict, ExtraBranch]]:
    """The hooks' third branch with its conditioning for this batch, or None."""
    branch = hooks.extra_branch
    return None if branch is None else (branch.conditioning(batch), branch)


def predict(
    pipe,
    latents: torch.Tensor,
    t: torch.Tensor,
    embeds: dict,
    guidance_scale: float,
    guidance: GuidanceFn = cfg_combine,
) -> torch.Tensor:
    """Denoiser output at (x_t, t, c); CFG (w > 1) runs both branches in one batched call and
    returns ``guidance(out_u, out_c, w)``, by default out_u + w (out_c − out_u)."""
    cond = _conditioning(embeds, guidance_scale > 1.0)
    return _guided(backbone(pipe), latents, t, cond, guidance_scale, guidance)


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """x_0 latents → images in [0, 1]: the backbone's VAE scaling (SD3: and shift), VAE, postprocess."""
    vae = pipe.vae
    image = vae.decode(backbone(pipe).to_vae(latents).to(vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pt")


def initial_latents(
    pipe, batch: int, generator: torch.Generator, height: Optional[int] = None, width: Optional[int] = None
) -> torch.Tensor:
    """x_T from the pipeline's own ``prepare_latents`` at ``height`` × ``width`` pixels (None: the model's
    default; checked by :func:`~align.sampling.resolution.resolve_resolution`)."""
    net = backbone(pipe).net
    h, w = resolve_resolution(pipe, height, width)
    return pipe.prepare_latents(batch, net.config.in_channels, h, w, net.dtype, execution_device(pipe), generator)


def set_schedule(pipe, num_inference_steps: int, latents: torch.Tensor) -> None:
    """``scheduler.set_timesteps`` as the pipeline calls it (SD3: with ``mu`` if dynamically shifted)."""
    kwargs = backbone(pipe).schedule_kwargs(latents)
    pipe.scheduler.set_timesteps(num_inference_steps, device=execution_device(pipe), **kwargs)


# ----------------------------------------------------------------------------- the loop
def step_scale(scale: float, step: int, sde_steps: Optional[list[int]]) -> float:
    """The noise scale of step ``step``: ``scale`` inside the stochastic window (or everywhere without one),
    0 outside it (DDIM η = 0, the flow ODE)."""
    return scale if sde_steps is None or step in sde_steps else 0.0


def _chain(
    pipe,
    x: torch.Tensor,
    embeds: dict,
    config: SamplerConfig,
    hooks: SamplerHooks,
    generator: torch.Generator,
    latents_out: torch.Tensor,
    log_probs_out: torch.Tensor,
    sde_steps: Optional[list[int]],
) -> torch.Tensor:
    """Run the T steps from x_T, writing x_t into ``latents_out[:, i]`` and log π into ``log_probs_out``;
    outside ``sde_steps`` (None: every step is stochastic) a step is deterministic (noise scale 0)."""
    cond = _conditioning(embeds, config.guidance_scale > 1.0)
    transition = TRANSITIONS[transition_for(pipe.scheduler)]
    scale = getattr(config, transition.scale_key)
    latents_out[:, 0] = x
    timesteps = pipe.scheduler.timesteps
    extra = _extra(hooks, x.shape[0])
    net = backbone(pipe)
    for i, t in enumerate(tqdm(timesteps, desc="sampling", leave=False, disable=not config.progress)):
        out = _guided(net, x, t, cond, config.guidance_scale, hooks.guidance, extra)
        mean, std = transition.distribution(pipe.scheduler, out, i, x, step_scale(scale, i, sde_steps))
        if hooks.transition is not None:
            mean, std = hooks.transition(mean, std, StepContext(i, t, x, out, embeds))
        step = take_step(mean, std, generator=generator, reduce=config.logprob_reduce, dtype=x.dtype)
        x = step.prev_sample
        latents_out[:, i + 1] = x
        log_probs_out[:, i] = step.log_prob
    return x


def sample_trajectory(
    pipe,
    prompts: list[str],
    config: SamplerConfig,
    generator: torch.Generator,
    policy_version: int = 0,
    modifiers: Optional[ModifierStack] = None,
    latents: Optional[torch.Tensor] = None,
    sde_steps: Optional[list[int]] = None,
) -> Trajectory:
    """Sample one chain per prompt with per-step log-probs (no autograd graph).

    ``modifiers``: the caller's stack (None: built from ``config.modifiers``; if those are set, the
    stack must have been built from them). Runs under ``torch.inference_mode`` (``no_grad`` if a
    modifier ``needs_grad``); the returned tensors are ordinary tensors that the learner can feed to
    autograd. ``latents`` overrides x_T (and with it the resolution); else x_T is drawn at
    ``config.height`` × ``config.width``. ``sde_steps``: the stochastic steps
    (align/sampling/window.py); None: the config's window, a drawn one seeded from ``generator``'s
    initial seed.
    """
    config.validate()
    if sde_steps is None:
        first = generator[0] if isinstance(generator, (list, tuple)) else generator  # per-image generators
        sde_steps = stochastic_steps(config, first.initial_seed())
    stack = _stack(config.modifiers, modifiers, "sampler.modifiers")
    hooks = stack.hooks(pipe, list(prompts))
    name = transition_for(pipe.scheduler)
    if latents is None:
        latents = initial_latents(pipe, len(prompts), generator, config.height, config.width)
    steps = config.num_inference_steps
    chain = latents.new_empty((latents.shape[0], steps + 1, *latents.shape[1:]))  # filled in place
    log_probs = torch.empty((latents.shape[0], steps), dtype=torch.float32, device=latents.device)
    with torch.no_grad() if hooks.needs_grad else torch.inference_mode(), stack.attention(pipe), pinned_device(pipe):
        embeds = encode_prompts(pipe, prompts, config.negative_prompt, config.guidance_scale)
        if hooks.prompt_embeds is not None:
            embeds = hooks.prompt_embeds(embeds)
        set_schedule(pipe, steps, latents)
        x0 = _chain(pipe, latents, embeds, config, hooks, generator, chain, log_probs, sde_steps)
        images = decode(pipe, x0) if config.output_type == "pt" else None
    sigmas = pipe.scheduler.sigmas if name == "flow_sde" else None
    return Trajectory(
        latents=chain,
        timesteps=_normal(pipe.scheduler.timesteps),
        log_probs=log_probs,
        prompts=list(prompts),
        images=_normal(images),
        sigmas=_normal(sigmas),
        policy_version=policy_version,
        guidance_scale=config.guidance_scale,
        noise_scale=getattr(config, TRANSITIONS[name].scale_key),
        num_inference_steps=steps,
        transition=name,
        logprob_reduce=config.logprob_reduce,
        modifiers=copy.deepcopy(stack.specs),
        sde_steps=sde_steps,
        **{k: _normal(v) for k, v in embeds.items()},
    )


def _stack(specs: list, modifiers: Optional[ModifierStack], where: str) -> ModifierStack:
    """The caller's stack, or one built from ``specs``; a stack built from other specs is an error."""
    from align.modifiers.protocol import build_modifiers, canonical_specs

    if modifiers is None:
        return build_modifiers(specs)
    if specs and canonical_specs(specs) != modifiers.specs:
        raise ValueError(
            f"the modifier stack passed was built from {modifiers.specs}, not from {where} "
            f"{canonical_specs(specs)}; build it with build_modifiers({where})"
        )
    return modifiers


def _normal(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A copy that autograd accepts (inference-mode tensors cannot be saved for backward)."""
    return None if t is None else t.clone()


def recompute_log_probs(
    pipe, traj: Trajectory, step_indices: Optional[list[int]] = None, modifiers: Optional[ModifierStack] = None
) -> torch.Tensor:
    """log π_θ(x_{t-1} | x_t, c) of the stored steps under the current weights: (B, len(step_indices)).

    Differentiable w.r.t. trainable (LoRA) parameters when called under autograd. Uses the stored
    embeddings (already hooked) and settings. ``modifiers``: the stack used at sampling (None: rebuilt
    from the trajectory's ``modifiers`` record, with the same guidance, transition and attention
    processors; modifiers added in code, e.g. steering, are not in the record).
    """
    stack = _stack(traj.modifiers, modifiers, "the trajectory's modifiers")
    hooks = stack.hooks(pipe)
    with stack.attention(pipe):
        return _recompute(pipe, traj, step_indices, hooks)


def _recompute(pipe, traj: Trajectory, step_indices: Optional[list[int]], hooks: SamplerHooks) -> torch.Tensor:
    if traj.noise_scale <= 0:
        raise ValueError(
            f"the trajectory was sampled deterministically ({traj.transition} noise scale "
            f"{traj.noise_scale}): it has no stochastic policy whose log-probs could be recomputed"
        )
    name = transition_for(pipe.scheduler)
    if name != traj.transition:
        raise ValueError(f"trajectory was sampled with {traj.transition!r}, the pipeline's scheduler gives {name!r}")
    set_schedule(pipe, traj.num_inference_steps, traj.latents[:, 0])
    _check_schedule(pipe.scheduler, traj)
    transition = TRANSITIONS[name]
    embeds = {k: getattr(traj, k) for k in TRAJECTORY_EMBEDS}
    cond = _conditioning(embeds, traj.guidance_scale > 1.0)
    out = []
    extra = _extra(hooks, traj.batch_size)
    net = backbone(pipe)
    for i in range(traj.num_steps) if step_indices is None else step_indices:
        x, t = traj.latents[:, i], pipe.scheduler.timesteps[i]
        model_out = _guided(net, x, t, cond, traj.guidance_scale, hooks.guidance, extra)
        scale = step_scale(traj.noise_scale, i, traj.sde_steps)
        mean, std = transition.distribution(pipe.scheduler, model_out, i, x, scale)
        if hooks.transition is not None:
            mean, std = hooks.transition(mean, std, StepContext(i, t, x, model_out, embeds))
        out.append(take_step(mean, std, prev_sample=traj.latents[:, i + 1], reduce=traj.logprob_reduce).log_prob)
    return torch.stack(out, dim=1)


def _check_schedule(scheduler, traj: Trajectory) -> None:
    same = torch.equal(scheduler.timesteps.cpu(), traj.timesteps.cpu())
    if traj.sigmas is not None:
        same = same and torch.equal(scheduler.sigmas.cpu(), traj.sigmas.cpu())
    if not same:
        raise ValueError(
            f"the scheduler's schedule for {traj.num_inference_steps} steps differs from the one the "
            "trajectory was sampled with (scheduler config changed?); recompute with the same scheduler"
        )

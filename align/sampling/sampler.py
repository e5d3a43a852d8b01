"""The sampling loop with per-step log-probs, over real diffusers pipelines (SD1.5- and SD3-class).

diffusers' ``pipe(...)`` cannot return log-probs (its callbacks see latents, not the step's
distribution), so we run our own loop on the pipeline's own parts: ``encode_prompt``,
``prepare_latents``, ``scheduler.set_timesteps``, the denoiser, and the VAE decoder.

Hook points for modifiers (:class:`SamplerHooks`): the prompt embeddings after encoding, the
guidance combination, and the step distribution ``(mean, std)`` before the step is drawn — so the
stored log-probs are always those of the transition that was actually taken.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from align.backbones.loading import backbone_kind, denoiser
from align.config import field
from align.sampling.trajectory import Trajectory
from align.sampling.transitions import TRANSITIONS, take_step, transition_for


@dataclasses.dataclass
class SamplerConfig:
    """How rollouts and `align sample` draw images."""
    num_inference_steps: int = field(20, help="denoising steps T")
    guidance_scale: float = field(4.5, help="classifier-free guidance scale w (no CFG when w <= 1)")
    eta: float = field(1.0, help="DDIM η (UNet backbones); > 0 for a stochastic policy")
    noise_level: float = field(0.7, help="flow-SDE noise level a (DiT backbones); > 0 for a stochastic policy")
    logprob_reduce: str = field("mean", choices=["mean", "sum"], help="reduction of the per-step log-density")
    negative_prompt: str = field("", help="prompt of CFG's unconditional branch")
    progress: bool = field(False, help="show a per-step progress bar")

    def validate(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.eta < 0 or self.noise_level < 0:
            raise ValueError("eta and noise_level must be >= 0")


GuidanceFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ε = ε_u + w (ε_c − ε_u)."""
    return uncond + scale * (cond - uncond)


@dataclasses.dataclass
class SamplerHooks:
    """Modifier hook points; the defaults are the identity (stock CFG, unmodified transition)."""
    prompt_embeds: Optional[Callable[[dict], dict]] = None
    guidance: GuidanceFn = cfg_combine
    step_distribution: Optional[Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]] = None


def noise_scale(pipe, cfg: SamplerConfig) -> float:
    return cfg.eta if transition_for(pipe.scheduler) == "ddim" else cfg.noise_level


def encode_prompts(pipe, prompts: list[str], cfg: SamplerConfig) -> dict[str, Optional[torch.Tensor]]:
    """Text embeddings for both CFG branches via the pipeline's own ``encode_prompt``."""
    cfg_on = cfg.guidance_scale > 1.0
    negative = [cfg.negative_prompt] * len(prompts)
    if backbone_kind(pipe) == "unet":
        pos, neg = pipe.encode_prompt(prompts, pipe.device, 1, cfg_on, negative_prompt=negative)
        return {"prompt_embeds": pos, "negative_prompt_embeds": neg,
                "pooled_prompt_embeds": None, "negative_pooled_prompt_embeds": None}
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, None, None, device=pipe.device,
                                                      do_classifier_free_guidance=cfg_on,
                                                      negative_prompt=negative)
    return {"prompt_embeds": pos, "negative_prompt_embeds": neg,
            "pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": neg_pooled}


def predict(pipe, latents: torch.Tensor, timestep: torch.Tensor, embeds: dict, guidance_scale: float,
            guidance: GuidanceFn = cfg_combine) -> torch.Tensor:
    """Denoiser output at (x_t, t, c); with CFG both branches go through one batched call."""
    cfg_on = guidance_scale > 1.0
    x = torch.cat([latents, latents]) if cfg_on else latents
    emb = embeds["prompt_embeds"]
    if cfg_on:
        emb = torch.cat([embeds["negative_prompt_embeds"], emb])
    if backbone_kind(pipe) == "unet":
        x = pipe.scheduler.scale_model_input(x, timestep)
        out = pipe.unet(x, timestep, encoder_hidden_states=emb, return_dict=False)[0]
    else:
        pooled = embeds["pooled_prompt_embeds"]
        if cfg_on:
            pooled = torch.cat([embeds["negative_pooled_prompt_embeds"], pooled])
        out = pipe.transformer(hidden_states=x, timestep=timestep.expand(x.shape[0]), encoder_hidden_states=emb,
                               pooled_projections=pooled, return_dict=False)[0]
    if not cfg_on:
        return out
    uncond, cond = out.chunk(2)
    return guidance(uncond, cond, guidance_scale)


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode final latents to images in [0, 1] (SD's scaling, SD3's scaling + shift)."""
    vae = pipe.vae
    z = latents / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None) is not None and backbone_kind(pipe) == "dit":
        z = z + vae.config.shift_factor
    image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    return (image / 2 + 0.5).clamp(0, 1)


def initial_latents(pipe, batch: int, generator: torch.Generator) -> torch.Tensor:
    """x_T from the pipeline's own ``prepare_latents`` at its default resolution."""
    net = denoiser(pipe)
    size = net.config.sample_size * pipe.vae_scale_factor
    dtype = next(net.parameters()).dtype
    return pipe.prepare_latents(batch, net.config.in_channels, size, size, dtype, pipe.device, generator)


def sample_trajectory(pipe, prompts: list[str], cfg: SamplerConfig, generator: torch.Generator,
                      policy_version: int = 0, hooks: Optional[SamplerHooks] = None,
                      latents: Optional[torch.Tensor] = None) -> Trajectory:
    """Sample B chains with log-probs; returns a :class:`Trajectory` (no gradients)."""
    hooks = hooks or SamplerHooks()
    name = transition_for(pipe.scheduler)
    distribution, scale = TRANSITIONS[name], noise_scale(pipe, cfg)
    # no_grad, not inference_mode: the stored tensors are reused under autograd by the learner
    with torch.no_grad():
        embeds = encode_prompts(pipe, prompts, cfg)
        if hooks.prompt_embeds is not None:
            embeds = hooks.prompt_embeds(embeds)
        pipe.scheduler.set_timesteps(cfg.num_inference_steps, device=pipe.device)
        timesteps = pipe.scheduler.timesteps
        x = initial_latents(pipe, len(prompts), generator) if latents is None else latents
        chain = torch.empty((x.shape[0], len(timesteps) + 1, *x.shape[1:]), dtype=x.dtype, device=x.device)
        log_probs = torch.empty((x.shape[0], len(timesteps)), dtype=torch.float32, device=x.device)
        chain[:, 0] = x
        for i, t in enumerate(tqdm(timesteps, desc="sampling", leave=False, disable=not cfg.progress)):
            out = predict(pipe, x, t, embeds, cfg.guidance_scale, hooks.guidance)
            mean, std = distribution(pipe.scheduler, out, i, x, scale)
            if hooks.step_distribution is not None:
                mean, std = hooks.step_distribution(mean, std, i)
            step = take_step(mean, std, generator=generator, reduce=cfg.logprob_reduce)
            x = step.prev_sample
            chain[:, i + 1] = x
            log_probs[:, i] = step.log_prob
        images = decode(pipe, x)
    return Trajectory(latents=chain, timesteps=timesteps.clone(), log_probs=log_probs, images=images,
                      prompts=list(prompts), policy_version=policy_version, guidance_scale=cfg.guidance_scale,
                      noise_scale=scale, num_inference_steps=cfg.num_inference_steps, transition=name,
                      logprob_reduce=cfg.logprob_reduce, **embeds)


def recompute_log_probs(pipe, traj: Trajectory, step_indices: Optional[list[int]] = None,
                        hooks: Optional[SamplerHooks] = None) -> torch.Tensor:
    """log π_θ(x_{t-1} | x_t, c) of the stored steps under the current weights: (B, len(steps)).

    Differentiable w.r.t. trainable (LoRA) parameters; uses the stored embeddings and settings.
    """
    hooks = hooks or SamplerHooks()
    if transition_for(pipe.scheduler) != traj.transition:
        raise ValueError(f"trajectory was sampled with {traj.transition!r} but the pipeline's scheduler "
                         f"gives {transition_for(pipe.scheduler)!r}")
    distribution = TRANSITIONS[traj.transition]
    pipe.scheduler.set_timesteps(traj.num_inference_steps, device=pipe.device)
    if not torch.equal(pipe.scheduler.timesteps.cpu(), traj.timesteps.cpu()):
        raise ValueError("trajectory timesteps differ from the scheduler's for the same number of steps")
    embeds = {k: getattr(traj, k) for k in ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                                            "negative_pooled_prompt_embeds")}
    steps = range(traj.num_steps) if step_indices is None else step_indices
    out = []
    for i in steps:
        x = traj.latents[:, i]
        model_out = predict(pipe, x, pipe.scheduler.timesteps[i], embeds, traj.guidance_scale, hooks.guidance)
        mean, std = distribution(pipe.scheduler, model_out, i, x, traj.noise_scale)
        if hooks.step_distribution is not None:
            mean, std = hooks.step_distribution(mean, std, i)
        out.append(take_step(mean, std, prev_sample=traj.latents[:, i + 1], reduce=traj.logprob_reduce).log_prob)
    return torch.stack(out, dim=1)

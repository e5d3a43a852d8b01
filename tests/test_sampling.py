"""Samplers with log-probs, checked against diffusers' own scheduler steps and the Gaussian density."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from align.backbones import attach_lora, denoiser
from align.backbones.presets import SD15_SCHEDULE
from align.sampling import (SamplerConfig, SamplerHooks, Trajectory, ddim_step_with_logprob,
                            flow_sde_distribution, flow_sde_step_with_logprob, recompute_log_probs,
                            sample_trajectory)

FP32_TOL = 1e-5
PROMPTS = ["two red circles on the left", "one blue square on the top", "three green triangles on the bottom"]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_step_matches_scheduler_step_and_gaussian_density(prediction_type: str, eta: float) -> None:
    sched = DDIMScheduler(prediction_type=prediction_type, **SD15_SCHEDULE)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    for i in [0, 4, 9]:  # first, middle and the last step (prev timestep < 0 → final ᾱ)
        t = sched.timesteps[i]
        x = torch.randn(2, 4, 8, 8, generator=g)
        model_out = torch.randn(2, 4, 8, 8, generator=g)
        z = torch.randn(2, 4, 8, 8, generator=g)
        ours = ddim_step_with_logprob(sched, model_out, i, x, eta=eta, noise=z, reduce="sum")
        ref = sched.step(model_out, t, x, eta=eta, variance_noise=z).prev_sample
        torch.testing.assert_close(ours.prev_sample, ref, atol=FP32_TOL, rtol=0)
        # independent density: diffusers' mean (variance_noise = 0) and its variance formula
        mean = sched.step(model_out, t, x, eta=eta, variance_noise=torch.zeros_like(z)).prev_sample
        prev_t = t - sched.config.num_train_timesteps // sched.num_inference_steps
        std = eta * sched._get_variance(t, prev_t) ** 0.5
        expected = torch.distributions.Normal(mean, std).log_prob(ref).sum(dim=(1, 2, 3))
        torch.testing.assert_close(ours.log_prob, expected, atol=FP32_TOL * expected.abs().max(), rtol=0)


def test_flow_sde_with_zero_noise_is_the_euler_scheduler_step() -> None:
    ours = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ours.set_timesteps(8)
    ref.set_timesteps(8)
    g = torch.Generator().manual_seed(1)
    x_ours = x_ref = torch.randn(2, 16, 4, 4, generator=g)
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(2, 16, 4, 4, generator=g)
        step = flow_sde_step_with_logprob(ours, v, i, x_ours, noise_level=0.0)
        x_ours = step.prev_sample
        x_ref = ref.step(v, t, x_ref).prev_sample
        torch.testing.assert_close(x_ours, x_ref, atol=FP32_TOL, rtol=0)
        assert torch.isnan(step.log_prob).all()  # deterministic step: no density, loudly


def test_flow_sde_samples_have_the_stated_mean_and_std() -> None:
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 4, 4, generator=g)
    v = torch.randn(1, 4, 4, 4, generator=g)
    mean, std = flow_sde_distribution(sched, v, 3, x, noise_level=0.7)
    n = 20000
    draws = torch.stack([flow_sde_step_with_logprob(sched, v, 3, x, noise_level=0.7, generator=g).prev_sample
                         for _ in range(n)])
    se_mean = std / math.sqrt(n)
    assert ((draws.mean(0) - mean).abs() < 5 * se_mean).all()
    se_std = std / math.sqrt(2 * n)
    assert ((draws.std(0) - std).abs() < 5 * se_std).all()
    # Flow-GRPO's drift: x + [v + σ²/(2t)(x + (1−t)v)]Δ with σ = a√(t/(1−t))
    t, t_next = sched.sigmas[3], sched.sigmas[4]
    sigma = 0.7 * (t / (1 - t)).sqrt()
    expected = x + (v + sigma ** 2 / (2 * t) * (x + (1 - t) * v)) * (t_next - t)
    torch.testing.assert_close(mean, expected, atol=FP32_TOL, rtol=0)
    torch.testing.assert_close(std, sigma * (t - t_next).sqrt(), atol=FP32_TOL, rtol=0)


@pytest.mark.parametrize("fixture", ["tiny_unet_pipe", "tiny_unet_vpred_pipe", "tiny_dit_pipe"])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_recomputed_log_probs_give_ratio_one(fixture: str, guidance_scale: float, request) -> None:
    pipe = request.getfixturevalue(fixture)
    cfg = SamplerConfig(num_inference_steps=4, guidance_scale=guidance_scale)
    traj = sample_trajectory(pipe, PROMPTS, cfg, torch.Generator().manual_seed(0))
    assert traj.latents.shape[:2] == (3, 5) and traj.log_probs.shape == (3, 4)
    assert torch.isfinite(traj.log_probs).all() and traj.images.shape[:2] == (3, 3)
    with torch.no_grad():
        new = recompute_log_probs(pipe, traj)
    ratio = torch.exp(new - traj.log_probs)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=FP32_TOL, rtol=0)
    sub = recompute_log_probs(pipe, traj, step_indices=[1, 3]).detach()
    torch.testing.assert_close(sub, new[:, [1, 3]], atol=FP32_TOL, rtol=0)


def test_recompute_has_gradients_on_lora_parameters_only(tiny_unet_pipe) -> None:
    pipe = tiny_unet_pipe
    attach_lora(pipe, "policy", rank=2)
    traj = sample_trajectory(pipe, PROMPTS[:2], SamplerConfig(num_inference_steps=3), torch.Generator().manual_seed(0))
    recompute_log_probs(pipe, traj, step_indices=[0, 2]).sum().backward()
    grads = {n: p.grad for n, p in denoiser(pipe).named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in pipe.text_encoder.parameters())


def test_identity_hooks_are_bit_identical(tiny_unet_pipe) -> None:
    cfg = SamplerConfig(num_inference_steps=3)
    plain = sample_trajectory(tiny_unet_pipe, PROMPTS, cfg, torch.Generator().manual_seed(5))
    hooks = SamplerHooks(prompt_embeds=lambda e: e, step_distribution=lambda m, s, i: (m, s))
    hooked = sample_trajectory(tiny_unet_pipe, PROMPTS, cfg, torch.Generator().manual_seed(5), hooks=hooks)
    assert torch.equal(plain.latents, hooked.latents) and torch.equal(plain.log_probs, hooked.log_probs)


def test_trajectory_save_load_select_and_cat(tiny_dit_pipe, tmp_path) -> None:
    cfg = SamplerConfig(num_inference_steps=2)
    a = sample_trajectory(tiny_dit_pipe, PROMPTS, cfg, torch.Generator().manual_seed(0), policy_version=3)
    a.save(tmp_path / "traj")
    b = Trajectory.load(tmp_path / "traj")
    assert b.prompts == a.prompts and b.policy_version == 3 and b.transition == "flow_sde"
    assert torch.equal(b.latents, a.latents) and torch.equal(b.pooled_prompt_embeds, a.pooled_prompt_embeds)
    part = a.select([2, 0])
    assert part.prompts == [PROMPTS[2], PROMPTS[0]] and torch.equal(part.log_probs, a.log_probs[[2, 0]])
    joined = Trajectory.cat([a.select([0]), a.select([1, 2])])
    assert joined.prompts == a.prompts and torch.equal(joined.latents, a.latents)
    with pytest.raises(ValueError, match="differ"):
        Trajectory.cat([a, dataclasses.replace(a, policy_version=4)])

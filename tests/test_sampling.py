"""The sampling loop over real (tiny) diffusers pipelines: parity with ``pipe(...)``, log-prob
recomputation, modifier hooks, LoRA gradients, and the ``Trajectory`` record."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from align.backbones import attach_lora, denoiser
from align.modifiers import Modifier, ModifierStack
from align.sampling import SamplerConfig, Trajectory, cfg_combine, recompute_log_probs, sample_trajectory

FP32_TOL = 1e-5  # fp32 round-off of identical computations in a different batch layout
PROMPTS = ["two red circles on the left", "one blue square on the top", "three green triangles on the bottom"]
PIPES = ["tiny_unet_pipe", "tiny_unet_vpred_pipe", "tiny_sdxl_pipe", "tiny_dit_pipe"]


def _sample(pipe, steps: int = 4, seed: int = 0, policy_version: int = 0, **cfg) -> Trajectory:
    return sample_trajectory(
        pipe,
        PROMPTS,
        SamplerConfig(num_inference_steps=steps, **cfg),
        torch.Generator().manual_seed(seed),
        policy_version=policy_version,
    )


@pytest.mark.parametrize("fixture", PIPES)
@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_sampler_matches_the_raw_pipeline_call(fixture: str, guidance_scale: float, request) -> None:
    """Same generator → same x_T and step noise as diffusers, so the same images (DiT: a = 0 is the ODE)."""
    pipe = request.getfixturevalue(fixture)
    is_ddim = fixture != "tiny_dit_pipe"
    traj = _sample(pipe, guidance_scale=guidance_scale, eta=1.0, noise_level=0.0)
    extra = {"eta": 1.0} if is_ddim else {}
    raw = pipe(
        PROMPTS,
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        **extra,
    ).images
    torch.testing.assert_close(traj.images, raw, atol=FP32_TOL, rtol=0)
    latent = _sample(pipe, guidance_scale=guidance_scale, eta=1.0, noise_level=0.0, output_type="latent")
    assert latent.images is None and torch.equal(latent.latents, traj.latents)


@pytest.mark.parametrize("fixture", PIPES)
@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_recomputed_log_probs_give_ratio_one(fixture: str, guidance_scale: float, request) -> None:
    pipe = request.getfixturevalue(fixture)
    traj = _sample(pipe, guidance_scale=guidance_scale)
    assert traj.latents.shape[:2] == (3, 5) and traj.log_probs.shape == (3, 4) and traj.images.shape[:2] == (3, 3)
    assert torch.isfinite(traj.log_probs).all() and traj.images.min() >= 0 and traj.images.max() <= 1
    with torch.no_grad():
        new = recompute_log_probs(pipe, traj)
    ratio = torch.exp(new - traj.log_probs)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=FP32_TOL, rtol=0)
    with torch.no_grad():
        sub = recompute_log_probs(pipe, traj.select([2, 0]), step_indices=[1, 3])
    torch.testing.assert_close(sub, new[[2, 0]][:, [1, 3]], atol=FP32_TOL, rtol=0)


@pytest.mark.parametrize("fixture", ["tiny_unet_pipe", "tiny_sdxl_pipe", "tiny_dit_pipe"])
def test_recompute_has_gradients_on_lora_parameters_only(fixture: str, request) -> None:
    pipe = request.getfixturevalue(fixture)
    attach_lora(pipe, "policy", rank=2)
    traj = _sample(pipe, steps=3)
    assert not any(t.is_inference() for t in (traj.latents, traj.prompt_embeds, traj.images, traj.timesteps))
    recompute_log_probs(pipe, traj, step_indices=[0, 2]).sum().backward()
    named = [
        (n, p)
        for module in pipe.components.values()
        if isinstance(module, torch.nn.Module)
        for n, p in module.named_parameters()
    ]
    with_grad = {n: p.grad for n, p in named if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert any(g.abs().sum() > 0 for g in with_grad.values())
    assert {n for n, p in denoiser(pipe).named_parameters() if "lora_" in n} == set(with_grad)


@dataclasses.dataclass
class _IdentityHooks(Modifier):
    """Every hook point of the protocol, each the identity (and autograd on, like steering)."""

    name = "identity_hooks"
    needs_grad = True

    def embeds(self, pipe, embeds, prompts):
        return dict(embeds)

    def guidance(self):
        return lambda u, c, w: u + w * (c - u)

    def transition(self, pipe):
        return lambda mean, std, ctx: (mean, std)


@dataclasses.dataclass
class _Nudge(Modifier):
    """A transition modifier, e.g. steering: shift the mean, widen the step."""

    name = "nudge"

    def transition(self, pipe):
        return lambda mean, std, ctx: (mean + 0.1 * ctx.sample, std * 1.5)


def test_identity_hooks_are_bit_identical(tiny_unet_pipe) -> None:
    plain = _sample(tiny_unet_pipe, steps=3, seed=5)
    stack = ModifierStack([_IdentityHooks()])
    hooks = stack.hooks(tiny_unet_pipe, PROMPTS)
    assert hooks.prompt_embeds and hooks.transition and hooks.needs_grad  # every hook point is used
    hooked = sample_trajectory(
        tiny_unet_pipe, PROMPTS, SamplerConfig(num_inference_steps=3), torch.Generator().manual_seed(5), modifiers=stack
    )
    for f in ("latents", "log_probs", "images", "prompt_embeds", "negative_prompt_embeds"):
        assert torch.equal(getattr(plain, f), getattr(hooked, f)), f


def test_transition_hook_changes_the_step_and_its_log_prob_consistently(tiny_dit_pipe) -> None:
    stack = ModifierStack([_Nudge()])
    plain, nudged = (
        _sample(tiny_dit_pipe),
        sample_trajectory(tiny_dit_pipe, PROMPTS, SamplerConfig(4), torch.Generator().manual_seed(0), modifiers=stack),
    )
    assert not torch.allclose(plain.latents[:, 1:], nudged.latents[:, 1:])
    assert nudged.modifiers == []  # made in code, not from config: not recorded
    with torch.no_grad():
        ratio = torch.exp(recompute_log_probs(tiny_dit_pipe, nudged, modifiers=stack) - nudged.log_probs)
        unhooked = recompute_log_probs(tiny_dit_pipe, nudged)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=FP32_TOL, rtol=0)
    assert not torch.allclose(unhooked, nudged.log_probs)
    assert cfg_combine(torch.zeros(1), torch.ones(1), 4.5).item() == 4.5


def test_recompute_refuses_deterministic_or_mismatched_trajectories(tiny_unet_pipe, tiny_dit_pipe) -> None:
    with pytest.raises(ValueError, match="deterministically"):
        recompute_log_probs(tiny_unet_pipe, _sample(tiny_unet_pipe, steps=2, eta=0.0))
    with pytest.raises(ValueError, match="sampled with 'flow_sde'"):
        recompute_log_probs(tiny_unet_pipe, _sample(tiny_dit_pipe, steps=2))
    traj = _sample(tiny_dit_pipe, steps=2)
    tiny_dit_pipe.scheduler.set_shift(1.0)
    with pytest.raises(ValueError, match="schedule"):
        recompute_log_probs(tiny_dit_pipe, traj)


def test_trajectory_save_load_select_and_cat(tiny_dit_pipe, tmp_path) -> None:
    a = _sample(tiny_dit_pipe, steps=2, policy_version=3)
    a.save(tmp_path / "traj")
    b = Trajectory.load(tmp_path / "traj")
    for f in dataclasses.fields(Trajectory):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, f.name
    assert b.transition == "flow_sde" and b.sigmas.shape == (3,) and b.policy_version == 3
    part = a.select([2, 0])
    assert part.prompts == [PROMPTS[2], PROMPTS[0]] and torch.equal(part.log_probs, a.log_probs[[2, 0]])
    assert torch.equal(part.timesteps, a.timesteps) and part.batch_size == 2 and part.num_steps == 2
    assert a.select(torch.tensor([False, True, True])).prompts == PROMPTS[1:]
    joined = Trajectory.cat([a.select([0]), a.select([1, 2])])
    assert joined.prompts == a.prompts
    assert all(torch.equal(getattr(joined, f), getattr(a, f)) for f in ("latents", "images", "pooled_prompt_embeds"))
    with pytest.raises(ValueError, match="settings differ"):
        Trajectory.cat([a, dataclasses.replace(a, policy_version=4)])
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="not a saved Trajectory"):
        Trajectory.load(tmp_path / "other")

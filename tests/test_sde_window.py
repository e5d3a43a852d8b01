"""The stochastic window (``sampler.sde_window``, ``sde_window_size``): SDE steps inside, deterministic steps
outside that equal diffusers' own η = 0 DDIM / flow-ODE step, log-probs only inside, the learner training
only the window, one window per batch across chunks, and one-line errors for windows that cannot exist."""

from __future__ import annotations

import re

import pytest
import torch

from align.backbones import attach_lora
from align.distributed import policy_steps, steps_per_update
from align.rollout.local import LocalRollouts
from align.rollout.worker import RolloutWorker
from align.sampling import SamplerConfig, predict, recompute_log_probs, sample_trajectory, set_schedule
from align.sampling.window import stochastic_steps, window_starts

FP32_TOL = 1e-5  # fp32 round-off of the same step computed by diffusers and by us
PROMPTS = ["two red circles on the left", "one blue square on the top"]


def _embeds(traj) -> dict:
    keys = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    return {k: getattr(traj, k) for k in keys}


@pytest.mark.parametrize("fixture", ["tiny_unet_pipe", "tiny_dit_pipe"])
def test_steps_outside_the_window_are_diffusers_deterministic_steps(fixture: str, request) -> None:
    """Outside the window x_{i+1} is ``scheduler.step`` at η = 0 (DDIM) or the flow ODE, with log π = 0;
    inside it the step is stochastic (log π ≠ 0) and recomputing it gives ratio 1."""
    pipe = request.getfixturevalue(fixture)
    cfg = SamplerConfig(num_inference_steps=5, guidance_scale=3.0, sde_window=[1, 2])
    traj = sample_trajectory(pipe, PROMPTS, cfg, torch.Generator().manual_seed(0))
    assert traj.sde_steps == [1, 2] and traj.trainable_steps() == [1, 2]
    assert torch.all(traj.log_probs[:, [0, 3, 4]] == 0) and torch.all(traj.log_probs[:, [1, 2]] != 0)
    set_schedule(pipe, 5, traj.latents[:, 0])
    for i in (0, 3, 4):
        x, t = traj.latents[:, i], pipe.scheduler.timesteps[i]
        with torch.no_grad():
            out = predict(pipe, x, t, _embeds(traj), cfg.guidance_scale)
            if fixture == "tiny_unet_pipe":
                ref = pipe.scheduler.step(out, t, x, eta=0.0).prev_sample
            else:
                pipe.scheduler._step_index = i  # diffusers' flow scheduler keeps the step index as state
                ref = pipe.scheduler.step(out, t, x).prev_sample
        torch.testing.assert_close(traj.latents[:, i + 1], ref, atol=FP32_TOL, rtol=0)
    with torch.no_grad():
        ratio = torch.exp(recompute_log_probs(pipe, traj) - traj.log_probs)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=FP32_TOL, rtol=0)


def test_the_window_keeps_the_noise_stream(tiny_unet_pipe) -> None:
    """Every step draws its noise, stochastic or not, so before the window the chain is the ODE chain and the
    window's first step adds the same noise as the full SDE chain's would (paired comparisons stay paired)."""
    full = sample_trajectory(
        tiny_unet_pipe, PROMPTS, SamplerConfig(num_inference_steps=4), torch.Generator().manual_seed(3)
    )
    ode = sample_trajectory(
        tiny_unet_pipe, PROMPTS, SamplerConfig(num_inference_steps=4, sde_window=[3]), torch.Generator().manual_seed(3)
    )
    first = sample_trajectory(
        tiny_unet_pipe, PROMPTS, SamplerConfig(num_inference_steps=4, sde_window=[0]), torch.Generator().manual_seed(3)
    )
    assert torch.equal(full.latents[:, 1], first.latents[:, 1])  # step 0 stochastic in both, same noise
    assert not torch.equal(ode.latents[:, 1], first.latents[:, 1])


def test_a_drawn_window_is_one_per_batch_and_reproducible(tiny_unet_pipe) -> None:
    """``sde_window_size`` inside the first ``sde_window_span``: the window is a function of the batch seed only,
    the same for every chunk (so they concatenate), and every candidate start occurs."""
    cfg = SamplerConfig(num_inference_steps=10, sde_window_size=2, sde_window_span=0.5)
    assert window_starts(cfg) == [0, 1, 2, 3]
    windows = {tuple(stochastic_steps(cfg, seed)) for seed in range(60)}
    assert windows == {(0, 1), (1, 2), (2, 3), (3, 4)}
    assert stochastic_steps(cfg, 7) == stochastic_steps(cfg, 7)
    assert window_starts(SamplerConfig(num_inference_steps=3, sde_window_size=2, sde_window_span=0.5)) == [0]
    assert window_starts(SamplerConfig(num_inference_steps=6, sde_window_size=2)) == [0, 1, 2, 3, 4]
    small = SamplerConfig(num_inference_steps=6, sde_window_size=2)
    attach_lora(tiny_unet_pipe, "policy")
    group = LocalRollouts(RolloutWorker(tiny_unet_pipe, small), chunk_size=1)  # two chunks, two chunk seeds
    traj = group.rollout(PROMPTS, seed=11)
    assert traj.sde_steps == stochastic_steps(small, 11) and traj.batch_size == 2
    nonzero = (traj.log_probs != 0).all(dim=0).nonzero().flatten().tolist()
    assert nonzero == traj.sde_steps


def test_a_fixed_window_takes_precedence_over_a_drawn_one(tiny_unet_pipe) -> None:
    cfg = SamplerConfig(num_inference_steps=5, sde_window=[4], sde_window_size=2)
    assert stochastic_steps(cfg, 0) == [4] and stochastic_steps(cfg, 1) == [4]


def test_the_learner_trains_only_the_window(tiny_train_cfg, tiny_unet_pipe) -> None:
    """With a window the policy's steps are the window's (``trainer.step_window`` applies to full SDE chains
    only) and a minibatch trains ``timestep_fraction`` of them; the critic still sees every state."""
    cfg = tiny_train_cfg("sampler.num_inference_steps=6", "sampler.sde_window=[2,4]", "trainer.timestep_fraction=1.0")
    assert steps_per_update(tiny_train_cfg("sampler.num_inference_steps=6")) == 2  # the default drawn window: 2
    traj = sample_trajectory(tiny_unet_pipe, PROMPTS, cfg.sampler, torch.Generator().manual_seed(0))
    assert policy_steps(cfg, traj) == [2, 4] and steps_per_update(cfg) == 2
    full = tiny_train_cfg(
        "sampler.num_inference_steps=6",
        "sampler.sde_window_size=0",
        "trainer.step_window=0.5",
        "trainer.timestep_fraction=1.0",
    )
    traj = sample_trajectory(tiny_unet_pipe, PROMPTS, full.sampler, torch.Generator().manual_seed(0))
    assert policy_steps(full, traj) == [0, 1, 2] and steps_per_update(full) == 3


@pytest.mark.parametrize("algo", ["ecg", "grpo"])
def test_align_train_with_a_drawn_window(tiny_train_cfg, algo: str) -> None:
    """A run whose batches have different windows: ECG's replay mixes them for the critic, and every policy
    update recomputes only the window's steps."""
    from align.train import train

    cfg = tiny_train_cfg(
        f"algo={algo}",
        "sampler.num_inference_steps=4",
        "sampler.sde_window_size=2",
        "sampler.sde_window_span=1.0",
        "trainer.iterations=3",
        *(["critic.pretrain_iterations=1", "critic.replay_batches=2"] if algo == "ecg" else []),
    )
    state = train(cfg, log=lambda *a, **k: None)
    assert state.policy_updates == 3
    assert all(h["approx_kl"] == h["approx_kl"] for h in state.history if h["phase"] == "policy")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sde_window": [0, 7]}, "distinct step indices in [0, 4]"),
        ({"sde_window": [1, 1]}, "distinct step indices"),
        ({"sde_window_size": 6}, "sde_window_size must be in [0, 5]"),
        ({"sde_window_size": 2, "sde_window_span": 0.0}, "sde_window_span must be in (0, 1]"),
        ({"sde_window_size": 2, "sde_window_span": 1.5}, "sde_window_span must be in (0, 1]"),
        ({"sde_window": ["a"]}, "take integers"),
        ({"sde_window_size": 2.5}, "take integers"),
    ],
)
def test_windows_that_cannot_exist_are_one_line_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplerConfig(num_inference_steps=5, **overrides).validate()


def test_shared_group_noise_gives_each_group_one_x_T(tiny_unet_pipe) -> None:
    """``trainer.shared_group_noise``: the G samples of a prompt start from one x_T, also when a chunk cuts the
    group, and different groups (and batches) start from different ones; the step noise stays per chunk."""
    attach_lora(tiny_unet_pipe, "policy")
    prompts = ["a red circle"] * 3 + ["a blue square"] * 3
    group = LocalRollouts(RolloutWorker(tiny_unet_pipe, SamplerConfig(num_inference_steps=3)), chunk_size=2)
    traj = group.rollout(prompts, seed=5, group_size=3)
    x_T = traj.latents[:, 0]
    assert all(torch.equal(x_T[j], x_T[0]) for j in (1, 2)) and all(torch.equal(x_T[j], x_T[3]) for j in (4, 5))
    assert not torch.equal(x_T[0], x_T[3])
    assert not torch.equal(traj.latents[0, 1], traj.latents[1, 1])  # the first step's noise differs
    again = group.rollout(prompts, seed=6, group_size=3)
    assert not torch.equal(again.latents[0, 0], x_T[0])
    assert torch.equal(group.rollout(prompts, seed=5, group_size=3).latents, traj.latents)

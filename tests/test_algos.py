"""Advantage estimators and losses against hand computations (docs/algorithms.md, "Algorithms: one registered
object each")."""

from __future__ import annotations

import pytest
import torch

from align.algos.core import (
    PerPromptStatTracker,
    RunningMeanStd,
    explained_variance,
    gae_along_chain,
    grpo_advantages,
    ppo_clip_loss,
    value_loss,
)


def test_gae_matches_hand_computation_on_a_four_step_chain() -> None:
    values = torch.tensor([[1.0, 2.0, 4.0, 3.0]])
    reward = torch.tensor([5.0])
    # δ = [2−1, 4−2, 3−4, 5−3] = [1, 2, −1, 2]; A_i = δ_i + λ A_{i+1}
    torch.testing.assert_close(gae_along_chain(values, reward, 0.5), torch.tensor([[2.0, 2.0, 0.0, 2.0]]))
    torch.testing.assert_close(gae_along_chain(values, reward, 1.0), torch.tensor([[4.0, 3.0, 1.0, 2.0]]))
    torch.testing.assert_close(gae_along_chain(values, reward, 0.0), torch.tensor([[1.0, 2.0, -1.0, 2.0]]))


def test_gae_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="values must be"):
        gae_along_chain(torch.zeros(2, 3), torch.zeros(3), 0.9)


def test_ppo_loss_at_ratio_one_is_minus_mean_advantage() -> None:
    adv = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    loss, stats = ppo_clip_loss(logp, logp.detach(), adv, clip_range=0.2)
    torch.testing.assert_close(loss, -adv.mean())
    assert stats["clip_frac"] == 0 and stats["approx_kl"] == 0
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / adv.numel())  # dρ/dlogπ = ρ = 1


def test_ppo_clipping_is_active_exactly_where_it_should_be() -> None:
    eps = 0.2
    ratios = torch.tensor([0.5, 0.9, 1.1, 1.5, 0.5, 0.9, 1.1, 1.5])
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0])
    # A > 0: the clipped branch is the max only when ρ > 1 + ε; A < 0: only when ρ < 1 − ε
    expected_clipped = torch.tensor([False, False, False, True, True, False, False, False])
    logp = torch.log(ratios).requires_grad_(True)
    loss, stats = ppo_clip_loss(logp, torch.zeros(8), adv, clip_range=eps)
    loss.backward()
    assert torch.equal(logp.grad == 0, expected_clipped)  # clipped elements carry no gradient
    assert stats["clip_frac"].item() == pytest.approx(expected_clipped.float().mean().item())
    manual = torch.maximum(-adv * ratios, -adv * ratios.clamp(1 - eps, 1 + eps)).mean()
    torch.testing.assert_close(loss.detach(), manual)


def test_value_loss_and_its_clipping() -> None:
    pred, target = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 1.0])
    assert value_loss(pred, target).item() == pytest.approx(0.5 * (1 + 4) / 2)
    old = torch.tensor([1.5, 1.5])
    # clipped prediction [1.0, 1.7] → errors [1, 0.49]; max with unclipped [1, 4] → [1, 4]
    assert value_loss(pred, target, old, clip_range=0.2).item() == pytest.approx(0.5 * (1 + 4) / 2)


def test_explained_variance_endpoints() -> None:
    g = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(g, g) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(g, g.mean()), g) == pytest.approx(0.0)


def test_grpo_group_normalised_advantages() -> None:
    rewards = torch.tensor([1.0, 3.0, 10.0, 10.0])
    groups = torch.tensor([0, 0, 1, 1])
    adv = grpo_advantages(rewards, groups, eps=0.0 + 1e-12)
    torch.testing.assert_close(adv[:2], torch.tensor([-1.0, 1.0]))
    assert torch.equal(adv[2:], torch.zeros(2))  # identical rewards: no signal


def test_running_mean_std_matches_batch_statistics() -> None:
    data = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3 + 2
    rms = RunningMeanStd(eps=0.0)
    for chunk in data.split(37):
        rms.update(chunk)
    exact = data.double()  # the tracker accumulates in float64
    assert rms.mean == pytest.approx(exact.mean().item(), abs=1e-12)
    assert rms.var == pytest.approx(exact.var(unbiased=False).item(), rel=1e-12)


def test_per_prompt_stat_tracker_normalises_per_prompt() -> None:
    tracker = PerPromptStatTracker(buffer_size=8, min_count=2)
    adv = tracker.update(["a", "a", "b", "b"], torch.tensor([1.0, 3.0, 10.0, 30.0]))
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5, rtol=0)


def test_value_replay_keeps_the_last_batches_renormalised_and_round_trips(tmp_path, tiny_unet_pipe) -> None:
    """Replayed targets are the stored raw rewards normalised with the statistics given *now*."""
    from align.algos.value_replay import ValueReplay
    from align.sampling import SamplerConfig, sample_trajectory

    trajs = [
        sample_trajectory(
            tiny_unet_pipe,
            ["two red circles on the left"] * 2,
            SamplerConfig(num_inference_steps=2),
            torch.Generator().manual_seed(s),
        )
        for s in range(3)
    ]
    raws = [torch.tensor([[1.0], [2.0]]) * (s + 1) for s in range(3)]
    replay = ValueReplay(capacity=2)
    for t, r in zip(trajs, raws):
        replay.add(t, r)
    traj, targets = replay.batch(lambda r: (r - 3.0) / 2.0)
    assert len(replay) == 2 and traj.batch_size == 4
    torch.testing.assert_close(traj.latents, torch.cat([trajs[1].latents, trajs[2].latents]))
    torch.testing.assert_close(targets, (torch.cat(raws[1:]) - 3.0) / 2.0)
    replay.save(tmp_path)
    loaded = ValueReplay(capacity=2)
    loaded.load(tmp_path)
    traj2, targets2 = loaded.batch(lambda r: r)
    assert torch.equal(traj2.latents, traj.latents) and torch.equal(targets2, torch.cat(raws[1:]))
    assert traj2.prompts == traj.prompts
    with pytest.raises(ValueError, match="the replay is empty"):
        ValueReplay(capacity=0).batch(lambda r: r)


def test_the_registry_holds_the_three_algorithms_and_only_ecg_needs_a_critic() -> None:
    from align.algos.registry import ALGORITHMS, make_algorithm
    from align.train_config import TrainConfig

    assert make_algorithm(TrainConfig(algo="grpo")).name == "grpo"
    assert {name: cls.needs_critic for name, cls in ALGORITHMS.items()} == {"ecg": True, "grpo": False, "ddpo": False}
    with pytest.raises(ValueError, match="algo: unknown algorithm 'ppo'; choose one of: "):
        make_algorithm(TrainConfig(algo="ppo"))


def test_grpo_step_advantages_are_group_normalised_and_the_same_at_every_step() -> None:
    from align.algos.grpo import grpo_step_advantages

    targets = torch.tensor([[1.0], [3.0], [10.0], [30.0]])
    adv = grpo_step_advantages(targets, torch.tensor([1.0]), torch.tensor([0, 0, 1, 1]), num_steps=3)
    assert adv.shape == (4, 3) and torch.equal(adv[:, 0:1].expand(-1, 3), adv)
    torch.testing.assert_close(adv[:, 0], torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-3, rtol=0)


def test_ddpo_tracker_sees_raw_weighted_rewards() -> None:
    """The tracker's window holds R = Σ_k w_k R_k as scored, not scores normalised with drifting statistics."""
    from align.algos.core import PerPromptStatTracker
    from align.algos.ddpo import ddpo_step_advantages

    tracker = PerPromptStatTracker(buffer_size=8, min_count=2)
    raw = torch.tensor([[0.2, 1.0], [0.4, 3.0]])
    ddpo_step_advantages(raw, torch.tensor([1.0, -0.5]), ["p", "p"], tracker, num_steps=2)
    assert tracker.buffers["p"] == pytest.approx([0.2 - 0.5, 0.4 - 1.5])


def test_ecg_advantages_at_lambda_one_are_the_normalised_return_minus_value() -> None:
    from align.algos.ecg import ecg_step_advantages

    g = torch.Generator().manual_seed(0)
    values, targets = torch.randn(6, 4, 1, generator=g), torch.randn(6, 1, generator=g)
    adv = ecg_step_advantages(targets, torch.tensor([1.0]), values, gae_lambda=1.0, norm="batch")
    centred = targets - values[..., 0]
    torch.testing.assert_close(adv, (centred - centred.mean()) / centred.std(unbiased=False), atol=1e-5, rtol=0)


def test_ecg_per_step_normalisation_centres_every_step() -> None:
    """A critic biased at one step (V too low by 3 at step 1) shifts only that step's raw advantages;
    per-step normalisation leaves each step with mean 0 and variance 1 over the batch."""
    from align.algos.ecg import ecg_step_advantages

    g = torch.Generator().manual_seed(1)
    values, targets = torch.randn(8, 3, 1, generator=g), torch.randn(8, 1, generator=g)
    values[:, 1] -= 3.0
    adv = ecg_step_advantages(targets, torch.tensor([1.0]), values, gae_lambda=1.0, norm="step")
    torch.testing.assert_close(adv.mean(0), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv.var(0, unbiased=False), torch.ones(3), atol=1e-5, rtol=0)

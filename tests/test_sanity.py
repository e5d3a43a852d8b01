"""RL sanity suite (benchmarks/sanity.py): rewards with a known direction, and the loop moving them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from rewards import available_rewards, get_reward

ROOT = Path(__file__).resolve().parents[1]


def _sanity():
    spec = importlib.util.spec_from_file_location("sanity_bench", ROOT / "benchmarks" / "sanity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mean_brightness_is_the_mean_pixel_value() -> None:
    images = torch.stack([torch.zeros(3, 8, 8), torch.full((3, 8, 8), 0.25), torch.ones(3, 8, 8)])
    images[1, 0, :4] = 1.0  # a quarter of one channel brighter: + 0.75 / 3 / 2 on the mean
    out = get_reward("mean_brightness")(images, ["x"] * 3, {})
    torch.testing.assert_close(out, torch.tensor([0.0, 0.25 + 0.75 / 6, 1.0]))


def test_color_fraction_counts_the_pixels_near_the_colour() -> None:
    img = torch.zeros(1, 3, 4, 4)
    img[0, 0, :2] = 0.9  # top half reddish (distance 0.1 from pure red), bottom half black
    red = get_reward("color_fraction", color="red")(img, ["x"], {})
    black = get_reward("color_fraction", color="black")(img, ["x"], {})
    assert red.tolist() == [0.5] and black.tolist() == [0.5]
    with pytest.raises(ValueError, match="color_fraction: unknown color 'purple'; choose one of: black, white"):
        get_reward("color_fraction", color="purple")


def test_the_matrix_covers_every_registered_algorithm() -> None:
    from align.train_config import algorithm_names

    assert sorted(_sanity().ALGOS) == sorted(algorithm_names())


def test_sanity_rewards_are_builtins() -> None:
    found = available_rewards()
    assert found["mean_brightness"] == "builtin" and found["color_fraction"] == "builtin"


def reinforce(
    reward: str, sign: int, prompts: list[str], iterations: int, samples: int, lr: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimal REINFORCE on the same sampler, as a reference for the PPO learner: per iteration one batch
    of ``samples`` chains, A = standardised sign·R, one Adam step on −mean_j A_j Σ_i log π_θ(step i of j)
    (every step, no ratio, no clipping). Returns the unsigned reward of base and trained policy on
    the sanity suite's fixed evaluation noise."""
    sanity = _sanity()
    from align.backbones.adapter import denoiser
    from align.backbones.lora import lora_state_dict, set_active_adapters
    from align.config import load_config
    from align.policy import build_policy
    from align.rollout import RolloutWorker
    from align.sampling import recompute_log_probs
    from align.train_config import TrainConfig
    from rewards import score

    torch.manual_seed(seed)
    cfg = load_config(TrainConfig, None, sanity.RECIPE)
    pipe = build_policy(cfg)  # the recipe's model: the shipped toy
    params = [p for n, p in denoiser(pipe).named_parameters() if ".policy." in n and "lora_" in n]
    opt = torch.optim.Adam(params, lr=lr)
    worker = RolloutWorker(pipe, cfg.sampler)
    name, args = sanity.REWARDS[reward]
    fn = get_reward(name, **args)
    batch = [prompts[i % len(prompts)] for i in range(samples)]
    for it in range(iterations):
        traj = worker.rollout(batch, seed=1000 + 100 * seed + it)
        r = sign * score([fn], traj.images, batch)[0][:, 0]
        adv = (r - r.mean()) / (r.std() + 1e-8)
        set_active_adapters(pipe, ["policy"])
        loss = -(adv[:, None] * recompute_log_probs(pipe, traj)).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy = {k: v.detach().clone() for k, v in lora_state_dict(pipe, "policy").items()}
    base, final = sanity.paired_scores(cfg, policy, prompts, sanity.EVAL_SEEDS, reward)
    return torch.as_tensor(base), torch.as_tensor(final)


def test_paired_evaluation_uses_the_same_noise_for_both_policies(tmp_path) -> None:
    """The suite's pairing: the base policy scored twice on the fixed prompts and seeds gives identical
    rewards, so a paired gain measures the policy and nothing else (no sampling noise in it)."""
    sanity = _sanity()
    from align.backbones.lora import lora_state_dict
    from align.config import load_config
    from align.policy import build_policy
    from align.train_config import TrainConfig

    cfg = load_config(TrainConfig, None, sanity.RECIPE + [f"run_dir={tmp_path}"])
    pipe = build_policy(cfg)
    zero = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in lora_state_dict(pipe, "policy").items()}
    base, again = sanity.paired_scores(cfg, zero, sanity.sanity_prompts(1), 4, "mean_brightness")
    assert base.shape == (4,) and (base == again).all() and base.std() > 0


def _z(diff: torch.Tensor) -> float:
    return float(diff.mean() / (diff.std() / len(diff) ** 0.5))


@pytest.mark.timeout(1800)
def test_ci_case_grpo_makes_the_images_brighter(tmp_path) -> None:
    """The sanity suite's CI case: GRPO through the real driver and learner, brightness at weight +1 on the
    fixed bright prompt, 8 iterations × 32 samples; a large paired margin on noise training never saw."""
    sanity = _sanity()
    row = sanity.run_case("grpo", "mean_brightness", 1, tmp_path, iterations=8)
    sanity.print_table([row], 5.0, 0.5)
    assert sanity.passed(row, 5.0, 0.5), row


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_reinforce_reference_makes_a_bright_prompt_darker() -> None:
    """The reference for the PPO learner (docs/algorithms.md): plain REINFORCE on the same sampler,
    12 iterations × 32 samples of one bright prompt, brightness at weight −1."""
    base, final = reinforce(
        "mean_brightness", -1, ["three yellow circles on the left"], iterations=12, samples=32, lr=3e-3
    )
    print("REINFORCE darker: base", float(base.mean()), "final", float(final.mean()), "z", _z(base - final))
    assert _z(base - final) > 5


@pytest.mark.slow
@pytest.mark.timeout(4 * 3600)
@pytest.mark.parametrize("algo", ["ecg", "grpo", "ddpo"])
@pytest.mark.parametrize("reward", ["mean_brightness", "color_fraction", "jpeg_compressibility"])
@pytest.mark.parametrize("sign", [1, -1])
def test_sanity_matrix_moves_each_reward_both_ways(tmp_path, algo: str, reward: str, sign: int) -> None:
    """The full matrix of benchmarks/sanity.py: a large paired margin (gain/SE > 5 and more than half the
    base reward's std) in the asked direction. Measured status: docs/algorithms.md."""
    sanity = _sanity()
    row = sanity.run_case(algo, reward, sign, tmp_path, iterations=sanity.case_iterations(reward, sign))
    sanity.print_table([row], 5.0, 0.5)
    assert sanity.passed(row, 5.0, 0.5), row

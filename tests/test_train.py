"""`align train` end to end on the tiny preset: what moves, resume, bad rewards, config errors."""
from __future__ import annotations

import pytest
import torch

from align.backbones import denoiser
from align.checkpoint import load_tensors
from align.config import ConfigError, load_config
from align.train import build, train
from align.train_config import TrainConfig
from rewards import RewardError, register_reward

TINY = ["model.source=preset:tiny-unet", "sampler.num_inference_steps=3", "trainer.prompts_per_iteration=2",
        "trainer.samples_per_prompt=2", "trainer.minibatch_size=4", "eval_every=0", "eval_prompts=2",
        "critic.pretrain_iterations=1", "critic.hidden=16"]


def _cfg(tmp_path, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, None, TINY + [f"run_dir={tmp_path}", *extra])


@pytest.mark.parametrize("algo", ["ecg", "grpo", "ddpo"])
def test_training_moves_every_trainable_parameter(tmp_path, algo: str) -> None:
    """TRL-style guard against frozen adapters: after 2 iterations every policy (and critic) LoRA
    tensor differs from a fresh build with the same seed. The JPEG reward varies between samples
    even for the untrained tiny model, so every algorithm gets a learning signal."""
    cfg = _cfg(tmp_path, f"algo={algo}", "trainer.iterations=2", "critic.pretrain_iterations=0",
               "trainer.timestep_fraction=1.0", "rewards=[jpeg_compressibility:1.0]")
    fresh_pipe = build(cfg)[0]
    state = train(cfg, log=lambda *_: None)
    assert state.policy_updates == 2
    fresh = denoiser(fresh_pipe).state_dict()
    for name in ("policy_lora", "critic_lora") if algo == "ecg" else ("policy_lora",):
        adapter = name.split("_")[0]
        for key, value in load_tensors(tmp_path / "checkpoint" / f"{name}.safetensors").items():
            before = fresh[key.replace(".weight", f".{adapter}.weight")]
            assert not torch.equal(value, before), f"{name}: {key} never moved"


def test_ecg_iteration_leaves_the_base_bit_identical(tmp_path) -> None:
    cfg = _cfg(tmp_path, "trainer.iterations=1", "critic.pretrain_iterations=0")
    pipe, critic, reward_fns, weights, learner, worker = build(cfg)
    base = {k: v.clone() for k, v in denoiser(pipe).state_dict().items() if "lora_" not in k}
    heads = {k: v.clone() for k, v in critic.heads.state_dict().items()}
    lora = {k: v.clone() for k, v in denoiser(pipe).state_dict().items() if "lora_" in k}
    from align.train import iteration_prompts
    from rewards import score
    prompts = iteration_prompts(cfg, 0)
    traj = worker.rollout(prompts, seed=0)
    raw, _ = score(reward_fns, traj.images, prompts)
    targets = (raw - raw.mean()) / (raw.std() + 1e-6) + torch.randn(raw.shape, generator=torch.Generator().manual_seed(0))
    values = learner.values(traj)
    adv = torch.randn(traj.batch_size, traj.num_steps, generator=torch.Generator().manual_seed(1))
    learner.update(traj, adv, targets, values, train_policy=True)
    state = denoiser(pipe).state_dict()
    for k, v in base.items():
        assert torch.equal(state[k], v), k
    changed = [k for k, v in lora.items() if not torch.equal(state[k], v)]
    assert any(".policy." in k for k in changed) and any(".critic." in k for k in changed)
    assert all(not torch.equal(critic.heads.state_dict()[k], v) for k, v in heads.items())


def test_value_pretraining_does_not_move_the_policy(tmp_path) -> None:
    cfg = _cfg(tmp_path, "trainer.iterations=1", "critic.pretrain_iterations=5", "critic.pretrain_ev_threshold=2.0")
    state = train(cfg, log=lambda *_: None)
    assert state.policy_updates == 0 and state.history[0]["phase"] == "value-pretrain"
    policy = load_tensors(tmp_path / "checkpoint" / "policy_lora.safetensors")
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in policy.items() if "lora_B" in k)


def test_resume_matches_an_uninterrupted_run(tmp_path) -> None:
    straight = _cfg(tmp_path / "a", "trainer.iterations=3")
    train(straight, log=lambda *_: None)
    split = _cfg(tmp_path / "b", "trainer.iterations=3")
    train(split, stop_after=1, log=lambda *_: None)
    train(split, resume=True, log=lambda *_: None)
    for name in ("policy_lora", "critic_lora", "critic_heads"):
        a = load_tensors(tmp_path / "a" / "checkpoint" / f"{name}.safetensors")
        b = load_tensors(tmp_path / "b" / "checkpoint" / f"{name}.safetensors")
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


@register_reward("test_nan_reward")
class _NanReward:
    name = "test_nan_reward"

    def __call__(self, images, prompts, metadata):
        out = torch.zeros(len(prompts))
        out[0] = float("nan")
        return out


def test_nan_reward_stops_before_any_update(tmp_path) -> None:
    cfg = _cfg(tmp_path, "trainer.iterations=1", "rewards=[toy_geneval:1.0,test_nan_reward:0.5]")
    with pytest.raises(RewardError, match="reward 'test_nan_reward' returned non-finite values on a batch of 4"):
        train(cfg, log=lambda *_: None)
    assert not (tmp_path / "checkpoint").exists()


@pytest.mark.parametrize("override, message", [
    ("algo=ppo", "config key 'algo' = 'ppo' is not valid; choose one of: ecg, grpo, ddpo"),
    ("rewards=[nope:1.0]", "unknown reward 'nope'; available: "),
])
def test_unknown_algorithm_or_reward_lists_the_valid_ones(tmp_path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", "\\(")):
        _cfg(tmp_path, override)

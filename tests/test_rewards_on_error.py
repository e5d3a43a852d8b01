"""``reward_on_error``: raise stops training naming the plugin; skip_batch drops the whole batch
(no normaliser update, no optimiser step) and counts it; ``align rewards check`` flags bad plugins."""

from __future__ import annotations

import json

import pytest
import torch

from align.checkpoint import load_tensors
from align.cli import main
from align.train import train
from rewards import RewardError, register_reward

FAILS_ON_CALLS: set[int] = set()
CALLS = [0]


@register_reward("test_flaky_reward")
class _Flaky:
    """Mean brightness, but returns inf on the calls numbered in FAILS_ON_CALLS (1-based)."""

    name, device, batch_size = "test_flaky_reward", "cpu", None

    def __call__(self, images, prompts, metadata):
        CALLS[0] += 1
        out = images.mean(dim=(1, 2, 3))
        if CALLS[0] in FAILS_ON_CALLS:
            out[1] = float("inf")
        return out


def _train(tiny_train_cfg, fails: set[int], on_error: str, iterations: int = 2):
    FAILS_ON_CALLS.clear()
    FAILS_ON_CALLS.update(fails)
    CALLS[0] = 0
    # in-process rewards (tiny_train_cfg): the test rewards live in this process
    cfg = tiny_train_cfg(
        "algo=grpo",
        f"trainer.iterations={iterations}",
        "rewards=[{name: toy_geneval}, {name: test_flaky_reward, weight: 0.5}]",
        f"reward_on_error={on_error}",
    )
    lines: list[str] = []
    return train(cfg, log=lines.append), lines


def test_skip_batch_drops_the_failing_batch_and_counts_it(tmp_path, tiny_train_cfg) -> None:
    state, lines = _train(tiny_train_cfg, fails={1}, on_error="skip_batch")
    assert state.skipped_batches == 1 and state.policy_updates == 1 and state.iteration == 2
    assert [h["iteration"] for h in state.history] == [2]
    skipped = [x for x in lines if "[skipped batch]" in x]
    assert (
        len(skipped) == 1
        and "reward 'test_flaky_reward' returned non-finite values on a batch of 4: [inf]" in skipped[0]
        and "skipped batches: 1" in skipped[0]
    )
    saved = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert saved["skipped_batches"] == 1
    assert saved["normalisers"]["test_flaky_reward"]["count"] == pytest.approx(4, abs=1e-3)  # the good batch only


def test_skip_batch_never_updates_on_a_failed_batch(tmp_path, tiny_train_cfg) -> None:
    state, _ = _train(tiny_train_cfg, fails={1, 2}, on_error="skip_batch")
    assert state.skipped_batches == 2 and state.policy_updates == 0 and state.history == []
    policy = load_tensors(tmp_path / "checkpoint" / "policy_lora.safetensors")
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in policy.items() if "lora_B" in k)


def test_raise_stops_at_the_failing_batch(tmp_path, tiny_train_cfg) -> None:
    with pytest.raises(RewardError, match="reward 'test_flaky_reward' returned non-finite values on a batch of 4"):
        _train(tiny_train_cfg, fails={2}, on_error="raise")
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["iteration"] == 1


@register_reward("test_batch_dependent")
def _batch_dependent(images, prompts, metadata):
    """Centred within the batch: depends on the other images, so batch size changes it."""
    m = images.mean(dim=(1, 2, 3))
    return m - m.mean()


def test_rewards_check_passes_a_good_reward_and_flags_a_batch_dependent_one(capsys) -> None:
    assert main(["rewards", "check", "jpeg_incompressibility", "--arg", "batch_size=3", "--num-images", "4"]) == 0
    out = capsys.readouterr().out
    assert "PASS  batch-size invariance" in out and "jpeg_incompressibility: ok" in out
    assert main(["rewards", "check", "test_batch_dependent", "--num-images", "4"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  batch-size invariance" in out and "test_batch_dependent: FAILED" in out


def test_rewards_check_reports_non_finite_scores_naming_the_plugin(capsys) -> None:
    FAILS_ON_CALLS.clear()
    FAILS_ON_CALLS.add(1)
    CALLS[0] = 0
    assert main(["rewards", "check", "test_flaky_reward", "--num-images", "2"]) == 1
    assert (
        "FAIL  shape, dtype, finite   reward 'test_flaky_reward' returned non-finite values on a batch of 2"
        in capsys.readouterr().out
    )


def test_rewards_list_shows_builtins_and_their_descriptions(capsys) -> None:
    assert main(["rewards", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("clip_score", "hpsv2", "aesthetic", "jpeg_compressibility", "toy_geneval"):
        assert any(line.split()[:2] == [name, "builtin"] for line in out.splitlines()), name
    assert "100·max(cos, 0)" in out


@register_reward("test_constant_a")
def _constant_a(images, prompts, metadata):
    return torch.full((len(prompts),), 0.25)


@register_reward("test_constant_b")
def _constant_b(images, prompts, metadata):
    return torch.full((len(prompts),), -2.0)


def test_raw_scores_are_logged_per_reward_with_the_weighted_sum(tmp_path, tiny_train_cfg) -> None:
    cfg = tiny_train_cfg(
        "algo=grpo",
        "trainer.iterations=1",
        "rewards=[{name: test_constant_a, weight: 2.0}, {name: test_constant_b, weight: 0.5}]",
    )
    lines: list[str] = []
    record = train(cfg, log=lines.append).history[0]
    assert record["reward/test_constant_a"] == 0.25 and record["reward/test_constant_b"] == -2.0
    assert record["reward/weighted"] == pytest.approx(2.0 * 0.25 + 0.5 * -2.0, abs=1e-6)
    assert "test_constant_a 0.250 | test_constant_b -2.000 | weighted -0.500" in lines[0]

"""Rollouts overlapped with training (``learner.max_policy_lag=1``, align/rollout/overlap.py): the actors sample
iteration k+1 with the policy that sampled... k's update's input while the learner trains on k. Tested with one
real local Ray rollout actor: lag 0 is the synchronous loop bit for bit, lag 1 trains every batch after the
first one policy version behind, and a run interrupted with a batch in flight resumes to the same weights."""

from __future__ import annotations

import pytest
import torch

from align.checkpoint import load_tensors
from align.config import ConfigError
from align.train import train

pytestmark = pytest.mark.distributed

RAY = ["ray.num_rollout_workers=1", "ray.num_reward_workers=0"]
#: a reward that varies within every group of the tiny model's images, so every update moves the policy
BRIGHT = "rewards=[{name: mean_brightness, weight: 1.0}]"


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module (``align train`` joins a running Ray and leaves it running)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def _lora(run_dir) -> dict[str, torch.Tensor]:
    return load_tensors(run_dir / "checkpoint" / "policy_lora.safetensors")


def _assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0)


def test_lag_0_through_an_actor_is_the_in_process_loop_and_lag_1_trains_one_version_behind(
    ray_session, tmp_path, tiny_train_cfg
) -> None:
    """Lag 0 with a rollout actor ends bit for bit as the in-process synchronous loop (every batch by the current
    policy); lag 1 trains the same first batch (nothing to lag behind yet), then each batch sampled by the
    version before the learner's, and so ends elsewhere."""
    common = ["algo=grpo", "trainer.iterations=3", BRIGHT]
    local = train(tiny_train_cfg(f"run_dir={tmp_path / 'local'}", *common), log=lambda *_: None)
    sync = train(tiny_train_cfg(f"run_dir={tmp_path / 'sync'}", *common, *RAY), log=lambda *_: None)
    _assert_same(_lora(tmp_path / "local"), _lora(tmp_path / "sync"))
    assert [h["policy_lag"] for h in local.history] == [h["policy_lag"] for h in sync.history] == [0, 0, 0]
    lagged = train(
        tiny_train_cfg(f"run_dir={tmp_path / 'lag1'}", *common, *RAY, "learner.max_policy_lag=1"), log=lambda *_: None
    )
    assert [h["policy_lag"] for h in lagged.history] == [0, 1, 1]
    assert "timing/rollout_wait" in lagged.history[-1] and "timing/rollout" in lagged.history[-1]
    first = train(
        tiny_train_cfg(f"run_dir={tmp_path / 'lag1_first'}", *common, *RAY, "learner.max_policy_lag=1"),
        stop_after=1,
        log=lambda *_: None,
    )
    assert first.iteration == 1
    train(tiny_train_cfg(f"run_dir={tmp_path / 'sync_first'}", *common, *RAY), stop_after=1, log=lambda *_: None)
    _assert_same(_lora(tmp_path / "lag1_first"), _lora(tmp_path / "sync_first"))
    final, synced = _lora(tmp_path / "lag1"), _lora(tmp_path / "sync")
    assert all(v.abs().max() > 0 for k, v in synced.items() if "lora_B" in k)  # the updates moved the policy
    assert any(not torch.equal(final[k], v) for k, v in synced.items())


def test_an_overlapped_run_interrupted_with_a_batch_in_flight_resumes_to_the_same_weights(
    ray_session, tmp_path, tiny_train_cfg
) -> None:
    """ECG (value pretraining, then policy iterations) at lag 1, stopped after iterations 1 and 3 with the next
    batch being sampled (it is dropped: a kill loses it the same way), resumed each time: the checkpoint
    holds the policy that was sampling that batch, so the resumed run samples it again with the same weights
    and seed. Nothing is lost or duplicated (iterations 1..4, each once) and the weights equal an uninterrupted
    run's within 1e-6."""
    common = [
        "trainer.iterations=3",
        BRIGHT,
        "critic.pretrain_iterations=1",
        "critic.pretrain_ev_threshold=1.0",
        *RAY,
        "learner.max_policy_lag=1",
    ]
    straight = train(tiny_train_cfg(f"run_dir={tmp_path / 'a'}", *common), log=lambda *_: None)
    assert [h["policy_lag"] for h in straight.history] == [0, 0, 1, 1]  # pretraining does not move the policy
    split = tiny_train_cfg(f"run_dir={tmp_path / 'b'}", *common)
    train(split, stop_after=1, log=lambda *_: None)
    train(split, resume=True, stop_after=3, log=lambda *_: None)
    resumed = train(split, resume=True, log=lambda *_: None)
    assert [h["iteration"] for h in resumed.history] == [1, 2, 3, 4]
    assert [h["policy_lag"] for h in resumed.history] == [0, 0, 1, 1]
    for name in ("policy_lora", "critic_lora", "critic_heads"):
        a = load_tensors(tmp_path / "a" / "checkpoint" / f"{name}.safetensors")
        b = load_tensors(tmp_path / "b" / "checkpoint" / f"{name}.safetensors")
        _assert_same(a, b, atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["learner.max_policy_lag=1"], "needs rollout actors"),
        (["learner.max_policy_lag=2", "ray.num_rollout_workers=1"], "must be 0 .synchronous. or 1"),
    ],
)
def test_unsupported_lags_are_one_line_errors(tiny_train_cfg, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_train_cfg(*overrides)

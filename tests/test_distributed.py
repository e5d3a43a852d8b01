"""Ray rollout and reward actors (local Ray, CPU): seeded requests, weight sync, a killed actor,
a reward actor that raises, stale data refused."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from align.backbones.lora import attach_lora, lora_num_bytes
from align.backbones.model_config import load_model
from align.config import load_config
from align.rollout import LocalRollouts, RolloutWorker, chunk_seed, make_requests
from align.train_config import TrainConfig

from tiny_run import TINY_RAY

pytestmark = pytest.mark.distributed
TINY = [*TINY_RAY, "critic.pretrain_iterations=1"]
PROMPTS = [
    "a red circle on the left",
    "a blue square on the right",
    "a green triangle",
    "a red square",
    "a blue circle on the left",
    "a green square on the right",
]


def _cfg(tmp_path, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, None, TINY + [f"run_dir={tmp_path}", *extra])


@pytest.fixture(scope="module")
def ray_session():
    """Local Ray whose workers also register tests/distributed_plugins.py; shut down after the module."""
    ray = pytest.importorskip("ray")
    tests_dir = str(Path(__file__).parent)
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        runtime_env={
            "env_vars": {"PYTHONPATH": tests_dir, "OMP_NUM_THREADS": "1"},
            "worker_process_setup_hook": "distributed_plugins.register",
        },
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_pipe():
    """The learner-side pipeline with a non-trivial policy LoRA (B ≠ 0, so the sync matters)."""
    cfg = _cfg("/tmp/unused")
    torch.manual_seed(3)
    pipe = load_model(cfg.model)
    attach_lora(pipe, "policy", rank=cfg.lora.rank, alpha=cfg.lora.alpha, init_lora_weights=False)
    return pipe


@pytest.fixture(scope="module")
def group(ray_session, local_pipe, tmp_path_factory):
    from align.backbones.lora import lora_state_dict
    from align.learner import Learner  # noqa: F401  (same imports as the trainer)
    from align.rollout.ray_group import RayRollouts

    rollouts = RayRollouts(_cfg(tmp_path_factory.mktemp("g")))
    rollouts.set_policy(lora_state_dict(local_pipe, "policy"), version=5)
    yield rollouts
    rollouts.close()


def _assert_same(a, b) -> None:
    assert a.prompts == b.prompts and a.policy_version == b.policy_version
    for field in ("latents", "log_probs", "images", "prompt_embeds"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=0, atol=1e-6, msg=field)


def test_chunk_seeds_depend_only_on_batch_seed_and_position() -> None:
    reqs = make_requests(PROMPTS, seed=11, chunk_size=4)
    assert [r.prompts for r in reqs] == [PROMPTS[:4], PROMPTS[4:]]
    assert [r.seed for r in reqs] == [chunk_seed(11, 0), chunk_seed(11, 1)]
    assert len({chunk_seed(s, i) for s in range(20) for i in range(20)}) == 400


def test_rollouts_are_identical_whichever_actor_serves_them(group, local_pipe) -> None:
    """Two actors with their own pipeline copies, fed the synced LoRA, reproduce the in-process
    worker on the learner's pipeline request by request."""
    local = LocalRollouts(RolloutWorker(local_pipe, group_cfg_sampler()), chunk_size=2)
    local.set_policy(None, 5)
    _assert_same(group.rollout(PROMPTS, seed=7), local.rollout(PROMPTS, seed=7))


def group_cfg_sampler():
    return _cfg("/tmp/unused").sampler


def test_sync_bytes_equal_the_lora_parameter_bytes(group, local_pipe) -> None:
    from align.backbones.adapter import denoiser
    from align.backbones.lora import lora_state_dict

    state = lora_state_dict(local_pipe, "policy")
    stats = group.set_policy(state, version=5)
    lora_params = [p for n, p in denoiser(local_pipe).named_parameters() if ".policy." in n and "lora_" in n]
    assert stats.bytes == lora_num_bytes(local_pipe, "policy") == sum(p.numel() * 4 for p in lora_params)
    full = sum(t.numel() * t.element_size() for t in denoiser(local_pipe).state_dict().values())
    assert stats.bytes < 0.2 * full and stats.version == 5 and stats.seconds > 0


def test_killed_rollout_actor_mid_iteration_still_gives_the_full_batch(group, local_pipe) -> None:
    """SIGKILL to an actor's process while its request is in flight: Ray restarts the actor, the
    driver re-issues the lost request, and the batch equals an undisturbed one: nothing missing,
    nothing duplicated."""
    reference = group.rollout(PROMPTS, seed=9)
    victim = group.pids()[0]
    before = group.reissued
    traj = group.rollout(PROMPTS, seed=9, on_dispatch=lambda: os.kill(victim, signal.SIGKILL))
    assert group.reissued > before
    assert traj.batch_size == len(PROMPTS) and traj.prompts == PROMPTS
    _assert_same(traj, reference)
    assert victim not in group.pids()  # the restarted actor is a new process, with the synced weights


def test_killed_reward_actor_mid_scoring_still_scores_every_sample_once(ray_session, tmp_path) -> None:
    """SIGKILL to the (only) reward actor while it scores: Ray restarts it, the lost request is
    re-issued, and the scores equal an undisturbed scoring of the same images."""
    from align.rollout.ray_group import RayRewards

    rewards = RayRewards(_cfg(tmp_path, "rewards=[jpeg_compressibility:1.0]", "ray.num_reward_workers=1"))
    try:
        images = torch.rand(len(PROMPTS), 3, 32, 32, generator=torch.Generator().manual_seed(0))
        reference = rewards.score(images, PROMPTS)
        victim = rewards.pids()[0]
        scores = rewards.score(images, PROMPTS, on_dispatch=lambda: os.kill(victim, signal.SIGKILL))
        assert rewards.reissued >= 1 and rewards.pids()[0] != victim
        assert scores.shape == (len(PROMPTS), 1)
        torch.testing.assert_close(scores, reference, rtol=0, atol=0)
    finally:
        rewards.close()


def test_reward_actor_dead_for_good_gets_no_more_work_and_the_survivor_scores_the_batch(ray_session, tmp_path) -> None:
    """With ``max_restarts=0`` a killed actor is dead for good (ActorDiedError): its request goes to
    the other actor and the scores equal an undisturbed scoring; with every actor dead, scoring
    fails in one line instead of retrying."""
    from align.rollout.ray_group import RayRewards

    rewards = RayRewards(
        _cfg(tmp_path, "rewards=[jpeg_compressibility:1.0]", "ray.num_reward_workers=2", "ray.max_restarts=0")
    )
    try:
        images = torch.rand(len(PROMPTS), 3, 32, 32, generator=torch.Generator().manual_seed(1))
        reference = rewards.score(images, PROMPTS)
        first, second = rewards.pids()
        scores = rewards.score(images, PROMPTS, on_dispatch=lambda: os.kill(first, signal.SIGKILL))
        assert rewards.reissued >= 1
        torch.testing.assert_close(scores, reference, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match=r"all 2 reward actors are dead \(ray.max_restarts used up\)"):
            rewards.score(images, PROMPTS, on_dispatch=lambda: os.kill(second, signal.SIGKILL))
    finally:
        rewards.close()


class SlowToRestart:
    """An actor whose restart hangs: its constructor sleeps when Ray reconstructs it."""

    def __init__(self) -> None:
        import time

        import ray

        if ray.get_runtime_context().was_current_actor_reconstructed:
            time.sleep(600)

    def pid(self) -> int:
        return os.getpid()

    def echo(self, x: int) -> int:
        return x


def test_actor_that_does_not_come_back_within_restart_timeout_fails_the_call_in_one_line(ray_session) -> None:
    """The driver waits for a restarting actor, but only up to ``ray.restart_timeout_s``."""
    from align.rollout.ray_group import run_requests

    actor = ray_session.remote(max_restarts=1, max_task_retries=0)(SlowToRestart).remote()
    try:
        victim = ray_session.get(actor.pid.remote())
        echo = lambda a, x: a.echo.remote(x)  # noqa: E731
        assert run_requests([actor], echo, [1, 2], restart_timeout_s=3.0, what="test") == ([1, 2], 0)
        with pytest.raises(RuntimeError, match=r"ray: test actor 0 .* 3 s .*\(ray\.restart_timeout_s\)"):
            run_requests(
                [actor], echo, [1, 2], lambda: os.kill(victim, signal.SIGKILL), restart_timeout_s=3.0, what="test"
            )
    finally:
        ray_session.kill(actor, no_restart=True)


def test_reward_actor_that_raises_names_the_reward_and_no_update_happens(ray_session, tmp_path) -> None:
    from align.train import train
    from rewards import RewardError

    import distributed_plugins  # noqa: F401  (registers the plugin here too: the config validates names)

    cfg = _cfg(
        tmp_path,
        "trainer.iterations=1",
        "ray.num_rollout_workers=1",
        "rewards=[toy_geneval:1.0,test_raising_reward:0.5]",
    )
    with pytest.raises(
        RewardError, match="reward 'test_raising_reward' raised on a batch of 2: RuntimeError: reward model crashed"
    ):
        train(cfg, log=lambda *_: None)
    assert not (tmp_path / "checkpoint").exists()


def test_learner_refuses_rollouts_staler_than_max_policy_lag(tmp_path) -> None:
    from align.train import build

    cfg = _cfg(tmp_path, "ray.num_rollout_workers=1", "ray.num_reward_workers=0", "learner.max_policy_lag=1")
    pipe, critic, _, _, learner, worker = build(cfg)
    worker.set_policy(None, 0)
    traj = worker.rollout(PROMPTS[:4], seed=0)
    learner.version = 1
    learner.check_fresh(traj)  # lag 1 is allowed
    learner.version = 2
    with pytest.raises(
        RuntimeError,
        match=r"rollouts from policy version 0 while the learner is at version 2 "
        r"\(lag 2\); learner.max_policy_lag = 1",
    ):
        learner.update(traj, torch.zeros(4, 3), None, None, train_policy=True)


@pytest.mark.parametrize("module, banned", [("align.train", "ray"), ("align.rollout", "deepspeed")])
def test_learner_never_imports_ray_and_the_worker_never_imports_deepspeed(module: str, banned: str) -> None:
    """Ray is imported lazily where actors start; align.train imports the learner and the driver."""
    import subprocess
    import sys

    code = f"import sys, {module}; sys.exit(int({banned!r} in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, f"importing {module} imported {banned}"


def test_missing_deepspeed_json_is_a_one_line_config_error(tmp_path) -> None:
    from align.config import ConfigError

    with pytest.raises(ConfigError, match="learner.deepspeed"):
        _cfg(tmp_path, "learner.deepspeed=launch/deepspeed/zero4.json")


def test_zero3_with_in_process_rollouts_is_refused_before_any_model_loads(tmp_path) -> None:
    """Under ZeRO-3 rank 0 cannot sample from the partitioned learner weights alone (in-process rollouts
    deadlocked when measured): the trainer refuses ``ray.num_rollout_workers=0`` in one line when it builds
    the accelerator, the first thing it does. In a subprocess: a DeepSpeed accelerator sets process-wide
    state (AcceleratorState, ACCELERATE_* variables) that would leak into other tests."""
    import sys

    code = (
        "import sys, align.train as recipe\n"
        "from align.config import load_config\n"
        "from align.train_config import TrainConfig\n"
        "def refuse(*_): raise SystemExit('the model was loaded before the refusal')\n"
        "recipe.build_policy = refuse\n"
        f"cfg = load_config(TrainConfig, None, {TINY!r} + ['learner.deepspeed=launch/deepspeed/zero3.json', "
        f"'ray.num_rollout_workers=0', 'ray.num_reward_workers=0', 'run_dir={tmp_path}'])\n"
        "try:\n"
        "    recipe.train(cfg, log=lambda *_: None)\n"
        "except ValueError as err:\n"
        "    print(err); sys.exit(3)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert done.returncode == 3, done.stdout + done.stderr[-3000:]
    assert "ZeRO-3 partitions the learner's weights" in done.stdout
    assert "set ray.num_rollout_workers >= 1" in done.stdout and len(done.stdout.strip().splitlines()) == 1

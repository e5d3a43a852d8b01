"""Whole-trainer distributed runs in subprocesses: 2 learner processes (accelerate + DeepSpeed
ZeRO-2 over gloo) with 2 Ray rollout actors; SIGKILL of the trainer then ``--resume``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from align.checkpoint import load_tensors
from align.config import load_config
from align.train import train
from align.train_config import TrainConfig

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.source=preset:tiny-unet",
    "sampler.num_inference_steps=3",
    "trainer.prompts_per_iteration=2",
    "trainer.samples_per_prompt=2",
    "trainer.minibatch_size=4",
    "eval_every=0",
    "final_eval_prompts=0",
    "eval_prompts=2",
    "critic.hidden=16",
    "ray.chunk_size=2",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class Reaper:
    """Runs a command in the repo; remembers every descendant so that processes orphaned by a
    SIGKILL (Ray's agents outlive a killed driver) are ended afterwards, by their own PIDs."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        self.seen: dict[int, psutil.Process] = {}

    def poll(self) -> None:
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass

    def wait(self, timeout_s: float, until=None) -> int | None:
        """Wait for exit, or until ``until()`` is true (then return None with the process running)."""
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.poll()
            if until is not None and until():
                return None
            time.sleep(0.05)
        if self.proc.poll() is None:
            self.kill()
            raise AssertionError(f"timed out after {timeout_s} s; log:\n{self.output()[-3000:]}")
        return self.proc.returncode

    def kill(self) -> None:
        self.poll()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def reap(self) -> None:
        gone, alive = psutil.wait_procs(list(self.seen.values()), timeout=10)
        for proc in alive:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def output(self) -> str:
        return self.log.read_text()


def _state(run: Path) -> dict | None:
    path = run / "checkpoint" / "state.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_two_deepspeed_zero2_learners_with_two_rollout_actors_end_with_identical_lora(tmp_path) -> None:
    """``accelerate launch`` with the shipped multi_gpu config (DeepSpeed ZeRO-2), 2 processes over
    gloo, 2 Ray rollout actors + 1 reward actor, 2 iterations of policy updates; the trainer checks
    at the end that both ranks hold bit-identical LoRA weights and fails otherwise."""
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "launch/accelerate/multi_gpu.yaml",
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "-m",
        "align",
        "train",
        *TINY,
        "trainer.iterations=2",
        "critic.pretrain_iterations=0",
        "ray.num_rollout_workers=2",
        f"run_dir={run}",
    ]
    job = Reaper(cmd, tmp_path / "log.txt")
    try:
        rc = job.wait(540)
    finally:
        job.reap()
    out = job.output()
    assert rc == 0, out[-4000:]
    assert "ranks agree: 2 learner processes hold bit-identical trainable weights" in out
    state = _state(run)
    assert state["iteration"] == 2 and state["policy_updates"] == 2
    lora = load_tensors(run / "checkpoint" / "policy_lora.safetensors")
    lora_bytes = sum(t.numel() * t.element_size() for t in lora.values())
    assert [h["sync_bytes"] for h in state["history"]] == [lora_bytes, lora_bytes]
    assert any("lora_B" in k and t.abs().max() > 0 for k, t in lora.items())  # the policy moved


@pytest.mark.slow
def test_sigkill_after_iteration_k_then_resume_matches_an_uninterrupted_run(tmp_path) -> None:
    """The trainer (with Ray rollout and reward actors) is SIGKILLed once iteration k ≥ 1 is
    checkpointed; ``--resume`` finishes the run. The final weights equal an uninterrupted run's
    (in-process workers: the seeded requests make both paths give the same rollouts)."""
    iterations = 4
    straight = load_config(
        TrainConfig,
        None,
        TINY
        + [
            f"trainer.iterations={iterations}",
            "critic.pretrain_iterations=1",
            "ray.num_rollout_workers=0",
            "ray.num_reward_workers=0",
            f"run_dir={tmp_path / 'a'}",
        ],
    )
    train(straight, log=lambda *_: None)
    run = tmp_path / "b"
    cmd = [
        sys.executable,
        "-m",
        "align",
        "train",
        *TINY,
        f"trainer.iterations={iterations}",
        "critic.pretrain_iterations=1",
        "ray.num_rollout_workers=2",
        f"run_dir={run}",
    ]
    first = Reaper(cmd, tmp_path / "log1.txt")
    try:
        rc = first.wait(300, until=lambda: (_state(run) or {}).get("iteration", 0) >= 1)
        assert rc is None, f"the run ended (rc {rc}) before it could be killed:\n{first.output()[-3000:]}"
        first.kill()
    finally:
        first.reap()
    k = _state(run)["iteration"]
    assert 1 <= k < iterations
    second = Reaper([sys.executable, "-m", "align", "train", "--resume", str(run)], tmp_path / "log2.txt")
    try:
        rc = second.wait(300)
    finally:
        second.reap()
    assert rc == 0, second.output()[-3000:]
    assert f"resumed {run} at iteration {k}" in second.output()
    for name in ("policy_lora", "critic_lora", "critic_heads"):
        a = load_tensors(tmp_path / "a" / "checkpoint" / f"{name}.safetensors")
        b = load_tensors(run / "checkpoint" / f"{name}.safetensors")
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=f"{name}: {key}")


def _launch(tmp_path: Path, name: str, args: list[str]) -> str:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "launch/accelerate/multi_gpu.yaml",
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "-m",
        "align",
        "train",
        *args,
    ]
    job = Reaper(cmd, tmp_path / f"{name}.txt")
    try:
        rc = job.wait(540)
    finally:
        job.reap()
    assert rc == 0, job.output()[-4000:]
    return job.output()


@pytest.mark.slow
def test_deepspeed_resume_restores_each_ranks_optimizer_partition(tmp_path) -> None:
    """2 DeepSpeed ZeRO-2 processes: 2 policy iterations then ``--resume`` to 3 end with the same weights as
    3 policy iterations straight (after 1 value-pretraining iteration each, so the resume is at iteration 3)
    (each rank reloads its own fp32 master partition and Adam moments)."""
    common = [*TINY, "critic.pretrain_iterations=1", "ray.num_rollout_workers=2"]
    _launch(tmp_path, "straight", [*common, "trainer.iterations=3", f"run_dir={tmp_path / 'a'}"])
    _launch(tmp_path, "first", [*common, "trainer.iterations=2", f"run_dir={tmp_path / 'b'}"])
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoint").glob("optimizer_rank*.safetensors")) == [
        "optimizer_rank0.safetensors",
        "optimizer_rank1.safetensors",
    ]
    out = _launch(tmp_path, "resumed", ["--resume", str(tmp_path / "b"), "trainer.iterations=3"])
    assert "at iteration 3" in out and "ranks agree" in out
    for name in ("policy_lora", "critic_lora", "critic_heads"):
        a = load_tensors(tmp_path / "a" / "checkpoint" / f"{name}.safetensors")
        b = load_tensors(tmp_path / "b" / "checkpoint" / f"{name}.safetensors")
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=f"{name}: {key}")

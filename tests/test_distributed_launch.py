"""Whole-trainer distributed runs in subprocesses: 2 learner processes (accelerate + DeepSpeed
ZeRO-2 or ZeRO-3 over gloo) with Ray rollout actors; SIGKILL of the trainer then ``--resume``.

Run as a script (under ``accelerate launch``) this module is the ZeRO-3 test's child: :func:`zero3_child`."""

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
import yaml

from align.checkpoint import assert_no_pickle, load_tensors, load_tree
from align.config import load_config
from align.train import train
from align.train_config import TrainConfig

from tiny_run import TINY_RAY

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[1]
TINY = list(TINY_RAY)  # every test here sets critic.pretrain_iterations itself
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


def _run_to_end(cmd: list[str], log: Path) -> str:
    """Run ``cmd`` (reaped by its own PID whatever happens), assert it exits 0, and return its output."""
    job = Reaper(cmd, log)
    try:
        rc = job.wait(540)
    finally:
        job.reap()
    out = job.output()
    assert rc == 0, out[-4000:]
    return out


def test_two_deepspeed_zero2_learners_with_two_rollout_actors_end_with_identical_lora(tmp_path) -> None:
    """``accelerate launch`` with the shipped multi_gpu config (DeepSpeed ZeRO-2), 2 processes over
    gloo, 2 Ray rollout actors + 1 reward actor, 2 iterations of policy updates; the trainer checks
    at the end that both ranks hold bit-identical LoRA weights and fails otherwise."""
    run = tmp_path / "run"
    args = [
        *TINY,
        "trainer.iterations=2",
        "critic.pretrain_iterations=0",
        "ray.num_rollout_workers=2",
        f"run_dir={run}",
    ]
    out = _launch(tmp_path, "log", args)
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
    return _run_to_end(cmd, tmp_path / f"{name}.txt")


@pytest.mark.slow
def test_deepspeed_resume_restores_each_ranks_optimizer_partition(tmp_path) -> None:
    """2 DeepSpeed ZeRO-2 processes: 2 policy iterations then ``--resume`` to 3 end with the same weights as
    3 policy iterations straight (after 1 value-pretraining iteration each, so the resume is at iteration 3)
    (accelerate's load_state: each rank reloads its own fp32 master partition and Adam moments)."""
    common = [*TINY, "critic.pretrain_iterations=1", "ray.num_rollout_workers=2"]
    _launch(tmp_path, "straight", [*common, "trainer.iterations=3", f"run_dir={tmp_path / 'a'}"])
    _launch(tmp_path, "first", [*common, "trainer.iterations=2", f"run_dir={tmp_path / 'b'}"])
    engine = tmp_path / "b" / "checkpoint" / "accelerate" / "pytorch_model"  # accelerate's save_state
    assert sorted(p.name for p in engine.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert_no_pickle(tmp_path / "b" / "checkpoint")
    out = _launch(tmp_path, "resumed", ["--resume", str(tmp_path / "b"), "trainer.iterations=3"])
    assert "at iteration 3" in out and "ranks agree" in out
    for name in ("policy_lora", "critic_lora", "critic_heads"):
        a = load_tensors(tmp_path / "a" / "checkpoint" / f"{name}.safetensors")
        b = load_tensors(tmp_path / "b" / "checkpoint" / f"{name}.safetensors")
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=f"{name}: {key}")


def _zero3_launch_files(tmp_path: Path) -> Path:
    """launch/accelerate/multi_gpu.yaml with launch/deepspeed/zero3.json, every weight partitioned
    (persistence threshold 0: the tiny UNet's weights and the LoRA are below the shipped 100k elements)."""
    ds = json.loads((REPO / "launch" / "deepspeed" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    launch = yaml.safe_load((REPO / "launch" / "accelerate" / "multi_gpu.yaml").read_text())
    launch["deepspeed_config"]["deepspeed_config_file"] = str(tmp_path / "zero3.json")
    (tmp_path / "zero3.yaml").write_text(yaml.safe_dump(launch))
    return tmp_path / "zero3.yaml"


ZERO3_RUN = [
    *TINY,
    "critic.pretrain_iterations=0",
    "critic.value_epochs=1",
    "trainer.iterations=2",
    "ray.num_rollout_workers=1",
    "ray.num_reward_workers=0",
]


def zero3_child(root: Path) -> None:
    """In each of the 2 launched processes: 2 iterations straight (run a), then run b: 1 iteration,
    stopped as a kill would stop it (checkpointed), and resumed to the end (export, rank check). One
    launch for the three (a launch costs more than the runs): the resumed run builds a new pipeline,
    engine and optimiser, so what continues comes from the checkpoint's files."""
    import ray

    from align.config import load_config
    from align.train import train
    from align.train_config import TrainConfig

    if int(os.environ.get("RANK", "0")) == 0:  # one local Ray for the three runs (rank 0 drives the actors)
        ray.init(num_cpus=2, include_dashboard=False)
    cfg = {name: load_config(TrainConfig, None, [*ZERO3_RUN, f"run_dir={root / name}"]) for name in "ab"}
    train(cfg["a"], stop_after=2, log=print)  # stop_after: returns with the process group still up
    train(cfg["b"], stop_after=1, log=print)
    torch.distributed.barrier()  # rank 0 renames the checkpoint into place while the others go on
    train(cfg["b"], resume=True, log=print)


def test_zero3_two_learners_checkpoint_resume_and_match_an_uninterrupted_run(tmp_path) -> None:
    """ZeRO-3 trains: 2 gloo processes with every weight partitioned and a Ray rollout actor (whole LoRA
    synced); run b checkpoints after its first iteration (accelerate's save_state: each rank its own slice
    of the weights and of the Adam state, safetensors, no pickle) and resumes; after its second it holds
    the weights of the uninterrupted 2-iteration run a within 1e-6 and exports the gathered LoRA."""
    launch = _zero3_launch_files(tmp_path)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch), "--num_processes", "2"]
    cmd += ["--mixed_precision", "no"]  # on the command line: accelerate refuses it beside a DeepSpeed JSON
    out = _run_to_end([*cmd, str(Path(__file__).resolve()), str(tmp_path)], tmp_path / "log.txt")
    a, b = tmp_path / "a" / "checkpoint", tmp_path / "b" / "checkpoint"
    assert f"resumed {tmp_path / 'b'} at iteration 1" in out and "ranks agree: 2 learner processes" in out
    assert _state(tmp_path / "a")["iteration"] == _state(tmp_path / "b")["iteration"] == 2
    for name in ("policy_lora", "critic_lora", "critic_heads"):
        want, got = load_tensors(a / f"{name}.safetensors"), load_tensors(b / f"{name}.safetensors")
        assert sorted(got) == sorted(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=f"{name}: {key}")
    lora = load_tensors(b / "policy_lora.safetensors")
    assert any("lora_B" in k and t.abs().max() > 0 for k, t in lora.items())  # the policy moved
    lora_bytes = sum(t.numel() * t.element_size() for t in lora.values())
    assert [h["sync_bytes"] for h in _state(tmp_path / "b")["history"]] == [lora_bytes] * 2  # whole, gathered
    _assert_partitioned(b / "accelerate" / "pytorch_model", sum(t.numel() for t in lora.values()))
    assert_no_pickle(b)
    exported = load_tensors(tmp_path / "b" / "export" / "policy" / "pytorch_lora_weights.safetensors")
    norms = sorted(float(t.abs().sum()) for t in lora.values())
    assert sorted(float(t.abs().sum()) for t in exported.values()) == norms  # the export is the gathered LoRA


def _assert_partitioned(engine_dir: Path, policy_numel: int) -> None:
    """Each rank's ZeRO-3 files: its module weights are empty placeholders, and its fp32 slice of the
    trainable weights is a part of them (the two slices together cover at least the policy LoRA)."""
    from align.distributed import DEEPSPEED_CLASSES

    slices = []
    for rank in (0, 1):
        model = load_tree(engine_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", DEEPSPEED_CLASSES)
        assert model["module"] and all(t.numel() == 0 for t in model["module"].values())
        optim = load_tree(engine_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", DEEPSPEED_CLASSES)
        slices.append(sum(t.numel() for t in optim["optimizer_state_dict"]["fp32_flat_groups"]))
    assert 0 < slices[0] < sum(slices) and sum(slices) >= policy_numel


if __name__ == "__main__":
    zero3_child(Path(sys.argv[1]))

"""Resume can neither lose a run nor mix two: every kill point of the atomic checkpoint, stale
directories, umask, the run identity (settings before any model loads, base fingerprint after),
config.json never rewritten, no temporary YAML."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from align import checkpoint as ckpt
from align.errors import CheckpointError, RunMismatchError
from align.run_identity import (
    RESUME_LOG,
    append_resume_log,
    check_fresh_run_dir,
    check_same_base,
    resolve_resume,
    run_identity,
    run_settings,
)
from align.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
#: tiny_train_cfg (tests/conftest.py) with 2 steps and one value-pretraining iteration
RUN = ("sampler.num_inference_steps=2", "critic.pretrain_iterations=1")

# A checkpoint write in a child process that dies (os._exit: no cleanup runs, as under SIGKILL) at a
# chosen point: 'body' (files half written), 'marked' (complete, before the renames), 'between' (after
# final -> .old, before tmp -> final), 'renamed' (after both renames, before the stale .old is removed).
_WRITER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from align import checkpoint as ckpt
    final, iteration, kill = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    real_replace, real_mark, real_stale = os.replace, ckpt.mark_complete, ckpt.remove_stale
    renames = []
    def replace(src, dst):
        if Path(src).is_dir():
            renames.append(src)
            if kill == "between" and len(renames) == 2:
                os._exit(9)
        real_replace(src, dst)
    def mark(d):
        real_mark(d)
        if kill == "marked":
            os._exit(9)
    def stale(f):
        if kill == "renamed":
            os._exit(9)
        return real_stale(f)
    os.replace, ckpt.mark_complete, ckpt.remove_stale = replace, mark, stale
    with ckpt.atomic_directory(final, complete_marker=True) as tmp:
        (tmp / "policy_lora.safetensors").write_bytes(b"x" * 100 * iteration)
        if kill == "body":
            os._exit(9)
        ckpt.write_json(tmp / "state.json", {"iteration": iteration})
""")


def _write(final: Path, iteration: int, kill: str = "none") -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", _WRITER, str(final), str(iteration), kill], env=env).returncode


def _iteration(directory: Path) -> int:
    return json.loads((directory / "state.json").read_text())["iteration"]


@pytest.mark.parametrize(
    "kill, newest, survivors",
    [
        ("body", 1, {"checkpoint", ".checkpoint.tmp-"}),  # the new one never completed: keep the old
        ("marked", 2, {"checkpoint", ".checkpoint.tmp-"}),  # complete tmp beside the old final
        ("between", 2, {".checkpoint.old-", ".checkpoint.tmp-"}),  # no final at all: both complete
        ("renamed", 2, {"checkpoint", ".checkpoint.old-"}),  # the stale old one was not yet removed
    ],
)
def test_a_kill_at_each_point_of_the_checkpoint_write_leaves_the_newest_complete_one_findable(
    tmp_path, kill: str, newest: int, survivors: set
) -> None:
    final = tmp_path / "checkpoint"
    assert _write(final, 1) == 0
    assert _write(final, 2, kill) == 9
    on_disk = {p.name if not p.name.startswith(".") else p.name.split("-")[0] + "-" for p in tmp_path.iterdir()}
    assert on_disk == survivors
    found = ckpt.latest_complete(final)
    assert found is not None and _iteration(found) == newest
    assert (found / "policy_lora.safetensors").stat().st_size == 100 * newest


@pytest.mark.parametrize("kill", ["body", "marked", "between", "renamed"])
def test_the_next_complete_checkpoint_removes_every_stale_tmp_and_old_directory(tmp_path, kill: str) -> None:
    final = tmp_path / "checkpoint"
    _write(final, 1)
    _write(final, 2, kill)
    assert _write(final, 3) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
    assert _iteration(ckpt.latest_complete(final)) == 3


def test_a_checkpoint_with_a_truncated_file_is_not_complete(tmp_path) -> None:
    final = tmp_path / "checkpoint"
    _write(final, 1)
    _write(final, 2, "marked")  # complete tmp (iteration 2) beside final (iteration 1)
    tmp = next(tmp_path.glob(".checkpoint.tmp-*"))
    data = (tmp / "policy_lora.safetensors").read_bytes()
    (tmp / "policy_lora.safetensors").write_bytes(data[:50])
    assert _iteration(ckpt.latest_complete(final)) == 1
    (final / "state.json").unlink()
    assert ckpt.latest_complete(final) is None


def test_a_half_removed_old_checkpoint_never_looks_complete(tmp_path) -> None:
    """remove_stale drops the marker before the files: a kill during the removal leaves no impostor."""
    final = tmp_path / "checkpoint"
    _write(final, 1)
    _write(final, 2, "renamed")
    old = next(tmp_path.glob(".checkpoint.old-*"))
    (old / ckpt.COMPLETE_FILE).unlink()  # what remove_stale does first
    assert not ckpt.is_complete(old) and _iteration(ckpt.latest_complete(final)) == 2


@pytest.mark.parametrize("layout", ["missing", "empty", "no_state", "only_incomplete_tmp"])
def test_resume_without_a_complete_checkpoint_is_refused_in_one_line(tmp_path, layout: str, tiny_train_cfg) -> None:
    cfg = tiny_train_cfg(*RUN, f"run_dir={tmp_path / 'run'}")
    run = tmp_path / "run"
    if layout != "missing":
        (run / "checkpoint").mkdir(parents=True)
    if layout == "no_state":
        (run / "checkpoint" / "policy_lora.safetensors").write_bytes(b"x")
    if layout == "only_incomplete_tmp":
        (run / ".checkpoint.tmp-1").mkdir()
        (run / ".checkpoint.tmp-1" / "state.json").write_text('{"iteration": 3}')
    with pytest.raises(CheckpointError, match="nothing to resume") as info:
        resolve_resume(run, cfg)
    assert "\n" not in str(info.value)


def test_checkpoint_files_and_directories_honour_the_umask(tmp_path) -> None:
    import torch

    old = os.umask(0o022)
    try:
        with ckpt.atomic_directory(tmp_path / "checkpoint", complete_marker=True) as tmp:
            ckpt.save_tensors(tmp / "t.safetensors", {"a": torch.zeros(2)})
            ckpt.write_json(tmp / "state.json", {"iteration": 1})
    finally:
        os.umask(old)
    final = tmp_path / "checkpoint"
    assert stat.S_IMODE(final.stat().st_mode) == 0o755
    assert stat.S_IMODE((final / "t.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((final / "state.json").stat().st_mode) == 0o644


def test_truncated_tensor_and_json_files_are_one_line_errors_naming_the_file(tmp_path) -> None:
    import torch

    ckpt.save_tensors(tmp_path / "w.safetensors", {"a": torch.zeros(64)})
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"w\.safetensors: truncated or corrupt safetensors file"):
        ckpt.load_tensors(tmp_path / "w.safetensors")
    (tmp_path / "s.json").write_text('{"iteration": ')
    with pytest.raises(CheckpointError, match=r"s\.json: truncated or corrupt JSON"):
        ckpt.read_json(tmp_path / "s.json")


# ------------------------------------------------------------------------------ run identity
def _fake_run(run: Path, cfg: TrainConfig, fingerprint: str = "sha256:" + "a" * 64) -> None:
    """A run directory as `align train` leaves it: config.json and a complete checkpoint with the identity."""
    import dataclasses

    run.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(run / "config.json", dataclasses.asdict(cfg))
    with ckpt.atomic_directory(run / "checkpoint", complete_marker=True) as tmp:
        ckpt.write_json(tmp / "state.json", {"iteration": 2, "identity": run_identity(cfg, fingerprint)})


@pytest.mark.parametrize(
    "override, named",
    [
        ("lora.rank=4", "lora.rank 8 → 4"),
        ("lora.alpha=2.0", "lora.alpha 8.0 → 2.0"),
        ("algo=grpo", "algo 'ecg' → 'grpo'"),
        ("critic.adapter=shared", "critic.adapter 'separate' → 'shared'"),
        ("critic.feature_layer=mid_block", "critic.feature_layer None → 'mid_block'"),
        ("rewards=[jpeg_compressibility:1.0]", "rewards ['toy_geneval:1'] → ['jpeg_compressibility:1']"),
        ("sampler.num_inference_steps=3", "sampler.num_inference_steps 2 → 3"),
        ("sampler.eta=0.5", "sampler.eta 1.0 → 0.5"),
    ],
)
def test_resume_with_settings_of_another_run_names_each_differing_key(
    tmp_path, override: str, named: str, tiny_train_cfg
) -> None:
    run = tmp_path / "run"
    _fake_run(run, tiny_train_cfg(*RUN, f"run_dir={run}"))
    other = tiny_train_cfg(*RUN, f"run_dir={run}", override)
    with pytest.raises(RunMismatchError) as info:
        resolve_resume(run, other)
    assert named in str(info.value) and "--force" in str(info.value) and "\n" not in str(info.value)
    assert resolve_resume(run, other, force=True) == run / "checkpoint"


def test_several_differing_keys_are_all_named_and_other_overrides_are_fine(tmp_path, tiny_train_cfg) -> None:
    run = tmp_path / "run"
    _fake_run(run, tiny_train_cfg(*RUN, f"run_dir={run}"))
    same_run = tiny_train_cfg(*RUN, f"run_dir={run}", "trainer.iterations=9", "trainer.lr=1e-4")
    assert resolve_resume(run, same_run) == run / "checkpoint"
    other = tiny_train_cfg(*RUN, f"run_dir={run}", "lora.rank=2", "sampler.eta=0.3")
    message = str(pytest.raises(RunMismatchError, resolve_resume, run, other).value)
    assert "lora.rank 8 → 2" in message and "sampler.eta 1.0 → 0.3" in message


def test_another_base_fingerprint_is_refused_unless_forced(tmp_path, tiny_train_cfg) -> None:
    cfg = tiny_train_cfg(*RUN)
    stored = run_identity(cfg, "sha256:" + "a" * 64)
    current = run_identity(tiny_train_cfg(*RUN, "model.source=preset:toy"), "sha256:" + "b" * 64)
    with pytest.raises(RunMismatchError, match="another base: model.source 'preset:tiny-unet' .* → 'preset:toy'"):
        check_same_base(stored, current, tmp_path)
    check_same_base(stored, current, tmp_path, force=True)
    check_same_base(stored, run_identity(cfg, stored["base"]["fingerprint"]), tmp_path)


def test_a_new_run_over_a_checkpointed_run_dir_is_refused_unless_forced(tmp_path, tiny_train_cfg) -> None:
    run = tmp_path / "run"
    _fake_run(run, tiny_train_cfg(*RUN, f"run_dir={run}"))
    with pytest.raises(CheckpointError, match=f"already holds a checkpoint .iteration 2.; pass --resume {run}"):
        check_fresh_run_dir(run)
    check_fresh_run_dir(run, force=True)
    check_fresh_run_dir(tmp_path / "new")


def test_critic_settings_are_not_part_of_a_critic_free_run(tmp_path, tiny_train_cfg) -> None:
    grpo = tiny_train_cfg(*RUN, "algo=grpo")
    assert not any(k.startswith("critic.") for k in run_settings(grpo))
    assert "critic.rank" in run_settings(tiny_train_cfg(*RUN))


def test_the_resume_log_appends_each_changed_key_and_leaves_config_json_alone(tmp_path, tiny_train_cfg) -> None:
    run = tmp_path / "run"
    cfg = tiny_train_cfg(*RUN, f"run_dir={run}")
    _fake_run(run, cfg)
    before = (run / "config.json").read_text()
    resumed = tiny_train_cfg(*RUN, f"run_dir={run}", "trainer.lr=1e-4")
    append_resume_log(run, resumed, run / "checkpoint", 2)
    append_resume_log(run, resumed, run / "checkpoint", 3, force=True)
    lines = [json.loads(line) for line in (run / RESUME_LOG).read_text().splitlines()]
    assert [e["iteration"] for e in lines] == [2, 3] and [e["force"] for e in lines] == [False, True]
    assert lines[0]["changed"] == {"trainer.lr": [cfg.trainer.lr, 1e-4]}
    assert (run / "config.json").read_text() == before


# ------------------------------------------------------------------------------ end to end (tiny model)
def _save_base(path: Path, seed: int) -> Path:
    from align.backbones import build_pipeline

    build_pipeline("preset:tiny-unet", seed=seed).save_pretrained(path)
    return path


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(cwd / "tmp"), "OMP_NUM_THREADS": "1"}
    (cwd / "tmp").mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "align.cli", "train", *args], capture_output=True, text=True, env=env, cwd=cwd
    )


def test_resume_after_a_kill_between_the_renames_continues_at_the_newest_iteration(tmp_path, tiny_train_cfg) -> None:
    """Two complete checkpoints survive as .old (iteration 1) and .tmp (iteration 2), no final: the run
    continues at iteration 3 (not 1), config.json is untouched, the overrides go to the resume log, the
    stale directories are gone afterwards, and no temporary YAML is left behind."""
    from align.train import train

    run = tmp_path / "run"
    # no value pretraining: trainer.iterations counts policy iterations, so iteration numbers are the policy's
    cfg = tiny_train_cfg(*RUN, f"run_dir={run}", "trainer.iterations=2", "critic.pretrain_iterations=0")
    train(cfg, stop_after=1, log=lambda *_: None)
    shutil.copytree(run / "checkpoint", tmp_path / "it1")
    train(cfg, resume=True, log=lambda *_: None)
    os.replace(run / "checkpoint", run / ".checkpoint.tmp-killed")
    os.replace(tmp_path / "it1", run / ".checkpoint.old-1-1")
    config_before = (run / "config.json").read_text()
    proc = _cli("--resume", str(run), "trainer.iterations=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed" in proc.stdout and "at iteration 2 (from .checkpoint.tmp-killed)" in proc.stdout
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["iteration"] == 3 and [h["iteration"] for h in state["history"]] == [1, 2, 3]
    assert state["identity"]["base"]["fingerprint"].startswith("sha256:")
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".checkpoint")) == []
    assert (run / "config.json").read_text() == config_before
    log = [json.loads(line) for line in (run / RESUME_LOG).read_text().splitlines()]
    assert log[-1]["changed"] == {"trainer.iterations": [2, 3]} and log[-1]["iteration"] == 2
    assert not list((tmp_path / "tmp").glob("*.yaml"))


def test_a_mismatched_resume_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys, tiny_train_cfg) -> None:
    import align.train
    from align.cli import main

    run = tmp_path / "run"
    _fake_run(run, tiny_train_cfg(*RUN, f"run_dir={run}"))

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(align.train, "build", no_model)
    assert main(["train", "--resume", str(run), "lora.rank=4", "sampler.num_inference_steps=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora.rank 8 → 4" in err[0] and "sampler.num_inference_steps 2 → 5" in err[0]


@pytest.mark.slow
def test_resume_on_another_base_of_the_same_shapes_is_refused_by_its_fingerprint(tmp_path, tiny_train_cfg) -> None:
    """Same settings, other weights (another seed of the same preset): refused before the checkpoint
    loads, in one line; --force continues (and the log records it)."""
    from align.train import train

    base_a, base_b = _save_base(tmp_path / "a", 0), _save_base(tmp_path / "b", 1)
    run = tmp_path / "run"
    train(tiny_train_cfg(*RUN, f"run_dir={run}", f"model.source={base_a}", "trainer.iterations=1"), log=lambda *_: None)
    proc = _cli("--resume", str(run), f"model.source={base_b}", "trainer.iterations=2", cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("align:")]  # (diffusers' load bars)
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-2000:]
    assert "another base" in lines[0] and str(base_b) in lines[0]
    assert json.loads((run / "checkpoint" / "state.json").read_text())["iteration"] == 1
    proc = _cli("--resume", str(run), f"model.source={base_b}", "trainer.iterations=2", "--force", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = [json.loads(line) for line in (run / RESUME_LOG).read_text().splitlines()]
    assert log[-1]["force"] is True and log[-1]["changed"]["model.source"] == [str(base_a), str(base_b)]


def test_an_unmarked_atomic_directory_replaces_in_place_and_leaves_no_marker(tmp_path) -> None:
    """Exports and pipelines (no complete_marker): nothing extra inside, no sibling left behind."""
    for n in (1, 2):
        with ckpt.atomic_directory(tmp_path / "export") as tmp:
            (tmp / "export.json").write_text(str(n))
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["export.json"]
    assert (tmp_path / "export" / "export.json").read_text() == "2"

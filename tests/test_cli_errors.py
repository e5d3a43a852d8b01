"""Bad input on the command line: one line naming the key or file, exit code 2, no traceback
(``--debug`` shows it); config errors before torch is imported."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.backbones import attach_lora, build_pipeline
from align.checkpoint import save_tensors, write_json
from align.config import load_config
from align.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.source=preset:tiny-unet",
    "sampler.num_inference_steps=2",
    "ray.num_rollout_workers=0",
    "ray.num_reward_workers=0",
    "final_eval_prompts=0",
]


def align_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "align.cli", *args], capture_output=True, text=True, env=env, cwd=cwd)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``align...: error:`` line of a refused command (diffusers' progress bars aside)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("align") and ": error:" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """``align ARGS`` through :func:`align.cli.main` in this process (torch is already imported here, so
    the file checks below need no fresh interpreter each); an unknown error would propagate and fail."""
    from align.cli import main

    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


# --------------------------------------------------------------------------- configs and arguments
@pytest.mark.parametrize(
    "text, expected",
    [
        ("trainer:\n  lr: [1\n", "not valid YAML (line 3, column 1)"),
        ("- trainer.lr=1\n- lora.rank=2\n", "expected a mapping of config keys (key: value), got a list"),
    ],
)
def test_malformed_or_list_shaped_yaml_is_one_line_naming_the_file(tmp_path, capsys, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert f"config file {path}: {expected}" in one_error_line(align_cli("train", str(path)))
    assert f"config file {path}: {expected}" in one_error_line(in_process(capsys, "sample", str(path)))


def test_a_config_error_comes_before_torch_is_imported() -> None:
    code = (
        "import sys; from align.cli import main; rc = main(['train', 'trainer.lr=-1']); "
        "print(rc, sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert proc.stdout.split("\n")[0] == "2 []", proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "align: error: config 'TrainConfig': trainer.lr must be a finite number > 0 (< 0 trains in the wrong "
        "direction, 0 not at all), got -1.0"
    ]


def test_python_dash_m_align_is_the_align_command_and_imports_no_command_module() -> None:
    """``python -m align train ...`` (what ``accelerate launch -m align train`` starts on each learner) is
    ``align train``; the CLI imports ``align.train`` only inside its handler, so the two never import each
    other at load time."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "align", "train", "trainer.lr=-1"], capture_output=True, text=True, env=env
    )
    assert "trainer.lr must be a finite number > 0" in one_error_line(proc)
    code = "import sys, align.cli; print(sorted(m for m in ('align.train', 'torch') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr


@pytest.mark.parametrize(
    "job, source, expected",
    [
        ("train", "{empty}", "has no model_index.json"),
        ("train", "{garbage}", "is not a readable model_index.json"),
        ("train", "not a model!", "no such directory (and not a hub id of the form org/name)"),
        ("train", "preset:nope", "unknown backbone preset 'nope'; valid presets: "),
        (
            "train",
            "nobody/uncached-model",
            "'nobody/uncached-model': not a local directory and not in the local HF cache",
        ),
        (
            "sample",
            "nobody/uncached-model",
            "'nobody/uncached-model': not a local directory and not in the local HF cache",
        ),
    ],
)
def test_every_bad_model_source_is_one_line(tmp_path, job: str, source: str, expected: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "model_index.json").write_text("\x00\x01 not json")
    source = source.format(empty=tmp_path / "empty", garbage=tmp_path / "garbage")
    out = f"run_dir={tmp_path / 'r'}" if job == "train" else f"out_dir={tmp_path / 'r'}"
    line = one_error_line(align_cli(job, f"model.source={source}", out))
    assert line.startswith("align: error: config 'model': source ") and expected in line


@pytest.mark.parametrize(
    "args, expected",
    [
        (["rewards", "serve", "toy_geneval", "--port", "99999"], "argument --port: a TCP port is 0-65535, got 99999"),
        (["rewards", "check", "toy_geneval", "--num-images", "0"], "argument --num-images: must be >= 1, got 0"),
    ],
)
def test_out_of_range_arguments_are_one_line(args: list[str], expected: str) -> None:
    proc = align_cli(*args)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"align {' '.join(args[:2])}: error: {expected} (see align {' '.join(args[:2])} --help)"
    ]


def test_debug_shows_the_traceback_of_a_known_error() -> None:
    proc = align_cli("train", "lora.rank=0", "--debug")
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "align: error: config 'TrainConfig': lora.rank must be >= 1, got 0"


# --------------------------------------------------------------------------- files: checkpoints, LoRAs, critics
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_checkpoint_file_is_named(tmp_path, capsys) -> None:
    """`align export` of a run whose policy LoRA was cut off: the file is named, in one line."""
    from align.backbones.lora import lora_state_dict

    run = tmp_path / "run"
    cfg = load_config(TrainConfig, None, [*TINY, "algo=grpo", "trainer.samples_per_prompt=2", f"run_dir={run}"])
    pipe = build_pipeline("preset:tiny-unet")
    attach_lora(pipe, "policy", rank=cfg.lora.rank, alpha=cfg.lora.alpha)
    (run / "checkpoint").mkdir(parents=True)
    write_json(run / "config.json", dataclasses.asdict(cfg))
    write_json(run / "checkpoint" / "state.json", {"iteration": 1})
    save_tensors(run / "checkpoint" / "policy_lora.safetensors", lora_state_dict(pipe, "policy"))
    _truncate(run / "checkpoint" / "policy_lora.safetensors")
    line = one_error_line(in_process(capsys, "export", str(run)))
    assert f"{run / 'checkpoint' / 'policy_lora.safetensors'}: truncated or corrupt safetensors file" in line


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """Exports of a tiny-unet run (policy + critic) and a toy-preset policy LoRA (other shapes)."""
    import critics
    from critics.value_model import LatentCritic, critic_target_modules

    root = tmp_path_factory.mktemp("exports")
    pipe = build_pipeline("preset:tiny-unet")
    attach_lora(pipe, "policy", rank=2, alpha=2.0)
    attach_lora(pipe, "critic", rank=2, target_modules=critic_target_modules(pipe))
    critic = LatentCritic(pipe, ["toy_geneval"], adapter="critic", hidden=8)
    critics.export_pipeline(
        pipe,
        critic,
        root / "tiny",
        base_model="preset:tiny-unet",
        reward_weights={"toy_geneval": 1.0},
        normalisers={"toy_geneval": {"mean": 0.5, "var": 0.1, "count": 8.0}},
    )
    toy = build_pipeline("preset:toy")
    attach_lora(toy, "policy", rank=2, alpha=2.0)
    critics.export_policy(toy, root / "toy_policy")
    return {"policy": root / "tiny" / "policy", "critic": root / "tiny" / "critic", "toy_policy": root / "toy_policy"}


def _sample(capsys, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return in_process(
        capsys,
        "sample",
        "model.source=preset:tiny-unet",
        "num_images=1",
        "sampler.num_inference_steps=1",
        f"out_dir={tmp_path / 'out'}",
        "progress=false",
        *args,
    )


def test_a_policy_lora_from_another_base_is_one_line_not_a_hundred(tmp_path, exported, capsys) -> None:
    line = one_error_line(_sample(capsys, tmp_path, "--policy-lora", str(exported["toy_policy"])))
    assert f"policy_lora {exported['toy_policy']} was made for another base" in line


def test_a_truncated_policy_lora_is_named(tmp_path, exported, capsys) -> None:
    import shutil

    lora = tmp_path / "policy"
    shutil.copytree(exported["policy"], lora)
    _truncate(lora / "pytorch_lora_weights.safetensors")
    line = one_error_line(_sample(capsys, tmp_path, "--policy-lora", str(lora)))
    assert f"{lora / 'pytorch_lora_weights.safetensors'} is truncated or corrupt" in line


def test_a_critic_from_another_base_is_one_line(tmp_path, exported, capsys) -> None:
    proc = in_process(
        capsys,
        "sample",
        "model.source=preset:toy",
        "num_images=1",
        "sampler.num_inference_steps=1",
        f"out_dir={tmp_path / 'out'}",
        "progress=false",
        "--critic",
        str(exported["critic"]),
        "--steer",
        "grad",
    )
    line = one_error_line(proc)
    assert f"critic {exported['critic']} was trained on base 'preset:tiny-unet' with fingerprint" in line


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("model.safetensors", "model.safetensors is truncated or corrupt"),
        ("config.json", "config.json is truncated or not valid JSON"),
    ],
)
def test_a_truncated_critic_file_is_named(tmp_path, exported, capsys, damage: str, expected: str) -> None:
    import shutil

    critic = tmp_path / "critic"
    shutil.copytree(exported["critic"], critic)
    _truncate(critic / damage)
    line = one_error_line(_sample(capsys, tmp_path, "--critic", str(critic), "--steer", "grad"))
    assert f"critic {critic}: " in line and expected in line


def test_a_newer_critic_schema_is_a_one_line_critic_load_error(tmp_path, exported, capsys) -> None:
    import shutil

    critic = tmp_path / "critic"
    shutil.copytree(exported["critic"], critic)
    config = json.loads((critic / "config.json").read_text())
    (critic / "config.json").write_text(json.dumps({**config, "schema_version": 99}))
    line = one_error_line(_sample(capsys, tmp_path, "--critic", str(critic), "--steer", "grad"))
    assert "schema_version 99 is not supported" in line


def test_the_error_mapping_cuts_size_mismatches_and_leaves_bugs_to_their_traceback() -> None:
    from align.errors import one_line

    assert one_line(KeyError("x")) is None and one_line(ZeroDivisionError()) is None
    with pytest.raises(RuntimeError) as info:
        torch.nn.Linear(2, 3).load_state_dict(torch.nn.Linear(3, 4).state_dict())
    line = one_line(info.value)
    assert line.startswith("weights do not fit this model") and "size mismatch for weight" in line
    assert line.endswith("(and 1 more)") and "\n" not in line


def test_critic_settings_with_grpo_are_a_one_line_warning() -> None:
    proc = align_cli("train", "algo=grpo", "critic.rank=4", "rewards=[]")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "align: warning: algo=grpo trains no critic: critic.rank is ignored",
        "align: error: config 'TrainConfig': rewards must list at least one reward: [{name: NAME, weight: W, "
        "args: {...}}]",
    ]

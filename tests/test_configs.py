"""Every shipped YAML in configs/ loads against its schema (torchtune-style guard)."""

from __future__ import annotations

from pathlib import Path

import pytest

from align.config import load_config
from align.sample_job import SampleJobConfig
from align.toy.pretrain import PretrainConfig
from align.train_config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCHEMAS = {
    "toy_sample.yaml": SampleJobConfig,
    "toy_pretrain.yaml": PretrainConfig,
    "toy_ecg.yaml": TrainConfig,
    "sd15_ecg_multi.yaml": TrainConfig,
    "sd35m_ecg_geneval.yaml": TrainConfig,
    "sd15_ecg_geneval.yaml": TrainConfig,
}


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_config_loads(name: str) -> None:
    assert name in SCHEMAS, f"configs/{name} has no schema registered in this test"
    # a hub-id base is not in this machine's HF cache: validation would refuse it (align/model_source.py);
    # allow_download only skips that check here (nothing downloads at config time)
    hub = "stable-diffusion" in (CONFIGS / name).read_text()
    load_config(SCHEMAS[name], CONFIGS / name, ["model.allow_download=true"] if hub else [])


@pytest.mark.parametrize("name", ["sd35m_ecg_geneval.yaml", "sd15_ecg_geneval.yaml"])
def test_geneval_configs_train_on_geneval_records_with_local_model_paths(name: str) -> None:
    cfg = load_config(TrainConfig, CONFIGS / name, ["model.allow_download=true"])  # hub-id base (see above)
    assert [(s.name, s.weight) for s in cfg.rewards] == [("geneval", 1.0)] and cfg.trainer.prompts == "geneval"
    assert {"detector_path", "clip_path"} <= set(cfg.reward_args_of("geneval"))

"""The embedded default run (`align train` with no arguments) is configs/toy_ecg.yaml, and the
dataclass defaults say the same, so an install without the repo's configs/ behaves identically."""

from __future__ import annotations

import dataclasses

from align.cli import DEFAULT_TRAIN_CONFIG
from align.config import load_config
from align.train_config import TrainConfig


def test_toy_ecg_yaml_equals_the_dataclass_defaults() -> None:
    assert dataclasses.asdict(load_config(TrainConfig, DEFAULT_TRAIN_CONFIG)) == dataclasses.asdict(TrainConfig())

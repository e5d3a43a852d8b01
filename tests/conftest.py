"""Shared fixtures: tiny real pipelines built from configs (seeded, fp32, CPU), never from a hub."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from align.backbones import build_pipeline  # noqa: E402


@pytest.fixture
def tiny_unet_pipe():
    return build_pipeline("preset:tiny-unet")


@pytest.fixture
def tiny_unet_vpred_pipe():
    return build_pipeline("preset:tiny-unet", prediction_type="v_prediction")


@pytest.fixture
def tiny_dit_pipe():
    return build_pipeline("preset:tiny-dit")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)

"""Shared fixtures: tiny real pipelines built from configs (seeded, fp32, CPU), never from a hub."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from align.backbones import build_pipeline  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a small, shared CPU OpenMP's spinning
# workers make each op 20–50× slower (measured: a 64-channel 3×3 conv takes 25 ms with 2 threads
# beside one busy process, 0.5 ms with 1). ALIGN_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("ALIGN_TEST_THREADS", "1")))


@pytest.fixture
def tiny_unet_pipe():
    """Fresh SD1.5-class pipeline (ε-prediction, DDIM); tests may mutate it (building takes ~50 ms)."""
    return build_pipeline("preset:tiny-unet")


@pytest.fixture
def tiny_unet_vpred_pipe():
    """As ``tiny_unet_pipe`` with a v-prediction scheduler."""
    return build_pipeline("preset:tiny-unet", prediction_type="v_prediction")


@pytest.fixture
def tiny_dit_pipe():
    """Fresh SD3-class pipeline (MMDiT, flow matching, no T5)."""
    return build_pipeline("preset:tiny-dit")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)

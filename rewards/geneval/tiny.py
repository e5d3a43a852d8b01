"""Randomly initialised GenEval models built from configs and saved like the real ones, so tests and
benchmarks go through the reward's real loading path without any download.

``tiny``: a 0.36M-parameter Mask2Former and a tiny open_clip CLIP (CPU tests, seconds). ``full``: the
real architectures (Mask2Former Swin-S COCO instances, open_clip ViT-L-14 QuickGELU) with random weights,
for throughput at the real sizes (benchmarks/geneval_reward.py --models full, on a GPU).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

SIZES = ("tiny", "full")


def save_mask2former(
    path: str | Path, size: str = "tiny", favour: Optional[int] = None, image_size: int = 64, seed: int = 0
) -> Path:
    """A Mask2Former instance-segmentation directory (config, safetensors, image processor). With
    ``favour`` the class head always says that label (weights 0, bias 20: probability ~1 for every query),
    so each instance's score is its mean mask probability: a detector with known class output."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    stages = ["stage1", "stage2", "stage3", "stage4"]
    torch.manual_seed(seed)
    if size == "tiny":
        swin = SwinConfig(
            image_size=image_size,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 2],
            window_size=4,
            out_features=stages,
        )
        config = Mask2FormerConfig(
            backbone_config=swin,
            num_labels=80,
            hidden_dim=32,
            feature_size=32,
            mask_feature_size=32,
            num_queries=12,
            encoder_layers=1,
            decoder_layers=2,
            encoder_feedforward_dim=64,
            dim_feedforward=64,
            num_attention_heads=2,
            use_pretrained_backbone=False,
        )
        processor = Mask2FormerImageProcessor(
            size={"shortest_edge": image_size, "longest_edge": 2 * image_size}, size_divisor=32
        )
    elif size == "full":  # Swin-S, as facebook/mask2former-swin-small-coco-instance
        swin = SwinConfig(
            image_size=224,
            embed_dim=96,
            depths=[2, 2, 18, 2],
            num_heads=[3, 6, 12, 24],
            window_size=7,
            out_features=stages,
        )
        config = Mask2FormerConfig(backbone_config=swin, num_labels=80, use_pretrained_backbone=False)
        processor = Mask2FormerImageProcessor(size={"shortest_edge": 384, "longest_edge": 1333}, size_divisor=32)
    else:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    model = Mask2FormerForUniversalSegmentation(config).eval()
    if favour is not None:
        with torch.no_grad():
            model.class_predictor.weight.zero_()
            model.class_predictor.bias.zero_()
            model.class_predictor.bias[favour] = 20.0
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_open_clip(path: str | Path, size: str = "tiny", seed: int = 1) -> Path:
    """An open_clip directory (open_clip_config.json + open_clip_model.safetensors), loadable as ``local-dir:``."""
    from open_clip import get_model_config
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    if size == "tiny":
        cfg = {
            "embed_dim": 16,
            "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        }
    elif size == "full":
        cfg = get_model_config("ViT-L-14-quickgelu")
    else:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    torch.manual_seed(seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file(CLIP(**cfg).state_dict(), str(path / "open_clip_model.safetensors"))
    return path

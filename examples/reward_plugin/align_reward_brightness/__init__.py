"""A minimal align reward plugin: images whose mean brightness is close to ``target`` score higher.

    r(x) = −| mean(x) − target |        x: (3, H, W) in [0, 1]   → r ∈ [−1, 0]

Installed with ``pip install -e examples/reward_plugin``; the entry point in pyproject.toml
registers it as ``brightness``. Keyword arguments come from the align config:
``rewards: [{name: brightness, args: {target: 0.3}}]``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


class Brightness:
    """Closeness of the mean pixel value to a target brightness: −|mean − target|."""

    name = "brightness"

    def __init__(self, target: float = 0.5, device: str = "cpu", batch_size: Optional[int] = 64) -> None:
        if not 0.0 <= target <= 1.0:
            raise ValueError(f"reward 'brightness': target must be in [0, 1], got {target}")
        self.target = float(target)
        self.device = device  # align moves each batch here before calling
        self.batch_size = batch_size  # align calls with at most this many images at a time

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: dict[str, Any]) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1], B prompts → scores (B,) float."""
        return -(images.float().mean(dim=(1, 2, 3)) - self.target).abs()

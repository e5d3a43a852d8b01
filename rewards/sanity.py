"""Sanity rewards with a known direction (the CartPole of this framework; benchmarks/sanity.py).

Each is a plain image statistic that a LoRA can move in either direction; trained with weight +1
or −1 it must rise or fall. They need no model weights.
"""

from __future__ import annotations

from typing import Any

import torch

#: RGB in [0, 1] of the colours that ``color_fraction`` knows (the toy world's palette, black and white)
COLORS: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}


class MeanBrightness:
    """Mean pixel value over the image and its channels, in [0, 1]."""

    name = "mean_brightness"
    device = "cpu"
    batch_size = None

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: dict[str, Any]) -> torch.Tensor:
        return images.float().clamp(0, 1).mean(dim=(1, 2, 3))


class ColorFraction:
    """Fraction of pixels within ``tolerance`` (Euclidean RGB distance, on [0, 1]) of ``color``."""

    name = "color_fraction"
    device = "cpu"
    batch_size = None

    def __init__(self, color: str = "red", tolerance: float = 0.5) -> None:
        if color not in COLORS:
            raise ValueError(f"color_fraction: unknown color {color!r}; choose one of: {', '.join(COLORS)}")
        if not 0 < tolerance <= 3**0.5:
            raise ValueError(f"color_fraction: tolerance must be in (0, √3], got {tolerance}")
        self.color, self.tolerance = color, float(tolerance)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: dict[str, Any]) -> torch.Tensor:
        rgb = torch.tensor(COLORS[self.color], dtype=torch.float32).view(1, 3, 1, 1)
        dist = (images.float().clamp(0, 1) - rgb).pow(2).sum(dim=1).sqrt()  # (B, H, W)
        return (dist < self.tolerance).float().mean(dim=(1, 2))

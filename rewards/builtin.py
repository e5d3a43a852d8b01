"""Built-in rewards that need no model weights: the toy-world checker and DDPO's JPEG rewards."""
from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from rewards.registry import register_reward


@register_reward("toy_geneval")
class ToyGenEval:
    """The toy world's GenEval-style checker: mean of per-attribute partial credit in [0, 1].
    Per-attribute scores go to ``metadata['toy_geneval']`` (dict of (B,) tensors)."""
    name = "toy_geneval"
    device = "cpu"
    batch_size = None

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: dict[str, Any]) -> torch.Tensor:
        from align.toy.checker import check_batch
        scores = check_batch(images.float().clamp(0, 1).cpu(), prompts)
        metadata[self.name] = {k: v for k, v in scores.items() if k != "score"}
        return scores["score"]


def jpeg_kilobytes(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each image encoded as JPEG (PIL, given quality) — DDPO's compressibility."""
    arr = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for img in arr:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegSize:
    """DDPO's JPEG rewards: ``sign`` × (JPEG size in kB). −1: compressibility (smaller files score
    higher); +1: incompressibility."""
    name = "jpeg_size"
    sign = 1.0
    device = "cpu"
    batch_size = None

    def __init__(self, quality: int = 95) -> None:
        self.quality = quality

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: dict[str, Any]) -> torch.Tensor:
        return self.sign * jpeg_kilobytes(images, self.quality)


@register_reward("jpeg_compressibility")
class JpegCompressibility(JpegSize):
    """DDPO's compressibility: −(JPEG size in kB) at the given quality (real PIL encoding)."""
    name, sign = "jpeg_compressibility", -1.0


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(JpegSize):
    """DDPO's incompressibility: +(JPEG size in kB) at the given quality (real PIL encoding)."""
    name, sign = "jpeg_incompressibility", 1.0

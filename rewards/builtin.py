"""Built-in rewards that need no model weights: toy-GenEval (toy detector + rule engine) and DDPO's JPEG rewards."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image


class ToyGenEval:
    """toy-GenEval: the toy detector (``align.toy.detector``) feeding the one GenEval rule engine
    (``rewards.geneval.rules.evaluate``). Returns the partial-credit ``score`` (satisfied checks / all
    checks, Flow-GRPO's dense reward) or, with ``strict=True``, GenEval's 0/1 ``correct``.

    Each prompt's record is ``metadata["prompt_metadata"][i]`` when given, else parsed from the toy
    prompt (``align.toy.world.parse_prompt``). ``metadata["toy_geneval"]`` receives (B,) float
    tensors: ``strict``, ``score``, ``tag_<tag>`` (1 where the sample has that tag; no "/" so the remote wire
    keeps it), and per check
    kind (``count``, ``color``, ``position``, ``exclude``) ``<kind>_ok`` / ``<kind>_checks``: the
    satisfied and total checks of that kind."""

    name = "toy_geneval"
    device = "cpu"
    batch_size = None

    def __init__(self, strict: bool = False) -> None:
        if not isinstance(strict, bool):
            raise ValueError(f"reward_args.toy_geneval.strict must be true or false, got {strict!r}")
        self.strict = strict

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: dict[str, Any]) -> torch.Tensor:
        from align.toy.detector import score_batch
        from align.toy.world import TAGS

        result = score_batch(images.float().clamp(0, 1).cpu(), prompts, metadata.get("prompt_metadata"))
        out = {"strict": result["strict"], "score": result["score"]}
        out.update({f"tag_{t}": torch.tensor([float(x == t) for x in result["tag"]]) for t in TAGS})
        for kind in CHECK_KINDS:
            for suffix, keep in (("ok", True), ("checks", False)):
                out[f"{kind}_{suffix}"] = torch.tensor(
                    [
                        float(sum(_kind(c) == kind and (c["ok"] or not keep) for c in v.details["checks"]))
                        for v in result["verdicts"]
                    ]
                )
        metadata[self.name] = out
        return result["strict"] if self.strict else result["score"]


#: The rule engine's check kinds, as ``toy_geneval`` counts them.
CHECK_KINDS = ("count", "color", "position", "exclude")


def _kind(check: dict) -> str:
    return "exclude" if check["clause"] == "exclude" else check["check"]


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


class JpegCompressibility(JpegSize):
    """DDPO's compressibility: −(JPEG size in kB) at the given quality (real PIL encoding)."""

    name, sign = "jpeg_compressibility", -1.0


class JpegIncompressibility(JpegSize):
    """DDPO's incompressibility: +(JPEG size in kB) at the given quality (real PIL encoding)."""

    name, sign = "jpeg_incompressibility", 1.0

"""The toy detector and toy-GenEval scoring: toy images -> ``Detection`` records -> the one rule engine.

:func:`detect` reads every object of a toy image (:func:`align.toy.checker.detect_objects`:
8-connected components, nearest-palette colour, same-area template shape) and returns GenEval
``Detection`` records (label = shape, box = pixel-edge bounding box, mask, score 1.0, colour
filled in). :func:`score_images` feeds them with each prompt's GenEval metadata record (from
:func:`align.toy.world.parse_prompt`, or given) to :func:`rewards.geneval.rules.evaluate`: the
strict 0/1 verdict, the partial-credit score (satisfied checks / all checks) and the reason.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from align.toy.checker import detect_objects
from align.toy.world import COLORS, SHAPES, TAGS, parse_prompt
from rewards.geneval.rules import Detection, Verdict, evaluate, validate_metadata

#: Confidence of every toy detection: the reads are deterministic, so they pass both of GenEval's
#: thresholds (0.3, and 0.9 for counting).
TOY_SCORE = 1.0


def detect(image: np.ndarray) -> list[Detection]:
    """Every object of a float [H, W, 3] image in [0, 1], largest first (ties keep scan order)."""
    objects = sorted(detect_objects(image), key=lambda o: -o["area"])
    return [
        Detection(label=o["shape"], box=o["box"], score=TOY_SCORE, mask=o["mask"], color=o["color"]) for o in objects
    ]


def toy_metadata(prompt: str, metadata: Optional[dict] = None) -> dict:
    """``metadata`` checked against the toy classes and colours, or the record parsed from ``prompt``."""
    if metadata is None:
        return parse_prompt(prompt)
    validate_metadata(metadata, SHAPES, tuple(COLORS))
    return metadata


def score_image(image: torch.Tensor, prompt: str, metadata: Optional[dict] = None) -> Verdict:
    """The rule engine's verdict on one [3, H, W] float image against its prompt (or given record)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"toy_geneval: expected a [3,H,W] image, got shape {tuple(image.shape)}")
    arr = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return evaluate(toy_metadata(prompt, metadata), detect(arr), image=arr, colors=tuple(COLORS))


def score_images(
    images: torch.Tensor, prompts: Sequence[str], metadata: Optional[Sequence[Optional[dict]]] = None
) -> list[Verdict]:
    """:func:`score_image` over a [B, 3, H, W] batch; ``metadata[i]`` (or None) overrides the parse.
    Every record is built (and checked) before any image is scored."""
    if images.ndim != 4:
        raise ValueError(f"toy_geneval: expected images [B,3,H,W], got shape {tuple(images.shape)}")
    if images.shape[0] != len(prompts) or (metadata is not None and len(metadata) != len(prompts)):
        raise ValueError(
            f"toy_geneval: {images.shape[0]} images but {len(prompts)} prompts"
            + (f" and {len(metadata)} metadata records" if metadata is not None else "")
        )
    records = [toy_metadata(p, None if metadata is None else metadata[i]) for i, p in enumerate(prompts)]
    return [score_image(img, p, rec) for img, p, rec in zip(images, prompts, records)]


def score_batch(
    images: torch.Tensor, prompts: Sequence[str], metadata: Optional[Sequence[Optional[dict]]] = None
) -> dict:
    """Batch scores: ``strict`` and ``score`` float tensors [B], ``tag`` (list of str) and the
    ``verdicts`` themselves (reason, per-clause details)."""
    verdicts = score_images(images, prompts, metadata)
    tags = [toy_metadata(p, None if metadata is None else metadata[i])["tag"] for i, p in enumerate(prompts)]
    return {
        "strict": torch.tensor([v.strict for v in verdicts], dtype=torch.float32),
        "score": torch.tensor([v.score for v in verdicts], dtype=torch.float32),
        "tag": tags,
        "verdicts": verdicts,
    }


def per_tag(values: torch.Tensor, tags: Sequence[str]) -> dict[str, float]:
    """Mean of ``values`` per tag (tags in GenEval's order; absent tags omitted) and ``overall``,
    the mean over the present tags (GenEval's benchmark score)."""
    out = {t: float(values[[i for i, x in enumerate(tags) if x == t]].mean()) for t in TAGS if t in tags}
    out["overall"] = float(np.mean(list(out.values()))) if out else 0.0
    return out

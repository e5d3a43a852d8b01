"""The ``geneval`` reward: a detector + the colour classifier + the one rule engine, per image.

Each image needs its GenEval metadata record: ``metadata["prompt_metadata"][i]`` when the caller
passes records (training does, from ``trainer.prompts``), else the record of the prompt in the
``prompts`` source (default: the shipped GenEval set; a JSONL file works too) — so a remote reward
server, which receives only prompts, scores GenEval prompts too. A prompt with neither is an error.
Every record is checked (classes, colours, relations, position indices) before the detector runs.

Returns Flow-GRPO's partial credit (``reward="score"``, satisfied checks / all checks) or GenEval's
strict 0/1 (``reward="strict"``); both go to ``metadata["geneval"]`` as (B,) tensors.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from rewards.geneval.rules import GENEVAL_COLORS, ColorClassifier, RuleConfig, Verdict, evaluate, validate_metadata

REWARD_KEYS = ("score", "strict")


def to_numpy_images(images: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) in [0, 1] → float [H, W, 3] arrays quantised as a saved PNG (q/255, q = round(255·x))."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (B,3,H,W), got shape {tuple(images.shape)}")
    q = (images.detach().float().clamp(0, 1) * 255).round() / 255
    return list(q.permute(0, 2, 3, 1).cpu().numpy())


class GenEvalScorer:
    """Verdicts of a batch: detector on all images at once, then the rule engine image by image."""

    def __init__(
        self,
        detector,
        classify_colors: Optional[ColorClassifier],
        class_names: Sequence[str],
        config: RuleConfig = RuleConfig(),
        colors: Sequence[str] = GENEVAL_COLORS,
    ) -> None:
        self.detector, self.classify_colors = detector, classify_colors
        self.class_names, self.config, self.colors = tuple(class_names), config, tuple(colors)

    def verdicts(self, images: torch.Tensor, records: Sequence[dict]) -> list[Verdict]:
        if images.shape[0] != len(records):
            raise ValueError(f"geneval: {images.shape[0]} images but {len(records)} metadata records")
        for record in records:
            validate_metadata(record, self.class_names, self.colors)
        arrays = to_numpy_images(images)
        detections = self.detector(arrays)
        return [
            evaluate(rec, dets, image=img, classify_colors=self.classify_colors, colors=self.colors, config=self.config)
            for rec, dets, img in zip(records, detections, arrays)
        ]


def resolve_records(prompts: Sequence[str], given: Optional[Sequence[Optional[dict]]], source: str) -> list[dict]:
    """Each prompt's record: the given one, else the source's record of that prompt (one-line error if none)."""
    from align.prompts import prompt_metadata

    given = list(given) if given is not None else [None] * len(prompts)
    missing = [p for p, r in zip(prompts, given) if r is None]
    looked_up = iter(prompt_metadata(source, missing)) if missing else iter(())
    out = [r if r is not None else next(looked_up) for r in given]
    bad = next((p for p, r in zip(prompts, out) if r is None), None)
    if bad is not None:
        raise ValueError(
            f"geneval: prompt {bad!r} has no metadata record (pass prompt_metadata, or use a "
            "GenEval or JSONL prompt source)"
        )
    return out


class GenEvalReward:
    """GenEval (Mask2Former + CLIP colours + the rule engine): partial credit or strict 0/1 per image."""

    name = "geneval"
    device = "cpu"
    batch_size: Optional[int] = 16

    def __init__(
        self,
        detector_path: Optional[str] = None,
        clip_path: Optional[str] = None,
        device: str = "cpu",
        reward: str = "score",
        prompts: str = "geneval",
        clip_arch: str = "ViT-L-14-quickgelu",
        class_names: Optional[list] = None,
        threshold: float = 0.3,
        counting_threshold: float = 0.9,
        max_objects: int = 16,
        position_threshold: float = 0.1,
        max_overlap: float = 1.0,
        detector_shortest_edge: Optional[int] = None,
    ) -> None:
        from rewards.geneval.colors import ClipColorClassifier
        from rewards.geneval.data import object_names
        from rewards.geneval.detector import load_detector

        if reward not in REWARD_KEYS:
            raise ValueError(f"reward 'geneval': reward must be one of {', '.join(REWARD_KEYS)}, got {reward!r}")
        config = RuleConfig(
            threshold=float(threshold),
            counting_threshold=float(counting_threshold),
            max_objects=int(max_objects),
            position_threshold=float(position_threshold),
            max_overlap=float(max_overlap),
        )
        names = tuple(class_names) if class_names else object_names()
        detector = load_detector(
            detector_path,
            names,
            device=device,
            min_score=min(config.threshold, config.counting_threshold),
            shortest_edge=detector_shortest_edge,
        )
        self.scorer = GenEvalScorer(
            detector, ClipColorClassifier(clip_path, device=device, arch=clip_arch), names, config
        )
        self.device, self.reward, self.prompts = device, reward, prompts

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: dict[str, Any]) -> torch.Tensor:
        records = resolve_records(prompts, metadata.get("prompt_metadata"), self.prompts)
        verdicts = self.scorer.verdicts(images, records)
        values = {k: torch.tensor([getattr(v, k) for v in verdicts], dtype=torch.float32) for k in REWARD_KEYS}
        metadata[self.name] = values
        return values[self.reward]

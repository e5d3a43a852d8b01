"""GenEval's object detector behind a small protocol, with the default: transformers' Mask2Former
(COCO instance segmentation) loaded from a local directory.

The paper uses mmdet's Mask2Former Swin-S (COCO instances); transformers ships the same architecture
(``Mask2FormerForUniversalSegmentation``, e.g. the converted ``facebook/mask2former-swin-small-coco-instance``)
with the same instance post-processing (top-k over query × class, score = class probability × mean
mask probability). Boxes are the masks' bounding boxes, as mmdet derives them (exclusive right/bottom
edge). Deviations and their expected effect: docs/geneval.md.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

import numpy as np
import torch

from rewards.geneval.colors import require_path, to_uint8
from rewards.geneval.rules import Detection

DETECTOR_HELP = (
    "a transformers Mask2Former COCO instance-segmentation directory (config.json, model.safetensors, "
    "preprocessor_config.json; e.g. facebook/mask2former-swin-small-coco-instance)"
)


class Detector(Protocol):
    """Detections of each image (float [H, W, 3] in [0, 1]); labels are the rule engine's class names."""

    def __call__(self, images: Sequence[np.ndarray]) -> list[list[Detection]]: ...


class Mask2FormerDetector:
    """Mask2Former instance segmentation → :class:`Detection` (label, mask box, score, bool mask).

    ``min_score`` drops instances below it before masks are upsampled (the rule engine applies the
    GenEval's thresholds again; keep it at or below the lowest of them). ``shortest_edge`` overrides the
    processor's input size (e.g. 800, mmdet's test scale; default: the checkpoint's preprocessor_config)."""

    def __init__(
        self,
        path: str,
        class_names: Sequence[str],
        device: str = "cpu",
        min_score: float = 0.3,
        shortest_edge: Optional[int] = None,
    ) -> None:
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        where = require_path(path, "detector_path", DETECTOR_HELP, kind="dir")
        if not (where / "config.json").is_file() or not (where / "preprocessor_config.json").is_file():
            raise ValueError(
                f"reward 'geneval': reward_args.geneval.detector_path: no config.json and "
                f"preprocessor_config.json in {str(where)!r}; it needs {DETECTOR_HELP}"
            )
        self.processor = AutoImageProcessor.from_pretrained(str(where), local_files_only=True)
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(str(where), local_files_only=True)
        self.model.to(device).eval()
        if self.model.config.num_labels != len(class_names):
            raise ValueError(
                f"reward 'geneval': the detector at {str(where)!r} has {self.model.config.num_labels} "
                f"classes but {len(class_names)} class names are given (label i is class_names[i])"
            )
        self.class_names, self.device, self.min_score = tuple(class_names), device, float(min_score)
        self.size = (
            None
            if shortest_edge is None
            else {"shortest_edge": int(shortest_edge), "longest_edge": max(int(shortest_edge), 1333)}
        )

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        from torchvision.ops import masks_to_boxes

        if not len(images):
            return []
        size = {"size": self.size} if self.size else {}
        inputs = self.processor(images=[to_uint8(img) for img in images], return_tensors="pt", **size).to(self.device)
        outputs = self.model(**inputs)
        results = self.processor.post_process_instance_segmentation(
            outputs, threshold=self.min_score, target_sizes=[img.shape[:2] for img in images], return_binary_maps=True
        )
        out = []
        for result in results:
            info = result["segments_info"]
            if not info:
                out.append([])
                continue
            masks = result["segmentation"].bool()
            boxes = (masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0], device=masks.device)).tolist()
            masks_np = masks.cpu().numpy()
            out.append(
                [
                    Detection(self.class_names[s["label_id"]], tuple(box), float(s["score"]), mask=m)
                    for s, box, m in zip(info, boxes, masks_np)
                ]
            )
        return out


def load_detector(
    path: Optional[str],
    class_names: Sequence[str],
    device: str = "cpu",
    min_score: float = 0.3,
    shortest_edge: Optional[int] = None,
) -> Detector:
    """The default detector (Mask2Former) from ``path``; a missing path is a one-line error."""
    return Mask2FormerDetector(path, class_names, device=device, min_score=min_score, shortest_edge=shortest_edge)

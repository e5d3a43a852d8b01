"""GenEval's colour classifier (rule 3 of docs/geneval.md, "The rules"): zero-shot open_clip on masked object
crops.

Each object is its box crop of the image with everything outside its mask replaced by grey #999;
the class embeddings of the colours average three templates ("a photo of a {c} {class}", "a photo
of a {c}-colored {class}", "a photo of a {c} object") with open_clip's own
``build_zero_shot_classifier`` (normalise each template's embedding, mean, renormalise), cached per
class name; the colour is the argmax of the cosine similarity. The default model is ViT-L-14 with
OpenAI's weights (QuickGELU), loaded from a local checkpoint, never from the hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from rewards.geneval.rules import Detection

BACKGROUND = "#999"
TEMPLATES = ("a photo of a {{}} {cls}", "a photo of a {{}}-colored {cls}", "a photo of a {{}} object")
#: open_clip architecture of a bare checkpoint file (OpenAI's ViT-L/14 uses QuickGELU)
DEFAULT_ARCH = "ViT-L-14-quickgelu"
CLIP_HELP = (
    "an open_clip ViT-L-14 checkpoint: a directory with open_clip_config.json + open_clip_model.safetensors "
    "(e.g. timm/vit_large_patch14_clip_224.openai) or a .safetensors/.pt state-dict file"
)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [H, W, 3] in [0, 1] → uint8 round(255·x), what a saved PNG holds."""
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def masked_crop(image: np.ndarray, detection: Detection) -> Image.Image:
    """The detection's box crop, pixels outside its mask (if any) replaced by grey #999 (PIL composite)."""
    pil = Image.fromarray(to_uint8(image) if image.dtype != np.uint8 else image, "RGB")
    if detection.mask is not None:
        mask = np.asarray(detection.mask, dtype=bool)
        if mask.shape != pil.size[::-1]:
            raise ValueError(f"mask of shape {mask.shape} for an image of {pil.size[::-1]}")
        pil = Image.composite(pil, Image.new("RGB", pil.size, BACKGROUND), Image.fromarray(mask))
    return pil.crop(tuple(float(v) for v in detection.box))


def require_path(path: Optional[str], key: str, what: str, kind: str = "any") -> Path:
    """``path`` as a Path, or a one-line error naming the reward argument, what is needed and where it looked."""
    if not path:
        raise ValueError(f"reward 'geneval': reward_args.geneval.{key} is not set; it needs {what}")
    p = Path(path).expanduser()
    ok = p.is_dir() if kind == "dir" else p.exists()
    if not ok:
        raise ValueError(f"reward 'geneval': reward_args.geneval.{key}: nothing at {str(p)!r}; it needs {what}")
    return p


class ClipColorClassifier:
    """Our :class:`~rewards.geneval.rules.ColorClassifier` on open_clip (module docstring)."""

    def __init__(self, path: str, device: str = "cpu", arch: str = DEFAULT_ARCH, batch_size: int = 16) -> None:
        import open_clip

        where = require_path(path, "clip_path", CLIP_HELP)
        if where.is_dir():
            if not (where / "open_clip_config.json").is_file():
                raise ValueError(
                    f"reward 'geneval': reward_args.geneval.clip_path: no open_clip_config.json in "
                    f"{str(where)!r}; it needs {CLIP_HELP}"
                )
            name, pretrained = f"local-dir:{where}", None
        else:
            name, pretrained = arch, str(where)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, weights_only=True
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.device, self.batch_size = device, int(batch_size)
        self._classifiers: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}

    def class_embeddings(self, class_name: str, colors: Sequence[str]) -> torch.Tensor:
        """(D, len(colors)) zero-shot weights of the colours for ``class_name``, built once per class."""
        key = (class_name, tuple(colors))
        if key not in self._classifiers:
            from open_clip import build_zero_shot_classifier

            templates = [t.format(cls=class_name) for t in TEMPLATES]
            self._classifiers[key] = build_zero_shot_classifier(
                self.model, self.tokenizer, list(colors), templates, num_classes_per_batch=None, device=self.device
            )
        return self._classifiers[key]

    @torch.no_grad()
    def __call__(self, image: np.ndarray, detections: Sequence[Detection], colors: Sequence[str]) -> list[str]:
        if not detections:
            return []
        if len({d.label for d in detections}) != 1:
            raise ValueError(
                f"colour classification takes detections of one class, got {sorted({d.label for d in detections})}"
            )
        weights = self.class_embeddings(detections[0].label, colors)
        out: list[str] = []
        for start in range(0, len(detections), self.batch_size):
            crops = [self.preprocess(masked_crop(image, d)) for d in detections[start : start + self.batch_size]]
            features = self.model.encode_image(torch.stack(crops).to(self.device), normalize=True)
            out += [colors[i] for i in (features @ weights).argmax(dim=1).tolist()]
        return out

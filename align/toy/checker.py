"""GenEval-style checker for the toy world: score an image against its prompt, per attribute.

Detection (deterministic, no learned parts):

1. foreground = pixels whose brightest channel exceeds ``FOREGROUND_THRESHOLD``;
2. objects = 8-connected components of the foreground (``scipy.ndimage.label``) with at least
   ``MIN_AREA`` pixels at 32 px (scaled with the image area), which absorbs diffusion speckle;
3. each object's colour is the palette colour nearest (RGB) to its mean colour, its shape comes
   from which corners of its bounding box it fills (:func:`classify_shape`), and its position is
   its centroid's side of the midline.

Scores, each in [0, 1] (the "targets" are the objects of the prompt's colour):

* ``color``    = targets / objects (0 if there is no object);
* ``count``    = 1 if the number of targets equals the prompt's count, else 0 (as GenEval);
* ``shape``    = fraction of targets with the prompt's shape (0 if no target);
* ``position`` = fraction of targets whose centroid lies in the prompt's half (0 if no target);
* ``score``    = the mean of the four (partial credit).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from align.toy.world import COLORS, RESOLUTION, Scene, parse_prompt

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "count", "position")
FOREGROUND_THRESHOLD = 0.25
MIN_AREA = 6
_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32) / 255.0
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def detect_objects(image: np.ndarray) -> list[dict]:
    """Objects in an [H,W,3] float image in [0,1]: colour, shape, centroid (x, y) and area."""
    size = image.shape[0]
    mask = image.max(axis=2) > FOREGROUND_THRESHOLD
    labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    min_area = MIN_AREA * (size / RESOLUTION) ** 2
    objects = []
    for idx, box in enumerate(ndimage.find_objects(labels), start=1):
        comp = labels[box] == idx
        area = int(comp.sum())
        if area < min_area:
            continue
        ys, xs = np.nonzero(comp)
        mean_rgb = image[box][comp].mean(axis=0)
        color = _PALETTE_NAMES[int(np.argmin(((_PALETTE - mean_rgb) ** 2).sum(axis=1)))]
        objects.append({"color": color, "shape": classify_shape(comp), "area": area,
                        "cx": float(xs.mean() + box[1].start + 0.5),
                        "cy": float(ys.mean() + box[0].start + 0.5)})
    return objects


def classify_shape(comp: np.ndarray) -> str:
    """Square, circle or triangle from a component's boolean bounding-box crop.

    Uses the four corner pixels of the bounding box, which survive the coarse rasterisation of
    7-px objects better than a fill ratio: a square fills all four corners, an upright triangle
    only the two bottom ones, a (symmetric) disk none.
    """
    top = (float(comp[0, 0]) + float(comp[0, -1])) / 2.0
    bottom = (float(comp[-1, 0]) + float(comp[-1, -1])) / 2.0
    if top > 0.5 and bottom > 0.5:
        return "square"
    if bottom > 0.5 >= top:
        return "triangle"
    return "circle"


def in_region(position: str, cx: float, cy: float, size: int) -> bool:
    mid = size / 2.0
    return {"left": cx < mid, "right": cx > mid, "top": cy < mid, "bottom": cy > mid}[position]


def check_image(image: torch.Tensor, scene: Scene | str) -> dict[str, float]:
    """Score one image ([3,H,W] float in [0,1]) against a scene or toy prompt (module docstring)."""
    if isinstance(scene, str):
        scene = parse_prompt(scene)
    arr = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    objects = detect_objects(arr)
    targets = [o for o in objects if o["color"] == scene.color]
    n_t = len(targets)
    scores = {
        "color": n_t / len(objects) if objects else 0.0,
        "shape": sum(o["shape"] == scene.shape for o in targets) / n_t if n_t else 0.0,
        "count": float(n_t == scene.count),
        "position": sum(in_region(scene.position, o["cx"], o["cy"], arr.shape[0]) for o in targets) / n_t
        if n_t else 0.0,
    }
    scores["score"] = sum(scores[a] for a in ATTRIBUTES) / len(ATTRIBUTES)
    return scores


def check_batch(images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """:func:`check_image` over a batch: a dict of float tensors [B] (keys ATTRIBUTES + score)."""
    if images.shape[0] != len(prompts):
        raise ValueError(f"check_batch: {images.shape[0]} images but {len(prompts)} prompts")
    rows = [check_image(img, p) for img, p in zip(images, prompts)]
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.float32) for k in (*ATTRIBUTES, "score")}

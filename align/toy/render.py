"""The toy renderer: procedural, seeded images of a :class:`align.toy.world.Scene`.

Objects are filled shapes (half-size 3.2–3.8 px at 32 px, centres snapped to pixel centres so disks
rasterise symmetrically) on a black canvas, each fully inside it and at least ``MIN_GAP`` px from
every other (so connected components separate them). Each object's colour is its prompt colour, or
a palette colour drawn per object when the prompt names none, jittered by ±15 per channel.
Position scenes are drawn until GenEval's position rule holds with a margin: the shrunk,
normalised offset of the subject from the reference is at least ``RELATION_MARGIN`` (the rule
needs 0.5) along the asked direction.
"""

from __future__ import annotations

import numpy as np
import torch

from align.toy.world import COLORS, RESOLUTION, Scene

#: Objects' bounding-box half-size range at RESOLUTION (scaled linearly with the image size).
OBJECT_RADIUS = (3.2, 3.8)
#: Minimum gap in pixels between two objects, so connected components separate them.
MIN_GAP = 2.0
#: Normalised direction the renderer guarantees for position scenes (the rule's threshold is 0.5).
RELATION_MARGIN = 0.65
#: GenEval's position offset: each axis of the centre offset shrinks by this × the summed extents.
POSITION_OFFSET = 0.1
_DIRECTION = {"left of": (0, -1.0), "right of": (0, 1.0), "above": (1, -1.0), "below": (1, 1.0)}


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean [size,size] mask of one filled shape centred at (cx, cy) with half-size r.

    The centre is snapped to a pixel centre so that small disks rasterise symmetrically (no
    one-pixel nubs), which keeps the three shapes distinguishable at 7 px.
    """
    cx, cy = np.floor(cx) + 0.5, np.floor(cy) + 0.5
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
    if shape == "square":
        h = r * 0.85  # equal area-ish with the disk, so size doesn't give the shape away
        return (np.abs(xx - cx) <= h) & (np.abs(yy - cy) <= h)
    # upright isosceles triangle: apex at top, base at the bottom of the bounding box
    frac = (yy - (cy - r)) / (2 * r)
    return (frac >= 0) & (frac <= 1) & (np.abs(xx - cx) <= frac * r)


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) pixel-edge box of a boolean mask (x1, y1 exclusive)."""
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def relation_strength(box_a, box_b, relation: str) -> float:
    """GenEval's position rule as a number: the offset of a's centre from b's, each axis shrunk
    towards 0 by ``POSITION_OFFSET`` × (extent_a + extent_b), divided by the unshrunk norm, read
    along ``relation``'s direction (> 0.5 means the relation holds; image y grows downwards)."""
    ca = np.array([box_a[0] + box_a[2], box_a[1] + box_a[3]]) / 2
    cb = np.array([box_b[0] + box_b[2], box_b[1] + box_b[3]]) / 2
    offset = ca - cb
    extent = np.array([box_a[2] - box_a[0] + box_b[2] - box_b[0], box_a[3] - box_a[1] + box_b[3] - box_b[1]])
    shrunk = np.sign(offset) * np.maximum(np.abs(offset) - POSITION_OFFSET * extent, 0.0)
    norm = float(np.hypot(*offset))
    axis, sign = _DIRECTION[relation]
    return float(sign * shrunk[axis] / norm) if norm > 0 else 0.0


def _objects(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(shape, colour name) of every object to draw, in clause order."""
    palette = list(COLORS)
    return [
        (o.shape, o.color or palette[int(rng.integers(len(palette)))]) for o in scene.objects for _ in range(o.count)
    ]


def _place(scene: Scene, n: int, rng: np.random.Generator, size: int) -> list[tuple[float, float, float]]:
    """Rejection sampling of (cx, cy, r) for ``n`` objects anywhere on the canvas, apart by
    ``MIN_GAP``; restarts on a dead end. Position scenes also need the relation (module doc)."""
    scale = size / RESOLUTION
    for _ in range(500):
        objs: list[tuple[float, float, float]] = []
        for _ in range(n):
            for _ in range(200):
                r = rng.uniform(*OBJECT_RADIUS) * scale
                lo, hi = r + 1.0, size - 1.0 - r
                cand = (rng.uniform(lo, hi), rng.uniform(lo, hi), r)
                if all(
                    np.hypot(cand[0] - o[0], cand[1] - o[1]) >= (cand[2] + o[2]) * 1.2 + MIN_GAP * scale for o in objs
                ):
                    objs.append(cand)
                    break
            else:
                break
        if len(objs) == n and (scene.relation is None or _relation_holds(scene, objs, size)):
            return objs
    raise RuntimeError(f"could not place {scene.prompt!r} at size {size}")


def _relation_holds(scene: Scene, objs, size: int) -> bool:
    (sa, *_), (sb, *_) = [(o.shape,) for o in scene.objects]
    box_a = mask_box(shape_mask(sa, *objs[0], size))
    box_b = mask_box(shape_mask(sb, *objs[1], size))
    return relation_strength(box_a, box_b, scene.relation) >= RELATION_MARGIN


def render(scene: Scene, rng: np.random.Generator, size: int = RESOLUTION) -> np.ndarray:
    """Render ``scene`` on a black canvas: uint8 [size,size,3]."""
    img = np.zeros((size, size, 3), dtype=np.uint8)
    objects = _objects(scene, rng)
    for (shape, color), (cx, cy, r) in zip(objects, _place(scene, len(objects), rng, size)):
        jitter = rng.integers(-15, 16, size=3)
        img[shape_mask(shape, cx, cy, r, size)] = np.clip(np.array(COLORS[color]) + jitter, 0, 255)
    return img


def render_batch(scenes: list[Scene], seed: int, size: int = RESOLUTION) -> torch.Tensor:
    """Render a list of scenes deterministically from ``seed``: float [B,3,H,W] in [0,1]."""
    rng = np.random.default_rng(seed)
    arr = np.stack([render(s, rng, size) for s in scenes])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)

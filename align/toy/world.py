"""The embedded toy text-to-image world: vocabulary and scene grammar.

A scene is ``count`` copies of one ``color`` ``shape`` placed in one region of the canvas,
described by a prompt such as "two red circles on the left". This module holds the grammar
(the single source of the vocabulary used by the toy tokenizer), the procedural renderer and
prompt sampling. The checker that scores an image against its prompt lives in ``checker.py``.
"""
from __future__ import annotations

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 240),
    "yellow": (240, 220, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
FILLER_WORDS: tuple[str, ...] = ("a", "an", "on", "the", "in", "of", "photo", "image", "shape", "shapes")
RESOLUTION: int = 32


def vocabulary() -> list[str]:
    """Every word a toy prompt can contain (singular and plural shapes included), sorted."""
    words = set(COLORS) | set(SHAPES) | {s + "s" for s in SHAPES} | set(COUNT_WORDS.values())
    words |= set(POSITIONS) | set(FILLER_WORDS)
    return sorted(words)


import dataclasses
import re

import numpy as np
import torch

_WORD_TO_COUNT = {w: n for n, w in COUNT_WORDS.items()}
#: Objects' bounding-box half-size range at RESOLUTION (scaled linearly with the image size).
OBJECT_RADIUS = (3.2, 3.8)
#: Minimum distance of an object's centre from the midline that splits its region (at 32 px).
MIDLINE_MARGIN = 3.0
#: Minimum gap in pixels between two objects, so connected components separate them.
MIN_GAP = 2.0


@dataclasses.dataclass(frozen=True)
class Scene:
    """``count`` copies of one ``color`` ``shape`` in the ``position`` half of the canvas."""
    color: str
    shape: str
    count: int
    position: str

    def __post_init__(self) -> None:
        _check_word("color", self.color, tuple(COLORS))
        _check_word("shape", self.shape, SHAPES)
        _check_word("count", self.count, tuple(COUNT_WORDS))
        _check_word("position", self.position, POSITIONS)

    @property
    def prompt(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        return f"{COUNT_WORDS[self.count]} {self.color} {noun} on the {self.position}"


def _check_word(attribute: str, value: object, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"toy prompt: {value!r} is not a valid {attribute}; "
                         f"choose one of: {', '.join(map(str, valid))}")


_PROMPT_RE = re.compile(r"^(\w+) (\w+) (\w+) on the (\w+)$")


def parse_prompt(prompt: str) -> Scene:
    """Inverse of :attr:`Scene.prompt`; case- and whitespace-tolerant, one-line errors."""
    text = " ".join(prompt.lower().split())
    match = _PROMPT_RE.match(text)
    if match is None:
        raise ValueError(f"toy prompt {prompt!r} does not read '<count> <color> <shape(s)> on the <position>'")
    count_word, color, noun, position = match.groups()
    if count_word not in _WORD_TO_COUNT:
        _check_word("count", count_word, tuple(COUNT_WORDS.values()))
    count = _WORD_TO_COUNT[count_word]
    plural = noun.endswith("s") and noun[:-1] in SHAPES
    shape = noun[:-1] if plural else noun
    _check_word("shape", shape, SHAPES)
    if plural != (count > 1):
        raise ValueError(f"toy prompt {prompt!r}: '{noun}' does not agree with count {count_word!r}")
    return Scene(color=color, shape=shape, count=count, position=position)


def all_scenes() -> list[Scene]:
    """Every scene of the grammar (4 colours × 3 shapes × 3 counts × 4 positions = 144)."""
    return [Scene(c, s, n, p) for c in COLORS for s in SHAPES for n in COUNT_WORDS for p in POSITIONS]


def sample_scenes(n: int, generator: np.random.Generator) -> list[Scene]:
    """``n`` scenes drawn uniformly from :func:`all_scenes`."""
    scenes = all_scenes()
    return [scenes[i] for i in generator.integers(0, len(scenes), size=n)]


def region_bounds(position: str, size: int, radius: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """(x range, y range) of allowed object centres: the whole object inside the canvas, and the
    centre in the named half at least ``MIDLINE_MARGIN`` (scaled) away from the midline."""
    lo, hi = radius + 1.0, size - 1.0 - radius
    mid, margin = size / 2.0, MIDLINE_MARGIN * size / RESOLUTION
    first, second, full = (lo, mid - margin), (mid + margin, hi), (lo, hi)
    return {"left": (first, full), "right": (second, full),
            "top": (full, first), "bottom": (full, second)}[position]


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


def _place(scene: Scene, rng: np.random.Generator, size: int) -> list[tuple[float, float, float]]:
    """Sequential rejection sampling of (cx, cy, r) for each object, restarting on a dead end."""
    scale = size / RESOLUTION
    for _ in range(200):
        objs: list[tuple[float, float, float]] = []
        for _ in range(scene.count):
            for _ in range(200):
                r = rng.uniform(*OBJECT_RADIUS) * scale
                (x0, x1), (y0, y1) = region_bounds(scene.position, size, r)
                cand = (rng.uniform(x0, x1), rng.uniform(y0, y1), r)
                if all(np.hypot(cand[0] - o[0], cand[1] - o[1]) >= (cand[2] + o[2]) * 1.2 + MIN_GAP * scale
                       for o in objs):
                    objs.append(cand)
                    break
            else:
                break
        if len(objs) == scene.count:
            return objs
    raise RuntimeError(f"could not place {scene.prompt!r} at size {size}")


def render(scene: Scene, rng: np.random.Generator, size: int = RESOLUTION) -> np.ndarray:
    """Render ``scene`` on a black canvas: uint8 [size,size,3]; colour jitter ±15 per channel."""
    img = np.zeros((size, size, 3), dtype=np.uint8)
    color = np.clip(np.array(COLORS[scene.color]) + rng.integers(-15, 16, size=3), 0, 255)
    for cx, cy, r in _place(scene, rng, size):
        img[shape_mask(scene.shape, cx, cy, r, size)] = color
    return img


def render_batch(scenes: list[Scene], seed: int, size: int = RESOLUTION) -> torch.Tensor:
    """Render a list of scenes deterministically from ``seed``: float [B,3,H,W] in [0,1]."""
    rng = np.random.default_rng(seed)
    arr = np.stack([render(s, rng, size) for s in scenes])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)

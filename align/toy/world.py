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

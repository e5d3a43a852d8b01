"""The embedded toy text-to-image world (v2): GenEval's task structure on coloured shapes.

Prompts follow GenEval's six tags, with the toy shapes as classes and the toy palette as colours:

=============  ==================================  ===========================================
tag            example prompt                      metadata ``include`` (+ ``exclude``)
=============  ==================================  ===========================================
single_object  "a circle"                          [{class circle, count 1}]
colors         "a red circle"                      [{class circle, count 1, color red}]
counting       "three triangles"                   [{triangle, 3}]  + exclude [{triangle, 4}]
two_object     "a circle and a square"             [{circle, 1}, {square, 1}]
position       "a circle left of a square"         [{square, 1}, {circle, 1, position [left of, 0]}]
color_attr     "a red circle and a blue square"    [{circle, 1, red}, {square, 1, blue}]
=============  ==================================  ===========================================

Metadata records are GenEval's own format (``evaluation_metadata.jsonl``; docs/geneval.md, "The metadata
record"), so the one rule engine (``rewards.geneval.rules``) scores toy images. :func:`parse_prompt` is the
inverse of :attr:`Scene.prompt` (it also reads colours in position prompts, "a red circle left of
a blue square"). Objects whose prompt names no colour get a palette colour drawn at render time.
This module holds the grammar (the single source of the toy tokenizer's vocabulary) and prompt
sampling; the renderer is :mod:`align.toy.render` (re-exported here).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 240),
    "yellow": (240, 220, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
#: Counts of the counting tag (GenEval's counting prompts ask for 2–4 objects).
COUNTING_COUNTS: tuple[int, ...] = (2, 3, 4)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
FILLER_WORDS: tuple[str, ...] = ("a", "an", "and", "of", "photo", "image", "the", "on", "in")
RESOLUTION: int = 32


def vocabulary() -> list[str]:
    """Every word a toy prompt can contain (singular and plural shapes included), sorted."""
    words = set(COLORS) | set(SHAPES) | {s + "s" for s in SHAPES} | set(COUNT_WORDS.values())
    words |= {w for r in RELATIONS for w in r.split()} | set(FILLER_WORDS)
    return sorted(words)


@dataclasses.dataclass(frozen=True)
class Obj:
    """``count`` copies of one ``shape``, of one named ``color`` or (None) any palette colour."""

    shape: str
    count: int = 1
    color: Optional[str] = None

    def __post_init__(self) -> None:
        _check_word("shape", self.shape, SHAPES)
        _check_word("count", self.count, tuple(COUNT_WORDS))
        if self.color is not None:
            _check_word("color", self.color, tuple(COLORS))

    @property
    def phrase(self) -> str:
        """ "a red circle", "three triangles"."""
        words = ["a" if self.count == 1 else COUNT_WORDS[self.count]]
        words += [self.color] if self.color else []
        return " ".join(words + [self.shape + ("s" if self.count > 1 else "")])

    def clause(self) -> dict:
        """This object's GenEval include clause (without position)."""
        out: dict = {"class": self.shape, "count": self.count}
        if self.color:
            out["color"] = self.color
        return out


@dataclasses.dataclass(frozen=True)
class Scene:
    """A toy prompt's structure: its ``tag``, its objects in prompt order and, for ``position``,
    the ``relation`` of ``objects[0]`` (the subject) to ``objects[1]`` (the reference)."""

    tag: str
    objects: tuple[Obj, ...]
    relation: Optional[str] = None

    def __post_init__(self) -> None:
        _check_word("tag", self.tag, TAGS)
        if (self.relation is not None) != (self.tag == "position"):
            raise ValueError(
                f"toy scene: tag {self.tag!r} {'needs' if self.tag == 'position' else 'takes no'} relation"
            )
        if self.relation is not None:
            _check_word("relation", self.relation, RELATIONS)
        if len(self.objects) != (1 if self.tag in ("single_object", "colors", "counting") else 2):
            raise ValueError(f"toy scene: tag {self.tag!r} cannot hold {len(self.objects)} object phrase(s)")

    @property
    def prompt(self) -> str:
        if self.relation is not None:
            return f"{self.objects[0].phrase} {self.relation} {self.objects[1].phrase}"
        return " and ".join(o.phrase for o in self.objects)

    @property
    def metadata(self) -> dict:
        """GenEval's metadata record: ``tag``, ``prompt``, ``include`` and (counting) ``exclude``."""
        if self.tag == "position":
            subject, reference = self.objects
            include = [reference.clause(), {**subject.clause(), "position": [self.relation, 0]}]
        else:
            include = [o.clause() for o in self.objects]
        out = {"tag": self.tag, "prompt": self.prompt, "include": include}
        if self.tag == "counting":
            obj = self.objects[0]
            out["exclude"] = [{"class": obj.shape, "count": obj.count + 1}]
        return out


def _check_word(attribute: str, value: object, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(
            f"toy prompt: {value!r} is not a valid {attribute}; choose one of: {', '.join(map(str, valid))}"
        )


_COUNT_OF = {"a": 1, "an": 1, **{w: n for n, w in COUNT_WORDS.items()}}
_SPLIT_RE = re.compile(r" (and|left of|right of|above|below) ")
_PREFIX_RE = re.compile(r"^(a photo of|an image of) ")


def _parse_phrase(prompt: str, phrase: str) -> Obj:
    """ "<a|an|one..four> [color] <shape or shapes>" -> Obj."""
    words = phrase.split()
    if len(words) not in (2, 3) or words[0] not in _COUNT_OF:
        raise ValueError(f"toy prompt {prompt!r}: {phrase!r} does not read '<a|count> [color] <shape(s)>'")
    count, noun = _COUNT_OF[words[0]], words[-1]
    color = words[1] if len(words) == 3 else None
    if color is not None:
        _check_word("color", color, tuple(COLORS))
    plural = noun.endswith("s") and noun[:-1] in SHAPES
    _check_word("shape", noun[:-1] if plural else noun, SHAPES)
    if plural != (count > 1):
        raise ValueError(f"toy prompt {prompt!r}: {noun!r} does not agree with {words[0]!r}")
    return Obj(noun[:-1] if plural else noun, count, color)


def parse_scene(prompt: str) -> Scene:
    """Inverse of :attr:`Scene.prompt`; case- and whitespace-tolerant, one-line errors.

    One phrase: ``counting`` if its count is above one, else ``colors`` if it names a colour, else
    ``single_object``. Two phrases joined by "and": ``color_attr`` if either names a colour, else
    ``two_object``. Joined by a relation: ``position``. An optional "a photo of" prefix is dropped.
    """
    text = _PREFIX_RE.sub("", " ".join(prompt.lower().split()))
    parts = _SPLIT_RE.split(text)
    if len(parts) not in (1, 3):
        raise ValueError(
            f"toy prompt {prompt!r} has {len(parts) // 2} joining words; a toy prompt names one or two object phrases"
        )
    objects = tuple(_parse_phrase(prompt, p) for p in parts[::2])
    if len(objects) == 1:
        obj = objects[0]
        tag = "counting" if obj.count > 1 else "colors" if obj.color else "single_object"
        return Scene(tag, objects)
    if parts[1] != "and":
        return Scene("position", objects, parts[1])
    return Scene("color_attr" if any(o.color for o in objects) else "two_object", objects)


def parse_prompt(prompt: str) -> dict:
    """The GenEval metadata record of a toy prompt (:attr:`Scene.metadata` of :func:`parse_scene`)."""
    return parse_scene(prompt).metadata


def tag_scenes(tag: str) -> list[Scene]:
    """Every scene the sampler draws for ``tag`` (two-object tags use two different shapes; colour
    pairs are two different colours)."""
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    colour_pairs = [(a, b) for a in COLORS for b in COLORS if a != b]
    if tag == "single_object":
        return [Scene(tag, (Obj(s),)) for s in SHAPES]
    if tag == "colors":
        return [Scene(tag, (Obj(s, 1, c),)) for s in SHAPES for c in COLORS]
    if tag == "counting":
        return [Scene(tag, (Obj(s, n),)) for s in SHAPES for n in COUNTING_COUNTS]
    if tag == "two_object":
        return [Scene(tag, (Obj(a), Obj(b))) for a, b in pairs]
    if tag == "position":
        return [Scene(tag, (Obj(a), Obj(b)), r) for a, b in pairs for r in RELATIONS]
    if tag == "color_attr":
        return [Scene(tag, (Obj(a, 1, ca), Obj(b, 1, cb))) for a, b in pairs for ca, cb in colour_pairs]
    _check_word("tag", tag, TAGS)
    raise AssertionError  # unreachable


def all_scenes() -> list[Scene]:
    """Every scene of every tag (3 + 6 + 9 + 12 + 24 + 72 = 126)."""
    return [s for tag in TAGS for s in tag_scenes(tag)]


def tag_probabilities(weights: Optional[dict[str, float]] = None) -> np.ndarray:
    """Normalised tag probabilities in :data:`TAGS` order; None: uniform (GenEval weighs tags equally)."""
    if weights is None:
        return np.full(len(TAGS), 1.0 / len(TAGS))
    for tag in weights:
        _check_word("tag", tag, TAGS)
    p = np.array([float(weights.get(t, 0.0)) for t in TAGS])
    if (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"toy tag weights must be >= 0 with a positive sum, got {dict(weights)}")
    return p / p.sum()


def sample_scenes(
    n: int, generator: np.random.Generator, tag_weights: Optional[dict[str, float]] = None
) -> list[Scene]:
    """``n`` scenes: a tag drawn by ``tag_weights`` (default: uniform), then a scene of that tag
    uniformly. Deterministic in ``generator``'s state."""
    p = tag_probabilities(tag_weights)
    pools = {t: tag_scenes(t) for t in TAGS}
    tags = generator.choice(len(TAGS), size=n, p=p)
    picks = generator.random(n)
    return [pools[TAGS[t]][int(u * len(pools[TAGS[t]]))] for t, u in zip(tags, picks)]


def sample_prompts(n: int, generator: np.random.Generator, tag_weights: Optional[dict[str, float]] = None) -> list[str]:
    """The prompts of :func:`sample_scenes`."""
    return [s.prompt for s in sample_scenes(n, generator, tag_weights)]


def scenes_by_tag(scenes: Sequence[Scene]) -> dict[str, list[int]]:
    """Indices of ``scenes`` per tag (tags in :data:`TAGS` order; absent tags omitted)."""
    out: dict[str, list[int]] = {}
    for tag in TAGS:
        idx = [i for i, s in enumerate(scenes) if s.tag == tag]
        if idx:
            out[tag] = idx
    return out


from align.toy.render import render, render_batch, shape_mask  # noqa: E402,F401  (re-exported)

"""The one GenEval rule engine: detections + a metadata record -> strict verdict, partial credit, reason.

Both the toy reward (``toy_geneval``, the toy world's detector) and the real ``geneval`` reward (a
transformers detector + CLIP colours) call :func:`evaluate`. The rules are GenEval's (Ghosh et al., 2023; the
authors' code djghosh13/geneval), as in docs/geneval.md, "The rules":

1. per class keep detections with confidence > 0.3 (> 0.9 for the ``counting`` tag), at most 16,
   most confident first (optional IoU overlap filter, off at ``max_overlap=1``);
2. include clauses are ANDed; a clause needs ``count`` detections of its class and only the ``count``
   most confident are used for its further checks;
3. colour: at least ``count`` of those get the asked colour (from the detector's own reading, or from a
   :class:`ColorClassifier`: CLIP on masked crops against grey #999, three templates);
4. position (only when the clause's count and colour hold and its target clause matched): every
   (object, target) pair must show the relation of :func:`relative_position`;
5. exclude clauses are ORed: any excluded class with ``>= count`` kept detections fails the image;
6. correct = every clause holds.

Partial credit (``Verdict.score``, Flow-GRPO's dense reward): each include clause contributes a count
check, a colour check when it has ``color`` and a position check when it has ``position``; each exclude
clause contributes one check; score = satisfied / total. A check that is not reached (colour after a
failed count, position after a failed count/colour or an unmatched target) counts as failed.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Protocol, Sequence

import numpy as np

GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
_CLAUSE_KEYS = {"include": {"class", "count", "color", "position"}, "exclude": {"class", "count"}}


@dataclasses.dataclass(frozen=True)
class Detection:
    label: str  # class name ("circle", or a COCO name "dog")
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels (x right, y down)
    score: float  # detector confidence in [0, 1]
    mask: Optional[np.ndarray] = None  # bool [H, W] instance mask, if the detector has one
    color: Optional[str] = None  # colour already read by the detector; None: ask the classifier


class ColorClassifier(Protocol):
    """Colour of each detection (all of one class) among ``colors``; image: float [H, W, 3] in [0, 1]."""

    def __call__(self, image: np.ndarray, detections: Sequence[Detection], colors: Sequence[str]) -> list[str]: ...


@dataclasses.dataclass(frozen=True)
class RuleConfig:
    """GenEval's numbers (the defaults of its ``--options``; docs/geneval.md, "The rules")."""

    threshold: float = 0.3  # confidence a detection must exceed
    counting_threshold: float = 0.9  # ... when the prompt's tag is "counting"
    max_objects: int = 16  # per class, most confident first
    position_threshold: float = 0.1  # offset shrink, × (dim_a + dim_b) per axis
    direction_threshold: float = 0.5  # |normalised shrunk offset| an axis must exceed
    max_overlap: float = 1.0  # IoU overlap filter per class; 1.0: off


@dataclasses.dataclass
class Verdict:
    strict: float  # 1.0 if every clause holds, else 0.0 (GenEval's `correct`)
    score: float  # partial credit: satisfied checks / all checks, in [0, 1]
    reason: str  # GenEval-style reason text ("" when correct)
    details: dict  # {"detected": {class: [[x0, y0, x1, y1, score], ...]}, "checks": [...]}, JSON-serialisable


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with GenEval's inclusive pixel areas, (x1 - x0 + 1)(y1 - y0 + 1)."""

    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def keep_detections(
    detections: Sequence[Detection], tag: str, config: RuleConfig = RuleConfig()
) -> dict[str, list[Detection]]:
    """Rule 1: per class, confidence > threshold (counting tag: > counting_threshold), most confident
    first, at most ``max_objects``, then the greedy overlap filter when ``max_overlap < 1``."""
    threshold = config.counting_threshold if tag == "counting" else config.threshold
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        by_class.setdefault(det.label, []).append(det)
    kept = {}
    for label, dets in by_class.items():
        ordered = sorted((d for d in dets if d.score > threshold), key=lambda d: -d.score)[: config.max_objects]
        out: list[Detection] = []
        while ordered:
            best = ordered.pop(0)
            out.append(best)
            if config.max_overlap < 1:
                ordered = [d for d in ordered if box_iou(best.box, d.box) < config.max_overlap]
        if out:
            kept[label] = out
    return kept


def relative_position(box_a: Sequence[float], box_b: Sequence[float], config: RuleConfig = RuleConfig()) -> set[str]:
    """Relations of A to B (rule 4). offset = c_a − c_b; shrunk_i = sign(offset_i) · max(|offset_i| −
    p · (dim_a,i + dim_b,i), 0) with p = 0.1; none if every |shrunk_i| < 1e-3; else d = shrunk / ‖offset‖
    and ``left of``: d_x < −0.5, ``right of``: d_x > 0.5, ``above``: d_y < −0.5, ``below``: d_y > 0.5."""
    boxes = np.asarray([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)  # (object, corner, xy)
    center_a, center_b = boxes.mean(axis=1)
    dim_a, dim_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = center_a - center_b
    shrunk = np.maximum(np.abs(offset) - config.position_threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    t = config.direction_threshold
    return {rel for rel, holds in zip(RELATIONS, (dx < -t, dx > t, dy < -t, dy > t)) if holds}


def _colors_of(
    found: list[Detection],
    image: Optional[np.ndarray],
    classify: Optional[ColorClassifier],
    colors: Sequence[str],
    prompt: str,
) -> list[str]:
    """The detector's own colour reads, or the classifier's on the image."""
    if all(d.color is not None for d in found):
        return [d.color for d in found]
    if classify is None or image is None:
        raise ValueError(
            f"prompt {prompt!r}: a colour clause needs the image and a colour classifier "
            "(the detections carry no colour)"
        )
    return list(classify(image, found, colors))


def _include_clause(
    req: dict,
    kept: dict,
    matched: list,
    checks: list,
    reason: list,
    image,
    classify,
    colors: Sequence[str],
    config: RuleConfig,
    prompt: str,
) -> bool:
    """Rules 2-4 for one include clause; appends its checks and reasons; True when it matched."""
    name, count = req["class"], req["count"]
    found = kept.get(name, [])[:count]
    ok = len(found) >= count
    checks.append({"clause": "include", "class": name, "check": "count", "ok": ok})
    if not ok:
        reason.append(f"expected {name}>={count}, found {len(found)}")
    if "color" in req:
        got = _colors_of(found, image, classify, colors, prompt) if ok else []
        color_ok = ok and got.count(req["color"]) >= count
        checks.append({"clause": "include", "class": name, "check": "color", "ok": color_ok})
        if ok and not color_ok:
            reason.append(
                f"expected {req['color']} {name}>={count}, found {got.count(req['color'])} {req['color']}; "
                "and " + ", ".join(f"{got.count(c)} {c}" for c in colors if c in got)
            )
        ok = color_ok
    if "position" in req:
        relation, target = req["position"]
        pos_ok = False
        if ok and matched[target] is None:
            reason.append(f"no target for {name} to be {relation}")
        elif ok:
            pos_ok = True
            for obj in found:
                bad = next(
                    (t for t in matched[target] if relation not in relative_position(obj.box, t.box, config)), None
                )
                if bad is not None:
                    found_rels = relative_position(obj.box, bad.box, config)
                    reason.append(
                        f"expected {name} {relation} target, found "
                        f"{' and '.join(r for r in RELATIONS if r in found_rels)} target"
                    )
                    pos_ok = False
                    break
        checks.append({"clause": "include", "class": name, "check": "position", "ok": pos_ok})
        ok = pos_ok
    matched.append(found if ok else None)
    return ok


def evaluate(
    metadata: dict,
    detections: Sequence[Detection],
    *,
    image: Optional[np.ndarray] = None,
    classify_colors: Optional[ColorClassifier] = None,
    colors: Sequence[str] = GENEVAL_COLORS,
    config: RuleConfig = RuleConfig(),
) -> Verdict:
    """GenEval's verdict on one image (module docstring: rules 1-6 and the partial-credit rule)."""
    prompt = metadata.get("prompt", "?")
    kept = keep_detections(detections, metadata.get("tag", ""), config)
    checks: list[dict] = []
    reason: list[str] = []
    matched: list = []
    correct = True
    for req in metadata.get("include", []):
        correct &= _include_clause(req, kept, matched, checks, reason, image, classify_colors, colors, config, prompt)
    for req in metadata.get("exclude", []):
        n = len(kept.get(req["class"], []))
        ok = n < req["count"]
        checks.append({"clause": "exclude", "class": req["class"], "check": "count", "ok": ok})
        if not ok:
            correct = False
            reason.append(f"expected {req['class']}<{req['count']}, found {n}")
    satisfied = sum(c["ok"] for c in checks)
    detected = {name: [[float(v) for v in d.box] + [float(d.score)] for d in dets] for name, dets in kept.items()}
    return Verdict(
        strict=float(correct),
        score=satisfied / len(checks) if checks else float(correct),
        reason="\n".join(reason),
        details={"detected": detected, "checks": checks},
    )


def validate_metadata(metadata: dict, classes: Sequence[str], colors: Sequence[str] = GENEVAL_COLORS) -> None:
    """A one-line ``ValueError`` naming the prompt for a record the engine cannot score: no prompt/tag/
    include list, an unknown class, colour, relation or clause key, a count that is not an int >= 1, or a
    position index that does not point at an *earlier* include clause."""
    if not isinstance(metadata, dict):
        raise ValueError(f"GenEval metadata must be a dict, got {type(metadata).__name__}")
    prompt = metadata.get("prompt")
    where = f"GenEval metadata of prompt {prompt!r}"
    if not isinstance(prompt, str) or not isinstance(metadata.get("tag"), str):
        raise ValueError(f"{where}: needs a string 'prompt' and 'tag'")
    include = metadata.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError(f"{where}: 'include' must be a non-empty list of clauses")
    if not isinstance(metadata.get("exclude", []), list):
        raise ValueError(f"{where}: 'exclude' must be a list of clauses")
    known = set(classes)
    for kind in ("include", "exclude"):
        for i, req in enumerate(metadata.get(kind, [])):
            at = f"{where}: {kind}[{i}]"
            if not isinstance(req, dict):
                raise ValueError(f"{at} must be a dict, got {req!r}")
            extra = sorted(set(req) - _CLAUSE_KEYS[kind])
            if extra:
                raise ValueError(f"{at}: unknown key {extra[0]!r}; allowed: {', '.join(sorted(_CLAUSE_KEYS[kind]))}")
            if req.get("class") not in known:
                raise ValueError(f"{at}: unknown class {req.get('class')!r}")
            count = req.get("count")
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{at}: 'count' must be an int >= 1, got {count!r}")
            if "color" in req and req["color"] not in colors:
                raise ValueError(f"{at}: unknown colour {req['color']!r}; known: {', '.join(colors)}")
            if "position" in req:
                pos = req["position"]
                if not (isinstance(pos, (list, tuple)) and len(pos) == 2):
                    raise ValueError(f"{at}: 'position' must be [RELATION, INDEX], got {pos!r}")
                if pos[0] not in RELATIONS:
                    raise ValueError(f"{at}: unknown relation {pos[0]!r}; known: {', '.join(RELATIONS)}")
                if isinstance(pos[1], bool) or not isinstance(pos[1], int) or not 0 <= pos[1] < i:
                    raise ValueError(
                        f"{at}: position index {pos[1]!r} must point at an earlier include clause (0..{i - 1})"
                    )

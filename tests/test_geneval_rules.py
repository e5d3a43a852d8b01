"""Known answers of the GenEval rule engine (rewards/geneval/rules.py) on synthetic detections."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rewards.geneval.rules import (
    GENEVAL_COLORS,
    Detection,
    RuleConfig,
    evaluate,
    keep_detections,
    relative_position,
    validate_metadata,
)

CLASSES = ("dog", "cat", "clock", "kite", "teddy bear")


def det(label: str, x0: float, y0: float, x1: float, y1: float, score: float = 0.95, color=None) -> Detection:
    return Detection(label, (x0, y0, x1, y1), score, color=color)


def meta(tag: str, include: list, exclude: list | None = None, prompt: str = "p") -> dict:
    record = {"tag": tag, "prompt": prompt, "include": include}
    if exclude is not None:
        record["exclude"] = exclude
    return record


class StubColors:
    """Our ColorClassifier protocol with known answers: the colour each box was given, by box."""

    def __init__(self, by_box: dict) -> None:
        self.by_box, self.calls = by_box, []

    def __call__(self, image, detections, colors):
        self.calls.append((image.shape, [d.label for d in detections], tuple(colors)))
        return [self.by_box[d.box] for d in detections]


# --- rule 1: thresholds and the per-class cap ---------------------------------------------------------
def test_confidence_must_exceed_0_3_and_0_9_for_counting() -> None:
    dets = [det("dog", 0, 0, 9, 9, s) for s in (0.29, 0.3, 0.31, 0.9, 0.91)]
    assert [d.score for d in keep_detections(dets, "single_object")["dog"]] == [0.91, 0.9, 0.31]
    assert [d.score for d in keep_detections(dets, "counting")["dog"]] == [0.91]
    one = meta("single_object", [{"class": "dog", "count": 1}])
    assert evaluate(one, [det("dog", 0, 0, 9, 9, 0.3)]).strict == 0.0
    assert evaluate(one, [det("dog", 0, 0, 9, 9, 0.31)]).strict == 1.0
    two = meta("counting", [{"class": "dog", "count": 2}], [{"class": "dog", "count": 3}])
    assert evaluate(two, [det("dog", 0, 0, 9, 9, 0.9), det("dog", 20, 0, 29, 9, 0.95)]).strict == 0.0
    assert evaluate(two, [det("dog", 0, 0, 9, 9, 0.91), det("dog", 20, 0, 29, 9, 0.95)]).strict == 1.0


def test_at_most_16_objects_per_class_most_confident_first() -> None:
    dets = [det("clock", i, 0, i + 1, 1, 0.4 + 0.01 * i) for i in range(20)]
    kept = keep_detections(dets, "two_object")["clock"]
    assert len(kept) == 16 and [d.score for d in kept] == sorted((d.score for d in dets), reverse=True)[:16]
    excl = meta("counting", [{"class": "cat", "count": 1}], [{"class": "clock", "count": 17}])
    cats = [det("cat", 0, 0, 5, 5, 0.95)]
    assert evaluate(excl, cats + [det("clock", i, 0, i + 1, 1, 0.95) for i in range(20)]).strict == 1.0


def test_overlap_filter_is_off_by_default_and_drops_overlapping_boxes_when_on() -> None:
    dets = [det("dog", 0, 0, 9, 9, 0.9), det("dog", 0, 0, 9, 9, 0.8), det("dog", 50, 50, 59, 59, 0.7)]
    assert len(keep_detections(dets, "two_object")["dog"]) == 3
    assert [d.score for d in keep_detections(dets, "two_object", RuleConfig(max_overlap=0.5))["dog"]] == [0.9, 0.7]


# --- rules 2 and 5: include ANDed, exclude ORed -------------------------------------------------------
def test_include_clauses_are_anded_with_geneval_reasons() -> None:
    m = meta("two_object", [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}])
    both = evaluate(m, [det("dog", 0, 0, 9, 9), det("cat", 20, 0, 29, 9)])
    assert (both.strict, both.score, both.reason) == (1.0, 1.0, "")
    only_dog = evaluate(m, [det("dog", 0, 0, 9, 9)])
    assert (only_dog.strict, only_dog.score, only_dog.reason) == (0.0, 0.5, "expected cat>=1, found 0")
    none = evaluate(m, [])
    assert (none.strict, none.score) == (0.0, 0.0)
    assert none.reason == "expected dog>=1, found 0\nexpected cat>=1, found 0"


def test_two_clocks_fail_on_three_and_pass_on_two() -> None:
    m = meta("counting", [{"class": "clock", "count": 2}], [{"class": "clock", "count": 3}])
    clocks = [det("clock", 20 * i, 0, 20 * i + 9, 9) for i in range(3)]
    two = evaluate(m, clocks[:2])
    assert (two.strict, two.score) == (1.0, 1.0)
    three = evaluate(m, clocks)
    assert (three.strict, three.score, three.reason) == (0.0, 0.5, "expected clock<3, found 3")
    one = evaluate(m, clocks[:1])
    assert (one.strict, one.score, one.reason) == (0.0, 0.5, "expected clock>=2, found 1")


def test_exclude_clauses_are_ored() -> None:
    m = meta("counting", [{"class": "dog", "count": 1}], [{"class": "cat", "count": 1}, {"class": "kite", "count": 2}])
    dog = det("dog", 0, 0, 9, 9)
    assert evaluate(m, [dog, det("kite", 30, 0, 39, 9)]).strict == 1.0  # one kite is allowed
    v = evaluate(m, [dog, det("cat", 30, 0, 39, 9)])
    assert (v.strict, v.score, v.reason) == (0.0, 2 / 3, "expected cat<1, found 1")


# --- rule 3: colour ------------------------------------------------------------------------------------
def test_colour_by_our_classifier_on_the_count_most_confident_objects() -> None:
    image = np.zeros((64, 64, 3), dtype=np.float32)
    m = meta("colors", [{"class": "dog", "count": 1, "color": "red"}])
    best, worse = det("dog", 0, 0, 9, 9, 0.99), det("dog", 30, 0, 39, 9, 0.5)
    stub = StubColors({best.box: "red", worse.box: "blue"})
    v = evaluate(m, [worse, best], image=image, classify_colors=stub)
    assert (v.strict, v.score) == (1.0, 1.0)
    assert stub.calls == [((64, 64, 3), ["dog"], GENEVAL_COLORS)]  # only the one most confident dog
    stub = StubColors({best.box: "blue", worse.box: "red"})
    v = evaluate(m, [worse, best], image=image, classify_colors=stub)
    assert (v.strict, v.score, v.reason) == (0.0, 0.5, "expected red dog>=1, found 0 red; and 1 blue")


def test_colour_needs_count_objects_of_the_colour_and_reports_the_colour_tally() -> None:
    m = meta("color_attr", [{"class": "cat", "count": 2, "color": "white"}])
    cats = [det("cat", 0, 0, 9, 9, color="white"), det("cat", 20, 0, 29, 9, color="black")]
    v = evaluate(m, cats)
    assert v.strict == 0.0 and v.reason == "expected white cat>=2, found 1 white; and 1 black, 1 white"
    cats[1] = det("cat", 20, 0, 29, 9, color="white")
    assert evaluate(m, cats).strict == 1.0


def test_colour_check_after_a_failed_count_counts_as_failed_and_is_not_classified() -> None:
    m = meta("color_attr", [{"class": "cat", "count": 1, "color": "red"}, {"class": "dog", "count": 1}])
    stub = StubColors({})
    v = evaluate(m, [det("dog", 0, 0, 9, 9)], image=np.zeros((8, 8, 3)), classify_colors=stub)
    assert (v.strict, v.score, v.reason) == (0.0, 1 / 3, "expected cat>=1, found 0")
    assert stub.calls == []


def test_colour_without_a_colour_reading_or_classifier_is_an_error_naming_the_prompt() -> None:
    m = meta("colors", [{"class": "dog", "count": 1, "color": "red"}], prompt="a photo of a red dog")
    with pytest.raises(ValueError, match="a photo of a red dog"):
        evaluate(m, [det("dog", 0, 0, 9, 9)])


# --- rule 4: position ----------------------------------------------------------------------------------
def box_at(cx: float, cy: float, w: float, h: float) -> tuple[float, float, float, float]:
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


@pytest.mark.parametrize(
    "relation, sign, axis", [("right of", 1, 0), ("left of", -1, 0), ("below", 1, 1), ("above", -1, 1)]
)
def test_direction_test_just_around_its_threshold_with_the_0_1_shrink(relation, sign, axis) -> None:
    """Boxes 10×10 shrink the offset by 0.1·(10+10) = 2 per axis. Along one axis d = (|o| − 2)/|o|,
    which exceeds 0.5 iff |o| > 4: |o| = 3.99 gives no relation, 4.01 gives exactly ``relation``."""

    def rel(d: float) -> set:
        center = [50.0, 50.0]
        center[axis] += sign * d
        return relative_position(box_at(*center, 10, 10), box_at(50, 50, 10, 10))

    assert rel(1.0) == set() and rel(3.99) == set()
    assert rel(4.01) == {relation} and rel(30.0) == {relation}


@pytest.mark.parametrize(
    "relation, sign, axis", [("right of", 1, 0), ("left of", -1, 0), ("below", 1, 1), ("above", -1, 1)]
)
def test_direction_test_at_its_threshold_is_strict(relation, sign, axis) -> None:
    """Exact arithmetic (dyadic numbers, shrink factor 0.25): boxes 8×8 shrink by 0.25·16 = 4, so at
    |o| = 8 the normalised offset is exactly 0.5 (no relation) and at 8.5 it is 0.529... (relation)."""
    config = RuleConfig(position_threshold=0.25)

    def rel(d: float) -> set:
        center = [64.0, 64.0]
        center[axis] += sign * d
        return relative_position(box_at(*center, 8, 8), box_at(64, 64, 8, 8), config)

    assert rel(8.0) == set()
    assert rel(8.5) == {relation}


def test_shrink_to_zero_and_overlapping_boxes_give_no_relation() -> None:
    big, small = (0.0, 0.0, 100.0, 100.0), (40.0, 40.0, 60.0, 60.0)
    assert relative_position(small, big) == set() and relative_position(big, small) == set()  # same centre
    assert relative_position(box_at(55, 53, 40, 40), box_at(50, 50, 40, 40)) == set()  # shrink 8 > offset
    # an offset that survives the shrink by less than 1e-3 on both axes counts as none
    assert relative_position(box_at(52.0005, 50, 10, 10), box_at(50, 50, 10, 10)) == set()


def test_diagonal_offsets_give_both_relations_or_one() -> None:
    point = lambda x, y: (x, y, x, y)  # zero-size boxes: no shrink, d = offset / |offset|
    assert relative_position(point(3, 4), point(0, 0)) == {"right of", "below"}  # d = (0.6, 0.8)
    assert relative_position(point(-4, -3), point(0, 0)) == {"left of", "above"}  # d = (-0.8, -0.6)
    assert relative_position(point(1, 3), point(0, 0)) == {"below"}  # d_x = 0.316


def test_position_clause_holds_only_for_every_object_target_pair() -> None:
    m = meta(
        "position",
        [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
        prompt="a photo of a dog right of a teddy bear",
    )
    bear = det("teddy bear", 0, 0, 10, 10)
    right = evaluate(m, [bear, det("dog", 40, 0, 50, 10)])
    assert (right.strict, right.score, right.reason) == (1.0, 1.0, "")
    left = evaluate(m, [det("teddy bear", 40, 0, 50, 10), det("dog", 0, 0, 10, 10)])
    assert (left.strict, left.score) == (0.0, 2 / 3)
    assert left.reason == "expected dog right of target, found left of target"
    overlap = evaluate(m, [bear, det("dog", 1, 1, 11, 11)])
    assert overlap.strict == 0.0 and overlap.reason == "expected dog right of target, found  target"
    two = meta("position", [{"class": "kite", "count": 2}, {"class": "dog", "count": 1, "position": ["above", 0]}])
    kites = [det("kite", 0, 50, 10, 60), det("kite", 50, 50, 60, 60)]
    assert evaluate(two, kites + [det("dog", 25, 35, 35, 45)]).strict == 0.0  # diagonal to both: not "above"
    assert evaluate(two, kites + [det("dog", 0, 0, 60, 10)]).strict == 1.0  # wide dog above both kites


def test_position_without_a_matched_target_fails_with_geneval_reason() -> None:
    m = meta("position", [{"class": "kite", "count": 1}, {"class": "dog", "count": 1, "position": ["below", 0]}])
    v = evaluate(m, [det("dog", 0, 40, 10, 50)])
    assert (v.strict, v.score) == (0.0, 1 / 3)
    assert v.reason == "expected kite>=1, found 0\nno target for dog to be below"
    no_dog = evaluate(m, [det("kite", 0, 0, 10, 10)])  # position not reached: counts as failed, no reason
    assert (no_dog.score, no_dog.reason) == (1 / 3, "expected dog>=1, found 0")


def test_details_are_json_with_the_kept_boxes_and_every_check() -> None:
    m = meta("color_attr", [{"class": "dog", "count": 1, "color": "red"}, {"class": "cat", "count": 1}])
    v = evaluate(m, [det("dog", 0, 0, 9, 9, 0.8, color="red"), det("cat", 20, 0, 29, 9, 0.1)])
    assert json.loads(json.dumps(v.details)) == v.details
    assert v.details["detected"] == {"dog": [[0.0, 0.0, 9.0, 9.0, 0.8]]}
    assert [(c["class"], c["check"], c["ok"]) for c in v.details["checks"]] == [
        ("dog", "count", True),
        ("dog", "color", True),
        ("cat", "count", False),
    ]


# --- every shipped record, and bad records ---------------------------------------------------------------
def test_every_shipped_record_validates_and_scores_correct_on_its_own_ideal_scene() -> None:
    """For each of the 553 prompts build the detections it asks for (coloured, placed per its relation)."""
    from rewards.geneval.data import load_metadata, object_names

    records = load_metadata()
    offsets = {"left of": (-60, 0), "right of": (60, 0), "above": (0, -60), "below": (0, 60)}
    for record in records:
        validate_metadata(record, object_names())
        dets, centres = [], []
        for req in record["include"]:
            cx, cy = (200.0, 200.0)
            if "position" in req:
                rel, target = req["position"]
                cx, cy = centres[target][0] + offsets[rel][0], centres[target][1] + offsets[rel][1]
            centres.append((cx, cy))
            dets += [
                Detection(req["class"], box_at(cx + 3 * k, cy, 10, 10), 0.95, color=req.get("color"))
                for k in range(req["count"])
            ]
        v = evaluate(record, dets)
        assert (v.strict, v.score) == (1.0, 1.0), (record["prompt"], v.reason)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["include"][0].update({"class": "unicorn"}), "unknown class 'unicorn'"),
        (lambda m: m["include"][0].update({"color": "teal"}), "unknown colour 'teal'"),
        (lambda m: m["include"][1].update({"position": ["behind", 0]}), "unknown relation 'behind'"),
        (lambda m: m["include"][1].update({"position": ["above", 1]}), "earlier include clause"),
        (lambda m: m["include"][0].update({"position": ["above", 0]}), "earlier include clause"),
        (lambda m: m["include"][0].update({"count": 0}), "'count' must be an int >= 1"),
        (lambda m: m["include"][0].update({"colour": "red"}), "unknown key 'colour'"),
        (lambda m: m.update({"exclude": [{"class": "cat", "count": 1, "color": "red"}]}), "unknown key 'color'"),
        (lambda m: m.update({"include": []}), "non-empty list"),
    ],
)
def test_bad_metadata_is_a_one_line_error_naming_the_prompt(change, message) -> None:
    m = meta(
        "position",
        [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}],
        prompt="a photo of a cat left of a dog",
    )
    validate_metadata(m, CLASSES)
    change(m)
    with pytest.raises(ValueError, match=message) as err:
        validate_metadata(m, CLASSES)
    assert "'a photo of a cat left of a dog'" in str(err.value) and "\n" not in str(err.value)

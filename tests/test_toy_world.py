"""Toy world v2: GenEval-shaped grammar and metadata, a deterministic renderer, and a toy detector that,
through the one GenEval rule engine, is exact on renders of every tag and flags each wrong attribute alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from align.toy.checker import MIN_AREA
from align.toy.detector import detect, per_tag, score_batch, score_image
from align.toy.render import RELATION_MARGIN, mask_box, relation_strength
from align.toy.world import (
    COLORS,
    SHAPES,
    TAGS,
    Obj,
    Scene,
    all_scenes,
    parse_prompt,
    parse_scene,
    render,
    render_batch,
    sample_prompts,
    sample_scenes,
    shape_mask,
    tag_scenes,
    vocabulary,
)
from rewards.geneval.rules import relative_position, validate_metadata


def test_every_scene_round_trips_through_its_prompt_and_metadata_is_valid() -> None:
    scenes = all_scenes()
    assert len(scenes) == len(set(scenes)) == 3 + 6 + 9 + 12 + 24 + 72
    assert {s.tag for s in scenes} == set(TAGS)
    for scene in scenes:
        assert parse_scene(scene.prompt) == scene
        assert set(scene.prompt.split()) <= set(vocabulary())
        validate_metadata(scene.metadata, SHAPES, tuple(COLORS))
    assert parse_scene("  A photo of TWO circles ") == Scene("counting", (Obj("circle", 2),))


def test_metadata_follows_genevals_format() -> None:
    assert parse_prompt("a red circle left of a blue square") == {
        "tag": "position",
        "prompt": "a red circle left of a blue square",
        "include": [
            {"class": "square", "count": 1, "color": "blue"},
            {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]},
        ],
    }
    assert parse_prompt("three triangles") == {
        "tag": "counting",
        "prompt": "three triangles",
        "include": [{"class": "triangle", "count": 3}],
        "exclude": [{"class": "triangle", "count": 4}],
    }
    assert parse_prompt("a green square and a yellow circle") == {
        "tag": "color_attr",
        "prompt": "a green square and a yellow circle",
        "include": [
            {"class": "square", "count": 1, "color": "green"},
            {"class": "circle", "count": 1, "color": "yellow"},
        ],
    }
    assert parse_prompt("a square and a circle")["tag"] == "two_object"
    assert parse_prompt("a triangle")["include"] == [{"class": "triangle", "count": 1}]
    assert parse_prompt("a blue triangle")["tag"] == "colors"


@pytest.mark.parametrize(
    "prompt, words",
    [
        ("a purple circle", ["purple", "choose one of"]),
        ("a hexagon", ["hexagon", "choose one of"]),
        ("seven circles", ["seven", "does not read"]),
        ("two circle", ["'circle' does not agree with 'two'"]),
        ("a circles", ["does not agree"]),
        ("a circle next to a square", ["next to"]),
        ("a circle and a square and a triangle", ["one or two object phrases"]),
        ("", ["does not read"]),
    ],
)
def test_bad_prompt_is_a_one_line_error_naming_the_problem(prompt: str, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        parse_prompt(prompt)
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words)


def test_sampling_is_seeded_uniform_over_tags_by_default_and_follows_tag_weights() -> None:
    a = sample_prompts(600, np.random.default_rng(0))
    assert a == sample_prompts(600, np.random.default_rng(0)) != sample_prompts(600, np.random.default_rng(1))
    tags = [parse_prompt(p)["tag"] for p in a]
    assert all(60 < tags.count(t) < 140 for t in TAGS)  # 100 expected each; ±4 standard deviations
    weighted = sample_scenes(400, np.random.default_rng(0), {"single_object": 1.0, "position": 3.0})
    assert {s.tag for s in weighted} == {"single_object", "position"}
    with pytest.raises(ValueError, match="'shapes' is not a valid tag"):
        sample_scenes(4, np.random.default_rng(0), {"shapes": 1.0})
    with pytest.raises(ValueError, match="positive sum"):
        sample_scenes(4, np.random.default_rng(0), {"colors": 0.0})


def test_render_is_deterministic_and_in_range() -> None:
    scenes = sample_scenes(16, np.random.default_rng(0))
    a, b = render_batch(scenes, seed=3), render_batch(scenes, seed=3)
    assert a.shape == (16, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, render_batch(scenes, seed=4))
    assert 0.0 <= a.min() and a.max() <= 1.0


@pytest.mark.parametrize("size", [32, 64])
def test_render_paints_the_named_colours_within_their_jitter(size: int) -> None:
    scene = parse_scene("a yellow triangle and a blue circle")
    img = render(scene, np.random.default_rng(0), size=size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    painted = img[img.any(axis=2)].astype(int)
    near = [np.abs(painted - COLORS[c]).max(axis=1) <= 15 for c in ("yellow", "blue")]
    assert (near[0] | near[1]).all() and near[0].any() and near[1].any()


def test_position_scenes_hold_their_relation_with_the_renderers_margin() -> None:
    scenes = [s for s in tag_scenes("position") for _ in range(5)]
    rng = np.random.default_rng(0)
    for scene in scenes:
        img = render(scene, rng).astype(np.float32) / 255.0
        dets = detect(img)
        subject = next(d for d in dets if d.label == scene.objects[0].shape)
        reference = next(d for d in dets if d.label == scene.objects[1].shape)
        assert relation_strength(subject.box, reference.box, scene.relation) >= RELATION_MARGIN
        assert scene.relation in relative_position(subject.box, reference.box)


def _noisy(images: torch.Tensor, seed: int) -> torch.Tensor:
    return (images + 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.from_numpy(ndimage.gaussian_filter(images.numpy(), sigma=(0, 0, sigma, sigma)))


def test_detector_and_rules_are_exact_on_renders_of_every_tag_also_with_noise() -> None:
    """Strict = 1 on every render, clean and under N(0, 0.05²) pixel noise (diffusion outputs are noisy)."""
    scenes = sample_scenes(360, np.random.default_rng(1))
    images = render_batch(scenes, seed=1)
    for batch in (images, _noisy(images, 0)):
        result = score_batch(batch, [s.prompt for s in scenes])
        assert set(result["tag"]) == set(TAGS)
        bad = [(scenes[i].prompt, v.reason) for i, v in enumerate(result["verdicts"]) if v.strict != 1.0]
        assert not bad, bad[:3]
        assert result["score"].min().item() == 1.0


@pytest.mark.parametrize("size", [32, 64])
def test_detector_reads_soft_edged_shapes(size: int) -> None:
    """Decoded diffusion samples have soft edges: a Gaussian blur of σ = 0.5 px at 32 px (scaled),
    plus N(0, 0.05²) noise, must not change any verdict."""
    scenes = sample_scenes(150, np.random.default_rng(size))
    images = _noisy(_blur(render_batch(scenes, seed=size, size=size), 0.5 * size / 32), size)
    result = score_batch(images, [s.prompt for s in scenes])
    assert result["strict"].min().item() == 1.0


def test_detections_follow_the_agreed_record() -> None:
    scene = parse_scene("a red circle left of a blue square")
    img = render(scene, np.random.default_rng(0)).astype(np.float32) / 255.0
    dets = detect(img)
    assert sorted((d.label, d.color) for d in dets) == [("circle", "red"), ("square", "blue")]
    for d in dets:
        assert d.score == 1.0 and d.mask.shape == (32, 32) and d.mask.dtype == bool
        assert d.box == mask_box(d.mask) and d.mask.sum() >= MIN_AREA


def _failed(verdict) -> list[tuple[str, str, str]]:
    return [(c["clause"], c["class"], c["check"]) for c in verdict.details["checks"] if not c["ok"]]


def _other(values, *used):
    return next(v for v in values if v not in used)


def _wrong_variants(scene: Scene):
    """(attribute, wrong scene, the checks that must fail) for each attribute ``scene`` has."""
    objs = scene.objects
    shapes = [o.shape for o in objs]
    if scene.tag == "counting":
        obj = objs[0]
        if obj.count < 4:  # asks for one more: the include clause fails, "fewer than count + 2" holds
            yield (
                "count",
                dataclasses.replace(scene, objects=(dataclasses.replace(obj, count=obj.count + 1),)),
                [("include", obj.shape, "count")],
            )
        if obj.count > 2:  # asks for one fewer: the include clause holds, the exclude clause fails
            yield (
                "count",
                dataclasses.replace(scene, objects=(dataclasses.replace(obj, count=obj.count - 1),)),
                [("exclude", obj.shape, "count")],
            )
    if scene.tag == "position":
        flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        yield (
            "relation",
            dataclasses.replace(scene, relation=flip[scene.relation]),
            [("include", objs[0].shape, "position")],
        )
        return
    for i, obj in enumerate(objs):
        wrong = list(objs)
        wrong[i] = dataclasses.replace(obj, shape=_other(SHAPES, *shapes))
        checks = [("include", wrong[i].shape, "count")] + ([("include", wrong[i].shape, "color")] if obj.color else [])
        if scene.tag != "counting":  # an unasked class is simply absent
            yield "class", dataclasses.replace(scene, objects=tuple(wrong)), checks
        if obj.color:
            wrong = list(objs)
            wrong[i] = dataclasses.replace(obj, color=_other(COLORS, *[o.color for o in objs]))
            yield "color", dataclasses.replace(scene, objects=tuple(wrong)), [("include", obj.shape, "color")]


def test_each_wrong_attribute_is_flagged_alone() -> None:
    """Scoring a render against its prompt with one attribute changed fails exactly that check (a
    wrong class also leaves its colour check unreached); every other check still holds."""
    rng = np.random.default_rng(2)
    seen = set()
    for scene in [s for t in TAGS for s in tag_scenes(t)[:12]]:
        image = torch.from_numpy(render(scene, rng).astype(np.float32) / 255.0).permute(2, 0, 1)
        assert score_image(image, scene.prompt).strict == 1.0
        for attribute, wrong, expected in _wrong_variants(scene):
            verdict = score_image(image, wrong.prompt)
            assert verdict.strict == 0.0 and _failed(verdict) == expected, (scene.prompt, wrong.prompt, verdict.details)
            n = len(verdict.details["checks"])
            assert verdict.score == pytest.approx((n - len(expected)) / n)
            seen.add((scene.tag, attribute))
    assert {a for _, a in seen} == {"count", "relation", "class", "color"}
    assert {t for t, _ in seen} == set(TAGS)


def _paint(objects: list[tuple[str, str, float, float]], size: int = 32) -> torch.Tensor:
    """A [3,size,size] image of (color, shape, cx, cy) objects with half-size 3.5 px."""
    img = np.zeros((size, size, 3), dtype=np.float32)
    for color, shape, cx, cy in objects:
        img[shape_mask(shape, cx, cy, 3.5, size)] = np.array(COLORS[color]) / 255.0
    return torch.from_numpy(img).permute(2, 0, 1)


def test_partial_credit_follows_the_rule_engine() -> None:
    # two red disks and a blue square
    image = _paint([("red", "circle", 8, 8), ("red", "circle", 24, 24), ("blue", "square", 8, 24)])
    assert score_image(image, "two circles").strict == 1.0
    v = score_image(image, "three circles")  # include fails, exclude (4) holds
    assert (v.strict, v.score) == (0.0, 0.5)
    v = score_image(image, "a red square and a blue circle")  # both counts hold, both colours fail
    assert (v.strict, v.score) == (0.0, 0.5)
    v = score_image(image, "a square below a circle")  # the first circle (8, 8) is above the square
    assert (v.strict, v.score) == (1.0, 1.0)
    v = score_image(image, "a triangle left of a circle")
    assert (v.strict, v.score) == (0.0, pytest.approx(1 / 3))


def test_blank_image_fails_every_include_check() -> None:
    blank = torch.zeros(3, 32, 32)
    assert (score_image(blank, "a red circle").score, score_image(blank, "a red circle").strict) == (0.0, 0.0)
    assert score_image(blank, "three squares").score == 0.5  # only "fewer than four squares" holds


def test_speckle_below_min_area_is_not_an_object() -> None:
    image = torch.zeros(3, 32, 32)
    image[:, 2:30:4, 2:30:4] = 1.0  # isolated full-brightness pixels
    image[:, 20:22, 20:22] = 1.0  # a 2×2 blob, still below MIN_AREA
    assert 4 < MIN_AREA
    assert detect(image.permute(1, 2, 0).numpy()) == []
    image = _paint([("green", "square", 8, 16)]) + image  # speckle beside a real object changes nothing
    assert score_image(image.clamp(0, 1), "a green square").strict == 1.0


def test_given_metadata_overrides_the_prompt_and_is_validated() -> None:
    image = _paint([("red", "circle", 8, 8)])
    record = parse_prompt("a blue circle")
    assert score_batch(image[None], ["a red circle"], [record])["strict"].item() == 0.0
    assert score_batch(image[None], ["a red circle"], [None])["strict"].item() == 1.0
    with pytest.raises(ValueError, match="unknown class 'dog'"):
        score_batch(image[None], ["a red circle"], [{**record, "include": [{"class": "dog", "count": 1}]}])


def test_bad_batches_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[3,H,W\]"):
        score_image(torch.zeros(32, 32, 3), "a red circle")
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        score_batch(torch.zeros(2, 3, 32, 32), ["a red circle"])
    with pytest.raises(ValueError, match="and 1 metadata records"):
        score_batch(torch.zeros(2, 3, 32, 32), ["a red circle"] * 2, [None])


def test_per_tag_means_and_overall_is_the_mean_over_tags() -> None:
    table = per_tag(torch.tensor([1.0, 0.0, 1.0, 1.0]), ["colors", "colors", "position", "position"])
    assert table == {"colors": 0.5, "position": 1.0, "overall": 0.75}


def test_toy_geneval_reward_is_partial_credit_by_default_strict_on_request_with_per_check_metadata() -> None:
    from rewards.registry import get_reward
    from rewards.scoring import score

    image = _paint([("red", "circle", 8, 8), ("blue", "square", 24, 8)])[None].repeat(3, 1, 1, 1)
    prompts = ["a red circle and a blue square", "a red circle and a red square", "a circle right of a square"]
    partial, meta = score([get_reward("toy_geneval")], image, prompts)
    assert partial[:, 0].tolist() == pytest.approx([1.0, 0.75, 2 / 3])  # 3 checks: 2 counts, 1 position
    strict, _ = score([get_reward("toy_geneval", strict=True)], image, prompts)
    assert strict[:, 0].tolist() == [1.0, 0.0, 0.0]
    out = meta["toy_geneval"]
    assert out["tag_color_attr"].tolist() == [1.0, 1.0, 0.0] and out["tag_position"].tolist() == [0.0, 0.0, 1.0]
    assert out["color_ok"].tolist() == [2.0, 1.0, 0.0] and out["color_checks"].tolist() == [2.0, 2.0, 0.0]
    assert out["position_ok"].tolist() == [0.0, 0.0, 0.0] and out["position_checks"].tolist() == [0.0, 0.0, 1.0]
    chunked, meta_chunked = score([get_reward("toy_geneval", batch_size=2)], image, prompts)
    assert torch.equal(chunked, partial) and all(torch.equal(meta_chunked["toy_geneval"][k], v) for k, v in out.items())
    # records given per sample win over the prompt (a real GenEval prompt source passes them)
    given, _ = score(
        [get_reward("toy_geneval")], image, prompts, prompt_metadata=[parse_prompt("a blue square"), None, None]
    )
    assert given[:, 0].tolist() == pytest.approx([1.0, 0.75, 2 / 3])
    given, _ = score(
        [get_reward("toy_geneval")], image, prompts, prompt_metadata=[parse_prompt("a green square"), None, None]
    )
    assert given[0, 0].item() == 0.5
    with pytest.raises(ValueError, match="strict must be true or false"):
        get_reward("toy_geneval", strict="yes")

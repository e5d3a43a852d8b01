"""The toy world: prompt grammar, deterministic renderer, and a checker that is exact on renders."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from align.toy.checker import ATTRIBUTES, MIN_AREA, check_batch, check_image
from align.toy.world import (COLORS, COUNT_WORDS, POSITIONS, SHAPES, Scene, all_scenes, parse_prompt, render,
                             render_batch, sample_scenes, shape_mask, vocabulary)


def test_every_scene_round_trips_through_its_prompt() -> None:
    scenes = all_scenes()
    assert len(scenes) == len(COLORS) * len(SHAPES) * len(COUNT_WORDS) * len(POSITIONS) == 144
    for scene in scenes:
        assert parse_prompt(scene.prompt) == scene
        assert set(scene.prompt.split()) <= set(vocabulary())
    assert parse_prompt("  Two RED circles   on the LEFT ") == Scene("red", "circle", 2, "left")


@pytest.mark.parametrize("prompt, word", [
    ("two purple circles on the left", "purple"),
    ("two red hexagons on the left", "hexagon"),
    ("seven red circles on the left", "seven"),
    ("two red circles on the middle", "middle"),
    ("two red hexagon on the left", "hexagon"),  # an unknown shape is named, not called a plural slip
])
def test_bad_prompt_error_names_the_word_and_choices(prompt: str, word: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_prompt(prompt)
    assert word in str(info.value) and "choose one of" in str(info.value)


def test_render_is_deterministic_and_in_range() -> None:
    scenes = sample_scenes(16, np.random.default_rng(0))
    a, b = render_batch(scenes, seed=3), render_batch(scenes, seed=3)
    assert a.shape == (16, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, render_batch(scenes, seed=4))
    assert 0.0 <= a.min() and a.max() <= 1.0


def test_plural_must_agree_with_count() -> None:
    for prompt in ("one red circles on the left", "two red circle on the left"):
        with pytest.raises(ValueError, match="does not agree with count"):
            parse_prompt(prompt)


@pytest.mark.parametrize("size", [32, 64])
def test_render_paints_only_the_scene_colour_within_its_jitter(size: int) -> None:
    scene = Scene("yellow", "triangle", 3, "bottom")
    img = render(scene, np.random.default_rng(0), size=size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    painted = img[img.any(axis=2)]
    assert len(painted) > 0 and (np.abs(painted.astype(int) - COLORS["yellow"]) <= 15).all()
    assert len(np.unique(painted, axis=0)) == 1  # one colour per scene: jitter is per image


def _scores(images: torch.Tensor, scenes: list[Scene]) -> dict[str, torch.Tensor]:
    return check_batch(images, [s.prompt for s in scenes])


def test_checker_is_exact_on_rendered_scenes_also_with_noise() -> None:
    """Renderer and checker are designed together: every attribute scores 1 on every render,
    also under N(0, 0.05²) pixel noise (diffusion outputs are noisy)."""
    scenes = sample_scenes(300, np.random.default_rng(1))
    images = render_batch(scenes, seed=1)
    noisy = (images + 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    for batch in (images, noisy):
        scores = _scores(batch, scenes)
        for key in (*ATTRIBUTES, "score"):
            assert scores[key].min().item() == 1.0, key


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.from_numpy(ndimage.gaussian_filter(images.numpy(), sigma=(0, 0, sigma, sigma)))


@pytest.mark.parametrize("size", [32, 64])
def test_checker_reads_soft_edged_shapes(size: int) -> None:
    """Decoded diffusion samples have soft edges: a Gaussian blur of σ = 0.5 px at 32 px (scaled),
    plus N(0, 0.05²) noise, must not change any verdict. A bounding-box corner rule fails this
    (about 1% of shapes at 32 px and most squares and triangles at 64 px)."""
    scenes = sample_scenes(150, np.random.default_rng(size))
    images = _blur(render_batch(scenes, seed=size, size=size), 0.5 * size / 32)
    images = (images + 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(size))).clamp(0, 1)
    scores = _scores(images, scenes)
    for key in (*ATTRIBUTES, "score"):
        assert scores[key].min().item() == 1.0, key


@pytest.mark.parametrize("attribute, wrong", [
    ("color", lambda s: dataclasses.replace(s, color="blue" if s.color != "blue" else "red")),
    ("shape", lambda s: dataclasses.replace(s, shape="square" if s.shape != "square" else "circle")),
    ("count", lambda s: dataclasses.replace(s, count=s.count % 3 + 1)),
    ("position", lambda s: dataclasses.replace(s, position={"left": "right", "right": "left",
                                                            "top": "bottom", "bottom": "top"}[s.position])),
])
def test_checker_flags_exactly_the_wrong_attribute(attribute: str, wrong) -> None:
    scenes = sample_scenes(60, np.random.default_rng(2))
    images = render_batch(scenes, seed=2)
    scores = _scores(images, [wrong(s) for s in scenes])
    assert scores[attribute].max().item() == 0.0
    if attribute != "color":  # a wrong colour leaves no target objects, so shape/position are 0 too
        for other in set(ATTRIBUTES) - {attribute}:
            assert scores[other].min().item() == 1.0, other


def test_blank_image_scores_zero_everywhere() -> None:
    scores = check_image(torch.zeros(3, 32, 32), "two red circles on the left")
    assert all(scores[k] == 0.0 for k in (*ATTRIBUTES, "score"))


def _paint(objects: list[tuple[str, str, float, float]], size: int = 32) -> torch.Tensor:
    """A [3,size,size] image of (color, shape, cx, cy) objects with half-size 3.5 px."""
    img = np.zeros((size, size, 3), dtype=np.float32)
    for color, shape, cx, cy in objects:
        img[shape_mask(shape, cx, cy, 3.5, size)] = np.array(COLORS[color]) / 255.0
    return torch.from_numpy(img).permute(2, 0, 1)


def test_partial_credit_follows_the_documented_rules() -> None:
    # two red disks (one left, one right) and a blue square on the left
    image = _paint([("red", "circle", 8, 8), ("red", "circle", 24, 24), ("blue", "square", 8, 24)])
    scores = check_image(image, "two red circles on the left")
    assert scores == pytest.approx({"color": 2 / 3, "shape": 1.0, "count": 1.0, "position": 0.5,
                                    "score": (2 / 3 + 1 + 1 + 0.5) / 4})
    scores = check_image(image, "one blue triangle on the top")
    assert scores == pytest.approx({"color": 1 / 3, "shape": 0.0, "count": 1.0, "position": 0.0,
                                    "score": (1 / 3 + 0 + 1 + 0) / 4})
    scores = check_image(image, "three green squares on the bottom")  # no target: only color can be 0
    assert scores == pytest.approx({"color": 0.0, "shape": 0.0, "count": 0.0, "position": 0.0, "score": 0.0})


def test_speckle_below_min_area_is_not_an_object() -> None:
    image = torch.zeros(3, 32, 32)
    image[:, 2:30:4, 2:30:4] = 1.0  # isolated full-brightness pixels
    image[:, 20:22, 20:22] = 1.0  # a 2×2 blob, still below MIN_AREA
    assert 4 < MIN_AREA
    scores = check_image(image, "one red circle on the left")
    assert all(scores[k] == 0.0 for k in (*ATTRIBUTES, "score"))
    image = _paint([("green", "square", 8, 16)]) + image  # speckle beside a real object changes nothing
    assert check_image(image.clamp(0, 1), "one green square on the left")["score"] == 1.0


def test_checker_rejects_channels_last_images() -> None:
    with pytest.raises(ValueError, match=r"\[3,H,W\]"):
        check_image(torch.zeros(32, 32, 3), "one red circle on the left")


def test_check_batch_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        check_batch(torch.zeros(2, 3, 32, 32), ["one red circle on the left"])

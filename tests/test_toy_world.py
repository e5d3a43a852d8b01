"""The toy world: prompt grammar, deterministic renderer, and a checker that is exact on renders."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from align.toy.checker import ATTRIBUTES, check_batch, check_image
from align.toy.world import (COLORS, COUNT_WORDS, POSITIONS, SHAPES, Scene, all_scenes, parse_prompt,
                             render_batch, sample_scenes, vocabulary)


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


def test_check_batch_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        check_batch(torch.zeros(2, 3, 32, 32), ["one red circle on the left"])

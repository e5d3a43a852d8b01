"""Reward registry and validated scoring: bad plugins fail loudly, naming themselves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from align.config_lists import parse_rewards
from align.toy.world import render_batch, sample_scenes
from rewards import RewardError, check_reward_specs, get_reward, score


class _Bad:
    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __call__(self, images, prompts, metadata):
        return self.fn(images)


def test_toy_geneval_scores_rendered_scenes_one_and_reports_its_checks() -> None:
    scenes = sample_scenes(8, np.random.default_rng(0))
    images, prompts = render_batch(scenes, seed=0), [s.prompt for s in scenes]
    scores, meta = score([get_reward("toy_geneval")], images, prompts)
    assert scores.shape == (8, 1) and torch.equal(scores[:, 0], torch.ones(8))
    assert {"strict", "score", "tag_counting", "count_ok", "position_checks"} <= set(meta["toy_geneval"])


def test_jpeg_rewards_prefer_flat_or_noisy_images() -> None:
    flat = torch.full((1, 3, 32, 32), 0.5)
    noise = torch.rand((1, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noise])
    comp, _ = score([get_reward("jpeg_compressibility"), get_reward("jpeg_incompressibility")], images, ["a", "b"])
    assert comp[0, 0] > comp[1, 0] and comp[1, 1] > comp[0, 1]
    torch.testing.assert_close(comp[:, 0], -comp[:, 1])


@pytest.mark.parametrize(
    "fn, message",
    [
        (
            lambda x: torch.tensor([1.0, float("nan")]),
            "reward 'broken' returned non-finite values on a batch of 2: \\[nan\\]",
        ),
        (lambda x: torch.tensor([1.0, float("inf")]), "non-finite values"),
        (lambda x: torch.zeros(3), "reward 'broken' returned shape \\(3,\\) for a batch of 2"),
        (lambda x: [1.0, 2.0], "returned list"),
        (lambda x: 1 / 0, "reward 'broken' raised on a batch of 2: ZeroDivisionError"),
    ],
)
def test_bad_reward_output_raises_an_error_naming_the_plugin(fn, message: str) -> None:
    with pytest.raises(RewardError, match=message):
        score([_Bad("broken", fn)], torch.zeros(2, 3, 8, 8), ["a", "b"])


def test_reward_specs_parse_weights_and_reject_unknown_names() -> None:
    specs = parse_rewards(["toy_geneval:1.0", {"name": "jpeg_compressibility", "weight": 0.2}])
    assert [(s.name, s.weight) for s in specs] == [("toy_geneval", 1.0), ("jpeg_compressibility", 0.2)]
    check_reward_specs(specs)
    with pytest.raises(ValueError, match="unknown reward 'nope'; available: .*toy_geneval"):
        check_reward_specs(parse_rewards([{"name": "nope"}]))
    with pytest.raises(ValueError, match="weight 'x' is not a number"):
        parse_rewards(["toy_geneval:x"])

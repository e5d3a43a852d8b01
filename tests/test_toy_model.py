"""The shipped toy model: loads through the real path and beats chance on the checker."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from align.backbones.model_config import ModelConfig, load_model
from align.sampling import SamplerConfig, sample_trajectory
from align.toy.checker import ATTRIBUTES, check_batch
from align.toy.evaluate import eval_prompts
from align.toy.world import COLORS, COUNT_WORDS, POSITIONS, SHAPES, render_batch, sample_scenes

N_MODEL, N_CHANCE = 96, 2000


@pytest.fixture(scope="module")
def model_scores() -> dict[str, torch.Tensor]:
    pipe = load_model(ModelConfig(source="toy"))
    prompts = eval_prompts(N_MODEL, seed=2024)
    traj = sample_trajectory(pipe, prompts, SamplerConfig(num_inference_steps=20, guidance_scale=4.5, eta=1.0),
                             torch.Generator().manual_seed(0))
    return check_batch(traj.images, prompts)


def chance_scores(attribute: str) -> torch.Tensor:
    """What a generator that ignores one attribute of its prompt scores on that attribute:
    rendered scenes checked against their own prompt with that attribute redrawn uniformly."""
    rng = np.random.default_rng(7)
    scenes = sample_scenes(N_CHANCE, rng)
    images = render_batch(scenes, seed=7)
    values = {"color": list(COLORS), "shape": list(SHAPES), "count": list(COUNT_WORDS), "position": list(POSITIONS)}
    choices = values[attribute]
    prompts = [dataclasses.replace(s, **{attribute: choices[rng.integers(len(choices))]}).prompt for s in scenes]
    return check_batch(images, prompts)[attribute]


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_shipped_toy_model_beats_chance_on_every_attribute(model_scores, attribute: str) -> None:
    m, c = model_scores[attribute], chance_scores(attribute)
    se = math.sqrt(m.var().item() / len(m) + c.var().item() / len(c))
    # a clear margin: at least 3 standard errors of the difference of the two means
    assert m.mean() - c.mean() > 3 * se, f"{attribute}: model {m.mean():.3f} vs chance {c.mean():.3f} (se {se:.3f})"

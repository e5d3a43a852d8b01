"""The shipped toy model: loads through the real path and beats chance on the checker."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from align.backbones.model_config import ModelConfig, load_model
from align.sampling import SamplerConfig, sample_trajectory
from align.toy.checker import ATTRIBUTES, check_batch
from align.toy.evaluate import eval_prompts
from align.toy.world import render_batch, sample_scenes

N_MODEL, N_CHANCE = 96, 2000


@pytest.fixture(scope="module")
def model_scores() -> dict[str, torch.Tensor]:
    pipe = load_model(ModelConfig(source="toy"))
    prompts = eval_prompts(N_MODEL, seed=2024)
    traj = sample_trajectory(pipe, prompts, SamplerConfig(num_inference_steps=20, guidance_scale=4.5, eta=1.0),
                             torch.Generator().manual_seed(0))
    return check_batch(traj.images, prompts)


def chance_scores() -> dict[str, torch.Tensor]:
    """What a generator that ignores its prompt scores: rendered scenes checked against the
    prompt of another, independently drawn scene."""
    rng = np.random.default_rng(7)
    images = render_batch(sample_scenes(N_CHANCE, rng), seed=7)
    prompts = [s.prompt for s in sample_scenes(N_CHANCE, rng)]
    return check_batch(images, prompts)


def test_shipped_toy_model_beats_chance_on_every_attribute(model_scores) -> None:
    chance = chance_scores()
    for key in (*ATTRIBUTES, "score"):
        m, c = model_scores[key], chance[key]
        se = math.sqrt(m.var().item() / len(m) + c.var().item() / len(c))
        # a clear margin: at least 3 standard errors of the difference of the two means
        assert m.mean() - c.mean() > 3 * se, f"{key}: model {m.mean():.3f} vs chance {c.mean():.3f} (se {se:.3f})"

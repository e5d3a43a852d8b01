"""The shipped toy model: loads through the real path (its tokenizer also through the slow files), draws
single objects and colours far above chance, and leaves headroom on composition (the RL task)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from align.backbones.model_config import ModelConfig, load_model
from align.backbones.tokenizer import TOY_TOKENIZER_DIR
from align.sampling import SamplerConfig, sample_trajectory
from align.toy import SHIPPED_PIPELINE_DIR
from align.toy.detector import score_batch
from align.toy.world import TAGS, render_batch, tag_scenes, vocabulary

N_PER_TAG, N_CHANCE = 96, 600
#: The RL sampler's settings (configs/toy_ecg.yaml).
RL_SAMPLER = SamplerConfig(num_inference_steps=10, guidance_scale=4.5, eta=1.0)
SIMPLE, COMPOSITIONAL = ("single_object", "colors"), ("two_object", "counting", "position", "color_attr")


@pytest.fixture(scope="module")
def model_strict() -> dict[str, torch.Tensor]:
    """Strict toy-GenEval of the shipped model per tag, on N_PER_TAG fixed prompts of each tag."""
    pipe = load_model(ModelConfig(source="toy"))
    rng = np.random.default_rng(2024)
    out = {}
    for i, tag in enumerate(TAGS):
        pool = tag_scenes(tag)
        prompts = [pool[j].prompt for j in rng.integers(0, len(pool), size=N_PER_TAG)]
        traj = sample_trajectory(pipe, prompts, RL_SAMPLER, torch.Generator().manual_seed(i))
        out[tag] = score_batch(traj.images, prompts)["strict"]
    return out


def chance_strict(tag: str) -> torch.Tensor:
    """What a generator that ignores its prompt within the tag scores: renders of random scenes of
    ``tag`` checked against another random prompt of the same tag."""
    rng = np.random.default_rng(7)
    pool = tag_scenes(tag)
    scenes = [pool[j] for j in rng.integers(0, len(pool), size=N_CHANCE)]
    prompts = [pool[j].prompt for j in rng.integers(0, len(pool), size=N_CHANCE)]
    return score_batch(render_batch(scenes, seed=7), prompts)["strict"]


def _se(*samples: torch.Tensor) -> float:
    return math.sqrt(sum(s.var().item() / len(s) for s in samples))


@pytest.mark.parametrize("tag", SIMPLE)
def test_shipped_model_draws_single_objects_and_colours_far_above_chance(model_strict, tag: str) -> None:
    m, c = model_strict[tag], chance_strict(tag)
    assert m.mean() - c.mean() > 3 * _se(m, c), f"{tag}: model {m.mean():.3f} vs chance {c.mean():.3f}"


def test_shipped_model_is_weaker_at_composition_than_at_single_objects(model_strict) -> None:
    """The headroom RL is for: compositional tags score clearly below single objects and colours
    (by more than 3 standard errors of the difference of the two means)."""
    simple = torch.cat([model_strict[t] for t in SIMPLE])
    comp = torch.cat([model_strict[t] for t in COMPOSITIONAL])
    assert simple.mean() - comp.mean() > 3 * _se(simple, comp), (simple.mean(), comp.mean())


@pytest.mark.parametrize("folder", [SHIPPED_PIPELINE_DIR / "tokenizer", TOY_TOKENIZER_DIR])
def test_toy_tokenizer_loads_from_its_bpe_files_alone(folder, tmp_path) -> None:
    """transformers 4.x's slow CLIPTokenizer reads vocab.json + merges.txt; both folders ship them,
    and they tokenize every toy word as the full folder does (one token each)."""
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copyfile(folder / name, tmp_path / name)
    slow, full = CLIPTokenizer.from_pretrained(tmp_path), CLIPTokenizer.from_pretrained(folder)
    words = vocabulary()
    assert [slow(w).input_ids for w in words] == [full(w).input_ids for w in words]
    assert all(len(slow(w, add_special_tokens=False).input_ids) == 1 for w in words)
    assert json.loads((folder / "vocab.json").read_text()) == json.loads((TOY_TOKENIZER_DIR / "vocab.json").read_text())

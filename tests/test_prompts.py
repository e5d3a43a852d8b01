"""Prompt sources of `align train` (align/prompts.py): the toy grammar or a prompt file, seeded draws."""
from __future__ import annotations

import numpy as np
import pytest

from align.config import ConfigError, load_config
from align.prompts import draw_prompts, evaluation_prompts, read_prompt_file
from align.toy.evaluate import eval_prompts
from align.toy.world import sample_scenes
from align.train_config import TrainConfig


def _file(tmp_path, text: str) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_toy_source_draws_exactly_the_toy_scenes() -> None:
    """The default keeps the toy runs' prompts (and so their results) unchanged."""
    assert draw_prompts("toy", 6, np.random.default_rng([0, 3])) == \
        [s.prompt for s in sample_scenes(6, np.random.default_rng([0, 3]))]
    assert evaluation_prompts("toy", 5, seed=1234) == eval_prompts(5, seed=1234)


def test_prompt_file_skips_blank_and_comment_lines_and_draws_are_seeded(tmp_path) -> None:
    path = _file(tmp_path, "# header\n a cat \n\na dog\n  # indented comment\na fox\na owl\n")
    assert read_prompt_file(path) == ("a cat", "a dog", "a fox", "a owl")
    first = draw_prompts(path, 3, np.random.default_rng(7))
    assert first == draw_prompts(path, 3, np.random.default_rng(7))
    assert len(set(first)) == 3 and set(first) <= set(read_prompt_file(path))  # no repeats while the file has enough
    many = draw_prompts(path, 10, np.random.default_rng(7))  # more than the file holds: drawn with replacement
    assert len(many) == 10 and set(many) <= set(read_prompt_file(path))


@pytest.mark.parametrize("text", [None, "# only a comment\n\n"])
def test_missing_or_empty_prompt_file_is_a_config_error_naming_the_key(tmp_path, text) -> None:
    path = str(tmp_path / "absent.txt") if text is None else _file(tmp_path, text)
    with pytest.raises(ConfigError, match="trainer.prompts"):
        load_config(TrainConfig, None, [f"trainer.prompts={path}"])


def test_two_iterations_train_on_a_prompt_file(tmp_path) -> None:
    from align.train import iteration_prompts, train
    path = _file(tmp_path, "a photo of a cat\na photo of a dog\na photo of a fox\n")
    cfg = load_config(TrainConfig, None, [
        "model.source=preset:tiny-unet", "sampler.num_inference_steps=2", "algo=grpo", "rewards=[jpeg_compressibility]",
        f"trainer.prompts={path}", "trainer.prompts_per_iteration=2", "trainer.samples_per_prompt=2",
        "trainer.minibatch_size=4", "trainer.iterations=2", "eval_every=0", "eval_prompts=2",
        "ray.num_rollout_workers=0", "ray.num_reward_workers=0", f"run_dir={tmp_path / 'run'}"])
    assert set(iteration_prompts(cfg, 0)) <= set(read_prompt_file(path))
    state = train(cfg, log=lambda *_: None)
    assert state.iteration == 2 and state.policy_updates == 2

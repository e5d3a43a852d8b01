"""Prompt sources of `align train` (align/prompts.py): the toy grammar, GenEval, a text or JSONL file; seeded
draws and per-prompt metadata records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from align.config import ConfigError, load_config
from align.prompts import draw_prompts, evaluation_prompts, read_prompt_file
from align.toy.world import sample_scenes
from align.train_config import TrainConfig


def _file(tmp_path, text: str) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_toy_source_draws_exactly_the_toy_scenes() -> None:
    """The default keeps the toy runs' prompts (and so their results) unchanged."""
    assert draw_prompts("toy", 6, np.random.default_rng([0, 3])) == [
        s.prompt for s in sample_scenes(6, np.random.default_rng([0, 3]))
    ]
    assert evaluation_prompts("toy", 5, seed=1234) == [s.prompt for s in sample_scenes(5, np.random.default_rng(1234))]


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
    cfg = load_config(
        TrainConfig,
        None,
        [
            "model.source=preset:tiny-unet",
            "sampler.num_inference_steps=2",
            "algo=grpo",
            "rewards=[jpeg_compressibility]",
            f"trainer.prompts={path}",
            "trainer.prompts_per_iteration=2",
            "trainer.samples_per_prompt=2",
            "trainer.minibatch_size=4",
            "trainer.iterations=2",
            "eval_every=0",
            "final_eval_prompts=0",
            "eval_prompts=2",
            "ray.num_rollout_workers=0",
            "ray.num_reward_workers=0",
            f"run_dir={tmp_path / 'run'}",
        ],
    )
    assert set(iteration_prompts(cfg, 0)) <= set(read_prompt_file(path))
    state = train(cfg, log=lambda *_: None)
    assert state.iteration == 2 and state.policy_updates == 2


# --- GenEval and JSONL sources, per-prompt metadata records ----------------------------------------------
def test_geneval_source_is_the_shipped_553_prompts_with_their_records() -> None:
    from align.prompts import prompt_metadata, source_prompts
    from rewards.geneval.data import load_metadata

    shipped = load_metadata()
    assert source_prompts("geneval") == tuple(r["prompt"] for r in shipped) and len(shipped) == 553
    drawn = draw_prompts("geneval", 5, np.random.default_rng(3))
    assert drawn == draw_prompts("geneval", 5, np.random.default_rng(3)) and len(set(drawn)) == 5
    by_prompt = {r["prompt"]: r for r in shipped}
    assert prompt_metadata("geneval", drawn) == [by_prompt[p] for p in drawn]
    load_config(TrainConfig, None, ["trainer.prompts=geneval"])  # a valid source at config load


def test_jsonl_source_reads_prompt_and_metadata_and_returns_fresh_records(tmp_path) -> None:
    from align.prompts import prompt_metadata

    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "a photo of a dog", "tag": "single_object", "include": [{"class": "dog", "count": 1}]},
        {"prompt": "a photo of a cat", "tag": "single_object", "include": [{"class": "cat", "count": 1}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert read_prompt_file(str(path)) == ("a photo of a dog", "a photo of a cat")
    records = prompt_metadata(str(path), ["a photo of a cat", "a photo of a cat", "a photo of a dog"])
    assert records == [rows[1], rows[1], rows[0]]
    records[0]["include"].clear()  # the caller's copy: the source is unchanged
    assert prompt_metadata(str(path), ["a photo of a cat"]) == [rows[1]]
    with pytest.raises(ValueError, match="'a photo of a fox' is not in the prompt source"):
        prompt_metadata(str(path), ["a photo of a fox"])


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "p.jsonl:2: not JSON"),
        ('{"text": "x"}', "p.jsonl:2: needs"),
        ('{"prompt": "a", "tag": "other"}', "p.jsonl:2: prompt 'a' appears twice"),
    ],
)
def test_bad_jsonl_line_is_a_config_error_naming_file_and_line(tmp_path, line, message) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "tag": "t"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, [f"trainer.prompts={path}"])


def test_toy_records_are_the_toy_grammars_parse_and_text_file_prompts_have_none(tmp_path) -> None:
    from align.prompts import prompt_metadata
    from align.toy.world import parse_prompt

    prompts = draw_prompts("toy", 6, np.random.default_rng(0))
    assert prompt_metadata("toy", prompts) == [parse_prompt(p) for p in prompts]
    assert prompt_metadata(_file(tmp_path, "a cat\na dog\n"), ["a cat", "a dog"]) == [None, None]


def test_spread_over_tags_covers_every_tag_round_robin() -> None:
    from align.prompts import prompt_metadata, source_prompts, spread_over_tags

    prompts = source_prompts("geneval")
    records = prompt_metadata("geneval", prompts)
    picked = spread_over_tags(prompts, records, 12)
    assert len(picked) == 12 and picked == sorted(set(picked))
    assert sorted(records[i]["tag"] for i in picked) == sorted(
        2 * ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    )
    assert spread_over_tags(prompts, records, None) == list(range(553))


def test_has_records_is_true_for_toy_geneval_and_jsonl_only(tmp_path) -> None:
    from align.prompts import has_records

    assert has_records("toy") and has_records("geneval") and has_records(str(tmp_path / "p.jsonl"))
    assert not has_records(_file(tmp_path, "a cat\n"))

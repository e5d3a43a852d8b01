"""The typed config lists (align/config_lists.py): typed items, the old short forms read by the one
parser with one deprecation note, and one-line errors naming the item."""

from __future__ import annotations

import warnings

import pytest

from align import config_lists
from align.config import ConfigDeprecation, ConfigError, load_config
from align.config_lists import ModifierSpec, RewardSpec, parse_modifiers, parse_rewards
from align.train_config import TrainConfig

TINY = ["model.source=preset:tiny-unet", "ray.num_rollout_workers=0", "ray.num_reward_workers=0"]


@pytest.fixture()
def fresh_notes(monkeypatch):
    """Each test sees the once-per-process notes as if nothing had been noted yet."""
    monkeypatch.setattr(config_lists, "_NOTED", set())


def test_typed_and_old_reward_forms_give_the_same_specs(fresh_notes) -> None:
    typed = load_config(
        TrainConfig,
        None,
        [*TINY, "rewards=[{name: jpeg_compressibility, weight: 0.5, args: {quality: 40}}, {name: toy_geneval}]"],
    )
    with pytest.warns(ConfigDeprecation):
        old = load_config(
            TrainConfig,
            None,
            [*TINY, "rewards=[jpeg_compressibility:0.5,toy_geneval]", "reward_args.jpeg_compressibility.quality=40"],
        )
    expected = [RewardSpec("jpeg_compressibility", 0.5, {"quality": 40}), RewardSpec("toy_geneval", 1.0, {})]
    assert typed.rewards == old.rewards == expected
    assert old.reward_args == {} and old.reward_args_of("jpeg_compressibility") == {"quality": 40}


def test_reward_args_override_the_args_of_a_typed_item() -> None:
    cfg = load_config(
        TrainConfig,
        None,
        [
            *TINY,
            "rewards=[{name: jpeg_compressibility, args: {quality: 40}}]",
            "reward_args.jpeg_compressibility.quality=60",
        ],
    )
    assert cfg.reward_specs() == [RewardSpec("jpeg_compressibility", 1.0, {"quality": 60})]


def test_the_deprecation_note_is_one_line_and_comes_once_per_kind(fresh_notes) -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        parse_rewards(["toy_geneval:1"])
        parse_rewards(["toy_geneval:2"])
        parse_modifiers(["sym_attn"])
        parse_modifiers([{"sym_attn": {"alpha": 1.05}}])
    notes = [str(w.message) for w in seen if issubclass(w.category, ConfigDeprecation)]
    assert len(notes) == 2 and all("\n" not in n for n in notes)
    assert "rewards" in notes[0] and "sampler.modifiers" in notes[1]


def test_typed_items_need_no_note(fresh_notes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigDeprecation)
        assert parse_rewards([{"name": "a", "weight": 2}]) == [RewardSpec("a", 2.0)]
        typed = parse_modifiers([{"name": "sym_attn", "args": {"alpha": 1.05}}])
        assert typed == [ModifierSpec("sym_attn", {"alpha": 1.05})]


def test_remote_urls_keep_their_colons_and_an_optional_weight() -> None:
    specs = parse_rewards(
        ["remote:http://127.0.0.1:8123/clip_score:0.5", "remote:http://localhost:9/hpsv2"], note=False
    )
    assert [(s.name, s.weight) for s in specs] == [
        ("remote:http://127.0.0.1:8123/clip_score", 0.5),
        ("remote:http://localhost:9/hpsv2", 1.0),
    ]


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "rewards=[{name: toy_geneval, wieght: 2}]",
            "rewards[0]: unknown key 'wieght'; valid keys: name, weight, args",
        ),
        ("rewards=[{weight: 2}]", "rewards[0]: 'name' must be a non-empty string"),
        ("rewards=[{name: toy_geneval, weight: nan}]", "rewards[0]: the weight must be finite"),
        ("rewards=[{name: toy_geneval, weight: heavy}]", "rewards[0]: weight 'heavy' is not a number"),
        ("rewards=[{name: toy_geneval, args: 3}]", "rewards[0].args must be a mapping"),
        ("rewards=[toy_geneval, {name: toy_geneval}]", "reward 'toy_geneval' is listed twice"),
        ("reward_args.clip_score.model=x", "reward_args.clip_score: 'clip_score' is not in rewards"),
        ("rewards=[{name: nope}]", "unknown reward 'nope'; available: "),
        (
            "sampler.modifiers=[{name: sym_attn, alpha: 1}]",
            "sampler.modifiers[0]: unknown key 'alpha'; valid keys: name, args",
        ),
        ("sampler.modifiers=[{name: fairness}]", "unknown modifier 'fairness'; valid modifiers: "),
    ],
)
def test_bad_items_fail_in_one_line_naming_the_item(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, None, [*TINY, override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_saved_config_reloads_in_the_typed_form(tmp_path) -> None:
    """config.json of a run holds the parsed list: it reloads without a note and equals the original."""
    import dataclasses
    import json

    cfg = load_config(
        TrainConfig,
        None,
        [
            *TINY,
            "rewards=[{name: jpeg_compressibility, weight: 0.5}]",
            "modifiers=[{name: sym_attn, args: {alpha: 1.05}}]",
        ],
    )
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dataclasses.asdict(cfg)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigDeprecation)
        again = load_config(TrainConfig, path)
    assert again.rewards == cfg.rewards and again.sampler.modifiers == cfg.sampler.modifiers

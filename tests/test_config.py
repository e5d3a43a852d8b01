"""Config loading: YAML + dotted overrides, and one-line errors that name the key."""
from __future__ import annotations

import dataclasses
from typing import Optional

import pytest

from align.config import ConfigError, describe, field, load_config


@dataclasses.dataclass
class _Trainer:
    lr: float = field(1e-4, help="learning rate")
    algo: str = field("ecg", choices=["ecg", "grpo", "ddpo"], help="algorithm")
    init: Optional[str] = field(None, path="dir", help="init dir")
    rewards: list = field(default_factory=lambda: ["toy_geneval:1.0"])


@dataclasses.dataclass
class _Root:
    trainer: _Trainer = field(default_factory=_Trainer)
    seed: int = 0


def test_yaml_then_overrides_are_merged_in_order(tmp_path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("trainer:\n  lr: 0.5\n  algo: grpo\nseed: 3\n")
    cfg = load_config(_Root, path, ["trainer.lr=1e-3", "trainer.rewards=[toy_geneval:1.0,jpeg:0.2]"])
    assert cfg.trainer.lr == 1e-3 and cfg.trainer.algo == "grpo" and cfg.seed == 3
    assert cfg.trainer.rewards == ["toy_geneval:1.0", "jpeg:0.2"]


@pytest.mark.parametrize("override, expected", [
    ("trainer.lrr=1", "unknown config key 'trainer.lrr'; valid keys under 'trainer': lr, algo, init, rewards"),
    ("bogus=1", "unknown config key 'bogus'; valid keys: trainer, seed"),
    ("trainer.lr=abc", "config key 'trainer.lr'"),
    ("seed=1.5", "config key 'seed'"),
    ("trainer.algo=ppo", "config key 'trainer.algo' = 'ppo' is not valid; choose one of: ecg, grpo, ddpo"),
    ("trainer.init=/does/not/exist", "config key 'trainer.init': dir not found: /does/not/exist"),
    ("trainer", "override 'trainer' is not of the form key.sub=value"),
])
def test_bad_input_gives_one_line_error_naming_the_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_Root, None, [override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_missing_config_file_is_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(_Root, tmp_path / "nope.yaml")


def test_describe_lists_every_leaf_with_help_and_choices() -> None:
    rows = {key: (default, help_text) for key, default, help_text in describe(_Root)}
    assert set(rows) == {"trainer.lr", "trainer.algo", "trainer.init", "trainer.rewards", "seed"}
    assert "choices: ecg, grpo, ddpo" in rows["trainer.algo"][1]


def test_top_level_modifiers_key_is_an_alias_of_sampler_modifiers(tmp_path) -> None:
    from align.generate import SampleJobConfig
    from align.train_config import TrainConfig
    compact = ["modifiers=[stayfair:{alpha:5},sym_attn:{alpha:1.05,beta:3}]"]
    expected = [{"stayfair": {"alpha": 5}}, {"sym_attn": {"alpha": 1.05, "beta": 3}}]
    assert load_config(TrainConfig, None, compact).sampler.modifiers == expected
    assert load_config(SampleJobConfig, None, compact).sampler.modifiers == expected
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("sampler:\n  eta: 0.5\nmodifiers: [sym_attn: {alpha: 1.2}]\n")
    cfg = load_config(TrainConfig, yaml_file)
    assert cfg.sampler.modifiers == [{"sym_attn": {"alpha": 1.2}}] and cfg.sampler.eta == 0.5
    with pytest.raises(ConfigError, match="nope"):
        load_config(TrainConfig, None, ["modifiers=[nope: {}]"])

"""Config loading: YAML + dotted overrides, and one-line errors that name the key."""

from __future__ import annotations

import dataclasses
from typing import Optional

import pytest

from align.config import ConfigError, describe, field, load_config
from align.config_lists import ModifierSpec


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


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.lrr=1", "unknown config key 'trainer.lrr'; valid keys under 'trainer': lr, algo, init, rewards"),
        ("bogus=1", "unknown config key 'bogus'; valid keys: trainer, seed"),
        ("trainer.lr=abc", "config key 'trainer.lr'"),
        ("seed=1.5", "config key 'seed'"),
        ("trainer.algo=ppo", "config key 'trainer.algo' = 'ppo' is not valid; choose one of: ecg, grpo, ddpo"),
        ("trainer.init=/does/not/exist", "config key 'trainer.init': dir not found: /does/not/exist"),
        ("trainer", "override 'trainer' is not of the form key.sub=value"),
    ],
)
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
    from align.sample_job import SampleJobConfig
    from align.train_config import TrainConfig

    compact = ["modifiers=[stayfair:{alpha:5},sym_attn:{alpha:1.05,beta:3}]"]
    expected = [ModifierSpec("stayfair", {"alpha": 5}), ModifierSpec("sym_attn", {"alpha": 1.05, "beta": 3})]
    assert load_config(TrainConfig, None, compact).sampler.modifiers == expected
    assert load_config(SampleJobConfig, None, compact).sampler.modifiers == expected
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("sampler:\n  eta: 0.5\nmodifiers: [{name: sym_attn, args: {alpha: 1.2}}]\n")
    cfg = load_config(TrainConfig, yaml_file)
    assert cfg.sampler.modifiers == [ModifierSpec("sym_attn", {"alpha": 1.2})] and cfg.sampler.eta == 0.5
    with pytest.raises(ConfigError, match="nope"):
        load_config(TrainConfig, None, ["modifiers=[nope: {}]"])


# ------------------------------------------------------------------ two-phase validation, YAML shape
def test_yaml_that_is_not_a_mapping_or_not_yaml_is_named(tmp_path) -> None:
    listed = tmp_path / "list.yaml"
    listed.write_text("- trainer.lr=1\n")
    with pytest.raises(ConfigError, match=f"config file {listed}: expected a mapping of config keys"):
        load_config(_Root, listed)
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  lr: {a: 1\n")
    with pytest.raises(ConfigError, match=rf"config file {broken}: not valid YAML \(line 3, column 1\)"):
        load_config(_Root, broken)


@dataclasses.dataclass
class _Phased:
    """Records the order in which the validation hooks run."""

    calls: list = field(default_factory=list)
    fail_value: bool = False

    def validate(self) -> None:
        self.calls.append("validate")
        if self.fail_value:
            raise ValueError("bad value")

    def check_registries(self) -> None:
        self.calls.append("registries")


@dataclasses.dataclass
class _PhasedRoot:
    a: _Phased = field(default_factory=_Phased)
    b: _Phased = field(default_factory=_Phased)


def test_every_cheap_check_runs_before_any_registry_check() -> None:
    from align.config import validate

    cfg = _PhasedRoot()
    validate(cfg)
    assert cfg.a.calls == cfg.b.calls == ["validate", "registries"]
    cfg = _PhasedRoot(b=_Phased(fail_value=True))
    with pytest.raises(ConfigError, match="config 'b': bad value"):
        validate(cfg)
    assert cfg.a.calls == ["validate"]  # a's registry check never ran: b's cheap check failed first


# ------------------------------------------------------------------ TrainConfig values that train wrong
TINY = ["model.source=preset:tiny-unet", "ray.num_rollout_workers=0", "ray.num_reward_workers=0"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.clip_range=-1", "trainer.clip_range must be > 0"),
        ("trainer.clip_range=0", "trainer.clip_range must be > 0"),
        ("trainer.lr=-1", "trainer.lr must be a finite number > 0"),
        ("trainer.lr=0", "trainer.lr must be a finite number > 0"),
        ("trainer.lr=nan", "trainer.lr must be a finite number > 0"),
        ("trainer.epochs=0", "trainer.epochs must be >= 1 (0 makes no update)"),
        ("critic.pretrain_epochs=0", "critic.pretrain_epochs must be >= 1"),
        ("trainer.minibatch_size=0", "trainer.minibatch_size must be >= 1"),
        ("lora.rank=0", "lora.rank must be >= 1"),
        ("critic.rank=0", "critic.rank must be >= 1"),
        ("rewards=[{name: toy_geneval, weight: nan}]", "rewards[0]: the weight must be finite"),
        ("rewards=[{name: toy_geneval, weight: inf}]", "rewards[0]: the weight must be finite"),
        ("rewards=[{name: toy_geneval, weight: -inf}]", "rewards[0]: the weight must be finite"),
        ("rewards=[]", "rewards must list at least one reward"),
        ("critic.pretrain_ev_threshold=1.5", "critic.pretrain_ev_threshold must be <= 1"),
        ("critic.gae_lambda=1.5", "critic.gae_lambda must be in [0, 1]"),
        ("sampler.eta=0", "sampler.eta must be > 0 on a unet backbone"),
        ("sampler.eta=inf", "eta must be finite"),
        ("eval_prompts=0", "eval_prompts >= 1"),
    ],
)
def test_values_that_would_train_wrong_are_one_line_errors(override: str, expected: str) -> None:
    from align.train_config import TrainConfig

    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, None, [*TINY, override])
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_the_noise_check_reads_the_backbone_family_of_the_source(tmp_path) -> None:
    """eta=0 is refused on a UNet even with noise_level > 0; on a DiT only noise_level counts. The kind
    comes from model_index.json (a directory, the shipped toy) or the preset, without loading weights."""
    from align.train_config import TrainConfig

    with pytest.raises(ConfigError, match=r"sampler.eta must be > 0 on a unet backbone \(StableDiffusionPipeline\)"):
        load_config(TrainConfig, None, ["model.source=toy", "sampler.eta=0", "sampler.noise_level=0.7"])
    with pytest.raises(ConfigError, match="sampler.eta must be > 0 on a sdxl backbone"):
        load_config(TrainConfig, None, ["model.source=preset:tiny-sdxl", "sampler.eta=0", "sampler.noise_level=0.7"])
    index = tmp_path / "dit"
    index.mkdir()
    (index / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    cfg = load_config(TrainConfig, None, [f"model.source={index}", "sampler.eta=0", "sampler.noise_level=0.5"])
    assert cfg.sampler.eta == 0
    with pytest.raises(ConfigError, match="sampler.noise_level must be > 0 on a dit backbone"):
        load_config(TrainConfig, None, [f"model.source={index}", "sampler.noise_level=0"])
    with pytest.raises(ConfigError, match="sampler.noise_level must be > 0 on a dit backbone"):
        load_config(TrainConfig, None, ["model.source=preset:tiny-dit", "sampler.noise_level=0"])
    with pytest.raises(ConfigError, match="is a dit backbone, but kind='unet'"):
        load_config(TrainConfig, None, [f"model.source={index}", "model.kind=unet"])


@pytest.mark.parametrize(
    "args, expected",
    [
        ("{quality: notanint}", "reward 'jpeg_compressibility': args.quality = 'notanint' is not an int"),
        ("{quality: 1.5}", "reward 'jpeg_compressibility': args.quality = 1.5 is not an int"),
        ("{qualty: 5}", "unknown argument 'qualty'"),
    ],
)
def test_reward_arguments_are_type_checked_against_the_signature(args: str, expected: str) -> None:
    from align.train_config import TrainConfig

    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, None, [*TINY, f"rewards=[{{name: jpeg_compressibility, args: {args}}}]"])
    assert expected in str(info.value)
    ok = load_config(TrainConfig, None, [*TINY, "rewards=[{name: jpeg_compressibility, args: {quality: 50}}]"])
    assert ok.reward_specs()[0].args == {"quality": 50}


def test_optional_and_union_annotations_accept_each_member() -> None:
    from align.config_checks import check_reward_arg_types

    def reward(images, prompts, metadata, path: Optional[str] = None, scale: float = 1.0, flag: bool = False):
        return images

    check_reward_arg_types("r", reward, {"path": None, "scale": 2, "flag": True}, skip=3)
    check_reward_arg_types("r", reward, {"path": "/w"}, skip=3)
    with pytest.raises(ValueError, match="reward 'r': args.flag = 1 is not a bool"):
        check_reward_arg_types("r", reward, {"flag": 1}, skip=3)
    with pytest.raises(ValueError, match="reward 'r': args.path = 3 is not a str or None"):
        check_reward_arg_types("r", reward, {"path": 3}, skip=3)


def test_critic_settings_with_a_critic_free_algorithm_warn_and_are_not_errors() -> None:
    from align.config import ConfigWarning
    from align.train_config import TrainConfig

    with pytest.warns(ConfigWarning, match="algo=grpo trains no critic: critic.rank, critic.lr are ignored"):
        cfg = load_config(TrainConfig, None, [*TINY, "algo=grpo", "critic.rank=0", "critic.lr=0.5"])
    assert cfg.critic.rank == 0  # unused, so not validated either


def test_torch_free_config_modules_agree_with_the_torch_side() -> None:
    from align.backbones.adapter import Backbone
    from align.backbones.model_config import DTYPES, ModelConfig
    from align.backbones.registry import BACKBONES
    from align.model_source import DTYPE_NAMES
    from align.model_source import ModelConfig as TorchFreeModelConfig
    from align.sampling import SamplerConfig
    from align.sampling.config import LOGPROB_REDUCTIONS
    from align.sampling.config import SamplerConfig as TorchFreeSamplerConfig
    from align.sampling.transitions import LOGPROB_REDUCTIONS as TRANSITION_REDUCTIONS

    assert ModelConfig is TorchFreeModelConfig and SamplerConfig is TorchFreeSamplerConfig
    assert tuple(DTYPES) == DTYPE_NAMES
    for kind, entry in BACKBONES.items():  # each torch-free entry names a real pipeline class and its adapter
        import diffusers

        adapter = entry.adapter_class()
        assert issubclass(adapter, Backbone) and adapter.kind == kind
        assert issubclass(getattr(diffusers, entry.pipeline), diffusers.DiffusionPipeline)
    assert LOGPROB_REDUCTIONS == TRANSITION_REDUCTIONS


@pytest.mark.parametrize(
    "override",
    [
        "trainer.lr=-1",
        "lora.rank=0",
        "rewards=[{name: toy_geneval, weight: nan}]",
        "sampler.eta=0",
        "model.source=/no/such/dir",
        "critic.pretrain_epochs=0",
    ],
)
def test_a_value_error_is_raised_before_torch_is_imported(override: str) -> None:
    """Registry checks (rewards, presets) may import torch; they run only after every cheap check passed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\nfrom align.config import ConfigError, load_config\nfrom align.train_config import TrainConfig\n"
        f"try:\n    load_config(TrainConfig, None, ['model.source=toy', {override!r}])\n"
        "except ConfigError:\n    print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') "
        "if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_torch_free_algorithm_facts_agree_with_the_algorithm_registry() -> None:
    """The config knows which algorithms train a critic without importing torch; the registry in
    align/algos is the truth it must match. The algorithm choices are the registry's own names."""
    import align.algos.ddpo  # noqa: F401  (register the built-ins)
    import align.algos.ecg  # noqa: F401
    import align.algos.grpo  # noqa: F401
    from align.algos.registry import ALGORITHMS
    from align.config_checks import CRITIC_ALGOS
    from align.train_config import TrainConfig

    assert set(CRITIC_ALGOS) == {name for name, cls in ALGORITHMS.items() if cls.needs_critic}
    with pytest.raises(
        ConfigError, match="config key 'algo' = 'ppo' is not valid; choose one of: " + ", ".join(sorted(ALGORITHMS))
    ):
        load_config(TrainConfig, None, ["algo=ppo"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.step_window=0", "trainer.step_window must be in (0, 1]"),
        ("trainer.max_consecutive_skipped=0", "trainer.max_consecutive_skipped must be >= 1"),
        ("critic.value_epochs=0", "critic.value_epochs must be >= 1"),
        ("critic.replay_batches=0", "critic.replay_batches must be >= 1"),
        ("critic.max_grad_norm=0", "critic.max_grad_norm must be > 0"),
    ],
)
def test_rl_loop_settings_that_would_train_nothing_are_one_line_errors(override: str, expected: str) -> None:
    from align.train_config import TrainConfig

    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, None, [*TINY, override])
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_deepspeed_learner_without_deepspeed_installed_is_one_line(monkeypatch) -> None:
    """DeepSpeed is an extra: asking for it without it installed fails at config time, naming the extra."""
    from align import config_checks
    from align.train_config import TrainConfig

    real = config_checks.installed
    monkeypatch.setattr(config_checks, "installed", lambda module: module != "deepspeed" and real(module))
    with pytest.raises(ConfigError, match=r"^config 'TrainConfig': learner.deepspeed needs DeepSpeed.*\[deepspeed\]"):
        load_config(TrainConfig, None, ["learner.deepspeed=launch/deepspeed/zero2.json"])
    assert load_config(TrainConfig, None, []).learner.deepspeed in (None, "")  # the default needs no DeepSpeed

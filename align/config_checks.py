"""The checks behind ``TrainConfig.validate()`` / ``check_registries()`` (docs/config.md).

Values that would *train wrong without an error* (a negative learning rate, a clip range that
zeroes every positive-advantage gradient, zero epochs, NaN reward weights, a deterministic UNet
policy, ...) are refused here in one line, before any heavy import: :func:`check_values` imports
nothing beyond the standard library. :func:`check_with_registries` then checks names and argument
types against the reward and preset registries (these import torch but load no model).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
import typing
import warnings
from typing import Any, Optional

from align.config import ConfigWarning

#: algorithms that train a value model (so that ``critic.*`` settings are used), known here without
#: importing torch; tests/test_config.py pins it to the algorithm registry's ``needs_critic``.
CRITIC_ALGOS = ("ecg",)


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


#: the accelerate trackers ``log_with`` may name (align/distributed.py make_accelerator)
TRACKERS = ("tensorboard", "wandb")


def _check_trackers(log_with: list[str]) -> None:
    """``log_with``: known trackers, and wandb installed if asked for (before any model loads)."""
    import importlib.util

    bad = [t for t in log_with if t not in TRACKERS]
    _require(not bad, f"log_with: unknown tracker(s) {bad}; choose from {list(TRACKERS)} ([] for none)")
    if "wandb" in log_with:
        try:
            found = importlib.util.find_spec("wandb") is not None
        except (ImportError, ValueError):
            found = False
        _require(found, "log_with: wandb is not installed: pip install wandb (or pip install -e '.[wandb]')")


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (found without importing it)."""
    return importlib.util.find_spec(module) is not None


def check_values(cfg) -> None:
    """Every cheap check of a TrainConfig (no torch, nothing loaded); one ValueError line each."""
    _require(
        not cfg.learner.deepspeed or installed("deepspeed"),
        "learner.deepspeed needs DeepSpeed, which is an extra: pip install -e '.[deepspeed]' (make install has it)",
    )
    t = cfg.trainer
    _require(
        t.iterations >= 1 and t.prompts_per_iteration >= 1 and t.samples_per_prompt >= 1,
        "trainer.iterations, prompts_per_iteration and samples_per_prompt must be >= 1",
    )
    _require(cfg.algo != "grpo" or t.samples_per_prompt >= 2, "grpo needs trainer.samples_per_prompt >= 2 (the group)")
    _require(0 < t.timestep_fraction <= 1, "trainer.timestep_fraction must be in (0, 1]")
    _require(t.epochs >= 1, f"trainer.epochs must be >= 1 (0 makes no update), got {t.epochs}")
    _require(t.minibatch_size >= 1, f"trainer.minibatch_size must be >= 1, got {t.minibatch_size}")
    _require(
        _finite(t.lr) and t.lr > 0,
        f"trainer.lr must be a finite number > 0 (< 0 trains in the wrong direction, 0 not at all), got {t.lr}",
    )
    _require(
        _finite(t.clip_range) and t.clip_range > 0,
        f"trainer.clip_range must be > 0 (<= 0 zeroes the gradient "
        f"of every positive-advantage sample), got {t.clip_range}",
    )
    _require(_finite(t.adv_clip) and t.adv_clip > 0, f"trainer.adv_clip must be > 0, got {t.adv_clip}")
    _require(_finite(t.kl_coef) and t.kl_coef >= 0, f"trainer.kl_coef must be >= 0, got {t.kl_coef}")
    _require(
        _finite(t.max_grad_norm) and t.max_grad_norm > 0, f"trainer.max_grad_norm must be > 0, got {t.max_grad_norm}"
    )
    _require(t.num_threads >= 0, f"trainer.num_threads must be >= 0, got {t.num_threads}")
    _require(
        _finite(t.step_window) and 0 < t.step_window <= 1, f"trainer.step_window must be in (0, 1], got {t.step_window}"
    )
    _require(t.checkpoint_every >= 1, f"trainer.checkpoint_every must be >= 1, got {t.checkpoint_every}")
    _require(t.snapshot_every >= 0, f"trainer.snapshot_every must be >= 0, got {t.snapshot_every}")
    _require(t.lr_warmup >= 0, f"trainer.lr_warmup must be >= 0, got {t.lr_warmup}")
    _require(
        t.max_consecutive_skipped >= 1, f"trainer.max_consecutive_skipped must be >= 1, got {t.max_consecutive_skipped}"
    )
    _require(cfg.lora.rank >= 1, f"lora.rank must be >= 1, got {cfg.lora.rank}")
    _require(_finite(cfg.lora.alpha) and cfg.lora.alpha > 0, f"lora.alpha must be > 0, got {cfg.lora.alpha}")
    _require(cfg.eval_every >= 0 and cfg.eval_prompts >= 1, "eval_every must be >= 0 and eval_prompts >= 1")
    _require(cfg.final_eval_prompts >= 0, "final_eval_prompts must be >= 0 (0: off)")
    _check_trackers(list(cfg.log_with))
    _check_critic(cfg)
    _check_rewards(cfg.rewards)
    r = cfg.ray
    _require(
        r.num_rollout_workers >= 0 and r.num_reward_workers >= 0 and r.chunk_size >= 1 and r.max_restarts >= 0,
        "ray.num_rollout_workers, num_reward_workers and max_restarts must be >= 0, ray.chunk_size >= 1",
    )
    _require(
        cfg.learner.max_policy_lag in (0, 1),
        f"learner.max_policy_lag must be 0 (synchronous) or 1 (the next batch is sampled while the learner "
        f"trains), got {cfg.learner.max_policy_lag}",
    )
    _require(
        cfg.learner.max_policy_lag == 0 or r.num_rollout_workers >= 1,
        "learner.max_policy_lag=1 overlaps rollouts with training, which needs rollout actors "
        "(ray.num_rollout_workers >= 1): in-process rollouts share the learner's pipeline",
    )


def _check_critic(cfg) -> None:
    """``critic.*`` values when the algorithm trains a critic; with a critic-free algorithm, settings
    that differ from the defaults are unused: a :class:`ConfigWarning` names them (not an error, so a
    shared config can switch ``algo`` alone)."""
    c = cfg.critic
    if cfg.algo not in CRITIC_ALGOS:
        default = type(c)()
        changed = [f.name for f in dataclasses.fields(c) if getattr(c, f.name) != getattr(default, f.name)]
        if changed:
            warnings.warn(
                f"algo={cfg.algo} trains no critic: critic.{', critic.'.join(changed)} "
                f"{'is' if len(changed) == 1 else 'are'} ignored",
                ConfigWarning,
                stacklevel=2,
            )
        return
    _require(c.rank >= 1, f"critic.rank must be >= 1, got {c.rank}")
    _require(c.hidden >= 1, f"critic.hidden must be >= 1, got {c.hidden}")
    _require(_finite(c.lr) and c.lr > 0, f"critic.lr must be a finite number > 0, got {c.lr}")
    _require(
        _finite(c.gae_lambda) and 0 <= c.gae_lambda <= 1, f"critic.gae_lambda must be in [0, 1], got {c.gae_lambda}"
    )
    _require(
        c.value_clip is None or (_finite(c.value_clip) and c.value_clip > 0),
        f"critic.value_clip must be > 0 or None (off), got {c.value_clip}",
    )
    _require(c.pretrain_iterations >= 0, f"critic.pretrain_iterations must be >= 0, got {c.pretrain_iterations}")
    _require(
        c.pretrain_epochs >= 1,
        f"critic.pretrain_epochs must be >= 1 (0 makes no value update), got {c.pretrain_epochs}",
    )
    _require(c.pretrain_replay >= 0, f"critic.pretrain_replay must be >= 0, got {c.pretrain_replay}")
    _require(
        _finite(c.pretrain_ev_threshold) and c.pretrain_ev_threshold <= 1,
        f"critic.pretrain_ev_threshold must be <= 1 (explained variance never exceeds 1; 1: wait for all "
        f"critic.pretrain_iterations), got {c.pretrain_ev_threshold}",
    )
    _require(_finite(c.value_coef) and c.value_coef > 0, f"critic.value_coef must be > 0, got {c.value_coef}")
    _require(c.value_epochs >= 1, f"critic.value_epochs must be >= 1, got {c.value_epochs}")
    _require(
        c.value_batch_size >= 0, f"critic.value_batch_size must be >= 0 (0: the whole batch), got {c.value_batch_size}"
    )
    _require(c.replay_batches >= 1, f"critic.replay_batches must be >= 1, got {c.replay_batches}")
    _require(
        _finite(c.max_grad_norm) and c.max_grad_norm > 0, f"critic.max_grad_norm must be > 0, got {c.max_grad_norm}"
    )


def _check_rewards(rewards: list) -> None:
    """At least one reward (each is a RewardSpec with a finite weight: align/config_lists.py parsed them)."""
    _require(
        isinstance(rewards, list) and len(rewards) >= 1,
        "rewards must list at least one reward: [{name: NAME, weight: W, args: {...}}]",
    )


def check_resolution(height: Any, width: Any) -> None:
    """``sampler.height``/``sampler.width``: None (the model's default) or a positive number of pixels. The
    model's multiple (VAE factor × DiT patch size) is checked once it loads (align/sampling/resolution.py)."""
    for name, value in (("height", height), ("width", width)):
        _require(
            value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1),
            f"{name}={value!r}: must be a positive integer (pixels) or None (the model's default)",
        )


def check_stochastic(kind: Optional[str], eta: float, noise_level: float) -> None:
    """RL needs a stochastic policy: the family's noise knob > 0 (``eta`` for DDIM, ``noise_level`` for the
    flow SDE: :mod:`align.backbones.registry`); either, when the family is not known before loading."""
    from align.backbones.registry import BACKBONES

    knobs = {"eta": eta, "noise_level": noise_level}
    if kind is not None:
        entry = BACKBONES[kind]
        param = entry.noise_param
        _require(
            knobs[param] > 0,
            f"RL needs a stochastic policy: sampler.{param} must be > 0 on a {kind} backbone "
            f"({entry.pipeline}), got {knobs[param]}",
        )
    else:
        _require(
            eta > 0 or noise_level > 0,
            "RL needs a stochastic policy: sampler.eta (DDIM: UNet) or sampler.noise_level (flow: DiT) > 0",
        )


# ------------------------------------------------------------------- reward argument types
def check_reward_arg_types(name: str, obj: Any, args: dict, skip: int) -> None:
    """Each argument's value against the annotation (else the default's type) of the reward's
    parameter; an unknown annotation is not checked. ``skip``: leading call parameters of a function."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation naming something not importable here: fall back to defaults
        hints = {}
    params = list(inspect.signature(obj).parameters.values())[skip:]
    for p in params:
        if p.name not in args:
            continue
        expected = hints.get(p.name, p.annotation if not isinstance(p.annotation, str) else inspect.Parameter.empty)
        if expected is inspect.Parameter.empty and p.default not in (inspect.Parameter.empty, None):
            expected = type(p.default)
        if not _fits(args[p.name], expected):
            raise ValueError(f"reward {name!r}: args.{p.name} = {args[p.name]!r} is not {_type_name(expected)}")


def _fits(value: Any, expected: Any) -> bool:
    if expected in (inspect.Parameter.empty, Any):
        return True
    origin = typing.get_origin(expected)
    if origin is typing.Union or type(expected).__name__ == "UnionType":
        return any(_fits(value, arg) for arg in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    if origin in (list, tuple, dict) or expected in (list, tuple, dict):
        return isinstance(value, (list, tuple) if (origin or expected) in (list, tuple) else dict)
    return True  # not a type we can check from a config value


def _type_name(expected: Any) -> str:
    if typing.get_origin(expected) is typing.Union or type(expected).__name__ == "UnionType":
        return " or ".join(_type_name(a) for a in typing.get_args(expected))
    return {type(None): "None"}.get(
        expected,
        f"{'an' if getattr(expected, '__name__', '')[:1] in 'aeiou' else 'a'} "
        f"{getattr(expected, '__name__', expected)}",
    )


def check_with_registries(cfg) -> None:
    """Rewards (names, arguments and their types), the prompt source, and the backbone's noise
    parameter for presets, against their registries; imports torch, loads no model."""
    from align.model_source import PRESET_PREFIX, preset_kind
    from rewards import check_reward_specs
    from rewards.registry import REMOTE_PREFIX, reward_object

    specs = cfg.reward_specs()
    check_reward_specs(specs)
    for spec in specs:
        if spec.name.startswith(REMOTE_PREFIX):
            from rewards.remote import RemoteReward

            check_reward_arg_types(spec.name, RemoteReward, spec.args, skip=1)
        else:
            obj = reward_object(spec.name)
            check_reward_arg_types(spec.name, obj, spec.args, skip=0 if inspect.isclass(obj) else 3)
    if cfg.model.source.startswith(PRESET_PREFIX):
        check_stochastic(preset_kind(cfg.model.source[len(PRESET_PREFIX) :]), cfg.sampler.eta, cfg.sampler.noise_level)

"""The run's models, built one way: the policy pipeline with its LoRA, the critic, and a trained run
loaded from its directory, and a run's export. Training (align/train.py ``build``), the rollout actors
(align/rollout/ray_group.py), ``align export`` and the benchmarks all call these, so an adapter setting
cannot differ between the learner, the actors and an export.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from align import checkpoint as ckpt


def build_policy(cfg) -> Any:
    """``cfg.model``'s pipeline with the ``policy`` LoRA (``cfg.lora`` rank and alpha; B = 0, so it
    samples as the base until trained). ``cfg``: a TrainConfig."""
    from align.backbones.lora import attach_lora
    from align.backbones.model_config import load_model

    pipe = load_model(cfg.model)
    attach_lora(pipe, "policy", rank=cfg.lora.rank, alpha=cfg.lora.alpha)
    return pipe


def needs_critic(cfg) -> bool:
    """Whether ``cfg.algo`` trains a value model (the algorithm registry says)."""
    from align.algos.registry import make_algorithm

    return make_algorithm(cfg).needs_critic


def build_critic(pipe, cfg, reward_names: list[str]):
    """ECG's value model on ``pipe``: its own ``critic`` LoRA on the frozen base (``critic.adapter =
    separate``, targeted at the layers up to ``critic.feature_layer``) or the policy's adapter
    (``shared``), and one head per reward."""
    from align.backbones.lora import attach_lora
    from critics.value_model import LatentCritic, critic_target_modules

    c = cfg.critic
    adapter = "policy" if c.adapter == "shared" else "critic"
    if adapter == "critic":
        attach_lora(pipe, "critic", rank=c.rank, target_modules=critic_target_modules(pipe, c.feature_layer))
    return LatentCritic(pipe, list(reward_names), adapter=adapter, hidden=c.hidden, feature_layer=c.feature_layer)


@dataclasses.dataclass
class LoadedRun:
    """A trained run: its config, its checkpoint's ``state.json``, and the pipeline with the
    checkpoint's policy (and critic) weights loaded."""

    cfg: Any
    state: dict
    pipe: Any
    critic: Optional[Any]
    directory: Path


def run_config(run_dir: str | Path):
    """``RUN_DIR/config.json`` as a TrainConfig; a one-line FileNotFoundError if it is not a run directory."""
    from align.config import load_config
    from align.train_config import TrainConfig

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {run_dir} is not a run directory of `align train`")
    return load_config(TrainConfig, path)


def load_run(run_dir: str | Path) -> LoadedRun:
    """The run in ``run_dir`` built as it trained (:func:`build_policy`, :func:`build_critic`) with the
    weights of ``RUN_DIR/checkpoint`` (policy LoRA, critic LoRA and heads) loaded."""
    from align.backbones.lora import load_lora_state_dict

    run = Path(run_dir)
    ck = run / "checkpoint"
    for need in (run / "config.json", ck / "state.json"):
        if not need.is_file():
            raise FileNotFoundError(f"{need} not found; {run} is not a run directory with a checkpoint")
    cfg = run_config(run)
    state = ckpt.read_json(ck / "state.json")
    pipe = build_policy(cfg)
    critic = build_critic(pipe, cfg, [s.name for s in cfg.reward_specs()]) if needs_critic(cfg) else None
    load_lora_state_dict(pipe, ckpt.load_tensors(ck / "policy_lora.safetensors"), "policy")
    if critic is not None:
        if critic.adapter != "policy":
            load_lora_state_dict(pipe, ckpt.load_tensors(ck / "critic_lora.safetensors"), critic.adapter)
        critic.heads.load_state_dict(ckpt.load_tensors(ck / "critic_heads.safetensors"))
    return LoadedRun(cfg=cfg, state=state, pipe=pipe, critic=critic, directory=run)


def export_run(run_dir: str | Path, out: Optional[str | Path] = None) -> Path:
    """Rebuild a run's pipeline from ``run_dir/config.json`` + its last checkpoint (:func:`load_run`) and
    export it (default ``run_dir/export``; critics/export.py writes the files)."""
    from critics.export import export_pipeline

    run = load_run(run_dir)
    return export_pipeline(
        run.pipe,
        run.critic,
        out if out is not None else run.directory / "export",
        **run_export_kwargs(run.cfg, run.state),
    )


def run_export_kwargs(cfg, state: dict) -> dict:
    """Base id, reward weights, normalisation stats and final metrics of a run, for :func:`export_pipeline`."""
    history = state.get("history") or []
    return {
        "base_model": cfg.model.source,
        "reward_weights": {s.name: s.weight for s in cfg.reward_specs()},
        "normalisers": state.get("normalisers") or {},
        "metrics": {"algo": cfg.algo, "iterations": state.get("iteration", 0), **(history[-1] if history else {})},
        "adapter_source": cfg.critic.adapter,
    }

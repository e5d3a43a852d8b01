"""What makes a run that run, and the refusal to resume it as another one (docs/config.md §Resume).

A checkpoint's ``state.json`` carries the run's identity (``RunState.identity``): the settings that
define it (:data:`RUN_KEYS`: LoRA rank and alpha, algorithm, critic adapter/layer/rank/width,
rewards, sampler steps, η / noise level) and its base (``model.source`` and the sha256 fingerprint of
the denoiser's base weights, ``critics.export.base_fingerprint``).

``--resume`` then:

1. :func:`resolve_resume` (torch-free, before any model loads): finds the newest *complete*
   checkpoint (align/checkpoint.py: ``checkpoint/`` or a surviving ``.checkpoint.old-*`` /
   ``.checkpoint.tmp-*``) or refuses in one line, and compares the settings: each differing key
   is named (old → new); refused unless ``--force``;
2. :func:`check_same_base` (after the model is built, before the checkpoint's weights are loaded
   into it): the fingerprint of the base that loaded against the stored one;
3. :func:`append_resume_log`: ``config.json`` stays the run's original config; every resume
   appends one JSON line (checkpoint, iteration, every changed key old → new, forced or not) to
   ``resume_log.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Optional

from align.checkpoint import latest_complete
from align.errors import CheckpointError, RunMismatchError

#: settings that define a run: a resume that changes one continues another run
RUN_KEYS = (
    "lora.rank",
    "lora.alpha",
    "algo",
    "critic.adapter",
    "critic.feature_layer",
    "critic.rank",
    "critic.hidden",
    "rewards",
    "sampler.num_inference_steps",
    "sampler.eta",
    "sampler.noise_level",
)
#: of those, the ones that only matter when the algorithm trains a critic
CRITIC_KEYS = ("critic.adapter", "critic.feature_layer", "critic.rank", "critic.hidden")
RESUME_LOG = "resume_log.jsonl"
CHECKPOINT_DIR = "checkpoint"


def _as_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def run_settings(cfg: Any) -> dict[str, Any]:
    """The :data:`RUN_KEYS` of a TrainConfig (or its ``config.json`` dict); critic keys only for ECG."""
    from align.config_checks import CRITIC_ALGOS
    from align.config_lists import parse_rewards

    tree = _as_dict(cfg)
    keys = [k for k in RUN_KEYS if k not in CRITIC_KEYS or tree.get("algo") in CRITIC_ALGOS]
    settings = {k: _get(tree, k) for k in keys}
    # name:weight of each reward, in the same text for old ('name:weight') and typed config.json files
    settings["rewards"] = [f"{s.name}:{s.weight:g}" for s in parse_rewards(tree.get("rewards") or [], note=False)]
    return settings


def run_identity(cfg: Any, fingerprint: Optional[str]) -> dict:
    """What ``RunState.identity`` stores: the settings and the base (source and fingerprint)."""
    return {
        "settings": run_settings(cfg),
        "base": {"source": _as_dict(cfg)["model"]["source"], "fingerprint": fingerprint},
    }


def differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """``(key, old, new)`` for every key whose value differs (a key only one side has counts too)."""
    out = []
    for key in list(dict.fromkeys([*old, *new])):
        a, b = old.get(key), new.get(key)
        if a != b:
            out.append((key, a, b))
    return out


def _describe(diffs: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{k} {a!r} → {b!r}" for k, a, b in diffs)


def stored_identity(checkpoint: Path) -> dict:
    """A checkpoint's identity ({} for checkpoints written before identities were stored)."""
    state = json.loads((Path(checkpoint) / "state.json").read_text())
    identity = state.get("identity") if isinstance(state, dict) else None
    return identity if isinstance(identity, dict) else {}


def resolve_resume(run_dir: str | Path, cfg: Any, force: bool = False) -> Path:
    """The newest complete checkpoint of ``run_dir`` whose settings match ``cfg``'s; one-line
    :class:`CheckpointError` if there is none, :class:`RunMismatchError` naming each differing key
    (unless ``force``). Torch-free and loads nothing: call it before building the model."""
    run = Path(run_dir)
    found = latest_complete(run / CHECKPOINT_DIR)
    if found is None:
        what = (
            "does not exist"
            if not run.exists()
            else "has no checkpoint/"
            if not (run / CHECKPOINT_DIR).exists()
            else "has no complete checkpoint (checkpoint/ is empty or was cut off while written)"
        )
        raise CheckpointError(
            f"--resume {run}: {what}; nothing to resume (start a new run with another run_dir, or remove this one)"
        )
    identity = stored_identity(found)
    old = identity.get("settings")
    if old is None and (run / "config.json").is_file():  # a checkpoint from before identities: its config
        old = run_settings(json.loads((run / "config.json").read_text()))
    diffs = differences(old, run_settings(cfg)) if old is not None else []
    if diffs and not force:
        raise RunMismatchError(
            f"--resume {run}: the checkpoint is another run's: {_describe(diffs)}; resume "
            "with the run's own settings, or pass --force to continue it with these"
        )
    return found


def check_same_base(stored: dict, current: dict, run_dir: str | Path, force: bool = False) -> None:
    """The base that loaded (``current['base']``) against the checkpoint's; one line unless ``force``."""
    old, new = stored.get("base") or {}, current.get("base") or {}
    if old.get("fingerprint") and new.get("fingerprint") and old["fingerprint"] != new["fingerprint"] and not force:
        raise RunMismatchError(
            f"--resume {run_dir}: the checkpoint was trained on another base: model.source {old.get('source')!r} "
            f"({old['fingerprint'][:23]}…) → {new.get('source')!r} ({new['fingerprint'][:23]}…); resume on the "
            "same base weights, or pass --force to continue on this one"
        )


def check_fresh_run_dir(run_dir: str | Path, force: bool = False) -> None:
    """A new run (no ``--resume``) must not overwrite a run directory that holds a complete checkpoint."""
    found = latest_complete(Path(run_dir) / CHECKPOINT_DIR)
    if found is not None and not force:
        state = json.loads((found / "state.json").read_text()) if (found / "state.json").is_file() else {}
        raise CheckpointError(
            f"run_dir {run_dir} already holds a checkpoint (iteration {state.get('iteration', '?')}); "
            f"pass --resume {run_dir} to continue it, --force to start over in it, or choose "
            "another run_dir"
        )


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def append_resume_log(run_dir: str | Path, cfg: Any, checkpoint: Path, iteration: int, force: bool = False) -> dict:
    """Append one JSON line to ``run_dir/resume_log.jsonl``: when, from which checkpoint and iteration,
    and every config key that differs from ``run_dir/config.json`` (old → new). Never rewrites config.json."""
    run = Path(run_dir)
    saved = run / "config.json"
    before = _flatten(json.loads(saved.read_text())) if saved.is_file() else {}
    after = _flatten(json.loads(json.dumps(_as_dict(cfg), default=str)))
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": Path(checkpoint).name,
        "iteration": iteration,
        "force": bool(force),
        "changed": {k: [a, b] for k, a, b in differences(before, after)},
    }
    with open(run / RESUME_LOG, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
    return entry

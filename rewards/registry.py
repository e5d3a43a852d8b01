"""Reward plugins: the protocol, the registry (decorator + ``align.rewards`` entry points), and the
validated multi-reward scoring that turns B images into a (B, K) score matrix.

A reward maps ``(images (B,3,H,W) in [0,1], prompts, metadata) -> Tensor (B,)``. A plugin that
raises, or returns a wrong shape or non-finite values, stops scoring with a :class:`RewardError`
that names it, its input batch size and the bad values — before any update can use the batch.
"""
from __future__ import annotations

import dataclasses
from importlib.metadata import entry_points
from typing import Any, Callable, Optional, Protocol, Sequence

import torch

ENTRY_POINT_GROUP = "align.rewards"


class Reward(Protocol):
    name: str

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: dict[str, Any]) -> torch.Tensor: ...


class RewardError(RuntimeError):
    """A reward plugin failed or returned bad values; the message names the plugin."""


_BUILTIN: dict[str, Callable[[], Reward]] = {}


def register_reward(name: str):
    """Register a reward factory (a class or a zero-argument function returning a Reward)."""
    def wrap(factory):
        _BUILTIN[name] = factory
        return factory
    return wrap


def available_rewards() -> dict[str, str]:
    """name -> source ('builtin' or the entry point's distribution)."""
    found = {name: "builtin" for name in _BUILTIN}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, f"entry point {ep.value}")
    return found


def get_reward(name: str) -> Reward:
    """Instantiate a reward by name; an unknown name lists the available ones."""
    _load_builtins()
    if name in _BUILTIN:
        return _BUILTIN[name]()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            obj = ep.load()
            return obj() if isinstance(obj, type) else obj
    raise ValueError(f"unknown reward {name!r}; available: {', '.join(sorted(available_rewards()))}")


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    name: str
    weight: float


def parse_reward_specs(specs: Sequence[str]) -> list[RewardSpec]:
    """``["toy_geneval:1.0", "jpeg_compressibility:0.2"]`` → specs (weight defaults to 1)."""
    out = []
    for spec in specs:
        name, _, weight = str(spec).partition(":")
        try:
            out.append(RewardSpec(name.strip(), float(weight) if weight else 1.0))
        except ValueError:
            raise ValueError(f"reward spec {spec!r}: weight {weight!r} is not a number") from None
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"reward listed twice in {list(specs)}")
    _load_builtins()
    unknown = [n for n in names if n not in available_rewards()]
    if unknown:
        raise ValueError(f"unknown reward {unknown[0]!r}; available: {', '.join(sorted(available_rewards()))}")
    return out


def score(rewards: Sequence[Reward], images: torch.Tensor, prompts: list[str],
          metadata: Optional[dict[str, Any]] = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run every reward; returns scores (B, K) and the metadata the rewards added."""
    metadata = {} if metadata is None else metadata
    columns = []
    for reward in rewards:
        try:
            values = reward(images, prompts, metadata)
        except Exception as err:  # noqa: BLE001 - re-raised with the plugin's name
            raise RewardError(f"reward {reward.name!r} raised on a batch of {len(prompts)}: "
                              f"{type(err).__name__}: {err}") from err
        columns.append(validate_scores(reward.name, values, len(prompts)))
    return torch.stack(columns, dim=1), metadata


def validate_scores(name: str, values: Any, batch_size: int) -> torch.Tensor:
    if not torch.is_tensor(values):
        raise RewardError(f"reward {name!r} returned {type(values).__name__}, expected a Tensor of shape ({batch_size},)")
    if tuple(values.shape) != (batch_size,):
        raise RewardError(f"reward {name!r} returned shape {tuple(values.shape)} for a batch of {batch_size}; "
                          f"expected ({batch_size},)")
    values = values.detach().float().cpu()
    bad = ~torch.isfinite(values)
    if bad.any():
        idx = bad.nonzero().flatten().tolist()
        raise RewardError(f"reward {name!r} returned non-finite values on a batch of {batch_size}: "
                          f"{values[bad].tolist()[:5]} at indices {idx[:5]}")
    return values


def _load_builtins() -> None:
    import rewards.builtin  # noqa: F401  (registers the built-in rewards)

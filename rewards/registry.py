"""Reward plugins: the protocol and the registry (decorator + ``align.rewards`` entry points).

A reward maps ``(images (B,3,H,W) in [0,1], prompts, metadata) -> Tensor (B,)`` and declares
``device`` (where its inputs go) and ``batch_size`` (the most images per call; ``None``: any).
It is a class (instantiated with the keyword arguments of its config entry, ``rewards[].args``) or a
plain function (those keyword arguments are bound to it). Scoring, chunking and validation live
in :mod:`rewards.scoring`.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from importlib.metadata import entry_points
from typing import Any, Callable, Optional, Protocol, Sequence

import torch

from align.config_lists import RewardSpec

ENTRY_POINT_GROUP = "align.rewards"
REMOTE_PREFIX = "remote:"
#: keyword arguments every reward accepts: the scoring protocol applies them, not the plugin
PROTOCOL_ARGS = ("device", "batch_size", "timeout_s")


class Reward(Protocol):
    name: str
    device: str
    batch_size: Optional[int]

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: dict[str, Any]) -> torch.Tensor: ...


class RewardError(RuntimeError):
    """A reward plugin failed or returned bad values; the message names the plugin."""


@dataclasses.dataclass
class FunctionReward:
    """A plain scoring function as a Reward; ``kwargs`` (``rewards[].args``) are passed on each call."""
    fn: Callable[..., torch.Tensor]
    name: str
    device: str = "cpu"
    batch_size: Optional[int] = None
    kwargs: dict = dataclasses.field(default_factory=dict)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: dict[str, Any]) -> torch.Tensor:
        return self.fn(images, prompts, metadata, **self.kwargs)


_BUILTIN: dict[str, Callable[..., Any]] = {}
_DECLARED: dict[str, dict[str, Any]] = {}


def register_reward(name: str, *, device: str = "cpu", batch_size: Optional[int] = None):
    """Register a reward class, or a scoring function ``f(images, prompts, metadata, **kw)``, under ``name``.
    ``device`` / ``batch_size`` are the defaults for functions (classes declare them as attributes)."""
    def wrap(obj):
        _BUILTIN[name] = obj
        _DECLARED[name] = {"device": device, "batch_size": batch_size}
        return obj
    return wrap


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_rewards() -> dict[str, str]:
    """name -> source: 'builtin' / 'registered <module>' or the entry point and its distribution."""
    _load_builtins()
    found = {name: ("builtin" if getattr(obj, "__module__", "").startswith("rewards.")
                    else f"registered in {getattr(obj, '__module__', '?')}") for name, obj in _BUILTIN.items()}
    for name, ep in _entry_points().items():
        dist = f" ({ep.dist.name} {ep.dist.version})" if getattr(ep, "dist", None) else ""
        found.setdefault(name, f"entry point {ep.value}{dist}")
    return found


def describe_reward(name: str) -> str:
    """First line of a registered reward's docstring ('' for entry points, which are not imported)."""
    doc = inspect.getdoc(_BUILTIN[name]) if name in _BUILTIN else None
    return doc.splitlines()[0] if doc else ""


def get_reward(name: str, **kwargs: Any) -> Reward:
    """Instantiate a reward by name with keyword arguments; protocol arguments (``device``,
    ``batch_size``, ``timeout_s``) are set on the instance. Unknown names list the available ones;
    unknown arguments list the accepted ones."""
    if name.startswith(REMOTE_PREFIX):
        from rewards.remote import RemoteReward
        return _with_protocol_args(RemoteReward(name, **_plugin_args(RemoteReward, name, kwargs, skip=1)), kwargs)
    _load_builtins()
    if name in _BUILTIN:
        obj, declared = _BUILTIN[name], _DECLARED[name]
    elif name in _entry_points():
        obj, declared = _entry_points()[name].load(), {}
    else:
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(sorted(available_rewards()))}")
    if inspect.isclass(obj):
        reward = obj(**_plugin_args(obj, name, kwargs))
        if not getattr(reward, "name", None):
            reward.name = name
    elif callable(obj):
        params = _plugin_args(obj, name, kwargs, skip=3)
        reward = FunctionReward(obj, getattr(obj, "reward_name", name), kwargs=params,
                                device=declared.get("device", getattr(obj, "device", "cpu")),
                                batch_size=declared.get("batch_size", getattr(obj, "batch_size", None)))
    else:
        raise ValueError(f"reward {name!r}: {obj!r} is neither a class nor a function")
    return _with_protocol_args(reward, kwargs)


def _plugin_args(obj: Callable, name: str, kwargs: dict, skip: int = 0) -> dict:
    """The kwargs for ``obj``, checked against its signature before anything heavy runs. Protocol
    arguments go to ``obj`` only if it names them (a model reward places its model on ``device``)."""
    params = list(inspect.signature(obj).parameters.values())[skip:]
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    args = {k: v for k, v in kwargs.items() if k not in PROTOCOL_ARGS or k in accepted}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return args
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise ValueError(f"reward {name!r}: unknown argument {unknown[0]!r}; accepted: "
                         f"{', '.join(dict.fromkeys(accepted + list(PROTOCOL_ARGS)))}")
    return args


def _with_protocol_args(reward: Any, kwargs: dict) -> Reward:
    for key in PROTOCOL_ARGS:
        if key in kwargs:
            setattr(reward, key, kwargs[key])
    if kwargs.get("batch_size") is not None and int(kwargs["batch_size"]) < 1:
        raise ValueError(f"reward {reward.name!r}: batch_size must be >= 1, got {kwargs['batch_size']}")
    return reward


def check_reward_specs(specs: Sequence[RewardSpec]) -> None:
    """Each spec's name against the registry (a ``remote:`` URL by its syntax) and its args against
    the reward's signature, without loading any weights. The specs come from the one parser,
    :func:`align.config_lists.parse_rewards` (``TrainConfig.rewards`` holds them parsed)."""
    known = available_rewards()
    for s in specs:
        if s.name.startswith(REMOTE_PREFIX):
            from rewards.remote import parse_url
            parse_url(s.name)
        elif s.name not in known:
            raise ValueError(f"unknown reward {s.name!r}; available: {', '.join(sorted(known))}")
        else:
            obj = reward_object(s.name)
            _plugin_args(obj, s.name, s.args, skip=0 if inspect.isclass(obj) else 3)


def reward_object(name: str) -> Callable[..., Any]:
    """The registered class or function of a (non-remote) reward; an entry point is loaded (imported)."""
    _load_builtins()
    if name in _BUILTIN:
        return _BUILTIN[name]
    return _entry_points()[name].load()


def build_rewards(specs: Sequence[RewardSpec]) -> list[Reward]:
    """Instantiate each spec's reward with its args (what training and reward workers call)."""
    check_reward_specs(specs)
    return [get_reward(s.name, **dict(s.args)) for s in specs]


@functools.lru_cache(maxsize=None)
def _load_builtins() -> None:
    import rewards.builtin  # noqa: F401  (registers the built-in rewards)
    import rewards.sanity  # noqa: F401  (mean_brightness, color_fraction)
    import rewards.clip_rewards  # noqa: F401
    import rewards.geneval.reward  # noqa: F401
    import rewards.hps  # noqa: F401

"""Reward plugins: the protocol and the registry: ``align.rewards`` entry points (the built-ins are
this project's own, in pyproject.toml; a plugin package declares its own) and, in-process,
:func:`register_reward`.

A reward maps ``(images (B,3,H,W) in [0,1], prompts, metadata) -> Tensor (B,)`` and declares
``device`` (where its inputs go) and ``batch_size`` (the most images per call; ``None``: any).
It is a class (instantiated with the keyword arguments of its config entry, ``rewards[].args``) or a
plain function (those keyword arguments are bound to it). Scoring, chunking and validation live
in :mod:`rewards.scoring`.
"""

from __future__ import annotations

import dataclasses
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


#: rewards registered in this process with :func:`register_reward` (tests, notebooks, a Ray worker's setup hook)
_REGISTERED: dict[str, Callable[..., Any]] = {}
#: the distribution whose own ``align.rewards`` entry points are the built-in rewards (pyproject.toml)
OWN_DISTRIBUTION = "diffusion-align"


class RewardPluginError(ValueError):
    """A reward plugin that cannot be found or loaded; the message (one line) names it."""


def register_reward(name: str, *, device: str = "cpu", batch_size: Optional[int] = None):
    """Register a reward class, or a scoring function ``f(images, prompts, metadata, **kw)``, under ``name``
    in this process. ``device`` / ``batch_size`` become a function's attributes, as an entry-point
    function declares them (classes declare them as attributes themselves)."""

    def wrap(obj):
        if not inspect.isclass(obj):
            obj.device = getattr(obj, "device", device)
            obj.batch_size = getattr(obj, "batch_size", batch_size)
        _REGISTERED[name] = obj
        return obj

    return wrap


def _entry_points() -> dict[str, Any]:
    """The ``align.rewards`` entry points: the built-ins (this project's own, pyproject.toml) and every
    installed plugin's; the one discovery path. Metadata without the built-ins is a stale install."""
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if not any(_is_own(ep) for ep in found.values()):
        raise RewardPluginError(
            f"the built-in rewards are {OWN_DISTRIBUTION}'s own {ENTRY_POINT_GROUP!r} entry points "
            "(pyproject.toml), and the installed metadata has none: reinstall the project "
            "(make install, or pip install -e .)"
        )
    return found


def _is_own(ep: Any) -> bool:
    dist = getattr(ep, "dist", None)
    return dist is not None and dist.name.replace("_", "-").lower() == OWN_DISTRIBUTION


def available_rewards() -> dict[str, str]:
    """name -> source: 'builtin' (this project's entry points), the entry point and its distribution,
    or 'registered in <module>'; a name registered in this process shadows an entry point."""
    found = {}
    for name, ep in _entry_points().items():
        dist = f" ({ep.dist.name} {ep.dist.version})" if getattr(ep, "dist", None) else ""
        found[name] = "builtin" if _is_own(ep) else f"entry point {ep.value}{dist}"
    for name, obj in _REGISTERED.items():
        found[name] = f"registered in {getattr(obj, '__module__', '?')}"
    return found


def reward_object(name: str) -> Callable[..., Any]:
    """The class or function of a (non-remote) reward: registered in this process, else its entry
    point, loaded (imported) here; a plugin that fails to import is one line naming it."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    eps = _entry_points()
    if name not in eps:
        raise RewardPluginError(f"unknown reward {name!r}; available: {', '.join(sorted(available_rewards()))}")
    ep = eps[name]
    try:
        return ep.load()
    except Exception as err:  # noqa: BLE001 (any import-time failure of a plugin: name it, in one line)
        dist = f" of {ep.dist.name} {ep.dist.version}" if getattr(ep, "dist", None) else ""
        detail = str(err).splitlines()[0] if str(err) else ""
        raise RewardPluginError(
            f"reward plugin {name!r} (entry point {ep.value}{dist}) failed to load: {type(err).__name__}: {detail}"
        ) from err


def describe_reward(name: str) -> str:
    """First line of a reward's docstring (loads its entry point; a plugin that fails to load says so)."""
    try:
        doc = inspect.getdoc(reward_object(name))
    except RewardPluginError as err:
        return f"(fails to load: {err})"
    return doc.splitlines()[0] if doc else ""


def get_reward(name: str, **kwargs: Any) -> Reward:
    """Instantiate a reward by name with keyword arguments; protocol arguments (``device``,
    ``batch_size``, ``timeout_s``) are set on the instance. Unknown names list the available ones;
    unknown arguments list the accepted ones."""
    if name.startswith(REMOTE_PREFIX):
        from rewards.remote import RemoteReward

        return _with_protocol_args(RemoteReward(name, **_plugin_args(RemoteReward, name, kwargs, skip=1)), kwargs)
    obj = reward_object(name)
    if inspect.isclass(obj):
        reward = obj(**_plugin_args(obj, name, kwargs))
        if not getattr(reward, "name", None):
            reward.name = name
    elif callable(obj):
        params = _plugin_args(obj, name, kwargs, skip=3)
        reward = FunctionReward(
            obj,
            getattr(obj, "reward_name", name),
            kwargs=params,
            device=getattr(obj, "device", "cpu"),
            batch_size=getattr(obj, "batch_size", None),
        )
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
        raise ValueError(
            f"reward {name!r}: unknown argument {unknown[0]!r}; accepted: "
            f"{', '.join(dict.fromkeys(accepted + list(PROTOCOL_ARGS)))}"
        )
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


def build_rewards(specs: Sequence[RewardSpec]) -> list[Reward]:
    """Instantiate each spec's reward with its args (what training and reward workers call)."""
    check_reward_specs(specs)
    return [get_reward(s.name, **dict(s.args)) for s in specs]

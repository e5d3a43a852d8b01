"""The typed list items of the configs, and the one parser of each list kind (docs/config.md).

* rewards (``rewards``, ``steering.weights``): ``[{name, weight, args}]`` → :class:`RewardSpec`;
* modifiers (``sampler.modifiers``): ``[{name, args}]`` → :class:`ModifierSpec`.

The old short forms are still read, here and nowhere else, with a one-line
:class:`~align.config.ConfigDeprecation` note (once per process and kind):

* rewards: ``"name:weight"`` (the weight is the text after the last ':' unless it holds a '/', so
  ``remote:http://host:8000/clip:0.5`` reads as name + weight) plus a separate ``reward_args``
  mapping name → arguments;
* modifiers: ``"name"``, ``"name:{key:value,...}"`` and the one-key mapping ``{name: {key: value}}``.

Torch-free (config phase 1): the names are checked against the registries by their owners
(``rewards.registry.check_reward_specs``, ``align.modifiers.protocol.build_modifiers``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Mapping, Optional, Sequence

import yaml

from align.config import ConfigDeprecation, spaced_flow_colons


@dataclasses.dataclass
class RewardSpec:
    """One reward of the run: its registry name, weight w_k in Σ_k w_k R_k, and keyword arguments."""

    name: str
    weight: float = 1.0
    args: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ModifierSpec:
    """One sampling-policy modifier: its registry name and the arguments of its dataclass."""

    name: str
    args: dict = dataclasses.field(default_factory=dict)


_NOTED: set[str] = set()
REWARD_KEYS = ("name", "weight", "args")
MODIFIER_KEYS = ("name", "args")


def _note(kind: str, message: str) -> None:
    """The deprecation note of an old form, once per process and ``kind``."""
    if kind not in _NOTED:
        _NOTED.add(kind)
        warnings.warn(message, ConfigDeprecation, stacklevel=4)


def _items(items: Any) -> list:
    if items is None:
        return []
    return [items] if isinstance(items, (str, Mapping, RewardSpec, ModifierSpec)) else list(items)


def _args(where: str, args: Any) -> dict:
    if args is None:
        return {}
    if not isinstance(args, Mapping):
        raise ValueError(f"{where}.args must be a mapping of keyword arguments, got {args!r}")
    return dict(args)


def _typed(where: str, item: Mapping, keys: Sequence[str]) -> dict:
    unknown = sorted(set(map(str, item)) - set(keys))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(keys)}")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: 'name' must be a non-empty string, got {name!r}")
    return {"name": name.strip(), "args": _args(where, item.get("args"))}


def split_name_weight(text: str) -> tuple[str, str]:
    """``"name:weight"`` → ``(name, weight text)`` ('' when there is no weight); a ':' followed by
    text with a '/' belongs to a remote URL, not to a weight."""
    head, sep, tail = str(text).rpartition(":")
    return (head.strip(), tail.strip()) if sep and "/" not in tail and head != "remote" else (str(text).strip(), "")


def _weight(where: str, value: Any) -> float:
    if isinstance(value, bool) or value is None or value == "":
        raise ValueError(f"{where}: weight {value!r} is not a number")
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: weight {value!r} is not a number") from None
    if not math.isfinite(weight):
        raise ValueError(f"{where}: the weight must be finite, got {value}")
    return weight


def parse_rewards(
    items: Any, reward_args: Optional[Mapping] = None, where: str = "rewards", note: bool = True
) -> list[RewardSpec]:
    """Config items (typed ``{name, weight, args}``, :class:`RewardSpec`, or old ``"name:weight"``)
    plus the old ``reward_args`` mapping (merged into each named reward's args; its values win, so
    ``reward_args.NAME.KEY=VALUE`` overrides still set them) → specs. Names must be unique.
    ``note=False`` reads an old form silently (a stored run's config)."""
    specs = []
    for i, item in enumerate(_items(items)):
        at = f"{where}[{i}]"
        if isinstance(item, RewardSpec):
            item = dataclasses.asdict(item)
        if isinstance(item, Mapping):
            base = _typed(at, item, REWARD_KEYS)
            specs.append(RewardSpec(base["name"], _weight(at, item.get("weight", 1.0)), base["args"]))
        elif isinstance(item, str):
            if note:
                _note(
                    "rewards",
                    f"{where}: the 'name:weight' form is deprecated; write {where}: "
                    "[{name: NAME, weight: W, args: {...}}] (docs/config.md)",
                )
            name, weight = split_name_weight(item)
            if not name:
                raise ValueError(f"{at} {item!r}: the name is empty")
            specs.append(RewardSpec(name, _weight(f"{at} {item!r}", weight) if weight else 1.0))
        else:
            raise ValueError(f"{at}: expected {{name, weight, args}} or 'name:weight', got {item!r}")
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{where}: reward {twice[0]!r} is listed twice")
    if reward_args:
        if not isinstance(reward_args, Mapping):
            raise ValueError(f"reward_args must be a mapping name -> arguments, got {reward_args!r}")
        if note:
            _note(
                "reward_args",
                "reward_args is deprecated; give each reward its args in "
                "rewards: [{name, weight, args}] (docs/config.md)",
            )
        for key, args in reward_args.items():
            if key not in names:
                raise ValueError(f"reward_args.{key}: {key!r} is not in rewards {names}")
            spec = specs[names.index(key)]
            spec.args = {**spec.args, **_args(f"reward_args.{key}", args)}
    return specs


def parse_modifiers(items: Any, where: str = "sampler.modifiers") -> list[ModifierSpec]:
    """Config items (typed ``{name, args}``, :class:`ModifierSpec`, or the old ``"name"``,
    ``"name:{key:value}"``, ``{name: {key: value}}``) → specs, in list order."""
    specs = []
    for i, item in enumerate(_items(items)):
        at = f"{where}[{i}]"
        if isinstance(item, ModifierSpec):
            specs.append(ModifierSpec(item.name, dict(item.args)))
        elif isinstance(item, Mapping) and "name" in item:
            specs.append(ModifierSpec(**_typed(at, item, MODIFIER_KEYS)))
        elif isinstance(item, Mapping) and len(item) == 1:
            _note(
                "modifiers",
                f"{where}: the {{name: {{args}}}} form is deprecated; write {where}: "
                "[{name: NAME, args: {...}}] (docs/modifiers.md)",
            )
            name, args = next(iter(item.items()))
            specs.append(ModifierSpec(str(name), _args(f"{at} ({name})", args)))
        elif isinstance(item, str):
            _note(
                "modifiers",
                f"{where}: the 'name:{{key:value}}' form is deprecated; write {where}: "
                "[{name: NAME, args: {...}}] (docs/modifiers.md)",
            )
            specs.append(_modifier_string(at, item))
        else:
            raise ValueError(f"{at}: expected {{name, args}}, got {item!r}")
    return specs


def _modifier_string(where: str, text: str) -> ModifierSpec:
    """``"name"`` or ``"name:{key:value,...}"`` (YAML flow once the spaces after ':' are inserted)."""
    name, sep, rest = text.strip().partition(":")
    name = name.strip()
    if not name.isidentifier() or (sep and not rest.strip().startswith("{")):
        raise ValueError(f"{where}: {text!r} does not read 'name' or 'name:{{key:value,...}}'")
    if not sep:
        return ModifierSpec(name)
    try:
        args = yaml.safe_load(spaced_flow_colons(rest.strip()))
    except yaml.YAMLError:
        raise ValueError(f"{where}: modifier {name!r}: cannot parse args {rest!r}; write {{key:value,...}}") from None
    return ModifierSpec(name, _args(f"{where} ({name})", args))


def reward_args_of(specs: Sequence[RewardSpec], name: str) -> Optional[dict]:
    """The args of reward ``name`` in ``specs`` (None if it is not listed): what ``reward_args[name]`` was."""
    return next((dict(s.args) for s in specs if s.name == name), None)

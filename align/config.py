"""Dataclass configs: YAML loading, dotted command-line overrides, validation with one-line errors.

A config is a plain ``@dataclass`` tree. Fields may carry metadata:

* ``help``: one line shown by ``align <cmd> --show-config`` and in the docs;
* ``choices``: the valid values (checked after loading), or a function returning them: the names in
  a registry, checked in phase two (it may import torch);
* ``path``: ``"file"`` or ``"dir"``: the value, when set, must exist on disk.

Loading merges, in order: the dataclass defaults, an optional YAML file, then ``key.sub=value``
overrides (OmegaConf does the typed merge; we only translate its errors into one line that names
the key and the valid choices). An unknown key, a wrong type, a bad choice or a missing path raises
:class:`ConfigError` before any heavy work starts.

Validation runs in two phases over the whole tree (docs/config.md): first every cheap check
(``choices``, ``path`` and each dataclass's ``validate()``, which must not import torch or load
anything), then each dataclass's optional ``check_registries()`` (checks against a registry: reward
signatures, modifier names, presets; these may import torch but never load a model). So a bad
number fails in well under 2 s, before any heavy import.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Sequence, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config value. The message is one line naming the key and what is valid."""


class ConfigWarning(UserWarning):
    """A setting that is accepted but has no effect (e.g. ``critic.*`` with a critic-free algorithm)."""


class ConfigDeprecation(ConfigWarning, DeprecationWarning):
    """An old config form that is still read (align/config_lists.py); shown as one line by the CLI."""


def field(
    default: Any = dataclasses.MISSING,
    *,
    help: str = "",
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
    path: str | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with help text, optional choices (values, or a function returning a registry's
    names) and an optional must-exist path kind."""
    meta = {"help": help, "choices": choices if callable(choices) or choices is None else tuple(choices), "path": path}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def load_config(schema: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``schema`` from its defaults, an optional YAML file and dotted ``key=value`` overrides."""
    base = OmegaConf.structured(schema)
    layers = [base]
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        layers.append(_load_mapping(path))
        aliases: dict[str, str] = getattr(schema, "ALIASES", {})
        for alias in [k for k in layers[-1] if k in aliases]:  # a top-level alias key in the YAML
            OmegaConf.update(layers[-1], aliases[alias], layers[-1].pop(alias), force_add=True)
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key.sub=value")
    if overrides:
        layers.append(_dotlist(_unalias(schema, overrides)))
    try:
        merged = OmegaConf.merge(*layers)
        obj = OmegaConf.to_object(merged)  # runs each dataclass's __post_init__ (typed lists: config_lists)
    except OmegaConfBaseException as err:
        raise _translate(err, schema) from None
    except ValueError as err:
        raise err if isinstance(err, ConfigError) else ConfigError(f"config: {err}") from None
    validate(obj)
    return obj  # type: ignore[return-value]


def _load_mapping(path: str | os.PathLike) -> Any:
    """The YAML (or JSON) file at ``path`` as an OmegaConf mapping; a syntax error or a file that is
    not a mapping (a list, a scalar) is a one-line :class:`ConfigError` naming the file."""
    try:
        data = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or " ".join(str(err).split())
        raise ConfigError(f"config file {path}: not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path}: cannot be read ({err})") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"config file {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"config file {path}: expected a mapping of config keys (key: value), got a list")
    return data


def _unalias(schema: type, overrides: Sequence[str]) -> list[str]:
    """Rewrite overrides whose key is one of the schema's ``ALIASES`` (a class attribute mapping a short
    top-level key to its dotted home, e.g. ``modifiers`` → ``sampler.modifiers``)."""
    aliases: dict[str, str] = getattr(schema, "ALIASES", {})
    out = []
    for item in overrides:
        key, _, value = item.partition("=")
        head, dot, rest = key.partition(".")
        out.append(f"{aliases[head]}{dot}{rest}={value}" if head in aliases else item)
    return out


def validate(cfg: Any, prefix: str = "") -> None:
    """Both phases over the tree: every cheap check first (:func:`validate_values`), then every
    ``check_registries()`` hook (:func:`check_registries`)."""
    validate_values(cfg, prefix)
    check_registries(cfg, prefix)


def validate_values(cfg: Any, prefix: str = "") -> None:
    """Check ``choices`` and ``path`` metadata recursively, then call ``cfg.validate()`` if defined."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate_values(value, key + ".")
            continue
        _check_choice(key, value, f.metadata.get("choices"), registry=False)
        kind = f.metadata.get("path")
        if kind and value not in (None, ""):
            exists = os.path.isdir(value) if kind == "dir" else os.path.isfile(value)
            if not exists:
                raise ConfigError(f"config key '{key}': {kind} not found: {value}")
    _call_hook(cfg, "validate", prefix)


def check_registries(cfg: Any, prefix: str = "") -> None:
    """Phase two: each dataclass's ``check_registries()`` (children first), a ValueError as one line."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_registries(value, f"{prefix}{f.name}.")
        else:
            _check_choice(f"{prefix}{f.name}", value, f.metadata.get("choices"), registry=True)
    _call_hook(cfg, "check_registries", prefix)


def _check_choice(key: str, value: Any, choices: Any, registry: bool) -> None:
    """Fixed choices in phase one, a registry's names (``choices`` is a function) in phase two."""
    if choices is None or callable(choices) != registry:
        return
    valid = tuple(choices()) if registry else choices
    if value not in valid:
        raise ConfigError(f"config key '{key}' = {value!r} is not valid; choose one of: " + ", ".join(map(str, valid)))


def _call_hook(cfg: Any, name: str, prefix: str) -> None:
    hook = getattr(cfg, name, None)
    if callable(hook):
        try:
            hook()
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(f"config '{prefix.rstrip('.') or type(cfg).__name__}': {err}") from None


def to_dict(cfg: Any) -> dict:
    """A plain-dict view (for JSON run records and logging)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def describe(schema: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) rows for every leaf field, for ``--show-config`` and docs."""
    rows: list[tuple[str, str, str]] = []
    inst = schema()
    for f in dataclasses.fields(inst):
        value = getattr(inst, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(type(value), f"{prefix}{f.name}.")
            continue
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if choices:
            help_text += " (choices: " + ", ".join(map(str, choices() if callable(choices) else choices)) + ")"
        rows.append((f"{prefix}{f.name}", repr(value), help_text))
    return rows


#: a ':' glued to what follows, as in the compact list form ``[name:{key:value}]`` (YAML flow needs ': ')
_GLUED_COLON = re.compile(r":(?=[\w{\[\"'-])")


def spaced_flow_colons(text: str) -> str:
    """``[stayfair:{alpha:5}]`` → ``[stayfair: {alpha: 5}]``: the space YAML flow needs after each ':'
    (a ':' before '/' stays, so ``http://host`` survives). The one repair of compact list text."""
    return _GLUED_COLON.sub(": ", text)


def _dotlist(overrides: Sequence[str]) -> Any:
    """OmegaConf's dot-list, one override at a time so that a parse error names its override. A
    value that is invalid YAML only because its colons lack the space YAML flow needs (the compact
    ``sampler.modifiers=[stayfair:{alpha:5}]``) is read with the spaces inserted."""
    confs = []
    for item in overrides:
        try:
            confs.append(OmegaConf.from_dotlist([item]))
        except yaml.YAMLError as err:
            key, value = item.split("=", 1)
            try:
                confs.append(OmegaConf.from_dotlist([f"{key}={spaced_flow_colons(value)}"]))
            except yaml.YAMLError:
                reason = " ".join(str(err).split())
                raise ConfigError(f"override {item!r}: the value is not valid YAML ({reason})") from None
    return OmegaConf.merge(*confs)


def _valid_keys(schema: type, dotted_parent: str) -> list[str]:
    """The field names under ``dotted_parent`` ('' for the root) of ``schema``."""
    node: Any = schema
    for part in [p for p in dotted_parent.split(".") if p]:
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return []
        f = fields[part]
        node = f.type if isinstance(f.type, type) else type(getattr(node(), part))
        if not dataclasses.is_dataclass(node):
            return []
    return [f.name for f in dataclasses.fields(node)]


def _translate(err: OmegaConfBaseException, schema: type) -> ConfigError:
    full_key = str(getattr(err, "full_key", "") or "")
    if isinstance(err, ConfigKeyError) or "Key '" in str(err) and "not in" in str(err):
        parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
        valid = _valid_keys(schema, parent)
        where = f" under '{parent}'" if parent else ""
        return ConfigError(f"unknown config key '{full_key}'; valid keys{where}: " + ", ".join(valid))
    if isinstance(err, ValidationError):
        first = str(err).splitlines()[0]
        return ConfigError(f"config key '{full_key}': {first}")
    return ConfigError(f"config error at '{full_key}': {str(err).splitlines()[0]}")

"""One place that turns known errors into one line for the command line (exit code 2).

The CLI (:func:`align.cli.main`) catches every exception of a job and asks :func:`one_line` for a
message. A known error (bad input: a config value, a file, a plugin, a base that does not fit)
gets one line naming the key or file; anything else is a bug and keeps its traceback. ``--debug``
shows the traceback of a known error too.

Known errors are:

* the project's own classes: :class:`align.config.ConfigError` (and its subclasses
  :class:`CheckpointError`, :class:`RunMismatchError`), ``critics.CriticLoadError``,
  ``rewards.RewardError``;
* library errors whose cause is the input, not the code: YAML syntax errors, ``OSError`` with a file
  name or from the Hugging Face hub (missing/uncached files), safetensors' "header too large" /
  "incomplete metadata" (a truncated file), JSON decode errors, and torch's ``load_state_dict`` size
  mismatches (weights made for another base; the ~100 lines are cut to the first one).

This module imports nothing heavy: a library's error class is looked up only if the library is
already imported (an error of a library cannot be raised before it is).
"""

from __future__ import annotations

import json
import sys
from typing import Callable, Optional

from align.config import ConfigError

#: exit code of every known (input) error, as argparse uses for bad arguments
EXIT_BAD_INPUT = 2


class CheckpointError(ConfigError):
    """A checkpoint or saved tensor file is missing, truncated or corrupt; the message names the file."""


class RunMismatchError(ConfigError):
    """``--resume`` with settings that define another run (other base, rank, algorithm, ...)."""


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _class_from(module: str, name: str) -> Optional[type]:
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return cls if isinstance(cls, type) else None


def _own(err: BaseException) -> Optional[str]:
    """The project's error classes: their messages are already one line naming the key/file."""
    own = [ConfigError] + [
        c
        for c in (
            _class_from("critics.export", "CriticLoadError"),
            _class_from("rewards.registry", "RewardError"),
            _class_from("rewards.registry", "RewardPluginError"),
        )
        if c is not None
    ]
    return _first_line(str(err)) if isinstance(err, tuple(own)) else None


def _yaml(err: BaseException) -> Optional[str]:
    yaml_error = _class_from("yaml", "YAMLError")
    if yaml_error is None or not isinstance(err, yaml_error):
        return None
    return "not valid YAML: " + " ".join(str(err).split())


def _state_dict_mismatch(err: BaseException) -> Optional[str]:
    """torch's ``Error(s) in loading state_dict`` / peft's ``size mismatch``: weights of another base."""
    text = str(err)
    if not isinstance(err, RuntimeError) or ("size mismatch" not in text and "loading state_dict" not in text):
        return None
    lines = [
        line.strip()
        for line in text.splitlines()
        if "size mismatch" in line or "Missing key" in line or "Unexpected key" in line
    ]
    first = lines[0] if lines else _first_line(text)
    count = sum("size mismatch" in line for line in text.splitlines())
    more = f" (and {count - 1} more)" if count > 1 else ""
    return f"weights do not fit this model (made for another base or other settings?): {first[:300]}{more}"


def _safetensors(err: BaseException) -> Optional[str]:
    cls = _class_from("safetensors", "SafetensorError") or _class_from(
        "safetensors._safetensors_rust", "SafetensorError"
    )
    if cls is None or not isinstance(err, cls):
        return None
    return f"corrupt or truncated safetensors file: {_first_line(str(err))}"


def _json(err: BaseException) -> Optional[str]:
    return f"not valid JSON: {err}" if isinstance(err, json.JSONDecodeError) else None


def _os(err: BaseException) -> Optional[str]:
    """Missing files, permissions, uncached hub ids, ports in use: the message names the file/port."""
    if not isinstance(err, OSError):
        return None
    if getattr(err, "filename", None):
        return f"{err.strerror or _first_line(str(err))}: {err.filename}"
    return _first_line(str(err)) or type(err).__name__


#: matchers in order; the first that returns a line wins
MATCHERS: list[Callable[[BaseException], Optional[str]]] = [_own, _yaml, _safetensors, _json, _state_dict_mismatch, _os]


def one_line(err: BaseException) -> Optional[str]:
    """The one-line message of a known error; ``None`` for anything else (a bug: show the traceback)."""
    for match in MATCHERS:
        line = match(err)
        if line is not None:
            return line
    return None

"""``model:`` section of every job config, and what can be known of a source without loading it.

Torch-free, so that a bad ``model.source`` (an empty directory, garbage, an uncached hub id) is a
one-line config error in well under a second. :func:`source_kind` reads the backbone family
(``unet``, ``dit``, ``sdxl``: align/backbones/registry.py) from ``model_index.json`` (a directory,
the shipped toy, a cached hub id) or from a preset builder's return annotation, without loading
weights: validation uses it to check the noise parameter of the family that will actually load
(``sampler.eta`` for DDIM, ``sampler.noise_level`` for the flow SDE). :mod:`align.backbones.model_config` re-exports
:class:`ModelConfig` and holds ``load_model``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Optional

from align.backbones.registry import BACKBONES, kind_of_pipeline, supported
from align.config import field


def backbone_kinds() -> list:
    """``model.kind``'s choices: None or a family of the torch-free registry (align/backbones/registry.py)."""
    return [None, *BACKBONES]


#: weights dtypes (= align.backbones.model_config.DTYPES keys)
DTYPE_NAMES = ("float32", "bfloat16", "float16")
PRESET_PREFIX = "preset:"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclasses.dataclass
class ModelConfig:
    """Which backbone to load."""

    source: str = field(
        "toy", help="'toy' (the shipped toy model), 'preset:<name>', a save_pretrained dir, or a hub id"
    )
    kind: Optional[str] = field(None, choices=backbone_kinds, help="expected backbone family (checked)")
    dtype: str = field("float32", choices=list(DTYPE_NAMES), help="weights dtype (bfloat16 on GPUs)")
    device: str = field("cpu", help="torch device")
    allow_download: bool = field(False, help="let hub ids download (default: local HF cache only)")

    def validate(self) -> None:
        """The source exists (directory with a readable model_index.json, cached hub id), torch-free."""
        kind = source_kind(self.source, self.allow_download)
        if self.kind in BACKBONES and kind is not None and kind != self.kind:
            raise ValueError(f"source {self.source!r} is a {kind} backbone, but kind={self.kind!r} was asked for")

    def check_registries(self) -> None:
        """A ``preset:<name>`` must name a registered preset (imports the preset registry, builds nothing)."""
        if self.source.startswith(PRESET_PREFIX):
            try:
                preset_kind(self.source[len(PRESET_PREFIX) :])
            except ValueError as err:
                raise ValueError(f"source {self.source!r}: {err}") from None


def looks_like_path(source: str) -> bool:
    """Existing paths, and anything that is not of the hub-id form ``org/name``."""
    return (
        os.path.exists(os.path.expanduser(source)) or source.startswith((os.sep, ".", "~")) or not _HUB_ID.match(source)
    )


def source_kind(source: str, allow_download: bool = False) -> Optional[str]:
    """The backbone family of a source (``'unet'``, ``'dit'``, ``'sdxl'``), read without loading weights;
    ``None`` where that needs the preset registry (:func:`preset_kind`) or a download. A source that
    cannot load is a ValueError naming it (``model.source ...``)."""
    from align.toy import SHIPPED_PIPELINE_DIR, TOY_SOURCE_ALIAS

    if not source or not source.strip():
        raise ValueError("source is empty; use 'toy', 'preset:<name>', a save_pretrained directory or a hub id")
    if source == TOY_SOURCE_ALIAS:
        return _index_kind(
            str(SHIPPED_PIPELINE_DIR), "the shipped toy model (regenerate it with `align toy pretrain ship=true`)"
        )
    if source.startswith(PRESET_PREFIX):
        return None
    if looks_like_path(source):
        path = os.path.expanduser(source)
        if not os.path.isdir(path):
            raise ValueError(f"source {source!r}: no such directory (and not a hub id of the form org/name)")
        return _index_kind(path, repr(source))
    return _hub_kind(source, allow_download)


def preset_kind(name: str) -> Optional[str]:
    """A registered preset's kind from its builder's return annotation; unknown names list the valid ones."""
    from align.backbones.presets import PRESETS

    if name not in PRESETS:
        raise ValueError(f"unknown backbone preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    returns = getattr(PRESETS[name], "__annotations__", {}).get("return")
    return kind_of_pipeline(returns if isinstance(returns, str) else getattr(returns, "__name__", ""))


def _index_kind(directory: str, what: str) -> Optional[str]:
    index = os.path.join(directory, "model_index.json")
    if not os.path.isfile(index):
        raise ValueError(
            f"source {what}: {directory} has no model_index.json (not a save_pretrained pipeline directory)"
        )
    return _kind_of_index(index, what)


def _kind_of_index(index: str, what: str) -> Optional[str]:
    try:
        with open(index, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"source {what}: {index} is not a readable model_index.json ({err})") from None
    if not isinstance(data, dict) or "_class_name" not in data:
        raise ValueError(f"source {what}: {index} has no _class_name (not a diffusers model_index.json)")
    name = data["_class_name"]
    kind = kind_of_pipeline(str(name))
    if kind is None:
        raise ValueError(f"source {what}: pipeline class {name!r} is not supported; supported: {supported()}")
    return kind


def _hub_kind(repo_id: str, allow_download: bool) -> Optional[str]:
    """A hub id's kind from its cached model_index.json; uncached is an error unless downloads are allowed."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "model_index.json")
    if isinstance(cached, str) and os.path.isfile(cached):
        return _kind_of_index(cached, repr(repo_id))
    if allow_download:
        return None
    raise ValueError(
        f"source {repo_id!r}: not a local directory and not in the local HF cache; download it "
        "first, or set model.allow_download=true"
    )


def resolve_source(source: str) -> str:
    """Expand the ``toy`` alias to the packaged pipeline directory."""
    from align.toy import SHIPPED_PIPELINE_DIR, TOY_SOURCE_ALIAS

    if source == TOY_SOURCE_ALIAS:
        if not (SHIPPED_PIPELINE_DIR / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the shipped toy model is missing from {SHIPPED_PIPELINE_DIR}; "
                "regenerate it with `align toy pretrain ship=true`"
            )
        return str(SHIPPED_PIPELINE_DIR)
    return source

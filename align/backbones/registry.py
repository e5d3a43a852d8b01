"""The backbone families, by name: one torch-free entry each (the registry of the backbone extension point).

An entry says what config validation must know before anything loads (which diffusers pipeline class a
``model_index.json`` names, and which sampler knob makes the family's step stochastic) and where its
:class:`~align.backbones.adapter.Backbone` adapter lives (imported only when a pipeline of that family
is used). Adding a family is one adapter file plus one entry here, or :func:`register_backbone` from a
plugin before the config is validated.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Optional


@dataclasses.dataclass(frozen=True)
class BackboneEntry:
    """One backbone family."""

    kind: str  #: its name in configs (``model.kind``), critic cards and error messages
    pipeline: str  #: the diffusers pipeline class, as ``model_index.json``'s ``_class_name`` names it
    noise_param: str  #: the sampler knob of its stochastic step: ``eta`` (DDIM) or ``noise_level`` (flow SDE)
    adapter: str  #: ``module:Class`` of its :class:`~align.backbones.adapter.Backbone` subclass

    def adapter_class(self) -> type:
        module, _, name = self.adapter.partition(":")
        return getattr(importlib.import_module(module), name)


BACKBONES: dict[str, BackboneEntry] = {}


def register_backbone(entry: BackboneEntry) -> BackboneEntry:
    """Add a family; a kind or pipeline class that is already registered is an error."""
    for other in BACKBONES.values():
        if entry.kind == other.kind or entry.pipeline == other.pipeline:
            raise ValueError(f"backbone {entry.kind!r} ({entry.pipeline}) clashes with registered {other}")
    if entry.noise_param not in ("eta", "noise_level"):
        raise ValueError(
            f"backbone {entry.kind!r}: noise_param must be 'eta' or 'noise_level', not {entry.noise_param!r}"
        )
    BACKBONES[entry.kind] = entry
    return entry


for _entry in (
    BackboneEntry("unet", "StableDiffusionPipeline", "eta", "align.backbones.sd15:SD15Backbone"),
    BackboneEntry("dit", "StableDiffusion3Pipeline", "noise_level", "align.backbones.sd3:SD3Backbone"),
    BackboneEntry("sdxl", "StableDiffusionXLPipeline", "eta", "align.backbones.sdxl:SDXLBackbone"),
):
    register_backbone(_entry)


def kind_of_pipeline(class_names: list[str] | tuple[str, ...] | str) -> Optional[str]:
    """The family of a pipeline class, given its name or its MRO's names (first match); None if unsupported."""
    names = [class_names] if isinstance(class_names, str) else class_names
    by_pipeline = {e.pipeline: e.kind for e in BACKBONES.values()}
    return next((by_pipeline[n] for n in names if n in by_pipeline), None)


def supported() -> str:
    """``unet (StableDiffusionPipeline), …`` for error messages."""
    return ", ".join(f"{e.kind} ({e.pipeline})" for e in BACKBONES.values())

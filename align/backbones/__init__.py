"""Backbones: the family adapters (SD1.5-class UNet, SDXL-class UNet, SD3-class DiT), pipeline loading and named
LoRA adapters.

The names below load lazily (PEP 562), so that the torch-free registry (:mod:`align.backbones.registry`) can
be read by config validation without importing diffusers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "adapter": ("Backbone", "backbone", "backbone_kind", "denoiser"),
    "loading": ("build_pipeline",),
    "lora": (
        "active_adapters",
        "adapter_names",
        "adapters_active",
        "adapters_disabled",
        "attach_lora",
        "load_lora_state_dict",
        "lora_num_bytes",
        "lora_state_dict",
        "set_active_adapters",
        "set_trainable",
    ),
    "presets": ("PRESETS", "build_preset", "register_preset"),
    "registry": ("BACKBONES", "BackboneEntry", "register_backbone"),
    "tokenizer": ("toy_tokenizer", "write_clip_tokenizer"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'align.backbones' has no attribute {name!r}")
    return getattr(importlib.import_module(f"align.backbones.{_MODULE_OF[name]}"), name)

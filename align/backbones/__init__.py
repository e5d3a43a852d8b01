"""Backbones: build SD1.5-class (UNet) and SD3-class (DiT) pipelines; named LoRA adapters."""

from align.backbones.loading import BACKBONES, backbone_kind, build_pipeline, denoiser
from align.backbones.lora import (
    active_adapters,
    adapter_names,
    adapters_active,
    adapters_disabled,
    attach_lora,
    load_lora_state_dict,
    lora_num_bytes,
    lora_state_dict,
    set_active_adapters,
    set_trainable,
)
from align.backbones.presets import PRESETS, build_preset, register_preset
from align.backbones.tokenizer import toy_tokenizer, write_clip_tokenizer

__all__ = [
    "BACKBONES",
    "PRESETS",
    "active_adapters",
    "adapter_names",
    "adapters_active",
    "adapters_disabled",
    "attach_lora",
    "backbone_kind",
    "build_pipeline",
    "build_preset",
    "denoiser",
    "load_lora_state_dict",
    "lora_num_bytes",
    "lora_state_dict",
    "register_preset",
    "set_active_adapters",
    "set_trainable",
    "toy_tokenizer",
    "write_clip_tokenizer",
]

"""Build a pipeline from ``preset:<name>``, a local ``save_pretrained`` directory, or a hub id.

Nothing is downloaded unless ``allow_download`` is set: hub ids resolve from the local HF cache
(``local_files_only=True``) and fail with a one-line error otherwise.
"""
from __future__ import annotations

import os
import re

import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

from align.backbones.presets import build_preset

#: Backbone kinds and their pipeline classes: UNet/SD1.5-class and DiT/SD3-class.
BACKBONES: dict[str, type[DiffusionPipeline]] = {"unet": StableDiffusionPipeline,
                                                 "dit": StableDiffusion3Pipeline}
PRESET_PREFIX = "preset:"


def backbone_kind(pipe: DiffusionPipeline) -> str:
    """'unet' or 'dit' for a supported pipeline; a clear error for anything else."""
    for kind, cls in BACKBONES.items():
        if isinstance(pipe, cls):
            return kind
    raise TypeError(f"unsupported pipeline class {type(pipe).__name__}; supported: "
                    + ", ".join(f"{k} ({c.__name__})" for k, c in BACKBONES.items()))


def denoiser(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The network that LoRA adapts and the sampler calls: ``pipe.unet`` or ``pipe.transformer``."""
    return pipe.unet if backbone_kind(pipe) == "unet" else pipe.transformer


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _looks_like_path(source: str) -> bool:
    """Existing paths, and anything that is not of the hub-id form ``org/name``."""
    return os.path.exists(os.path.expanduser(source)) or source.startswith((os.sep, ".", "~")) \
        or not _HUB_ID.match(source)


def build_pipeline(source: str, *, kind: str | None = None, torch_dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", allow_download: bool = False,
                   **preset_kwargs) -> DiffusionPipeline:
    """Load or build a pipeline (see module docstring); ``kind`` ('unet'|'dit') is checked if given."""
    if kind is not None and kind not in BACKBONES:
        raise ValueError(f"unknown backbone kind {kind!r}; valid kinds: {', '.join(BACKBONES)}")
    if source.startswith(PRESET_PREFIX):
        pipe = build_preset(source[len(PRESET_PREFIX):], **preset_kwargs)
    elif _looks_like_path(source):
        path = os.path.expanduser(source)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"pipeline directory not found: {source}")
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(f"{source} has no model_index.json (not a save_pretrained pipeline)")
        pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=torch_dtype, **_sd_kwargs(path))
    else:
        try:
            pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=torch_dtype,
                                                     local_files_only=not allow_download)
        except (OSError, ValueError) as err:
            hint = "" if allow_download else (" (not a local directory and not in the local HF cache; "
                                              "set model.allow_download=true to fetch it)")
            raise OSError(f"cannot load hub id {source!r}{hint}: {str(err).splitlines()[0]}") from None
    actual = backbone_kind(pipe)
    if kind is not None and actual != kind:
        raise ValueError(f"{source!r} is a {actual} backbone ({type(pipe).__name__}), but kind={kind!r} was asked for")
    pipe = pipe.to(device)
    if source.startswith(PRESET_PREFIX) and torch_dtype != torch.float32:
        pipe = pipe.to(dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd_kwargs(path: str) -> dict:
    """Optional components a local dir may lack: SD's safety checker, SD3's T5 encoder."""
    import json
    index = json.load(open(os.path.join(path, "model_index.json")))
    if index.get("_class_name") == StableDiffusionPipeline.__name__:
        return {"safety_checker": None, "requires_safety_checker": False}
    if index.get("_class_name") == StableDiffusion3Pipeline.__name__:
        return {name: None for name in ("text_encoder_3", "tokenizer_3")
                if index.get(name) in (None, [None, None])}
    return {}

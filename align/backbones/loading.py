"""Build a pipeline from ``preset:<name>``, a local ``save_pretrained`` directory, or a hub id.

Nothing is downloaded unless ``allow_download`` is set: hub ids resolve from the local HF cache
(``local_files_only=True``) and fail with a one-line error otherwise. The family's sampling scheduler
replaces the one a checkpoint ships where they differ (SD1.5's PNDM and SDXL's Euler become DDIM with
the same noise schedule and prediction type: :meth:`~align.backbones.adapter.Backbone.use_sampling_scheduler`).
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from align.backbones.adapter import backbone
from align.backbones.presets import build_preset
from align.backbones.registry import BACKBONES
from align.model_source import PRESET_PREFIX, looks_like_path

logger = logging.getLogger(__name__)
#: Always off when loading SD1.5-class pipelines (the safety checker is a separate, large model).
NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def build_pipeline(
    source: str,
    *,
    kind: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_download: bool = False,
    **preset_kwargs,
) -> DiffusionPipeline:
    """Load or build a pipeline (see module docstring); ``kind`` (a registered family: 'unet', 'dit',
    'sdxl') is checked if given.

    ``preset_kwargs`` (``seed``, sizes, ``prediction_type`` …) go to the preset builder only.
    """
    if kind is not None and kind not in BACKBONES:
        raise ValueError(f"unknown backbone kind {kind!r}; valid kinds: {', '.join(BACKBONES)}")
    if preset_kwargs and not source.startswith(PRESET_PREFIX):
        raise ValueError(f"options {sorted(preset_kwargs)} only apply to 'preset:<name>' sources, not {source!r}")
    if source.startswith(PRESET_PREFIX):
        pipe = build_preset(source[len(PRESET_PREFIX) :], **preset_kwargs)
        if torch_dtype != torch.float32:  # presets are built in fp32
            pipe = pipe.to(dtype=torch_dtype)
    elif looks_like_path(source):
        pipe = _load_dir(source, torch_dtype)
    else:
        pipe = _load_hub(source, torch_dtype, allow_download)
    family = backbone(pipe)
    actual = family.kind
    if kind is not None and actual != kind:
        raise ValueError(f"{source!r} is a {actual} backbone ({type(pipe).__name__}), but kind={kind!r} was asked for")
    replaced = family.use_sampling_scheduler()
    if replaced is not None:
        logger.info(
            "%s: %s replaced by the sampler's %s (same noise schedule)", source, replaced, type(pipe.scheduler).__name__
        )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    """diffusers ≥0.36 renamed ``torch_dtype`` to ``dtype`` (the old name warns)."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def _load_dir(source: str, dtype: torch.dtype) -> DiffusionPipeline:
    path = os.path.expanduser(source)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"pipeline directory not found: {source}")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"{source} has no model_index.json (not a save_pretrained pipeline directory)")
    return _from_pretrained(path, dtype, local_files_only=True)


def _load_hub(source: str, dtype: torch.dtype, allow_download: bool) -> DiffusionPipeline:
    try:
        return _from_pretrained(source, dtype, local_files_only=not allow_download)
    except (OSError, ValueError) as err:
        hint = (
            ""
            if allow_download
            else (
                " (not a local directory and not in the local HF cache; pass "
                "allow_download=True, or model.allow_download=true in a config)"
            )
        )
        raise OSError(f"cannot load hub id {source!r}{hint}: {str(err).splitlines()[0]}") from None


def _from_pretrained(source: str, dtype: torch.dtype, local_files_only: bool) -> DiffusionPipeline:
    """The real diffusers loader, with the safety checker off and absent optional parts (e.g. a
    tiny SD3 without T5, saved as ``[null, null]``) passed as ``None``."""
    with warnings.catch_warnings():  # diffusers still passes a deprecated hf_hub_download argument
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks")
        index = DiffusionPipeline.load_config(source, local_files_only=local_files_only)
    extra = {name: None for name, entry in index.items() if not name.startswith("_") and entry in (None, [None, None])}
    if index.get("_class_name") == StableDiffusionPipeline.__name__:
        extra.update(NO_SAFETY_CHECKER)
    return DiffusionPipeline.from_pretrained(source, **_dtype_kwargs(dtype), local_files_only=local_files_only, **extra)

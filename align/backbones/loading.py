"""Build a pipeline from ``preset:<name>``, a local ``save_pretrained`` directory, or a hub id.

Nothing is downloaded unless ``allow_download`` is set: hub ids resolve from the local HF cache
(``local_files_only=True``) and fail with a one-line error otherwise.
"""

from __future__ import annotations

import os
import re
import warnings

import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

from align.backbones.presets import build_preset

#: Backbone kinds and their pipeline classes: UNet/SD1.5-class and DiT/SD3-class.
BACKBONES: dict[str, type[DiffusionPipeline]] = {"unet": StableDiffusionPipeline, "dit": StableDiffusion3Pipeline}
#: The attribute that holds each kind's denoiser (the network LoRA adapts and samplers call).
DENOISER_ATTR: dict[str, str] = {"unet": "unet", "dit": "transformer"}
#: Always off when loading SD1.5-class pipelines (the safety checker is a separate, large model).
NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
PRESET_PREFIX = "preset:"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def backbone_kind(pipe: DiffusionPipeline) -> str:
    """'unet' or 'dit' for a supported pipeline; a clear error for anything else."""
    for kind, cls in BACKBONES.items():
        if isinstance(pipe, cls):
            return kind
    raise TypeError(
        f"unsupported pipeline class {type(pipe).__name__}; supported: "
        + ", ".join(f"{k} ({c.__name__})" for k, c in BACKBONES.items())
    )


def denoiser(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The network that LoRA adapts and the sampler calls: ``pipe.unet`` or ``pipe.transformer``."""
    return getattr(pipe, DENOISER_ATTR[backbone_kind(pipe)])


def build_pipeline(
    source: str,
    *,
    kind: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_download: bool = False,
    **preset_kwargs,
) -> DiffusionPipeline:
    """Load or build a pipeline (see module docstring); ``kind`` ('unet'|'dit') is checked if given.

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
    elif _looks_like_path(source):
        pipe = _load_dir(source, torch_dtype)
    else:
        pipe = _load_hub(source, torch_dtype, allow_download)
    actual = backbone_kind(pipe)
    if kind is not None and actual != kind:
        raise ValueError(f"{source!r} is a {actual} backbone ({type(pipe).__name__}), but kind={kind!r} was asked for")
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _looks_like_path(source: str) -> bool:
    """Existing paths, and anything that is not of the hub-id form ``org/name``."""
    return (
        os.path.exists(os.path.expanduser(source)) or source.startswith((os.sep, ".", "~")) or not _HUB_ID.match(source)
    )


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

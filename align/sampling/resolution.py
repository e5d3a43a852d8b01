"""The image size a sampler draws at: ``sampler.height``/``sampler.width`` checked against the loaded model.

The cheap check (positive integers) is torch-free in :func:`align.config_checks.check_resolution`; this
one needs the model: a latent side is ``pixels / vae_scale_factor`` and a DiT cuts it into
``patch_size`` patches, so the side must be a multiple of ``vae_scale_factor × patch_size`` (the
pipelines' own ``check_inputs`` rule); an SD3 transformer's position embedding also caps it at
``pos_embed_max_size`` patches. Called after the model loads and before sampling starts.
"""

from __future__ import annotations

from typing import Optional

from align.backbones.adapter import backbone
from align.config import ConfigError


def default_resolution(pipe) -> tuple[int, int]:
    """(height, width) in pixels that the pipeline draws at by default: ``sample_size × vae_scale_factor``."""
    size = backbone(pipe).net.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return h * pipe.vae_scale_factor, w * pipe.vae_scale_factor


def resolve_resolution(pipe, height: Optional[int] = None, width: Optional[int] = None) -> tuple[int, int]:
    """(height, width) in pixels for ``sampler.height``/``sampler.width`` (None: the model's default);
    a one-line :class:`ConfigError` naming the field for a size this model cannot draw."""
    net = backbone(pipe)
    multiple, why = net.resolution_multiple()
    max_patches = net.max_patches()
    out = []
    for name, value, default in zip(("height", "width"), (height, width), default_resolution(pipe)):
        if value is None:
            out.append(default)
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"sampler.{name}={value!r}: must be a positive integer (pixels) or None")
        if value % multiple:
            raise ConfigError(f"sampler.{name}={value}: must be a multiple of {multiple} ({why}) for this model")
        if max_patches is not None and value > max_patches * multiple:
            raise ConfigError(
                f"sampler.{name}={value}: at most {max_patches * multiple} for this model (the "
                f"transformer's pos_embed_max_size {max_patches} patches × {multiple})"
            )
        out.append(value)
    return out[0], out[1]

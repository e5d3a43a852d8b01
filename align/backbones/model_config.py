"""The one function that turns a ``model:`` config into a pipeline; :class:`ModelConfig` itself lives in
the torch-free :mod:`align.model_source` (re-exported here under its old import path)."""

from __future__ import annotations

import torch

from align.backbones.loading import build_pipeline
from align.model_source import ModelConfig, resolve_source

__all__ = ["DTYPES", "ModelConfig", "load_model", "resolve_source"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(cfg: ModelConfig):
    return build_pipeline(
        resolve_source(cfg.source),
        kind=cfg.kind,
        torch_dtype=DTYPES[cfg.dtype],
        device=cfg.device,
        allow_download=cfg.allow_download,
    )

"""The one function that turns a ``model:`` config into a pipeline; :class:`ModelConfig` itself lives in
the torch-free :mod:`align.model_source` (re-exported here under its old import path)."""

from __future__ import annotations

import torch

from align.backbones.loading import build_pipeline
from align.model_source import ModelConfig

__all__ = ["DTYPES", "ModelConfig", "load_model", "resolve_source"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def load_model(cfg: ModelConfig):
    return build_pipeline(
        resolve_source(cfg.source),
        kind=cfg.kind,
        torch_dtype=DTYPES[cfg.dtype],
        device=cfg.device,
        allow_download=cfg.allow_download,
    )

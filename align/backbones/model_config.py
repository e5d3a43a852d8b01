"""``model:`` section of every job config, and the one function that turns it into a pipeline."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from align.backbones.loading import BACKBONES, build_pipeline
from align.config import field

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class ModelConfig:
    """Which backbone to load."""
    source: str = field("toy", help="'toy' (the shipped toy model), 'preset:<name>', a save_pretrained dir, or a hub id")
    kind: Optional[str] = field(None, choices=[None, *BACKBONES], help="expected backbone kind (checked)")
    dtype: str = field("float32", choices=list(DTYPES), help="weights dtype (bfloat16 on GPUs)")
    device: str = field("cpu", help="torch device")
    allow_download: bool = field(False, help="let hub ids download (default: local HF cache only)")


def resolve_source(source: str) -> str:
    """Expand the ``toy`` alias to the packaged pipeline directory."""
    from align.toy import SHIPPED_PIPELINE_DIR, TOY_SOURCE_ALIAS
    if source == TOY_SOURCE_ALIAS:
        if not (SHIPPED_PIPELINE_DIR / "model_index.json").is_file():
            raise FileNotFoundError(f"the shipped toy model is missing from {SHIPPED_PIPELINE_DIR}; "
                                    "regenerate it with `align toy pretrain ship=true`")
        return str(SHIPPED_PIPELINE_DIR)
    return source


def load_model(cfg: ModelConfig):
    return build_pipeline(resolve_source(cfg.source), kind=cfg.kind, torch_dtype=DTYPES[cfg.dtype],
                          device=cfg.device, allow_download=cfg.allow_download)

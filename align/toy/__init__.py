"""The embedded toy text-to-image world (GenEval-shaped scenes of coloured shapes), its detector and tiny model."""

from __future__ import annotations

from pathlib import Path

#: Where the pretrained toy pipeline ships inside the package (``save_pretrained`` layout).
SHIPPED_PIPELINE_DIR = Path(__file__).resolve().parent / "weights"

#: Model-source alias that resolves to the shipped toy pipeline.
TOY_SOURCE_ALIAS = "toy"

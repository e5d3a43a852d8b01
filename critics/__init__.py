"""The state-aligned latent critic: value model, export/load (docs/critic_format.md), steering."""

from critics.export import (
    CriticLoadError,
    LoadedCritic,
    base_fingerprint,
    export_pipeline,
    export_policy,
    load,
)

__all__ = [
    "CriticLoadError",
    "LoadedCritic",
    "base_fingerprint",
    "export_pipeline",
    "export_policy",
    "load",
]

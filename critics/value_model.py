"""The state-aligned latent critic V_k(x_t, t, c) on the shared diffusion backbone (the ECG paper; docs/algorithms.md).

The critic reads the backbone's own features for the same (x_t, t, c) the policy sees: a UNet block's
output (SD1.5, SDXL), or the DiT's final hidden tokens (the input of ``norm_out``), computed with the
``critic`` LoRA adapter active on the frozen base (``adapter: shared`` uses the policy's adapter).
The forward pass stops right after the feature layer (the backbone adapter's hooks,
align/backbones/adapter.py). The ECG paper reads the UNet's mid-block; our UNet default is
``up_blocks.1`` instead (``critic.feature_layer`` chooses; ``mid_block`` is the paper's): on the
toy the mid-block is 4×4, too coarse to see a missing object, and heads on ``up_blocks.1`` explain
about twice the return variance (``benchmarks/critic_toy.py``, docs/benchmarks.md "ECG critic").
Features are pooled (mean + a learned attention pool), concatenated with the backbone's own
timestep embedding, and fed to one small MLP head per reward → values (B, K).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from align.backbones.adapter import FeaturesReady, backbone
from align.backbones.lora import set_active_adapters


def resolve_feature_layer(pipe, feature_layer: Optional[str]) -> str:
    """The denoiser submodule whose output the critic reads (None: the family's default, see the module doc)."""
    net = backbone(pipe)
    layer = feature_layer or net.default_feature_layer
    valid = net.feature_layers()
    if layer not in valid:
        raise ValueError(
            f"critic.feature_layer {layer!r} is not valid for this {type(net.net).__name__}; "
            f"choose one of: {', '.join(valid)}"
        )
    return layer


class FeatureTap:
    """Captures (tokens (B, N, C), temb (B, D)) from the backbone's feature layer during a forward."""

    def __init__(self, pipe, feature_layer: Optional[str] = None) -> None:
        self.backbone = backbone(pipe)
        self.layer = resolve_feature_layer(pipe, feature_layer)
        self.tokens: Optional[torch.Tensor] = None
        self.temb: Optional[torch.Tensor] = None

    @contextlib.contextmanager
    def attached(self) -> Iterator["FeatureTap"]:
        handles = self.backbone.feature_hooks(self.layer, self._on_tokens, self._on_temb)
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _on_temb(self, temb: torch.Tensor) -> None:
        self.temb = temb

    def _on_tokens(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens
        raise FeaturesReady


def critic_target_modules(pipe, feature_layer: Optional[str] = None) -> str:
    """peft regex for the critic adapter: attention projections *upstream* of the feature layer only
    (the UNet's down- and mid-blocks, plus up-blocks 0..N for ``up_blocks.N``; every DiT block),
    since the critic's pass stops there."""
    blocks = backbone(pipe).critic_blocks(resolve_feature_layer(pipe, feature_layer))
    return rf"^{blocks}\..*\.(to_q|to_k|to_v|to_out\.0)$"


def feature_dims(pipe, feature_layer: Optional[str] = None) -> tuple[int, int]:
    """(feature channels C, timestep-embedding width D) of the backbone's feature layer."""
    return backbone(pipe).feature_dims(resolve_feature_layer(pipe, feature_layer))


class ValueHeads(nn.Module):
    """Attention + mean pooling of the features, then one MLP per reward on [pool, temb]."""

    def __init__(self, feature_dim: int, temb_dim: int, reward_names: Sequence[str], hidden: int = 128) -> None:
        super().__init__()
        if not reward_names:
            raise ValueError("ValueHeads needs at least one reward name")
        self.reward_names = list(reward_names)
        self.query = nn.Parameter(torch.zeros(feature_dim))
        self.norm = nn.LayerNorm(2 * feature_dim + temb_dim)
        self.heads = nn.ModuleDict(
            {
                name: nn.Sequential(nn.Linear(2 * feature_dim + temb_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))
                for name in self.reward_names
            }
        )

    def forward(self, tokens: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(tokens @ self.query / math.sqrt(tokens.shape[-1]), dim=1)  # (B, N)
        pooled = torch.cat([tokens.mean(dim=1), (weights[..., None] * tokens).sum(dim=1), temb], dim=-1)
        h = self.norm(pooled)
        return torch.cat([self.heads[name](h) for name in self.reward_names], dim=-1)  # (B, K)


class LatentCritic(nn.Module):
    """V(x_t, t, c) → (B, K) on the pipeline's denoiser with a LoRA adapter active (see module doc)."""

    def __init__(
        self,
        pipe,
        reward_names: Sequence[str],
        adapter: str = "critic",
        hidden: int = 128,
        feature_layer: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.pipe = pipe
        self.adapter = adapter
        self.feature_layer = resolve_feature_layer(pipe, feature_layer)
        self.heads = ValueHeads(*feature_dims(pipe, self.feature_layer), reward_names, hidden)

    @property
    def reward_names(self) -> list[str]:
        return self.heads.reward_names

    def features(self, x_t: torch.Tensor, timestep: torch.Tensor, embeds: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features of (x_t, t, c) under the critic's adapter (conditional branch only)."""
        tap = FeatureTap(self.pipe, self.feature_layer)
        net = tap.backbone.net
        previous = list(net.active_adapters()) if getattr(net, "peft_config", None) else None
        if previous is not None:
            set_active_adapters(self.pipe, [self.adapter])
        t = timestep.expand(x_t.shape[0]) if timestep.ndim == 0 else timestep
        try:
            with tap.attached():
                tap.backbone.call_net(x_t, t, embeds)
        except FeaturesReady:
            pass
        finally:
            if previous is not None:
                set_active_adapters(self.pipe, previous)
        if tap.tokens is None or tap.temb is None:
            raise RuntimeError("critic: the backbone's forward pass never reached the feature layer")
        return tap.tokens, tap.temb

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, embeds: dict) -> torch.Tensor:
        tokens, temb = self.features(x_t, timestep, embeds)
        return self.heads(tokens.float(), temb.float())

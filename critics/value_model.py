"""The state-aligned latent critic V_k(x_t, t, c) on the shared diffusion backbone (ecg_spec.md §2).

The critic reads the backbone's own features for the same (x_t, t, c) the policy sees: the UNet's
mid-block output, or the DiT's final hidden tokens (the input of ``norm_out``), computed with the
``critic`` LoRA adapter active on the frozen base (``adapter: shared`` uses the policy's adapter).
The forward pass stops right after the feature layer. The spec names the UNet's mid-block; our
UNet default is ``up_blocks.1`` instead (``critic.feature_layer`` chooses; ``mid_block`` is the
spec's): on the toy the mid-block is 4×4, too coarse to see a missing object, and heads on frozen
``up_blocks.1`` features (16×16) explained 0.35 of the held-out toy-GenEval return variance over the
chain (0.41–0.47 on the late half) against 0.16 (0.21–0.29) for the mid-block, at the same 0.87 for
the smoother JPEG reward (``benchmarks/critic_toy.py``, docs/benchmarks.md "ECG critic").
Features are pooled (mean + a learned attention pool), concatenated with the backbone's own
timestep embedding, and fed to one small MLP head per reward → values (B, K).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from align.backbones.loading import backbone_kind, denoiser
from align.backbones.lora import set_active_adapters


class _FeaturesReady(Exception):
    """Raised by the feature hook to end the backbone's forward pass early."""


#: The DiT's one feature layer (input of ``norm_out``: the final hidden tokens).
DIT_FEATURE_LAYER = "norm_out"
UNET_FEATURE_LAYERS = ("mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3")
#: Default UNet feature layer (see the module docstring for why it is not the spec's mid-block).
DEFAULT_UNET_FEATURE_LAYER = "up_blocks.1"


def resolve_feature_layer(pipe, feature_layer: Optional[str]) -> str:
    """The denoiser submodule whose output the critic reads (None: ``DEFAULT_UNET_FEATURE_LAYER`` / the
    DiT's final tokens)."""
    if backbone_kind(pipe) != "unet":
        if feature_layer not in (None, DIT_FEATURE_LAYER):
            raise ValueError(f"critic.feature_layer {feature_layer!r}: the DiT critic reads '{DIT_FEATURE_LAYER}' only")
        return DIT_FEATURE_LAYER
    layer = feature_layer or DEFAULT_UNET_FEATURE_LAYER
    n_up = len(denoiser(pipe).up_blocks)
    valid = [name for name in UNET_FEATURE_LAYERS if name == "mid_block" or int(name.rsplit(".", 1)[1]) < n_up]
    if layer not in valid:
        raise ValueError(
            f"critic.feature_layer {layer!r} is not valid for this UNet; choose one of: {', '.join(valid)}"
        )
    return layer


class FeatureTap:
    """Captures (tokens (B, N, C), temb (B, D)) from the backbone's feature layer during a forward."""

    def __init__(self, pipe, feature_layer: Optional[str] = None) -> None:
        self.kind = backbone_kind(pipe)
        self.net = denoiser(pipe)
        self.layer = resolve_feature_layer(pipe, feature_layer)
        self.tokens: Optional[torch.Tensor] = None
        self.temb: Optional[torch.Tensor] = None

    @contextlib.contextmanager
    def attached(self) -> Iterator["FeatureTap"]:
        handles = []
        if self.kind == "unet":
            handles.append(self.net.time_embedding.register_forward_hook(self._on_temb))
            handles.append(self.net.get_submodule(self.layer).register_forward_hook(self._on_unet_block))
        else:
            handles.append(self.net.norm_out.register_forward_pre_hook(self._on_dit_norm_out))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _on_temb(self, module, args, output) -> None:
        self.temb = output

    def _on_unet_block(self, module, args, output) -> None:
        self.tokens = output.flatten(2).transpose(1, 2)  # (B, h·w, C)
        raise _FeaturesReady

    def _on_dit_norm_out(self, module, args) -> None:
        self.tokens, self.temb = args[0], args[1]
        raise _FeaturesReady


def critic_target_modules(pipe, feature_layer: Optional[str] = None) -> str:
    """peft regex for the critic adapter: attention projections *upstream* of the feature layer only
    (the UNet's down- and mid-blocks, plus up-blocks 0..N for ``up_blocks.N``; every DiT block),
    since the critic's pass stops there."""
    if backbone_kind(pipe) != "unet":
        blocks = r"transformer_blocks"
    else:
        layer = resolve_feature_layer(pipe, feature_layer)
        up = "" if layer == "mid_block" else rf"|up_blocks\.[0-{layer.rsplit('.', 1)[1]}]"
        blocks = rf"(down_blocks|mid_block{up})"
    return rf"^{blocks}\..*\.(to_q|to_k|to_v|to_out\.0)$"


def feature_dims(pipe, feature_layer: Optional[str] = None) -> tuple[int, int]:
    """(feature channels C, timestep-embedding width D) of the backbone's feature layer."""
    net = denoiser(pipe)
    if backbone_kind(pipe) == "unet":
        layer = resolve_feature_layer(pipe, feature_layer)
        channels = net.config.block_out_channels
        c = channels[-1] if layer == "mid_block" else list(reversed(channels))[int(layer.rsplit(".", 1)[1])]
        return c, net.time_embedding.linear_2.out_features
    inner = net.config.num_attention_heads * net.config.attention_head_dim
    return inner, inner


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
        net = denoiser(self.pipe)
        previous = list(net.active_adapters()) if getattr(net, "peft_config", None) else None
        if previous is not None:
            set_active_adapters(self.pipe, [self.adapter])
        t = timestep.expand(x_t.shape[0]) if timestep.ndim == 0 else timestep
        try:
            with tap.attached():
                if tap.kind == "unet":
                    net(x_t, t, encoder_hidden_states=embeds["prompt_embeds"], return_dict=False)
                else:
                    net(
                        hidden_states=x_t,
                        timestep=t,
                        encoder_hidden_states=embeds["prompt_embeds"],
                        pooled_projections=embeds["pooled_prompt_embeds"],
                        return_dict=False,
                    )
        except _FeaturesReady:
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

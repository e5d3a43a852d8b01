"""SD1.5-class backbones (``StableDiffusionPipeline``): a UNet on one CLIP text encoder's hidden states, DDPM/VP
noise (ε- or v-prediction), sampled with DDIM."""

from __future__ import annotations

import torch

from align.backbones.adapter import VPBackbone


class SD15Backbone(VPBackbone):
    """``unet(x_t, t, encoder_hidden_states)``; no pooled embedding."""

    kind = "unet"
    pooled = False

    def encode(self, prompts: list[str], negative: list[str], cfg_on: bool, device: torch.device) -> dict:
        pos, neg = self.pipe.encode_prompt(prompts, device, 1, cfg_on, negative_prompt=negative)
        return {"prompt_embeds": pos, "negative_prompt_embeds": neg}

    def call_net(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.net(x, t, encoder_hidden_states=cond["prompt_embeds"], return_dict=False)[0]

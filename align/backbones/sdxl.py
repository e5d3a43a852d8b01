"""SDXL-class backbones (``StableDiffusionXLPipeline``): a UNet on the concatenated hidden states of two CLIP text
encoders, with the second one's pooled embedding and the micro-conditioning time ids (original size, crop
corner, target size) added to its timestep embedding; DDPM/VP noise, sampled with DDIM (swap a real
checkpoint's Euler scheduler: ``DDIMScheduler.from_config(pipe.scheduler.config)``)."""

from __future__ import annotations

from typing import Optional

import torch

from align.backbones.adapter import VPBackbone


class SDXLBackbone(VPBackbone):
    """``unet(x_t, t, encoder_hidden_states, added_cond_kwargs={text_embeds, time_ids})``. The time ids are the
    pipeline's defaults for an uncropped image at the latents' resolution, (h, w, 0, 0, h, w), the same for
    both CFG branches, exactly as ``pipe()`` builds them (its own ``_get_add_time_ids``, which checks the
    width the UNet's added embedding expects)."""

    kind = "sdxl"

    def encode(self, prompts: list[str], negative: list[str], cfg_on: bool, device: torch.device) -> dict:
        """An all-empty negative prompt is SDXL's "no negative prompt": zeros when the pipeline's
        ``force_zeros_for_empty_prompt`` is set, as ``pipe()`` does by default."""
        negative_prompt = None if not any(negative) else negative
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompts, None, device, 1, cfg_on, negative_prompt=negative_prompt
        )
        return {
            "prompt_embeds": pos,
            "negative_prompt_embeds": neg if cfg_on else None,
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": neg_pooled if cfg_on else None,
        }

    def encode_single(
        self, prompt: str, device: torch.device, **per_encoder: str
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        out = self.pipe.encode_prompt(
            prompt, per_encoder.get("prompt_2", prompt), device, 1, do_classifier_free_guidance=False
        )
        return out[0], out[2]

    def time_ids(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, 6) micro-conditioning for latents ``x`` at their pixel size."""
        size = (x.shape[-2] * self.pipe.vae_scale_factor, x.shape[-1] * self.pipe.vae_scale_factor)
        te2 = self.pipe.text_encoder_2
        projection = te2.config.projection_dim if te2 is not None else None
        ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=projection)
        return ids.to(x.device).expand(x.shape[0], -1)

    def call_net(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        embeds = cond["prompt_embeds"]
        added = {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": self.time_ids(x, embeds.dtype)}
        return self.net(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]

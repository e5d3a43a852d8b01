"""SD3-class backbones (``StableDiffusion3Pipeline``): an MMDiT on CLIP (+ T5) sequence embeddings and a pooled CLIP
embedding, rectified-flow noise, sampled with the flow SDE (align/sampling/transitions.py)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from align.backbones.adapter import Backbone


class SD3Backbone(Backbone):
    """``transformer(hidden_states, timestep, encoder_hidden_states, pooled_projections)``. VE view: t = s/(1+s),
    x_t = (1−t) z = z/(1+s), timestep 1000·t, D = x_t − t v̂. The critic reads the final hidden tokens (the
    input of ``norm_out``) with the conditioning embedding that ``norm_out`` receives."""

    kind = "dit"
    denoiser_attr = "transformer"
    default_feature_layer = "norm_out"

    def encode(self, prompts: list[str], negative: list[str], cfg_on: bool, device: torch.device) -> dict:
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompts, None, None, device=device, do_classifier_free_guidance=cfg_on, negative_prompt=negative
        )
        return {
            "prompt_embeds": pos,
            "negative_prompt_embeds": neg,
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": neg_pooled,
        }

    def encode_single(
        self, prompt: str, device: torch.device, **per_encoder: str
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        out = self.pipe.encode_prompt(
            prompt,
            per_encoder.get("prompt_2", prompt),
            per_encoder.get("prompt_3", prompt),
            device=device,
            do_classifier_free_guidance=False,
        )
        return out[0], out[2]

    def call_net(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.net(
            hidden_states=x,
            timestep=t.expand(x.shape[0]),
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            return_dict=False,
        )[0]

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.call_net(x, t, cond)  # flow matching scales no input

    def schedule_kwargs(self, latents: torch.Tensor) -> dict:
        """SD3's resolution-dependent shift ``mu`` when the scheduler uses dynamic shifting."""
        conf = self.pipe.scheduler.config
        if not conf.get("use_dynamic_shifting", False):
            return {}
        patch = self.net.config.patch_size
        seq_len = (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
        return {
            "mu": calculate_shift(
                seq_len,
                conf.get("base_image_seq_len", 256),
                conf.get("max_image_seq_len", 4096),
                conf.get("base_shift", 0.5),
                conf.get("max_shift", 1.16),
            )
        }

    def to_vae(self, z: torch.Tensor) -> torch.Tensor:
        z = z / self.pipe.vae.config.scaling_factor
        shift = self.pipe.vae.config.get("shift_factor")
        return z if shift is None else z + shift

    def from_vae(self, z: torch.Tensor) -> torch.Tensor:
        shift = self.pipe.vae.config.get("shift_factor")
        return (z if shift is None else z - shift) * self.pipe.vae.config.scaling_factor

    def ve_sigma_range(self, sigma_max_flow: float) -> tuple[float, float]:
        return 1.0 / (self.pipe.scheduler.config.num_train_timesteps - 1), sigma_max_flow

    def ve_timestep(self, s: float) -> float:
        return 1000.0 * s / (1.0 + s)

    def ve_input(self, z: torch.Tensor, s: float) -> torch.Tensor:
        return z / (1.0 + s)

    def ve_x0(self, out: torch.Tensor, x_t: torch.Tensor, s: float) -> torch.Tensor:
        return x_t - s / (1.0 + s) * out

    def ve_schedule(self, steps: int, sigma_max: float) -> torch.Tensor:
        from align.sampling.sampler import set_schedule

        size = self.net.config.sample_size
        set_schedule(self.pipe, steps, torch.zeros(1, self.net.config.in_channels, size, size))
        t = self.pipe.scheduler.sigmas[:-1].double().cpu()
        return (t / (1 - t).clamp_min(1e-12)).clamp(max=sigma_max)

    def feature_layers(self) -> list[str]:
        return ["norm_out"]

    def feature_hooks(self, layer: str, on_tokens: Callable, on_temb: Callable) -> list:
        def norm_out_hook(module, args):
            on_temb(args[1])
            on_tokens(args[0])

        return [self.net.norm_out.register_forward_pre_hook(norm_out_hook)]

    def feature_dims(self, layer: str) -> tuple[int, int]:
        inner = self.net.config.num_attention_heads * self.net.config.attention_head_dim
        return inner, inner

    def critic_blocks(self, layer: str) -> str:
        return r"transformer_blocks"

    def resolution_multiple(self) -> tuple[int, str]:
        vae, patch = self.pipe.vae_scale_factor, self.net.config.patch_size
        return vae * patch, f"VAE factor {vae} × patch size {patch}"

    def max_patches(self) -> Optional[int]:
        return getattr(self.net.config, "pos_embed_max_size", None)

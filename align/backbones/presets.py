"""Named tiny pipelines built from configs (seeded, fp32, CPU-fast) for tests and the toy world.

Each preset returns a real diffusers pipeline of the same class as its full-size counterpart:
``tiny-unet`` and ``toy`` are ``StableDiffusionPipeline`` (UNet, VAE, CLIP text encoder, DDIM),
``tiny-dit`` is ``StableDiffusion3Pipeline`` (MMDiT, 16-channel VAE, two CLIP encoders, flow
matching; ``text_encoder_3=None``). The tokenizer is written from the toy vocabulary
(:mod:`align.backbones.tokenizer`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


PRESETS: dict[str, Callable[..., object]] = {}

#: SD1.5's noise schedule (scaled-linear betas), shared by the UNet presets.
SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                     beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                     steps_offset=1)


def register_preset(name: str):
    def wrap(fn: Callable[..., object]) -> Callable[..., object]:
        PRESETS[name] = fn
        return fn
    return wrap


def build_preset(name: str, **kwargs) -> object:
    """Build a named tiny pipeline; an unknown name lists the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown backbone preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name](**kwargs)


#: The toy vocabulary's CLIP tokenizer, written once by :func:`write_clip_tokenizer` and committed,
#: because BPE training breaks ties in a process-dependent order (ids would differ between runs).
TOY_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "toy_tokenizer"


def toy_tokenizer() -> CLIPTokenizer:
    """The committed CLIP tokenizer of the toy vocabulary (max length 16)."""
    return CLIPTokenizer.from_pretrained(TOY_TOKENIZER_DIR)


def clip_text_encoder(tokenizer: CLIPTokenizer, hidden: int, layers: int = 2, heads: int = 4,
                      projection_dim: int | None = None) -> CLIPTextModel:
    """A tiny CLIP text encoder matched to ``tokenizer`` (vocab, max length, special ids)."""
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, projection_dim=projection_dim or hidden)
    return CLIPTextModelWithProjection(cfg) if projection_dim else CLIPTextModel(cfg)


def tiny_vae(channels: tuple[int, ...], latent_channels: int = 4, sample_size: int = 32,
             attention: bool = False, **extra) -> AutoencoderKL:
    """AutoencoderKL with ``len(channels)`` blocks (scale factor 2**(len-1))."""
    n = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=tuple(channels),
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         latent_channels=latent_channels, norm_num_groups=min(16, channels[0]),
                         layers_per_block=1, sample_size=sample_size, mid_block_add_attention=attention,
                         **extra)


def _sd_pipeline(unet, vae, text_encoder, tokenizer, prediction_type: str) -> StableDiffusionPipeline:
    scheduler = DDIMScheduler(prediction_type=prediction_type, **SD15_SCHEDULE)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)


@register_preset("tiny-unet")
def tiny_unet(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    """SD1.5-class pipeline: 2-level UNet (32, 64), 3-block VAE (8× down, 32 px), 2-layer CLIP."""
    torch.manual_seed(seed)
    tokenizer = toy_tokenizer()
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=16)
    vae = tiny_vae((16, 16, 16), sample_size=32)
    return _sd_pipeline(unet, vae, clip_text_encoder(tokenizer, 32), tokenizer, prediction_type)


@register_preset("toy")
def toy(seed: int = 0, prediction_type: str = "epsilon",
        unet_channels: tuple[int, ...] = (32, 64, 64), vae_channels: tuple[int, ...] = (16, 32),
        text_hidden: int = 64) -> StableDiffusionPipeline:
    """The toy world's model, untrained: 32 px images, 16×16×4 latents (2-block VAE), a 3-level UNet
    with cross-attention at 8×8 and 4×4, and a 2-layer CLIP text encoder of width 64.
    ``align toy pretrain`` trains it; the trained one ships in ``align/toy/weights``."""
    from align.toy.world import RESOLUTION
    torch.manual_seed(seed)
    tokenizer = toy_tokenizer()
    n = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2 ** (len(vae_channels) - 1), in_channels=4, out_channels=4,
        block_out_channels=tuple(unet_channels), layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=text_hidden, attention_head_dim=8, norm_num_groups=min(32, unet_channels[0]))
    vae = tiny_vae(tuple(vae_channels), sample_size=RESOLUTION)
    return _sd_pipeline(unet, vae, clip_text_encoder(tokenizer, text_hidden), tokenizer, prediction_type)


@register_preset("tiny-dit")
def tiny_dit(seed: int = 0, shift: float = 3.0) -> StableDiffusion3Pipeline:
    """SD3-class pipeline: 2-layer MMDiT (patch 1, QK-RMSNorm), 16-channel VAE, two CLIP encoders."""
    torch.manual_seed(seed)
    tokenizer = toy_tokenizer()
    transformer = SD3Transformer2DModel(sample_size=4, patch_size=1, in_channels=16, out_channels=16,
                                        num_layers=2, attention_head_dim=8, num_attention_heads=4,
                                        joint_attention_dim=32, caption_projection_dim=32,
                                        pooled_projection_dim=64, pos_embed_max_size=16, qk_norm="rms_norm")
    vae = tiny_vae((16, 16, 16), latent_channels=16, sample_size=32, shift_factor=0.0609,
                   scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
    te1 = clip_text_encoder(tokenizer, 32, projection_dim=32)
    te2 = clip_text_encoder(tokenizer, 32, projection_dim=32)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=te1, tokenizer=tokenizer, text_encoder_2=te2,
                                    tokenizer_2=toy_tokenizer(), text_encoder_3=None, tokenizer_3=None)

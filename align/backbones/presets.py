"""Named tiny pipelines built from configs (seeded, fp32, CPU-fast) for tests and the toy world.

Each preset returns a real diffusers pipeline of the same class as its full-size counterpart:
``tiny-unet`` and ``toy`` are ``StableDiffusionPipeline`` (UNet, VAE, CLIP text encoder, DDIM),
``tiny-sdxl`` is ``StableDiffusionXLPipeline`` (UNet with pooled text embeddings and time ids, two
CLIP encoders, DDIM), ``tiny-dit`` is ``StableDiffusion3Pipeline`` (MMDiT, 16-channel VAE, two CLIP
encoders, flow matching; ``text_encoder_3=None``). All use the committed toy-vocabulary CLIP tokenizer
(:mod:`align.backbones.tokenizer`). Weights are random; building never touches the global RNG.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Iterator

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from align.backbones.tokenizer import toy_tokenizer

PresetBuilder = Callable[..., DiffusionPipeline]
PRESETS: dict[str, PresetBuilder] = {}

#: SD1.5's noise schedule (scaled-linear betas), shared by the UNet presets.
SD15_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
PREDICTION_TYPES = ("epsilon", "v_prediction")
#: SD1.5's UNet2DConditionModel architecture (860 M parameters), for random-weight shape checks
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    cross_attention_dim=768,
    block_out_channels=(320, 640, 1280, 1280),
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)


def register_preset(name: str) -> Callable[[PresetBuilder], PresetBuilder]:
    """Register a builder ``fn(seed=0, **sizes) -> pipeline`` under ``name``."""

    def wrap(fn: PresetBuilder) -> PresetBuilder:
        PRESETS[name] = fn
        return fn

    return wrap


def build_preset(name: str, **kwargs) -> DiffusionPipeline:
    """Build a named tiny pipeline; unknown names and unknown keyword arguments fail with the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown backbone preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    params = inspect.signature(PRESETS[name]).parameters
    bad = sorted(set(kwargs) - set(params))
    if bad and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ValueError(
            f"backbone preset {name!r} has no option(s) {', '.join(bad)}; valid options: {', '.join(params)}"
        )
    return PRESETS[name](**kwargs)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Deterministic init from ``seed`` without disturbing the caller's global CPU RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def clip_text_encoder(
    tokenizer: CLIPTokenizer,
    hidden: int,
    layers: int = 2,
    heads: int = 4,
    projection_dim: int | None = None,
    init_factor: float = 1.0,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A tiny CLIP text encoder matched to ``tokenizer`` (vocab, max length, special ids);
    with ``projection_dim`` the SD3 kind that also returns a pooled, projected embedding.
    ``init_factor`` scales CLIP's init std (``initializer_factor``)."""
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection_dim or hidden,
        initializer_factor=init_factor,
    )
    return CLIPTextModelWithProjection(cfg) if projection_dim else CLIPTextModel(cfg)


def tiny_vae(
    channels: tuple[int, ...], latent_channels: int = 4, sample_size: int = 32, attention: bool = False, **extra
) -> AutoencoderKL:
    """AutoencoderKL with ``len(channels)`` blocks, i.e. spatial scale factor ``2 ** (len - 1)``."""
    n = len(channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(channels),
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=latent_channels,
        norm_num_groups=min(16, channels[0]),
        layers_per_block=1,
        sample_size=sample_size,
        mid_block_add_attention=attention,
        **extra,
    )


def sd_pipeline(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    prediction_type: str,
) -> StableDiffusionPipeline:
    """SD1.5-style assembly: DDIM with SD1.5's schedule, no safety checker."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")
    scheduler = DDIMScheduler(prediction_type=prediction_type, **SD15_SCHEDULE)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def tiny_sd_unet(sample_size: int = 4, **overrides) -> UNet2DConditionModel:
    """The tiny SD1.5-class UNet: 2 levels (32, 64), cross-attention width 32, on sample_size² × 4 latents;
    ``overrides`` replace or add UNet2DConditionModel arguments (the SDXL preset's added conditioning)."""
    config = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    return UNet2DConditionModel(**{**config, **overrides})


def sd3_pipeline(transformer, vae, te1, te2, tokenizer, shift: float) -> StableDiffusion3Pipeline:
    """An SD3 pipeline from its parts: two CLIP encoders (the toy tokenizer for the second), no T5."""
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=vae,
        text_encoder=te1,
        tokenizer=tokenizer,
        text_encoder_2=te2,
        tokenizer_2=toy_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


@register_preset("tiny-unet")
def tiny_unet(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    """SD1.5-class pipeline: 2-level UNet (32, 64), 3-block VAE (4× down), 2-layer CLIP; 16 px images."""
    with _seeded(seed):
        tokenizer = toy_tokenizer()
        unet = tiny_sd_unet(4)
        vae = tiny_vae((16, 16, 16), sample_size=16)
        return sd_pipeline(unet, vae, clip_text_encoder(tokenizer, 32), tokenizer, prediction_type)


@register_preset("toy")
def toy(
    seed: int = 0,
    prediction_type: str = "epsilon",
    unet_channels: tuple[int, ...] = (32, 64, 64),
    layers_per_block: int = 1,
    attention_head_dim: int = 8,
    vae_channels: tuple[int, ...] = (16, 32),
    text_hidden: int = 64,
    text_layers: int = 2,
    text_init_factor: float = 5.0,
    resolution: int = 32,
) -> StableDiffusionPipeline:
    """The toy world's model, untrained: 32 px images, 16×16×4 latents (2-block VAE), a UNet with
    cross-attention below the top level, and a CLIP text encoder of width ``text_hidden``.
    ``align toy pretrain`` trains it; the trained one ships in ``align/toy/weights``.

    The text encoder stays frozen in pretraining, so its random features must keep every word
    apart: with CLIP's default init (factor 1) the last word's state ("left"/"right") moved by
    ~2.5 (norm 8) between positions and the UNet never learnt position; ``text_init_factor=5``
    makes that ~7, like the count word's. ``resolution``: the toy world's image size (its ``RESOLUTION``;
    tests/test_backbones.py pins that they agree)."""
    n = len(unet_channels)
    with _seeded(seed):
        tokenizer = toy_tokenizer()
        unet = UNet2DConditionModel(
            sample_size=resolution // 2 ** (len(vae_channels) - 1),
            in_channels=4,
            out_channels=4,
            block_out_channels=tuple(unet_channels),
            layers_per_block=layers_per_block,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
            cross_attention_dim=text_hidden,
            attention_head_dim=attention_head_dim,
            norm_num_groups=min(32, unet_channels[0]),
        )
        vae = tiny_vae(tuple(vae_channels), sample_size=resolution)
        text_encoder = clip_text_encoder(tokenizer, text_hidden, layers=text_layers, init_factor=text_init_factor)
        return sd_pipeline(unet, vae, text_encoder, tokenizer, prediction_type)


@register_preset("tiny-dit")
def tiny_dit(seed: int = 0, shift: float = 3.0) -> StableDiffusion3Pipeline:
    """SD3-class pipeline: 2-layer MMDiT (patch 1, QK-RMSNorm), 16-channel VAE, two CLIP encoders
    whose pooled outputs (32 + 32) make the transformer's 64-d pooled projection; 16 px images."""
    with _seeded(seed):
        tokenizer = toy_tokenizer()
        transformer = SD3Transformer2DModel(
            sample_size=4,
            patch_size=1,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=64,
            pos_embed_max_size=16,
            qk_norm="rms_norm",
        )
        vae = tiny_vae(
            (16, 16, 16),
            latent_channels=16,
            sample_size=16,
            shift_factor=0.0609,
            scaling_factor=1.5035,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        te1 = clip_text_encoder(tokenizer, 32, projection_dim=32)
        te2 = clip_text_encoder(tokenizer, 32, projection_dim=32)
        return sd3_pipeline(transformer, vae, te1, te2, tokenizer, shift)


@register_preset("tiny-sdxl")
def tiny_sdxl(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusionXLPipeline:
    """SDXL-class pipeline: a 2-level UNet (32, 64) with SDXL's added conditioning (``text_time``: the pooled
    embedding and 6 time ids of width 8), cross-attention on the two CLIP encoders' concatenated penultimate
    states (16 + 16), the second one's 16-d projection pooled; 3-block VAE (4× down), DDIM with SDXL's
    (= SD1.5's) scaled-linear schedule; 16 px images."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")
    width, time_width = 16, 8
    with _seeded(seed):
        tokenizer = toy_tokenizer()
        te1 = clip_text_encoder(tokenizer, width)
        te2 = clip_text_encoder(tokenizer, width, projection_dim=width)
        unet = tiny_sd_unet(
            4,
            cross_attention_dim=2 * width,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_width,
            projection_class_embeddings_input_dim=6 * time_width + width,
        )
        vae = tiny_vae((16, 16, 16), sample_size=16)
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=te1,
            text_encoder_2=te2,
            tokenizer=tokenizer,
            tokenizer_2=toy_tokenizer(),
            unet=unet,
            scheduler=DDIMScheduler(prediction_type=prediction_type, **SD15_SCHEDULE),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )

"""One backbone adapter per family: everything the rest of the framework asks of a diffusers pipeline.

The sampler, the learner, the critic, the inverse solvers and the modifiers never branch on "UNet or
DiT"; they call :func:`backbone` and use its methods:

* **text**: :meth:`Backbone.encode` (both CFG branches, via the pipeline's own ``encode_prompt``) and
  :meth:`Backbone.encode_single` (one prompt, sequence and pooled embedding: StayFair's directions);
* **the denoiser call**: :meth:`Backbone.call_net` (one batched forward on conditioning ``cond``) and
  :meth:`Backbone.denoise` (the same, with the scheduler's input scaling: what the sampling loop calls);
  classifier-free guidance batches [uncond; cond] around it (:func:`align.sampling.sampler.predict`);
* **the schedule**: :meth:`Backbone.schedule_kwargs` (SD3's resolution-dependent shift);
* **latents**: :meth:`Backbone.to_vae` / :meth:`Backbone.from_vae` (scaling and shift factors);
* **the VE view** of the inverse solvers: the timestep, input and x̂0 of a noise level s
  (``z = x0 + s·ε``), :meth:`Backbone.ve_timestep`, :meth:`Backbone.ve_input`, :meth:`Backbone.ve_x0`;
* **the critic's features**: the valid layers, hooks that capture (tokens, timestep embedding), their
  widths, and the adapter's target modules upstream of them;
* **resolution**: the multiple every side must be, and a cap where a position embedding has one.

Which stochastic step a family takes is its scheduler's (align/sampling/transitions.py). A family is one
subclass in its own file plus an entry in :mod:`align.backbones.registry`.
"""

from __future__ import annotations

import math
from typing import Callable, ClassVar, Optional

import torch

from align.backbones.registry import BACKBONES, BackboneEntry, kind_of_pipeline, supported


class FeaturesReady(Exception):
    """Raised by a feature hook to end the backbone's forward pass once the critic's layer has run."""


class Backbone:
    """A pipeline of one family. Subclasses set ``kind`` and ``denoiser_attr`` and implement the calls."""

    kind: ClassVar[str]
    #: the pipeline attribute that holds the denoiser (the network LoRA adapts and the sampler calls)
    denoiser_attr: ClassVar[str]
    #: the critic's feature layer when ``critic.feature_layer`` is not set
    default_feature_layer: ClassVar[str]
    #: whether the family conditions on a pooled text embedding as well (``pooled_prompt_embeds``)
    pooled: ClassVar[bool] = True

    def __init__(self, pipe) -> None:
        self.pipe = pipe

    @property
    def net(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_attr)

    @property
    def entry(self) -> BackboneEntry:
        return BACKBONES[self.kind]

    # ------------------------------------------------------------------------------------- text
    def encode(self, prompts: list[str], negative: list[str], cfg_on: bool, device: torch.device) -> dict:
        """``prompt_embeds`` and, with CFG, ``negative_prompt_embeds`` (plus the pooled pair where the family
        has one), from the pipeline's own ``encode_prompt``."""
        raise NotImplementedError

    def encode_single(
        self, prompt: str, device: torch.device, **per_encoder: str
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(sequence embedding (1, L, D), pooled embedding (1, P) or None) of one prompt, no CFG;
        ``per_encoder`` overrides the prompt of a named encoder (``prompt_2``, ``prompt_3``)."""
        embeds = self.encode([prompt], [""], False, device)
        return embeds["prompt_embeds"], embeds.get("pooled_prompt_embeds")

    def encode_null(self, device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """CFG's unconditional branch for an empty negative prompt, (1, L, D) and pooled (1, P) or None: what
        the sampler uses (SDXL: zeros, its ``force_zeros_for_empty_prompt``)."""
        embeds = self.encode([""], [""], True, device)
        return embeds["negative_prompt_embeds"], embeds.get("negative_pooled_prompt_embeds")

    def encode_filler(self, device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """:meth:`encode_single` of filler tokens in the word slot (StayFair's null base on pooled families):
        CLIP's end-of-text token, T5's pad token."""
        eos = self.pipe.tokenizer.eos_token
        t5 = getattr(self.pipe, "tokenizer_3", None)
        return self.encode_single(eos, device, prompt_2=eos, prompt_3=t5.pad_token if t5 is not None else eos)

    # -------------------------------------------------------------------------- the denoiser
    def call_net(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """One forward of the denoiser on a batch; ``cond`` holds ``prompt_embeds`` and, where the family has
        one, ``pooled_prompt_embeds``, both batched like ``x``. ``t``: 0-d or (B,)."""
        raise NotImplementedError

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """:meth:`call_net` on the scheduler's scaled input (what the pipeline's own loop calls)."""
        return self.call_net(self.pipe.scheduler.scale_model_input(x, t), t, cond)

    def schedule_kwargs(self, latents: torch.Tensor) -> dict:
        """Extra arguments of ``scheduler.set_timesteps`` for these latents."""
        return {}

    def use_sampling_scheduler(self) -> Optional[str]:
        """Put the scheduler the log-prob sampler steps with on the pipeline, from the loaded one's config
        (its noise schedule and prediction type kept); the replaced class's name, or None if unchanged."""
        return None

    # ------------------------------------------------------------------------------- latents
    def to_vae(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion latents → the VAE decoder's input: z / scaling_factor (+ shift_factor where used)."""
        return z / self.pipe.vae.config.scaling_factor

    def from_vae(self, z: torch.Tensor) -> torch.Tensor:
        """The VAE encoder's latents → diffusion latents (inverse of :meth:`to_vae`)."""
        return z * self.pipe.vae.config.scaling_factor

    # ---------------------------------------------------------------- the VE view (inverse solvers)
    def ve_sigma_range(self, sigma_max_flow: float) -> tuple[float, float]:
        """(σ_min, σ_max) of VE noise levels the model can denoise."""
        raise NotImplementedError

    def ve_timestep(self, s: float) -> float:
        """The model's continuous timestep for VE noise level s."""
        raise NotImplementedError

    def ve_input(self, z: torch.Tensor, s: float) -> torch.Tensor:
        """The model's input x_t for the VE state z at noise level s."""
        raise NotImplementedError

    def ve_x0(self, out: torch.Tensor, x_t: torch.Tensor, s: float) -> torch.Tensor:
        """D(z, s) = E[x0 | z] from the model's output at x_t."""
        raise NotImplementedError

    def ve_schedule(self, steps: int, sigma_max: float) -> torch.Tensor:
        """The scheduler's own ``steps``-step grid as descending VE sigmas (float64, no trailing 0)."""
        raise NotImplementedError

    # -------------------------------------------------------------------- the critic's features
    def feature_layers(self) -> list[str]:
        """The layers whose output the critic can read."""
        raise NotImplementedError

    def feature_hooks(self, layer: str, on_tokens: Callable, on_temb: Callable) -> list:
        """Forward hooks that pass the layer's tokens (B, N, C) to ``on_tokens`` (which raises
        :class:`FeaturesReady`) and the timestep embedding (B, D) to ``on_temb``; returns their handles."""
        raise NotImplementedError

    def feature_dims(self, layer: str) -> tuple[int, int]:
        """(feature channels C, timestep-embedding width D) at ``layer``."""
        raise NotImplementedError

    def critic_blocks(self, layer: str) -> str:
        """peft regex of the blocks upstream of ``layer`` (the critic's pass stops there)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------- resolution
    def resolution_multiple(self) -> tuple[int, str]:
        """The multiple every side must be (pixels) and why, e.g. ``(16, "VAE factor 8 × patch size 2")``."""
        vae = self.pipe.vae_scale_factor
        return vae, f"VAE factor {vae}"

    def max_patches(self) -> Optional[int]:
        """The most latent patches a side may have (a position embedding's size), or None."""
        return None


def backbone(pipe) -> Backbone:
    """The adapter of ``pipe``'s family; a one-line TypeError naming the supported pipelines otherwise."""
    kind = kind_of_pipeline([c.__name__ for c in type(pipe).__mro__])
    if kind is None:
        raise TypeError(f"unsupported pipeline class {type(pipe).__name__}; supported: {supported()}")
    return BACKBONES[kind].adapter_class()(pipe)


def backbone_kind(pipe) -> str:
    """The family name of a supported pipeline (``unet``, ``dit``, ``sdxl``); a clear error otherwise."""
    return backbone(pipe).kind


def denoiser(pipe) -> torch.nn.Module:
    """The network that LoRA adapts and the sampler calls (``pipe.unet``, ``pipe.transformer``)."""
    return backbone(pipe).net


# ------------------------------------------------------------------- shared by the VP (DDPM) families
class VPBackbone(Backbone):
    """DDPM/VP families (SD1.5, SDXL; ε or v): ᾱ = 1/(1+s²), x_t = √ᾱ z at the continuous timestep whose
    training sigma √((1−ᾱ_t)/ᾱ_t) is s (log-sigma interpolation of the scheduler's table); x̂0 from the
    scheduler's prediction type. The critic reads a UNet block's output (see critics/value_model.py)."""

    denoiser_attr = "unet"
    default_feature_layer = "up_blocks.1"

    def _log_sigmas(self):
        import numpy as np

        ab = self.pipe.scheduler.alphas_cumprod.double()
        return np.log(((1 - ab) / ab).sqrt().numpy())

    def use_sampling_scheduler(self) -> Optional[str]:
        """DDIM (η > 0 is the stochastic policy), as DDPO does: real SD1.5 checkpoints ship PNDM, SDXL's Euler."""
        from diffusers import DDIMScheduler

        old = self.pipe.scheduler
        if type(old) is DDIMScheduler:
            return None
        self.pipe.scheduler = DDIMScheduler.from_config(old.config)
        return type(old).__name__

    def ve_sigma_range(self, sigma_max_flow: float) -> tuple[float, float]:
        log_sigmas = self._log_sigmas()
        return float(math.exp(log_sigmas[0])), float(math.exp(log_sigmas[-1]))

    def ve_timestep(self, s: float) -> float:
        import numpy as np

        log_sigmas = self._log_sigmas()
        return float(np.interp(math.log(s), log_sigmas, np.arange(len(log_sigmas))))

    def ve_input(self, z: torch.Tensor, s: float) -> torch.Tensor:
        return z * (1.0 / (1.0 + s * s)) ** 0.5

    def ve_x0(self, out: torch.Tensor, x_t: torch.Tensor, s: float) -> torch.Tensor:
        from align.sampling.transitions import x0_and_eps

        alpha = torch.tensor(1.0 / (1.0 + s * s), dtype=torch.float64)
        return x0_and_eps(self.pipe.scheduler.config.prediction_type, out, x_t, alpha)[0].to(out.dtype)

    def ve_schedule(self, steps: int, sigma_max: float) -> torch.Tensor:
        import numpy as np

        self.pipe.scheduler.set_timesteps(steps)
        ts = self.pipe.scheduler.timesteps.cpu().numpy()
        return torch.from_numpy(np.exp(self._log_sigmas()[ts]))

    # the critic reads the output of the mid-block or of an up-block (tokens = its h·w positions)
    def feature_layers(self) -> list[str]:
        return ["mid_block", *(f"up_blocks.{i}" for i in range(len(self.net.up_blocks)))]

    def feature_hooks(self, layer: str, on_tokens: Callable, on_temb: Callable) -> list:
        def temb_hook(module, args, output):
            on_temb(output)

        def block_hook(module, args, output):
            on_tokens(output.flatten(2).transpose(1, 2))  # (B, h·w, C)

        return [
            self.net.time_embedding.register_forward_hook(temb_hook),
            self.net.get_submodule(layer).register_forward_hook(block_hook),
        ]

    def feature_dims(self, layer: str) -> tuple[int, int]:
        channels = self.net.config.block_out_channels
        c = channels[-1] if layer == "mid_block" else list(reversed(channels))[int(layer.rsplit(".", 1)[1])]
        return c, self.net.time_embedding.linear_2.out_features

    def critic_blocks(self, layer: str) -> str:
        up = "" if layer == "mid_block" else rf"|up_blocks\.[0-{layer.rsplit('.', 1)[1]}]"
        return rf"(down_blocks|mid_block{up})"

"""``sampler:`` section of the job configs, torch-free so that config errors come before heavy imports.

:mod:`align.sampling.sampler` re-exports :class:`SamplerConfig`; the transitions module holds the
same ``LOGPROB_REDUCTIONS`` (tests/test_config.py pins that they agree).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from align.config import field
from align.config_lists import parse_modifiers

#: per-step log-density reductions over latent dims (= align.sampling.transitions.LOGPROB_REDUCTIONS)
LOGPROB_REDUCTIONS = ("mean", "sum")


@dataclasses.dataclass
class SamplerConfig:
    """How rollouts and `align sample` draw images."""

    num_inference_steps: int = field(20, help="denoising steps T")
    guidance_scale: float = field(4.5, help="classifier-free guidance scale w (no CFG when w <= 1)")
    eta: float = field(1.0, help="DDIM η (UNet backbones); > 0 for a stochastic policy")
    noise_level: float = field(0.7, help="flow-SDE noise level a (DiT backbones); > 0 for a stochastic policy")
    logprob_reduce: str = field(
        "mean", choices=LOGPROB_REDUCTIONS, help="per-step log-density over latent dims: mean (DDPO) or sum (joint)"
    )
    height: Optional[int] = field(
        None,
        help="image height in pixels (None: the model's default); a multiple of the "
        "VAE factor (× the patch size on a DiT), checked when the model loads",
    )
    width: Optional[int] = field(None, help="image width in pixels (None: the model's default); as height")
    sde_window: list = field(
        default_factory=list,
        help="stochastic window (MixGRPO, Flow-GRPO-Fast): these step indices are SDE steps and the only ones "
        "trained, every other step is deterministic (DDIM eta 0 / flow ODE), e.g. [1, 2]; it takes "
        "precedence over sde_window_size; empty: see sde_window_size (docs/sampling.md)",
    )
    sde_window_size: int = field(
        0,
        help="a drawn window: this many consecutive SDE steps, placed per batch inside the first "
        "sde_window_span of the chain (0: off)",
    )
    sde_window_span: float = field(
        1.0, help="the drawn window lies in the first span of the chain: T = 10, span 0.5 -> it starts at 0..3"
    )
    negative_prompt: str = field("", help="prompt of CFG's unconditional branch")
    progress: bool = field(False, help="show a per-step progress bar")
    output_type: str = field(
        "pt", choices=("pt", "latent"), help="pt: decode x_0 to images in [0, 1]; latent: skip the VAE (images = None)"
    )
    modifiers: list = field(
        default_factory=list,
        help="guidance/attention modifiers of the policy [{name, args}], e.g. [{name: stayfair, "
        "args: {alpha: 5}}, {name: sym_attn, args: {alpha: 1.05, beta: 3}}] "
        "(docs/modifiers.md)",
    )

    def __post_init__(self) -> None:
        """The one reading of the modifier list (align/config_lists.py): ModifierSpecs, old forms included."""
        self.modifiers = parse_modifiers(self.modifiers)

    def validate(self) -> None:
        """Cheap checks (no torch): counts, finiteness and ranges."""
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        for name in ("guidance_scale", "eta", "noise_level"):
            value = getattr(self, name)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(f"{name} must be finite, got {value}")
        if self.eta < 0 or self.noise_level < 0:
            raise ValueError(f"eta and noise_level must be >= 0, got {self.eta} and {self.noise_level}")
        if self.logprob_reduce not in LOGPROB_REDUCTIONS or self.output_type not in ("pt", "latent"):
            raise ValueError(
                f"logprob_reduce must be one of {LOGPROB_REDUCTIONS} and output_type 'pt' or "
                f"'latent', got {self.logprob_reduce!r} and {self.output_type!r}"
            )
        from align.config_checks import check_resolution
        from align.sampling.window import check_window

        check_window(self)

        check_resolution(self.height, self.width)  # positive ints; the model's multiple: align.sampling.resolution

    def check_registries(self) -> None:
        """Modifier names and arguments against the modifier registry (imports torch, loads nothing)."""
        if self.modifiers:
            from align.modifiers.protocol import build_modifiers

            build_modifiers(self.modifiers)  # one-line error for an unknown name or a bad arg

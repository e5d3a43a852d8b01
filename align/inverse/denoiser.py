"""The backbone as a VE denoiser D(z, s) = E[x0 | z], z = x0 + s·ε (docs/inverse.md).

Inverse-problem samplers (DPS, CLAMP, MAP-RPS) work in variance-exploding coordinates whatever the
backbone was trained with. Each backbone adapter maps them to its own parameterisation
(:meth:`~align.backbones.adapter.Backbone.ve_input`, ``ve_timestep``, ``ve_x0``):

* DDPM/VP (SD1.5, SDXL; ε or v): ᾱ = 1/(1+s²), x_t = √ᾱ z at the continuous timestep whose training
  sigma √((1−ᾱ_t)/ᾱ_t) is s (log-sigma interpolation of the scheduler's table);
  ε-pred: D = (x_t − √(1−ᾱ) ε̂)/√ᾱ; v-pred: D = √ᾱ x_t − √(1−ᾱ) v̂.
* Rectified flow (SD3): t = s/(1+s), x_t = (1−t) z = z/(1+s), timestep 1000·t; D = x_t − t v̂.

The prompt is a fixed neutral one (CLAMP's SD wrapper uses "a natural looking image" with CFG);
CFG runs through :func:`align.sampling.predict`, so the policy LoRA (if attached) is used as is.
"""

from __future__ import annotations

import warnings

import torch

from align.backbones.adapter import backbone
from align.sampling.sampler import encode_prompts, predict


def edm_sigmas(steps: int, sigma_max: float, sigma_min: float, rho: float = 7.0) -> torch.Tensor:
    """CLAMP's grid: the first ``steps`` of ``steps+1`` EDM poly-ρ points from σ_max to σ_min, then 0
    (σ_min itself is dropped, as in CLAMP's reference code, ``misc.py`` ``Scheduler.discretize``)."""
    r = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + r * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s[:-1], s.new_zeros(1)])


class Denoiser:
    """Interface: ``__call__(z, s)`` → E[x0|z]; ``schedule(n)`` → the backbone's own descending
    n-step sigma grid ending in 0; ``state_shape(batch)``; counters of forwards and VJPs."""

    sigma_min: float
    sigma_max: float

    def __init__(self) -> None:
        self.calls = {"forward": 0, "vjp": 0}

    def __call__(self, z: torch.Tensor, s: float) -> torch.Tensor:
        raise NotImplementedError

    def schedule(self, steps: int) -> torch.Tensor:
        return edm_sigmas(steps, self.sigma_max, self.sigma_min)

    def state_shape(self, batch: int) -> tuple[int, ...]:
        raise NotImplementedError

    def clip_sigma(self, s: float) -> float:
        return float(min(max(s, self.sigma_min), self.sigma_max))


def denoise_with_vjp(den: Denoiser, z: torch.Tensor, s: float):
    """(x0, vjp) with one retained graph: vjp(u) = J_D(z)ᵀ u via ``autograd.grad`` (no torch.func,
    so gradient checkpointing wrappers and peft layers work; CLAMP's reference code uses ``torch.func.vjp``
    and has to turn checkpointing off for it)."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        x0 = den(z, s)

    def vjp(u: torch.Tensor) -> torch.Tensor:
        den.calls["vjp"] += 1
        return torch.autograd.grad(x0, z, u, retain_graph=True)[0]

    return x0, vjp


class GaussianDenoiser(Denoiser):
    """Exact denoiser of a Gaussian prior N(μ, Σ) on flat states (B, n) (docs/inverse.md, "Closed forms
    behind the Gaussian tests"):
    D(z, s) = μ + K_s (z − μ), K_s = Σ (Σ + s² I)⁻¹ — the known-answer fixture for every sampler."""

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor, sigma_max: float = 100.0, sigma_min: float = 0.002):
        super().__init__()
        self.mean, self.cov = mean, cov
        self.sigma_max, self.sigma_min = sigma_max, sigma_min

    def gain(self, s: float) -> torch.Tensor:
        eye = torch.eye(self.cov.shape[0], dtype=self.cov.dtype, device=self.cov.device)
        return torch.linalg.solve(self.cov + s * s * eye, self.cov).T  # Σ(Σ+s²I)⁻¹ (symmetric)

    def __call__(self, z: torch.Tensor, s: float) -> torch.Tensor:
        self.calls["forward"] += 1
        return self.mean + (z - self.mean) @ self.gain(s).T

    def state_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.mean.shape[0])


class PipelineDenoiser(Denoiser):
    """A diffusers pipeline of any registered backbone family as a VE denoiser on its (scaled) latents."""

    def __init__(
        self,
        pipe,
        prompt: str = "a photo",
        negative_prompt: str = "",
        guidance_scale: float = 1.0,
        sigma_max_flow: float = 100.0,
    ):
        super().__init__()
        self.pipe, self.guidance_scale, self.backbone = pipe, guidance_scale, backbone(pipe)
        self.net = self.backbone.net
        if getattr(self.net, "is_gradient_checkpointing", False):  # VJPs with a retained graph (docs/inverse.md)
            warnings.warn(
                f"{type(self.net).__name__}: gradient checkpointing turned off for the inverse solvers", stacklevel=2
            )
            self.net.disable_gradient_checkpointing()
        with torch.no_grad():
            self.embeds = encode_prompts(pipe, [prompt], negative_prompt, guidance_scale)
        self.sigma_min, self.sigma_max = self.backbone.ve_sigma_range(sigma_max_flow)

    # ----------------------------------------------------------------------- denoiser
    def _embeds(self, batch: int) -> dict:
        return {k: None if v is None else v.expand(batch, *v.shape[1:]) for k, v in self.embeds.items()}

    def timestep(self, s: float) -> float:
        """The model's (continuous) timestep for VE noise level s."""
        return self.backbone.ve_timestep(s)

    def __call__(self, z: torch.Tensor, s: float) -> torch.Tensor:
        self.calls["forward"] += 1
        s = self.clip_sigma(float(s))
        t = torch.tensor(self.timestep(s), dtype=torch.float32, device=z.device)
        x_t = self.backbone.ve_input(z, s)
        out = predict(self.pipe, x_t.to(self.net.dtype), t, self._embeds(z.shape[0]), self.guidance_scale)
        return self.backbone.ve_x0(out.to(z.dtype), x_t, s)

    def schedule(self, steps: int) -> torch.Tensor:
        """The scheduler's own ``steps``-step grid as VE sigmas (σ ≤ σ_max), then 0."""
        s = self.backbone.ve_schedule(steps, self.sigma_max)
        return torch.cat([s, s.new_zeros(1)])

    def state_shape(self, batch: int) -> tuple[int, ...]:
        size = self.net.config.sample_size
        return (batch, self.net.config.in_channels, size, size)

    # ------------------------------------------------------------------------- VAE
    def image_shape(self, batch: int) -> tuple[int, ...]:
        size = self.net.config.sample_size * self.pipe.vae_scale_factor
        return (batch, 3, size, size)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents → images in [-1, 1] (no clamp, so A∘Dec stays differentiable)."""
        vae = self.pipe.vae
        return vae.decode(self.backbone.to_vae(z).to(vae.dtype), return_dict=False)[0].to(z.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → latents (posterior mean of the VAE encoder, scaled as the pipeline does)."""
        vae = self.pipe.vae
        return self.backbone.from_vae(vae.encode(x.to(vae.dtype)).latent_dist.mean.to(x.dtype))


#: What the samplers use of a denoiser (``Denoiser`` provides all but ``__call__`` and ``state_shape``).
DENOISER_MEMBERS = ("__call__", "state_shape", "schedule", "clip_sigma", "sigma_min", "sigma_max", "calls")


def is_pipeline(model) -> bool:
    """A diffusers pipeline (or anything that carries a UNet or transformer, the latent variant)."""
    from diffusers import DiffusionPipeline

    return isinstance(model, DiffusionPipeline) or any(
        getattr(model, k, None) is not None for k in ("unet", "transformer")
    )


def check_denoiser(model) -> None:
    """One-line TypeError naming what a model that is neither a pipeline nor a ``Denoiser`` lacks.
    A duck-typed denoiser with every member of :data:`DENOISER_MEMBERS` is accepted."""
    missing = [m for m in DENOISER_MEMBERS if not hasattr(model, m)]
    if missing:
        raise TypeError(
            f"model {type(model).__name__} is neither a diffusers pipeline nor a denoiser: "
            f"missing {', '.join(missing)} (a denoiser needs __call__(z, s) -> E[x0|z], "
            f"state_shape(batch), schedule(steps), clip_sigma(s), sigma_min, sigma_max and a "
            f"calls dict; subclass align.inverse.Denoiser for the defaults)"
        )


def check_has_vae(pipe) -> None:
    """The latent variants need A∘Dec: one-line error for a backbone without a VAE."""
    if getattr(pipe, "vae", None) is None:
        raise ValueError(
            f"latent inverse solvers (LMAP-RPS, latent CLAMP/DPS) need a backbone with a VAE; "
            f"{type(pipe).__name__} has none"
        )

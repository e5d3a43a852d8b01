"""DPS, Diffusion Posterior Sampling (Chung et al., ICLR 2023), the reference sampler (as in its code,
DPS2022/diffusion-posterior-sampling, ``guided_diffusion/condition_methods.py`` ``PosteriorSampling``).

Per step from σ = s to σ' = s' in VE coordinates, with x̂0 = D(x, s) (graph kept):
  x' ~ N(x̂0 + (s'²/s²)(x − x̂0), s'²(1 − s'²/s²) I)      (ancestral / DDPM step in VE form)
  x' ← x' − ζ_i ∇_x |y − A(x̂0)|₂                          (unsquared norm, as in the DPS code)
DPS tunes ζ on VP states x_t = √ᾱ z; since ∇_{x_t} = ∇_z/√ᾱ_t and z' = x'_{t−1}/√ᾱ_{t−1}, the same
ζ in VE units is ζ_i = ζ √((1+s²)(1+s'²)). Cost: 1 forward + 1 backward of the denoiser per step.

This step is normalised by the residual (DPS's ζ_i = ζ'/|y − A(x̂0)| on the squared norm), so the
measurement noise σ_y does not enter it: ``DPS`` refuses a ``sigma_y`` in that mode rather than
ignore it. ``guidance="likelihood"`` uses σ_y instead, with the Gaussian likelihood score of DPS's
derivation, ∇ log p(y | x) ≈ −J_Dᵀ Aᵀ (A(x̂0) − y)/σ_y², as a reverse-SDE drift over the step:
  x' ← x' − ζ (s² − s'²) ∇_x |y − A(x̂0)|²/(2σ_y²)       (ζ = 1: the plain posterior-score step)
"""

from __future__ import annotations

from typing import Optional

import torch
from tqdm.auto import tqdm

from align.inverse.problem import gaussian_noise, make_problem

#: DPS guidance modes: the DPS code's residual-normalised step, or the σ_y-weighted likelihood score.
GUIDANCE = ("residual", "likelihood")


class DPS:
    """``DPS(model, operator, y, sigma_y=None, steps=..., scale=..., guidance="residual"|"likelihood")``;
    ``model`` is a pipeline or a Denoiser. ``sigma_y`` is refused with ``guidance="residual"`` (the
    step does not use it) and required with ``"likelihood"``."""

    def __init__(
        self,
        model,
        operator,
        y: torch.Tensor,
        sigma_y: Optional[float] = None,
        steps: int = 100,
        scale: float = 0.5,
        progress: bool = False,
        denoiser_kwargs: Optional[dict] = None,
        guidance: str = "residual",
    ):
        if steps < 1 or scale < 0:
            raise ValueError(f"DPS: steps must be >= 1 and scale >= 0, got {steps} and {scale}")
        if guidance not in GUIDANCE:
            raise ValueError(f"DPS: guidance must be one of {GUIDANCE}, got {guidance!r}")
        if guidance == "residual" and sigma_y is not None:
            raise ValueError(
                f"DPS: sigma_y={sigma_y} would be ignored: the residual-normalised DPS step does not "
                "use it; pass sigma_y=None, or guidance='likelihood' to weight by 1/sigma_y^2"
            )
        if guidance == "likelihood" and sigma_y is None:
            raise ValueError("DPS: guidance='likelihood' needs sigma_y (the measurement noise std)")
        self.problem = make_problem(model, operator, y, sigma_y, denoiser_kwargs)
        self.scale, self.progress, self.guidance = scale, progress, guidance
        self.grid = self.problem.denoiser.schedule(steps)

    def sample(
        self, generator: Optional[torch.Generator] = None, x_start: Optional[torch.Tensor] = None, start: int = 0
    ) -> torch.Tensor:
        """Run steps ``start..N−1`` of the grid from ``x_start`` (default: pure noise σ_0 ε); the final state."""
        p = self.problem
        shape = p.state_shape()
        dev = p.y.device
        x = x_start if x_start is not None else float(self.grid[0]) * gaussian_noise(shape, generator, dev, p.y.dtype)
        for i in tqdm(range(start, len(self.grid) - 1), desc="DPS", leave=False, disable=not self.progress):
            s, s_next = float(self.grid[i]), float(self.grid[i + 1])
            with torch.enable_grad():
                z = x.detach().requires_grad_(True)
                x0 = p.denoiser(z, s)
                r = (p.operator(x0) - p.y).flatten(1)
                loss = r.norm(dim=1) if self.guidance == "residual" else r.pow(2).sum(dim=1) / (2 * p.sigma_y**2)
                grad = torch.autograd.grad(loss.sum(), z)[0]  # rows are independent: Σ_b ∇ℓ_b = per-row ∇
                p.denoiser.calls["vjp"] += 1
            x0, ratio = x0.detach(), (s_next / s) ** 2
            mean = x0 + ratio * (x.detach() - x0)
            noise = gaussian_noise(shape, generator, dev, x.dtype)
            zeta = self.scale * (
                ((1 + s * s) * (1 + s_next * s_next)) ** 0.5 if self.guidance == "residual" else s * s - s_next * s_next
            )
            x = mean + s_next * (1 - ratio) ** 0.5 * noise - zeta * grad
        return x.detach()

    def __call__(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A posterior sample in image space."""
        return self.problem.output(self.sample(generator))

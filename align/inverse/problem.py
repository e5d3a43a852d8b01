"""An inverse problem y = A(x0) + n, n ~ N(0, σ_y² I), bound to a VE denoiser (docs/inverse.md, "Python").

Given a diffusers pipeline, the state is its latent and the operator becomes A∘Dec (the latent
variant: LMAP-RPS, latent CLAMP/DPS); given a :class:`~align.inverse.denoiser.Denoiser` over
pixels (or flat vectors), the operator acts on the state directly (the pixel variant). Every shape
is checked here, before any denoiser call.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from align.inverse.denoiser import Denoiser, PipelineDenoiser, check_denoiser, check_has_vae, is_pipeline
from align.inverse.operators import LatentOperator, Operator


@dataclasses.dataclass
class InverseProblem:
    denoiser: Denoiser
    operator: Operator  # acts on the sampler's state (A∘Dec for latents)
    y: torch.Tensor  # (B, ...) measurements
    sigma_y: Optional[float]  # measurement noise std (None: a sampler whose step does not use it)
    latent: bool  # state is a VAE latent: outputs are decoded

    @property
    def batch(self) -> int:
        return self.y.shape[0]

    def state_shape(self) -> tuple[int, ...]:
        return self.denoiser.state_shape(self.batch)

    def output(self, state: torch.Tensor) -> torch.Tensor:
        """The reconstruction in image space ([-1, 1] for pipelines)."""
        if not self.latent:
            return state
        with torch.no_grad():
            return self.denoiser.decode(state)


def gaussian_noise(shape, generator: Optional[torch.Generator], device, dtype) -> torch.Tensor:
    """N(0, I) drawn on the generator's own device (a CPU generator also serves CUDA states), then moved."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where, dtype=dtype).to(device)


def make_problem(
    model, operator: Operator, y: torch.Tensor, sigma_y: Optional[float], denoiser_kwargs: Optional[dict] = None
) -> InverseProblem:
    """Bind (model, A, y, σ_y): ``model`` is a pipeline (latent variant) or a Denoiser (pixel variant).
    ``sigma_y=None`` only for samplers that do not use it (the residual-normalised DPS step)."""
    if sigma_y is not None and not 0 < sigma_y < math.inf:
        raise ValueError(f"sigma_y (measurement noise std) must be finite and > 0, got {sigma_y}")
    sigma_y = None if sigma_y is None else float(sigma_y)
    if not isinstance(operator, Operator):
        raise TypeError(f"operator must be an align.inverse.operators.Operator, got {type(operator).__name__}")
    if not isinstance(model, Denoiser) and not is_pipeline(model):
        check_denoiser(model)  # a duck-typed denoiser passes; anything else is named with what it lacks
    if not is_pipeline(model):
        operator.check_measurement(y, model.state_shape(y.shape[0]))
        return InverseProblem(model, operator, y, sigma_y, latent=False)
    check_has_vae(model)
    den = PipelineDenoiser(model, **(denoiser_kwargs or {}))
    image_shape = den.image_shape(y.shape[0])
    operator.check_measurement(y, image_shape)
    latent_op = LatentOperator(operator, den.decode, den.encode, image_shape)
    return InverseProblem(den, latent_op, y.to(den.net.device), sigma_y, latent=True)

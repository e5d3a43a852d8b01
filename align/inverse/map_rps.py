"""MAP-RPS / LMAP-RPS: MAP stage, re-noise knob, posterior-sampling stage (Zhang et al., ICML 2026,
arXiv 2605.28711; the paper's solver details are unpublished and it has no public code, so this is our
reconstruction: docs/inverse.md, "Not done / caveats").

Stage 1 (MAP ≈ MMSE) minimises J(x) = |y − A(x)|²/(2σ_y²) − log p_{s_s}(x), whose prior gradient is
the forward score (x − D(x, s_s))/s_s² (no backprop through the denoiser). Solver: annealed
half-quadratic splitting, x ← prox_s(D(x, s)) with s going geometrically from s_start down to s_s,
then Anderson-accelerated iterations of the same map at s_s until the fixed-point residual has
fallen by ``tol`` (a relative criterion on ∇J, see :func:`map_stage`) or the cap ``final_iters``
is hit (ConvergenceWarning),
prox_s(u) = argmin_x |y − A(x)|²/(2σ_y²) + |x − u|²/(2s²). Its fixed point at
s_s is exactly ∇J = 0. The prox is conjugate gradients on (AᵀA/σ_y² + I/s²) x = Aᵀy/σ_y² + u/s²
for linear A, and Adam steps for A∘Dec (latent).
Knob r ∈ [0, 1]: stage 2 runs the last round(r·N) steps of its N-step grid from x_hat + s_k ε
(s_k the grid sigma where it starts). r = 0 returns x_hat bit-exactly; r = 1 is stage 2 from its own
pure-noise start with the same RNG stream (stage 1 draws no random numbers).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from align.config import field
from align.inverse.clamp import CLAMP
from align.inverse.dps import DPS
from align.inverse.problem import InverseProblem, gaussian_noise

#: Stage-2 samplers by name: factory(model, operator, y, sigma_y, progress, denoiser_kwargs, **kw).
STAGE2 = {"clamp": CLAMP, "dps": DPS}


class ConvergenceWarning(UserWarning):
    """Stage 1 stopped at its iteration cap before reaching its tolerance."""


@dataclasses.dataclass
class Stage1Config:
    """The MAP stage. The pixel defaults (exact CG prox) converge (tol 1e-6) on the 48-dimensional
    Gaussian known-answer tests in 90–140 iterations; the number needed grows with the dimension
    and the conditioning. The latent prox (Adam steps through A∘Dec) is approximate, so its map has
    no exact fixed point: the latent defaults keep the former budget (20 iterations, memory 5) and
    warn when it ends unconverged."""

    anneal_iters: int = field(30, help="HQS iterations with s annealed geometrically from s_start to s_s")
    final_iters: Optional[int] = field(
        None,
        help="iteration cap of the Anderson-accelerated HQS at s_s, a warning when hit (default: 200 pixel, 20 latent)",
    )
    tol: float = field(1e-6, help="stop at s_s once |T(x) − x| ≤ tol · its first value, for every sample")
    s_start: Optional[float] = field(None, help="first smoothing level (default: min(denoiser σ_max, 10))")
    s_smooth: Optional[float] = field(None, help="s_s, the smoothing level (default: the smallest training σ)")
    prox_iters: int = field(10, help="CG iterations (linear A) or Adam steps (A∘Dec) per prox")
    prox_lr: float = field(0.05, help="Adam learning rate of the latent prox")
    anderson_memory: Optional[int] = field(
        None, help="Anderson memory at s_s, 0: plain HQS (default: 64 pixel, 5 latent)"
    )

    def check(self) -> None:
        """One-line ValueError naming the first bad field."""
        for name, low in (("anneal_iters", 0), ("final_iters", 1), ("prox_iters", 1), ("anderson_memory", 0)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"stage1.{name} must be >= {low}, got {value}")
        if not 0.0 <= self.tol < 1.0:
            raise ValueError(f"stage1.tol must be in [0, 1), got {self.tol}")

    def resolved(self, latent: bool) -> "Stage1Config":
        """A copy with the pixel or latent defaults filled in."""
        return dataclasses.replace(
            self,
            final_iters=self.final_iters if self.final_iters is not None else (20 if latent else 200),
            anderson_memory=self.anderson_memory if self.anderson_memory is not None else (5 if latent else 64),
        )


def renoise_start(renoise: float, steps: int) -> int:
    """Index in an N-step grid where stage 2 starts: N − round(r N) (r = 1 → 0, r = 0 → N)."""
    if not 0.0 <= renoise <= 1.0:
        raise ValueError(f"renoise (the MAP-RPS knob t*/T) must be in [0, 1], got {renoise}")
    return steps - int(round(renoise * steps))


def _cg(matvec, b: torch.Tensor, x: torch.Tensor, iters: int) -> torch.Tensor:
    """Conjugate gradients for SPD M x = b on flat rows, warm-started at x."""
    r = b - matvec(x)
    p, rs = r.clone(), (r * r).sum(1, keepdim=True)
    for _ in range(iters):
        mp = matvec(p)
        a = rs / (p * mp).sum(1, keepdim=True).clamp_min(1e-300)
        x, r = x + a * p, r - a * mp
        rs_new = (r * r).sum(1, keepdim=True)
        if float(rs_new.max()) < 1e-28:
            break
        p, rs = r + rs_new / rs.clamp_min(1e-300) * p, rs_new
    return x


def prox(problem: InverseProblem, u: torch.Tensor, s: float, x: torch.Tensor, cfg: Stage1Config) -> torch.Tensor:
    """argmin_x |y − A(x)|²/(2σ_y²) + |x − u|²/(2s²), warm-started at x."""
    op, y, sy2 = problem.operator, problem.y, problem.sigma_y**2
    if op.linear:
        shape = u.shape
        aty = op.vjp(u, y).flatten(1)
        matvec = lambda v: op.vjp(u, op(v.view(shape))).flatten(1) / sy2 + v / (s * s)
        return _cg(matvec, aty / sy2 + u.flatten(1) / (s * s), x.flatten(1), cfg.prox_iters).view(shape)
    z = x.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=cfg.prox_lr)
    with torch.enable_grad():
        for _ in range(cfg.prox_iters):
            opt.zero_grad()
            loss = ((op(z) - y) ** 2).sum() / (2 * sy2) + ((z - u) ** 2).sum() / (2 * s * s)
            loss.backward()
            opt.step()
    return z.detach()


def map_stage(
    problem: InverseProblem, cfg: Stage1Config, init: Optional[torch.Tensor] = None, progress: bool = False
) -> tuple[torch.Tensor, "AndersonResult"]:
    """Stage 1: annealed HQS, then Anderson-accelerated HQS at s_s until the fixed-point residual has
    fallen by ``cfg.tol`` (∇J(x) = (AᵀA/σ_y² + I/s_s²)(x − T(x)) for linear A, so this is a relative
    gradient criterion), or ``cfg.final_iters`` iterations (ConvergenceWarning). Returns (x̂, result)."""
    cfg.check()
    cfg = cfg.resolved(problem.latent)
    den = problem.denoiser
    s_s = den.clip_sigma(cfg.s_smooth if cfg.s_smooth is not None else den.sigma_min)
    s0 = den.clip_sigma(cfg.s_start if cfg.s_start is not None else min(den.sigma_max, 10.0))
    x = init if init is not None else problem.operator.pseudo_inverse(problem.y, problem.state_shape())
    step = lambda x, s: prox(problem, den(x, float(s)), float(s), x, cfg)
    bar = tqdm(total=cfg.anneal_iters + cfg.final_iters, desc="MAP stage", leave=False, disable=not progress)
    with torch.no_grad():
        for s in np.geomspace(max(s0, s_s), s_s, cfg.anneal_iters):
            x = step(x, s)
            bar.update()
        result = anderson(lambda v: step(v, s_s), x, cfg.final_iters, cfg.anderson_memory, cfg.tol, bar.update)
    bar.close()
    if not result.converged:
        warnings.warn(
            f"MAP-RPS stage 1 hit its cap of {cfg.final_iters} iterations at s_s = {s_s:.3g} before "
            f"converging: residual ratio {float(result.ratio.max()):.2e} > tol {cfg.tol:g} "
            f"(raise stage1.final_iters or stage1.anderson_memory)",
            ConvergenceWarning,
            stacklevel=3,
        )
    return result.x, result


@dataclasses.dataclass
class AndersonResult:
    """Outcome of :func:`anderson`: the iterate, iterations used, and per-sample residual ratios
    |T(x) − x| / |T(x₀) − x₀| at the last evaluation (converged: every ratio ≤ tol)."""

    x: torch.Tensor
    iters: int
    ratio: torch.Tensor
    converged: bool


def anderson(
    fixed_map, x: torch.Tensor, max_iters: int, memory: int, tol: float = 0.0, callback=lambda: None
) -> AndersonResult:
    """Anderson acceleration (type II) of x ← T(x), per sample: with residuals f = T(x) − x,
    γ = argmin |f_k − ΔF γ|, x ← x + f_k − (ΔX + ΔF) γ. Linear T: a Krylov method (exact after n+1
    steps with memory ≥ n); memory 0 is plain iteration. Stops as soon as every sample's residual
    has fallen to ``tol`` times its first one (then x = T(x) of that evaluation), else after
    ``max_iters`` evaluations of T."""
    shape, dxs, dfs, prev, f0 = x.shape, [], [], None, None
    ratio = torch.full((shape[0],), float("inf"))
    for it in range(1, max_iters + 1):
        fx = fixed_map(x)
        callback()
        f, xf = (fx - x).flatten(1), x.flatten(1)
        norm = f.double().norm(dim=1).cpu()
        f0 = norm.clamp_min(1e-300) if f0 is None else f0
        ratio = norm / f0
        if bool((ratio <= tol).all()) or bool((norm == 0).all()):
            return AndersonResult(fx, it, ratio, True)
        if prev is not None and memory > 0:
            dxs, dfs = (dxs + [xf - prev[0]])[-memory:], (dfs + [f - prev[1]])[-memory:]
        prev = (xf, f)
        if not dfs:
            x = fx
            continue
        dF, dX = torch.stack(dfs, 2).double(), torch.stack(dxs, 2).double()  # (B, n, m)
        gram = dF.transpose(1, 2) @ dF
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        ridge = (1e-10 * gram.diagonal(dim1=1, dim2=2).mean(1) + 1e-300)[:, None, None] * eye  # keeps it solvable
        gamma = torch.linalg.solve(gram + ridge, dF.transpose(1, 2) @ f.double()[..., None])
        x = (xf + f - ((dX + dF) @ gamma)[..., 0].to(f)).view(shape)
    return AndersonResult(x, max_iters, ratio, False)


class MapRPS:
    """``MapRPS(model, operator, y, sigma_y, renoise=0.3, stage2="clamp"|"dps"|sampler, ...)``.

    ``model`` is a pipeline (LMAP-RPS: everything on VAE latents, A∘Dec) or a Denoiser (pixel).
    ``stage2`` is a name in :data:`STAGE2` (built with ``stage2_kwargs``) or any object with
    ``problem``, ``grid`` and ``sample(generator, x_start, start)``, e.g. an exact test sampler."""

    def __init__(
        self,
        model,
        operator,
        y: torch.Tensor,
        sigma_y: float,
        renoise: float = 0.3,
        stage2: Union[str, object] = "clamp",
        stage1: Optional[Stage1Config] = None,
        stage2_kwargs: Optional[dict] = None,
        progress: bool = False,
        denoiser_kwargs: Optional[dict] = None,
    ):
        if sigma_y is None or not 0 < sigma_y < float("inf"):
            raise ValueError(
                f"MAP-RPS: sigma_y (measurement noise std, used by stage 1) must be finite and > 0, got {sigma_y}"
            )
        self.stage1_config = stage1 or Stage1Config()
        self.stage1_config.check()
        if isinstance(stage2, str):
            if stage2 not in STAGE2:
                raise ValueError(f"MAP-RPS: unknown stage-2 sampler {stage2!r}; valid: {', '.join(STAGE2)}")
            renoise_start(renoise, 1)  # validate the knob before building anything heavy
            kw = dict(stage2_kwargs or {})
            # the residual-normalised DPS step does not use σ_y (DPS refuses it); everything else does
            s2_sigma = None if stage2 == "dps" and kw.get("guidance", "residual") == "residual" else sigma_y
            stage2 = STAGE2[stage2](
                model, operator, y, s2_sigma, progress=progress, denoiser_kwargs=denoiser_kwargs, **kw
            )
        self.stage2 = stage2
        self.problem = dataclasses.replace(stage2.problem, sigma_y=float(sigma_y))  # stage 1's problem
        self.start = renoise_start(renoise, len(stage2.grid) - 1)
        self.progress, self.renoise, self.stage1_result = progress, renoise, None

    def stage1(self) -> torch.Tensor:
        """x̂ (state space): the MAP estimate at smoothing s_s (``self.stage1_result``: iterations,
        residual ratios, converged)."""
        x_hat, self.stage1_result = map_stage(self.problem, self.stage1_config, progress=self.progress)
        return x_hat

    def sample(self, generator: Optional[torch.Generator] = None, x_hat: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The final state; pass ``x_hat`` to reuse one stage-1 result across knob values."""
        steps = len(self.stage2.grid) - 1
        if self.start == 0:  # t* = T: stage 2 from its own pure-noise start
            return self.stage2.sample(generator)
        x_hat = self.stage1() if x_hat is None else x_hat
        if self.start == steps:  # t* = 0
            return x_hat
        s_k = float(self.stage2.grid[self.start])
        eps = gaussian_noise(x_hat.shape, generator, x_hat.device, x_hat.dtype)
        return self.stage2.sample(generator, x_start=x_hat + s_k * eps, start=self.start)

    def __call__(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The reconstruction in image space."""
        return self.problem.output(self.sample(generator))

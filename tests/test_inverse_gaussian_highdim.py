"""Known answers above 32 dimensions: a 48-dimensional Gaussian prior with a non-diagonal covariance
and a non-zero mean, a blur-and-mask operator (24 of 48 blurred samples observed), σ_y = 0.1, and
the exact denoiser (docs/inverse.md, "Closed forms behind the Gaussian tests"). The posterior N(m(y), C) is
closed form."""

from __future__ import annotations

import warnings

import pytest
import torch

from align.inverse import CLAMP, DPS, GaussianDenoiser, MapRPS, MatrixOperator, Stage1Config
from align.inverse.map_rps import ConvergenceWarning

DT = torch.float64
N = 48


def _blur_mask_problem(batch: int, prior: str = "wishart", seed: int = 1, sy: float = 0.1):
    """A = rows of a Gaussian blur (width 1.5 samples) at 24 random positions; x ~ N(μ, Σ),
    y = A x + σ_y n, μ ~ N(0, I). Priors: "wishart", Σ = W Wᵀ + 0.05 I (W Gaussian; eigenvalues
    0.05–3.4, a badly conditioned MAP problem), or "smooth", Σ_ij = 0.8 exp(−(i−j)²/32) + 0.05 δ_ij
    (a smooth signal, so the 24 blurred samples pin down most of it)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(N, dtype=DT)
    if prior == "wishart":
        w = torch.randn(N, N, generator=g, dtype=DT) / N**0.5
        cov = w @ w.T + 0.05 * torch.eye(N, dtype=DT)
    else:
        cov = 0.8 * torch.exp(-0.5 * ((t[:, None] - t[None]) / 4.0) ** 2) + 0.05 * torch.eye(N, dtype=DT)
    mu = torch.randn(N, generator=g, dtype=DT)
    kernel = torch.exp(-0.5 * ((t[:, None] - t[None]) / 1.5) ** 2)
    rows = torch.sort(torch.randperm(N, generator=g)[: N // 2]).values
    a = (kernel / kernel.sum(1, keepdim=True))[rows]
    x = mu + torch.randn(batch, N, generator=g, dtype=DT) @ torch.linalg.cholesky(cov).T
    y = x @ a.T + sy * torch.randn(batch, a.shape[0], generator=g, dtype=DT)
    return cov, mu, a, y, sy


def _posterior(cov, mu, a, y, sy, s_smooth: float = 0.0):
    """The linear-Gaussian posterior with the prior smoothed to N(μ, Σ + s² I): (C, m(y))."""
    cov_s = cov + s_smooth**2 * torch.eye(N, dtype=DT)
    c = torch.linalg.inv(torch.linalg.inv(cov_s) + a.T @ a / sy**2)
    return c, (torch.linalg.solve(cov_s, mu) + y @ a / sy**2) @ c


@pytest.mark.parametrize("prior,info", [("wishart", 0.6), ("smooth", 0.1)])
def test_fixture_is_non_diagonal_with_a_non_zero_mean_and_a_posterior_far_from_the_prior(prior, info):
    cov, mu, a, y, sy = _blur_mask_problem(batch=4, prior=prior)
    off = cov - torch.diag(cov.diagonal())
    assert float(off.abs().max()) > 0.3 * float(cov.diagonal().min()) and float(mu.abs().max()) > 1.0
    c, m = _posterior(cov, mu, a, y, sy)
    assert float(torch.trace(c)) < info * float(torch.trace(cov))  # the data carry information
    assert float((m - mu).norm(dim=1).min()) > 0.5 * float(torch.trace(c)) ** 0.5  # the data move the mean


@pytest.mark.parametrize("prior", ["wishart", "smooth"])
def test_map_rps_stage1_defaults_converge_to_the_posterior_mean_at_48_dimensions(prior):
    """Stage 1's fixed point is the smoothed MAP (closed form); at s_s = 0.002 it is within
    O(s_s²) of the MMSE m(y). The defaults must reach it without hitting their cap."""
    cov, mu, a, y, sy = _blur_mask_problem(batch=8, prior=prior)
    den = GaussianDenoiser(mu, cov)
    rps = MapRPS(den, MatrixOperator(a), y, sy, renoise=0.0, stage2="dps")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        x_hat = rps.stage1()
    assert rps.stage1_result.converged and rps.stage1_result.iters < 200  # the pixel default cap
    c, m = _posterior(cov, mu, a, y, sy)
    _, map_s = _posterior(cov, mu, a, y, sy, s_smooth=den.sigma_min)
    scale = float(torch.trace(c)) ** 0.5
    assert float((x_hat - map_s).norm(dim=1).max()) < 1e-4 * scale  # converged to the fixed point
    assert float((x_hat - m).norm(dim=1).max()) < 1e-4 * scale  # and that is the posterior mean


def test_map_rps_stage1_warns_when_its_cap_is_hit_and_says_which_settings_to_raise():
    """The old defaults (memory 5, 20 iterations) stop 0.1 √tr C away from m(y) at 48-d: now a warning."""
    cov, mu, a, y, sy = _blur_mask_problem(batch=8)
    rps = MapRPS(
        GaussianDenoiser(mu, cov),
        MatrixOperator(a),
        y,
        sy,
        renoise=0.0,
        stage2="dps",
        stage1=Stage1Config(anderson_memory=5, final_iters=20),
    )
    with pytest.warns(
        ConvergenceWarning,
        match=r"hit its cap of 20 iterations .*stage1.final_iters or "
        r"stage1.anderson_memory",
    ):
        x_hat = rps.stage1()
    c, m = _posterior(cov, mu, a, y, sy)
    assert not rps.stage1_result.converged
    assert float((x_hat - m).norm(dim=1).max()) > 1e-2 * float(torch.trace(c)) ** 0.5


@pytest.mark.parametrize("bad", [dict(tol=1.0), dict(final_iters=0), dict(anderson_memory=-1)])
def test_bad_stage1_settings_are_one_line_errors_before_any_denoiser_call(bad):
    cov, mu, a, y, sy = _blur_mask_problem(batch=1)
    den = GaussianDenoiser(mu, cov)
    with pytest.raises(ValueError, match=f"stage1.{next(iter(bad))}"):
        MapRPS(den, MatrixOperator(a), y, sy, stage1=Stage1Config(**bad))
    assert den.calls["forward"] == 0


def _clamp_samples(cov, mu, a, y, sy, batch: int, **kw):
    clamp = CLAMP(GaussianDenoiser(mu, cov), MatrixOperator(a), y.expand(batch, -1).clone(), sy, **kw)
    return clamp, clamp.sample(torch.Generator().manual_seed(0))


def test_clamp_uses_sigma_y_and_then_captures_most_of_the_posterior_variance():
    """One y, 500 CLAMP draws (smooth prior: the data pin down most of the signal). CLAMP is not
    marginal-exact at finite N (docs/inverse.md, "Known-answer tests"), so the known answer is a band:
    with σ_n = σ_y (the default) it captures 0.7–1.0 of tr C (measured 0.83–0.84 at 500 and 2000
    draws) and its mean error is under a quarter of the prior-to-posterior move |m(y) − μ| (measured
    0.16); the CLAMP repo's fixed σ_n = 0.01 captures under half (measured 0.35) with a larger mean
    error. Monte Carlo error of these statistics at 500 draws: about 0.02."""
    cov, mu, a, y, sy = _blur_mask_problem(batch=1, prior="smooth", seed=0)
    c, m = _posterior(cov, mu, a, y, sy)
    tr_c = float(torch.trace(c))
    clamp, out = _clamp_samples(cov, mu, a, y, sy, 500)
    assert clamp.config.sigma_n == sy
    capture = float(torch.trace(torch.cov(out.T))) / tr_c
    mean_err = float((out.mean(0) - m[0]).norm())
    assert 0.7 < capture < 1.0, capture
    assert mean_err < 0.25 * float((m[0] - mu).norm()), mean_err
    _, explicit = _clamp_samples(cov, mu, a, y, sy, 50, sigma_n=sy)
    assert torch.equal(_clamp_samples(cov, mu, a, y, sy, 50)[1], explicit)  # the default is σ_n = σ_y exactly
    _, repo = _clamp_samples(cov, mu, a, y, sy, 500, sigma_n=0.01)
    assert float(torch.trace(torch.cov(repo.T))) / tr_c < 0.5
    assert float((repo.mean(0) - m[0]).norm()) > mean_err


def test_dps_refuses_sigma_y_for_its_residual_step_and_uses_it_in_likelihood_mode():
    """Likelihood mode, last step (s' = 0): x' = D − ζ s² K_s Aᵀ(A D − y)/σ_y² (DPS's step with the
    Gaussian likelihood score instead of the normalised residual); it scales as 1/σ_y²."""
    cov, mu, a, y, sy = _blur_mask_problem(batch=2)
    den = GaussianDenoiser(mu, cov)
    with pytest.raises(ValueError, match="sigma_y=0.1 would be ignored"):
        DPS(den, MatrixOperator(a), y, sy)
    with pytest.raises(ValueError, match="needs sigma_y"):
        DPS(den, MatrixOperator(a), y, None, guidance="likelihood")
    x = mu + torch.randn(2, N, generator=torch.Generator().manual_seed(4), dtype=DT)
    for sigma in (sy, 2 * sy):
        dps = DPS(den, MatrixOperator(a), y, sigma, steps=10, scale=0.3, guidance="likelihood")
        s = float(dps.grid[9])
        d = den(x, s)
        want = d - 0.3 * s * s * ((d @ a.T - y) @ a @ den.gain(s)) / sigma**2
        torch.testing.assert_close(dps.sample(None, x_start=x, start=9), want, atol=1e-10, rtol=1e-10)

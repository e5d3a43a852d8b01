"""Known-answer tests of DPS, CLAMP and MAP-RPS on a Gaussian prior with an exact denoiser
(docs/inverse.md, "Known-answer tests" and "Closed forms behind the Gaussian tests"). Closed forms are
re-derived here in torch."""

from __future__ import annotations

import pytest
import torch

from align.inverse import CLAMP, DPS, GaussianDenoiser, MapRPS, MatrixOperator, Stage1Config, gmres, make_problem
from align.inverse.clamp import sigma_split
from align.inverse.denoiser import edm_sigmas

DT = torch.float64


def _fixture(n: int = 6, m: int = 3, batch: int = 4, seed: int = 0, sy: float = 0.1):
    """x0 ~ N(μ, Σ) with diagonal Σ in [0.2, 2], y = A x0 + σ_y n (a 6-D linear-Gaussian problem)."""
    g = torch.Generator().manual_seed(seed)
    sig = torch.diag(torch.rand(n, generator=g, dtype=DT) * 1.8 + 0.2)
    mu = torch.randn(n, generator=g, dtype=DT)
    a = torch.randn(m, n, generator=g, dtype=DT)
    x = mu + torch.randn(batch, n, generator=g, dtype=DT) @ sig.sqrt()
    y = x @ a.T + sy * torch.randn(batch, m, generator=g, dtype=DT)
    return sig, mu, a, x, y, sy


def _posterior(sig, mu, a, y, sy, s_smooth: float = 0.0):
    """The linear-Gaussian posterior with the prior smoothed to N(μ, Σ + s² I): covariance C and mean m(y)
    (= MAP = MMSE)."""
    sig_s = sig + s_smooth**2 * torch.eye(sig.shape[0], dtype=DT)
    cov = torch.linalg.inv(torch.linalg.inv(sig_s) + a.T @ a / sy**2)
    return cov, (torch.linalg.solve(sig_s, mu) + y @ a / sy**2) @ cov


def _sqrtm(c: torch.Tensor) -> torch.Tensor:
    """Symmetric PSD square root (eigenvalues clipped at 0)."""
    w, u = torch.linalg.eigh(c)
    return u @ torch.diag(w.clamp_min(0).sqrt()) @ u.T


def _gaussian_w2(m1, c1, m2, c2) -> float:
    """Gaussian W2: W2² = |m1 − m2|² + tr(C1 + C2 − 2 (C2^½ C1 C2^½)^½)."""
    r2 = _sqrtm(c2)
    val = (m1 - m2).pow(2).sum() + torch.trace(c1 + c2 - 2 * _sqrtm(r2 @ c1 @ r2))
    return float(val.clamp_min(0).sqrt())


# --------------------------------------------------------------------------------- GMRES
def test_gmres_with_k_equal_n_is_the_dense_solve_and_residual_never_increases():
    g = torch.Generator().manual_seed(1)
    n = 10
    mats = torch.randn(3, n, n, generator=g, dtype=DT) + 5 * torch.eye(n, dtype=DT)
    b = torch.randn(3, n, generator=g, dtype=DT)
    matvec = lambda v: (mats @ v[..., None])[..., 0]
    x, res = gmres(matvec, b, n)
    torch.testing.assert_close(x, torch.linalg.solve(mats, b), atol=1e-10, rtol=0)
    assert res.shape == (3, n + 1) and (res[:, -1] < 1e-9).all()
    assert (res[:, 1:] <= res[:, :-1] + 1e-12).all()
    _, res4 = gmres(matvec, b, 4)  # fewer iterations: the same residual history prefix
    torch.testing.assert_close(res4, res[:, :5])


def test_gmres_of_a_zero_right_hand_side_is_zero():
    x, res = gmres(lambda v: 2 * v, torch.zeros(2, 5, dtype=DT), 3)
    assert torch.equal(x, torch.zeros(2, 5, dtype=DT)) and torch.equal(res, torch.zeros(2, 4, dtype=DT))


# ----------------------------------------------------------------------------- CLAMP
@pytest.mark.parametrize("s,s_next", [(80.0, 60.0), (1.0, 0.5), (0.3, 0.0), (2.0, 1.999)])
def test_clamp_noise_split_preserves_variance(s, s_next):
    down, up = sigma_split(s, s_next)
    assert down**2 + up**2 == pytest.approx(s_next**2, rel=1e-12, abs=1e-12)
    if s_next == 0.0:
        assert down == 0.0 and up == 0.0  # the last step is deterministic: x = x̂0 + Δ


def test_clamp_step_equals_the_dense_damped_gauss_newton_solve():
    """CLAMP's linear-Gaussian step: Δ = −(K_s AᵀA/σ_n² + α(λI + ĝĝᵀ))⁻¹ K_s Aᵀ(A x̂0 − y)/σ_n² at the last step."""
    sig, mu, a, _, y, sy = _fixture(batch=2)
    den = GaussianDenoiser(mu, sig)
    clamp = CLAMP(den, MatrixOperator(a), y, sy, steps=5, gmres_iters=6)
    x = 0.7 * torch.randn(2, 6, generator=torch.Generator().manual_seed(3), dtype=DT) + mu
    s = 0.4
    out = clamp.step(x, s, 0.0, None)
    c = clamp.config
    k = den.gain(s)
    x0 = den(x, s)
    s_prior = float(clamp.grid[-2])
    for i in range(2):
        pull = k @ a.T @ (a @ x0[i] - y[i])
        g = x[i] - x0[i]
        alpha = g.norm() / (s_prior**2 * pull.norm())
        gh = g / g.norm()
        mat = k @ a.T @ a / c.sigma_n**2 + alpha * (c.lam_id * torch.eye(6, dtype=DT) + torch.outer(gh, gh))
        delta = -torch.linalg.solve(mat, pull / c.sigma_n**2)
        torch.testing.assert_close(out[i], x0[i] + delta, atol=1e-8, rtol=1e-8)


def test_clamp_without_damping_is_data_consistent():
    """α → 0 with A of full row rank: A(x̂0 + Δ) = y, and the last step outputs x̂0 + Δ."""
    sig, mu, a, _, y, sy = _fixture(batch=3)
    clamp = CLAMP(GaussianDenoiser(mu, sig), MatrixOperator(a), y, sy, steps=8, gmres_iters=6, alpha_scale=0.0)
    out = clamp.sample(torch.Generator().manual_seed(0))
    resid = (out @ a.T - y).norm(dim=1)
    assert (resid < 1e-7 * y.norm(dim=1)).all(), resid
    damped = CLAMP(GaussianDenoiser(mu, sig), MatrixOperator(a), y, sy, steps=8, gmres_iters=6)
    assert ((damped.sample(torch.Generator().manual_seed(0)) @ a.T - y).norm(dim=1) > 1e3 * resid).all()


def _prior_recursion(lam: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """CLAMP's prior-only variance per prior eigenvalue λ: v' = ((λ + s s↓)/(λ + s²))² v + s↑², v_0 = s_max²."""
    v = torch.full_like(lam, float(grid[0]) ** 2)
    for s, s_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        down, up = sigma_split(s, s_next)
        v = ((lam + s * down) / (lam + s * s)) ** 2 * v + up**2
    return v


@pytest.mark.parametrize("prior_only", ["beta0", "A0"])
def test_clamp_prior_only_variance_follows_the_split_recursion_not_the_prior(prior_only):
    lam = torch.tensor([0.05, 0.7, 4.0], dtype=DT)
    batch, steps = 20000, 25
    a = torch.zeros(1, 3, dtype=DT) if prior_only == "A0" else torch.tensor([[1.0, -2.0, 0.5]], dtype=DT)
    y = torch.full((batch, 1), 3.0, dtype=DT)
    clamp = CLAMP(
        GaussianDenoiser(torch.zeros(3, dtype=DT), torch.diag(lam)),
        MatrixOperator(a),
        y,
        0.1,
        steps=steps,
        gmres_iters=1,
        beta=0.0 if prior_only == "beta0" else 1.0,
    )
    out = clamp.sample(torch.Generator().manual_seed(0))
    want = _prior_recursion(lam, clamp.grid)
    se = want * (2.0 / batch) ** 0.5  # std of a sample variance of N Gaussian draws
    assert (out.var(0) - want).abs().max() < 4 * se.max(), (out.var(0), want)
    assert (want - lam).abs()[1] > 10 * se[1]  # at N = 25 the sampler is visibly not marginal-exact
    assert abs(float(want[1]) - 0.403) < 0.01  # docs/inverse.md's value for λ = 0.7, N = 25


# ------------------------------------------------------------------------------- DPS
def test_dps_last_step_moves_along_the_pulled_back_residual_direction():
    """DPS on the Gaussian: ∇_x|y − A D(x)| = K_sᵀ Aᵀ (A D − y)/|A D − y|; at s' = 0, x' = D − ζ√(1+s²) ∇."""
    sig, mu, a, _, y, sy = _fixture(batch=2)
    den = GaussianDenoiser(mu, sig)
    dps = DPS(den, MatrixOperator(a), y, None, steps=10, scale=0.3)
    x = mu + torch.randn(2, 6, generator=torch.Generator().manual_seed(4), dtype=DT)
    out = dps.sample(None, x_start=x, start=9)
    s = float(dps.grid[9])
    d = den(x, s)
    r = d @ a.T - y
    grad = (r / r.norm(dim=1, keepdim=True)) @ a @ den.gain(s)
    torch.testing.assert_close(out, d - 0.3 * (1 + s * s) ** 0.5 * grad, atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------- MAP-RPS
def test_map_stage_converges_to_the_smoothed_map_and_its_error_to_the_mmse_is_order_s_squared():
    sig, mu, a, _, y, sy = _fixture(n=6, m=3, batch=4)
    den = GaussianDenoiser(mu, sig)
    _, mmse = _posterior(sig, mu, a, y, sy)
    errors = []
    for s_s in (0.02, 0.04, 0.08):
        rps = MapRPS(
            den,
            MatrixOperator(a),
            y,
            sy,
            renoise=0.0,
            stage2="dps",
            stage1=Stage1Config(anneal_iters=20, final_iters=30, s_smooth=s_s, anderson_memory=8, tol=1e-9),
        )
        x_hat = rps.stage1()
        assert rps.stage1_result.converged
        _, map_s = _posterior(sig, mu, a, y, sy, s_smooth=s_s)
        torch.testing.assert_close(x_hat, map_s, atol=1e-9, rtol=0)
        errors.append(float((x_hat - mmse).norm()))
    ratios = [errors[1] / errors[0], errors[2] / errors[1]]
    assert all(3.6 < r < 4.4 for r in ratios), (errors, ratios)  # doubling s multiplies the error by ≈ 4


class ExactPosteriorStage2:
    """Exact stage 2 for the linear-Gaussian problem (the reverse-SDE kernel): from z at grid[start] draw
    x0 ~ N(m + C(C+s²)⁻¹(z − m), C − C(C+s²)⁻¹C). Isolates MAP-RPS's own parts (stage 1, knob,
    re-noise) so the D–P curve has a closed form."""

    def __init__(self, problem, cov, mean, grid):
        self.problem, self.cov, self.mean, self.grid = problem, cov, mean, grid

    def sample(self, generator=None, x_start=None, start=0):
        s = float(self.grid[start])
        if x_start is None:
            x_start = s * torch.randn(self.problem.state_shape(), generator=generator, dtype=DT)
        eye = torch.eye(self.cov.shape[0], dtype=DT)
        gain = self.cov @ torch.linalg.inv(self.cov + s * s * eye)
        chol = torch.linalg.cholesky(self.cov - gain @ self.cov + 1e-14 * eye)
        noise = torch.randn(x_start.shape, generator=generator, dtype=DT)
        return self.mean + (x_start - self.mean) @ gain.T + noise @ chol.T


def test_map_rps_distortion_perception_curve_matches_the_gaussian_closed_forms():
    """MAP-RPS's Gaussian D–P curve: MSE(s*) = tr C + Σ c s*²(2c + s*²)/(c + s*²)², output marginal
    N(μ, Σ − C + V(s*)),
    distortion non-decreasing and W2-to-prior non-increasing along the knob."""
    n_mc = 20000
    sig, mu, a, x, y, sy = _fixture(batch=n_mc, seed=5)
    den = GaussianDenoiser(mu, sig, sigma_min=1e-3)
    cov, mean = _posterior(sig, mu, a, y, sy)
    grid = torch.cat([torch.logspace(1, -2, 10, dtype=DT), torch.zeros(1, dtype=DT)])
    stage2 = ExactPosteriorStage2(make_problem(den, MatrixOperator(a), y, sy), cov, mean, grid)
    stage1 = Stage1Config(anneal_iters=10, final_iters=40, s_smooth=0.01, anderson_memory=8, tol=1e-9)
    x_hat = MapRPS(den, MatrixOperator(a), y, sy, renoise=0.5, stage2=stage2, stage1=stage1).stage1()
    torch.testing.assert_close(x_hat, _posterior(sig, mu, a, y, sy, s_smooth=0.01)[1], atol=1e-7, rtol=0)
    assert float((x_hat - mean).pow(2).sum(1).mean()) < 1e-5  # O(s_s²) stage-1 bias ≪ the MC error below
    c_eig, u = torch.linalg.eigh(cov)
    gen = torch.Generator().manual_seed(11)
    mses, w2s = [], []
    for k in range(11):
        r = k / 10
        rps = MapRPS(den, MatrixOperator(a), y, sy, renoise=r, stage2=stage2, stage1=stage1)
        s = float(grid[rps.start]) if rps.start < 10 else 0.0
        out = rps.sample(gen, x_hat=x_hat)
        sq = (out - x).pow(2).sum(1)
        add = c_eig * s * s * (2 * c_eig + s * s) / (c_eig + s * s) ** 2
        mse_pred = float(torch.trace(cov) + add.sum())
        assert abs(float(sq.mean()) - mse_pred) < 4 * float(sq.std()) / n_mc**0.5, (r, float(sq.mean()), mse_pred)
        out_cov = sig - cov + u @ torch.diag(add) @ u.T
        w2_pred = _gaussian_w2(mu, out_cov, mu, sig)
        w2_mc = _gaussian_w2(out.mean(0), torch.cov(out.T), mu, sig)
        # Monte Carlo tolerance of the plug-in W2: its spread and bias over exact draws of the same size
        ref = [
            _gaussian_w2(d.mean(0), torch.cov(d.T), mu, sig)
            for d in (mu + torch.randn(n_mc, 6, generator=gen, dtype=DT) @ _sqrtm(out_cov) for _ in range(6))
        ]
        tol = abs(sum(ref) / len(ref) - w2_pred) + 4 * float(torch.tensor(ref).std()) + 1e-3
        assert abs(w2_mc - w2_pred) < tol, (r, w2_mc, w2_pred, tol)
        mses.append((float(sq.mean()), float(sq.std()) / n_mc**0.5))
        w2s.append(w2_mc)
    assert all(m1 >= m0 - 3 * (e0 + e1) for (m0, e0), (m1, e1) in zip(mses, mses[1:]))
    assert all(p1 <= p0 + 0.02 for p0, p1 in zip(w2s, w2s[1:]))
    assert mses[-1][0] > 1.8 * mses[0][0] and w2s[-1] < 0.2 * w2s[0]  # the curve spans tr C → 2 tr C


@pytest.mark.parametrize("stage2", ["clamp", "dps"])
def test_map_rps_knob_endpoints_are_stage1_and_plain_stage2(stage2):
    sig, mu, a, _, y, sy = _fixture(batch=3)
    den = GaussianDenoiser(mu, sig)
    kw = {"steps": 6}
    x_hat = MapRPS(den, MatrixOperator(a), y, sy, renoise=0.0, stage2=stage2, stage2_kwargs=kw).stage1()
    r0 = MapRPS(den, MatrixOperator(a), y, sy, renoise=0.0, stage2=stage2, stage2_kwargs=kw)
    assert torch.equal(r0.sample(torch.Generator().manual_seed(0)), x_hat)
    r1 = MapRPS(den, MatrixOperator(a), y, sy, renoise=1.0, stage2=stage2, stage2_kwargs=kw)
    plain = r1.stage2.__class__(den, MatrixOperator(a), y, sy if stage2 == "clamp" else None, **kw)
    assert torch.equal(r1.sample(torch.Generator().manual_seed(7)), plain.sample(torch.Generator().manual_seed(7)))
    mid = MapRPS(den, MatrixOperator(a), y, sy, renoise=0.5, stage2=stage2, stage2_kwargs=kw)
    assert mid.start == 3 and not torch.equal(mid.sample(torch.Generator().manual_seed(7)), x_hat)


@pytest.mark.parametrize("renoise", [-0.1, 1.5])
def test_map_rps_knob_outside_unit_interval_is_a_one_line_error(renoise):
    sig, mu, a, _, y, sy = _fixture(batch=1)
    den = GaussianDenoiser(mu, sig)
    with pytest.raises(ValueError, match=r"renoise .* must be in \[0, 1\]"):
        MapRPS(den, MatrixOperator(a), y, sy, renoise=renoise)
    assert den.calls["forward"] == 0


def test_measurement_of_the_wrong_shape_fails_before_any_denoiser_call():
    sig, mu, a, _, y, sy = _fixture(batch=2)
    den = GaussianDenoiser(mu, sig)
    with pytest.raises(ValueError, match="measurement y has shape"):
        CLAMP(den, MatrixOperator(a), torch.zeros(2, 4, dtype=DT), sy)
    with pytest.raises(ValueError, match="sigma_y"):
        CLAMP(den, MatrixOperator(a), y, 0.0)
    assert den.calls["forward"] == 0


def test_edm_grid_drops_sigma_min_and_ends_at_zero():
    g = edm_sigmas(4, 100.0, 0.1)
    assert g.shape == (5,) and float(g[0]) == pytest.approx(100.0) and g[-1] == 0.0
    assert float(g[-2]) == pytest.approx((100 ** (1 / 7) + 0.75 * (0.1 ** (1 / 7) - 100 ** (1 / 7))) ** 7)
    assert (g[1:] < g[:-1]).all()

"""Matrix-free GMRES without restarts, batched over samples (CLAMP's reference code ``_gmres_solve``;
docs/inverse.md, "Parts").

Solves M Δ = b for each row of b (B, n) from Δ₀ = 0: Arnoldi with modified Gram–Schmidt builds an
orthonormal Krylov basis V and the (K+1)×K Hessenberg H with M V_K = V_{K+1} H, then
Δ = V_K argmin_y |β e₁ − H y| (least squares; β = |b|). A sample whose Arnoldi step breaks down
(h_{j+1,j} < tol: the Krylov space is invariant, the solve is exact) stops growing its basis.
"""

from __future__ import annotations

from typing import Callable

import torch


def gmres(
    matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int, tol: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor]:
    """K-step GMRES for M Δ = b on flat rows (B, n). Returns (Δ, residual norms (B, K+1)), where
    ``residuals[:, k]`` is |b − M Δ_k| of the k-step iterate (non-increasing in k)."""
    batch = b.shape[0]
    beta = b.norm(dim=1)
    live = beta > tol
    basis = [torch.where(live[:, None], b / beta.clamp_min(tol)[:, None], torch.zeros_like(b))]
    hess = b.new_zeros((batch, iters + 1, iters))
    for j in range(iters):
        w = matvec(basis[j])
        for i in range(j + 1):  # modified Gram–Schmidt
            h = (basis[i] * w).sum(1)
            hess[:, i, j] = h
            w = w - h[:, None] * basis[i]
        norm = w.norm(dim=1)
        hess[:, j + 1, j] = norm
        live = live & (norm > tol)
        basis.append(torch.where(live[:, None], w / norm.clamp_min(tol)[:, None], torch.zeros_like(w)))
    e1 = torch.zeros((batch, iters + 1), dtype=torch.float64)
    e1[:, 0] = beta.double().cpu()
    h64 = hess.double().cpu()
    residuals = [beta.double().cpu()]
    coeffs = None
    for k in range(1, iters + 1):  # least squares on the leading (k+1)×k block; gelsd copes with breakdown
        coeffs = torch.linalg.lstsq(h64[:, : k + 1, :k], e1[:, : k + 1, None], driver="gelsd").solution
        residuals.append((e1[:, : k + 1, None] - h64[:, : k + 1, :k] @ coeffs).norm(dim=(1, 2)))
    if coeffs is None:
        return torch.zeros_like(b), torch.stack(residuals, 1)
    coeffs = torch.nan_to_num(coeffs[..., 0]).to(b)
    delta = sum(coeffs[:, i, None] * basis[i] for i in range(iters))
    return delta, torch.stack(residuals, 1)

"""Symmetric Attention Decomposition: the per-head math (arXiv 2605.27476, as coded in the reference repo
hyeon-cho/Attention-Symmetric-Decomposition, ``attentions/``; docs/modifiers.md, "Symmetric attention").

Pre-softmax logits ``M = Q Kᵀ`` split into ``M_sym = (M + Mᵀ)/2`` (a Hopfield energy landscape) and
``M_skew = (M − Mᵀ)/2`` (circulation). The knob scales circulation::

    M_α = M_sym + α M_skew = c1 Q Kᵀ + c2 K Qᵀ,   c1 = (1+α)/2,  c2 = (1−α)/2

and is evaluated by SDPA on concatenated heads (never the L×L matrix)::

    q~ = √2 [√|c1| q, √|c2| k],   k~ = [sgn(c1)√|c1| k, sgn(c2)√|c2| q]

SDPA's default scale 1/√(2d) times the √2 restores 1/√d, so ``softmax(q~ k~ᵀ/√(2d)) = softmax(M_α/√d)``.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

Scalar = Union[float, torch.Tensor]

#: |c2| below this: the circulation term vanishes and the perturbed retrieval is the original one.
C2_EPS = 1e-12


def reparam_qk(q: torch.Tensor, k: torch.Tensor, alpha: Scalar) -> tuple[torch.Tensor, torch.Tensor]:
    """(q~, k~) on the head dim such that SDPA(q~, k~) has logits (c1 QKᵀ + c2 KQᵀ)/√d (the reference's
    ``SkewAttnProcessor2_0``)."""
    c1 = (1 + alpha) / 2
    c2 = (1 - alpha) / 2
    a1 = torch.as_tensor(c1, dtype=q.dtype, device=q.device)
    a2 = torch.as_tensor(c2, dtype=q.dtype, device=q.device)
    r1, r2 = a1.abs().sqrt(), a2.abs().sqrt()
    q_t = math.sqrt(2.0) * torch.cat([r1 * q, r2 * k], dim=-1)
    k_t = torch.cat([torch.sign(a1) * r1 * k, torch.sign(a2) * r2 * q], dim=-1)
    return q_t, k_t


def sym_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: Scalar, attn_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """softmax((M_sym + α M_skew)/√d) V without materialising L×L (q, k: (..., L, d), v: (..., L, e))."""
    if isinstance(alpha, float) and abs((1 - alpha) / 2) < C2_EPS:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    q_t, k_t = reparam_qk(q, k, alpha)
    return F.scaled_dot_product_attention(q_t, k_t, v, attn_mask=attn_mask)


def dense_sym_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: float) -> torch.Tensor:
    """Reference: explicit L×L softmax((M_sym + α M_skew)/√d) V (tests only; O(L²) memory)."""
    m = q @ k.transpose(-1, -2)
    mt = m.transpose(-1, -2)
    logits = ((m + mt) / 2 + alpha * (m - mt) / 2) / math.sqrt(q.shape[-1])
    return logits.softmax(-1) @ v


def blend(hx_org: torch.Tensor, hx: torch.Tensor, beta: Scalar) -> torch.Tensor:
    """Blend with bounded norm rescale (the reference's ``get_blended_pattern``), per token over the last dim::

        H_new = H_org + β (H − H_org);  out = H_new · clamp(|H| / |H_new|, 0.25, 4)

    In fp32, NaN/inf → 0, cast back. β = 1 returns ``hx`` itself (ratio 1)."""
    if isinstance(beta, (int, float)) and beta == 1:
        return hx
    h_org, h = hx_org.float(), hx.float()
    new = h_org + beta * (h - h_org)
    ratio = (h.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True)).clamp(0.25, 4.0)
    out = torch.nan_to_num(new * ratio, nan=0.0, posinf=0.0, neginf=0.0)
    return out.to(hx.dtype)


def effective_weight(linear: torch.nn.Module, in_features: int, like: torch.Tensor) -> torch.Tensor:
    """(out, in) weight of a linear map *as the module computes it* (LoRA deltas included):
    W = f(I) − f(0). Reading ``.weight`` would return peft's base weight and drop the LoRA (docs/modifiers.md,
    "Symmetric attention")."""
    eye = torch.eye(in_features, dtype=like.dtype, device=like.device)
    return (linear(eye) - linear(torch.zeros_like(eye[:1]))).T


def head_couplings(wq: torch.Tensor, wk: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head W_h = Wq_hᵀ Wk_h (C×C), returned as (S, N) = ((W+Wᵀ)/2, (W−Wᵀ)/2): (H, C, C) each (as in the
    reference's ``symmetry_attn_vx_eta.py``)."""
    d = wq.shape[0] // heads
    wq_h = wq.view(heads, d, -1)
    wk_h = wk.view(heads, d, -1)
    w = wq_h.transpose(1, 2) @ wk_h
    wt = w.transpose(1, 2)
    return (w + wt) / 2, (w - wt) / 2


def eta_m(x: torch.Tensor, sym: torch.Tensor, skew: torch.Tensor) -> torch.Tensor:
    """Functional symmetricity (Tanaka & Edwards, arXiv 1810.09325, as the reference's adaptive variant uses it)
    η_M = (|M_sym|²_F − |M_skew|²_F)/(|M_sym|²_F + |M_skew|²_F) of M(X) = X W Xᵀ, via the Gram G = XᵀX:
    |M_sym|² = tr(SGSG), |M_skew|² = tr(NᵀGNG).

    x: (B, L, C); sym/skew: (H, C, C). Returns (B, H) in [−1, 1]; no L×L matrix."""
    g = x.transpose(1, 2) @ x  # (B, C, C)
    sg = sym.unsqueeze(0) @ g.unsqueeze(1)  # (B, H, C, C)
    ng = skew.unsqueeze(0) @ g.unsqueeze(1)
    ntg = skew.transpose(1, 2).unsqueeze(0) @ g.unsqueeze(1)
    e_sym = (sg * sg.transpose(-1, -2)).sum((-1, -2))  # tr(SG SG)
    e_skew = (ntg * ng.transpose(-1, -2)).sum((-1, -2))  # tr(NᵀG NG)
    return (e_sym - e_skew) / (e_sym + e_skew).clamp_min(torch.finfo(x.dtype).tiny)


def effective_alpha(alpha: float, eta: Optional[torch.Tensor], mode: Optional[str]) -> Scalar:
    """α_eff: fixed α; ``dev``: 1 + (α−1)η (identity at α=1); ``scale``: αη (not identity at α=1), as the
    reference's ``alpha_mode``."""
    if mode is None or eta is None:
        return alpha
    return ALPHA_MODES[mode](alpha, eta)


ALPHA_MODES = {"dev": lambda a, eta: 1 + (a - 1) * eta, "scale": lambda a, eta: a * eta}


def hopfield_diagnostics(x: torch.Tensor, hx: torch.Tensor, sym: torch.Tensor) -> dict[str, torch.Tensor]:
    """Hopfield stability of retrieved patterns (the reference's ``hopfield_energy/log_energy.py``), per
    (batch, head, channel c) column s_c of Hx.

    X is centred over tokens; s_c centred and unit-normalised. z = Xᵀ s_c; energy E_c = −½ zᵀ S z;
    local field h = X S z; instability r = mean_l[s_l h_l < 0]; alignment = cos(s_c, h).
    x: (B, L, C); hx: (B, H, L, C); sym: (H, C, C). Returns means over everything (scalars)."""
    xc = x - x.mean(1, keepdim=True)
    s = hx - hx.mean(2, keepdim=True)
    s = s / s.norm(dim=2, keepdim=True).clamp_min(1e-12)
    z = xc.transpose(1, 2).unsqueeze(1) @ s  # (B, H, C_in, C): column c is z of s_c
    sz = sym.unsqueeze(0) @ z  # (B, H, C_in, C)
    energy = -0.5 * (z * sz).sum(2)  # (B, H, C)
    field = xc.unsqueeze(1) @ sz  # (B, H, L, C): column c is h of s_c
    unstable = ((s * field) < 0).float().mean(2)
    align = F.cosine_similarity(s, field, dim=2)
    return {"energy": energy.mean(), "instability": unstable.mean(), "alignment": align.mean()}

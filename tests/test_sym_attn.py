"""Symmetric Attention Decomposition: closed-form identities of its math (align/modifiers/sym_attn_math.py)
and the processors (docs/modifiers.md, "Symmetric attention")."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0

from align.backbones.lora import attach_lora
from align.modifiers.sym_attn import (
    SymAttnSettings,
    SymJointAttnProcessor,
    SymSelfAttnProcessor,
    layer_settings,
    sym_processors,
)
from align.modifiers.sym_attn_math import (
    blend,
    dense_sym_attention,
    effective_weight,
    eta_m,
    head_couplings,
    hopfield_diagnostics,
    reparam_qk,
    sym_sdpa,
)

ATTN1 = "mid_block.attentions.0.transformer_blocks.0.attn1"


def _qkv(b=2, h=3, length=7, d=5, e=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, h, length, d, generator=g, dtype=dtype),
        torch.randn(b, h, length, d, generator=g, dtype=dtype),
        torch.randn(b, h, length, e, generator=g, dtype=dtype),
    )


@pytest.mark.parametrize("alpha", [1.0, 1.05, 0.0, -0.5, 2.0, -1.0])
def test_reparameterised_sdpa_equals_dense_softmax(alpha: float) -> None:
    q, k, v = _qkv()
    torch.testing.assert_close(sym_sdpa(q, k, v, alpha), dense_sym_attention(q, k, v, alpha), rtol=0, atol=1e-12)


def test_reparameterisation_builds_head_dim_2d_not_length_squared() -> None:
    q, k, _ = _qkv(length=64, d=5)
    qt, kt = reparam_qk(q, k, 1.2)
    assert qt.shape == kt.shape == (*q.shape[:-1], 2 * q.shape[-1])


def test_alpha_minus_one_transposes_the_logits_and_zero_symmetrises_them() -> None:
    q, k, v = _qkv()
    d = q.shape[-1]
    transposed = torch.softmax(k @ q.transpose(-1, -2) / math.sqrt(d), -1) @ v
    torch.testing.assert_close(sym_sdpa(q, k, v, -1.0), transposed, rtol=0, atol=1e-12)
    m = q @ k.transpose(-1, -2)
    symmetric = torch.softmax((m + m.transpose(-1, -2)) / 2 / math.sqrt(d), -1) @ v
    torch.testing.assert_close(sym_sdpa(q, k, v, 0.0), symmetric, rtol=0, atol=1e-12)


def test_skew_part_never_changes_a_quadratic_form() -> None:
    q, k, _ = _qkv()
    m = q @ k.transpose(-1, -2)
    m_sym, m_skew = (m + m.transpose(-1, -2)) / 2, (m - m.transpose(-1, -2)) / 2
    s = torch.randn(*m.shape[:-1], 1, dtype=m.dtype)
    form = lambda a: (s.transpose(-1, -2) @ a @ s).squeeze()  # noqa: E731
    torch.testing.assert_close(form(m), form(m_sym), rtol=1e-12, atol=1e-10)
    assert form(m_skew).abs().max() < 1e-10


def test_eta_gram_identity_matches_explicit_frobenius_norms() -> None:
    g = torch.Generator().manual_seed(1)
    heads, d, c, length = 2, 3, 6, 9
    wq, wk = (
        torch.randn(heads * d, c, generator=g, dtype=torch.float64),
        torch.randn(heads * d, c, generator=g, dtype=torch.float64),
    )
    x = torch.randn(2, length, c, generator=g, dtype=torch.float64)
    sym, skew = head_couplings(wq, wk, heads)
    eta = eta_m(x, sym, skew)
    for b in range(2):
        for h in range(heads):
            m = (x[b] @ wq[h * d : (h + 1) * d].T) @ (x[b] @ wk[h * d : (h + 1) * d].T).T
            e_sym, e_skew = ((m + m.T) / 2).pow(2).sum(), ((m - m.T) / 2).pow(2).sum()
            assert eta[b, h].item() == pytest.approx(((e_sym - e_skew) / (e_sym + e_skew)).item(), abs=1e-12)


def test_eta_endpoints_symmetric_and_skew_couplings() -> None:
    g = torch.Generator().manual_seed(2)
    c = 5
    x = torch.randn(1, 8, c, generator=g, dtype=torch.float64)
    w = torch.randn(c, c, generator=g, dtype=torch.float64)
    sym, skew = head_couplings(w, w, 1)  # Wq = Wk ⇒ W = WqᵀWq symmetric ⇒ η = 1
    assert eta_m(x, sym, skew).item() == pytest.approx(1.0, abs=1e-12)
    a = w - w.T  # Wq = I, Wk = A skew ⇒ W = A ⇒ η = −1
    sym, skew = head_couplings(torch.eye(c, dtype=torch.float64), a, 1)
    assert eta_m(x, sym, skew).item() == pytest.approx(-1.0, abs=1e-12)


def test_blend_keeps_the_perturbed_token_norm() -> None:
    """Inside the clamp range, |output_token| = |Hx_token| (the bounded norm rescale of ``blend``)."""
    g = torch.Generator().manual_seed(3)
    h_org = torch.randn(2, 3, 5, 4, generator=g)
    h = h_org + 0.1 * torch.randn(2, 3, 5, 4, generator=g)
    out = blend(h_org, h, 3.0)
    torch.testing.assert_close(out.norm(dim=-1), h.norm(dim=-1), rtol=1e-5, atol=1e-6)
    assert blend(h_org, h, 1.0) is h


def test_hopfield_eigenvector_is_aligned_and_stable() -> None:
    """s an eigenvector of X S Xᵀ with positive eigenvalue ⇒ Align = 1, r_X = 0, E = −λ/2 (``hopfield_diagnostics``)."""
    g = torch.Generator().manual_seed(4)
    length, c = 10, 4
    x = torch.randn(1, length, c, generator=g, dtype=torch.float64)
    x = x - x.mean(1, keepdim=True)
    w = torch.randn(c, c, generator=g, dtype=torch.float64)
    sym = (w @ w.T).unsqueeze(0)  # positive semi-definite coupling
    evals, evecs = torch.linalg.eigh(x[0] @ sym[0] @ x[0].T)
    s = evecs[:, -1]  # top eigenvector (centred: it lies in range(X))
    hx = s.view(1, 1, length, 1).expand(1, 1, length, c)  # every channel column retrieves s
    diag = hopfield_diagnostics(x, hx, sym)
    assert diag["alignment"].item() == pytest.approx(1.0, abs=1e-9)
    assert diag["instability"].item() == 0.0
    assert diag["energy"].item() == pytest.approx(-0.5 * evals[-1].item(), rel=1e-9)


# ------------------------------------------------------------------------------- processors
def _attn1(pipe):
    return dict(pipe.unet.named_modules())[ATTN1]


def _x(attn, length=16, seed=0):
    return torch.randn(2, length, attn.to_q.in_features, generator=torch.Generator().manual_seed(seed))


def test_alpha_one_dispatches_to_the_stock_processor_bit_for_bit(tiny_unet_pipe) -> None:
    attn, x = _attn1(tiny_unet_pipe), _x(_attn1(tiny_unet_pipe))
    stock = AttnProcessor2_0()(attn, x)
    for st in (SymAttnSettings(1.0, 3.0), SymAttnSettings(1.0, 5.0, "exact", "dev", True)):
        assert torch.equal(SymSelfAttnProcessor(st)(attn, x), stock)


def test_cross_attention_is_untouched(tiny_unet_pipe) -> None:
    attn = dict(tiny_unet_pipe.unet.named_modules())[ATTN1.replace("attn1", "attn2")]
    x = torch.randn(2, 16, attn.to_q.in_features)
    ctx = torch.randn(2, 5, attn.to_k.in_features)
    proc = SymSelfAttnProcessor(SymAttnSettings(1.5, 3.0, "exact"))
    assert torch.equal(proc(attn, x, encoder_hidden_states=ctx), AttnProcessor2_0()(attn, x, encoder_hidden_states=ctx))


def test_exact_and_fast_variants_agree_at_beta_one_and_differ_otherwise(tiny_unet_pipe) -> None:
    attn = _attn1(tiny_unet_pipe)
    attn.to_v.bias = torch.nn.Parameter(torch.randn(attn.to_v.out_features) * 0.5)  # bias: P(XWᵀ+b) = (PX)Wᵀ+b
    x = _x(attn)
    fast = SymSelfAttnProcessor(SymAttnSettings(1.3, 1.0, "fast"))(attn, x)
    exact = SymSelfAttnProcessor(SymAttnSettings(1.3, 1.0, "exact"))(attn, x)
    torch.testing.assert_close(fast, exact, rtol=1e-5, atol=1e-5)
    assert not torch.equal(fast, AttnProcessor2_0()(attn, x))
    fast3 = SymSelfAttnProcessor(SymAttnSettings(1.3, 3.0, "fast"))(attn, x)
    exact3 = SymSelfAttnProcessor(SymAttnSettings(1.3, 3.0, "exact"))(attn, x)
    assert (fast3 - exact3).abs().max() > 1e-4  # the β-rescale norms run over d_head vs C: different methods


def test_processor_matches_explicit_dense_attention_of_the_module(tiny_unet_pipe) -> None:
    """Fast variant, β=1: out = to_out(softmax((M_sym + α M_skew)/√d) to_v(x)) computed densely."""
    attn, alpha = _attn1(tiny_unet_pipe), 1.2
    x = _x(attn)
    heads = attn.heads
    split = lambda t: t.view(2, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
    hv = dense_sym_attention(split(attn.to_q(x)), split(attn.to_k(x)), split(attn.to_v(x)), alpha)
    expected = attn.to_out[0](hv.transpose(1, 2).reshape(2, -1, attn.to_v.out_features))
    got = SymSelfAttnProcessor(SymAttnSettings(alpha, 1.0))(attn, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["exact", "fast"])
def test_lora_on_to_v_is_honoured(tiny_unet_pipe, variant: str) -> None:
    """The reference reads ``attn.to_v.weight``: under peft that is the *base* weight, so a LoRA on
    to_v is silently dropped (docs/modifiers.md, "Symmetric attention"). Our processors go through the
    module: the LoRA changes the output."""
    attn = _attn1(tiny_unet_pipe)
    x = _x(attn)
    proc = SymSelfAttnProcessor(SymAttnSettings(1.2, 3.0, variant))
    before = proc(attn, x)
    base_weight = attn.to_v.weight.detach().clone()
    attach_lora(tiny_unet_pipe, "policy", rank=4, target_modules=["to_v"], init_lora_weights=False)
    lora_v = _attn1(tiny_unet_pipe).to_v
    assert torch.equal(lora_v.weight, base_weight), "peft's .weight is the base weight: the reference bug's cause"
    after = proc(_attn1(tiny_unet_pipe), x)
    assert (after - before).abs().max() > 1e-4, "LoRA on to_v was bypassed"
    w_eff = effective_weight(lora_v, x.shape[-1], x)
    assert not torch.allclose(w_eff, base_weight)


def test_eta_adaptive_variant_records_eta_and_diagnostics(tiny_unet_pipe) -> None:
    attn, x = _attn1(tiny_unet_pipe), _x(_attn1(tiny_unet_pipe))
    proc = SymSelfAttnProcessor(SymAttnSettings(1.2, 3.0, "exact", "dev", True, diagnostics=True))
    out = proc(attn, x)
    assert torch.isfinite(out).all()
    assert -1.0 <= proc.last["eta_m"] <= 1.0
    assert {"energy", "instability", "alignment"} <= set(proc.last)


def test_per_layer_settings_by_module_name(tiny_unet_pipe) -> None:
    stock = tiny_unet_pipe.unet.attn_processors
    base = SymAttnSettings(1.05, 3.0)
    procs = sym_processors(stock, base, {"up_blocks.*": {"alpha": 1.2}, "mid_block.*": {"alpha": 1.0}})
    for name, proc in procs.items():
        if ".attn2." in name or name.startswith("mid_block"):
            assert proc is stock[name]
        else:
            want = 1.2 if name.startswith("up_blocks") else 1.05
            assert isinstance(proc, SymSelfAttnProcessor) and proc.settings.alpha == want
    assert layer_settings("down_blocks.0.x.attn1.processor", base, {}) is base


def test_joint_processor_with_qk_norm_matches_stock_near_alpha_one(tiny_dit_pipe) -> None:
    """α = 1 + 1e-9 runs the reparameterised path (c2 ≠ 0) on SD3's joint attention with RMS QK-norm,
    image+text concatenation and to_add_out: it must reproduce JointAttnProcessor2_0 to float precision."""
    attn = tiny_dit_pipe.transformer.transformer_blocks[0].attn
    assert attn.norm_q is not None and attn.norm_added_q is not None
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 16, 32, generator=g), torch.randn(2, 6, 32, generator=g)
    stock = JointAttnProcessor2_0()(attn, x, ctx)
    near = SymJointAttnProcessor(SymAttnSettings(1.0 + 1e-9, 1.0))(attn, x, ctx)
    for a, b in zip(stock, near):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    far = SymJointAttnProcessor(SymAttnSettings(1.3, 3.0))(attn, x, ctx)
    assert (far[0] - stock[0]).abs().max() > 1e-4 and (far[1] - stock[1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="joint attention supports variant=fast"):
        SymJointAttnProcessor(SymAttnSettings(1.3, 3.0, "exact"))

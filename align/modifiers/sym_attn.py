"""Symmetric Attention Decomposition (arXiv 2605.27476) as diffusers attention processors (docs/modifiers.md,
"Symmetric attention"; the reference repo is hyeon-cho/Attention-Symmetric-Decomposition).

* :class:`SymSelfAttnProcessor` — UNet self-attention (``attn1``). Two variants:
  ``exact`` retrieves in X space like the reference repo (``Hx = P_α X`` per head, then the value
  projection through the ``to_v`` *module*, so a LoRA on ``to_v`` is honoured — the reference reads
  ``attn.to_v.weight``, which under peft is the base weight); ``fast`` uses ``P_α V`` with
  ``V = to_v(x)`` (2.5× attention FLOPs instead of 2H+3). Both blend with β (the reference's
  ``get_blended_pattern``); with β = 1 they agree. Cross-attention (``encoder_hidden_states`` given)
  goes to the stock processor.
* :class:`SymJointAttnProcessor` — SD3's joint attention: ``QKᵀ`` over the concatenated
  image+text tokens is square, so the decomposition applies after QK-norm (RMSNorm) to the whole
  joint matrix (fast variant). We perturb every joint block because each is one self-attention over
  one token set; perturbing only the image–image block is not expressible with the q~/k~ trick.

At α = 1 (fixed, or adaptive ``dev``) every processor calls diffusers' stock processor, so the output
is bit-identical. ``eta_mode`` adapts α (and optionally β) per call from η_M (the reference's
``attentions/symmetry_attn_vx_eta.py``), using LoRA-effective Wq/Wk. ``diagnostics=True`` records
Hopfield energy/instability/alignment (the reference's ``hopfield_energy/log_energy.py``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0

from align.modifiers.protocol import Modifier, register_modifier
from align.modifiers.sym_attn_math import (
    ALPHA_MODES,
    blend,
    effective_alpha,
    effective_weight,
    eta_m,
    head_couplings,
    hopfield_diagnostics,
    sym_sdpa,
)

VARIANTS = ("fast", "exact")


@dataclasses.dataclass
class SymAttnSettings:
    """(α, β) and options of one layer."""

    alpha: float = 1.0
    beta: float = 1.0
    variant: str = "fast"
    eta_mode: Optional[str] = None  # None | "dev" | "scale"
    eta_beta: bool = False  # β_eff = β (1 − η_M)
    diagnostics: bool = False

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r} is not valid; choose one of: {', '.join(VARIANTS)}")
        if self.eta_mode is not None and self.eta_mode not in ALPHA_MODES:
            raise ValueError(
                f"eta_mode {self.eta_mode!r} is not valid; choose one of: {', '.join(ALPHA_MODES)} (or null)"
            )

    @property
    def is_identity(self) -> bool:
        """α = 1 gives vanilla attention for fixed α and for ``dev`` (1 + 0·η); ``scale`` gives αη."""
        return self.alpha == 1.0 and self.eta_mode != "scale" and not self.diagnostics


class _SymBase:
    def __init__(self, settings: SymAttnSettings, name: str = "") -> None:
        self.settings, self.name = settings, name
        self.last: dict[str, float] = {}  # η_M and diagnostics of the last call (opt-in logging)

    def _knobs(self, attn, x: torch.Tensor) -> tuple[object, object, Optional[torch.Tensor]]:
        """(α_eff, β_eff, S) for this call; S (per-head symmetric coupling) only if η or diagnostics need it."""
        st = self.settings
        if st.eta_mode is None and not st.eta_beta and not st.diagnostics:
            return st.alpha, st.beta, None
        c = x.shape[-1]
        sym, skew = head_couplings(effective_weight(attn.to_q, c, x), effective_weight(attn.to_k, c, x), attn.heads)
        if st.eta_mode is None and not st.eta_beta:
            return st.alpha, st.beta, sym
        eta = eta_m(x, sym, skew).mean()  # one scalar per call: mean over batch and heads (as the reference does)
        if st.diagnostics:  # .item() syncs a GPU: only when logging was asked for
            self.last["eta_m"] = float(eta.detach())
        alpha = effective_alpha(st.alpha, eta, st.eta_mode)
        beta = st.beta * (1 - eta) if st.eta_beta else st.beta
        return alpha, beta, sym


class SymSelfAttnProcessor(_SymBase):
    """Drop-in for ``AttnProcessor2_0`` on UNet self-attention; see the module docstring."""

    def __init__(self, settings: SymAttnSettings, name: str = "") -> None:
        super().__init__(settings, name)
        self.stock = AttnProcessor2_0()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or self.settings.is_identity:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, ch, hh, ww = hidden_states.shape
            hidden_states = hidden_states.view(b, ch, hh * ww).transpose(1, 2)
        batch, length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        x = hidden_states
        q, k = attn.to_q(x), attn.to_k(x)
        d = q.shape[-1] // attn.heads
        q = q.view(batch, -1, attn.heads, d).transpose(1, 2)
        k = k.view(batch, -1, attn.heads, d).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        alpha, beta, sym = self._knobs(attn, x)
        if self.settings.variant == "exact":
            out = self._exact(attn, q, k, x, alpha, beta, attention_mask, sym)
        else:
            v = attn.to_v(x).view(batch, -1, attn.heads, d).transpose(1, 2)
            out = self._fast(q, k, v, x, alpha, beta, attention_mask, sym)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * d).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, ch, hh, ww)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _fast(self, q, k, v, x, alpha, beta, mask, sym) -> torch.Tensor:
        """P_α V blended with P V per token over d_head."""
        hv = sym_sdpa(q, k, v, alpha, mask)
        if not (isinstance(beta, (int, float)) and beta == 1):
            hv = blend(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), hv, beta)
        if self.settings.diagnostics:
            xs = x.unsqueeze(1).expand(-1, q.shape[1], -1, -1)
            self._record(x, sym_sdpa(q, k, xs, alpha, mask), sym)
        return hv

    def _exact(self, attn, q, k, x, alpha, beta, mask, sym) -> torch.Tensor:
        """Reference-repo retrieval in X space: Hx = P_α X (per head, dim C), blend over C, then
        out_h = to_v(Hx_h) restricted to head h's outputs (= Hx_h Wv_hᵀ + b_h, LoRA included)."""
        heads, d = q.shape[1], q.shape[-1]
        xs = x.unsqueeze(1).expand(-1, heads, -1, -1)
        hx = sym_sdpa(q, k, xs, alpha, mask)
        if not (isinstance(beta, (int, float)) and beta == 1):
            hx = blend(F.scaled_dot_product_attention(q, k, xs, attn_mask=mask), hx, beta)
        if self.settings.diagnostics:
            self._record(x, hx, sym)
        y = attn.to_v(hx)  # (B, H, L, H·d)
        y = y.view(*y.shape[:-1], heads, d)  # (B, H, L, H', d)
        return torch.diagonal(y, dim1=1, dim2=3).permute(0, 3, 1, 2)  # head h from its own slice

    def _record(self, x, hx, sym) -> None:
        with torch.no_grad():
            self.last.update({k: float(v) for k, v in hopfield_diagnostics(x.float(), hx.float(), sym.float()).items()})


class SymJointAttnProcessor(_SymBase):
    """Drop-in for ``JointAttnProcessor2_0`` (SD3 MMDiT): fast variant on the joint token set, after QK-norm."""

    def __init__(self, settings: SymAttnSettings, name: str = "") -> None:
        if settings.variant != "fast" or settings.diagnostics or settings.eta_mode or settings.eta_beta:
            raise ValueError(
                "sym_attn on SD3 joint attention supports variant=fast without eta/diagnostics "
                f"(layer {name!r}): X-space retrieval is undefined over two token streams"
            )
        super().__init__(settings, name)
        self.stock = JointAttnProcessor2_0()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ):
        if self.settings.is_identity:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        batch, n_img = hidden_states.shape[0], hidden_states.shape[1]

        def heads_of(t: torch.Tensor, d: int) -> torch.Tensor:
            return t.view(batch, -1, attn.heads, d).transpose(1, 2)

        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        d = k.shape[-1] // attn.heads
        q, k, v = heads_of(q, d), heads_of(k, d), heads_of(v, d)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if encoder_hidden_states is not None:
            cq = heads_of(attn.add_q_proj(encoder_hidden_states), d)
            ck = heads_of(attn.add_k_proj(encoder_hidden_states), d)
            cv = heads_of(attn.add_v_proj(encoder_hidden_states), d)
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        st = self.settings
        out = sym_sdpa(q, k, v, st.alpha)
        if st.beta != 1:
            out = blend(F.scaled_dot_product_attention(q, k, v), out, st.beta)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * d).to(q.dtype)
        if encoder_hidden_states is not None:
            out, ctx = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                ctx = attn.to_add_out(ctx)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, ctx) if encoder_hidden_states is not None else out


def is_self_attention(name: str, processor) -> bool:
    """UNet ``attn1`` (self) layers; SD3 joint ``attn``/``attn2`` layers (one token set each)."""
    if isinstance(processor, JointAttnProcessor2_0):
        return True
    return ".attn1." in name or name.startswith("attn1.")


def layer_settings(name: str, base: SymAttnSettings, layers: dict) -> SymAttnSettings:
    """Per-layer (α, β) by module name: the first fnmatch pattern in ``layers`` that matches wins."""
    for pattern, override in layers.items():
        if fnmatch.fnmatch(name.removesuffix(".processor"), pattern):
            return dataclasses.replace(base, **override)
    return base


def sym_processors(stock: dict, base: SymAttnSettings, layers: dict) -> dict:
    """Processor dict for ``set_attn_processor``: symmetric processors on self-attention, stock elsewhere."""
    out = {}
    for name, proc in stock.items():
        if not is_self_attention(name, proc):
            out[name] = proc
            continue
        st = layer_settings(name, base, layers)
        if st.is_identity:
            out[name] = proc
        elif isinstance(proc, JointAttnProcessor2_0):
            out[name] = SymJointAttnProcessor(st, name)
        elif isinstance(proc, AttnProcessor2_0):
            out[name] = SymSelfAttnProcessor(st, name)
        else:
            raise ValueError(
                f"sym_attn: layer {name!r} uses {type(proc).__name__}; supported: AttnProcessor2_0 "
                "(UNet self-attention) and JointAttnProcessor2_0 (SD3)"
            )
    return out


@register_modifier("sym_attn")
@dataclasses.dataclass
class SymAttn(Modifier):
    """``sym_attn``: Symmetric Attention Decomposition on every self-attention layer (α, β global;
    ``layers`` overrides them per module name: ``{"up_blocks.*": {alpha: 1.2}}``, first match wins)."""

    alpha: float = 1.0  # circulation scale; 1 = vanilla attention
    beta: float = 1.0  # blend of the perturbed retrieval into the original (1 = no blend)
    variant: str = "fast"  # fast: P_α to_v(x); exact: X-space retrieval as the reference repo
    eta_mode: Optional[str] = None  # adaptive α from η_M: dev (1+(α−1)η) | scale (αη)
    eta_beta: bool = False  # β_eff = β (1 − η_M)
    diagnostics: bool = False  # record Hopfield energy / instability / alignment per layer
    layers: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self._processors: dict = {}

    def settings(self) -> SymAttnSettings:
        return SymAttnSettings(
            float(self.alpha),
            float(self.beta),
            self.variant,
            self.eta_mode,
            bool(self.eta_beta),
            bool(self.diagnostics),
        )

    def validate(self) -> None:
        base = self.settings()
        valid = {"alpha", "beta", "variant", "eta_mode", "eta_beta", "diagnostics"}
        for pattern, override in self.layers.items():
            if not isinstance(override, dict) or set(override) - valid:
                raise ValueError(f"layers[{pattern!r}] must map to a subset of {sorted(valid)}, got {override!r}")
            dataclasses.replace(base, **override)

    def is_identity(self, pipe=None) -> bool:
        base = self.settings()
        return base.is_identity and all(dataclasses.replace(base, **o).is_identity for o in self.layers.values())

    def attention_processors(self, pipe, stock: dict) -> dict:
        procs = sym_processors(stock, self.settings(), self.layers)
        self._processors = {k: p for k, p in procs.items() if isinstance(p, _SymBase)}
        if not self._processors:
            raise ValueError(f"modifier 'sym_attn': no self-attention layer matched (layers: {sorted(stock)[:4]}...)")
        return procs

    def diagnostics_log(self) -> dict[str, dict[str, float]]:
        """η_M and Hopfield measures of each perturbed layer's last call (empty unless enabled)."""
        return {name: dict(p.last) for name, p in self._processors.items() if p.last}

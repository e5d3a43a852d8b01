"""StayFair: keep a group ratio fixed across guidance scales by offsetting CFG's null branch
(arXiv 2605.28036; reference code Kim-Myeong-Soo/stay-fair; docs/modifiers.md, "StayFair").

* Vanilla null offset, UNet (SD1.5): ``d = E(a) − E(b)`` (e.g. "female" − "male"), per-token unit
  direction ``u = d / (|d|_token + 1e-6)``, ``null'(p) = null + α(p) u``; plain CFG with ``null'``.
  At α = 0 the modifier adds no hook: bit-identical to stock CFG.
* SD3: base ``B`` = encoding of filler tokens in the word slots (CLIP EOT; T5 ``<pad>``) — not E(""),
  so **α = 0 is not stock CFG** unless ``base=empty`` —, ``seq = B + α D/|D|_F``, pooled
  ``Bp + α/√L · Dp/|Dp|`` (L = sequence length).
* FairCFG (3 branches, ``w_fair`` set): ``ε = w ε_pos − (w − w_fair) ε_neg + (1 − w_fair) ε_null``
  with ε_neg from null' and ε_null from the plain null; equals stock CFG(w) at α = 0 or w = w_fair.
* α per prompt: ``alpha`` for all, or ``alpha_table`` (JSON {prompt: α}, e.g. written by
  :func:`align.modifiers.stayfair_estimate.estimate_alpha_table`).
* Classifier-guidance variant (``stayfair_cg``): ``μ ← μ + s σ² ∇ log p(c|x_t)`` with a linear
  classifier trained with a Wasserstein demographic-parity penalty (:mod:`stayfair_estimate`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

import torch

from align.config import ConfigError
from align.modifiers.protocol import Modifier, register_modifier
from align.sampling.hooks import ExtraBranch, StepContext, cfg_combine

BASES = ("auto", "filler", "empty")


# ---------------------------------------------------------------------------------- math
def per_token_unit(d: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """u = d / (|d|_token + eps): each token's vector (last dim) to unit norm (SD1.5 reference)."""
    return d / (d.norm(dim=-1, keepdim=True) + eps)


def frobenius_unit(d: torch.Tensor) -> torch.Tensor:
    """u = d / |d|_F over the whole sequence of each sample (SD3 reference)."""
    return d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (d.ndim - 1)))


def offset_null(null: torch.Tensor, u: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """null'(p) = null + α(p) u, α of shape (B,) broadcast over the embedding dims."""
    return null + alpha.to(null).view(-1, *([1] * (null.ndim - 1))) * u


def fair_cfg(pos: torch.Tensor, neg: torch.Tensor, null: torch.Tensor, w: float, w_fair: float) -> torch.Tensor:
    """3-branch FairCFG: ε = w ε_pos − (w − w_fair) ε_neg + (1 − w_fair) ε_null (StayFair's reference code,
    ``generate/pipelines/fair_cfg_pipeline.py``).
    At w = w_fair the intervention term vanishes and stock CFG(w) is returned bit-exactly."""
    if w == w_fair:
        return cfg_combine(null, pos, w)
    return w * pos - (w - w_fair) * neg + (1 - w_fair) * null


# -------------------------------------------------------------------------- embeddings
@dataclasses.dataclass
class GroupDirection:
    """Offset direction and null base for one pipeline (computed once per pipeline)."""

    u: torch.Tensor  # (1, L, D) unit direction of the sequence embedding
    base: torch.Tensor  # (1, L, D) null base the offset is added to (SD3 filler base)
    pooled_u: Optional[torch.Tensor] = None  # (1, P) SD3 pooled direction, already × 1/√L
    pooled_base: Optional[torch.Tensor] = None  # (1, P)


def group_direction(pipe, words: tuple[str, str], base: str) -> GroupDirection:
    """Without a pooled embedding (SD1.5): u per token of E(a) − E(b), base CFG's null (E("")); with one (SD3,
    SDXL): Frobenius u, pooled u/√L, filler or null base (the null is zeros on SDXL, as its sampler uses).
    Built outside inference mode: the cached tensors also feed the learner's autograd recomputation."""
    with torch.inference_mode(False), torch.no_grad():
        return _group_direction(pipe, words, base)


def _group_direction(pipe, words: tuple[str, str], base: str) -> GroupDirection:
    from align.backbones.adapter import backbone
    from align.sampling.sampler import execution_device

    net, device = backbone(pipe), execution_device(pipe)
    (ea, pa), (eb, pb) = net.encode_single(words[0], device), net.encode_single(words[1], device)
    if not net.pooled:
        return GroupDirection(per_token_unit(ea - eb), net.encode_null(device)[0])
    if base == "empty":
        b, bp = net.encode_null(device)
    else:  # filler ids in the word slot: CLIP's EOT token, T5's pad token (reference gen_image_sd3.py)
        b, bp = net.encode_filler(device)
    d, dp = ea - eb, pa - pb
    pooled_u = dp / dp.norm(dim=-1, keepdim=True).clamp_min(1e-12) / math.sqrt(d.shape[1])
    return GroupDirection(frobenius_unit(d), b, pooled_u, bp)


def prompt_alphas(prompts: list[str], alpha: float, table: dict[str, float]) -> torch.Tensor:
    """α(p) per prompt: the table's value, else the global ``alpha``."""
    return torch.tensor([float(table.get(p, alpha)) for p in prompts], dtype=torch.float32)


# ---------------------------------------------------------------------------- modifiers
@register_modifier("stayfair")
@dataclasses.dataclass
class StayFair(Modifier):
    """``stayfair``: offset CFG's null embedding along a group direction (vanilla), optionally 3-branch."""

    alpha: float = 0.0  # offset scale α (SD1.5 reference table: −15…15; SD3: −250…400)
    alpha_table: str = ""  # JSON {prompt: α}; prompts not in it use ``alpha``
    words: list = dataclasses.field(default_factory=lambda: ["female", "male"])  # d = E(words[0]) − E(words[1])
    base: str = "auto"  # SD3 null base: auto = filler (reference); empty = E("") (α=0 is stock)
    w_fair: Optional[float] = None  # FairCFG's calibrated scale; None = vanilla 2-branch CFG

    def __post_init__(self) -> None:
        self._table: dict[str, float] = {}
        self._directions: dict[int, GroupDirection] = {}

    def validate(self) -> None:
        if not (
            isinstance(self.words, (list, tuple))
            and len(self.words) == 2
            and all(isinstance(w, str) and w.strip() for w in self.words)
        ):
            raise ValueError(f"words must be two non-empty strings [group a, group b], got {self.words!r}")
        if self.base not in BASES:
            raise ValueError(f"base {self.base!r} is not valid; choose one of: {', '.join(BASES)}")
        if not math.isfinite(float(self.alpha)):
            raise ValueError(f"alpha must be finite, got {self.alpha!r}")
        if self.alpha_table:
            path = Path(self.alpha_table)
            if not path.is_file():
                raise ValueError(f"alpha_table file not found: {path}")
            table = json.loads(path.read_text())
            if not isinstance(table, dict) or not all(isinstance(v, (int, float)) for v in table.values()):
                raise ValueError(f"alpha_table {path} must be a JSON object {{prompt: alpha}}")
            self._table = {str(k): float(v) for k, v in table.items()}

    def _sd3_filler(self, pipe) -> bool:
        """The filler null base (pooled families, ``base`` not ``empty``) changes the image even at α = 0."""
        from align.backbones.adapter import backbone

        return pipe is not None and backbone(pipe).pooled and self.base != "empty"

    def is_identity(self, pipe=None) -> bool:
        no_offset = self.alpha == 0 and not any(self._table.values())
        return no_offset and not self._sd3_filler(pipe)

    def direction(self, pipe) -> GroupDirection:
        key = id(pipe)
        if key not in self._directions:
            self._directions[key] = group_direction(pipe, tuple(self.words), self.base)
        return self._directions[key]

    def embeds(self, pipe, embeds: dict, prompts: list[str]) -> dict:
        """null' on ``negative_prompt_embeds`` (+ pooled for SD3); needs CFG (w > 1)."""
        neg = embeds.get("negative_prompt_embeds")
        if neg is None:
            raise ConfigError("modifier 'stayfair' offsets CFG's null branch: it needs sampler.guidance_scale > 1")
        g = self.direction(pipe)
        alpha = prompt_alphas(prompts, self.alpha, self._table)
        out = dict(embeds)
        null = neg if g.pooled_u is None else g.base.to(neg).expand_as(neg)
        out["negative_prompt_embeds"] = offset_null(null, g.u.to(neg), alpha)
        if g.pooled_u is not None:
            pooled = embeds["negative_pooled_prompt_embeds"]
            out["negative_pooled_prompt_embeds"] = offset_null(
                g.pooled_base.to(pooled).expand_as(pooled), g.pooled_u.to(pooled), alpha
            )
        return out

    def extra_branch(self, pipe) -> Optional[ExtraBranch]:
        """FairCFG's plain-null branch (ε_null from the un-offset base) when ``w_fair`` is set."""
        if self.w_fair is None:
            return None
        w_fair = float(self.w_fair)

        def conditioning(batch: int) -> dict:
            g = self.direction(pipe)
            pooled = None if g.pooled_base is None else g.pooled_base.expand(batch, -1)
            return {"prompt_embeds": g.base.expand(batch, -1, -1), "pooled_prompt_embeds": pooled}

        def combine(uncond, cond, extra, w):  # uncond is the offset null' branch (ε_neg)
            return fair_cfg(cond, uncond, extra, w, w_fair)

        return ExtraBranch(conditioning, combine)


@register_modifier("stayfair_cg")
@dataclasses.dataclass
class StayFairCG(Modifier):
    """``stayfair_cg``: classifier guidance μ ← μ + s σ² ∇_x log p(c | x_t) with a (fair) linear
    classifier on flattened latents, saved as safetensors {weight: (D,), bias: ()}; c = class 1.
    (Dhariwal & Nichol 2021 Alg. 1; StayFair's CG variant uses a Wasserstein-DP-trained classifier.)"""

    classifier: str = ""  # safetensors file with weight (D,) and bias ()
    scale: float = 0.0  # guidance scale s; 0 = off
    needs_grad = True

    def __post_init__(self) -> None:
        self._w: Optional[torch.Tensor] = None
        self._b: Optional[torch.Tensor] = None

    def validate(self) -> None:
        if self.scale == 0:
            return
        if not self.classifier or not Path(self.classifier).is_file():
            raise ValueError(f"classifier file not found: {self.classifier!r}")
        from align.checkpoint import load_tensors

        t = load_tensors(Path(self.classifier))
        if set(t) != {"weight", "bias"}:
            raise ValueError(f"classifier {self.classifier} must hold exactly 'weight' and 'bias', got {sorted(t)}")
        self._w, self._b = t["weight"].float().flatten(), t["bias"].float().reshape(())

    def is_identity(self, pipe=None) -> bool:
        return self.scale == 0

    def transition(self, pipe):
        w, b, s = self._w, self._b, float(self.scale)

        def hook(mean: torch.Tensor, std: torch.Tensor, ctx: StepContext):
            x = ctx.sample.detach().flatten(1).float()
            if x.shape[1] != w.numel():
                raise ValueError(f"stayfair_cg: classifier has {w.numel()} inputs, latents have {x.shape[1]}")
            with torch.enable_grad():
                x = x.clone().requires_grad_(True)
                logp = torch.nn.functional.logsigmoid(x @ w.to(x) + b.to(x)).sum()
                (grad,) = torch.autograd.grad(logp, x)
            return mean + s * std.pow(2) * grad.view_as(mean).to(mean), std

        return hook

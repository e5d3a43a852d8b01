"""Group-fairness metrics across guidance scales (StayFair, arXiv 2605.28036, and its reference code
Kim-Myeong-Soo/stay-fair; docs/modifiers.md, "StayFair") and pluggable group classifiers.

* group ratio r(w): fraction of samples classified into the group of interest at scale w;
* bias range: max_w r(w) − min_w r(w), in percentage points (StayFair ``estimate/build_lookup.py``);
* Fairness Discrepancy (Choi et al. 2020): FD = |p̄ − E_x[p̂(x)]|₂ with p̄ uniform over K groups and
  p̂ the classifier's soft group probabilities;
* bias decomposition: B(w) = r(w) − r*, B_m = r(1) − r*, B_g(w) = r(w) − r(1) (StayFair's total bias =
  model bias + guidance bias; these definitions are ours, the paper's equations were not available).

Group classifiers map images (B, 3, H, W) in [0, 1] to probabilities (B, K); register more with
:func:`register_group_classifier`. The toy world's grammar always names a colour, so its group is
the colour the model draws when the prompt leaves the colour out ("two circles on the left"): the
``toy_color`` classifier reads it with the toy checker's own detector (nearest palette colour of the
largest object).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch

GroupClassifier = Callable[[torch.Tensor], torch.Tensor]
GROUP_CLASSIFIERS: dict[str, tuple[GroupClassifier, tuple[str, ...]]] = {}


def register_group_classifier(name: str, groups: Sequence[str]) -> Callable[[GroupClassifier], GroupClassifier]:
    """Register ``fn(images) -> (B, K) probabilities`` over the named ``groups``."""

    def wrap(fn: GroupClassifier) -> GroupClassifier:
        GROUP_CLASSIFIERS[name] = (fn, tuple(groups))
        return fn

    return wrap


def get_group_classifier(name: str) -> tuple[GroupClassifier, tuple[str, ...]]:
    if name not in GROUP_CLASSIFIERS:
        raise ValueError(f"unknown group classifier {name!r}; valid: {', '.join(sorted(GROUP_CLASSIFIERS))}")
    return GROUP_CLASSIFIERS[name]


def _toy_colors() -> tuple[str, ...]:
    from align.toy.world import COLORS

    return tuple(COLORS)


@register_group_classifier("toy_color", _toy_colors())
def toy_color(images: torch.Tensor) -> torch.Tensor:
    """One-hot palette colour of the largest detected object (toy checker's detector); a blank image
    (no object) gets uniform probabilities, so it counts towards no group in particular."""
    from align.toy.checker import detect_objects

    colors = _toy_colors()
    out = torch.full((images.shape[0], len(colors)), 1.0 / len(colors))
    for i, img in enumerate(images):
        objs = detect_objects(img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
        if objs:
            big = max(objs, key=lambda o: o.get("area", 0))
            out[i] = 0.0
            out[i, colors.index(big["color"])] = 1.0
    return out


def group_ratio(probs: torch.Tensor, group: int) -> float:
    """Fraction of samples whose most probable group is ``group`` (hard assignment, as the reference)."""
    return float((probs.argmax(1) == group).float().mean())


def bias_range(ratios: Mapping[float, float] | Sequence[float]) -> float:
    """max − min of r(w) over the guidance sweep, in percentage points."""
    values = list(ratios.values()) if isinstance(ratios, Mapping) else list(ratios)
    return 100.0 * (max(values) - min(values))


def fairness_discrepancy(probs: torch.Tensor) -> float:
    """FD = |p̄ − mean_x p̂(x)|₂, p̄ uniform over the K groups (Choi et al. 2020)."""
    k = probs.shape[1]
    return float((torch.full((k,), 1.0 / k) - probs.float().mean(0)).norm())


def kl_to_uniform(probs: torch.Tensor) -> float:
    """KL(mean p̂ ‖ uniform), the ITI-GEN convention."""
    p = probs.float().mean(0).clamp_min(1e-12)
    return float((p * (p * p.shape[0]).log()).sum())


def bias_decomposition(ratios: Mapping[float, float], target: float) -> dict[str, dict[float, float] | float]:
    """B(w) = r(w) − r*; model bias B_m = r(1) − r* (needs w = 1 in the sweep); guidance bias B_g(w) = r(w) − r(1)."""
    if 1.0 not in ratios:
        raise ValueError("bias_decomposition needs the ratio at w = 1 (the unguided conditional model)")
    r1 = ratios[1.0]
    return {
        "total": {w: r - target for w, r in ratios.items()},
        "model": r1 - target,
        "guidance": {w: r - r1 for w, r in ratios.items()},
    }


def binomial_se(ratio: float, n: int) -> float:
    """Monte Carlo standard error of a ratio from n samples."""
    return float(np.sqrt(max(ratio * (1 - ratio), 1e-12) / n))

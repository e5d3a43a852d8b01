"""Choosing StayFair's α and training its fair classifier (docs/modifiers.md, "StayFair"; the lookup table
follows StayFair's reference code, ``estimate/build_lookup.py`` and ``estimate/apply_lookup.py``).

* :func:`search_alpha` — 1-D coarse-to-fine grid search of α minimising an objective (bias range);
  a grid, not golden section, because a Monte Carlo bias range is piecewise constant in α.
* Lookup table ("StayFair (Estimate)"): :func:`build_lookup` indexes α by the probe counts
  (#group@w_lo, #group@w_hi) of n probe images per prompt, from reference prompts whose bias range
  was measured for each candidate α: K nearest references in (ratio@w_lo, ratio@w_hi), weights
  1/(dist + 0.01); an α is eligible with ≥ ``min_neighbours`` measured neighbours and ≥ 50 % of the
  weight; pick the largest weighted bias-range reduction versus CFG (α = 0), ties → smaller |α|;
  otherwise 0. :func:`probe_counts` and :func:`estimate_alpha_table` run the probes on a pipeline.
* Classifier-guidance variant: :func:`w1_dp_penalty` (1-D Wasserstein-1 between the classifier's
  output laws in two groups = mean |sorted(a) − sorted(b)| on equal-size quantiles) and
  :func:`train_fair_logistic` (logistic regression + λ · W1-DP).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch


def search_alpha(objective: Callable[[float], float], lo: float, hi: float, points: int = 21, rounds: int = 3) -> float:
    """argmin_α objective(α) on [lo, hi]: a grid, then ``rounds − 1`` finer grids around the best point."""
    best = lo
    for _ in range(rounds):
        grid = np.linspace(lo, hi, points)
        values = [objective(float(a)) for a in grid]
        i = int(np.argmin(values))
        best, step = float(grid[i]), (hi - lo) / (points - 1)
        lo, hi = best - step, best + step
    return best


# ------------------------------------------------------------------------------ lookup table
@dataclasses.dataclass
class Reference:
    """One reference prompt: its CFG group ratios at the two probe scales, and the measured bias
    range (percentage points over the w sweep) for each candidate α (α = 0 is plain CFG)."""

    ratio_lo: float
    ratio_hi: float
    bias_range: Mapping[float, float]


def _choose(
    refs: Sequence[Reference],
    point: tuple[float, float],
    candidates: Sequence[float],
    k: int,
    min_neighbours: int,
    min_weight: float,
) -> float:
    dist = np.array([np.hypot(r.ratio_lo - point[0], r.ratio_hi - point[1]) for r in refs])
    near = np.argsort(dist, kind="stable")[:k]
    weights = 1.0 / (dist[near] + 0.01)
    best, best_gain = 0.0, 0.0
    for alpha in sorted(candidates, key=lambda a: (abs(a), a)):
        if alpha == 0:
            continue
        have = [j for j, i in enumerate(near) if alpha in refs[i].bias_range and 0.0 in refs[i].bias_range]
        if len(have) < min_neighbours or weights[have].sum() < min_weight * weights.sum():
            continue
        gain = sum(weights[j] * (refs[near[j]].bias_range[0.0] - refs[near[j]].bias_range[alpha]) for j in have)
        gain /= weights[have].sum()
        if gain > best_gain:  # strict: ties keep the smaller |α| seen first
            best, best_gain = float(alpha), gain
    return best


def build_lookup(
    refs: Sequence[Reference],
    candidates: Sequence[float],
    n_probe: int = 5,
    k: int = 10,
    min_neighbours: int = 5,
    min_weight: float = 0.5,
) -> np.ndarray:
    """(n+1)×(n+1) table: α for probe counts (#group@w_lo, #group@w_hi) out of n each."""
    table = np.zeros((n_probe + 1, n_probe + 1))
    for a in range(n_probe + 1):
        for b in range(n_probe + 1):
            table[a, b] = _choose(refs, (a / n_probe, b / n_probe), candidates, k, min_neighbours, min_weight)
    return table


def apply_lookup(table: np.ndarray, count_lo: int, count_hi: int) -> float:
    n = table.shape[0] - 1
    if not (0 <= count_lo <= n and 0 <= count_hi <= n):
        raise ValueError(f"probe counts ({count_lo}, {count_hi}) outside 0…{n}")
    return float(table[count_lo, count_hi])


def probe_counts(
    pipe,
    prompt: str,
    classify: Callable[[torch.Tensor], torch.Tensor],
    group: int,
    n: int,
    scales: tuple[float, float],
    sampler,
    seed: int,
) -> tuple[int, int]:
    """#images classified into ``group`` among n plain-CFG probes at each of the two scales."""
    from align.sampling import sample_trajectory

    counts = []
    for w in scales:
        cfg = dataclasses.replace(sampler, guidance_scale=w, modifiers=[], output_type="pt")
        traj = sample_trajectory(pipe, [prompt] * n, cfg, torch.Generator().manual_seed(seed))
        counts.append(int((classify(traj.images).argmax(1) == group).sum()))
    return counts[0], counts[1]


def estimate_alpha_table(
    pipe,
    prompts: Sequence[str],
    table: np.ndarray,
    classify,
    group: int,
    scales: tuple[float, float],
    sampler,
    seed: int = 0,
    out: str | Path | None = None,
) -> dict[str, float]:
    """α per prompt from probe counts and the lookup table; optionally written as StayFair's
    ``alpha_table`` JSON."""
    n = table.shape[0] - 1
    alphas = {
        p: apply_lookup(table, *probe_counts(pipe, p, classify, group, n, scales, sampler, seed)) for p in prompts
    }
    if out is not None:
        from align.checkpoint import write_json

        write_json(Path(out), alphas)
    return alphas


def save_lookup(table: np.ndarray, path: str | Path) -> None:
    Path(path).write_text(json.dumps({"table": table.tolist()}))


def load_lookup(path: str | Path) -> np.ndarray:
    return np.asarray(json.loads(Path(path).read_text())["table"], dtype=float)


# --------------------------------------------------------------- fair classifier (CG variant)
def w1_dp_penalty(scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Σ_{g<g'} W1(law(f|g), law(f|g')) for 1-D scores: quantile matching on m = min group size
    points (evenly spaced order statistics of each group), mean |sorted(a) − sorted(b)|."""
    labels = torch.unique(groups)
    total = scores.new_zeros(())
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            a, b = scores[groups == labels[i]].sort().values, scores[groups == labels[j]].sort().values
            m = min(len(a), len(b))
            qa = a[torch.linspace(0, len(a) - 1, m).round().long()]
            qb = b[torch.linspace(0, len(b) - 1, m).round().long()]
            total = total + (qa - qb).abs().mean()
    return total


def train_fair_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    groups: torch.Tensor,
    lam: float,
    steps: int = 500,
    lr: float = 0.05,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression f(x) = aᵀx + b for p(c=1|x), loss = BCE + λ · W1-DP(f | group). Full-batch Adam."""
    g = torch.Generator().manual_seed(seed)
    a = (0.01 * torch.randn(x.shape[1], generator=g, dtype=x.dtype)).requires_grad_(True)
    b = torch.zeros((), dtype=x.dtype, requires_grad=True)
    opt = torch.optim.Adam([a, b], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        f = x @ a + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(f, y.to(f))
        if lam > 0:
            loss = loss + lam * w1_dp_penalty(f, groups)
        loss.backward()
        opt.step()
    return a.detach(), b.detach()

"""The stochastic window of a chain (MixGRPO, Flow-GRPO-Fast, TempFlow-GRPO): SDE steps on a window,
deterministic steps elsewhere, and only the window's steps trained.

A step inside the window is the policy's stochastic transition (DDIM η = ``sampler.eta``, flow SDE
a = ``sampler.noise_level``); a step outside it takes the same distribution at noise scale 0, i.e. DDIM
η = 0 or the flow ODE (``FlowMatchEulerDiscreteScheduler.step``), whose log-prob is 0 and carries no
gradient (align/sampling/transitions.py). The window is either a fixed list of step indices
(``sampler.sde_window``) or ``sampler.sde_window_size`` consecutive steps drawn per batch, with the batch's
seed, inside the first ``sampler.sde_window_span`` of the chain, so every chunk of a batch, on any
rollout worker, gets the same window (align/rollout/requests.py). docs/sampling.md has the details.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np


def window_size(config) -> Optional[int]:  # a fixed window takes precedence over a drawn one
    """Stochastic steps per chain (the same for every batch), or None when every step is stochastic."""
    if config.sde_window:
        return len(config.sde_window)
    return config.sde_window_size or None


def window_starts(config) -> list[int]:
    """Candidate first steps of a drawn window: every start whose window ends inside the first
    ⌈span · T⌉ steps (at least the window's own length): T = 10, size 2, span 0.5 → starts 0 … 3."""
    size = config.sde_window_size
    span = max(size, math.ceil(config.sde_window_span * config.num_inference_steps - 1e-9))
    return list(range(span - size + 1))


def stochastic_steps(config, seed: int) -> Optional[list[int]]:
    """The sorted stochastic step indices of the batch seeded ``seed`` (None: all of them).

    Fixed window: ``sde_window``. Drawn window: ``range(s, s + sde_window_size)`` with ``s`` drawn uniformly
    from :func:`window_starts` by ``numpy.random.default_rng([seed, 0x5DE])``."""
    if config.sde_window:
        return sorted(int(i) for i in config.sde_window)
    if not config.sde_window_size:
        return None
    starts = window_starts(config)
    start = starts[int(np.random.default_rng([int(seed) & (2**63 - 1), 0x5DE]).integers(len(starts)))]
    return list(range(start, start + config.sde_window_size))


def check_window(config) -> None:
    """One-line errors for a window that cannot be drawn on ``num_inference_steps`` steps."""
    steps, fixed, size, span = (
        config.num_inference_steps,
        list(config.sde_window),
        config.sde_window_size,
        config.sde_window_span,
    )
    if any(not isinstance(i, int) or isinstance(i, bool) for i in fixed) or not isinstance(size, int):
        raise ValueError(f"sampler.sde_window and sde_window_size take integers, got {fixed!r} and {size!r}")
    if fixed and (len(set(fixed)) != len(fixed) or not all(0 <= i < steps for i in fixed)):
        raise ValueError(
            f"sampler.sde_window must list distinct step indices in [0, {steps - 1}] "
            f"(num_inference_steps = {steps}), got {fixed}"
        )
    if not fixed and not 0 <= size <= steps:
        raise ValueError(f"sampler.sde_window_size must be in [0, {steps}] (num_inference_steps), got {size}")
    if not (isinstance(span, (int, float)) and 0 < span <= 1):
        raise ValueError(f"sampler.sde_window_span must be in (0, 1], got {span!r}")

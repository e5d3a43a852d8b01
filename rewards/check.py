"""``align rewards check NAME``: run a reward on toy renders and validate what training relies on:
shape (B,), floating dtype, finite values, batch-size invariance (the batch scored at once equals
each image scored alone) and determinism (two calls agree)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from rewards.registry import Reward, RewardError
from rewards.scoring import score_one


@dataclasses.dataclass
class CheckResult:
    check: str
    ok: bool
    detail: str


def toy_batch(n: int, seed: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` procedural toy scenes rendered at ``size`` px and their prompts."""
    from align.toy.world import render_batch, sample_scenes

    scenes = sample_scenes(n, np.random.default_rng(seed))
    return render_batch(scenes, seed=seed, size=size), [s.prompt for s in scenes]


def check_reward(
    reward: Reward, n: int = 8, seed: int = 0, size: int = 64, rtol: float = 1e-4, atol: float = 1e-5
) -> list[CheckResult]:
    """The checks in order; stops after the first failing call (later checks need its scores).
    Invariance tolerance ``|a - b| <= atol + rtol·|a|``: float32 batched vs unbatched matmuls."""
    images, prompts = toy_batch(n, seed, size)
    t0 = time.perf_counter()
    try:
        first = score_one(reward, images, prompts, {})
    except RewardError as err:
        return [CheckResult("shape, dtype, finite", False, str(err))]
    seconds = time.perf_counter() - t0
    results = [
        CheckResult(
            "shape, dtype, finite",
            True,
            f"({n},) float, range [{first.min():.4g}, {first.max():.4g}], {seconds / n * 1e3:.1f} ms/image",
        )
    ]
    try:
        singles = torch.cat([score_one(reward, images[i : i + 1], prompts[i : i + 1], {}) for i in range(n)])
        again = score_one(reward, images, prompts, {})
    except RewardError as err:
        return results + [CheckResult("batch-size invariance", False, str(err))]
    results.append(_close("batch-size invariance", first, singles, rtol, atol, "batch of 1 vs batch of %d" % n))
    results.append(_close("deterministic", first, again, rtol, atol, "second call"))
    return results


def _close(check: str, a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float, what: str) -> CheckResult:
    diff = (a - b).abs()
    ok = bool((diff <= atol + rtol * a.abs()).all())
    return CheckResult(check, ok, f"{what}: max |diff| {float(diff.max()):.3g} (atol {atol:g}, rtol {rtol:g})")

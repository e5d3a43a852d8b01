"""Seeded rollout requests (the in-process group that serves them is align/rollout/local.py).

A batch of prompts is cut into chunks of ``chunk_size``; chunk ``i`` of the batch seeded ``seed`` is
sampled from ``torch.Generator().manual_seed(chunk_seed(seed, i))``. The trajectory of a chunk
therefore depends only on (prompts, seed, index, policy weights), never on which worker serves
it or how many workers there are, and a re-issued request reproduces the lost one exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from align.sampling.window import stochastic_steps


@dataclasses.dataclass(frozen=True)
class Request:
    index: int  # position of the chunk in the batch
    prompts: list[str]  # the chunk's prompts
    seed: int  # seed of the chunk's generator
    sde_steps: Optional[tuple[int, ...]] = None  # the batch's stochastic window (the same for every chunk)
    latent_seeds: Optional[tuple[int, ...]] = None  # per-sample x_T seeds (shared within a group), or None


@dataclasses.dataclass
class SyncStats:
    """One weight sync: LoRA bytes put once in the object store, and the wall time until every
    actor acknowledged the new version."""

    version: int
    bytes: int
    seconds: float


def chunk_seed(seed: int, index: int) -> int:
    """Independent 63-bit seed of chunk ``index`` of a batch seeded ``seed`` (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def make_requests(prompts: list[str], seed: int, chunk_size: int, sampler=None, group_size: int = 0) -> list[Request]:
    """The batch's chunks; with ``sampler``, each carries the batch's stochastic window drawn from ``seed``
    (align/sampling/window.py), so that the chunks' trajectories concatenate. ``group_size`` > 0: samples
    ``j`` and ``k`` with ``j // group_size == k // group_size`` get one x_T seed (a chunk may cut a group)."""
    window = stochastic_steps(sampler, seed) if sampler is not None else None
    latent = [group_latent_seed(seed, j // group_size) for j in range(len(prompts))] if group_size > 0 else None
    return [
        Request(
            i,
            list(prompts[start : start + chunk_size]),
            chunk_seed(seed, i),
            window and tuple(window),
            latent and tuple(latent[start : start + chunk_size]),
        )
        for i, start in enumerate(range(0, len(prompts), chunk_size))
    ]


def group_latent_seed(seed: int, group: int) -> int:
    """Seed of the x_T shared by group ``group`` of the batch seeded ``seed`` (independent of the chunk seeds)."""
    state = np.random.SeedSequence([int(seed), int(group), 0x6A7]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))

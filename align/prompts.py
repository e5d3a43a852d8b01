"""Prompt sources of `align train`: the prompts of each iteration and of the evaluation grid.

``trainer.prompts`` is ``toy`` (the toy world's grammar, the default) or a UTF-8 text file with one
prompt per line (blank lines and lines starting with ``#`` are skipped), the format of DDPO's and
Flow-GRPO's prompt sets. Draws are seeded by (seed, iteration), so the data position of a run is its
iteration index and a resumed run sees the same prompts.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

TOY = "toy"


@functools.lru_cache(maxsize=8)
def read_prompt_file(path: str) -> tuple[str, ...]:
    """The prompts of a prompt file; a missing or empty file is a one-line error naming it."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"trainer.prompts: no prompt file at {path!r} (use 'toy' or a text file, one prompt per line)")
    prompts = tuple(line.strip() for line in file.read_text(encoding="utf-8").splitlines()
                    if line.strip() and not line.lstrip().startswith("#"))
    if not prompts:
        raise ValueError(f"trainer.prompts: {path!r} holds no prompts")
    return prompts


def check_prompt_source(source: str) -> None:
    """Fail early (at config load) on a bad ``trainer.prompts``."""
    if source != TOY:
        read_prompt_file(source)


def draw_prompts(source: str, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` prompts from ``source``: toy scenes from the grammar, or file prompts drawn uniformly
    (without replacement while the file has at least ``n``)."""
    if source == TOY:
        from align.toy.world import sample_scenes
        return [s.prompt for s in sample_scenes(n, rng)]
    pool = read_prompt_file(source)
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=len(pool) < n)]


def evaluation_prompts(source: str, n: int, seed: int) -> list[str]:
    """The fixed prompts of the evaluation grids (the same ``n`` at every evaluation of a run)."""
    return draw_prompts(source, n, np.random.default_rng(seed))

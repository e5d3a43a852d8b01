"""Score a pipeline on the toy world: sample fixed prompts, run the checker, report accuracy."""
from __future__ import annotations

import numpy as np
import torch

from align.toy.checker import ATTRIBUTES, check_batch
from align.toy.world import sample_scenes


def eval_prompts(n: int, seed: int) -> list[str]:
    """``n`` toy prompts drawn uniformly from the grammar with a fixed seed."""
    return [s.prompt for s in sample_scenes(n, np.random.default_rng(seed))]


@torch.no_grad()
def evaluate_pipeline(pipe, num_images: int, num_steps: int, guidance_scale: float, seed: int,
                      batch_size: int = 32) -> dict[str, float]:
    """Per-attribute accuracy and mean score of ``pipe``'s own sampler (DDIM, η=0) on the checker.

    Uses the stock ``pipe(...)`` call so the number is independent of this project's samplers.
    """
    prompts = eval_prompts(num_images, seed)
    gen = torch.Generator().manual_seed(seed)
    totals = {k: 0.0 for k in (*ATTRIBUTES, "score")}
    for i in range(0, num_images, batch_size):
        chunk = prompts[i:i + batch_size]
        images = pipe(chunk, num_inference_steps=num_steps, guidance_scale=guidance_scale,
                      generator=gen, output_type="pt").images
        scores = check_batch(images.float().clamp(0, 1), chunk)
        for k in totals:
            totals[k] += float(scores[k].sum())
    return {k: v / num_images for k, v in totals.items()}

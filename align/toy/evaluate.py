"""Score a pipeline on toy-GenEval: fixed prompts (uniform over the six tags), the toy detector and
the rule engine; strict accuracy and partial-credit score per tag, and their means over tags."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from align.toy.detector import per_tag, score_batch
from align.toy.world import sample_scenes


def eval_prompts(n: int, seed: int) -> list[str]:
    """``n`` toy prompts, tags uniform (GenEval weighs tags equally), with a fixed seed."""
    return [s.prompt for s in sample_scenes(n, np.random.default_rng(seed))]


def summarize(strict: torch.Tensor, score: torch.Tensor, tags: list[str]) -> dict[str, float]:
    """Flat metrics: ``strict`` / ``score`` (mean over tags of the per-tag means: GenEval's overall)
    and ``strict/<tag>`` / ``score/<tag>``."""
    out: dict[str, float] = {}
    for name, values in (("strict", strict), ("score", score)):
        table = per_tag(values, tags)
        out[name] = table.pop("overall")
        out.update({f"{name}/{t}": v for t, v in table.items()})
    return out


@torch.no_grad()
def evaluate_images(
    generate: Callable[[list[str]], torch.Tensor], prompts: list[str], batch_size: int = 32
) -> dict[str, float]:
    """:func:`summarize` of ``generate(prompts chunk) -> images [B,3,H,W] in [0,1]`` on ``prompts``."""
    strict, score, tags = [], [], []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        result = score_batch(generate(chunk).float().clamp(0, 1), chunk)
        strict.append(result["strict"])
        score.append(result["score"])
        tags += result["tag"]
    return summarize(torch.cat(strict), torch.cat(score), tags)


@torch.no_grad()
def evaluate_pipeline(
    pipe, num_images: int, num_steps: int, guidance_scale: float, seed: int, batch_size: int = 32
) -> dict[str, float]:
    """toy-GenEval of ``pipe``'s own sampler (DDIM, η=0): the stock ``pipe(...)`` call, so the number
    is independent of this project's samplers."""
    gen = torch.Generator().manual_seed(seed)

    def generate(chunk: list[str]) -> torch.Tensor:
        return pipe(
            chunk, num_inference_steps=num_steps, guidance_scale=guidance_scale, generator=gen, output_type="pt"
        ).images

    return evaluate_images(generate, eval_prompts(num_images, seed), batch_size)


@torch.no_grad()
def evaluate_rl_sampler(pipe, num_images: int, sampler_config, seed: int, batch_size: int = 32) -> dict[str, float]:
    """toy-GenEval with the RL sampler (:func:`align.sampling.sample_trajectory`, e.g. the settings of
    ``configs/toy_ecg.yaml``): the base model's numbers as RL sees them."""
    from align.modifiers.protocol import build_modifiers
    from align.sampling import sample_trajectory

    gen = torch.Generator().manual_seed(seed)
    modifiers = build_modifiers(sampler_config.modifiers)  # one stack for every chunk

    def generate(chunk: list[str]) -> torch.Tensor:
        return sample_trajectory(pipe, chunk, sampler_config, gen, modifiers=modifiers).images

    return evaluate_images(generate, eval_prompts(num_images, seed), batch_size)


def format_table(metrics: dict[str, float]) -> str:
    """A markdown table of :func:`summarize`'s metrics: one row per tag, strict and partial score."""
    from align.toy.world import TAGS

    rows = ["| tag | strict | score |", "|---|---|---|"]
    rows += [
        f"| {t} | {metrics[f'strict/{t}']:.3f} | {metrics[f'score/{t}']:.3f} |"
        for t in TAGS
        if f"strict/{t}" in metrics
    ]
    rows.append(f"| **overall** (mean over tags) | {metrics['strict']:.3f} | {metrics['score']:.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    """``python -m align.toy.evaluate [--model toy|DIR] [--images 288] [--seed 2024]``: per-tag
    toy-GenEval of a pipeline with the RL sampler settings of ``configs/toy_ecg.yaml``."""
    import argparse
    import time

    from align.backbones.model_config import ModelConfig, load_model
    from align.config import load_config
    from align.train_config import TrainConfig

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--model", default="toy")
    p.add_argument("--config", default="configs/toy_ecg.yaml", help="its sampler settings are used")
    p.add_argument("--images", type=int, default=288)
    p.add_argument("--seed", type=int, default=2024)
    args = p.parse_args(argv)
    sampler = load_config(TrainConfig, args.config).sampler
    pipe = load_model(ModelConfig(source=args.model))
    pipe.set_progress_bar_config(disable=True)
    t0 = time.time()
    metrics = evaluate_rl_sampler(pipe, args.images, sampler, args.seed)
    print(
        f"{args.model}: {args.images} prompts (seed {args.seed}), {sampler.num_inference_steps} steps, "
        f"eta {sampler.eta}, CFG {sampler.guidance_scale}; {time.time() - t0:.0f}s"
    )
    print(format_table(metrics))


if __name__ == "__main__":
    main()

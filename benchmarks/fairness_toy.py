"""StayFair on the toy model: group ratio across guidance scales, plain CFG vs StayFair, and quality.

Group: the toy grammar always names a colour, so we prompt *without* one ("two circles on the left")
and read the colour the model draws (``toy_color`` classifier = the toy checker's detector). The
group of interest per prompt is its majority colour at w = 1 (unguided conditional model); the
bias range is max_w − min_w of that colour's share over w ∈ {1.5, 3, 4.5, 6, 7.5} (percentage
points); FD is the Fairness Discrepancy over the 4 colours, averaged over w.

α per prompt: 1-D grid search (α ∈ −6…6, step 1) on probe images (their own seed, common random
numbers across α) minimising the bias range over w ∈ {1, 3, 7.5} (w = 1 anchors the ratio at the
model's own; see tests/test_stayfair.py), direction
``words = [green, yellow]``. The evaluation then uses fresh seeds. Quality: toy-GenEval score of
the fixed toy evaluation prompts (which do name a colour) at each w, plain CFG vs StayFair with
the median α of the search, i.e. what the offset costs on ordinary prompts.

    python benchmarks/fairness_toy.py [--images 64] [--probe 24] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from align.backbones.model_config import ModelConfig, load_model
from align.modifiers.fairness_metrics import bias_range, fairness_discrepancy, get_group_classifier
from align.modifiers.stayfair_estimate import search_alpha
from align.sampling import SamplerConfig, sample_trajectory
from align.toy.detector import score_batch
from align.toy.evaluate import eval_prompts

SWEEP = (1.5, 3.0, 4.5, 6.0, 7.5)
SEARCH = (1.0, 3.0, 7.5)  # probe scales of the α search: w = 1 anchors, 3 and 7.5 span the sweep
PROMPTS = ("two circles on the left", "one square on the top", "three triangles on the right")
WORDS = ["green", "yellow"]


def colour_probs(pipe, prompt: str, w: float, alpha: float, n: int, seed: int, args) -> torch.Tensor:
    use = alpha != 0 and w > 1  # at w = 1 there is no null branch: the policy is the conditional model
    mods = [{"name": "stayfair", "args": {"alpha": alpha, "words": WORDS}}] if use else []
    cfg = SamplerConfig(num_inference_steps=args.steps, guidance_scale=w, eta=args.eta, modifiers=mods)
    images = sample_trajectory(pipe, [prompt] * n, cfg, torch.Generator().manual_seed(seed)).images
    return get_group_classifier("toy_color")[0](images)


def ratios(pipe, prompt: str, group: int, alpha: float, n: int, seed: int, args, sweep=SWEEP) -> dict:
    out, fd = {}, []
    for w in sweep:
        p = colour_probs(pipe, prompt, w, alpha, n, seed, args)
        out[w] = float((p.argmax(1) == group).float().mean())
        fd.append(fairness_discrepancy(p))
    return {"ratios": out, "fd": float(np.mean(fd))}


def quality(pipe, w: float, alpha: float, prompts: list[str], args) -> float:
    mods = [{"name": "stayfair", "args": {"alpha": alpha, "words": WORDS}}] if alpha != 0 else []
    cfg = SamplerConfig(num_inference_steps=args.steps, guidance_scale=w, eta=args.eta, modifiers=mods)
    images = sample_trajectory(pipe, prompts, cfg, torch.Generator().manual_seed(99)).images
    return float(score_batch(images, prompts)["score"].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64, help="images per (prompt, w) in the evaluation")
    ap.add_argument("--probe", type=int, default=24, help="probe images per (prompt, w, α) in the search")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps (10 = the RL rollouts of align train)")
    ap.add_argument("--eta", type=float, default=1.0, help="DDIM η (1 = the RL sampler)")
    ap.add_argument("--quality-prompts", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = load_model(ModelConfig())
    start = time.time()
    rows, alphas = [], []
    for prompt in PROMPTS:
        base = colour_probs(pipe, prompt, 1.0, 0.0, args.images, 5, args)
        group = int(base.argmax(1).mode().values)
        probe = lambda a: bias_range(ratios(pipe, prompt, group, a, args.probe, 1, args, SEARCH)["ratios"])  # noqa: E731
        alpha = search_alpha(probe, -6.0, 6.0, points=13, rounds=1)
        alphas.append(alpha)
        cfg_r = ratios(pipe, prompt, group, 0.0, args.images, 2, args)
        fair_r = ratios(pipe, prompt, group, alpha, args.images, 2, args)
        rows.append((prompt, get_group_classifier("toy_color")[1][group], alpha, cfg_r, fair_r))
        print(f"[{time.time() - start:.0f}s] {prompt}: α = {alpha:+.1f}", flush=True)
    n = args.images
    print(
        f"\n### Group ratio across guidance scales ({n} images per prompt and w, {args.steps} steps, "
        f"DDIM η={args.eta})\n"
    )
    head = " | ".join(f"w={w}" for w in SWEEP)
    print(f"| prompt (group) | method | {head} | bias range (pp) | FD |")
    print("|---|---|" + "---|" * len(SWEEP) + "---|---|")
    for prompt, colour, alpha, cfg_r, fair_r in rows:
        for name, r in (("CFG", cfg_r), (f"StayFair α={alpha:+.1f}", fair_r)):
            vals = " | ".join(f"{r['ratios'][w]:.2f}" for w in SWEEP)
            print(f"| {prompt} ({colour}) | {name} | {vals} | {bias_range(r['ratios']):.1f} | {r['fd']:.3f} |")
    cfg_mean = statistics.mean(bias_range(r[3]["ratios"]) for r in rows)
    fair_mean = statistics.mean(bias_range(r[4]["ratios"]) for r in rows)
    print(
        f"\nmean bias range: CFG {cfg_mean:.1f} pp, StayFair {fair_mean:.1f} pp, ratio {fair_mean / cfg_mean:.2f}; "
        f"binomial s.e. of one ratio ≤ {100 * 0.5 / np.sqrt(n):.1f} pp"
    )
    alpha_q = float(np.median(alphas))
    prompts = eval_prompts(args.quality_prompts, seed=7)
    print(
        f"\n### Toy-GenEval score per w ({len(prompts)} fixed prompts naming a colour; StayFair α = {alpha_q:+.1f})\n"
    )
    print("| w | CFG | StayFair | ratio |\n|---|---|---|---|")
    for w in SWEEP:
        q_cfg, q_fair = quality(pipe, w, 0.0, prompts, args), quality(pipe, w, alpha_q, prompts, args)
        print(f"| {w} | {q_cfg:.3f} | {q_fair:.3f} | {q_fair / q_cfg:.2f} |")
    print(f"\ntotal {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()

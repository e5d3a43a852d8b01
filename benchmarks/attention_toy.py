"""Symmetric attention on the toy model: cost per denoising step against the stock processor, and a
fidelity–diversity table.

Cost: one CFG denoiser call (batch 2B) per step, stock ``AttnProcessor2_0`` vs ``sym_attn`` at
α ∈ {1, 1.05, 1.2} (β = 3; fast variant, plus the exact X-space variant at 1.2), timed interleaved
in ABBA order so machine noise and warm caches hit both alike; median ms per step and the ratio.
α = 1 dispatches to the stock processor, so its target is 1.00×.

Fidelity–diversity: for each α, the fixed toy evaluation prompts, each sampled with several seeds;
fidelity = toy-GenEval score (mean over images), diversity = mean pairwise L2 distance between the
images of one prompt (RGB in [0, 1], per pixel RMS), averaged over prompts.

    python benchmarks/attention_toy.py [--batch 8] [--repeats 31] [--prompts 16] [--seeds 4] [--cost-only]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from align.backbones.model_config import ModelConfig, load_model
from align.modifiers.protocol import build_modifiers
from align.sampling import SamplerConfig, encode_prompts, sample_trajectory
from align.toy.detector import score_batch
from align.toy.evaluate import eval_prompts

SETTINGS = [
    ("α=1", {"alpha": 1.0, "beta": 3.0}),
    ("α=1.05", {"alpha": 1.05, "beta": 3.0}),
    ("α=1.2", {"alpha": 1.2, "beta": 3.0}),
    ("α=1.2 exact", {"alpha": 1.2, "beta": 3.0, "variant": "exact"}),
]
#: the fidelity–diversity sweep goes further than the operating points, to show the trend on a small model
FIDELITY = SETTINGS[1:] + [
    ("α=1.5", {"alpha": 1.5, "beta": 3.0}),
    ("α=2", {"alpha": 2.0, "beta": 3.0}),
    ("α=0 (symmetric)", {"alpha": 0.0, "beta": 1.0}),
]


def step_time(pipe, x, t, embeds, stack, repeats: int) -> list[float]:
    cond = torch.cat([embeds["negative_prompt_embeds"], embeds["prompt_embeds"]])
    out = []
    with torch.inference_mode(), stack.attention(pipe):
        pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=cond)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=cond)
            out.append(time.perf_counter() - start)
    return out


def cost_table(pipe, args) -> None:
    prompts = eval_prompts(args.batch, seed=0)
    embeds = encode_prompts(pipe, prompts, "", guidance_scale=4.5)
    x = torch.randn(
        args.batch,
        4,
        pipe.unet.config.sample_size,
        pipe.unet.config.sample_size,
        generator=torch.Generator().manual_seed(0),
    )
    t = torch.tensor(500)
    stock = build_modifiers([])
    print(f"### Cost per step (toy UNet, CFG batch {2 * args.batch}, median of {args.repeats} interleaved rounds)\n")
    print("| setting | stock ms/step | modified ms/step | ratio |\n|---|---|---|---|")
    for label, spec in SETTINGS:
        mod = build_modifiers([{"name": "sym_attn", "args": spec}])
        a, b = [], []
        for r in range(args.repeats):  # ABBA order: neither side always runs first
            first, second = (stock, mod) if r % 2 == 0 else (mod, stock)
            ta = step_time(pipe, x, t, embeds, first, 1)
            tb = step_time(pipe, x, t, embeds, second, 1)
            a += ta if r % 2 == 0 else tb
            b += tb if r % 2 == 0 else ta
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"| {label} | {1e3 * ma:.2f} | {1e3 * mb:.2f} | {mb / ma:.2f}× |", flush=True)


def diversity(images: torch.Tensor, seeds: int) -> float:
    """Mean pairwise per-pixel RMS distance between the ``seeds`` images of each prompt."""
    groups = images.view(-1, seeds, *images.shape[1:]).flatten(2)
    d = torch.cdist(groups, groups) / groups.shape[-1] ** 0.5
    n = seeds * (seeds - 1)
    return float(d.sum((1, 2)).mean() / n)


def fidelity_diversity(pipe, args) -> None:
    base = eval_prompts(args.prompts, seed=11)
    prompts = [p for p in base for _ in range(args.seeds)]
    print(
        f"\n### Fidelity–diversity ({args.prompts} prompts × {args.seeds} seeds, {args.steps} steps, CFG 4.5, "
        f"DDIM η={args.eta})\n"
    )
    print("| setting | toy-GenEval score | pairwise diversity |\n|---|---|---|")
    for label, spec in [("stock", None)] + FIDELITY:
        mods = [{"name": "sym_attn", "args": spec}] if spec else []
        cfg = SamplerConfig(num_inference_steps=args.steps, guidance_scale=4.5, eta=args.eta, modifiers=mods)
        images = sample_trajectory(pipe, prompts, cfg, torch.Generator().manual_seed(3)).images.float()
        score = score_batch(images, prompts)["score"]
        se = float(score.std() / len(score) ** 0.5)
        print(f"| {label} | {float(score.mean()):.3f} ± {se:.3f} | {diversity(images, args.seeds):.4f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eta", type=float, default=1.0)
    ap.add_argument("--cost-only", action="store_true", help="skip the fidelity–diversity table")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = load_model(ModelConfig())
    cost_table(pipe, args)
    if not args.cost_only:
        fidelity_diversity(pipe, args)


if __name__ == "__main__":
    main()

"""Sampler overhead: our log-prob sampler vs the raw diffusers ``pipe(...)`` call.

Same pipeline, prompts, steps, η, CFG scale and batch; the two run interleaved in one process after
a warm-up, and the table reports median images/s of each and the ratio ours/raw.
Target: ratio >= 0.95 (storing the chain and the log-probs costs almost nothing).

    python benchmarks/sampler_overhead.py [--source toy|preset:tiny-unet|preset:tiny-dit|DIR]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from align.backbones.model_config import ModelConfig, load_model
from align.sampling import SamplerConfig, sample_trajectory
from align.toy.evaluate import eval_prompts


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="toy")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--eta", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    pipe = load_model(ModelConfig(source=args.source))
    prompts = eval_prompts(args.batch, seed=0)
    cfg = SamplerConfig(num_inference_steps=args.steps, guidance_scale=args.guidance, eta=args.eta,
                        noise_level=args.eta)
    is_ddim = type(pipe.scheduler).__name__ == "DDIMScheduler"
    extra = {"eta": args.eta} if is_ddim else {}

    def raw() -> None:
        with torch.no_grad():
            pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="pt",
                 generator=torch.Generator().manual_seed(0), **extra)

    def ours() -> None:
        sample_trajectory(pipe, prompts, cfg, torch.Generator().manual_seed(0))

    raw(), ours()  # warm-up
    t_raw, t_ours = [], []
    for _ in range(args.repeats):
        t_raw.append(_time(raw))
        t_ours.append(_time(ours))
    ips_raw, ips_ours = args.batch / statistics.median(t_raw), args.batch / statistics.median(t_ours)
    print(f"pipeline: {type(pipe).__name__} ({args.source}); batch {args.batch}, {args.steps} steps, "
          f"CFG {args.guidance}, {'eta' if is_ddim else 'flow-SDE a (raw pipe: ODE Euler)'} {args.eta}; "
          f"torch threads {torch.get_num_threads()}; median of {args.repeats}")
    print(f"{'sampler':<34}{'images/s':>10}{'s/batch':>10}")
    print(f"{'raw diffusers pipe(...)':<34}{ips_raw:>10.2f}{statistics.median(t_raw):>10.3f}")
    print(f"{'align sample_trajectory (log-probs)':<34}{ips_ours:>10.2f}{statistics.median(t_ours):>10.3f}")
    ratio = ips_ours / ips_raw
    print(f"throughput ratio ours/raw: {ratio:.3f}  (target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})")


if __name__ == "__main__":
    main()

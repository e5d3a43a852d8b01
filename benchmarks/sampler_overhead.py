"""Sampler overhead: our log-prob sampler against the raw diffusers ``pipe(...)`` call.

Same pipeline, prompts, steps, η, CFG scale and batch, in one process: a warm-up, then the two
run interleaved (raw, ours, raw, ours, …) so that machine noise hits both alike. The table gives
median images/s of each and the ratio ours/raw. Target: ratio >= 0.95 (storing the chain, the
embeddings and the per-step log-probs must cost almost nothing).

    python benchmarks/sampler_overhead.py [--source preset:tiny-unet|toy|preset:tiny-dit|DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from align.backbones.model_config import ModelConfig, load_model
from align.sampling import SamplerConfig, sample_trajectory, transition_for
from align.toy.evaluate import eval_prompts

TARGET = 0.95


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="preset:tiny-unet", help="model.source: a preset, 'toy' or a directory")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--eta", type=float, default=1.0, help="DDIM η, or the flow-SDE noise level a for a DiT")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny models: 1 is fastest)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pipe = load_model(ModelConfig(source=args.source))
    pipe.set_progress_bar_config(disable=True)
    prompts = eval_prompts(args.batch, seed=0)
    cfg = SamplerConfig(
        num_inference_steps=args.steps, guidance_scale=args.guidance, eta=args.eta, noise_level=args.eta
    )
    is_ddim = transition_for(pipe.scheduler) == "ddim"
    extra = {"eta": args.eta} if is_ddim else {}

    def raw() -> None:
        pipe(
            prompts,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
            **extra,
        )

    def ours() -> None:
        sample_trajectory(pipe, prompts, cfg, torch.Generator().manual_seed(0))

    raw(), ours()  # warm-up
    t_raw, t_ours = [], []
    for _ in range(args.repeats):
        t_raw.append(_time(raw))
        t_ours.append(_time(ours))
    med_raw, med_ours = statistics.median(t_raw), statistics.median(t_ours)
    noise = f"η {args.eta}" if is_ddim else f"flow-SDE a {args.eta} (raw pipe: ODE Euler)"
    print(
        f"pipeline: {type(pipe).__name__} ({args.source}); batch {args.batch}, {args.steps} steps, CFG "
        f"{args.guidance}, {noise}; torch threads {torch.get_num_threads()}; median of {args.repeats} interleaved"
    )
    print(f"{'sampler':<38}{'images/s':>10}{'s/batch':>10}{'min s':>10}")
    print(f"{'raw diffusers pipe(...)':<38}{args.batch / med_raw:>10.2f}{med_raw:>10.3f}{min(t_raw):>10.3f}")
    print(
        f"{'align sample_trajectory (log-probs)':<38}{args.batch / med_ours:>10.2f}{med_ours:>10.3f}"
        f"{min(t_ours):>10.3f}"
    )
    ratio = med_raw / med_ours
    print(f"throughput ratio ours/raw: {ratio:.3f}  (target >= {TARGET}: {'met' if ratio >= TARGET else 'NOT met'})")


if __name__ == "__main__":
    main()

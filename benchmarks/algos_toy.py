"""ECG vs GRPO vs DDPO on the toy reward at the same sample budget, over several seeds.

Each (algorithm, seed) is one `align train` subprocess on the embedded default (shipped toy model,
toy-GenEval reward) with identical sampler, rewards, learner and samples per iteration, so the
peak RSS of each run can be read from its own rusage. Prints, side by side in one run:
mean reward against samples seen (mean ± std over seeds), the samples each method needs to reach
GRPO's final reward, and peak RSS of ECG and GRPO at equal samples per update.

    python benchmarks/algos_toy.py [--seeds 0 1 2] [--iterations 12] [--out runs/bench_algos]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ALGOS = ("ecg", "grpo", "ddpo")


def run_one(algo: str, seed: int, iterations: int, out: Path, extra: list[str]) -> tuple[list[dict], float]:
    run_dir = out / f"{algo}_s{seed}"
    cmd = [sys.executable, "-m", "align.cli", "train", f"algo={algo}", f"trainer.seed={seed}",
           f"trainer.iterations={iterations}", f"run_dir={run_dir}", "eval_every=0", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-2000:]}")
    history = json.loads((run_dir / "checkpoint" / "state.json").read_text())["history"]
    return history, usage.ru_maxrss / 1024.0  # MiB (Linux reports KiB)


def samples_to_reach(history: list[dict], target: float) -> float:
    for h in history:
        if h["reward/weighted"] >= target:
            return h["samples_seen"]
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--out", default="runs/bench_algos")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = ap.parse_args()
    out = Path(args.out)
    results: dict[str, list[list[dict]]] = {a: [] for a in ALGOS}
    rss: dict[str, list[float]] = {a: [] for a in ALGOS}
    for seed in args.seeds:
        for algo in ALGOS:
            hist, peak = run_one(algo, seed, args.iterations, out, args.overrides)
            results[algo].append(hist)
            rss[algo].append(peak)
            print(f"  done {algo} seed {seed}: final reward {hist[-1]['reward/weighted']:.3f}, peak RSS {peak:.0f} MiB",
                  flush=True)

    samples = [h["samples_seen"] for h in results["ecg"][0]]
    curves = {a: np.array([[h["reward/weighted"] for h in run] for run in results[a]]) for a in ALGOS}
    print(f"\nmean toy-GenEval reward vs samples seen (mean ± std over seeds {args.seeds})")
    print(f"{'samples':>8} " + " ".join(f"{a:>15}" for a in ALGOS))
    for i, n in enumerate(samples):
        print(f"{n:>8} " + " ".join(f"{curves[a][:, i].mean():>8.3f} ± {curves[a][:, i].std():.3f}" for a in ALGOS))
    target = curves["grpo"][:, -1].mean()
    print(f"\nsamples to reach GRPO's final mean reward {target:.3f} (mean over seeds; nan = never)")
    for a in ALGOS:
        reach = [samples_to_reach(run, target) for run in results[a]]
        print(f"  {a:<5} {np.nanmean(reach) if not all(np.isnan(reach)) else float('nan'):>8.0f}   per seed {reach}")
    print("\npeak RSS per training process (MiB), same samples per update")
    for a in ("ecg", "grpo"):
        print(f"  {a:<5} {np.mean(rss[a]):>8.0f}")
    print(f"  ratio GRPO/ECG: {np.mean(rss['grpo']) / np.mean(rss['ecg']):.2f}")


if __name__ == "__main__":
    main()

"""Synchronous vs overlapped rollouts (``learner.max_policy_lag`` 0 vs 1; issue 16 §3), alternating runs.

Each run is ``align train`` on the default config (the embedded toy world, ECG unless ``algo=...`` is
given) with **one** Ray rollout actor and the learner in the driver, so on a 2-core machine the actor
samples on one core while the learner trains on the other. Runs alternate lag 0, lag 1, lag 0, lag 1
(``--pairs``); each does ``--iterations`` policy iterations (no value pretraining, so every iteration has
the same shape) of which the first ``--warmup`` are dropped. Per run it reports the medians of:

- ``iteration``: the wall time from one iteration's start to the next one's (the record's ``seconds``);
- ``rollout``: the actor's sampling + scoring time for a batch (the rollout thread's, at lag 1);
- ``update``: values + update + sync (what the learner does with a batch);
- ``wait``: at lag 1, how long the learner still waited for the batch collected ahead.

The target: at lag 1, iteration ≤ 1.15 × max(rollout, update), and samples/s ≥ 1.4 × lag 0's.

    python benchmarks/overlap.py [--pairs 2] [--iterations 8] [--warmup 2] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = """
import json, sys
from align.config import load_config
from align.train import train
from align.train_config import TrainConfig
cfg = load_config(TrainConfig, None, sys.argv[2:])
state = train(cfg, log=lambda *a, **k: None)
json.dump(state.history, open(sys.argv[1], "w"))
"""


def run(lag: int, iterations: int, out: Path, extra: list[str]) -> list[dict]:
    """One `align train` run in a fresh interpreter (its own local Ray); its per-iteration records."""
    overrides = [
        f"run_dir={out / f'lag{lag}'}",
        "ray.num_rollout_workers=1",
        "ray.num_reward_workers=0",
        f"learner.max_policy_lag={lag}",
        f"trainer.iterations={iterations}",
        "critic.pretrain_iterations=0",
        "eval_every=0",
        "final_eval_prompts=0",
        *extra,
    ]
    history = out / f"history_lag{lag}.json"
    subprocess.run([sys.executable, "-c", RUN, str(history), *overrides], check=True, cwd=ROOT)
    return json.loads(history.read_text())


def medians(history: list[dict], warmup: int) -> dict[str, float]:
    rows = history[warmup:]

    def med(keys: tuple[str, ...]) -> float:
        return statistics.median(sum(r.get(f"timing/{k}", 0.0) for k in keys) for r in rows)

    return {
        "iteration": statistics.median(r["seconds"] for r in rows),
        "rollout": med(("rollout", "reward")),
        "update": med(("values", "update", "sync")),
        "wait": med(("rollout_wait",)),
        "samples_per_s": statistics.median(r["samples_per_s"] for r in rows),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="dotted overrides for both sides, e.g. algo=grpo")
    ns = p.parse_args(argv)
    results: dict[int, list[dict]] = {0: [], 1: []}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(ns.pairs):
            for lag in (0, 1):
                out = Path(tmp) / f"pair{pair}"
                results[lag].append(medians(run(lag, ns.iterations, out, ns.overrides), ns.warmup))
    print("| run | lag | iteration s | rollout s | update s | wait s | iteration / max(rollout, update) | samples/s |")
    print("|---|---|---|---|---|---|---|---|")
    for lag in (0, 1):
        for i, m in enumerate(results[lag]):
            bound = m["iteration"] / max(m["rollout"], m["update"])
            print(
                f"| {i + 1} | {lag} | {m['iteration']:.2f} | {m['rollout']:.2f} | {m['update']:.2f} | {m['wait']:.2f} "
                f"| {bound:.2f} | {m['samples_per_s']:.2f} |"
            )
    speed = [b["samples_per_s"] / a["samples_per_s"] for a, b in zip(results[0], results[1])]
    lag1 = [m["iteration"] / max(m["rollout"], m["update"]) for m in results[1]]
    print(
        f"\nlag 1 / lag 0 samples/s per pair: {', '.join(f'{s:.2f}' for s in speed)} (target >= 1.4); "
        f"lag 1 iteration / max(rollout, update): {', '.join(f'{b:.2f}' for b in lag1)} (target <= 1.15)"
    )


if __name__ == "__main__":
    main()

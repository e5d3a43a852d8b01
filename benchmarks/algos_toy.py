"""ECG vs GRPO vs DDPO on the toy reward at the same sample budget, over several seeds.

Each (algorithm, seed) is one `align train` subprocess on the embedded default (shipped toy model,
toy-GenEval reward) with identical sampler, rewards, learner, samples per iteration and number of
policy iterations (ECG's value pretraining runs before them, its samples counted), all in one
process (Ray off), so the peak RSS of each run is its own rusage. Prints, side by side in one run:
mean reward against samples seen (mean ± std over seeds), the samples each method needs to reach
GRPO's final reward, the peak RSS of ECG and GRPO at equal samples per update, each final policy
scored on fixed prompts with fixed noise (paired against the base model), and writes a plot.
A finished run directory is reused (``--reuse``), so an interrupted benchmark continues.

    python benchmarks/algos_toy.py [--seeds 0 1 2] [--iterations 16] [--out runs/bench_algos] [--plot PNG] [--eval 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from align.train_config import algorithm_names

ALGOS = algorithm_names()  # the algorithm registry's names
IN_PROCESS = ["ray.num_rollout_workers=0", "ray.num_reward_workers=0"]  # one process: honest RSS


def run_one(
    algo: str, seed: int, iterations: int, out: Path, extra: list[str], reuse: bool
) -> tuple[list[dict], float]:
    """History and peak RSS (MiB) of one training subprocess."""
    run_dir = out / f"{algo}_s{seed}"
    state, rss_file = run_dir / "checkpoint" / "state.json", run_dir / "peak_rss_mib.json"
    if reuse and state.is_file() and rss_file.is_file():
        history = json.loads(state.read_text())["history"]
        if json.loads(state.read_text())["policy_updates"] == iterations:
            return history, json.loads(rss_file.read_text())["peak_rss_mib"]
    cmd = [
        sys.executable,
        "-m",
        "align.cli",
        "train",
        "--force",
        f"algo={algo}",
        f"trainer.seed={seed}",
        f"trainer.iterations={iterations}",
        f"run_dir={run_dir}",
        "eval_every=0",
        "final_eval_prompts=0",
        *IN_PROCESS,
        *extra,
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "w") as log:  # a file, not a pipe: wait4 below reaps the child itself
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child alone
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(run_dir / 'train.log').read_text()[-2000:]}")
    peak = usage.ru_maxrss / 1024.0  # MiB (Linux reports KiB)
    rss_file.write_text(json.dumps({"peak_rss_mib": peak}))
    return json.loads(state.read_text())["history"], peak


def samples_to_reach(history: list[dict], target: float) -> float:
    for h in history:
        if h["reward/weighted"] >= target:
            return h["samples_seen"]
    return float("nan")


def evaluate_policies(runs: dict[str, list[Path]], n: int, batch: int = 32) -> dict[str, np.ndarray]:
    """toy-GenEval of each run's final policy LoRA (its checkpoint) on ``n`` fixed prompts with fixed
    noise, and of the base model ("base": the LoRA at its zero init): (runs, n) scores per method.
    Same prompts and noise for every policy, so differences are paired and free of the prompt mix."""
    import torch

    from align.backbones.lora import load_lora_state_dict
    from align.checkpoint import load_tensors
    from align.policy import build_policy, run_config
    from align.rollout import RolloutWorker
    from align.toy.evaluate import eval_prompts
    from rewards import get_reward, score

    torch.set_num_threads(1)
    first = run_config(next(iter(runs.values()))[0])
    pipe = build_policy(first)
    worker = RolloutWorker(pipe, first.sampler)
    base = {
        k: v.clone()
        for k, v in load_tensors(next(iter(runs.values()))[0] / "checkpoint" / "policy_lora.safetensors").items()
    }
    base = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in base.items()}  # B = 0: the base model
    prompts, reward = eval_prompts(n, seed=99), get_reward("toy_geneval")

    def scores() -> np.ndarray:
        out = []
        for i in range(0, n, batch):
            traj = worker.rollout(prompts[i : i + batch], seed=777 + i)
            out.append(score([reward], traj.images, prompts[i : i + batch])[0][:, 0].numpy())
        return np.concatenate(out)

    load_lora_state_dict(pipe, base, "policy")
    result = {"base": scores()[None]}
    for algo, dirs in runs.items():
        rows = []
        for d in dirs:
            load_lora_state_dict(pipe, load_tensors(d / "checkpoint" / "policy_lora.safetensors"), "policy")
            rows.append(scores())
        result[algo] = np.stack(rows)
    return result


def print_step_diagnosis(results: dict[str, list[list[dict]]]) -> None:
    """Per denoising step, averaged over policy iterations and seeds: ECG's critic EV, and each algorithm's
    advantage variance over the batch (GRPO's and DDPO's are the same at every step)."""

    def per_step(algo: str, key: str) -> Optional[np.ndarray]:
        rows = [h[key] for run in results[algo] for h in run if h.get("phase") == "policy" and key in h]
        return np.array(rows).mean(0) if rows else None

    ev = per_step("ecg", "explained_variance_per_step")
    var = {a: per_step(a, "advantage_var_per_step") for a in ALGOS}
    if ev is None or any(v is None for v in var.values()):
        return
    print("\nper denoising step (policy iterations, seeds pooled): ECG critic EV; advantage variance per algorithm")
    print(f"{'step':>4} {'ECG EV':>7} " + " ".join(f"{'var ' + a:>9}" for a in ALGOS))
    for i in range(len(ev)):
        print(f"{i:>4} {ev[i]:>7.3f} " + " ".join(f"{var[a][i]:>9.3f}" for a in ALGOS))


def plot(samples: dict[str, list[int]], curves: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for algo, c in curves.items():
        mean, std = c.mean(0), c.std(0)
        ax.plot(samples[algo], mean, label=f"{algo} (n={len(c)})")
        ax.fill_between(samples[algo], mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("samples seen")
    ax.set_ylabel("mean toy-GenEval reward of the batch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=16)
    ap.add_argument("--out", default="runs/bench_algos")
    ap.add_argument("--plot", default=None, help="PNG of the reward curves (default: OUT/reward_vs_samples.png)")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs in OUT")
    ap.add_argument("--eval", type=int, default=256, help="fixed prompts scoring each final policy (0: skip)")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[list[dict]]] = {a: [] for a in ALGOS}
    rss: dict[str, list[float]] = {a: [] for a in ALGOS}
    for seed in args.seeds:
        for algo in ALGOS:
            hist, peak = run_one(algo, seed, args.iterations, out, args.overrides, args.reuse)
            results[algo].append(hist)
            rss[algo].append(peak)
            print(
                f"  done {algo} seed {seed}: final reward {hist[-1]['reward/weighted']:.3f}, peak RSS {peak:.0f} MiB",
                flush=True,
            )

    # every algorithm runs the same policy iterations; ECG's value pretraining comes first (extra samples)
    samples = {a: [h["samples_seen"] for h in results[a][0]] for a in ALGOS}
    curves = {a: np.array([[h["reward/weighted"] for h in run] for run in results[a]]) for a in ALGOS}
    print(
        f"\nmean toy-GenEval reward vs samples seen (mean ± std over seeds {args.seeds}; "
        f"ECG's first {_pretrain(results['ecg'][0])} iterations are value pretraining, on top of the "
        f"{args.iterations} policy iterations of every algorithm)"
    )
    print(f"{'samples':>8} " + " ".join(f"{a:>15}" for a in ALGOS))
    for n in sorted(set().union(*samples.values())):
        cells = []
        for a in ALGOS:
            i = samples[a].index(n) if n in samples[a] else None
            cells.append(
                f"{curves[a][:, i].mean():>8.3f} ± {curves[a][:, i].std():.3f}" if i is not None else f"{'—':>15}"
            )
        print(f"{n:>8} " + " ".join(cells))
    last = max(1, args.iterations // 4)  # policy iterations (the same count for every algorithm)
    print(
        f"\nmean over the last {last} iterations: "
        + "  ".join(f"{a} {curves[a][:, -last:].mean():.3f} ± {curves[a][:, -last:].mean(1).std():.3f}" for a in ALGOS)
    )
    print(
        f"gain (last {last} − first {last} iterations): "
        + "  ".join(f"{a} {curves[a][:, -last:].mean() - curves[a][:, :last].mean():+.3f}" for a in ALGOS)
    )
    target = curves["grpo"][:, -1].mean()
    print(f"\nsamples to reach GRPO's final mean reward {target:.3f} (mean over seeds; nan = never)")
    for a in ALGOS:
        reach = [samples_to_reach(run, target) for run in results[a]]
        print(f"  {a:<5} {np.nanmean(reach) if not all(np.isnan(reach)) else float('nan'):>8.0f}   per seed {reach}")
    ev = [[h["explained_variance_late"] for h in run if "explained_variance_late" in h] for run in results["ecg"]]
    if ev and ev[0]:
        print(
            f"\nECG critic: held-out explained variance on the late half of the chain, last iteration: "
            f"{np.mean([e[-1] for e in ev]):.3f} (per seed {[round(e[-1], 3) for e in ev]})"
        )
    print_step_diagnosis(results)
    print("\npeak RSS per training process (MiB), same samples per update")
    for a in ALGOS:
        print(f"  {a:<5} {np.mean(rss[a]):>8.0f}")
    print(f"  ratio GRPO/ECG: {np.mean(rss['grpo']) / np.mean(rss['ecg']):.2f}")
    if args.eval:
        ev_scores = evaluate_policies({a: [out / f"{a}_s{s}" for s in args.seeds] for a in ALGOS}, args.eval)
        print(
            f"\nfinal policies on {args.eval} fixed prompts with fixed noise (toy-GenEval; ± = std over seeds; "
            "paired gain vs the base model ± its standard error over prompts, seeds pooled)"
        )
        base = ev_scores["base"][0]
        print(f"  base   {base.mean():.4f}")
        for a in ALGOS:
            per_seed = ev_scores[a].mean(1)
            gain = (ev_scores[a] - base).mean(0)  # per prompt, averaged over seeds
            print(
                f"  {a:<5}  {per_seed.mean():.4f} ± {per_seed.std():.4f}   gain {gain.mean():+.4f} ± "
                f"{gain.std(ddof=1) / np.sqrt(len(gain)):.4f}   per seed {np.round(per_seed, 4).tolist()}"
            )
    path = Path(args.plot) if args.plot else out / "reward_vs_samples.png"
    plot(samples, curves, path)
    print(f"\nplot: {path}")


def _pretrain(history: list[dict]) -> int:
    return sum(h["phase"] == "value-pretrain" for h in history)


if __name__ == "__main__":
    main()

"""ECG vs GRPO vs DDPO on toy-GenEval at the same sample budget, over several seeds.

Each (algorithm, seed) is one `align train` subprocess on the embedded default (shipped toy model,
toy-GenEval reward, the default sampler and learner) with identical samples per iteration and number of
policy iterations (ECG's value pretraining runs before them, its samples counted), all in one process
(Ray off), so the peak RSS of each run is its own rusage. Every ``--snapshot-every`` policy updates the
run keeps its policy LoRA (``trainer.snapshot_every``); each snapshot is then scored against the base
model on ``--eval`` fixed tag-balanced (prompt, noise) pairs with GenEval's strict score, as ``eval.json``
scores a run. Prints, side by side in one run: the batch reward against samples seen, the paired gain
against samples seen (mean ± s.e. over seeds), the samples each method needs to reach GRPO's final gain
(the paper's claim: ECG needs at most half), ECG's critic EV per step, and the peak RSS of each; writes
two plots. A finished run directory and its scores are reused (``--reuse``), so an interrupted benchmark
continues, and seeds can run as separate processes into one ``--out``.

    python benchmarks/algos_toy.py [--seeds 0 1 2] [--iterations 60] [--snapshot-every 15] [--eval 512]
        [--out runs/bench_algos] [--reuse] [overrides ...]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's align, as its `-m align` children (cwd=ROOT) import

from align.train_config import algorithm_names  # noqa: E402

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
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
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


def snapshot_gains(runs: dict[str, list[Path]], n: int, batch: int = 32) -> dict[str, list[list[dict]]]:
    """Each run's policy snapshots (``trainer.snapshot_every``, align/snapshots.py) scored against the base
    model on ``n`` tag-balanced (prompt, noise) pairs, GenEval's strict score: per algorithm, per seed, one
    ``{updates, samples, gain, se, final}`` per snapshot, as ``eval.json`` computes them (align/eval.py
    ``paired_summary``; the evaluation noise seed is the run's ``trainer.seed``). Cached per run in
    ``RUN/snapshot_eval_{n}.json`` and the base per seed in ``OUT/base_s{seed}_{n}.json``."""
    import torch

    from align.backbones.lora import adapters_disabled, load_lora_state_dict, set_active_adapters
    from align.checkpoint import load_tensors, read_json, write_json
    from align.eval import balanced_items, default_judge, evaluate_items, make_judge, paired_summary
    from align.policy import load_run
    from align.snapshots import list_snapshots

    torch.set_num_threads(1)
    out: dict[str, list[list[dict]]] = {}
    for algo, dirs in runs.items():
        out[algo] = []
        for run_dir in dirs:
            cache = run_dir / f"snapshot_eval_{n}.json"
            if cache.is_file():
                out[algo].append(read_json(cache))
                continue
            run = load_run(run_dir)
            cfg, source = run.cfg, run.cfg.trainer.prompts
            items, judge = balanced_items(source, n), make_judge(default_judge(source))
            base_file = run_dir.parent / f"base_s{cfg.trainer.seed}_{n}.json"
            if not base_file.is_file():
                with adapters_disabled(run.pipe):
                    write_json(base_file, evaluate_items(run.pipe, items, judge, cfg.sampler, cfg.trainer.seed, batch))
            base = read_json(base_file)
            samples = _samples_after_updates(read_json(run_dir / "checkpoint" / "state.json")["history"])
            rows = []
            for updates, path in list_snapshots(run_dir):
                load_lora_state_dict(run.pipe, load_tensors(path), "policy")
                set_active_adapters(run.pipe, "policy")
                final = evaluate_items(run.pipe, items, judge, cfg.sampler, cfg.trainer.seed, batch)
                summary = paired_summary(items, base, final)
                rows.append(
                    {
                        "updates": updates,
                        "samples": samples[updates],
                        "gain": summary["paired_gain"],
                        "se": summary["paired_se"],
                        "base": summary["base"],
                        "final": summary["final"],
                    }
                )
                print(f"  {run_dir.name} after {updates} updates: {rows[-1]['gain']:+.3f} ± {rows[-1]['se']:.3f}")
            write_json(cache, rows)
            out[algo].append(rows)
    return out


def _samples_after_updates(history: list[dict]) -> dict[int, int]:
    """Samples seen (value pretraining included) when the policy had made u updates, for every u."""
    seen, updates = {0: 0}, 0
    for h in history:
        updates += h["phase"] == "policy"
        seen[updates] = h["samples_seen"]
    return seen


def print_sample_efficiency(gains: dict[str, list[list[dict]]]) -> None:
    """Paired gain against samples seen (mean ± s.e. over seeds), and the samples each algorithm needs to
    reach GRPO's final gain (linear interpolation between snapshots; the paper's claim is ECG ≤ ½ GRPO's)."""
    curves = {a: _mean_curve(runs) for a, runs in gains.items() if runs and runs[0]}
    if not curves:
        return
    print("\npaired gain over the base on fixed prompts and noise (strict toy-GenEval), mean ± s.e. over seeds")
    print(f"{'algo':<5} {'updates':>7} {'samples':>8} {'gain':>8} {'± s.e.':>7}  per seed")
    for a, rows in curves.items():
        for r in rows:
            print(
                f"{a:<5} {r['updates']:>7} {r['samples']:>8.0f} {r['gain']:>+8.3f} {r['se']:>7.3f}  "
                f"{[round(g, 3) for g in r['per_seed']]}"
            )
    if "grpo" not in curves:
        return
    target, grpo_samples = curves["grpo"][-1]["gain"], curves["grpo"][-1]["samples"]
    print(f"\nsamples to reach GRPO's final gain {target:+.3f} (GRPO: {grpo_samples:.0f})")
    for a, rows in curves.items():
        reach = samples_to_gain(rows, target)
        print(f"  {a:<5} {reach:>8.0f}   {reach / grpo_samples:.2f} × GRPO's")


def _mean_curve(runs: list[list[dict]]) -> list[dict]:
    """Seeds pooled snapshot by snapshot (runs of one algorithm share the snapshot schedule)."""
    rows = []
    for snaps in zip(*runs):
        g = np.array([s["gain"] for s in snaps])
        se = g.std(ddof=1) / np.sqrt(len(g)) if len(g) > 1 else snaps[0]["se"]
        rows.append(
            {
                "updates": snaps[0]["updates"],
                "samples": float(np.mean([s["samples"] for s in snaps])),
                "gain": float(g.mean()),
                "se": float(se),
                "per_seed": g.tolist(),
            }
        )
    return rows


def samples_to_gain(rows: list[dict], target: float) -> float:
    """Samples at which a mean curve (starting from gain 0 at 0 samples) first reaches ``target``, by linear
    interpolation between snapshots; nan if it never does."""
    xs, ys = [0.0] + [r["samples"] for r in rows], [0.0] + [r["gain"] for r in rows]
    for i in range(1, len(xs)):
        if ys[i] >= target:
            return xs[i - 1] + (xs[i] - xs[i - 1]) * (target - ys[i - 1]) / (ys[i] - ys[i - 1])
    return float("nan")


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


def plot_gains(gains: dict[str, list[list[dict]]], path: Path) -> None:
    """Paired gain against samples seen, mean ± s.e. over seeds, one line per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for algo, runs in gains.items():
        if not runs or not runs[0]:
            continue
        rows = _mean_curve(runs)
        x = [0.0] + [r["samples"] for r in rows]
        y, e = np.array([0.0] + [r["gain"] for r in rows]), np.array([0.0] + [r["se"] for r in rows])
        ax.plot(x, y, marker="o", label=f"{algo} (n={len(runs)})")
        ax.fill_between(x, y - e, y + e, alpha=0.15)
    ax.axhline(0, color="grey", lw=0.5)
    _finish(fig, ax, "paired gain, strict toy-GenEval", path)
    print(f"plot: {path}")


def plot(samples: dict[str, list[int]], curves: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for algo, c in curves.items():
        mean, std = c.mean(0), c.std(0)
        ax.plot(samples[algo], mean, label=f"{algo} (n={len(c)})")
        ax.fill_between(samples[algo], mean - std, mean + std, alpha=0.15)
    _finish(fig, ax, "mean toy-GenEval reward of the batch", path)


def _finish(fig, ax, ylabel: str, path: Path) -> None:
    """Label a reward-against-samples plot and write it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("samples seen")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--snapshot-every", type=int, default=15, help="policy updates between scored snapshots")
    ap.add_argument("--out", default="runs/bench_algos")
    ap.add_argument("--plot", default=None, help="PNG of the reward curves (default: OUT/reward_vs_samples.png)")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs in OUT")
    ap.add_argument("--eval", type=int, default=512, help="fixed (prompt, noise) pairs scoring each snapshot (0: skip)")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[list[dict]]] = {a: [] for a in ALGOS}
    rss: dict[str, list[float]] = {a: [] for a in ALGOS}
    for seed in args.seeds:
        for algo in ALGOS:
            extra = [f"trainer.snapshot_every={args.snapshot_every}", *args.overrides]
            hist, peak = run_one(algo, seed, args.iterations, out, extra, args.reuse)
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
        gains = snapshot_gains({a: [out / f"{a}_s{s}" for s in args.seeds] for a in ALGOS}, args.eval)
        print_sample_efficiency(gains)
        plot_gains(gains, out / "gain_vs_samples.png")
    path = Path(args.plot) if args.plot else out / "reward_vs_samples.png"
    plot(samples, curves, path)
    print(f"\nplot: {path}")


def _pretrain(history: list[dict]) -> int:
    return sum(h["phase"] == "value-pretrain" for h in history)


if __name__ == "__main__":
    main()

"""Critic steering on the toy world: none / grad / rerank / best-of-N at equal numbers of images.

Uses the exported critic and policy of the default run (`align train` → runs/toy_ecg/export;
trained here first if missing). For each seed, every mode draws the same toy prompts from the same
x_T (one generator per seed, so the modes are paired image by image) and the images are scored by
the critic's own rewards (Σ_k w_k R_k, the objective it steers; the toy reward for the default run),
and by the toy reward (partial credit and GenEval's strict 0/1). Prints, side by side: mean toy reward
(mean ± std over seeds), the paired difference to `none` (± its standard error over all images), the
strict score and its paired difference, the fidelity cost (mean |pixel change| against the unsteered image
drawn from the same x_T), the correlation between the critic's
Σ_k w_k V_k at the last state and the real reward of the same images (the critic's quality on the
images that mode produced), and the cost per output image:
denoiser rows (a CFG step counts 2; best-of-N draws N chains), critic rows (each a partial
forward up to the feature layer; grad adds a backward), and seconds.

    python benchmarks/steering_toy.py [--run-dir runs/toy_ecg] [--seeds 0 1 2] [--images 32]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's align, as its `-m align` children (cwd=ROOT) import

import critics  # noqa: E402
from align.backbones.adapter import denoiser  # noqa: E402
from align.backbones.model_config import load_model  # noqa: E402
from align.policy import run_config  # noqa: E402
from align.sampling import SamplerConfig  # noqa: E402
from align.toy.evaluate import eval_prompts  # noqa: E402
from critics.steering import SteeringConfig, sample_steered  # noqa: E402
from rewards import get_reward, score  # noqa: E402


@contextlib.contextmanager
def count_rows(pipe):
    """Counts the rows of every denoiser forward (the policy's and the critic's partial ones)."""
    counter = {"rows": 0}
    handle = denoiser(pipe).register_forward_pre_hook(
        lambda module, args, kwargs: counter.__setitem__("rows", counter["rows"] + _batch(args, kwargs)),
        with_kwargs=True,
    )
    try:
        yield counter
    finally:
        handle.remove()


def _batch(args, kwargs) -> int:
    x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    return int(x.shape[0])


def ensure_run(run_dir: Path) -> None:
    if (run_dir / "export" / "critic" / "config.json").is_file():
        return
    print(f"{run_dir}/export/critic missing: running `align train run_dir={run_dir}` first", flush=True)
    subprocess.run([sys.executable, "-m", "align.cli", "train", "--force", f"run_dir={run_dir}"], check=True, cwd=ROOT)


def run_mode(
    pipe,
    critic,
    reward_fns,
    prompts: list[str],
    sampler: SamplerConfig,
    steer: SteeringConfig,
    seed: int,
    batch_size: int,
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    cand = torch.Generator().manual_seed(seed + 10_000)
    rewards, toy, strict, values, images, critic_rows = [], [], [], [], [], 0
    strict_fn = get_reward("toy_geneval", strict=True)
    weights = critic.weights
    t0 = time.perf_counter()
    with count_rows(pipe) as rows:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            out = sample_steered(pipe, chunk, sampler, gen, critic, steer, cand)
            critic_rows += out.critic_rows
            pixels = out.traj.images.float().clamp(0, 1)
            raw = score(reward_fns, pixels, chunk)[0]  # (B, K [+ toy])
            strict.append(score([strict_fn], pixels, chunk)[0][:, 0])
            images.append(pixels)
            rewards.append(raw[:, : len(weights)] @ weights)  # Σ_k w_k R_k
            toy.append(raw[:, [r.name for r in reward_fns].index("toy_geneval")])
            values.append((out.values * critic.weights).sum(-1))
            rows["rows"] -= len(chunk)  # final_values' record call is bookkeeping, not steering
    seconds = time.perf_counter() - t0
    n = len(prompts)
    return {
        "rewards": torch.cat(rewards).numpy(),
        "toy": torch.cat(toy).numpy(),
        "strict": torch.cat(strict).numpy(),
        "images": torch.cat(images),
        "values": torch.cat(values).numpy(),
        "denoiser_rows": (rows["rows"] - critic_rows) / n,
        "critic_rows": critic_rows / n,
        "seconds": seconds / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="runs/toy_ecg")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--images", type=int, default=32, help="output images per seed and mode")
    ap.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=[10.0, 100.0, 1000.0],
        help="grad steering scales s (on the toy, ∇V has an RMS of 1e-3..3e-3 per latent element)",
    )
    ap.add_argument("--candidates", type=int, default=4, help="M for rerank and N for best-of-N")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = Path(args.run_dir)
    ensure_run(run)
    cfg = run_config(run)
    pipe = load_model(cfg.model)
    pipe.load_lora_weights(str(run / "export" / "policy"), adapter_name="policy")
    critic = critics.load(run / "export" / "critic", pipe)
    names = critic.reward_names + ([] if "toy_geneval" in critic.reward_names else ["toy_geneval"])
    reward_fns = [get_reward(n) for n in names]
    sampler = dataclasses.replace(cfg.sampler, progress=False)
    c = str(run / "export" / "critic")
    modes = {"none": SteeringConfig(critic=c, steer="none")}
    modes.update({f"grad s={s:g}": SteeringConfig(critic=c, steer="grad", scale=s) for s in args.scales})
    modes[f"rerank M={args.candidates}"] = SteeringConfig(critic=c, steer="rerank", candidates=args.candidates)
    modes[f"best_of_n N={args.candidates}"] = SteeringConfig(critic=c, steer="best_of_n", candidates=args.candidates)
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for seed in args.seeds:
        prompts = eval_prompts(args.images, seed=1000 + seed)
        for name, steer in modes.items():
            results[name].append(run_mode(pipe, critic, reward_fns, prompts, sampler, steer, seed, args.batch_size))
            r = results[name][-1]
            print(
                f"  seed {seed} {name:<16} reward {r['rewards'].mean():.4f} toy {r['toy'].mean():.4f} "
                f"{r['seconds']:.3f} s/image",
                flush=True,
            )
    base = np.concatenate([r["rewards"] for r in results["none"]])
    base_strict = np.concatenate([r["strict"] for r in results["none"]])
    base_time = np.mean([r["seconds"] for r in results["none"]])
    metrics = critic.config.get("metrics", {})
    print(
        f"\ncritic: {c} (explained variance at the end of training: {metrics.get('explained_variance', 'n/a')}); "
        f"{len(args.seeds)} seeds × {args.images} images, {sampler.num_inference_steps} steps, CFG "
        f"{sampler.guidance_scale}, η {sampler.eta}\n"
    )
    objective = " + ".join(f"{w:g}·{n}" for w, n in zip(critic.weights.tolist(), critic.reward_names))
    print(
        f"| mode | reward {objective} (mean ± std over seeds) | Δ vs none (paired, ± s.e.) | toy reward | "
        "strict toy-GenEval | Δ strict (paired, ± s.e.) | |Δ image| vs none | "
        "corr(V, reward) | denoiser rows/image | critic rows/image | s/image | time ratio vs none |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, per_seed in results.items():
        means = [r["rewards"].mean() for r in per_seed]
        diff = np.concatenate([r["rewards"] for r in per_seed]) - base
        secs = np.mean([r["seconds"] for r in per_seed])
        corr = np.corrcoef(
            np.concatenate([r["values"] for r in per_seed]), np.concatenate([r["rewards"] for r in per_seed])
        )[0, 1]
        toy = np.mean([r["toy"].mean() for r in per_seed])
        strict = np.concatenate([r["strict"] for r in per_seed])
        d_strict = strict - base_strict
        moved = np.mean(  # fidelity cost: mean |pixel change| against the unsteered image from the same x_T
            [(r["images"] - b["images"]).abs().mean().item() for r, b in zip(per_seed, results["none"])]
        )
        print(
            f"| {name} | {np.mean(means):.4f} ± {np.std(means):.4f} | {diff.mean():+.4f} ± "
            f"{diff.std(ddof=1) / np.sqrt(len(diff)):.4f} | {toy:.4f} | {strict.mean():.3f} | "
            f"{d_strict.mean():+.3f} ± {d_strict.std(ddof=1) / np.sqrt(len(d_strict)):.3f} | {moved:.4f} | "
            f"{corr:+.3f} | "
            f"{per_seed[0]['denoiser_rows']:.0f} | "
            f"{per_seed[0]['critic_rows']:.0f} | {secs:.3f} | {secs / base_time:.2f} |"
        )


if __name__ == "__main__":
    main()

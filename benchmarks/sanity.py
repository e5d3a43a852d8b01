"""RL sanity suite: each algorithm must move each easy reward in both directions (issue 15 §1).

A case is (algorithm, reward, direction): `align train` with that reward at weight ±1 on a few
fixed toy prompts, then the base policy (LoRA B = 0) and the trained policy are sampled on the same
prompts with the same noise (seeds the training never used) and scored with the *unsigned*
reward. The paired gain is mean over samples of sign · (R_trained − R_base); its standard error
is the sample std of the paired differences / √n. A case passes when gain / SE > ``--min-z``
(default 5) and the gain exceeds ``--min-gain`` × the base model's per-sample reward std.

    python benchmarks/sanity.py                       # the full matrix (3 algos × 3 rewards × ±1)
    python benchmarks/sanity.py --algos grpo --rewards mean_brightness --signs -1
    python benchmarks/sanity.py ... trainer.lr=1e-3   # extra dotted overrides for every case

Runs in-process (Ray off) so that one case is one function call; prints one row per case.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

#: the matrix's algorithms, in its column order (every registered one must be in it: tests/test_sanity.py)
ALGOS = ("ecg", "grpo", "ddpo")
#: reward name → (spec name, reward_args) of the sanity rewards (rewards/sanity.py, rewards/builtin.py)
REWARDS: dict[str, tuple[str, dict]] = {
    "mean_brightness": ("mean_brightness", {}),
    "color_fraction": ("color_fraction", {"color": "red"}),
    "jpeg_compressibility": ("jpeg_compressibility", {}),
}
#: the sanity recipe (docs/algorithms.md says why each value): one fixed prompt, a group of 32, one optimiser
#: step per iteration on the whole batch (as the REINFORCE reference in tests/test_sanity.py), the small-σ last
#: two of the 10 denoising steps left out of the policy update (their gradient is mostly noise: gradient_diagnosis),
#: mean log-probs with a clip range that acts at that scale
RECIPE = [
    "model.source=toy",
    "ray.num_rollout_workers=0",
    "ray.num_reward_workers=0",
    "eval_every=0",
    "final_eval_prompts=0",
    "trainer.prompts_per_iteration=1",
    "trainer.samples_per_prompt=32",
    "trainer.minibatch_size=32",
    "trainer.timestep_fraction=1.0",
    "sampler.sde_window_size=0",  # the whole chain stochastic: the suite was measured so (docs/algorithms.md)
    "trainer.step_window=0.8",
    "trainer.epochs=1",
    "trainer.lr=3e-3",
    "sampler.logprob_reduce=mean",
    "trainer.clip_range=0.2",
]
ITERATIONS = 12
#: cases that need more policy iterations: "less compressible" has to add fine detail, whose signal sits in the
#: late steps (gradient_diagnosis): GRPO moved it by +0.016 ± 0.005 in 12 iterations, +0.056 ± 0.004 in 24
CASE_ITERATIONS: dict[tuple[str, int], int] = {("jpeg_compressibility", -1): 24}


def case_iterations(reward: str, sign: int) -> int:
    return CASE_ITERATIONS.get((reward, sign), ITERATIONS)


NUM_PROMPTS = 1
#: the fixed prompt of the brightness and JPEG cases: bright objects on the black background, so both directions
#: have room (a dark prompt can hardly get darker)
BRIGHT_PROMPT = "three yellow circles on the left"
#: the fixed prompt of the red-fraction cases: the base model draws its red circle on every seed (red fraction
#: 0.047 ± 0.008 over 32 seeds, never 0), so both directions have room. On "a blue circle and a red square" it draws
#: no red at all on 81 % of the seeds, and "less red" hits the floor of 0 at once (docs/algorithms.md)
RED_PROMPT = "a red circle and a blue square"
EVAL_SEEDS = (
    128  # noise seeds per prompt in the paired evaluation (a reward at its floor, e.g. no red left, needs them)
)


def sanity_prompts(n: int = NUM_PROMPTS, seed: int = 5, containing: Optional[str] = None) -> list[str]:
    """``n`` fixed prompts of the toy grammar (whatever ``preset:toy``'s grammar is); with ``containing``, the
    first ``n`` drawn that contain that word (``color_fraction`` needs prompts of its colour: on the others
    the base model draws none of it, the reward has zero variance and every advantage is 0)."""
    from align.prompts import draw_prompts

    if containing is None:
        return draw_prompts("toy", n, np.random.default_rng(seed))
    pool = [p for p in draw_prompts("toy", 400, np.random.default_rng(seed)) if containing in p.split()]
    picked = list(dict.fromkeys(pool))[:n]
    if len(picked) < n:
        raise ValueError(f"sanity_prompts: the toy grammar gave fewer than {n} prompts containing {containing!r}")
    return picked


def case_prompts(reward: str) -> list[str]:
    """The fixed prompt of a case: :data:`RED_PROMPT` for ``color_fraction``, else :data:`BRIGHT_PROMPT`."""
    return [RED_PROMPT if REWARDS[reward][1].get("color") else BRIGHT_PROMPT] * NUM_PROMPTS


def case_overrides(
    algo: str,
    reward: str,
    sign: int,
    run_dir: Path,
    prompts_file: Path,
    num_prompts: int,
    iterations: int = ITERATIONS,
    extra: Optional[list[str]] = None,
) -> list[str]:
    name, args = REWARDS[reward]
    reward_args = "".join(f", {k}: {v}" for k, v in args.items())
    return [
        *RECIPE,
        f"algo={algo}",
        f"rewards=[{{name: {name}, weight: {float(sign)}, args: {{{reward_args[2:]}}}}}]",
        f"trainer.iterations={iterations}",
        f"trainer.prompts={prompts_file}",
        f"trainer.prompts_per_iteration={num_prompts}",
        f"run_dir={run_dir}",
        *(extra or []),
    ]


@torch.no_grad()
def paired_scores(
    cfg, policy_lora: dict[str, torch.Tensor], prompts: list[str], seeds: int, reward: str
) -> tuple[np.ndarray, np.ndarray]:
    """Unsigned reward of the base policy and of ``policy_lora`` on ``prompts`` × ``seeds`` fixed noises."""
    from align.backbones.lora import load_lora_state_dict
    from align.policy import build_policy
    from align.rollout import RolloutWorker
    from rewards import get_reward, score

    name, args = REWARDS[reward]
    fn = get_reward(name, **args)
    pipe = build_policy(cfg)
    worker = RolloutWorker(pipe, cfg.sampler)
    batch = [p for p in prompts for _ in range(seeds)]
    base = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in policy_lora.items()}
    out = []
    for state in (base, policy_lora):
        load_lora_state_dict(pipe, state, "policy")
        traj = worker.rollout(batch, seed=987_654)  # never a training seed (those are seed·100003 + it)
        out.append(score([fn], traj.images, batch)[0][:, 0].double().numpy())
    return out[0], out[1]


def run_case(
    algo: str,
    reward: str,
    sign: int,
    out: Path,
    iterations: int = ITERATIONS,
    extra: Optional[list[str]] = None,
    log=None,
    prompts: Optional[list[str]] = None,
) -> dict:
    """Train one case and evaluate it paired; returns the row of the table."""
    from align.checkpoint import load_tensors
    from align.config import load_config
    from align.train import train
    from align.train_config import TrainConfig

    run_dir = out / f"{algo}_{reward}_{'plus' if sign > 0 else 'minus'}"
    run_dir.mkdir(parents=True, exist_ok=True)
    prompts = prompts or case_prompts(reward)
    prompts_file = run_dir / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    cfg = load_config(
        TrainConfig, None, case_overrides(algo, reward, sign, run_dir, prompts_file, len(prompts), iterations, extra)
    )
    t0 = time.time()
    state = train(cfg, log=log or (lambda *_: None))
    seconds = time.time() - t0
    base, final = paired_scores(
        cfg, load_tensors(run_dir / "checkpoint" / "policy_lora.safetensors"), prompts, EVAL_SEEDS, reward
    )
    diff = sign * (final - base)
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    row = {
        "algo": algo,
        "reward": reward,
        "sign": sign,
        "base": float(base.mean()),
        "final": float(final.mean()),
        "base_std": float(base.std(ddof=1)),
        "gain": float(diff.mean()),
        "se": float(se),
        "z": float(diff.mean() / se) if se > 0 else float("nan"),
        "seconds": seconds,
        "eval_seeds": EVAL_SEEDS,
        "policy_updates": state.policy_updates,
        "history": [{k: v for k, v in h.items() if isinstance(v, (int, float, str))} for h in state.history],
    }
    (run_dir / "sanity.json").write_text(json.dumps(row, indent=1))
    return row


def passed(row: dict, min_z: float, min_gain: float) -> bool:
    return row["z"] > min_z and row["gain"] > min_gain * max(row["base_std"], 1e-12)


def print_table(rows: list[dict], min_z: float, min_gain: float) -> None:
    print(
        f"{'algo':<5} {'reward':<21} {'w':>3} {'base':>8} {'final':>8} {'gain':>8} {'SE':>7} {'gain/SE':>8} "
        f"{'gain/std':>8} {'s/case':>7}  ok"
    )
    for r in rows:
        print(
            f"{r['algo']:<5} {r['reward']:<21} {r['sign']:>+3d} {r['base']:>8.4f} {r['final']:>8.4f} "
            f"{r['gain']:>+8.4f} {r['se']:>7.4f} {r['z']:>8.1f} {r['gain'] / max(r['base_std'], 1e-12):>8.2f} "
            f"{r['seconds']:>7.0f}  {'yes' if passed(r, min_z, min_gain) else 'NO'}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    ap.add_argument("--rewards", nargs="+", default=list(REWARDS), choices=list(REWARDS))
    ap.add_argument("--signs", nargs="+", type=int, default=[1, -1], choices=[1, -1])
    ap.add_argument("--iterations", type=int, default=None, help="every case (default: case_iterations)")
    ap.add_argument("--out", default="runs/sanity")
    ap.add_argument("--min-z", type=float, default=5.0)
    ap.add_argument("--min-gain", type=float, default=0.5, help="gain must exceed this × the base reward's std")
    ap.add_argument(
        "--prompt",
        action="append",
        default=None,
        dest="prompts",
        help="a fixed prompt (repeat for several; default: case_prompts(reward))",
    )
    ap.add_argument("--verbose", action="store_true", help="print each training iteration's log line")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for every case")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for reward in args.rewards:
        for algo in args.algos:
            for sign in args.signs:
                rows.append(
                    run_case(
                        algo,
                        reward,
                        sign,
                        Path(args.out),
                        args.iterations or case_iterations(reward, sign),
                        args.overrides,
                        log=print if args.verbose else None,
                        prompts=args.prompts,
                    )
                )
                print_table(rows[-1:], args.min_z, args.min_gain)
    print(
        f"\nsanity matrix ({args.iterations or 'case_iterations'} policy iterations; paired on {NUM_PROMPTS} "
        f"prompt × {EVAL_SEEDS} seeds; "
        f"pass: gain/SE > {args.min_z} and gain > {args.min_gain} × base std)"
    )
    print_table(rows, args.min_z, args.min_gain)


def gradient_diagnosis(
    reward: str = "mean_brightness",
    sign: int = 1,
    samples: int = 64,
    seed: int = 0,
    num_inference_steps: int = 10,
    eta: float = 1.0,
) -> list[dict]:
    """Per denoising step i of the base policy: the norm of the policy gradient g_i = ∇_θ mean_j A_j log π_θ(step i
    of sample j) (GRPO advantages on one fixed prompt), and the cosine between g_i of two independent halves of
    the batch: ≈ 0 means step i's gradient is noise at this batch size, > 0 means it carries a direction."""
    from align.algos.core import grpo_advantages
    from align.backbones.adapter import denoiser
    from align.backbones.lora import attach_lora, set_active_adapters
    from align.backbones.model_config import ModelConfig, load_model
    from align.rollout import RolloutWorker
    from align.sampling import SamplerConfig, recompute_log_probs
    from rewards import get_reward, score

    name, args = REWARDS[reward]
    pipe = load_model(ModelConfig(source="toy"))
    attach_lora(pipe, "policy", rank=8, alpha=8.0)
    params = [p for n, p in denoiser(pipe).named_parameters() if ".policy." in n and "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    worker = RolloutWorker(pipe, SamplerConfig(num_inference_steps=num_inference_steps, eta=eta, logprob_reduce="mean"))
    prompts = sanity_prompts(1) * samples
    traj = worker.rollout(prompts, seed=seed)
    raw = score([get_reward(name, **args)], traj.images, prompts)[0][:, 0]
    adv = grpo_advantages(sign * raw, torch.zeros(samples, dtype=torch.long))
    traj = dataclasses.replace(traj, images=None)
    halves = [torch.arange(0, samples, 2), torch.arange(1, samples, 2)]
    rows, per_step = [], []
    set_active_adapters(pipe, ["policy"])
    for i in range(traj.num_steps):
        grads, scores = [], []
        for h in halves:
            logp = recompute_log_probs(pipe, traj.select(h), [i])[:, 0]
            g_adv = torch.autograd.grad(-(adv[h] * logp).mean(), params, retain_graph=True)
            g_score = torch.autograd.grad(logp.mean(), params)  # E[∇ log π] = 0 on-policy: noise only
            grads.append(torch.cat([g.flatten() for g in g_adv]))
            scores.append(torch.cat([g.flatten() for g in g_score]))
        per_step.append(grads)
        cos = float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0))
        score_cos = float(torch.nn.functional.cosine_similarity(scores[0], scores[1], dim=0))
        rows.append(
            {
                "step": i,
                "timestep": int(traj.timesteps[i]),
                "grad_norm": float((grads[0] + grads[1]).norm() / 2),
                "split_half_cos": cos,
                "mean_score_norm": float((scores[0] + scores[1]).norm() / 2),
                "mean_score_split_half_cos": score_cos,
            }
        )
    for first, last in (
        (0, traj.num_steps),
        (0, traj.num_steps // 2),
        (0, traj.num_steps - 2),
        (traj.num_steps // 2, traj.num_steps),
    ):
        a, b = (sum(per_step[i][h] for i in range(first, last)) for h in (0, 1))
        rows.append(
            {
                "steps": f"{first}-{last - 1}",
                "grad_norm": float((a + b).norm() / 2),
                "split_half_cos": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
            }
        )
    return rows


if __name__ == "__main__":
    main()

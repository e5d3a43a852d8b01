"""How much of the toy return can a state-aligned critic explain, step by step, and from which layer?

On rollouts of the initial policy (the `align train` default sampler), for each state i of the chain:
  * oracle: correlation of R with the checker's score of decode(x̂0_i), the model's own guess of the
    final image; corr² bounds what any predictor built on that guess explains;
  * heads: ValueHeads trained on *frozen* backbone features (mid-block and up-blocks) of the training
    rollouts, explained variance on held-out rollouts, for the toy-GenEval and the JPEG reward.
Prints one table per reward with a column per feature layer.

    python benchmarks/critic_toy.py [--train 512] [--test 192] [--epochs 15]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from align.algos.core import explained_variance
from align.config import load_config
from align.learner import embeds_of
from align.sampling import Trajectory
from align.sampling.sampler import decode, predict
from align.train import build, iteration_prompts
from align.train_config import TrainConfig
from critics.value_model import LatentCritic, ValueHeads
from rewards import get_reward, score

LAYERS = ("mid_block", "up_blocks.1", "up_blocks.2")
REWARDS = ("toy_geneval", "jpeg_compressibility")


def rollouts(cfg: TrainConfig, worker, batches: range) -> tuple[Trajectory, torch.Tensor]:
    trajs, raws = [], []
    fns = [get_reward(n) for n in REWARDS]
    for it in batches:
        prompts = iteration_prompts(cfg, it)
        traj = worker.rollout(prompts, seed=cfg.trainer.seed * 100_003 + it)
        raws.append(score(fns, traj.images, prompts)[0])
        trajs.append(traj)
    return Trajectory.cat(trajs), torch.cat(raws)


@torch.no_grad()
def oracle_correlation(pipe, traj: Trajectory, reward: torch.Tensor, guidance: float) -> list[float]:
    """corr(R, checker(decode(x̂0_i))) per state, x̂0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t (DDIM's own guess)."""
    out, fn = [], get_reward("toy_geneval")
    embeds = {k: getattr(traj, k) for k in ("prompt_embeds", "negative_prompt_embeds")}
    for i in range(traj.num_steps):
        x, t = traj.latents[:, i], traj.timesteps[i]
        a = pipe.scheduler.alphas_cumprod[int(t)]
        x0 = (x - (1 - a).sqrt() * predict(pipe, x, t, embeds, guidance)) / a.sqrt()
        guess = score([fn], decode(pipe, x0), traj.prompts)[0][:, 0]
        out.append(float(torch.corrcoef(torch.stack([guess, reward]))[0, 1]))
    return out


@torch.no_grad()
def features(critic: LatentCritic, traj: Trajectory) -> tuple[torch.Tensor, torch.Tensor]:
    toks, tembs = zip(
        *[critic.features(traj.latents[:, i], traj.timesteps[i], embeds_of(traj)) for i in range(traj.num_steps)]
    )
    return torch.stack(toks, 1), torch.stack(tembs, 1)  # (B, T, N, C), (B, T, D)


def fit_heads(train: tuple, g_train: torch.Tensor, test: tuple, g_test: torch.Tensor, epochs: int) -> list[float]:
    """Heads on frozen features, Adam 1e-3, minibatches of 32 (sample, step) pairs; held-out EV per step."""
    (x, temb), (xt, tembt) = train, test
    b, steps = x.shape[:2]
    torch.manual_seed(0)
    heads = ValueHeads(x.shape[-1], temb.shape[-1], ["r"], 128)
    opt = torch.optim.AdamW(heads.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(epochs):
        perm = torch.randperm(b * steps)
        for s in range(0, b * steps, 32):
            idx = perm[s : s + 32]
            v = heads(x[idx // steps, idx % steps], temb[idx // steps, idx % steps])[:, 0]
            loss = 0.5 * ((v - g_train[idx // steps]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return [explained_variance(heads(xt[:, i], tembt[:, i])[:, 0], g_test) for i in range(steps)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=512, help="training rollouts (multiple of 32)")
    ap.add_argument("--test", type=int, default=192, help="held-out rollouts (multiple of 32)")
    ap.add_argument("--epochs", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(TrainConfig, "configs/toy_ecg.yaml", ["ray.num_rollout_workers=0", "ray.num_reward_workers=0"])
    pipe, _, _, _, _, worker = build(cfg)
    n_tr, n_te = args.train // 32, args.test // 32
    train_traj, train_raw = rollouts(cfg, worker, range(n_tr))
    test_traj, test_raw = rollouts(cfg, worker, range(10_000, 10_000 + n_te))
    oracle = oracle_correlation(pipe, test_traj, test_raw[:, 0], cfg.sampler.guidance_scale)
    evs = {}
    for layer in LAYERS:
        critic = LatentCritic(pipe, ["r"], adapter="policy", feature_layer=layer)  # policy LoRA is zero: base features
        tr, te = features(critic, train_traj), features(critic, test_traj)
        for k, name in enumerate(REWARDS):
            mu, sd = train_raw[:, k].mean(), train_raw[:, k].std()
            evs[name, layer] = fit_heads(tr, (train_raw[:, k] - mu) / sd, te, (test_raw[:, k] - mu) / sd, args.epochs)
    print(
        f"{args.train} training / {args.test} held-out rollouts of the initial policy, "
        f"{cfg.sampler.num_inference_steps} steps; held-out EV of heads on frozen features"
    )
    for name in REWARDS:
        print(
            f"\nreward {name}"
            + ("  (oracle: corr(R, checker(x̂0_i)); its mean row is mean corr²)" if name == "toy_geneval" else "")
        )
        cols = (["oracle corr"] if name == "toy_geneval" else []) + list(LAYERS)
        print(f"{'step':>4} {'t':>5} " + " ".join(f"{c:>12}" for c in cols))
        for i in range(test_traj.num_steps):
            row = ([oracle[i]] if name == "toy_geneval" else []) + [evs[name, layer][i] for layer in LAYERS]
            print(f"{i:>4} {int(test_traj.timesteps[i]):>5} " + " ".join(f"{v:>12.3f}" for v in row))
        print(
            f"{'mean':>10} "
            + " ".join(
                f"{v:>12.3f}"
                for v in (
                    ([float(np.mean(np.square(oracle)))] if name == "toy_geneval" else [])
                    + [float(np.mean(evs[name, layer])) for layer in LAYERS]
                )
            )
        )


if __name__ == "__main__":
    main()

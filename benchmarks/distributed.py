"""Distributed rollouts and weight sync on this machine (local Ray, CPU), side by side.

1. Rollout throughput (samples/s) of the shipped toy model with 1 and 2 Ray rollout actors (one
   CPU slot and one torch thread each), against the in-process worker, on the same seeded batch.
2. Bytes of one weight sync (the policy LoRA) against the full denoiser state dict, for the toy
   UNet and for SD1.5's UNet architecture (built on the meta device: no weights, no download).
3. Time of one sync against the whole iteration, from ``align train`` on the toy default with
   Ray actors (the history records ``sync_seconds`` and ``seconds`` per iteration).

    python benchmarks/distributed.py [--batch 32] [--repeats 3] [--iterations 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from align.backbones.presets import SD15_UNET
from align.config import load_config
from align.train_config import TrainConfig


def rollout_throughput(cfg: TrainConfig, prompts: list[str], repeats: int) -> dict[str, float]:
    """samples/s of each worker set on the same batch (one warm-up batch first)."""
    from align.backbones.lora import lora_state_dict
    from align.policy import build_policy
    from align.rollout import LocalRollouts, RolloutWorker
    from align.rollout.ray_group import RayRollouts

    def rate(group) -> float:
        group.rollout(prompts, seed=0)
        times = []
        for r in range(repeats):
            t0 = time.perf_counter()
            group.rollout(prompts, seed=r + 1)
            times.append(time.perf_counter() - t0)
        return len(prompts) / statistics.median(times)

    torch.manual_seed(0)
    pipe = build_policy(cfg)
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    local = LocalRollouts(RolloutWorker(pipe, cfg.sampler), cfg.ray.chunk_size)
    out["in-process worker (2 threads)"] = rate(local)
    torch.set_num_threads(threads)
    for n in (1, 2):
        cfg.ray.num_rollout_workers = n
        group = RayRollouts(cfg)
        group.set_policy(lora_state_dict(pipe, "policy"), 0)
        out[f"{n} Ray actor{'s' if n > 1 else ''} (1 CPU each)"] = rate(group)
        group.close()
    return out


def sync_bytes(cfg: TrainConfig) -> list[tuple[str, int, int]]:
    """(model, LoRA bytes, full denoiser bytes) for the toy UNet and SD1.5's UNet (fp32)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from align.backbones.adapter import denoiser
    from align.backbones.lora import DEFAULT_TARGETS, attach_lora, lora_num_bytes
    from align.backbones.model_config import load_model

    def nbytes(module: torch.nn.Module, lora: bool) -> int:
        return sum(p.numel() * 4 for n, p in module.named_parameters() if ("lora_" in n) == lora)

    pipe = load_model(cfg.model)
    full = nbytes(denoiser(pipe), False)
    attach_lora(pipe, "policy", rank=cfg.lora.rank, alpha=cfg.lora.alpha)
    rows = [("toy UNet", lora_num_bytes(pipe, "policy"), full)]
    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15_UNET)
        unet.add_adapter(
            LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, target_modules=list(DEFAULT_TARGETS)),
            adapter_name="policy",
        )
    rows.append(("SD1.5 UNet (architecture)", nbytes(unet, True), nbytes(unet, False)))
    return rows


def sync_share(iterations: int) -> tuple[float, float, float]:
    """Median sync seconds, median iteration seconds and sync bytes over policy iterations of the toy default."""
    from align.train import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            TrainConfig,
            "configs/toy_ecg.yaml",
            [
                f"trainer.iterations={iterations}",
                "eval_every=0",
                "final_eval_prompts=0",
                "critic.pretrain_iterations=0",
                f"run_dir={tmp}",
            ],
        )
        state = train(cfg, log=lambda *_: None)
    hist = [h for h in state.history if "sync_seconds" in h][1:]  # the first carries one-off warm-up
    return (
        statistics.median(h["sync_seconds"] for h in hist),
        statistics.median(h["seconds"] for h in hist),
        hist[0]["sync_bytes"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=4)
    args = parser.parse_args()
    import numpy as np
    import ray

    from align.toy.world import sample_scenes

    cfg = load_config(TrainConfig, "configs/toy_ecg.yaml", [])
    prompts = [s.prompt for s in sample_scenes(args.batch, np.random.default_rng(0))]
    # Ray starts its workers at niceness 15 (raylet's worker_niceness); on a machine shared with other
    # work they would then lose the cores to every normal process. Same priority as the in-process row:
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=4, include_dashboard=False)  # logical slots: 2 rollout + 1 reward actor + spare
    try:
        rates = rollout_throughput(cfg, prompts, args.repeats)
        base = rates["1 Ray actor (1 CPU each)"]
        print(
            f"\nRollout throughput, toy model, batch {args.batch}, {cfg.sampler.num_inference_steps} steps, "
            f"chunk {cfg.ray.chunk_size}, {os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.1f} "
            "(other processes compete for the cores: read the ratio against the load)"
        )
        print(f"| {'workers':<32} | samples/s | vs 1 actor |\n|{'-' * 34}|-----------|------------|")
        for name, r in rates.items():
            print(f"| {name:<32} | {r:9.2f} | {r / base:9.2f}x |", flush=True)
        print(f"\nWeight sync size (policy LoRA rank {cfg.lora.rank} on to_q/k/v/out, fp32)")
        print(
            f"| {'denoiser':<26} | LoRA bytes | full state bytes | ratio |\n|{'-' * 28}|------------|"
            "------------------|-------|"
        )
        for name, lora, full in sync_bytes(cfg):
            print(f"| {name:<26} | {lora:>10,} | {full:>16,} | {100 * lora / full:.3f}% |", flush=True)
        sync_s, iter_s, sync_b = sync_share(args.iterations)
        print(f"\nWeight sync time, toy default with Ray actors (median over policy iterations 2..{args.iterations})")
        print("| sync bytes | sync s | iteration s | sync share |\n|------------|--------|-------------|------------|")
        print(f"| {int(sync_b):>10,} | {sync_s:.4f} | {iter_s:11.3f} | {100 * sync_s / iter_s:9.2f}% |")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()

"""GPU check at real denoiser sizes: sampler vs raw ``pipe()``, one PPO update (ECG vs GRPO), bf16 PPO ratios.

Two backbones are built from configs with random weights (no download), registered as presets and
loaded through ``model.source`` like any model:

* ``gpu-check-sd15``: SD1.5's UNet2DConditionModel config (859.5 M parameters), DDIM;
* ``gpu-check-sd35m``: SD3.5-Medium's SD3Transformer2DModel config (MMDiT-X, 24 layers, patch 2, dual
  attention in layers 0-12), flow matching.

Their text encoders and VAEs are *tiny* (1-layer CLIPs of the widths the denoisers expect, no T5, a
4-block VAE with 32-64 channels): the rows below measure the denoiser, the sampler and the learner,
not SD's text encoders or VAE. In bf16 on CUDA it measures, per backbone:

(a) our sampler's images/s ÷ a raw diffusers ``pipe()`` call's, same prompts, steps, CFG and resolution;
(b) one policy iteration's update (ECG: critic values + PPO + critic refit; GRPO: PPO) through
    ``align.train.build`` and the registered algorithm, its seconds and peak
    ``torch.cuda.max_memory_allocated``, at equal samples per update, and the GRPO/ECG ratios;
(c) max |exp(log π_recomputed − log π_rollout) − 1| over every step and sample (the PPO ratio's
    deviation from 1 before any update: pure numerics) with the model in bf16 and in fp32;

plus the geneval reward's throughput at its real sizes (``benchmarks/geneval_reward.measure``).

    python benchmarks/gpu_check.py                # one GPU, bf16, 512 px; under 8 minutes on an H200
    python benchmarks/gpu_check.py --tiny         # tiny presets on CPU (seconds): the same code path
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/gpu_check.py` from anywhere

from align.backbones.presets import (
    SD15_UNET,
    clip_text_encoder,
    register_preset,  # noqa: E402
    sd3_pipeline,
    sd_pipeline,
    tiny_vae,
)
from align.backbones.tokenizer import toy_tokenizer  # noqa: E402

SD35M_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    qk_norm="rms_norm",
    dual_attention_layers=tuple(range(13)),
)
#: where the presets initialise their weights (set in main: the GPU, so 2.5 B parameters init in seconds)
BUILD_DEVICE = {"device": "cpu"}
#: (backbone, quantity) rows of the table, in order (tests/test_gpu_check.py checks them)
QUANTITIES = (
    "sampler ÷ pipe() images/s",
    "ours images/s",
    "pipe() images/s",
    "PPO update s, ECG",
    "PPO update s, GRPO",
    "update time GRPO/ECG",
    "peak GiB, ECG",
    "peak GiB, GRPO",
    "peak memory GRPO/ECG",
    "update GiB above start, ECG",
    "update GiB above start, GRPO",
    "above-start GRPO/ECG",
    "max abs(ratio−1) bf16",
    "max abs(ratio−1) fp32",
)


@register_preset("gpu-check-sd15")
def sd15_shape(seed: int = 0):
    """SD1.5's UNet (random), a 1-layer 768-wide CLIP, a tiny factor-8 VAE; DDIM with SD1.5's schedule."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = toy_tokenizer()
    with torch.device(BUILD_DEVICE["device"]):  # the networks only: schedulers keep their tensors on the CPU
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = tiny_vae((32, 32, 64, 64), sample_size=512, scaling_factor=0.18215)
        text_encoder = clip_text_encoder(tokenizer, 768, layers=1, heads=12)
    return sd_pipeline(unet, vae, text_encoder, tokenizer, "epsilon")


@register_preset("gpu-check-sd35m")
def sd35m_shape(seed: int = 0):
    """SD3.5-Medium's transformer (random), CLIP-L/G-wide 1-layer encoders (pooled 768 + 1280), no T5, tiny VAE."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    tokenizer = toy_tokenizer()
    with torch.device(BUILD_DEVICE["device"]):
        transformer = SD3Transformer2DModel(**SD35M_TRANSFORMER)
        vae = tiny_vae(
            (32, 32, 64, 64),
            latent_channels=16,
            sample_size=512,
            shift_factor=0.0609,
            scaling_factor=1.5305,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        te1 = clip_text_encoder(tokenizer, 768, layers=1, heads=12, projection_dim=768)
        te2 = clip_text_encoder(tokenizer, 1280, layers=1, heads=20, projection_dim=1280)
    return sd3_pipeline(transformer, vae, te1, te2, tokenizer, shift=3.0)


@dataclasses.dataclass
class Shape:
    """What every measurement of a run shares."""

    device: str
    dtype: str
    resolution: int
    steps: int
    prompts: int  # prompts per update
    group: int  # samples per prompt (GRPO's group; ECG gets the same samples)
    minibatch: int
    timestep_fraction: float
    repeats: int

    @property
    def samples(self) -> int:
        return self.prompts * self.group


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_seconds(fn: Callable[[], object], device: str, repeats: int) -> float:
    fn()  # warm-up (kernels, autotuning, allocator)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _prompts(n: int) -> list[str]:
    from align.toy.evaluate import eval_prompts

    return eval_prompts(n, 0)


def throughput(source: str, shape: Shape) -> dict[str, float]:
    """(a): images/s of ``sample_trajectory`` and of ``pipe()`` on the same batch and settings."""
    from align.backbones.model_config import ModelConfig, load_model
    from align.sampling import SamplerConfig, sample_trajectory

    pipe = load_model(ModelConfig(source=source, dtype=shape.dtype, device=shape.device))
    prompts, res = _prompts(shape.samples), shape.resolution
    cfg = SamplerConfig(num_inference_steps=shape.steps, height=res, width=res)
    extra = {"eta": cfg.eta} if hasattr(pipe, "unet") else {}

    def ours():
        return sample_trajectory(pipe, prompts, cfg, torch.Generator().manual_seed(0))

    def raw():
        with torch.inference_mode():
            return pipe(
                prompt=prompts,
                height=res,
                width=res,
                num_inference_steps=shape.steps,
                guidance_scale=cfg.guidance_scale,
                output_type="pt",
                generator=torch.Generator().manual_seed(0),
                **extra,
            )

    t_ours, t_raw = (_median_seconds(f, shape.device, shape.repeats) for f in (ours, raw))
    pipe = None  # noqa: F841 (frees the model before the next one loads; ours/raw are not called again)
    _free()
    n = len(prompts)
    return {"ours images/s": n / t_ours, "pipe() images/s": n / t_raw, "sampler ÷ pipe() images/s": t_raw / t_ours}


def _train_config(source: str, algo: str, shape: Shape, run_dir: str):
    from align.config import load_config
    from align.train_config import TrainConfig

    critic = ["critic.pretrain_iterations=0"] if algo == "ecg" else []
    return load_config(
        TrainConfig,
        None,
        [
            f"model.source={source}",
            f"model.dtype={shape.dtype}",
            f"model.device={shape.device}",
            f"algo={algo}",
            f"sampler.num_inference_steps={shape.steps}",
            f"sampler.height={shape.resolution}",
            f"sampler.width={shape.resolution}",
            f"trainer.prompts_per_iteration={shape.prompts}",
            f"trainer.samples_per_prompt={shape.group}",
            f"trainer.minibatch_size={shape.minibatch}",
            f"trainer.timestep_fraction={shape.timestep_fraction}",
            "rewards=[{name: jpeg_compressibility}]",
            "ray.num_rollout_workers=0",
            "ray.num_reward_workers=0",
            "eval_every=0",
            "final_eval_prompts=0",
            f"run_dir={run_dir}",
            *critic,
        ],
    )


def _one_update(cfg, parts, algo, it: int) -> tuple[float, float, float]:
    """Rollout + reward (not timed), then the iteration's update as align/train.py runs it: critic values
    (ECG), advantages, ``algo.update``. Returns (seconds, peak bytes, bytes allocated before)."""
    from align.algos.batch import Batch
    from align.algos.registry import POLICY
    from align.train import iteration_prompts
    from rewards import score

    pipe, critic, reward_fns, weights, learner, worker, norm = parts
    worker.set_policy(None, learner.version)
    prompts = iteration_prompts(cfg, it)
    traj = worker.rollout(prompts, seed=it)
    raw = score(reward_fns, traj.images.float().cpu(), prompts)[0]
    traj = dataclasses.replace(traj, images=None)
    norm.update(raw[:, 0])

    def normalise(r: torch.Tensor) -> torch.Tensor:
        return norm.normalise(r[:, 0])[:, None].float()

    batch = Batch(
        traj=traj,
        prompts=prompts,
        group_ids=torch.arange(len(prompts)) // cfg.trainer.samples_per_prompt,
        raw=raw,
        targets=normalise(raw),
        shard=slice(0, len(prompts)),
    )
    device = cfg.model.device
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if device.startswith("cuda") else float("nan")
    t0 = time.perf_counter()
    if algo.needs_critic:
        batch.values = learner.values(traj)
    batch.advantages = algo.advantages(batch, weights)
    algo.update(learner, batch, POLICY, normalise)
    _sync(device)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else float("nan")
    return time.perf_counter() - t0, peak, before


def ratio_deviation(parts, cfg, seed: int = 99) -> float:
    """(c): max over samples and steps of |exp(log π_recomputed − log π_rollout) − 1|, recomputed per step in
    the learner's minibatches (shuffled, so batch composition differs from the rollout's)."""
    from align.backbones.lora import set_active_adapters
    from align.sampling import recompute_log_probs
    from align.train import iteration_prompts

    pipe, worker = parts[0], parts[5]
    traj = dataclasses.replace(worker.rollout(iteration_prompts(cfg, seed), seed=seed), images=None)
    set_active_adapters(pipe, ["policy"])
    order = torch.randperm(traj.batch_size, generator=torch.Generator().manual_seed(seed))
    worst = 0.0
    with torch.no_grad():
        for start in range(0, traj.batch_size, cfg.trainer.minibatch_size):
            idx = order[start : start + cfg.trainer.minibatch_size]
            mb = traj.select(idx)
            for i in range(traj.num_steps):
                logp = recompute_log_probs(pipe, mb, [i])[:, 0]
                dev = (torch.exp(logp - mb.log_probs[:, i].to(logp.device)) - 1).abs().max()
                worst = max(worst, float(dev))
    return worst


def updates(source: str, shape: Shape) -> dict[str, float]:
    """(b) for ECG and GRPO at equal samples, then (c) on the GRPO build in bf16 and in fp32."""
    from align.algos.core import RunningMeanStd
    from align.algos.registry import make_algorithm
    from align.train import build

    out: dict[str, float] = {}
    for name in ("ecg", "grpo"):
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as run_dir:
            cfg = _train_config(source, name, shape, run_dir)
            parts = (*build(cfg), RunningMeanStd())
            algo = make_algorithm(cfg)
            _one_update(cfg, parts, algo, 0)  # warm-up
            seconds, peak, before = _one_update(cfg, parts, algo, 1)
            label = name.upper()
            out[f"PPO update s, {label}"] = seconds
            out[f"peak GiB, {label}"] = peak / 2**30
            out[f"update GiB above start, {label}"] = (peak - before) / 2**30
            if name == "grpo":  # (c) on this build: as loaded, then cast to fp32 (a fresh rollout in fp32)
                bf16 = shape.dtype == "bfloat16"
                out["max abs(ratio−1) bf16" if bf16 else "max abs(ratio−1) fp32"] = ratio_deviation(parts, cfg)
                if bf16:
                    parts[0].to(dtype=torch.float32)
                    out["max abs(ratio−1) fp32"] = ratio_deviation(parts, cfg)
            del parts
            _free()
    out["update time GRPO/ECG"] = out["PPO update s, GRPO"] / out["PPO update s, ECG"]
    out["peak memory GRPO/ECG"] = out["peak GiB, GRPO"] / out["peak GiB, ECG"]
    out["above-start GRPO/ECG"] = out["update GiB above start, GRPO"] / out["update GiB above start, ECG"]
    return out


def geneval_rows(tiny: bool, device: str) -> list[dict]:
    """The geneval reward's images/s (benchmarks/geneval_reward.measure; random weights, no download)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from geneval_reward import measure

    if tiny:
        return measure("tiny", "cpu", 64, (2,), repeats=1)
    return measure("full", device, 512, (1, 8), repeats=3)


def _fmt(value: float) -> str:
    if value != value:
        return "n/a"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def print_table(results: dict[str, dict[str, float]], geneval: list[dict], shape: Shape, elapsed: dict) -> None:
    print(
        f"\ngpu_check: {shape.device}, {shape.dtype}, {shape.resolution} px, {shape.steps} steps, CFG 4.5, "
        f"{shape.samples} samples/update ({shape.prompts} prompts × {shape.group}), minibatch {shape.minibatch}, "
        f"timestep_fraction {shape.timestep_fraction}; text encoders and VAE are tiny (the denoisers are full size)"
    )
    print(f"| {'backbone':<16} | {'quantity':<28} | {'value':>10} |")
    print(f"|{'-' * 18}|{'-' * 30}|{'-' * 12}|")
    for backbone, row in results.items():
        for q in QUANTITIES:
            print(f"| {backbone:<16} | {q:<28} | {_fmt(row.get(q, float('nan'))):>10} |")
    for r in geneval:
        for key in ("rules", "toy", "geneval_plain", "geneval_color"):
            label = f"{key} images/s, batch {r['batch']}"
            print(f"| {'geneval reward':<16} | {label:<28} | {_fmt(r[key]):>10} |")
    print("phase seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in elapsed.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny presets on CPU (tests; seconds)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default 512; 32 with --tiny)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 10; 3 with --tiny)")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=4, help="samples per prompt (GRPO's group)")
    ap.add_argument("--minibatch", type=int, default=4)
    ap.add_argument("--timestep-fraction", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=2, help="timed sampler calls after one warm-up")
    ap.add_argument("--backbones", nargs="+", default=None, help="a subset of the backbones (default: both)")
    ap.add_argument("--skip-geneval", action="store_true")
    args = ap.parse_args(argv)
    device = args.device or ("cpu" if args.tiny else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --tiny (CPU) or on a GPU")
    BUILD_DEVICE["device"] = device
    shape = Shape(
        device,
        args.dtype,
        args.resolution or (32 if args.tiny else 512),
        args.steps or (3 if args.tiny else 10),
        args.prompts,
        args.group,
        args.minibatch,
        args.timestep_fraction,
        args.repeats,
    )
    sources = (
        {"tiny-unet": "preset:tiny-unet", "tiny-dit": "preset:tiny-dit"}
        if args.tiny
        else {"sd15-shape": "preset:gpu-check-sd15", "sd35m-shape": "preset:gpu-check-sd35m"}
    )
    unknown = sorted(set(args.backbones or sources) - set(sources))
    if unknown:
        ap.error(f"--backbones: unknown {', '.join(unknown)}; choose from {', '.join(sources)}")
    results, elapsed = {}, {}
    for backbone, source in sources.items():
        if args.backbones and backbone not in args.backbones:
            continue
        t0 = time.perf_counter()
        results[backbone] = throughput(source, shape)
        results[backbone].update(updates(source, shape))
        elapsed[backbone] = time.perf_counter() - t0
        print(f"{backbone}: done in {elapsed[backbone]:.0f} s", flush=True)
    t0 = time.perf_counter()
    geneval = [] if args.skip_geneval else geneval_rows(args.tiny, device)
    elapsed["geneval"] = time.perf_counter() - t0
    print_table(results, geneval, shape, elapsed)
    return 0


if __name__ == "__main__":
    sys.exit(main())

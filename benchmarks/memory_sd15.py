"""Peak memory of one ECG iteration at the SD1.5 shape: gradient checkpointing and critic micro-batching.

An SD1.5-architecture pipeline with random weights is built from configs and saved to a local directory:
SD1.5's UNet2DConditionModel (859.5 M parameters), SD1.5's AutoencoderKL (4 blocks, 128–512 channels) and
a CLIP-L-shaped text encoder (12 layers, width 768) on the toy tokenizer. Each variant is one
``align train`` subprocess loading it through ``model.source`` (in-process rollouts and rewards), so its peak
RSS is that child's own rusage. One iteration, ECG with the critic (no value pretraining: the iteration
values the chain, updates the policy and refits the critic), JPEG compressibility as the reward. Prints
side by side in one run: peak RSS, its ratio to the first variant, the iteration's seconds and its update's.

    python benchmarks/memory_sd15.py [--resolution 512] [--steps 2] [--samples 2] [--variants ...] [--tiny]

``--tiny`` runs the same code path on the tiny UNet preset in seconds (tests/test_memory_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: variant → (its row label, its overrides), in the order the table prints them (ratios are to the first)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "ecg": ("ECG", []),
    "ckpt": ("ECG + gradient checkpointing", ["learner.gradient_checkpointing=true"]),
    "ckpt_mb": (
        "ECG + checkpointing + critic values 1 row/forward",
        ["learner.gradient_checkpointing=true", "critic.value_batch_size=1"],
    ),
    "grpo": ("GRPO (no critic)", ["algo=grpo"]),
}


def build_sd15(directory: Path) -> Path:
    """The SD1.5-architecture pipeline with random weights, saved once into ``directory``."""
    if (directory / "model_index.json").is_file():
        return directory
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from align.backbones.presets import SD15_UNET, clip_text_encoder, sd_pipeline
    from align.backbones.tokenizer import toy_tokenizer

    torch.manual_seed(0)
    tokenizer = toy_tokenizer()
    vae = AutoencoderKL(  # SD1.5's VAE config
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=0.18215,
    )
    text_encoder = clip_text_encoder(tokenizer, 768, layers=12, heads=12)
    pipe = sd_pipeline(UNet2DConditionModel(**SD15_UNET), vae, text_encoder, tokenizer, "epsilon")
    pipe.save_pretrained(directory)
    return directory


def run_variant(source: str, overrides: list[str], args: argparse.Namespace, run_dir: Path) -> dict:
    """One ``align train`` child: its peak RSS (GiB, its own rusage) and the iteration's timings."""
    cmd = [
        sys.executable,
        "-m",
        "align",
        "train",
        "--force",
        f"model.source={source}",
        "algo=ecg",
        f"sampler.num_inference_steps={args.steps}",
        *([f"sampler.height={args.resolution}", f"sampler.width={args.resolution}"] if args.resolution else []),
        "trainer.prompts_per_iteration=1",
        f"trainer.samples_per_prompt={args.samples}",
        f"trainer.minibatch_size={args.samples}",
        "trainer.iterations=1",
        "trainer.num_threads=0",
        "critic.pretrain_iterations=0",
        "rewards=[{name: jpeg_compressibility}]",
        "ray.num_rollout_workers=0",
        "ray.num_reward_workers=0",
        "eval_every=0",
        "final_eval_prompts=0",
        "eval_prompts=1",  # the end-of-run grid: one image, so its VAE decode does not set the peak
        f"run_dir={run_dir}",
        *overrides,
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "w") as log:  # a file, not a pipe: wait4 reaps the child itself
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(run_dir / 'train.log').read_text()[-3000:]}")
    record = json.loads((run_dir / "checkpoint" / "state.json").read_text())["history"][-1]
    return {
        "peak_gib": usage.ru_maxrss / 2**20,  # Linux reports KiB
        "iteration_s": record["seconds"],
        "update_s": record.get("timing/update", 0.0),
    }


def table(results: dict[str, dict]) -> str:
    base = next(iter(results.values()))["peak_gib"]
    lines = [
        "| variant | peak RSS GiB | ÷ first | iteration s | update s |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        ratio = r["peak_gib"] / base
        lines.append(f"| {name} | {r['peak_gib']:.2f} | {ratio:.2f} | {r['iteration_s']:.1f} | {r['update_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=512, help="pixels per side (0: the model's default)")
    ap.add_argument("--steps", type=int, default=2, help="denoising steps")
    ap.add_argument("--samples", type=int, default=2, help="samples per iteration (one prompt)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--work", default=None, help="where the pipeline and runs go (default: a temporary dir)")
    ap.add_argument("--tiny", action="store_true", help="the tiny UNet preset (seconds), for the tests")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        source = "preset:tiny-unet" if args.tiny else str(build_sd15(work / "sd15_shape"))
        results = {}
        for name in args.variants:
            label, overrides = VARIANTS[name]
            results[label] = run_variant(source, overrides, args, work / name)
            print(f"  {label}: peak RSS {results[label]['peak_gib']:.2f} GiB", flush=True)
    shape = "tiny-unet" if args.tiny else "SD1.5 UNet/VAE/CLIP-L shape, random weights"
    print(
        f"\n{shape}, {args.resolution or 'default'} px, {args.steps} steps, {args.samples} samples, ECG, 1 iteration\n"
    )
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""DPS vs CLAMP vs MAP-RPS (3 knob values) on toy-world inpainting and 2× super-resolution with the
shipped toy model (latent variants: A∘Dec through its VAE). Prints, side by side per task: PSNR, SSIM,
LPIPS (only with --lpips-weights; no download here), the toy checker's score of the reconstruction
against the scene's prompt, denoiser forwards and VJPs (backward passes) per image batch, and wall
time; the ratio column is wall time over DPS's. PSNR is the mean over images ± its standard error.
Also writes a D–P plot (SSIM, or LPIPS when available, against MSE along the MAP-RPS knob, with
CLAMP and DPS as reference points).

    python benchmarks/inverse_toy.py [--images 8] [--out runs/bench_inverse] [--lpips-weights FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from align.backbones.model_config import ModelConfig, load_model
from align.inverse import CLAMP, DPS, Downsample, Inpaint, MapRPS, box_mask
from align.inverse.metrics import LPIPS_UNAVAILABLE, image_metrics, load_lpips
from align.toy.detector import score_batch
from align.toy.world import RESOLUTION, render_batch, sample_scenes

KNOBS = (0.0, 0.3, 0.6)
SIGMA_Y = 0.05


def tasks():
    return {
        "inpaint (16×16 centre box)": Inpaint(box_mask(RESOLUTION, (8, 8, 16, 16))),
        "sr ×2 (bicubic)": Downsample(2, "bicubic"),
    }


def methods(args):
    """name → factory(pipe, op, y) returning a solver with problem + sample; MAP-RPS rows share stage 1."""
    out = {
        "DPS": lambda p, op, y: DPS(p, op, y, None, steps=args.dps_steps, scale=args.dps_scale),
        "CLAMP": lambda p, op, y: CLAMP(p, op, y, SIGMA_Y),
    }
    for r in KNOBS:
        out[f"MAP-RPS r={r:g}"] = (lambda r: lambda p, op, y: MapRPS(p, op, y, SIGMA_Y, renoise=r))(r)
    return out


def run_task(pipe, op, clean, prompts, args, lpips):
    gen = torch.Generator().manual_seed(args.seed)
    y = op(clean * 2 - 1)
    y = y + SIGMA_Y * torch.randn(y.shape, generator=gen) * (op.mask if isinstance(op, Inpaint) else 1)
    rows, x_hat, stage1 = {}, None, None
    for name, make in methods(args).items():
        t0 = time.perf_counter()
        solver = make(pipe, op, y)
        g = torch.Generator().manual_seed(args.seed)
        if isinstance(solver, MapRPS):
            if x_hat is None:  # stage 1 once, its cost and time charged to every knob value
                x_hat = solver.stage1()
                stage1 = (dict(solver.problem.denoiser.calls), time.perf_counter() - t0)
            else:
                for k, v in stage1[0].items():
                    solver.problem.denoiser.calls[k] += v
                t0 -= stage1[1]
            state = solver.sample(g, x_hat=x_hat)
        else:
            state = solver.sample(g)
        img = (solver.problem.output(state).clamp(-1, 1) + 1) / 2
        wall = time.perf_counter() - t0
        row = image_metrics(img, clean, lpips)
        per_image = [image_metrics(img[i : i + 1], clean[i : i + 1])["psnr"] for i in range(len(img))]
        row["psnr_se"] = float(np.std(per_image, ddof=1) / np.sqrt(len(per_image))) if len(img) > 1 else 0.0
        row["toy_score"] = float(score_batch(img, prompts)["score"].mean())
        row.update(solver.problem.denoiser.calls, wall=wall)
        rows[name] = row
        print(f"  {name}: PSNR {row['psnr']:.2f}  {wall:.1f}s", flush=True)
    return rows


def table(results: dict) -> str:
    lines = [
        "| task | method | PSNR (dB) | SSIM | LPIPS | toy score | denoiser fwd | denoiser VJP | wall (s) "
        "| wall / DPS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, rows in results.items():
        base = rows["DPS"]["wall"]
        for name, r in rows.items():
            lp = "n/a" if r["lpips"] is None else f"{r['lpips']:.4f}"
            lines.append(
                f"| {task} | {name} | {r['psnr']:.2f} ± {r['psnr_se']:.2f} | {r['ssim']:.4f} | {lp} | "
                f"{r['toy_score']:.3f} | "
                f"{r['forward']} | {r['vjp']} | {r['wall']:.1f} | {r['wall'] / base:.2f} |"
            )
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8))
    for ax, (task, rows) in zip(np.atleast_1d(axes), results.items()):
        have_lpips = all(r["lpips"] is not None for r in rows.values())
        key, label = ("lpips", "LPIPS (perception)") if have_lpips else ("ssim", "SSIM (no LPIPS weights)")
        knob_rows = [(n, r) for n, r in rows.items() if n.startswith("MAP-RPS")]
        mse = lambda r: 10 ** (-r["psnr"] / 10)
        ax.plot([mse(r) for _, r in knob_rows], [r[key] for _, r in knob_rows], "o-", label="MAP-RPS (r = t*/T)")
        for n, r in knob_rows:
            ax.annotate(n.split("=")[1], (mse(r), r[key]), fontsize=8)
        for n, marker in (("CLAMP", "s"), ("DPS", "^")):
            ax.plot([mse(rows[n])], [rows[n][key]], marker, label=n)
        ax.set(xlabel="distortion: MSE on [0, 1]", ylabel=label, title=task, xscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dps-steps", type=int, default=100)
    ap.add_argument("--dps-scale", type=float, default=10.0, help="tuned on 2 toy inpainting images over 0.1–40")
    ap.add_argument("--lpips-weights", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/bench_inverse")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    pipe = load_model(ModelConfig())
    scenes = sample_scenes(args.images, np.random.default_rng(args.seed))
    clean = render_batch(scenes, seed=args.seed + 1)
    prompts = [s.prompt for s in scenes]
    lpips = load_lpips(args.lpips_weights) if args.lpips_weights else None
    if lpips is None:
        print(LPIPS_UNAVAILABLE)
    results = {}
    for task, op in tasks().items():
        print(task, flush=True)
        results[task] = run_task(pipe, op, clean, prompts, args, lpips)
    print(
        f"\n{args.images} toy images (batch), σ_y = {SIGMA_Y}, seed {args.seed}, torch threads {args.threads}; "
        f"toy checker on the clean images: {float(score_batch(clean, prompts)['score'].mean()):.3f}"
    )
    print(table(results))
    plot(results, os.path.join(args.out, "dp_curve.png"))
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"D–P plot → {os.path.join(args.out, 'dp_curve.png')}")


if __name__ == "__main__":
    main()

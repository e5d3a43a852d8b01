"""`align solve`: inpainting / super-resolution / deblurring with DPS, CLAMP or MAP-RPS on a UNet or
DiT pipeline (optionally with a policy LoRA), metrics against a reference, and re-noise sweeps.

Images are PNGs in [0, 1] on disk and [-1, 1] for the operators (the VAE's range). ``--input`` is the
measurement y (for ``sr`` the low-resolution image) unless ``degrade`` is set, in which case it is a
clean image from which y = A(x) + σ_y n is simulated (and which then serves as the reference).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np
import torch

from align.backbones.adapter import denoiser
from align.backbones.model_config import ModelConfig
from align.config import field
from align.inverse.clamp import CLAMP
from align.inverse.dps import DPS
from align.inverse.map_rps import MapRPS, Stage1Config
from align.inverse.metrics import LPIPS_UNAVAILABLE, format_metrics, image_metrics, load_lpips
from align.inverse.operators import Blur, Downsample, Inpaint, box_mask, parse_kernel

TASKS = ("inpaint", "sr", "deblur")
METHODS = ("map_rps", "clamp", "dps")


@dataclasses.dataclass
class SolveConfig:
    """One inverse problem solved by one method (``align solve --show-config``)."""

    model: ModelConfig = field(default_factory=ModelConfig, help="the backbone")
    task: str = field("inpaint", choices=TASKS, help="forward operator")
    method: str = field("map_rps", choices=METHODS, help="solver")
    input: str = field("", help="measurement PNG (sr: the low-resolution image)")
    out: str = field("solve_out.png", help="reconstruction PNG (a sweep adds _r<knob> per value)")
    reference: Optional[str] = field(None, help="ground-truth PNG for PSNR / SSIM / LPIPS")
    degrade: bool = field(False, help="input is a clean image: simulate y = A(x) + σ_y n and use it as reference")
    mask: Optional[str] = field(None, help="inpaint: mask PNG, white = missing pixels to fill (diffusers' convention)")
    box: Optional[str] = field(None, help="inpaint without --mask: hole 'top,left,height,width' in pixels")
    scale: int = field(4, help="sr: downsampling factor")
    sr_mode: str = field("bicubic", choices=("bicubic", "area"), help="sr: downsampling kernel")
    kernel: str = field("gauss:9:2.0", help="deblur: gauss:SIZE:SIGMA or aniso:SIZE:SIGMA_X:SIGMA_Y:ANGLE")
    renoise: str = field("0.3", help="MAP-RPS knob t*/T in [0, 1]; a comma list sweeps it")
    stage2: str = field("clamp", choices=("clamp", "dps"), help="MAP-RPS stage-2 sampler")
    sigma_y: float = field(
        0.05,
        help="measurement noise std (images in [-1, 1]): CLAMP's σ_n, MAP-RPS stage 1 "
        "and --degrade; DPS's residual-normalised step does not use it",
    )
    seed: int = field(0, help="sampler RNG seed")
    prompt: str = field("a photo", help="neutral prompt of the denoiser")
    guidance_scale: float = field(1.0, help="CFG scale of the denoiser (1: no CFG)")
    lora: Optional[str] = field(None, help="policy LoRA directory in diffusers format (align train's export/policy)")
    lpips_weights: Optional[str] = field(
        None,
        help="torchvision backbone checkpoint for LPIPS (.pth read with "
        "weights_only=True, or .safetensors; no download here)",
    )
    lpips_net: str = field("alex", choices=("alex", "vgg", "squeeze"), help="LPIPS backbone")
    dps_steps: int = field(100, help="DPS steps")
    dps_scale: float = field(
        10.0,
        help="DPS step size ζ, VP units (tuned on the toy at 100 steps; "
        "the DPS paper: 0.3–0.5 at 1000 pixel-space steps)",
    )
    clamp_steps: Optional[int] = field(None, help="CLAMP steps (default: the latent preset, 25)")
    gmres_iters: Optional[int] = field(None, help="CLAMP GMRES iterations K (default: latent preset, 20)")
    clamp_sigma_n: Optional[float] = field(
        None,
        help="CLAMP's σ_n (default: sigma_y; the CLAMP repo's presets use 0.01, sharper on the toy, docs/inverse.md)",
    )
    stage1: Stage1Config = field(default_factory=Stage1Config, help="MAP-RPS stage 1")
    progress: bool = field(True, help="progress bars")


def parse_renoise(text: str) -> list[float]:
    """'0.3' or '0,0.1,...,1' → knob values, each checked to lie in [0, 1]."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--renoise {text!r}: expected a number or a comma-separated list of numbers") from None
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if not values or bad:
        raise ValueError(f"--renoise {text!r}: every knob value must be in [0, 1]" + (f", got {bad}" if bad else ""))
    return values


def read_png(path: str) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1]."""
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def write_png(img: torch.Tensor, path: str) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arr = (img[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(path)


def _inpaint(cfg: SolveConfig, size: int):
    if cfg.mask:
        missing = read_png(cfg.mask)[:, :1] >= 0.5
        return Inpaint((~missing).float())
    if not cfg.box:
        raise ValueError("task inpaint needs --mask PNG or --box top,left,height,width")
    try:
        box = tuple(int(v) for v in cfg.box.split(","))
        assert len(box) == 4
    except (ValueError, AssertionError):
        raise ValueError(f"--box {cfg.box!r}: expected four integers top,left,height,width") from None
    return Inpaint(box_mask(size, box))


#: task → operator factory(cfg, image size)
OPERATORS = {
    "inpaint": _inpaint,
    "sr": lambda cfg, size: Downsample(cfg.scale, cfg.sr_mode),
    "deblur": lambda cfg, size: Blur(parse_kernel(cfg.kernel)),
}


def build_solver(cfg: SolveConfig, pipe, op, y: torch.Tensor, renoise: float):
    """The configured method as an object with ``__call__(generator) → image in [-1, 1]``."""
    den_kw = {"prompt": cfg.prompt, "guidance_scale": cfg.guidance_scale}
    clamp_kw = {
        k: v
        for k, v in (("steps", cfg.clamp_steps), ("gmres_iters", cfg.gmres_iters), ("sigma_n", cfg.clamp_sigma_n))
        if v is not None
    }
    dps_kw = {"steps": cfg.dps_steps, "scale": cfg.dps_scale}
    if cfg.method == "dps":
        # the DPS step is residual-normalised: σ_y only simulates the measurement (--degrade)
        return DPS(pipe, op, y, None, progress=cfg.progress, denoiser_kwargs=den_kw, **dps_kw)
    if cfg.method == "clamp":
        return CLAMP(pipe, op, y, cfg.sigma_y, progress=cfg.progress, denoiser_kwargs=den_kw, **clamp_kw)
    return MapRPS(
        pipe,
        op,
        y,
        cfg.sigma_y,
        renoise=renoise,
        stage2=cfg.stage2,
        stage1=cfg.stage1,
        stage2_kwargs=clamp_kw if cfg.stage2 == "clamp" else dps_kw,
        progress=cfg.progress,
        denoiser_kwargs=den_kw,
    )


def precheck(cfg: SolveConfig) -> None:
    """Everything checkable before the model loads: knob values, files, operator options."""
    knobs = parse_renoise(cfg.renoise)
    if len(knobs) > 1 and cfg.method != "map_rps":
        raise ValueError(f"a --renoise sweep needs --method map_rps, not {cfg.method}")
    for what, path in (
        ("--input", cfg.input or None),
        ("--reference", cfg.reference),
        ("--mask", cfg.mask),
        ("--lpips-weights", cfg.lpips_weights),
    ):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{what} {path}: file not found")
    if not cfg.input:
        raise ValueError("--input PNG is required")
    if cfg.lora is not None and not os.path.isdir(cfg.lora):
        raise FileNotFoundError(f"--lora {cfg.lora}: not a directory (expected align train's export/policy)")
    if not 0 < cfg.sigma_y < float("inf"):
        raise ValueError(f"--sigma-y {cfg.sigma_y}: the measurement noise std must be finite and > 0")
    cfg.stage1.check()
    if cfg.task == "deblur":
        parse_kernel(cfg.kernel)
    if cfg.task == "sr":
        Downsample(cfg.scale, cfg.sr_mode)


def prepare(cfg: SolveConfig, image_size: int):
    """Validate everything that needs no model call: (operator, y in [-1, 1], reference or None, knobs)."""
    knobs = parse_renoise(cfg.renoise)
    op = OPERATORS[cfg.task](cfg, image_size)
    inp = read_png(cfg.input)
    ref = read_png(cfg.reference) if cfg.reference else None
    if cfg.degrade:
        _check_size("--input (with --degrade)", inp, image_size)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        clean = inp * 2 - 1
        op.check((1, *clean.shape[1:]))
        y = op(clean)
        y = y + cfg.sigma_y * torch.randn(y.shape, generator=gen) * (op.mask if cfg.task == "inpaint" else 1)
        ref = inp if ref is None else ref
    else:
        y = inp * 2 - 1
        if cfg.task == "inpaint":  # the holes of the input carry no measurement
            op.check((1, *y.shape[1:]))
            y = op(y)
    if ref is not None:
        _check_size("--reference", ref, image_size)
    return op, y, ref, knobs


def _check_size(what: str, img: torch.Tensor, size: int) -> None:
    if tuple(img.shape[-2:]) != (size, size):
        raise ValueError(f"{what} is {img.shape[-2]}×{img.shape[-1]} but the model's images are {size}×{size}")


def load_pipeline(cfg: SolveConfig):
    from align.backbones.model_config import load_model

    pipe = load_model(cfg.model)
    if cfg.lora:
        pipe.load_lora_weights(cfg.lora)
    return pipe


def run_solve(cfg: SolveConfig, pipe=None) -> list[dict]:
    """Solve, save PNG(s), print metrics; with several knob values print a table and plot the D–P curve."""
    precheck(cfg)
    lpips = load_lpips(cfg.lpips_weights, cfg.lpips_net) if cfg.lpips_weights else None  # refused before the model
    pipe = pipe if pipe is not None else load_pipeline(cfg)
    size = denoiser(pipe).config.sample_size * pipe.vae_scale_factor
    op, y, ref, knobs = prepare(cfg, size)
    if ref is not None and lpips is None:
        print(LPIPS_UNAVAILABLE)
    rows, x_hat, stage1_calls = [], None, {"forward": 0, "vjp": 0}
    for knob in knobs:
        solver = build_solver(cfg, pipe, op, y, knob)
        gen = torch.Generator().manual_seed(cfg.seed)
        if isinstance(solver, MapRPS) and len(knobs) > 1:  # one stage 1 for the whole sweep
            if x_hat is None and solver.start > 0:
                x_hat = solver.stage1()
                stage1_calls = dict(solver.problem.denoiser.calls)
            elif solver.start > 0:  # charge the shared stage 1 to every knob that uses it
                for k, v in stage1_calls.items():
                    solver.problem.denoiser.calls[k] += v
            state = solver.sample(gen, x_hat=x_hat) if solver.start > 0 else solver.sample(gen)
            img = solver.problem.output(state)
        else:
            img = solver(gen)
        img = (img.detach().cpu() + 1) / 2
        path = cfg.out if len(knobs) == 1 else _suffixed(cfg.out, f"_r{knob:g}")
        write_png(img, path)
        row = {"renoise": knob, "out": path, **solver.problem.denoiser.calls}
        label = f"{cfg.method} renoise={knob:g}" if cfg.method == "map_rps" else cfg.method
        if ref is not None:
            row.update(image_metrics(img, ref, lpips))
            print(f"{label}: {format_metrics(row)}  → {path}")
        else:
            print(f"{label} → {path}")
        rows.append(row)
    if len(knobs) > 1:
        print(sweep_table(rows))
        if ref is not None:
            plot_dp(rows, _suffixed(cfg.out, "_dp"))
    return rows


def _suffixed(path: str, suffix: str) -> str:
    stem, ext = os.path.splitext(path)
    return f"{stem}{suffix}{ext or '.png'}"


def sweep_table(rows: list[dict]) -> str:
    """Markdown table of a knob sweep."""
    lines = ["| renoise | PSNR | SSIM | LPIPS | denoiser fwd | denoiser VJP |", "|---|---|---|---|---|---|"]
    for r in rows:
        lp = "n/a" if r.get("lpips") is None else f"{r['lpips']:.4f}"
        ps = f"{r['psnr']:.2f}" if "psnr" in r else "n/a"
        ss = f"{r['ssim']:.4f}" if "ssim" in r else "n/a"
        lines.append(f"| {r['renoise']:g} | {ps} | {ss} | {lp} | {r['forward']} | {r['vjp']} |")
    return "\n".join(lines)


def plot_dp(rows: list[dict], path: str) -> None:
    """Distortion–perception curve along the knob: LPIPS vs MSE when LPIPS is available; otherwise
    PSNR and SSIM against the knob (distortion only, said in the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    knobs = [r["renoise"] for r in rows]
    if all(r.get("lpips") is not None for r in rows):
        mse = [10 ** (-r["psnr"] / 10) for r in rows]
        ax.plot(mse, [r["lpips"] for r in rows], "o-")
        for k, xm, yl in zip(knobs, mse, [r["lpips"] for r in rows]):
            ax.annotate(f"{k:g}", (xm, yl), fontsize=7)
        ax.set(xlabel="distortion: MSE", ylabel="perception: LPIPS", title="MAP-RPS D–P curve (labels: t*/T)")
    else:
        ax.plot(knobs, [r["psnr"] for r in rows], "o-", label="PSNR (dB)")
        ax2 = ax.twinx()
        ax2.plot(knobs, [r["ssim"] for r in rows], "s--", color="C1", label="SSIM")
        ax.set(xlabel="re-noise knob t*/T", ylabel="PSNR (dB)", title="distortion only (LPIPS unavailable)")
        ax2.set_ylabel("SSIM")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"D–P plot → {path}")

"""`align toy pretrain`: train the embedded toy text-to-image model on CPU in minutes.

Two stages over a procedurally rendered dataset of the toy world (``world.py``):

1. **VAE.** The toy ``AutoencoderKL`` learns to reconstruct 32×32 scenes
   (loss = MSE + β·KL). Afterwards ``scaling_factor`` is set to 1/std of the latents, as SD does.
2. **UNet + text encoder.** Standard ε-prediction DDPM loss on the VAE latents,
   ``E_{t,ε} w(t) ||ε_θ(√ᾱ_t z0 + √(1−ᾱ_t) ε, t, c) − ε||²``, with Min-SNR-γ weights
   ``w(t) = min(SNR(t), γ)/SNR(t)`` (Hang et al. 2023, via ``diffusers.training_utils.compute_snr``),
   prompt dropout for classifier-free guidance, and an EMA of the UNet (the EMA is what is saved).

The result goes through the same classes as SD1.5 (``StableDiffusionPipeline``) and is written with
``save_pretrained``. ``ship=true`` also copies it into the package (``align/toy/weights``), which is
how the shipped weights are regenerated. Checkpoints are atomic and ``--resume`` continues a run
exactly (model, optimizer, EMA, RNG and data position).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm

from align import checkpoint as ckpt
from align.backbones.tokenizer import copy_bpe_files
from align.config import field
from align.toy import SHIPPED_PIPELINE_DIR
from align.toy.evaluate import evaluate_pipeline
from align.toy.world import RESOLUTION, render_batch, sample_scenes, tag_probabilities

#: The shipped model's training mix: like a real text-to-image model's data, mostly single objects.
DEFAULT_TAG_WEIGHTS = {
    "single_object": 0.4,
    "colors": 0.4,
    "counting": 0.05,
    "two_object": 0.05,
    "position": 0.05,
    "color_attr": 0.05,
}


@dataclasses.dataclass
class PretrainConfig:
    """Hyper-parameters of `align toy pretrain` (defaults produce the shipped weights)."""

    out_dir: str = field("runs/toy_pretrain", help="run directory (checkpoints, final pipeline, log)")
    seed: int = field(0, help="seed for the dataset, initialisation and training noise")
    dataset_size: int = field(20000, help="number of rendered training scenes")
    tag_weights: dict[str, float] = field(
        default_factory=lambda: dict(DEFAULT_TAG_WEIGHTS),
        help="share of each GenEval tag in the training scenes (normalised): "
        "mostly single objects, so composition is left for RL",
    )
    vae_steps: int = field(300, help="VAE training steps (0 skips stage 1)")
    vae_batch_size: int = field(64, help="VAE batch size")
    vae_lr: float = field(1e-3, help="VAE learning rate")
    kl_weight: float = field(1e-6, help="β of the VAE's KL term")
    steps: int = field(3000, help="UNet (+ text-encoder) training steps")
    batch_size: int = field(32, help="UNet batch size")
    lr: float = field(1e-3, help="UNet learning rate (cosine decay, linear warm-up)")
    text_encoder_lr: float = field(0.0, help="text-encoder learning rate; 0 keeps it frozen (as SD does)")
    warmup_steps: int = field(200, help="linear warm-up steps of the UNet stage")
    cfg_dropout: float = field(0.1, help="probability of replacing the prompt by '' (for CFG)")
    snr_gamma: float = field(5.0, help="Min-SNR-γ loss weighting (0 disables)")
    ema_decay: float = field(0.999, help="EMA decay of the UNet weights")
    checkpoint_every: int = field(500, help="steps between atomic checkpoints")
    eval_every: int = field(0, help="steps between toy-GenEval evaluations (0: only at the end)")
    eval_images: int = field(96, help="images per evaluation")
    eval_steps: int = field(20, help="sampling steps per evaluation")
    eval_guidance: float = field(4.5, help="CFG scale of the evaluation")
    num_threads: int = field(
        1, help="torch CPU threads (0: torch's default; 1 avoids oversubscription when other jobs share the cores)"
    )
    ship: bool = field(False, help="copy the final pipeline into the package (align/toy/weights)")

    def validate(self) -> None:
        for name in ("dataset_size", "steps", "batch_size", "vae_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        try:
            tag_probabilities(self.tag_weights)
        except ValueError as err:
            raise ValueError(f"tag_weights: {err}") from None


def build_dataset(cfg: PretrainConfig) -> tuple[torch.Tensor, list[str]]:
    """Render ``dataset_size`` scenes once (uint8, [N,3,H,W]) with their prompts."""
    rng = np.random.default_rng(cfg.seed)
    scenes = sample_scenes(cfg.dataset_size, rng, dict(cfg.tag_weights))
    images = render_batch(scenes, seed=cfg.seed, size=RESOLUTION)
    return (images * 255).round().to(torch.uint8), [s.prompt for s in scenes]


def lr_schedule(opt: torch.optim.Optimizer, cfg: PretrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' linear warm-up over ``warmup_steps``, then cosine decay to 5 % of the rate at ``steps``.
    (The shipped model was trained with a warm-up one step ahead of this one, (k+1)/W instead of k/W; the
    rates are identical after the warm-up.)"""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps, min_lr_rate=0.05)


def train_vae(vae, images: torch.Tensor, cfg: PretrainConfig, gen: torch.Generator) -> list[float]:
    """Stage 1: reconstruction + β·KL on the rendered scenes; sets ``scaling_factor`` after."""
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    losses = []
    for _ in tqdm(range(cfg.vae_steps), desc="toy VAE", unit="step"):
        idx = torch.randint(0, len(images), (cfg.vae_batch_size,), generator=gen)
        x = images[idx].float() / 127.5 - 1.0
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = F.mse_loss(rec, x) + cfg.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = images[:512].float() / 127.5 - 1.0
        std = vae.encode(x).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return losses


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image (sampled per step, scaled by SD's factor)."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i : i + batch].float() / 127.5 - 1.0).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def _tokenize(pipe, prompts: list[str]) -> torch.Tensor:
    tok = pipe.tokenizer
    return tok(
        prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def _save_state(run: Path, step: int, pipe, ema: EMAModel, opt, sched, gen: torch.Generator) -> None:
    with ckpt.atomic_directory(run / "checkpoint") as tmp:
        ckpt.save_tensors(tmp / "unet.safetensors", pipe.unet.state_dict())
        ckpt.save_tensors(tmp / "text_encoder.safetensors", pipe.text_encoder.state_dict())
        ckpt.save_tensors(tmp / "vae.safetensors", pipe.vae.state_dict())
        ckpt.save_tensors(tmp / "ema.safetensors", {f"{i}": p for i, p in enumerate(ema.shadow_params)})
        opt_t, opt_meta = ckpt.optimizer_state_split(opt)
        ckpt.save_tensors(tmp / "optimizer.safetensors", opt_t)
        rng_t, rng_meta = ckpt.rng_state({"train": gen})
        ckpt.save_tensors(tmp / "rng.safetensors", rng_t)
        ckpt.write_json(
            tmp / "state.json",
            {
                "step": step,
                "optimizer": opt_meta,
                "scheduler": sched.state_dict(),
                "rng": rng_meta,
                "ema": {"decay": ema.decay, "optimization_step": ema.optimization_step},
                "vae_scaling_factor": pipe.vae.config.scaling_factor,
            },
        )


def _load_state(run: Path, pipe, ema: EMAModel, opt, sched, gen: torch.Generator) -> int:
    d = run / "checkpoint"
    state = ckpt.read_json(d / "state.json")
    pipe.unet.load_state_dict(ckpt.load_tensors(d / "unet.safetensors"))
    pipe.text_encoder.load_state_dict(ckpt.load_tensors(d / "text_encoder.safetensors"))
    pipe.vae.load_state_dict(ckpt.load_tensors(d / "vae.safetensors"))
    pipe.vae.register_to_config(scaling_factor=state["vae_scaling_factor"])
    shadow = ckpt.load_tensors(d / "ema.safetensors")
    ema.shadow_params = [shadow[f"{i}"] for i in range(len(shadow))]
    ema.optimization_step = state["ema"]["optimization_step"]
    opt.load_state_dict(ckpt.optimizer_state_join(ckpt.load_tensors(d / "optimizer.safetensors"), state["optimizer"]))
    sched.load_state_dict(state["scheduler"])
    ckpt.restore_rng_state(ckpt.load_tensors(d / "rng.safetensors"), state["rng"], {"train": gen})
    return int(state["step"])


def unet_step_loss(
    pipe, z0: torch.Tensor, prompts: list[str], cfg: PretrainConfig, gen: torch.Generator
) -> torch.Tensor:
    """Min-SNR-weighted ε-prediction loss on one batch of latents (see module docstring)."""
    sched = pipe.scheduler
    noise = torch.randn(z0.shape, generator=gen)
    t = torch.randint(0, sched.config.num_train_timesteps, (z0.shape[0],), generator=gen)
    drop = torch.rand(len(prompts), generator=gen) < cfg.cfg_dropout
    prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
    emb = pipe.text_encoder(_tokenize(pipe, prompts))[0]
    pred = pipe.unet(sched.add_noise(z0, noise, t), t, encoder_hidden_states=emb).sample
    per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
    if cfg.snr_gamma > 0:
        snr = compute_snr(sched, t)
        per_sample = per_sample * torch.clamp(snr, max=cfg.snr_gamma) / snr
    return per_sample.mean()


def pretrain(cfg: PretrainConfig, resume: bool = False, log=print, stop_at_step: int | None = None):
    """Run both stages; returns the trained pipeline (EMA UNet weights) and the final metrics.

    ``stop_at_step`` ends the run right after that step's checkpoint, as an interruption would
    (used to test ``resume``); it then returns ``(pipe, None)``.
    """
    from align.backbones import build_pipeline

    run = Path(cfg.out_dir)
    run.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    pipe = build_pipeline("preset:toy", seed=cfg.seed)
    pipe.set_progress_bar_config(disable=True)
    images, prompts = build_dataset(cfg)
    log(f"toy pretrain: {len(images)} scenes rendered; run dir {run}")

    has_ckpt = (run / "checkpoint" / "state.json").is_file()
    if not (resume and has_ckpt) and cfg.vae_steps > 0:
        vae_losses = train_vae(pipe.vae, images, cfg, gen)
        log(f"VAE: final loss {np.mean(vae_losses[-50:]):.5f}, scaling_factor {pipe.vae.config.scaling_factor:.4f}")
    pipe.vae.eval().requires_grad_(False)

    unet, te = pipe.unet, pipe.text_encoder
    unet.train().requires_grad_(True)
    # Frozen by default: a jointly trained tiny text encoder was seen to collapse the position
    # word (last token) so the UNet could not learn "left/right/top/bottom"; frozen random CLIP
    # features keep every word distinct, and RL later keeps the text encoder frozen anyway.
    train_te = cfg.text_encoder_lr > 0
    te.train(train_te).requires_grad_(train_te)
    groups = [{"params": list(unet.parameters()), "lr": cfg.lr}]
    if train_te:
        groups.append({"params": list(te.parameters()), "lr": cfg.text_encoder_lr})
    opt = torch.optim.AdamW(groups, weight_decay=1e-2)
    sched = lr_schedule(opt, cfg)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
    start = _load_state(run, pipe, ema, opt, sched, gen) if resume and has_ckpt else 0
    if start:
        log(f"resumed from step {start}")
    lat_mean, lat_std = encode_dataset(pipe.vae, images)
    scale = pipe.vae.config.scaling_factor

    history: list[dict] = []
    bar = tqdm(range(start, cfg.steps), desc="toy UNet", unit="step", initial=start, total=cfg.steps)
    t0, recent = time.time(), []
    for step in bar:
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        eps = torch.randn(lat_mean[idx].shape, generator=gen)
        z0 = (lat_mean[idx] + lat_std[idx] * eps) * scale
        loss = unet_step_loss(pipe, z0, [prompts[i] for i in idx.tolist()], cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        recent.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(recent[-50:]):.4f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            _save_state(run, done, pipe, ema, opt, sched, gen)
        if stop_at_step is not None and done >= stop_at_step:
            _save_state(run, done, pipe, ema, opt, sched, gen)
            return pipe, None
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            metrics = _evaluate_ema(pipe, ema, cfg)
            history.append({"step": done, "loss": float(np.mean(recent[-50:])), **metrics})
            log(f"step {done}: loss {np.mean(recent[-50:]):.4f} | " + _fmt(metrics))
    log(f"UNet stage: {cfg.steps - start} steps in {time.time() - t0:.0f}s")

    ema.copy_to(unet.parameters())
    unet.eval().requires_grad_(False)
    te.eval().requires_grad_(False)
    metrics = evaluate_pipeline(pipe, cfg.eval_images, cfg.eval_steps, cfg.eval_guidance, seed=cfg.seed + 1)
    history.append({"step": cfg.steps, **metrics})
    log("final: " + _fmt(metrics))
    with ckpt.atomic_directory(run / "pipeline") as tmp:
        pipe.save_pretrained(tmp)
        copy_bpe_files(tmp / "tokenizer")  # so the slow CLIPTokenizer (transformers 4.x) loads it too
    ckpt.write_json(run / "metrics.json", {"history": history, "config": dataclasses.asdict(cfg)})
    if cfg.ship:
        ship(run / "pipeline")
        log(f"shipped weights -> {SHIPPED_PIPELINE_DIR}")
    return pipe, metrics


def _evaluate_ema(pipe, ema: EMAModel, cfg: PretrainConfig) -> dict[str, float]:
    unet = pipe.unet
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    unet.eval()
    pipe.text_encoder.eval()
    try:
        return evaluate_pipeline(pipe, cfg.eval_images, cfg.eval_steps, cfg.eval_guidance, seed=cfg.seed + 1)
    finally:
        ema.restore(unet.parameters())
        unet.train()


def ship(pipeline_dir: Path) -> None:
    """Replace the packaged weights with ``pipeline_dir`` (atomic directory swap)."""
    with ckpt.atomic_directory(SHIPPED_PIPELINE_DIR) as tmp:
        shutil.copytree(pipeline_dir, tmp, dirs_exist_ok=True)


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in metrics.items())

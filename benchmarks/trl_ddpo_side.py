"""TRL's side of ``benchmarks/vs_trl_ddpo.py``: trl 0.21's ``DDPOTrainer`` on a local pipeline directory.

Runs inside the trl venv (``benchmarks/trl_venv.py``), so it imports nothing of the project. Reads the
shape as JSON (``--spec FILE``), builds ``DefaultDDPOStableDiffusionPipeline`` from the local directory
(no hub), trains ``iterations`` epochs with ``trainer.step`` and writes per-epoch seconds as JSON
(``--out FILE``): the whole step, sampling (``_generate_samples``), reward (``compute_rewards``) and the
PPO update (``_train_batched_samples``), and the step's process CPU time, each timed by wrapping that
method of the trainer instance.

Settings that differ from TRL's defaults, and why: ``mixed_precision="no"`` (its fp16 default is applied
silently on CPU), ``log_with=None`` and no image hook (the hook indexes ``trackers[0]``), ``save_freq`` past
the last epoch (its ``save_state`` hook raises ``AttributeError: is_world_process_zero`` in 0.21), and
``per_prompt_stat_tracking=True`` (our DDPO always normalises per prompt).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import time


def jpeg_compressibility(quality: int):
    """DDPO's compressibility reward, −(JPEG size in kB) at ``quality`` (the same encoding as rewards/builtin.py)."""
    import numpy as np
    import torch
    from PIL import Image

    def reward_fn(images, prompts, metadata):
        arr = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for img in arr:
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=quality)
            sizes.append(-buf.tell() / 1000.0)
        return torch.tensor(sizes, dtype=torch.float32), {}

    return reward_fn


def timed(store: dict, key: str, fn):
    """``fn`` that adds its wall seconds to ``store[key]``."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            store[key] = store.get(key, 0.0) + time.perf_counter() - start

    return wrapper


def reload_text_encoder(text_encoder, model_dir: str) -> None:
    """Load the saved CLIP text encoder's weights for real. transformers 5 saves ``CLIPTextModel`` keys
    without the ``text_model.`` prefix, and transformers 4.55 then initialises every weight afresh with
    only a warning ("Some weights ... newly initialized"); here the prefix is put back and loaded strictly."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(model_dir, "text_encoder", "model.safetensors"))
    prefix = "text_model."
    state = {k if k.startswith(prefix) else prefix + k: v for k, v in state.items()}
    text_encoder.load_state_dict(state, strict=True)


def build_trainer(spec: dict, logdir: str):
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    samples, batch = spec["samples"], spec["batch"]
    config = DDPOConfig(
        num_epochs=spec["iterations"],
        seed=spec["seed"],
        log_with=None,
        logdir=logdir,
        mixed_precision="no",
        save_freq=10**9,
        sample_num_steps=spec["steps"],
        sample_eta=spec["eta"],
        sample_guidance_scale=spec["guidance"],
        sample_batch_size=batch,
        sample_num_batches_per_epoch=samples // batch,
        train_batch_size=batch,
        train_gradient_accumulation_steps=1,
        train_learning_rate=spec["lr"],
        train_clip_range=spec["clip"],
        train_adv_clip_max=spec["adv_clip"],
        train_max_grad_norm=spec["max_grad_norm"],
        train_num_inner_epochs=1,
        train_timestep_fraction=1.0,
        train_cfg=True,
        per_prompt_stat_tracking=True,
        async_reward_computation=False,
        allow_tf32=False,
    )
    pipe = DefaultDDPOStableDiffusionPipeline(spec["model_dir"], use_lora=True)
    reload_text_encoder(pipe.sd_pipeline.text_encoder, spec["model_dir"])
    pipe.sd_pipeline.set_progress_bar_config(disable=True)
    rng = random.Random(spec["seed"])
    prompts = spec["prompts"]

    def prompt_fn():
        return rng.choice(prompts), {}

    trainer = DDPOTrainer(config, jpeg_compressibility(spec["jpeg_quality"]), prompt_fn, pipe)
    pipe.sd_pipeline.set_progress_bar_config(disable=True)  # the trainer turned its per-timestep bar on
    return trainer, pipe


def lora_check(pipe, rank: int) -> dict:
    """What TRL actually trains: the LoRA layers' count and rank (so the table can say it matches ours)."""
    unet = pipe.sd_pipeline.unet
    trainable = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    ranks = sorted({p.shape[0] for n, p in trainable if "lora_A" in n})
    return {
        "trainable_tensors": len(trainable),
        "trainable_params": sum(p.numel() for _, p in trainable),
        "lora_ranks": ranks,
        "rank_matches": ranks == [rank],
    }


def run(spec: dict, logdir: str) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    trainer, pipe = build_trainer(spec, logdir)
    phases: dict = {}
    for method, key in (
        ("_generate_samples", "sampling"),
        ("compute_rewards", "reward"),
        ("_train_batched_samples", "update"),
    ):
        setattr(trainer, method, timed(phases, key, getattr(trainer, method)))
    epochs, global_step = [], 0
    for epoch in range(spec["iterations"]):
        phases.clear()
        start, cpu = time.perf_counter(), time.process_time()
        global_step = trainer.step(epoch, global_step)
        epochs.append({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu, **phases})
    return {
        "epochs": epochs,
        "global_step": global_step,
        "lora": lora_check(pipe, spec["lora_rank"]),
        "threads": torch.get_num_threads(),
        "versions": versions(),
    }


def versions() -> dict:
    import diffusers
    import peft
    import torch
    import transformers
    import trl

    return {m.__name__: m.__version__ for m in (trl, diffusers, transformers, peft, torch)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True, help="JSON file with the shape (vs_trl_ddpo.trl_spec)")
    ap.add_argument("--out", required=True, help="JSON file for the per-epoch timings")
    args = ap.parse_args()
    with open(args.spec, encoding="utf-8") as fh:
        spec = json.load(fh)
    result = run(spec, os.path.join(os.path.dirname(os.path.abspath(args.out)), "trl_logs"))
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()

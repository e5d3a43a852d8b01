"""`align toy pretrain`: runs end to end on tiny settings, checkpoints atomically, resumes exactly."""

from __future__ import annotations

import torch

from align.checkpoint import load_tensors, read_json
from align.config import load_config
from align.toy.pretrain import PretrainConfig, pretrain

TINY = [
    "dataset_size=64",
    "vae_steps=2",
    "vae_batch_size=4",
    "batch_size=4",
    "warmup_steps=1",
    "checkpoint_every=3",
    "eval_every=0",
    "eval_images=2",
    "eval_steps=2",
]


def _run(out_dir, steps: int, resume: bool = False, stop_at_step: int | None = None):
    cfg = load_config(PretrainConfig, None, TINY + [f"out_dir={out_dir}", f"steps={steps}"])
    return pretrain(cfg, resume=resume, log=lambda *_: None, stop_at_step=stop_at_step)


def test_pretrain_writes_a_loadable_pipeline_and_metrics(tmp_path) -> None:
    from align.backbones import build_pipeline

    _run(tmp_path / "run", steps=3)
    assert (tmp_path / "run" / "checkpoint" / "state.json").is_file()
    metrics = read_json(tmp_path / "run" / "metrics.json")
    final = metrics["history"][-1]
    assert {"strict", "score"} <= set(final) and any(k.startswith("strict/") for k in final)
    assert 0.0 <= final["strict"] <= final["score"] <= 1.0
    pipe = build_pipeline(str(tmp_path / "run" / "pipeline"), kind="unet")
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the trained VAE's latent std


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path) -> None:
    _run(tmp_path / "straight", steps=6)
    _run(tmp_path / "split", steps=6, stop_at_step=4)  # interrupted after step 4 (checkpoint at 3 too)
    _run(tmp_path / "split", steps=6, resume=True)
    a = load_tensors(tmp_path / "straight" / "checkpoint" / "unet.safetensors")
    b = load_tensors(tmp_path / "split" / "checkpoint" / "unet.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    ema_a = load_tensors(tmp_path / "straight" / "checkpoint" / "ema.safetensors")
    ema_b = load_tensors(tmp_path / "split" / "checkpoint" / "ema.safetensors")
    for key in ema_a:
        torch.testing.assert_close(ema_a[key], ema_b[key], atol=1e-6, rtol=0)
    assert read_json(tmp_path / "split" / "checkpoint" / "state.json")["step"] == 6

"""The SDXL-class family (one adapter file and one registry entry) end to end: ``align train`` with ECG (value
pretraining, then PPO with the critic) on the tiny preset, ``align export``, the exported policy and critic
loading onto a fresh pipeline, and ``align sample --critic --steer grad``. The sampler's known answers
(parity with ``pipe()``, ratio one on recompute, LoRA-only gradients) are in tests/test_sampling.py."""

from __future__ import annotations

import json
import math

import torch

import critics
from align.backbones import backbone_kind, build_pipeline
from align.cli import main
from align.sampling import SamplerConfig, sample_trajectory

PROMPTS = ["two red circles on the left", "one blue square on the top"]
FP32_TOL = 1e-5  # fp32 round-off of identical computations in a different kernel layout


def _images(pipe) -> torch.Tensor:
    cfg = SamplerConfig(num_inference_steps=3, guidance_scale=3.0)
    return sample_trajectory(pipe, PROMPTS, cfg, torch.Generator().manual_seed(0)).images


def test_sdxl_trains_with_ecg_exports_and_steers(tiny_train_overrides, tmp_path) -> None:
    run = tmp_path / "run"
    code = main(
        [
            "train",
            *tiny_train_overrides,
            "model.source=preset:tiny-sdxl",
            "algo=ecg",
            "critic.pretrain_iterations=1",
            "trainer.iterations=1",
            "trainer.lr=0.05",  # large enough that one update visibly moves the images
            "rewards=[{name: jpeg_compressibility}]",
            f"run_dir={run}",
        ]
    )
    assert code == 0
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["policy_updates"] == 1
    policy = state["history"][-1]
    for key in ("reward/jpeg_compressibility", "policy_loss", "value_loss", "grad_norm_policy", "grad_norm_critic"):
        assert math.isfinite(policy[key]), key
    assert policy["grad_norm_policy"] > 0 and policy["grad_norm_critic"] > 0

    assert main(["export", str(run)]) == 0
    out = run / "export"
    config = json.loads((out / "critic" / "config.json").read_text())
    assert (
        config["base_model"]["kind"] == "sdxl" and config["base_model"]["pipeline_class"] == "StableDiffusionXLPipeline"
    )
    fresh = build_pipeline("preset:tiny-sdxl")
    assert backbone_kind(fresh) == "sdxl"
    base_images = _images(fresh)
    loaded = critics.load(out / "critic", fresh)
    assert loaded.reward_names == ["jpeg_compressibility"]
    # an attached, inactive critic leaves sampling alone up to fp32 round-off (measured: ~5e-7 once a batch
    # holds more than one sample; a single-sample forward of this UNet stays bit-identical)
    torch.testing.assert_close(_images(fresh), base_images, atol=FP32_TOL, rtol=0)
    fresh.load_lora_weights(str(out / "policy"))  # diffusers' own loader
    assert not torch.allclose(_images(fresh), base_images)  # the trained policy draws other images

    samples = tmp_path / "s"
    code = main(
        [
            "sample",
            "model.source=preset:tiny-sdxl",
            "num_images=2",
            "sampler.num_inference_steps=3",
            f"out_dir={samples}",
            "progress=false",
            "--critic",
            str(out / "critic"),
            "--steer",
            "grad",
            "--scale",
            "0.5",
        ]
    )
    assert code == 0
    record = json.loads((samples / "samples.json").read_text())
    assert len(record["samples"]) == 2 and record["steering"]["critic_rows_per_image"] > 0
    for sample in record["samples"]:
        assert math.isfinite(sample["critic_values"]["jpeg_compressibility"])

"""Resolution is a setting: ``sampler.height``/``sampler.width`` for rollouts, `align sample`, `align eval` and
`align train`, on the tiny UNet and DiT presets; sizes a model cannot draw are one-line errors naming the field."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from PIL import Image

from align.backbones import build_pipeline
from align.cli import main
from align.config import ConfigError, load_config
from align.sample_job import SampleJobConfig
from align.sampling import SamplerConfig, default_resolution, recompute_log_probs, resolve_resolution, sample_trajectory
from critics.value_model import LatentCritic

#: 24 × 32 px: neither the tiny presets' default (16 × 16) nor square; latents 6 × 8 (VAE factor 4)
H, W = 24, 32


def _patch2_dit():
    """The tiny DiT with its transformer rebuilt at patch size 2 (random weights, from its own config)."""
    pipe = build_pipeline("preset:tiny-dit")
    pipe.transformer = SD3Transformer2DModel.from_config({**pipe.transformer.config, "patch_size": 2})
    return pipe


@pytest.mark.parametrize("preset", ["tiny-unet", "tiny-dit"])
def test_the_sampler_draws_at_the_asked_size_and_its_log_probs_recompute(preset: str) -> None:
    pipe = build_pipeline(f"preset:{preset}")
    cfg = SamplerConfig(num_inference_steps=2, height=H, width=W)
    traj = sample_trajectory(pipe, ["a red dog", "a blue cat"], cfg, torch.Generator().manual_seed(0))
    assert traj.images.shape == (2, 3, H, W)
    assert traj.latents.shape[-2:] == (H // pipe.vae_scale_factor, W // pipe.vae_scale_factor)
    # the learner's recompute at that size gives the stored log-probs (same fp32 ops, same inputs)
    torch.testing.assert_close(recompute_log_probs(pipe, traj), traj.log_probs, rtol=0, atol=1e-5)
    default = sample_trajectory(
        pipe, ["a red dog"], SamplerConfig(num_inference_steps=1), torch.Generator().manual_seed(0)
    )
    assert default.images.shape[-2:] == default_resolution(pipe) == (16, 16)


def test_a_patch_2_dit_draws_at_a_multiple_of_vae_factor_times_patch() -> None:
    pipe = _patch2_dit()
    traj = sample_trajectory(
        pipe, ["a dog"], SamplerConfig(num_inference_steps=1, height=32, width=H + 8), torch.Generator().manual_seed(0)
    )
    assert traj.images.shape == (1, 3, 32, 32)
    with pytest.raises(
        ConfigError,
        match=r"^sampler\.height=20: must be a multiple of 8 \(VAE factor 4 × patch "
        r"size 2\) for this model$",
    ):
        resolve_resolution(pipe, 20, None)


@pytest.mark.parametrize(
    "preset, height, width, message",
    [
        ("tiny-unet", 18, None, r"^sampler\.height=18: must be a multiple of 4 \(VAE factor 4\) for this model$"),
        ("tiny-dit", None, 30, r"^sampler\.width=30: must be a multiple of 4 \(VAE factor 4 × patch size 1\)"),
        (
            "tiny-dit",
            68,
            None,
            r"^sampler\.height=68: at most 64 for this model \(the transformer's pos_embed_max_size",
        ),
    ],
)
def test_a_size_the_model_cannot_draw_is_a_one_line_error_naming_the_field(preset, height, width, message) -> None:
    pipe = build_pipeline(f"preset:{preset}")
    with pytest.raises(ConfigError, match=message):
        resolve_resolution(pipe, height, width)
    with pytest.raises(ConfigError, match=message):  # before the first step: x_T is drawn at that size
        sample_trajectory(
            pipe,
            ["a dog"],
            SamplerConfig(num_inference_steps=1, height=height, width=width),
            torch.Generator().manual_seed(0),
        )


@pytest.mark.parametrize("value", ["0", "-16"])
def test_a_non_positive_size_is_refused_by_the_torch_free_config_checks(value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^config 'sampler': height={value}: must be a positive integer"):
        load_config(SampleJobConfig, None, [f"sampler.height={value}"])


@pytest.mark.parametrize("preset", ["tiny-unet", "tiny-dit"])
def test_the_critic_reads_features_at_another_resolution(preset: str) -> None:
    pipe = build_pipeline(f"preset:{preset}")
    critic = LatentCritic(pipe, ["a", "b"], adapter="policy", hidden=8)
    traj = sample_trajectory(
        pipe,
        ["a dog", "a cat"],
        SamplerConfig(num_inference_steps=2, height=H, width=W),
        torch.Generator().manual_seed(0),
    )
    embeds = {
        k: traj.prompt_embeds if k == "prompt_embeds" else traj.pooled_prompt_embeds
        for k in ("prompt_embeds", "pooled_prompt_embeds")
    }
    with torch.no_grad():
        values = critic(traj.latents[:, 1], traj.timesteps[1], embeds)
    assert values.shape == (2, 2) and torch.isfinite(values).all()


@pytest.mark.parametrize("preset", ["tiny-unet", "tiny-dit"])
def test_align_sample_writes_pngs_at_height_and_width(tmp_path, preset: str) -> None:
    out = tmp_path / "s"
    assert (
        main(
            [
                "sample",
                f"model.source=preset:{preset}",
                "num_images=2",
                "batch_size=2",
                "--height",
                str(H),
                "--width",
                str(W),
                "sampler.num_inference_steps=2",
                f"out_dir={out}",
                "progress=false",
            ]
        )
        == 0
    )
    record = json.loads((out / "samples.json").read_text())
    assert record["config"]["sampler"]["height"] == H and record["config"]["sampler"]["width"] == W
    for sample in record["samples"]:
        assert Image.open(out / sample["file"]).size == (W, H)


def test_align_sample_with_a_size_off_the_multiple_is_one_line_with_exit_code_2(tmp_path, capsys) -> None:
    assert (
        main(
            [
                "sample",
                "model.source=preset:tiny-dit",
                "num_images=1",
                "--height",
                "18",
                f"out_dir={tmp_path / 's'}",
                "progress=false",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "sampler.height=18: must be a multiple of 4" in err
    assert not (tmp_path / "s" / "samples.json").exists()


def test_align_eval_draws_at_height_and_width(tmp_path) -> None:
    out = tmp_path / "e"
    assert (
        main(
            [
                "eval",
                "--prompts",
                "toy",
                "--max-prompts",
                "2",
                "--images-per-prompt",
                "1",
                "--height",
                str(H),
                "--width",
                str(W),
                "--out",
                str(out),
                "model.source=preset:tiny-unet",
                "sampler.num_inference_steps=2",
                "progress=false",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert Image.open(out / r["filename"]).size == (W, H)


@pytest.mark.parametrize("preset", ["tiny-unet", "tiny-dit"])
def test_align_train_runs_an_iteration_at_another_resolution(tiny_train_cfg, tmp_path, preset: str) -> None:
    """ECG (policy + critic) on the tiny presets at 24 × 32 px: one policy update, finite rewards and losses."""
    from align.train import train

    cfg = tiny_train_cfg(
        f"model.source=preset:{preset}",
        "algo=ecg",
        f"sampler.height={H}",
        f"sampler.width={W}",
        "sampler.num_inference_steps=2",
        "trainer.iterations=1",
        "rewards=[{name: jpeg_compressibility}]",
    )
    state = train(cfg, log=lambda *_: None)
    record = state.history[-1]
    assert state.policy_updates == 1 and record["samples_seen"] == 4
    for key in ("reward/jpeg_compressibility", "policy_loss", "value_loss", "grad_norm_policy", "grad_norm_critic"):
        assert torch.isfinite(torch.tensor(record[key])), key
    assert record["grad_norm_policy"] > 0 and record["grad_norm_critic"] > 0
    # the run's own rollouts (its end-of-run grid of the 2 eval prompts: make_grid, padding 2) are 24 × 32 px
    assert Image.open(tmp_path / "grids" / "iter_0001.png").size == (2 * (W + 2) + 2, H + 4)


def test_align_train_with_a_size_the_model_cannot_draw_fails_before_any_rollout(tmp_path, capsys) -> None:
    assert (
        main(
            [
                "train",
                "model.source=preset:tiny-dit",
                "sampler.height=18",
                "sampler.num_inference_steps=2",
                "trainer.iterations=1",
                "ray.num_rollout_workers=0",
                "ray.num_reward_workers=0",
                "eval_every=0",
                "final_eval_prompts=0",
                "rewards=[jpeg_compressibility:1.0]",
                f"run_dir={tmp_path / 'run'}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("align: error: sampler.height=18: must be a multiple of 4")
    assert not (tmp_path / "run" / "checkpoint").exists()

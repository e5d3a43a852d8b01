"""The denoising step's math runs in fp32 when the model runs in bf16 (align/sampling/transitions.py): the
log-prob of a bf16 model's step equals the fp32 math on the same bf16 model outputs, bit for bit."""

from __future__ import annotations

import pytest
import torch

from align.backbones import build_pipeline
from align.sampling import (
    SamplerConfig,
    ddim_distribution,
    ddim_step_with_logprob,
    flow_sde_distribution,
    flow_sde_step_with_logprob,
    predict,
    recompute_log_probs,
    sample_trajectory,
    set_schedule,
    step_log_prob,
)
from align.sampling.sampler import encode_prompts


def _bf16_output(preset: str):
    """A bf16 pipeline, a bf16 x_t at step 1 of 3, and its bf16 model output there (CFG w = 3)."""
    pipe = build_pipeline(f"preset:{preset}", torch_dtype=torch.bfloat16)
    x = torch.randn(2, pipe.vae.config.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    x = x.to(torch.bfloat16)
    set_schedule(pipe, 3, x)
    embeds = encode_prompts(pipe, ["a red dog", "a blue cat"], "", 3.0)
    with torch.no_grad():
        out = predict(pipe, x, pipe.scheduler.timesteps[1], embeds, 3.0)
    assert out.dtype == torch.bfloat16
    return pipe, x, out


def test_ddim_step_of_a_bf16_model_is_the_fp32_math_on_its_outputs() -> None:
    pipe, x, out = _bf16_output("tiny-unet")
    t = pipe.scheduler.timesteps[1]
    step = ddim_step_with_logprob(pipe.scheduler, out, t, x, eta=1.0, generator=torch.Generator().manual_seed(1))
    mean, std = ddim_distribution(pipe.scheduler, out.float(), t, x.float(), eta=1.0)
    assert step.prev_sample.dtype == torch.bfloat16  # stored in the latents' dtype ...
    assert step.mean.dtype == torch.float32 and step.log_prob.dtype == torch.float32  # ... the math in fp32
    assert torch.equal(step.mean, mean)
    assert torch.equal(step.log_prob, step_log_prob(step.prev_sample.float(), mean, std))
    # what the step would be in bf16 arithmetic differs: the test can tell the two apart
    a_t = pipe.scheduler.alphas_cumprod[int(t)].to(torch.bfloat16)
    x0_bf16 = (x - (1 - a_t) ** 0.5 * out) / a_t**0.5
    x0 = (x.float() - (1 - a_t.float()) ** 0.5 * out.float()) / a_t.float() ** 0.5
    assert (x0_bf16.float() - x0).abs().max() > 0


def test_flow_sde_step_of_a_bf16_model_is_the_fp32_math_on_its_outputs() -> None:
    pipe, x, out = _bf16_output("tiny-dit")
    step = flow_sde_step_with_logprob(
        pipe.scheduler, out, 1, x, noise_level=0.7, generator=torch.Generator().manual_seed(1)
    )
    mean, std = flow_sde_distribution(pipe.scheduler, out.float(), 1, x.float(), noise_level=0.7)
    assert step.prev_sample.dtype == torch.bfloat16
    assert step.mean.dtype == torch.float32 and step.log_prob.dtype == torch.float32
    assert torch.equal(step.mean, mean)
    assert torch.equal(step.log_prob, step_log_prob(step.prev_sample.float(), mean, std))


@pytest.mark.parametrize("preset", ["tiny-unet", "tiny-dit"])
def test_a_bf16_models_trajectory_and_recompute_give_fp32_log_probs(preset: str) -> None:
    pipe = build_pipeline(f"preset:{preset}", torch_dtype=torch.bfloat16)
    traj = sample_trajectory(
        pipe,
        ["a red dog", "a cat"],
        SamplerConfig(num_inference_steps=2, output_type="latent"),
        torch.Generator().manual_seed(0),
    )
    assert traj.latents.dtype == torch.bfloat16 and traj.log_probs.dtype == torch.float32
    recomputed = recompute_log_probs(pipe, traj)
    assert recomputed.dtype == torch.float32 and torch.isfinite(recomputed).all()

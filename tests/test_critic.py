"""The state-aligned latent critic: features from the shared backbone, per-reward heads, adapters."""

from __future__ import annotations

import pytest
import torch

from align.backbones import attach_lora, denoiser
from align.sampling import SamplerConfig, sample_trajectory
from critics.value_model import FeatureTap, LatentCritic

REWARDS = ["toy_geneval", "jpeg_compressibility"]


def _setup(pipe):
    attach_lora(pipe, "policy", rank=2)
    attach_lora(pipe, "critic", rank=2)
    traj = sample_trajectory(
        pipe,
        ["two red circles on the left", "one blue square on the top"],
        SamplerConfig(num_inference_steps=3),
        torch.Generator().manual_seed(0),
    )
    embeds = {k: getattr(traj, k) for k in ("prompt_embeds", "pooled_prompt_embeds")}
    return traj, embeds


@pytest.mark.parametrize("fixture", ["tiny_unet_pipe", "tiny_dit_pipe"])
def test_critic_gives_one_value_per_reward_and_trains_only_its_own_parameters(fixture: str, request) -> None:
    pipe = request.getfixturevalue(fixture)
    traj, embeds = _setup(pipe)
    critic = LatentCritic(pipe, REWARDS, adapter="critic")
    for p in critic.heads.parameters():
        p.requires_grad_(True)
    for name, p in denoiser(pipe).named_parameters():
        p.requires_grad_(".critic." in name)
    values = critic(traj.latents[:, 1], traj.timesteps[1], embeds)
    assert values.shape == (2, len(REWARDS)) and torch.isfinite(values).all()
    values.sum().backward()
    touched = {n for n, p in denoiser(pipe).named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched and all(".critic." in n for n in touched)
    assert all(p.grad is not None for p in critic.heads.parameters())
    assert denoiser(pipe).active_adapters() == ["policy"]  # restored after the critic's pass


def test_unet_features_are_the_mid_block_output(tiny_unet_pipe) -> None:
    """``feature_layer="mid_block"`` (the ECG paper's choice) reads the mid-block output."""
    pipe = tiny_unet_pipe
    traj, embeds = _setup(pipe)
    critic = LatentCritic(pipe, REWARDS, adapter="critic", feature_layer="mid_block")
    tokens, temb = critic.features(traj.latents[:, 0], traj.timesteps[0], embeds)
    captured = {}
    hook = pipe.unet.mid_block.register_forward_hook(lambda m, a, out: captured.setdefault("mid", out))
    from align.backbones import set_active_adapters

    set_active_adapters(pipe, ["critic"])
    with torch.no_grad():
        pipe.unet(traj.latents[:, 0], traj.timesteps[0].expand(2), encoder_hidden_states=embeds["prompt_embeds"])
    hook.remove()
    set_active_adapters(pipe, ["policy"])
    expected = captured["mid"].flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens.detach(), expected, atol=1e-6, rtol=0)
    assert temb.shape == (2, pipe.unet.time_embedding.linear_2.out_features)


def test_shared_adapter_option_reads_the_policy_adapter(tiny_unet_pipe) -> None:
    pipe = tiny_unet_pipe
    traj, embeds = _setup(pipe)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B.policy." in name:
                p.add_(0.3)
    separate = LatentCritic(pipe, REWARDS, adapter="critic").features(traj.latents[:, 0], traj.timesteps[0], embeds)[0]
    shared = LatentCritic(pipe, REWARDS, adapter="policy").features(traj.latents[:, 0], traj.timesteps[0], embeds)[0]
    assert not torch.allclose(separate, shared)
    assert FeatureTap(pipe).backbone.kind == "unet"


def test_unet_features_can_come_from_an_up_block(tiny_unet_pipe) -> None:
    """``feature_layer="up_blocks.N"`` reads that block's output; the critic adapter then covers
    the up-blocks up to N (and no later ones), since its pass stops there."""
    from critics.value_model import critic_target_modules, feature_dims

    pipe = tiny_unet_pipe
    traj, embeds = _setup(pipe)
    critic = LatentCritic(pipe, REWARDS, adapter="critic", feature_layer="up_blocks.0")
    tokens, _ = critic.features(traj.latents[:, 0], traj.timesteps[0], embeds)
    captured = {}
    hook = pipe.unet.up_blocks[0].register_forward_hook(lambda m, a, out: captured.setdefault("up", out))
    from align.backbones import set_active_adapters

    set_active_adapters(pipe, ["critic"])
    with torch.no_grad():
        pipe.unet(traj.latents[:, 0], traj.timesteps[0].expand(2), encoder_hidden_states=embeds["prompt_embeds"])
    hook.remove()
    set_active_adapters(pipe, ["policy"])
    torch.testing.assert_close(tokens.detach(), captured["up"].flatten(2).transpose(1, 2), atol=1e-6, rtol=0)
    assert tokens.shape[-1] == feature_dims(pipe, "up_blocks.0")[0]
    assert critic(traj.latents[:, 0], traj.timesteps[0], embeds).shape == (2, len(REWARDS))
    import re

    names = [n for n, _ in pipe.unet.named_modules()]  # tiny-unet: up_blocks.1 is the one with attention
    assert not any(re.match(critic_target_modules(pipe, "up_blocks.0"), n) for n in names if n.startswith("up_blocks."))
    assert any(re.match(critic_target_modules(pipe, "up_blocks.1"), n) for n in names if n.startswith("up_blocks.1."))
    assert not any(re.match(critic_target_modules(pipe, "mid_block"), n) for n in names if n.startswith("up_blocks."))
    assert LatentCritic(pipe, REWARDS).feature_layer == "up_blocks.1"  # the default (critics/value_model.py)


def test_unknown_feature_layer_lists_the_valid_ones(tiny_unet_pipe, tiny_dit_pipe) -> None:
    with pytest.raises(ValueError, match="critic.feature_layer 'down_blocks.0' is not valid .* mid_block, up_blocks.0"):
        LatentCritic(tiny_unet_pipe, REWARDS, feature_layer="down_blocks.0")
    with pytest.raises(
        ValueError, match="'mid_block' is not valid for this SD3Transformer2DModel; choose one of: norm_out$"
    ):
        LatentCritic(tiny_dit_pipe, REWARDS, feature_layer="mid_block")

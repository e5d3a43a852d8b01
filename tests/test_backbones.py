"""Backbones: presets, the real save/load path, the toy tokenizer, and named LoRA adapters."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from align.backbones import (
    active_adapters,
    adapters_active,
    adapters_disabled,
    attach_lora,
    backbone_kind,
    build_pipeline,
    denoiser,
    load_lora_state_dict,
    lora_num_bytes,
    lora_state_dict,
    set_active_adapters,
    set_trainable,
    toy_tokenizer,
    write_clip_tokenizer,
)
from align.toy.world import vocabulary

PROMPTS = ["two red circles on the left", "one blue square on the top"]


def _images(pipe, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return pipe(PROMPTS, num_inference_steps=2, guidance_scale=3.0, generator=gen, output_type="pt").images


def _trainable(pipe) -> list[str]:
    return [n for n, p in denoiser(pipe).named_parameters() if p.requires_grad]


# ---- presets and loading -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fixture, cls, kind",
    [
        ("tiny_unet_pipe", StableDiffusionPipeline, "unet"),
        ("tiny_unet_vpred_pipe", StableDiffusionPipeline, "unet"),
        ("tiny_sdxl_pipe", StableDiffusionXLPipeline, "sdxl"),
        ("tiny_dit_pipe", StableDiffusion3Pipeline, "dit"),
    ],
)
def test_tiny_presets_are_real_pipelines_that_sample_16px_images(fixture: str, cls: type, kind: str, request) -> None:
    pipe = request.getfixturevalue(fixture)
    assert isinstance(pipe, cls) and backbone_kind(pipe) == kind
    images = _images(pipe)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_vpred_fixture_differs_from_epsilon_only_in_the_scheduler(tiny_unet_pipe, tiny_unet_vpred_pipe) -> None:
    assert tiny_unet_pipe.scheduler.config.prediction_type == "epsilon"
    assert tiny_unet_vpred_pipe.scheduler.config.prediction_type == "v_prediction"
    assert torch.equal(tiny_unet_pipe.unet.conv_in.weight, tiny_unet_vpred_pipe.unet.conv_in.weight)


def test_toy_preset_makes_32px_images_from_16px_latents_and_takes_size_overrides() -> None:
    pipe = build_pipeline("preset:toy")
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 16
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim == 64
    images = _images(pipe)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    small = build_pipeline("preset:toy", unet_channels=(32, 64), text_hidden=32)
    assert small.unet.config.block_out_channels == (32, 64) and small.unet.config.cross_attention_dim == 32
    assert _images(small).shape == (2, 3, 32, 32)


def test_presets_are_seeded_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b = build_pipeline("preset:tiny-dit"), build_pipeline("preset:tiny-dit")
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(p, q) for p, q in zip(a.transformer.parameters(), b.transformer.parameters()))
    c = build_pipeline("preset:tiny-dit", seed=1)
    assert not torch.equal(a.transformer.proj_out.weight, c.transformer.proj_out.weight)


@pytest.mark.parametrize(
    "fixture, kind", [("tiny_unet_pipe", "unet"), ("tiny_sdxl_pipe", "sdxl"), ("tiny_dit_pipe", "dit")]
)
def test_save_pretrained_then_load_gives_bit_identical_images(fixture: str, kind: str, tmp_path, request) -> None:
    pipe = request.getfixturevalue(fixture)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = build_pipeline(str(tmp_path / "pipe"), kind=kind)
    assert type(loaded) is type(pipe)
    assert torch.equal(_images(pipe), _images(loaded))
    with pytest.raises(ValueError, match=f"is a {kind} backbone"):
        build_pipeline(str(tmp_path / "pipe"), kind="dit" if kind == "unet" else "unet")


@pytest.mark.parametrize(
    "fixture, shipped", [("tiny_unet_vpred_pipe", "PNDMScheduler"), ("tiny_sdxl_pipe", "EulerDiscreteScheduler")]
)
def test_a_checkpoint_shipping_another_scheduler_loads_with_ddim_on_the_same_schedule(
    fixture: str, shipped: str, tmp_path, request
) -> None:
    """Real SD1.5 checkpoints ship PNDM and SDXL's ship Euler; the log-prob sampler steps with DDIM, built from
    the saved scheduler's config, so betas, timestep spacing and prediction type carry over."""
    import diffusers

    pipe = request.getfixturevalue(fixture)
    pipe.scheduler = getattr(diffusers, shipped).from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = build_pipeline(str(tmp_path / "pipe"))
    assert type(loaded.scheduler) is diffusers.DDIMScheduler
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type", "steps_offset"):
        assert loaded.scheduler.config[key] == pipe.scheduler.config[key], key
    assert torch.equal(loaded.scheduler.alphas_cumprod, pipe.scheduler.alphas_cumprod)


def test_bad_sources_give_one_line_errors_naming_the_problem(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown backbone preset 'nope'; valid presets: .*tiny-dit.*tiny-unet"):
        build_pipeline("preset:nope")
    with pytest.raises(ValueError, match="has no option.*width; valid options: seed, prediction_type"):
        build_pipeline("preset:tiny-unet", width=3)
    with pytest.raises(ValueError, match="prediction_type 'sample' is not supported"):
        build_pipeline("preset:tiny-unet", prediction_type="sample")
    with pytest.raises(FileNotFoundError, match="pipeline directory not found: ./no/such/dir"):
        build_pipeline("./no/such/dir")
    with pytest.raises(FileNotFoundError, match="has no model_index.json"):
        build_pipeline(str(tmp_path))
    with pytest.raises(ValueError, match="unknown backbone kind 'vit'; valid kinds: unet, dit, sdxl"):
        build_pipeline("preset:tiny-unet", kind="vit")
    with pytest.raises(ValueError, match="is a unet backbone .*kind='dit'"):
        build_pipeline("preset:tiny-unet", kind="dit")
    with pytest.raises(OSError, match="not in the local HF cache; pass allow_download=True"):
        build_pipeline("someone/not-a-cached-model")


# ---- tokenizer -----------------------------------------------------------------------------------


def test_written_tokenizer_has_one_token_per_word_and_round_trips(tmp_path) -> None:
    tok = write_clip_tokenizer(tmp_path / "tok", vocabulary(), model_max_length=16)
    for word in vocabulary():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and tok.bos_token == "<|startoftext|>"
    again = type(tok).from_pretrained(tmp_path / "tok")
    batch = again(PROMPTS, padding="max_length", max_length=again.model_max_length, truncation=True)
    assert batch.input_ids == tok(PROMPTS, padding="max_length", max_length=16, truncation=True).input_ids
    assert again.model_max_length == 16 and all(len(ids) == 16 for ids in batch.input_ids)
    assert len(again) == len(tok) and again.pad_token_id == tok.eos_token_id


def test_the_toy_preset_draws_at_the_toy_worlds_resolution() -> None:
    import inspect

    from align.backbones.presets import toy
    from align.toy.world import RESOLUTION

    assert inspect.signature(toy).parameters["resolution"].default == RESOLUTION


def test_committed_toy_tokenizer_covers_the_toy_vocabulary() -> None:
    tok = toy_tokenizer()
    ids = {w: tok(w, add_special_tokens=False).input_ids for w in vocabulary()}
    assert all(len(v) == 1 for v in ids.values())
    assert len({v[0] for v in ids.values()}) == len(ids)  # distinct words, distinct tokens
    assert tok.model_max_length == 16


# ---- LoRA ----------------------------------------------------------------------------------------


def _perturb(pipe, adapter: str, seed: int) -> None:
    """Random LoRA B so the adapter is not a no-op (peft's default init has B = 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in denoiser(pipe).named_parameters():
            if f"lora_B.{adapter}." in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("fixture", ["tiny_unet_pipe", "tiny_dit_pipe"])
def test_lora_changes_outputs_and_disabling_gives_the_base_bit_for_bit(fixture: str, request) -> None:
    pipe = request.getfixturevalue(fixture)
    base = _images(pipe)
    names = attach_lora(pipe, "policy", rank=4)
    assert torch.equal(_images(pipe), base)  # peft init: B = 0
    _perturb(pipe, "policy", seed=1)
    adapted = _images(pipe)
    assert not torch.allclose(adapted, base, atol=1e-3)
    with adapters_disabled(pipe):
        assert torch.equal(_images(pipe), base)
    assert torch.equal(_images(pipe), adapted)
    assert _trainable(pipe) == names and names and all(".policy." in n and "lora_" in n for n in names)
    frozen = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module) and m is not denoiser(pipe)]
    assert frozen and not any(p.requires_grad for m in frozen for p in m.parameters())


def test_random_init_adapter_is_not_a_no_op(tiny_unet_pipe) -> None:
    base = _images(tiny_unet_pipe)
    attach_lora(tiny_unet_pipe, "policy", init_lora_weights=False)
    assert not torch.allclose(_images(tiny_unet_pipe), base, atol=1e-3)


def test_adapters_disabled_restores_active_set_and_trainability_even_after_an_exception(tiny_unet_pipe) -> None:
    pipe = tiny_unet_pipe
    attach_lora(pipe, "policy")
    attach_lora(pipe, "critic", rank=2)
    policy_only = set_trainable(pipe, ["policy"])
    _perturb(pipe, "policy", seed=1)
    adapted = _images(pipe)
    with pytest.raises(RuntimeError, match="boom"):
        with adapters_disabled(pipe):
            assert _trainable(pipe) == []
            raise RuntimeError("boom")
    assert _trainable(pipe) == policy_only  # peft's enable_adapters alone would make critic trainable
    assert active_adapters(pipe) == ["policy"]
    assert torch.equal(_images(pipe), adapted)


def test_active_adapters_can_be_switched_and_restored(tiny_dit_pipe) -> None:
    pipe = tiny_dit_pipe
    base = _images(pipe)
    attach_lora(pipe, "policy")
    attach_lora(pipe, "critic", rank=2)
    _perturb(pipe, "critic", seed=3)
    trainable = _trainable(pipe)
    assert active_adapters(pipe) == ["policy"] and torch.equal(_images(pipe), base)  # policy's B is still 0
    with adapters_active(pipe, ["policy", "critic"]):
        assert active_adapters(pipe) == ["policy", "critic"]
        assert not torch.allclose(_images(pipe), base, atol=1e-3)
    assert active_adapters(pipe) == ["policy"] and torch.equal(_images(pipe), base)
    set_active_adapters(pipe, "critic")
    assert active_adapters(pipe) == ["critic"] and _trainable(pipe) == trainable
    with pytest.raises(ValueError, match="unknown LoRA adapter 'value'; existing: \\['policy', 'critic'\\]"):
        set_active_adapters(pipe, ["value"])


def test_two_named_adapters_coexist_with_separate_state_dicts(tiny_dit_pipe) -> None:
    pipe = tiny_dit_pipe
    policy_names = attach_lora(pipe, "policy", rank=4)
    critic_names = attach_lora(pipe, "critic", rank=2)
    assert _trainable(pipe) == critic_names and not set(policy_names) & set(critic_names)
    assert active_adapters(pipe) == ["policy"]  # the critic is attached inactive
    policy, critic = lora_state_dict(pipe, "policy"), lora_state_dict(pipe, "critic")
    assert not any("policy" in k or "critic" in k for k in [*policy, *critic])  # keys name modules only
    assert {v.shape[0] for k, v in policy.items() if "lora_A" in k} == {4}
    assert {v.shape[0] for k, v in critic.items() if "lora_A" in k} == {2}
    assert len(policy) == len(policy_names)
    assert lora_num_bytes(pipe, "policy") == sum(v.numel() * 4 for v in policy.values())
    assert lora_num_bytes(pipe, "critic") < lora_num_bytes(pipe, "policy")
    with pytest.raises(ValueError, match="already exists"):
        attach_lora(pipe, "policy")


def test_lora_state_survives_safetensors_and_loads_into_another_pipeline(tmp_path) -> None:
    src, dst = build_pipeline("preset:tiny-unet"), build_pipeline("preset:tiny-unet")
    attach_lora(src, "policy")
    attach_lora(dst, "policy")
    _perturb(src, "policy", seed=2)
    save_file(lora_state_dict(src, "policy"), str(tmp_path / "policy.safetensors"))
    trainable = _trainable(dst)
    load_lora_state_dict(dst, load_file(str(tmp_path / "policy.safetensors")), "policy")
    assert torch.equal(_images(src), _images(dst))
    assert _trainable(dst) == trainable


def test_lora_state_mismatch_errors_say_what_differs(tiny_unet_pipe) -> None:
    attach_lora(tiny_unet_pipe, "policy")
    state = lora_state_dict(tiny_unet_pipe, "policy")
    key = next(iter(state))
    with pytest.raises(ValueError, match="1 missing"):
        load_lora_state_dict(tiny_unet_pipe, {k: v for k, v in state.items() if k != key}, "policy")
    with pytest.raises(ValueError, match="1 unexpected"):
        load_lora_state_dict(tiny_unet_pipe, {**state, "foo.lora_A.weight": state[key]}, "policy")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_lora_state_dict(tiny_unet_pipe, {**state, key: torch.zeros(1, 1)}, "policy")
    with pytest.raises(ValueError, match="unknown LoRA adapter 'critic'"):
        lora_state_dict(tiny_unet_pipe, "critic")

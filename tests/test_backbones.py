"""Backbones: presets, the real save/load path, the toy tokenizer, and named LoRA adapters."""
from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

from align.backbones import (adapters_disabled, attach_lora, build_pipeline, denoiser, load_lora_state_dict,
                             lora_num_bytes, lora_state_dict, set_trainable)
from align.backbones.tokenizer import write_clip_tokenizer
from align.toy.world import vocabulary

PROMPTS = ["two red circles on the left", "one blue square on the top"]


def _images(pipe, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, generator=gen, output_type="pt").images


@pytest.mark.parametrize("preset, cls, size", [("tiny-unet", StableDiffusionPipeline, 16),
                                               ("tiny-dit", StableDiffusion3Pipeline, 16),
                                               ("toy", StableDiffusionPipeline, 32)])
def test_presets_are_real_pipelines_that_sample(preset: str, cls: type, size: int) -> None:
    pipe = build_pipeline(f"preset:{preset}")
    assert isinstance(pipe, cls)
    images = _images(pipe)
    assert images.shape == (2, 3, size, size) and torch.isfinite(images).all()


@pytest.mark.parametrize("preset", ["tiny-unet", "tiny-dit"])
def test_presets_are_deterministic(preset: str) -> None:
    assert torch.equal(_images(build_pipeline(f"preset:{preset}")), _images(build_pipeline(f"preset:{preset}")))


@pytest.mark.parametrize("preset", ["tiny-unet", "tiny-dit"])
def test_save_pretrained_then_load_gives_identical_images(preset: str, tmp_path) -> None:
    pipe = build_pipeline(f"preset:{preset}")
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = build_pipeline(str(tmp_path / "pipe"), kind="unet" if preset == "tiny-unet" else "dit")
    assert type(loaded) is type(pipe)
    assert torch.equal(_images(pipe), _images(loaded))


def test_toy_tokenizer_gives_one_token_per_word_and_round_trips(tmp_path) -> None:
    tok = write_clip_tokenizer(tmp_path / "tok", vocabulary(), model_max_length=16)
    for word in vocabulary():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    again = type(tok).from_pretrained(tmp_path / "tok")
    assert again("two red circles on the left").input_ids == tok("two red circles on the left").input_ids
    assert again.model_max_length == 16


def _perturb(pipe, adapter: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in denoiser(pipe).named_parameters():
            if f"lora_B.{adapter}." in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))


def test_lora_changes_outputs_and_disabling_restores_the_base_bit_for_bit() -> None:
    pipe = build_pipeline("preset:tiny-unet")
    base = _images(pipe)
    names = attach_lora(pipe, "policy", rank=4)
    assert torch.equal(_images(pipe), base)  # peft init: B = 0
    _perturb(pipe, "policy", seed=1)
    adapted = _images(pipe)
    assert not torch.allclose(adapted, base)
    with adapters_disabled(pipe):
        assert torch.equal(_images(pipe), base)
    assert torch.equal(_images(pipe), adapted)
    trainable = [n for n, p in denoiser(pipe).named_parameters() if p.requires_grad]
    assert trainable == names and all(".policy." in n and "lora_" in n for n in names)
    assert not any(p.requires_grad for p in pipe.vae.parameters())
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())


def test_adapters_disabled_restores_state_after_an_exception() -> None:
    pipe = build_pipeline("preset:tiny-unet")
    attach_lora(pipe, "policy")
    _perturb(pipe, "policy", seed=1)
    adapted = _images(pipe)
    with pytest.raises(RuntimeError):
        with adapters_disabled(pipe):
            raise RuntimeError("boom")
    assert torch.equal(_images(pipe), adapted)


def test_two_named_adapters_coexist_and_state_dicts_are_separate() -> None:
    pipe = build_pipeline("preset:tiny-dit")
    attach_lora(pipe, "policy", rank=4)
    attach_lora(pipe, "critic", rank=2)
    assert denoiser(pipe).active_adapters() == ["policy"]  # the critic is attached inactive
    policy, critic = lora_state_dict(pipe, "policy"), lora_state_dict(pipe, "critic")
    assert set(policy) == set(critic)  # same module paths, different adapters
    assert {v.shape[0] for k, v in policy.items() if "lora_A" in k} == {4}
    assert {v.shape[0] for k, v in critic.items() if "lora_A" in k} == {2}
    assert lora_num_bytes(pipe, "policy") == sum(v.numel() * 4 for v in policy.values())
    both = set_trainable(pipe, ["policy", "critic"])
    assert any(".policy." in n for n in both) and any(".critic." in n for n in both)


def test_lora_state_round_trip_and_mismatch_errors() -> None:
    src, dst = build_pipeline("preset:tiny-unet"), build_pipeline("preset:tiny-unet")
    attach_lora(src, "policy")
    attach_lora(dst, "policy")
    _perturb(src, "policy", seed=2)
    load_lora_state_dict(dst, lora_state_dict(src, "policy"), "policy")
    assert torch.equal(_images(src), _images(dst))
    state = lora_state_dict(src, "policy")
    key = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(dst, {k: v for k, v in state.items() if k != key}, "policy")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_lora_state_dict(dst, {**state, key: torch.zeros(1, 1)}, "policy")
    with pytest.raises(ValueError, match="unknown LoRA adapter 'critic'"):
        lora_state_dict(dst, "critic")


def test_bad_sources_give_one_line_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown backbone preset 'nope'; valid presets: .*tiny-dit"):
        build_pipeline("preset:nope")
    with pytest.raises(FileNotFoundError, match="pipeline directory not found: ./no/such/dir"):
        build_pipeline("./no/such/dir")
    with pytest.raises(ValueError, match="is a unet backbone"):
        build_pipeline("preset:tiny-unet", kind="dit")
    with pytest.raises(OSError, match="not in the local HF cache"):
        build_pipeline("someone/not-a-cached-model")

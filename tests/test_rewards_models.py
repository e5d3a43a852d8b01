"""Model rewards (clip_score, aesthetic, hpsv2) through their real loading code, on tiny open_clip
architectures written locally and checkpoints saved in each project's format; no hub access."""

from __future__ import annotations

import json

import pytest
import torch

from rewards import get_reward, score
from rewards.clip_rewards import AestheticMLP, WeightsNotLocalError, to_pil

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PROMPTS = ["two red circles on the left", "one blue square on the top", "three green triangles on the right"]


def _images(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, 40, 48, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def tiny_open_clip(tmp_path):
    """A seeded tiny open_clip CLIP, its JSON config and its state dict saved as a .pt file."""
    import open_clip

    config = tmp_path / "tiny-clip-test.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip-test")
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    return model.eval(), preprocess, open_clip.get_tokenizer("tiny-clip-test"), config, tmp_path / "clip.pt"


def _features(model, preprocess, tokenizer, images, prompts):
    pixels = torch.stack([preprocess(im) for im in to_pil(images)])
    with torch.no_grad():
        img, txt = model.encode_image(pixels), model.encode_text(tokenizer(prompts))
    return img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)


def test_clip_score_loads_a_local_checkpoint_and_returns_the_raw_cosine(tiny_open_clip) -> None:
    model, preprocess, tokenizer, config, ckpt = tiny_open_clip
    reward = get_reward(
        "clip_score", model="tiny-clip-test", model_config=str(config), checkpoint=str(ckpt), batch_size=2
    )
    scores, _ = score([reward], _images(), PROMPTS)
    img, txt = _features(model, preprocess, tokenizer, _images(), PROMPTS)
    torch.testing.assert_close(scores[:, 0], (img * txt).sum(-1), rtol=0, atol=1e-5)
    assert scores.abs().max() <= 1.0


def test_clip_score_never_downloads_missing_weights(tiny_open_clip, tmp_path) -> None:
    with pytest.raises(
        WeightsNotLocalError,
        match="weights for ViT-B-32 / laion2b_s34b_b79k are not in the Hugging Face cache .* or pass checkpoint=<file>",
    ):
        get_reward("clip_score", model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    with pytest.raises(WeightsNotLocalError, match="reward 'clip_score': checkpoint not found: .*missing.pt"):
        get_reward("clip_score", model="ViT-B-32", checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(WeightsNotLocalError, match="give checkpoint=<local file> or pretrained=<tag"):
        get_reward("clip_score", model="ViT-B-32")
    with pytest.raises(WeightsNotLocalError, match="open_clip knows no tag 'nope' for 'ViT-B-32'"):
        get_reward("clip_score", model="ViT-B-32", pretrained="nope")


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_aesthetic_is_the_laion_mlp_on_unit_norm_clip_embeddings(tiny_open_clip, tmp_path, fmt: str) -> None:
    model, preprocess, tokenizer, config, ckpt = tiny_open_clip
    torch.manual_seed(1)
    mlp = AestheticMLP(TINY_CLIP["embed_dim"]).eval()
    head = tmp_path / f"head.{fmt}"
    if fmt == "pth":
        torch.save(mlp.state_dict(), head)
    else:
        from safetensors.torch import save_file

        save_file(mlp.state_dict(), head)
    reward = get_reward(
        "aesthetic", head=str(head), model="tiny-clip-test", model_config=str(config), checkpoint=str(ckpt)
    )
    scores, _ = score([reward], _images(), PROMPTS)
    img, _ = _features(model, preprocess, tokenizer, _images(), PROMPTS)
    with torch.no_grad():
        expected = mlp.layers(img).squeeze(-1)
    torch.testing.assert_close(scores[:, 0], expected, rtol=0, atol=1e-5)
    with pytest.raises(WeightsNotLocalError, match="give head=<local MLP checkpoint>"):
        get_reward("aesthetic", model="tiny-clip-test", checkpoint=str(ckpt))


@pytest.fixture
def tiny_hps(tmp_path):
    """A tiny architecture in hpsv2's bundled open_clip and a checkpoint in HPS's format ({'state_dict': ...})."""
    from hpsv2.src.open_clip import add_model_config, create_model_and_transforms, get_tokenizer

    config = tmp_path / "tiny-hps-test.json"
    config.write_text(json.dumps(TINY_CLIP))
    add_model_config(config)
    torch.manual_seed(2)
    model, _, preprocess = create_model_and_transforms("tiny-hps-test", None, output_dict=True, light_augmentation=True)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "HPS_tiny.pt")
    return model.eval(), preprocess, get_tokenizer("tiny-hps-test"), config, tmp_path / "HPS_tiny.pt"


def test_hpsv2_loads_an_hps_format_checkpoint_and_matches_a_direct_computation(tiny_hps) -> None:
    model, preprocess, tokenizer, config, ckpt = tiny_hps
    reward = get_reward("hpsv2", checkpoint=str(ckpt), model="tiny-hps-test", model_config=str(config))
    scores, _ = score([reward], _images(), PROMPTS)
    img, txt = _features(model, preprocess, tokenizer, _images(), PROMPTS)
    torch.testing.assert_close(scores[:, 0], torch.diagonal(img @ txt.T), rtol=0, atol=1e-5)


def test_hpsv2_refuses_missing_or_pickled_code_checkpoints(tiny_hps, tmp_path) -> None:
    model, _, _, config, _ = tiny_hps
    with pytest.raises(WeightsNotLocalError, match="give checkpoint=<local HPS_v2.1_compressed.pt>"):
        get_reward("hpsv2")
    torch.save({"state_dict": model.state_dict(), "extra": _Opaque()}, tmp_path / "unsafe.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        get_reward("hpsv2", checkpoint=str(tmp_path / "unsafe.pt"), model="tiny-hps-test", model_config=str(config))


class _Opaque:
    """An arbitrary class: unpickling it would run code, so weights_only loading must refuse it."""

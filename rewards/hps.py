"""``hpsv2``: Human Preference Score v2.1 through the hpsv2 package's own open_clip model.

hpsv2's ``img_score.score`` always builds ViT-H-14 with hub weights and downloads the HPS
checkpoint; here the architecture is built with ``pretrained=None`` (no download) and the whole
model is loaded from the local HPS checkpoint (``{'state_dict': ...}``, ``weights_only=True``).
Preprocessing is hpsv2's own eval transform on uint8 PIL images, so the score equals hpsv2's on
the saved images: HPS = <f_img/|f_img|, f_txt/|f_txt|> (the diagonal of hpsv2's logits).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from rewards.clip_rewards import WeightsNotLocalError, load_state, to_pil


def load_hps_model(checkpoint: Optional[str], model: str, model_config: Optional[str], device: str):
    """hpsv2's open_clip architecture (no pretrained download) with the local HPS checkpoint loaded."""
    if not checkpoint:
        raise WeightsNotLocalError(
            "reward 'hpsv2': give checkpoint=<local HPS_v2.1_compressed.pt>; it is never downloaded silently"
        )
    if not os.path.isfile(checkpoint):
        raise WeightsNotLocalError(f"reward 'hpsv2': checkpoint not found: {checkpoint}")
    from hpsv2.src.open_clip import add_model_config, create_model_and_transforms, get_tokenizer, list_models

    if model_config:
        add_model_config(model_config)
    if model not in list_models():
        raise ValueError(f"reward 'hpsv2': unknown architecture {model!r} (give model_config=<json>)")
    net, _, preprocess_val = create_model_and_transforms(
        model,
        None,
        precision="fp32",
        device="cpu",
        jit=False,
        force_quick_gelu=False,
        force_custom_text=False,
        force_patch_dropout=False,
        force_image_size=None,
        pretrained_image=False,
        image_mean=None,
        image_std=None,
        light_augmentation=True,
        aug_cfg={},
        output_dict=True,
        with_score_predictor=False,
        with_region_predictor=False,
    )
    net.load_state_dict(load_state(checkpoint, "hpsv2"))
    return net.to(device).eval().requires_grad_(False), preprocess_val, get_tokenizer(model)


class HPSv2:
    """HPS v2.1 (hpsv2's model, local checkpoint): cosine of CLIP-H image and prompt features, about 0.2–0.35."""

    name = "hpsv2"

    def __init__(
        self,
        checkpoint: Optional[str] = None,
        model: str = "ViT-H-14",
        model_config: Optional[str] = None,
        device: str = "cpu",
        batch_size: Optional[int] = 16,
    ) -> None:
        self.device, self.batch_size = device, batch_size
        self.model, self.preprocess, self.tokenizer = load_hps_model(checkpoint, model, model_config, device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: dict[str, Any]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(im) for im in to_pil(images)]).to(self.device)
        out = self.model(pixels, self.tokenizer(prompts).to(self.device))
        return (out["image_features"] * out["text_features"]).sum(-1).float()

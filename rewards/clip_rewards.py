"""CLIP-based rewards on open_clip: ``clip_score`` (image–text cosine) and ``aesthetic`` (the
LAION aesthetic MLP on CLIP image embeddings). Weights are local only: a checkpoint path, or a
pretrained tag that is already in the local cache — never a silent download.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image


class WeightsNotLocalError(FileNotFoundError):
    """Requested model weights are not on this machine (we never download them silently)."""


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B,3,H,W) in [0,1] → RGB PIL images (uint8, as saved files would be)."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def resolve_open_clip_weights(
    model: str, pretrained: Optional[str], checkpoint: Optional[str], reward: str
) -> Optional[str]:
    """A local file for open_clip's ``pretrained=``: ``checkpoint`` if it exists, else the cached
    file of the tag ``pretrained`` (HF cache with ``local_files_only``, or open_clip's URL cache)."""
    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise WeightsNotLocalError(f"reward {reward!r}: checkpoint not found: {checkpoint}")
        return checkpoint
    if not pretrained:
        raise WeightsNotLocalError(
            f"reward {reward!r}: give checkpoint=<local file> or pretrained=<tag in the local "
            "cache>; weights are never downloaded silently"
        )
    import open_clip
    from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives, get_pretrained_cfg

    cfg = get_pretrained_cfg(model, pretrained)
    if not cfg:
        raise WeightsNotLocalError(
            f"reward {reward!r}: open_clip knows no tag {pretrained!r} for {model!r}; tags: "
            f"{', '.join(open_clip.list_pretrained_tags_by_model(model)) or 'none'}"
        )
    if cfg.get("hf_hub"):
        from huggingface_hub import hf_hub_download

        repo, filename = os.path.split(cfg["hf_hub"])  # 'org/repo/' or 'org/repo/file.bin'
        for name in [*_get_safe_alternatives(filename or HF_WEIGHTS_NAME), filename or HF_WEIGHTS_NAME]:
            try:
                return hf_hub_download(repo, name, local_files_only=True)
            except Exception:  # noqa: BLE001 - not cached under this name; try the next
                continue
        where = f"the Hugging Face cache ({repo})"
    else:
        path = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg.get("url", "")))
        if cfg.get("url") and os.path.isfile(path):
            return path
        where = path
    raise WeightsNotLocalError(
        f"reward {reward!r}: weights for {model} / {pretrained} are not in {where}; download "
        "them yourself (e.g. huggingface-cli download) or pass checkpoint=<file>"
    )


def load_open_clip(
    model: str,
    pretrained: Optional[str],
    checkpoint: Optional[str],
    model_config: Optional[str],
    device: str,
    reward: str,
):
    """open_clip model (eval, on ``device``), its eval transform and tokenizer, from local weights.
    ``model_config``: a JSON architecture file (registered under its file stem, which must equal ``model``)."""
    import open_clip

    if model_config:
        if not os.path.isfile(model_config):
            raise FileNotFoundError(f"reward {reward!r}: model_config not found: {model_config}")
        open_clip.add_model_config(model_config)
    if model not in open_clip.list_models():
        raise ValueError(f"reward {reward!r}: unknown open_clip model {model!r} (give model_config=<json>)")
    weights = resolve_open_clip_weights(model, pretrained, checkpoint, reward)
    net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=weights, device=device)
    return net.eval().requires_grad_(False), preprocess, open_clip.get_tokenizer(model)


class ClipScore:
    """open_clip image–text cosine similarity, raw in [−1, 1] (torchmetrics' CLIPScore = 100·max(cos, 0))."""

    name = "clip_score"

    def __init__(
        self,
        model: str = "ViT-L-14",
        pretrained: Optional[str] = None,
        checkpoint: Optional[str] = None,
        model_config: Optional[str] = None,
        device: str = "cpu",
        batch_size: Optional[int] = 32,
    ) -> None:
        self.device, self.batch_size = device, batch_size
        self.model, self.preprocess, self.tokenizer = load_open_clip(
            model, pretrained, checkpoint, model_config, device, self.name
        )

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: dict[str, Any]) -> torch.Tensor:
        """cos(f_img(x), f_txt(c)) = <f_img/|f_img|, f_txt/|f_txt|> per (image, prompt) pair."""
        pixels = torch.stack([self.preprocess(im) for im in to_pil(images)]).to(self.device)
        img = self.model.encode_image(pixels, normalize=True)
        txt = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True)
        return (img * txt).sum(-1).float()


class AestheticMLP(torch.nn.Module):
    """The LAION improved-aesthetic-predictor head (keys ``layers.{0,2,4,6,7}``), on unit-norm embeddings."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


def load_state(path: str, reward: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pt/.pth`` (``weights_only=True``; ``state_dict`` key unwrapped)."""
    if not os.path.isfile(path):
        raise WeightsNotLocalError(f"reward {reward!r}: checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class Aesthetic:
    """LAION aesthetic score: MLP(CLIP image embedding / its norm), about 1–10 with the released head."""

    name = "aesthetic"

    def __init__(
        self,
        head: Optional[str] = None,
        model: str = "ViT-L-14",
        pretrained: Optional[str] = None,
        checkpoint: Optional[str] = None,
        model_config: Optional[str] = None,
        device: str = "cpu",
        batch_size: Optional[int] = 32,
    ) -> None:
        if not head:
            raise WeightsNotLocalError(
                "reward 'aesthetic': give head=<local MLP checkpoint> (e.g. sac+logos+ava1-l14-linearMSE.pth)"
            )
        self.device, self.batch_size = device, batch_size
        self.model, self.preprocess, _ = load_open_clip(model, pretrained, checkpoint, model_config, device, self.name)
        state = load_state(head, self.name)
        self.mlp = AestheticMLP(state["layers.0.weight"].shape[1])
        self.mlp.load_state_dict(state)
        self.mlp.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: dict[str, Any]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(im) for im in to_pil(images)]).to(self.device)
        return self.mlp(self.model.encode_image(pixels, normalize=True).float()).float()

"""Reconstruction metrics: PSNR and SSIM (torchmetrics, data range 1 on [0, 1] images, as CLAMP's
piq calls) and LPIPS (torchmetrics) when its backbone weights are available on local disk.

LPIPS needs ImageNet-pretrained AlexNet/VGG/SqueezeNet weights that torchvision would download;
build and CI machines cannot. :func:`load_lpips` takes the torchvision checkpoint file (e.g.
``alexnet-owt-7be5be79.pth``, or the same state dict as ``.safetensors``), reads it itself with
``torch.load(weights_only=True)`` (a pickle that would run code is refused, never executed), checks it
against torchvision's architecture, builds torchmetrics' LPIPS network with a random backbone
(``pnet_rand=True``: no download, no torch.hub) and copies the backbone weights into its slices. The
LPIPS linear heads ship inside torchmetrics. Images under 64 px (the toy world's 32 px) are
upsampled bilinearly to 64 px for LPIPS only.
"""

from __future__ import annotations

import os
import pickle
from typing import Optional

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.functional.image.lpips import _lpips_compute, _lpips_update, _NoTrainLpips

#: torchmetrics' LPIPS net name → the torchvision model whose ``features`` it slices.
LPIPS_BACKBONES = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}
#: Smaller images are upsampled (bilinear) to this size for LPIPS only.
LPIPS_MIN_SIZE = 64
LPIPS_UNAVAILABLE = (
    "LPIPS unavailable: it needs pretrained backbone weights that cannot be downloaded here; "
    "pass --lpips-weights FILE (the torchvision checkpoint, e.g. alexnet-owt-7be5be79.pth)"
)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A tensor state dict from ``.safetensors`` or a ``torch.save`` file read with weights_only=True;
    one-line ValueError naming the file otherwise (a crafted pickle is refused before any of it runs)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input
            raise ValueError(f"--lpips-weights {path}: not a readable safetensors file ({err})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, AttributeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"--lpips-weights {path}: refused, not a plain tensor checkpoint (torch.load weights_only=True: {first})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"--lpips-weights {path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


class LocalLPIPS(torch.nn.Module):
    """torchmetrics' LPIPS network (``_NoTrainLpips``) with a given backbone; ``forward(a, b)`` is the
    mean LPIPS of images in [0, 1] (torchmetrics' ``normalize=True`` path, its own input checks)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
        return _lpips_compute(_lpips_update(img1, img2, net=self.net, normalize=True), reduction="mean")


def load_lpips(weights: str, net: str = "alex") -> LocalLPIPS:
    """LPIPS whose backbone comes from the local torchvision checkpoint ``weights`` (never torch.hub)."""
    import torchvision

    if net not in LPIPS_BACKBONES:
        raise ValueError(f"LPIPS net {net!r} is not one of {sorted(LPIPS_BACKBONES)}")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"LPIPS weights file not found: {weights}")
    state = read_state_dict(weights)
    model = getattr(torchvision.models, LPIPS_BACKBONES[net])(weights=None)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        missing = sorted(set(model.state_dict()) - set(state))[:3]
        extra = sorted(set(state) - set(model.state_dict()))[:3]
        raise ValueError(
            f"--lpips-weights {weights}: not a torchvision {LPIPS_BACKBONES[net]} checkpoint "
            f"(missing {missing}, unexpected {extra}, or shapes differ)"
        ) from None
    lpips = _NoTrainLpips(net=net, pnet_rand=True)  # random backbone: builds with weights=None
    features = model.features.state_dict()  # keys "<index>.weight"
    # torchmetrics splits ``features`` into slices keeping each layer's index: "slice2.3.weight" ← "3.weight"
    sliced = {key: features[key.split(".", 1)[1]] for key in lpips.net.state_dict()}
    lpips.net.load_state_dict(sliced, strict=True)
    return LocalLPIPS(lpips).eval()


def image_metrics(out: torch.Tensor, ref: torch.Tensor, lpips=None) -> dict[str, float]:
    """PSNR (dB), SSIM and LPIPS (None without weights) of images in [0, 1], averaged over the batch."""
    out, ref = out.clamp(0, 1).float(), ref.clamp(0, 1).float()
    res = {
        "psnr": float(peak_signal_noise_ratio(out, ref, data_range=1.0, dim=(1, 2, 3))),
        "ssim": float(structural_similarity_index_measure(out, ref, data_range=1.0)),
        "lpips": None,
    }
    if lpips is not None:
        if min(out.shape[-2:]) < LPIPS_MIN_SIZE:  # the backbones' pooling needs a few dozen pixels
            size = [max(LPIPS_MIN_SIZE, d) for d in out.shape[-2:]]
            out, ref = (F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in (out, ref))
        with torch.no_grad():
            res["lpips"] = float(lpips(out, ref))
    return res


def format_metrics(m: dict[str, Optional[float]]) -> str:
    lp = "n/a" if m.get("lpips") is None else f"{m['lpips']:.4f}"
    return f"PSNR {m['psnr']:.2f} dB  SSIM {m['ssim']:.4f}  LPIPS {lp}"

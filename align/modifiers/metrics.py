"""Reconstruction metrics: PSNR and SSIM (torchmetrics, data range 1 on [0, 1] images, as CLAMP's
piq calls) and LPIPS (torchmetrics) when its backbone weights are available on local disk.

LPIPS needs ImageNet-pretrained AlexNet/VGG/SqueezeNet weights that torchvision would download;
build and CI machines cannot. :func:`load_lpips` takes the torchvision checkpoint file (e.g.
``alexnet-owt-7be5be79.pth``) and serves it through torch.hub's checkpoint cache, so torchmetrics'
own loader finds it; the LPIPS linear heads ship inside torchmetrics. Images under 64 px (the toy
world's 32 px) are upsampled bilinearly to 64 px for LPIPS only.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Optional

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

#: torchmetrics' LPIPS net name → torchvision model whose weights it loads.
LPIPS_BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}
#: Smaller images are upsampled (bilinear) to this size for LPIPS only.
LPIPS_MIN_SIZE = 64
LPIPS_UNAVAILABLE = ("LPIPS unavailable: it needs pretrained backbone weights that cannot be downloaded here; "
                     "pass --lpips-weights FILE (the torchvision checkpoint, e.g. alexnet-owt-7be5be79.pth)")


@contextlib.contextmanager
def _hub_cache_with(path: str, filename: str):
    """torch.hub's checkpoint dir pointed at a temp dir holding ``filename`` → ``path``."""
    old = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "checkpoints"))
        os.symlink(os.path.abspath(path), os.path.join(tmp, "checkpoints", filename))
        torch.hub.set_dir(tmp)
        try:
            yield
        finally:
            torch.hub.set_dir(old)


def load_lpips(weights: str, net: str = "alex"):
    """torchmetrics LPIPS whose backbone is loaded from the local torchvision checkpoint ``weights``."""
    import torchvision
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"LPIPS net {net!r} is not one of {sorted(LPIPS_BACKBONES)}")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"LPIPS weights file not found: {weights}")
    filename = getattr(torchvision.models, LPIPS_BACKBONES[net]).DEFAULT.url.rsplit("/", 1)[-1]
    with _hub_cache_with(weights, filename):
        metric = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True)
    return metric.eval()


def image_metrics(out: torch.Tensor, ref: torch.Tensor, lpips=None) -> dict[str, float]:
    """PSNR (dB), SSIM and LPIPS (None without weights) of images in [0, 1], averaged over the batch."""
    out, ref = out.clamp(0, 1).float(), ref.clamp(0, 1).float()
    res = {"psnr": float(peak_signal_noise_ratio(out, ref, data_range=1.0, dim=(1, 2, 3))),
           "ssim": float(structural_similarity_index_measure(out, ref, data_range=1.0)),
           "lpips": None}
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

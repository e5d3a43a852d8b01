"""Forward operators y = A(x) for zero-shot inverse problems (docs/inverse.md, "Parts").

Every operator is a differentiable ``torch`` function of a batch of states: images ``x`` (B, C, H, W)
for the image operators, flat (B, n) vectors for :class:`MatrixOperator`, any (B, ...) for a
subclass (the base :meth:`Operator.check` assumes nothing beyond the batch dimension). VJPs
``J_A(x)^T u`` come from autograd; JVPs ``J_A(x) v`` are ``A(v)`` for linear operators and the
double-VJP trick otherwise (no forward-mode AD, so any module with double backward works, e.g. the
VAE decoder of :class:`LatentOperator`).

Shapes are checked up front (:meth:`Operator.check`) so a mismatch is a one-line error before any
denoiser call. Images live in [-1, 1] (the VAE's range); masks are 1 where a pixel is observed.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F


class Operator:
    """Base: ``__call__`` is A; ``linear`` says whether A(a u + b v) = a A(u) + b A(v)."""

    name = "operator"
    linear = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check(self, x_shape: Sequence[int]) -> None:
        """Raise a one-line ValueError if A cannot take inputs of ``x_shape``. The base accepts any
        batch of states (B, ...) — flat vectors too — and leaves the rest to :meth:`check_measurement`,
        which applies A to zeros of that shape; image operators require (B, C, H, W)."""
        if len(x_shape) < 2:
            raise ValueError(f"{self.name}: expects a batch of states (B, ...), got shape {tuple(x_shape)}")

    def check_measurement(self, y: torch.Tensor, x_shape: Sequence[int]) -> None:
        """Raise a one-line error unless ``y`` has the shape A gives for inputs of ``x_shape``."""
        self.check(x_shape)
        try:
            probe = self(torch.zeros((1, *x_shape[1:]), dtype=y.dtype, device=y.device))
        except (RuntimeError, ValueError, IndexError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{self.name}: cannot apply A to states of shape {tuple(x_shape[1:])}: {first}") from None
        want = tuple(probe.shape[1:])
        if tuple(y.shape[1:]) != want:
            raise ValueError(
                f"{self.name}: measurement y has shape {tuple(y.shape[1:])} per sample, but A maps "
                f"images {tuple(x_shape[1:])} to {want}"
            )

    def vjp(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """J_A(x)^T u through autograd."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            return torch.autograd.grad(self(x), x, u)[0]

    def jvp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """J_A(x) v: A(v) when linear, else the double-VJP trick d/du <J^T u, v>."""
        if self.linear:
            return self(v)
        return linearize(self, x)[2](v)

    def pseudo_inverse(self, y: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
        """A cheap image consistent-ish with y (stage-1 initialisation): A^T y by default."""
        return self.vjp(torch.zeros((y.shape[0], *x_shape[1:]), dtype=y.dtype, device=y.device), y)


def check_image(name: str, x_shape: Sequence[int]) -> None:
    """The image operators' shape rule: (B, C, H, W)."""
    if len(x_shape) != 4:
        raise ValueError(f"{name}: expects images (B, C, H, W), got shape {tuple(x_shape)}")


def linearize(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
    """(A(x), vjp, jvp) at x sharing one retained graph: vjp(u) = J^T u, jvp(v) = J v.

    The JVP differentiates the (linear in u) VJP graph: J v = ∂/∂u <J^T u, v>."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = op(x)
        u = torch.zeros_like(out, requires_grad=True)
        vjp_u = torch.autograd.grad(out, x, u, create_graph=True)[0]

    def vjp(w: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(out, x, w, retain_graph=True)[0]

    def jvp(v: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(vjp_u, u, v, retain_graph=True)[0]

    return out.detach(), vjp, jvp


# ----------------------------------------------------------------------------- inpainting
def box_mask(size: int | tuple[int, int], box: tuple[int, int, int, int]) -> torch.Tensor:
    """(1, 1, H, W) mask, 0 inside ``box = (top, left, height, width)`` (the hole), 1 elsewhere."""
    h, w = (size, size) if isinstance(size, int) else size
    top, left, bh, bw = box
    if not (0 <= top and 0 <= left and top + bh <= h and left + bw <= w and bh > 0 and bw > 0):
        raise ValueError(f"box mask: box (top, left, height, width) = {box} does not fit a {h}×{w} image")
    m = torch.ones(1, 1, h, w)
    m[..., top : top + bh, left : left + bw] = 0
    return m


def random_mask(
    size: int | tuple[int, int], missing: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """(1, 1, H, W) mask with a fraction ``missing`` of pixels dropped uniformly at random."""
    if not 0.0 <= missing < 1.0:
        raise ValueError(f"random mask: missing fraction must be in [0, 1), got {missing}")
    h, w = (size, size) if isinstance(size, int) else size
    keep = torch.rand(1, 1, h, w, generator=generator) >= missing
    return keep.float()


class Inpaint(Operator):
    """y = m ⊙ x with a {0,1} mask broadcast over batch/channels (1 = observed)."""

    name = "inpaint"

    def __init__(self, mask: torch.Tensor):
        if mask.dim() == 2:
            mask = mask[None, None]
        if mask.dim() != 4:
            raise ValueError(f"inpaint: mask must be (H, W) or (B|1, C|1, H, W), got shape {tuple(mask.shape)}")
        self.mask = mask.float()

    def check(self, x_shape: Sequence[int]) -> None:
        check_image(self.name, x_shape)
        mh, mw = self.mask.shape[-2:]
        if (mh, mw) != tuple(x_shape[-2:]):
            raise ValueError(f"inpaint: mask is {mh}×{mw} but the image is {x_shape[-2]}×{x_shape[-1]}")
        if self.mask.shape[1] not in (1, x_shape[1]):
            raise ValueError(f"inpaint: mask has {self.mask.shape[1]} channels, image has {x_shape[1]}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(x)

    def pseudo_inverse(self, y: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
        return y * self.mask.to(y)


# ------------------------------------------------------------------------ super-resolution
class Downsample(Operator):
    """y = ↓_s x by ``area`` (block average) or ``bicubic`` (antialiased) interpolation."""

    name = "sr"
    MODES = ("area", "bicubic")

    def __init__(self, scale: int, mode: str = "bicubic"):
        if int(scale) != scale or scale < 1:
            raise ValueError(f"sr: scale must be a positive integer, got {scale}")
        if mode not in self.MODES:
            raise ValueError(f"sr: mode {mode!r} is not one of {self.MODES}")
        self.scale, self.mode = int(scale), mode

    def check(self, x_shape: Sequence[int]) -> None:
        check_image(self.name, x_shape)
        if x_shape[-1] % self.scale or x_shape[-2] % self.scale:
            raise ValueError(f"sr: image size {x_shape[-2]}×{x_shape[-1]} is not divisible by scale {self.scale}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[-2] // self.scale, x.shape[-1] // self.scale)
        if self.mode == "area":
            return F.interpolate(x, size=size, mode="area")
        return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)

    def pseudo_inverse(self, y: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
        return F.interpolate(y, size=tuple(x_shape[-2:]), mode="bicubic", align_corners=False)


# -------------------------------------------------------------------------------- deblur
def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """Isotropic Gaussian blur kernel (size × size, sums to 1)."""
    return anisotropic_kernel(size, sigma, sigma, 0.0)


def anisotropic_kernel(size: int, sigma_x: float, sigma_y: float, angle: float) -> torch.Tensor:
    """Kernel ∝ exp(-½ pᵀ Σ⁻¹ p), Σ = R diag(σx², σy²) Rᵀ, R rotating by ``angle`` degrees."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"blur: kernel size must be odd and positive, got {size}")
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"blur: kernel sigmas must be > 0, got {sigma_x}, {sigma_y}")
    th = math.radians(angle)
    rot = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=torch.float64)
    cov = rot @ torch.diag(torch.tensor([sigma_x**2, sigma_y**2], dtype=torch.float64)) @ rot.T
    r = torch.arange(size, dtype=torch.float64) - size // 2
    p = torch.stack(torch.meshgrid(r, r, indexing="xy"), -1)  # (size, size, 2) as (x, y)
    k = torch.exp(-0.5 * torch.einsum("...i,ij,...j->...", p, torch.linalg.inv(cov), p))
    return (k / k.sum()).float()


def parse_kernel(spec: str) -> torch.Tensor:
    """``gauss:SIZE:SIGMA`` or ``aniso:SIZE:SIGMA_X:SIGMA_Y:ANGLE`` → kernel (one-line error otherwise)."""
    parts = spec.split(":")
    builders = {"gauss": (gaussian_kernel, 2), "aniso": (anisotropic_kernel, 4)}
    if parts[0] not in builders or len(parts) - 1 != builders[parts[0]][1]:
        raise ValueError(f"--kernel {spec!r}: use gauss:SIZE:SIGMA or aniso:SIZE:SIGMA_X:SIGMA_Y:ANGLE")
    fn, _ = builders[parts[0]]
    try:
        args = [int(parts[1])] + [float(p) for p in parts[2:]]
    except ValueError:
        raise ValueError(f"--kernel {spec!r}: SIZE must be an integer and the rest numbers") from None
    return fn(*args)


class Blur(Operator):
    """y = k ∗ x per channel, reflect padding (same size out)."""

    name = "deblur"

    def __init__(self, kernel: torch.Tensor):
        if kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
            raise ValueError(f"deblur: kernel must be a square odd-sized 2-D tensor, got shape {tuple(kernel.shape)}")
        self.kernel = kernel

    def check(self, x_shape: Sequence[int]) -> None:
        check_image(self.name, x_shape)
        pad = self.kernel.shape[0] // 2
        if pad >= min(x_shape[-2:]):
            raise ValueError(
                f"deblur: kernel size {self.kernel.shape[0]} is too large for a "
                f"{x_shape[-2]}×{x_shape[-1]} image (reflect padding needs size < 2·H)"
            )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c, pad = x.shape[1], self.kernel.shape[0] // 2
        weight = self.kernel.to(x).flip(0, 1).expand(c, 1, *self.kernel.shape)  # true convolution
        return F.conv2d(F.pad(x, (pad,) * 4, mode="reflect"), weight, groups=c)

    def pseudo_inverse(self, y: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
        return y.clone()


# ---------------------------------------------------------------------------- dense / latent
class MatrixOperator(Operator):
    """y = x Aᵀ on flat states (B, n): the linear-Gaussian known-answer fixture (docs/inverse.md, "Closed forms
    behind the Gaussian tests")."""

    name = "matrix"

    def __init__(self, matrix: torch.Tensor):
        self.matrix = matrix

    def check(self, x_shape: Sequence[int]) -> None:
        if len(x_shape) != 2 or x_shape[1] != self.matrix.shape[1]:
            raise ValueError(
                f"matrix operator: A is {tuple(self.matrix.shape)}, needs states (B, "
                f"{self.matrix.shape[1]}), got {tuple(x_shape)}"
            )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.to(x).T


class LatentOperator(Operator):
    """A∘Dec: the pixel operator applied to decoded latents (CLAMP's ``LatentWrapper``)."""

    linear = False

    def __init__(
        self,
        pixel_op: Operator,
        decode: Callable[[torch.Tensor], torch.Tensor],
        encode: Callable[[torch.Tensor], torch.Tensor],
        image_shape: Sequence[int],
    ):
        self.pixel_op, self.decode, self.encode = pixel_op, decode, encode
        self.image_shape = tuple(image_shape)
        self.name = f"latent {pixel_op.name}"

    def check(self, x_shape: Sequence[int]) -> None:
        self.pixel_op.check((x_shape[0], *self.image_shape[1:]))

    def check_measurement(self, y: torch.Tensor, x_shape: Sequence[int]) -> None:
        self.pixel_op.check_measurement(y, (x_shape[0], *self.image_shape[1:]))

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.pixel_op(self.decode(z))

    def pseudo_inverse(self, y: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.encode(self.pixel_op.pseudo_inverse(y, (y.shape[0], *self.image_shape[1:])))

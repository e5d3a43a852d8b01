"""Forward operators of the inverse problems: values, adjoints through autograd, JVPs, shape errors."""

from __future__ import annotations

import math

import pytest
import torch

from align.inverse import (
    Blur,
    Downsample,
    Inpaint,
    LatentOperator,
    anisotropic_kernel,
    box_mask,
    gaussian_kernel,
    make_problem,
    random_mask,
)
from align.inverse.denoiser import PipelineDenoiser
from align.inverse.operators import MatrixOperator, Operator, linearize, parse_kernel

DT = torch.float64
LINEAR_OPS = {
    "inpaint-box": lambda: Inpaint(box_mask(16, (4, 5, 6, 7))),
    "inpaint-random": lambda: Inpaint(random_mask(16, 0.7, torch.Generator().manual_seed(0))),
    "sr-area": lambda: Downsample(4, "area"),
    "sr-bicubic": lambda: Downsample(2, "bicubic"),
    "blur-gauss": lambda: Blur(gaussian_kernel(5, 1.2)),
    "blur-aniso": lambda: Blur(anisotropic_kernel(7, 0.8, 2.0, 30.0)),
}


@pytest.mark.parametrize("name", sorted(LINEAR_OPS))
def test_linear_operator_vjp_is_the_adjoint_and_jvp_is_the_operator(name):
    op = LINEAR_OPS[name]()
    g = torch.Generator().manual_seed(1)
    x, v = (torch.randn(2, 3, 16, 16, generator=g, dtype=DT) for _ in range(2))
    u = torch.randn(op(x).shape, generator=g, dtype=DT)
    lhs = (op(v) * u).sum()
    rhs = (v * op.vjp(x, u)).sum()  # <A v, u> = <v, Aᵀ u>
    assert float(lhs) == pytest.approx(float(rhs), rel=1e-10)
    torch.testing.assert_close(op.jvp(x, v), op(v))
    torch.testing.assert_close(op(2 * x + v), 2 * op(x) + op(v))  # linearity


def test_area_downsampling_is_the_block_mean():
    x = torch.arange(64, dtype=DT).view(1, 1, 8, 8)
    y = Downsample(2, "area")(x)
    assert y.shape == (1, 1, 4, 4)
    assert float(y[0, 0, 0, 0]) == (0 + 1 + 8 + 9) / 4
    assert float(y[0, 0, 3, 3]) == (54 + 55 + 62 + 63) / 4


def test_blur_keeps_constants_and_kernels_have_the_asked_covariance():
    assert float(gaussian_kernel(9, 1.5).sum()) == pytest.approx(1.0)
    img = torch.full((1, 3, 12, 12), 0.3, dtype=DT)
    torch.testing.assert_close(Blur(anisotropic_kernel(5, 1.0, 2.0, 45.0))(img), img)
    k = anisotropic_kernel(61, 2.0, 4.0, 30.0).double()
    r = torch.arange(61, dtype=DT) - 30
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    cov = torch.tensor([[(k * xx * xx).sum(), (k * xx * yy).sum()], [(k * xx * yy).sum(), (k * yy * yy).sum()]])
    th = math.radians(30.0)
    rot = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=DT)
    want = rot @ torch.diag(torch.tensor([4.0, 16.0], dtype=DT)) @ rot.T
    torch.testing.assert_close(cov, want, atol=2e-3, rtol=1e-3)


def test_masks_hole_where_asked():
    m = box_mask((8, 10), (1, 2, 3, 4))
    assert m.shape == (1, 1, 8, 10) and float(m.sum()) == 80 - 12 and float(m[0, 0, 2, 3]) == 0.0
    r = random_mask(128, 0.7, torch.Generator().manual_seed(0))
    assert abs(1 - float(r.mean()) - 0.7) < 4 * math.sqrt(0.7 * 0.3 / 128**2)


def test_latent_operator_jvp_by_double_vjp_matches_finite_differences(tiny_unet_pipe):
    den = PipelineDenoiser(tiny_unet_pipe)
    op = LatentOperator(Downsample(2, "area"), den.decode, den.encode, den.image_shape(1))
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(den.state_shape(1), generator=g), torch.randn(den.state_shape(1), generator=g)
    out, vjp, jvp = linearize(op, z)
    h = 1e-3
    fd = (op(z + h * v) - op(z - h * v)) / (2 * h)
    torch.testing.assert_close(jvp(v), fd, atol=2e-3, rtol=2e-2)
    u = torch.randn(out.shape, generator=g)
    assert float((jvp(v) * u).sum()) == pytest.approx(float((v * vjp(u)).sum()), rel=1e-4)
    assert not op.linear and op.jvp(z, v).shape == out.shape


# ----------------------------------------------------------------------------- bad input
def test_mask_of_the_wrong_size_fails_before_any_denoiser_call(tiny_unet_pipe):
    calls = []
    tiny_unet_pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    img = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"inpaint: mask is 8×8 but the image is 16×16"):
        make_problem(tiny_unet_pipe, Inpaint(box_mask(8, (0, 0, 2, 2))), img, 0.05)
    with pytest.raises(ValueError, match="not divisible by scale 3"):
        make_problem(tiny_unet_pipe, Downsample(3), torch.zeros(1, 3, 5, 5), 0.05)
    with pytest.raises(ValueError, match=r"sr: measurement y has shape \(3, 4, 4\)"):
        make_problem(tiny_unet_pipe, Downsample(2), torch.zeros(1, 3, 4, 4), 0.05)
    assert calls == []


def test_backbone_without_vae_is_refused_for_latent_solvers(tiny_unet_pipe):
    tiny_unet_pipe.vae = None
    with pytest.raises(ValueError, match="need a backbone with a VAE"):
        make_problem(tiny_unet_pipe, Downsample(2), torch.zeros(1, 3, 8, 8), 0.05)


@pytest.mark.parametrize(
    "spec,msg",
    [
        ("box:3", "use gauss:SIZE:SIGMA"),
        ("gauss:4:1.0", "odd"),
        ("aniso:5:1:x:0", "SIZE must be an integer"),
        ("aniso:5:0:1:0", "> 0"),
    ],
)
def test_bad_kernel_specs_are_one_line_errors(spec, msg):
    with pytest.raises(ValueError, match=msg):
        parse_kernel(spec)


def test_parsed_anisotropic_kernel_matches_the_builder():
    torch.testing.assert_close(parse_kernel("aniso:9:1.0:3.0:45"), anisotropic_kernel(9, 1.0, 3.0, 45.0))


# ------------------------------------------------------------------ protocols: denoisers, flat operators
class _FlatSum(Operator):
    """A user operator on flat vectors that does not override ``check``: y = [Σ x, x_0]."""

    name = "flat sum"

    def __call__(self, x):
        return torch.stack([x.sum(1), x[:, 0]], 1)


def test_an_operator_on_flat_vectors_needs_no_check_override():
    from align.inverse import GaussianDenoiser, make_problem

    den = GaussianDenoiser(torch.zeros(5), torch.eye(5))
    problem = make_problem(den, _FlatSum(), torch.zeros(3, 2), 0.1)
    assert problem.state_shape() == (3, 5)
    with pytest.raises(ValueError, match=r"flat sum: measurement y has shape \(3,\) per sample, but A maps"):
        make_problem(den, _FlatSum(), torch.zeros(3, 3), 0.1)
    with pytest.raises(ValueError, match=r"matrix operator: A is \(2, 4\), needs states \(B, 4\)"):
        make_problem(den, MatrixOperator(torch.zeros(2, 4)), torch.zeros(3, 2), 0.1)


def test_an_image_operator_still_requires_images():
    with pytest.raises(ValueError, match=r"inpaint: expects images \(B, C, H, W\), got shape \(2, 16\)"):
        Inpaint(torch.ones(4, 4)).check((2, 16))


class _NotADenoiser:
    """Callable like a denoiser but without the rest of the protocol."""

    sigma_min, sigma_max = 0.01, 10.0

    def __call__(self, z, s):
        return z


def test_a_model_that_is_neither_pipeline_nor_denoiser_is_told_what_it_lacks():
    from align.inverse import CLAMP

    with pytest.raises(
        TypeError,
        match=r"model _NotADenoiser is neither a diffusers pipeline nor a denoiser: "
        r"missing state_shape, schedule, clip_sigma, calls",
    ):
        CLAMP(_NotADenoiser(), MatrixOperator(torch.eye(2)), torch.zeros(1, 2), 0.1)


def test_a_duck_typed_denoiser_with_the_whole_protocol_is_accepted():
    from align.inverse import CLAMP, GaussianDenoiser

    ref = GaussianDenoiser(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))

    class Duck(_NotADenoiser):
        calls = {"forward": 0, "vjp": 0}
        sigma_min, sigma_max = ref.sigma_min, ref.sigma_max
        __call__ = staticmethod(lambda z, s: ref(z, s))
        state_shape = staticmethod(ref.state_shape)
        schedule = staticmethod(ref.schedule)
        clip_sigma = staticmethod(ref.clip_sigma)

    y = torch.ones(3, 2, dtype=torch.float64)
    got = CLAMP(Duck(), MatrixOperator(torch.eye(2, dtype=torch.float64)), y, 0.1, steps=3).sample(
        torch.Generator().manual_seed(0)
    )
    want = CLAMP(ref, MatrixOperator(torch.eye(2, dtype=torch.float64)), y, 0.1, steps=3).sample(
        torch.Generator().manual_seed(0)
    )
    assert torch.equal(got, want)

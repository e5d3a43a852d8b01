"""The VE denoiser view of real diffusers pipelines (docs/inverse.md, "Parts" and "Closed forms behind the
Gaussian tests") and the latent solvers on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from align.inverse import CLAMP, DPS, Inpaint, MapRPS, Stage1Config, box_mask
from align.inverse.denoiser import PipelineDenoiser


class FakeGaussianNet(torch.nn.Module):
    """A fake denoiser module with the UNet / SD3-transformer call signature whose output is the
    exact ε / v of a unit-variance Gaussian prior N(μ(e), I) with μ(e) = W · mean-token(e), constant
    over space. For the UNet, ᾱ at a (continuous) timestep t comes from the scheduler's table by
    log-sigma interpolation (exactly the table at integer t)."""

    def __init__(self, real: torch.nn.Module, kind: str, alphas_cumprod=None, prediction_type="epsilon"):
        super().__init__()
        self.config, self.kind, self.prediction_type = real.config, kind, prediction_type
        dim = real.config.cross_attention_dim if kind == "unet" else real.config.joint_attention_dim
        self.weight = torch.nn.Parameter(
            torch.randn(real.config.in_channels, dim, generator=torch.Generator().manual_seed(0)) / dim**0.5
        )
        if alphas_cumprod is not None:
            self.log_sigmas = (((1 - alphas_cumprod) / alphas_cumprod).sqrt().log()).double().numpy()

    @property
    def dtype(self):
        return self.weight.dtype

    @property
    def device(self):
        return self.weight.device

    def mean(self, embeds: torch.Tensor) -> torch.Tensor:
        return (embeds.mean(1) @ self.weight.T)[:, :, None, None]

    def forward(
        self,
        sample=None,
        timestep=None,
        encoder_hidden_states=None,
        hidden_states=None,
        pooled_projections=None,
        return_dict=False,
        **_,
    ):
        mu = self.mean(encoder_hidden_states)
        if self.kind == "unet":
            t = float(timestep)
            s = float(np.exp(np.interp(t, np.arange(len(self.log_sigmas)), self.log_sigmas)))
            a = 1 / (1 + s * s)
            eps = (1 - a) ** 0.5 * (sample - a**0.5 * mu)
            if self.prediction_type == "v_prediction":
                x0 = (sample - (1 - a) ** 0.5 * eps) / a**0.5
                return (a**0.5 * eps - (1 - a) ** 0.5 * x0,)
            return (eps,)
        t = float(timestep.flatten()[0]) / 1000
        z, s = hidden_states / (1 - t), t / (1 - t)
        d = mu + (z - mu) / (1 + s * s)
        return ((hidden_states - (1 - t) * d) / t - d,)


def _fake(pipe, kind, prediction_type="epsilon"):
    if kind == "unet":
        pipe.unet = FakeGaussianNet(pipe.unet, "unet", pipe.scheduler.alphas_cumprod, prediction_type)
        return pipe.unet
    pipe.transformer = FakeGaussianNet(pipe.transformer, "dit")
    return pipe.transformer


@pytest.mark.parametrize("which", ["eps", "v", "flow"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_pipeline_denoiser_is_exact_for_a_gaussian_prior(
    which, guidance, tiny_unet_pipe, tiny_unet_vpred_pipe, tiny_dit_pipe
):
    """The exact Gaussian denoiser: D(z, s) = μ + (z − μ)/(1 + s²) for N(μ, I); with CFG μ = μ_u + w (μ_c − μ_u)."""
    pipe = {"eps": tiny_unet_pipe, "v": tiny_unet_vpred_pipe, "flow": tiny_dit_pipe}[which]
    net = _fake(pipe, "dit" if which == "flow" else "unet", "v_prediction" if which == "v" else "epsilon")
    den = PipelineDenoiser(pipe, prompt="one red circle on the left", guidance_scale=guidance)
    e = den.embeds
    mu = net.mean(e["prompt_embeds"])
    if guidance > 1:
        mu_u = net.mean(e["negative_prompt_embeds"])
        mu = mu_u + guidance * (mu - mu_u)
    z = torch.randn(den.state_shape(2), generator=torch.Generator().manual_seed(1))
    for s in (0.05, 0.7, 3.0, 9.0):
        with torch.no_grad():
            got = den(z * (1 + s), s)
        torch.testing.assert_close(got, mu + (z * (1 + s) - mu) / (1 + s * s), atol=2e-5, rtol=2e-5)


def test_pipeline_denoiser_equals_ddim_pred_original_sample_at_scheduler_timesteps(tiny_unet_pipe):
    """At an integer timestep the VE view gives diffusers' own x̂0 (DDIMScheduler.step)."""
    pipe = tiny_unet_pipe
    den = PipelineDenoiser(pipe, prompt="two blue squares on the top")
    pipe.scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    from align.sampling import predict

    for t in pipe.scheduler.timesteps[[0, 4, 9]]:
        a = float(pipe.scheduler.alphas_cumprod[t])
        x_t = torch.randn(den.state_shape(1), generator=g)
        s = ((1 - a) / a) ** 0.5
        assert den.timestep(s) == pytest.approx(float(t), abs=1e-6)
        with torch.no_grad():
            out = predict(pipe, x_t, t, den._embeds(1), 1.0)
            ref = pipe.scheduler.step(out, t, x_t).pred_original_sample
            got = den(x_t / a**0.5, s)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["tiny_unet_pipe", "tiny_dit_pipe"])
def test_latent_solvers_run_on_unet_and_dit_and_the_knob_endpoints_hold(kind, request):
    pipe = request.getfixturevalue(kind)
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    op = Inpaint(box_mask(16, (4, 4, 8, 8)))
    y = op(img)
    stage1 = Stage1Config(anneal_iters=2, final_iters=2, prox_iters=3)
    kw = dict(steps=3, gmres_iters=2)
    x_hat = MapRPS(pipe, op, y, 0.05, renoise=0.0, stage1=stage1, stage2_kwargs=kw).stage1()
    r0 = MapRPS(pipe, op, y, 0.05, renoise=0.0, stage1=stage1, stage2_kwargs=kw)
    assert torch.equal(r0.sample(torch.Generator().manual_seed(0)), x_hat)
    r1 = MapRPS(pipe, op, y, 0.05, renoise=1.0, stage1=stage1, stage2_kwargs=kw)
    plain = CLAMP(pipe, op, y, 0.05, **kw)
    assert torch.equal(r1.sample(torch.Generator().manual_seed(3)), plain.sample(torch.Generator().manual_seed(3)))
    mid = MapRPS(pipe, op, y, 0.05, renoise=0.5, stage1=stage1, stage2_kwargs=kw, stage2="clamp")
    out = mid(torch.Generator().manual_seed(1))
    assert out.shape == img.shape and torch.isfinite(out).all()
    calls = mid.problem.denoiser.calls
    assert calls["forward"] == 4 + 2 and calls["vjp"] == 2 * (2 + 1)  # stage 1 + 2 CLAMP steps × (K + 1)
    dps = DPS(pipe, op, y, None, steps=3, scale=0.5)
    out = dps(torch.Generator().manual_seed(1))
    assert (
        out.shape == img.shape and torch.isfinite(out).all() and dps.problem.denoiser.calls == {"forward": 3, "vjp": 3}
    )


def test_gradient_checkpointing_is_turned_off_for_the_solvers(tiny_unet_pipe):
    tiny_unet_pipe.unet.enable_gradient_checkpointing()
    with pytest.warns(UserWarning, match="gradient checkpointing turned off"):
        PipelineDenoiser(tiny_unet_pipe)
    assert not tiny_unet_pipe.unet.is_gradient_checkpointing


def test_clamp_uses_the_pixel_preset_for_denoisers_and_the_latent_preset_for_pipelines(tiny_unet_pipe):
    """CLAMP's presets (docs/inverse.md, "Parts"): pixel linear tasks 50 steps, K = 5, σ_max = 100; latent
    25 steps, K = 20, σ_max = 10."""
    from align.inverse import GaussianDenoiser, MatrixOperator

    pix = CLAMP(GaussianDenoiser(torch.zeros(2), torch.eye(2)), MatrixOperator(torch.eye(2)), torch.zeros(1, 2), 0.1)
    assert (pix.config.steps, pix.config.gmres_iters, pix.config.sigma_max) == (50, 5, 100.0)
    assert float(pix.grid[0]) == pytest.approx(100.0) and len(pix.grid) == 51
    lat = CLAMP(tiny_unet_pipe, Inpaint(box_mask(16, (0, 0, 4, 4))), torch.zeros(1, 3, 16, 16), 0.05)
    assert (lat.config.steps, lat.config.gmres_iters, lat.config.sigma_max) == (25, 20, 10.0)
    assert (lat.config.lam_id, lat.config.sigma_n, lat.config.beta) == (2.0, 0.05, 1.0)  # σ_n = σ_y by default
    assert (
        CLAMP(
            tiny_unet_pipe, Inpaint(box_mask(16, (0, 0, 4, 4))), torch.zeros(1, 3, 16, 16), 0.05, sigma_n=0.01
        ).config.sigma_n
        == 0.01
    )  # the repo's preset value, on request

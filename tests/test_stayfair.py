"""StayFair known answers (docs/modifiers.md, "StayFair"): Gaussian toy, 3-branch identities (those stated in
StayFair's reference code, ``fair_cfg_pipeline.py``), linear-logit classifier guidance, embedding arithmetic;
the lookup table; bias metrics."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from align.modifiers.fairness_metrics import (
    bias_decomposition,
    bias_range,
    fairness_discrepancy,
    get_group_classifier,
    group_ratio,
    kl_to_uniform,
)
from align.modifiers.stayfair import StayFair, fair_cfg, frobenius_unit, group_direction, offset_null, per_token_unit
from align.modifiers.stayfair_estimate import (
    Reference,
    apply_lookup,
    build_lookup,
    search_alpha,
    train_fair_logistic,
    w1_dp_penalty,
)
from align.sampling import cfg_combine, encode_prompts

SWEEP = (1.5, 3.0, 4.5, 6.0, 7.5)


# -------------------------------------------------------------------------- the Gaussian toy
class GaussianToy:
    """x0 ~ N(W e, I) in 2-D, exact ε: ε(x_t, e) = √(1−ᾱ)(x_t − √ᾱ W e); DDIM (η = 0) with
    diffusers' own step over 30 steps of a linear-β schedule ("leading" spacing: each step lands on the
    next listed timestep, so the DDIM contraction of :attr:`contraction` applies exactly); group = sign(x_1)."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.W = torch.tensor(rng.normal(size=(2, 5)))
        self.e_c, self.e_null = torch.tensor(rng.normal(size=5)), torch.tensor(rng.normal(size=5))
        u = torch.tensor(rng.normal(size=5))
        self.u = u / u.norm()
        self.sched = DDIMScheduler(
            beta_start=1e-4,
            beta_end=0.02,
            beta_schedule="linear",
            set_alpha_to_one=True,
            clip_sample=False,
            timestep_spacing="leading",
        )
        self.sched.set_timesteps(30)

    def eps(self, x: torch.Tensor, t: int, e: torch.Tensor) -> torch.Tensor:
        ab = self.sched.alphas_cumprod[t].double()
        return (1 - ab).sqrt() * (x - ab.sqrt() * (self.W @ e))

    def sample(self, w: float, alpha: float, seed: int, n: int = 20000) -> torch.Tensor:
        x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        null = offset_null(self.e_null.unsqueeze(0), self.u.unsqueeze(0), torch.tensor([alpha]))[0]
        for t in self.sched.timesteps:
            out = cfg_combine(self.eps(x, int(t), null), self.eps(x, int(t), self.e_c), w)
            x = self.sched.step(out, t, x, eta=0.0).prev_sample
        return x

    def ratios(self, alpha: float, seeds, sweep=SWEEP) -> dict[float, float]:
        return {w: float((self.sample(w, alpha, s)[:, 0] > 0).double().mean()) for w, s in zip(sweep, seeds)}

    @property
    def alpha_star(self) -> float:
        """Null offset giving the null branch the conditional branch's group mean: (W e_c − W e_null)_1/(W u)_1."""
        return float(((self.W @ self.e_c)[0] - (self.W @ self.e_null)[0]) / (self.W @ self.u)[0])

    @property
    def contraction(self) -> float:
        """Finite-step DDIM on unit-variance Gaussian data with exact ε is not marginal-exact: one DDIM step
        multiplies the centred state by cos(θ' − θ), ᾱ = cos²θ; s = Π cos Δθ."""
        ab = [float(self.sched.alphas_cumprod[int(t)]) for t in self.sched.timesteps] + [1.0]
        theta = np.arccos(np.sqrt(ab))
        return float(np.prod(np.cos(np.diff(theta))))


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_gaussian_toy_stayfair_keeps_the_group_ratio_across_guidance_scales() -> None:
    toy, n = GaussianToy(), 20000
    cfg = toy.ratios(0.0, seeds=range(5))
    fair = toy.ratios(toy.alpha_star, seeds=range(10, 15))
    predicted = _phi(float((toy.W @ toy.e_c)[0]) / toy.contraction)
    se = math.sqrt(predicted * (1 - predicted) / n)
    assert bias_range(cfg) > 10.0, f"plain CFG should drift with w: {cfg}"
    assert bias_range(fair) < 100 * 6 * math.sqrt(2) * se, f"StayFair ratios {fair}"  # range of 5 draws ≪ 6√2 σ
    for r in fair.values():
        assert abs(r - predicted) < 4 * se, (r, predicted)


def test_gaussian_toy_one_dimensional_search_recovers_alpha_star() -> None:
    """Objective: bias range over w ∈ {1} ∪ sweep. w = 1 (no guidance) anchors it at the model's own
    ratio; over the sweep alone, |α| large enough to push every ratio to 0 (or 1) is a degenerate minimum."""
    toy, n = GaussianToy(), 20000
    sweep = (1.0, *SWEEP)
    seeds = [7] * len(sweep)  # common random numbers across w and α
    found = search_alpha(lambda a: bias_range(toy.ratios(a, seeds, sweep)), -10.0, 10.0, points=21, rounds=3)
    mu = float((toy.W @ toy.e_c)[0])
    sensitivity = (
        math.exp(-((mu / toy.contraction) ** 2) / 2)
        / math.sqrt(2 * math.pi)
        / toy.contraction
        * (sweep[-1] - sweep[0])
        * abs(float((toy.W @ toy.u)[0]))
    )  # d(bias range)/dα, fraction per unit α
    tol = 0.01 + 2.0 / (n * sensitivity)  # last grid step + two counts of quantisation
    assert abs(found - toy.alpha_star) < tol, (found, toy.alpha_star, tol)


# ------------------------------------------------------------------------ 3-branch identities
def test_fair_cfg_at_w_fair_is_stock_cfg_bit_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    pos, neg, null = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    assert torch.equal(fair_cfg(pos, neg, null, 7.5, 7.5), cfg_combine(null, pos, 7.5))


def test_fair_cfg_with_zero_offset_is_stock_cfg_and_equals_the_shifted_null_view() -> None:
    g = torch.Generator().manual_seed(1)
    pos, neg, null = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for w in (1.5, 4.0, 9.0):
        torch.testing.assert_close(fair_cfg(pos, null, null, w, 7.5), cfg_combine(null, pos, w), rtol=0, atol=1e-12)
        a = (w - 7.5) / (w - 1)  # CFG with null → null + a (neg − null)
        torch.testing.assert_close(
            fair_cfg(pos, neg, null, w, 7.5), cfg_combine(null + a * (neg - null), pos, w), rtol=0, atol=1e-12
        )


def test_three_branch_stayfair_at_alpha_zero_is_the_stock_sampler_bit_for_bit(tiny_unet_pipe) -> None:
    import dataclasses

    from align.sampling import SamplerConfig, sample_trajectory

    cfg = SamplerConfig(num_inference_steps=3, guidance_scale=3.0, output_type="latent")
    stock = sample_trajectory(tiny_unet_pipe, ["a red circle"], cfg, torch.Generator().manual_seed(0))
    mod = sample_trajectory(
        tiny_unet_pipe,
        ["a red circle"],
        dataclasses.replace(cfg, modifiers=["stayfair:{alpha:0,w_fair:2.5,words:[red,blue]}"]),
        torch.Generator().manual_seed(0),
    )
    assert torch.equal(stock.latents, mod.latents) and torch.equal(stock.log_probs, mod.log_probs)


# -------------------------------------------------------------- linear-logit classifier guidance
def _log_ratio_closed_form(w, pi, mus, sigs, a):
    return math.log(pi[0] / pi[1]) + w * float(a @ (mus[0] - mus[1])) + w**2 / 2 * float(a @ (sigs[0] - sigs[1]) @ a)


def test_linear_logit_guidance_log_ratio_matches_closed_form_by_importance_weighting() -> None:
    """p_w(x) ∝ p(x) e^{w f(x)}, f = aᵀx + b, groups N(μ_g, Σ_g):
    log P_w(1)/P_w(2) = log π1/π2 + w aᵀ(μ1−μ2) + w²/2 aᵀ(Σ1−Σ2)a."""
    g = torch.Generator().manual_seed(0)
    pi = (0.3, 0.7)
    mus = (torch.tensor([0.5, -0.2], dtype=torch.float64), torch.tensor([-0.3, 0.4], dtype=torch.float64))
    sigs = (torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64), torch.eye(2, dtype=torch.float64) * 0.6)
    a = torch.tensor([0.4, -0.3], dtype=torch.float64)
    n = 400000
    xs = [torch.distributions.MultivariateNormal(m, s).sample((n,)) for m, s in zip(mus, sigs)]
    for w in (0.5, 1.0, 2.0):
        weights = [p * torch.exp(w * (x @ a)) for p, x in zip(pi, xs)]  # b cancels in the ratio
        mc = math.log(float(weights[0].mean() / weights[1].mean()))
        # delta-method MC error of log E[e^{w f}] per group
        se = math.sqrt(sum(float(wt.var() / wt.mean() ** 2) / n for wt in weights))
        assert abs(mc - _log_ratio_closed_form(w, pi, mus, sigs, a)) < 5 * se + 1e-9
    del g


def test_wasserstein_dp_classifier_removes_guidance_bias() -> None:
    """Train logistic f on labels that correlate with the group; the W1-DP-regularised classifier has
    aᵀ(μ1−μ2) ≈ 0 and aᵀΣ1a ≈ aᵀΣ2a, so its guided log-ratio barely moves with w, unlike the plain one."""
    g = torch.Generator().manual_seed(0)
    n = 2000
    groups = (torch.rand(n, generator=g) < 0.5).long()
    mu = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)
    x = mu[groups] + torch.randn(n, 3, generator=g, dtype=torch.float64)
    logits = 1.5 * x[:, 0] + 2.0 * x[:, 1]
    y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(logits)).double()
    sig = torch.eye(3, dtype=torch.float64)

    def guidance_bias(a: torch.Tensor) -> float:  # |log-ratio(w=5) − log-ratio(w=0)| from the closed form
        return abs(_log_ratio_closed_form(5.0, (0.5, 0.5), mu, (sig, sig), a) - math.log(1.0))

    a_plain, _ = train_fair_logistic(x, y, groups, lam=0.0, steps=400)
    a_fair, _ = train_fair_logistic(x, y, groups, lam=1.0, steps=400)
    assert guidance_bias(a_plain) > 5.0
    assert guidance_bias(a_fair) < 0.2 * guidance_bias(a_plain)
    assert abs(float(a_fair[1])) > 0.5, "the fair classifier must keep the group-independent signal"


def test_w1_penalty_is_the_quantile_distance() -> None:
    s = torch.tensor([0.0, 1.0, 2.0, 10.0, 11.0, 12.0])
    assert float(w1_dp_penalty(s, torch.tensor([0, 0, 0, 1, 1, 1]))) == pytest.approx(10.0)
    # interleaved: sorted {0, 2, 12} vs {1, 10, 11} → mean(|0−1|, |2−10|, |12−11|) = 10/3
    assert float(w1_dp_penalty(s, torch.tensor([0, 1, 0, 1, 1, 0]))) == pytest.approx(10.0 / 3)


# ------------------------------------------------------------------- embedding arithmetic
def test_unet_direction_is_unit_per_token_and_zero_offset_is_the_empty_prompt(tiny_unet_pipe) -> None:
    gd = group_direction(tiny_unet_pipe, ("red", "blue"), "auto")
    norms = gd.u.norm(dim=-1)
    moved = norms > 1e-3  # tokens identical in both prompts have d = 0 (u = 0 there)
    torch.testing.assert_close(norms[moved], torch.ones_like(norms[moved]), rtol=1e-5, atol=1e-5)
    empty = encode_prompts(tiny_unet_pipe, ["x"], "", guidance_scale=3.0)["negative_prompt_embeds"]
    assert torch.equal(offset_null(gd.base, gd.u, torch.tensor([0.0])), empty)


def test_sd3_direction_is_frobenius_unit_with_a_filler_base(tiny_dit_pipe) -> None:
    gd = group_direction(tiny_dit_pipe, ("red", "blue"), "auto")
    assert float(gd.u.flatten(1).norm()) == pytest.approx(1.0, rel=1e-5)
    seq_len = gd.u.shape[1]
    assert float(gd.pooled_u.norm()) == pytest.approx(1 / math.sqrt(seq_len), rel=1e-5)
    # filler base = the encoders on [BOS, EOT, pad…] (EOT in the word's slot). Real SD3's CLIP-G pads with
    # "!" and T5 with <pad>, so there it differs from E(""); the tiny preset's tokenizers pad with EOT,
    # so here the two coincide — α = 0 is still not declared an identity (it is not, for SD3 proper).
    eot = tiny_dit_pipe.tokenizer.eos_token
    assert tiny_dit_pipe.tokenizer(eot).input_ids[1] == tiny_dit_pipe.tokenizer.eos_token_id
    filler = tiny_dit_pipe.encode_prompt(eot, eot, eot, do_classifier_free_guidance=False)
    assert torch.equal(gd.base, filler[0]) and torch.equal(gd.pooled_base, filler[2])
    stock = encode_prompts(tiny_dit_pipe, ["x"], "", guidance_scale=3.0)["negative_prompt_embeds"]
    empty = group_direction(tiny_dit_pipe, ("red", "blue"), "empty")
    assert torch.equal(empty.base, stock)
    assert StayFair(alpha=0.0).is_identity(tiny_dit_pipe) is False
    assert StayFair(alpha=0.0, base="empty").is_identity(tiny_dit_pipe) is True


def test_sdxl_direction_is_the_pooled_kind_and_its_empty_base_is_the_stock_null(tiny_sdxl_pipe) -> None:
    """SDXL has a pooled embedding, so it takes the SD3 form (Frobenius u, pooled u/√L); its stock null for an
    empty negative prompt is zeros (``force_zeros_for_empty_prompt``), so ``base=empty`` at α = 0 is stock CFG."""
    from align.sampling import SamplerConfig, sample_trajectory

    gd = group_direction(tiny_sdxl_pipe, ("red", "blue"), "auto")
    assert float(gd.u.flatten(1).norm()) == pytest.approx(1.0, rel=1e-5)
    assert float(gd.pooled_u.norm()) == pytest.approx(1 / math.sqrt(gd.u.shape[1]), rel=1e-5)
    stock = encode_prompts(tiny_sdxl_pipe, ["x"], "", guidance_scale=3.0)
    empty = group_direction(tiny_sdxl_pipe, ("red", "blue"), "empty")
    assert torch.equal(empty.base, stock["negative_prompt_embeds"]) and not empty.base.any()
    assert torch.equal(empty.pooled_base, stock["negative_pooled_prompt_embeds"])
    cfg = SamplerConfig(num_inference_steps=3, guidance_scale=3.0, output_type="latent")
    plain = sample_trajectory(tiny_sdxl_pipe, ["a red circle"], cfg, torch.Generator().manual_seed(0))
    offset = dataclasses.replace(cfg, modifiers=["stayfair:{alpha:2,base:empty,words:[red,blue]}"])
    moved = sample_trajectory(tiny_sdxl_pipe, ["a red circle"], offset, torch.Generator().manual_seed(0))
    assert not torch.allclose(plain.latents[:, -1], moved.latents[:, -1])
    assert StayFair(alpha=0.0, base="empty").is_identity(tiny_sdxl_pipe) is True


def test_normalisers() -> None:
    d = torch.randn(2, 7, 5)
    torch.testing.assert_close(per_token_unit(d, eps=0).norm(dim=-1), torch.ones(2, 7))
    torch.testing.assert_close(frobenius_unit(d).flatten(1).norm(dim=1), torch.ones(2))


# ------------------------------------------------------------------------ lookup and metrics
def test_lookup_picks_the_alpha_that_reduces_bias_range_most_among_near_references() -> None:
    """References below the diagonal (ratio grows with w) are fixed by α = −5, above it by α = 5;
    the table must reproduce that split and give 0 where no α helps (on the diagonal)."""
    refs = []
    for lo in np.linspace(0, 1, 11):
        for hi in np.linspace(0, 1, 11):
            drift = 100 * abs(hi - lo)
            helps = {-5.0: drift * 0.2, 5.0: drift * 1.5} if hi > lo else {-5.0: drift * 1.5, 5.0: drift * 0.2}
            if hi == lo:
                helps = {-5.0: 3.0, 5.0: 3.0}
            refs.append(Reference(lo, hi, {0.0: drift, **helps}))
    table = build_lookup(refs, [0.0, -5.0, 5.0], n_probe=5, k=5, min_neighbours=3)
    assert apply_lookup(table, 0, 5) == -5.0 and apply_lookup(table, 5, 0) == 5.0
    assert apply_lookup(table, 2, 2) == 0.0
    with pytest.raises(ValueError, match="outside"):
        apply_lookup(table, 6, 0)


def test_bias_metrics_known_values() -> None:
    assert bias_range({1.5: 0.2, 3.0: 0.35, 7.5: 0.3}) == pytest.approx(15.0)
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert group_ratio(probs, 0) == 0.75
    assert fairness_discrepancy(probs) == pytest.approx(math.sqrt(2) * 0.25)
    assert kl_to_uniform(torch.full((3, 2), 0.5)) == pytest.approx(0.0, abs=1e-9)
    dec = bias_decomposition({1.0: 0.4, 7.5: 0.6}, target=0.5)
    assert dec["model"] == pytest.approx(-0.1) and dec["guidance"][7.5] == pytest.approx(0.2)


def test_toy_color_classifier_reads_rendered_scenes() -> None:
    from align.toy.world import parse_scene, render_batch

    classify, groups = get_group_classifier("toy_color")
    scenes = [parse_scene(f"a {c} circle") for c in groups]
    probs = classify(render_batch(scenes, seed=0))
    assert probs.argmax(1).tolist() == list(range(len(groups)))
    assert torch.equal(classify(torch.zeros(1, 3, 32, 32)), torch.full((1, len(groups)), 1 / len(groups)))
    with pytest.raises(ValueError, match="valid: toy_color"):
        get_group_classifier("gender")


def test_estimated_alpha_table_drives_per_prompt_offsets(tiny_unet_pipe, tmp_path) -> None:
    """Probe counts → lookup α per prompt → ``alpha_table`` JSON → null′ = null + α(p) u per sample."""
    from align.modifiers.stayfair_estimate import estimate_alpha_table
    from align.sampling import SamplerConfig, sample_trajectory

    table = np.arange(9, dtype=float).reshape(3, 3) - 4.0  # α = 3·#lo + #hi − 4 for n = 2 probes
    classify = lambda images: torch.stack([images.mean((1, 2, 3)) > 0.5, images.mean((1, 2, 3)) <= 0.5], 1).float()  # noqa: E731
    prompts = ["two red circles on the left", "one blue square on the top"]
    sampler = SamplerConfig(num_inference_steps=2, guidance_scale=3.0)
    alphas = estimate_alpha_table(
        tiny_unet_pipe,
        prompts,
        table,
        classify,
        group=1,
        scales=(1.5, 7.5),
        sampler=sampler,
        out=tmp_path / "alpha.json",
    )
    assert set(alphas) == set(prompts) and all(a in table for a in alphas.values())
    spec = {"stayfair": {"alpha_table": str(tmp_path / "alpha.json"), "words": ["red", "blue"]}}
    cfg = SamplerConfig(num_inference_steps=2, guidance_scale=3.0, output_type="latent")
    stock = sample_trajectory(tiny_unet_pipe, prompts, cfg, torch.Generator().manual_seed(0))
    mod = sample_trajectory(
        tiny_unet_pipe,
        prompts,
        SamplerConfig(**{**cfg.__dict__, "modifiers": [spec]}),
        torch.Generator().manual_seed(0),
    )
    u = group_direction(tiny_unet_pipe, ("red", "blue"), "auto").u[0]
    for i, p in enumerate(prompts):
        torch.testing.assert_close(
            mod.negative_prompt_embeds[i] - stock.negative_prompt_embeds[i], alphas[p] * u, rtol=1e-5, atol=1e-5
        )

"""Critic steering at inference: grad (known step shift; s = 0 is bit-identical), rerank, best-of-N,
steering as a modifier (equal to a step-by-step reference loop; combined with StayFair and symmetric
attention), and `align sample --critic DIR --steer ...` for the UNet and the DiT backbone."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from test_export import export, trained_like  # tests/ is on sys.path (pytest rootdir conftest)

import critics
from align.backbones import build_pipeline
from align.cli import main
from align.modifiers import Modifier, ModifierStack
from align.modifiers.protocol import build_modifiers, canonical_specs
from align.sampling import (
    TRANSITIONS,
    SamplerConfig,
    encode_prompts,
    initial_latents,
    predict,
    sample_trajectory,
    set_schedule,
    take_step,
    transition_for,
)
from critics.steering import SteeringConfig, sample_steered

PROMPTS = ["two red circles on the left", "one blue square on the top", "three green triangles on the bottom"]
PRESETS = ["tiny-unet", "tiny-dit"]
FP32_TOL = 1e-5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Exported critics (separate adapter) for both tiny backbones, keyed by preset."""
    out = {}
    for preset in PRESETS:
        pipe, critic = trained_like(preset)
        out[preset] = export(pipe, critic, tmp_path_factory.mktemp(preset) / "export", preset) / "critic"
    return out


def _loaded(preset: str, exported):
    pipe = build_pipeline(f"preset:{preset}")
    return pipe, critics.load(exported[preset], pipe)


def _steer(pipe, critic, steer: str, seed: int = 0, num_steps: int = 3, modifiers: tuple = (), **kw):
    cfg = SteeringConfig(critic="x", steer=steer, **kw)
    return sample_steered(
        pipe,
        PROMPTS,
        SamplerConfig(num_inference_steps=num_steps, modifiers=list(modifiers)),
        torch.Generator().manual_seed(seed),
        critic,
        cfg,
        candidate_generator=torch.Generator().manual_seed(99),
    )


@dataclasses.dataclass
class _Probe(Modifier):
    """Records each step's (mean, std) as the transition hooks before it left them."""

    name = "probe"

    def __post_init__(self) -> None:
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def transition(self, pipe):
        def record(mean, std, ctx):
            self.seen.setdefault(ctx.step_index, (mean.clone(), std))
            return mean, std

        return record


def _cond(traj) -> dict:
    return {k: traj.__dict__[k] for k in ("prompt_embeds", "pooled_prompt_embeds")}


@pytest.mark.parametrize("preset", PRESETS)
def test_grad_steering_with_scale_zero_is_bit_identical_to_unsteered_sampling(preset: str, exported) -> None:
    pipe, critic = _loaded(preset, exported)
    plain = _steer(pipe, critic, "none")
    zero = _steer(pipe, critic, "grad", scale=0.0)
    assert zero.critic_rows == 3 * len(PROMPTS)  # the gradient was computed at every step, and added with s = 0
    for f in ("latents", "log_probs", "images"):
        assert torch.equal(getattr(plain.traj, f), getattr(zero.traj, f)), f
    assert torch.equal(plain.values, zero.values)


@pytest.mark.parametrize("preset", PRESETS)
def test_grad_steering_shifts_the_step_mean_by_scale_times_the_value_gradient_at_x_t(preset: str, exported) -> None:
    pipe, critic = _loaded(preset, exported)
    s = 0.5
    plain = _steer(pipe, critic, "none").traj
    steered = _steer(pipe, critic, "grad", scale=s, steps=[0]).traj
    x_t = plain.latents[:, 0].clone().requires_grad_(True)
    objective = (critic.values(x_t, plain.timesteps[0], _cond(plain)) * critic.weights).sum()
    (grad,) = torch.autograd.grad(objective, x_t)
    assert grad.abs().max() > 0 and torch.equal(steered.latents[:, 0], plain.latents[:, 0])
    # same x_T and the same sampler noise: x_{t-1} differs by exactly s·∇V (up to fp32 round-off)
    torch.testing.assert_close(steered.latents[:, 1] - plain.latents[:, 1], s * grad, atol=FP32_TOL, rtol=1e-4)
    assert not torch.allclose(steered.latents[:, 2], plain.latents[:, 2])


@pytest.mark.parametrize("preset", PRESETS)
def test_rerank_keeps_the_candidate_with_the_highest_weighted_value(preset: str, exported) -> None:
    pipe, critic = _loaded(preset, exported)
    probe = _Probe()
    plain = sample_trajectory(
        pipe,
        PROMPTS,
        SamplerConfig(num_inference_steps=3),
        torch.Generator().manual_seed(0),
        modifiers=ModifierStack([probe]),
    )
    m = 3
    reranked = _steer(pipe, critic, "rerank", candidates=m, steps=[0])
    mean, std = probe.seen[0]
    noise = randn_tensor((m, *mean.shape), generator=torch.Generator().manual_seed(99), dtype=mean.dtype)
    cands = mean[None] + std * noise
    cond = {k: None if v is None else v.repeat(m, *[1] * (v.ndim - 1)) for k, v in _cond(plain).items()}
    with torch.no_grad():
        score = (critic.values(cands.flatten(0, 1), plain.timesteps[1], cond) * critic.weights).sum(-1).view(m, -1)
    best = score.argmax(0)
    torch.testing.assert_close(reranked.traj.latents[:, 1], cands[best, torch.arange(len(PROMPTS))], atol=0, rtol=0)
    assert torch.equal(reranked.traj.log_probs[:, 0], torch.zeros(len(PROMPTS)))  # a selection: point mass
    assert (reranked.traj.log_probs[:, 1:] != 0).all() and reranked.critic_rows == m * len(PROMPTS)


def test_best_of_n_keeps_the_chain_whose_last_state_has_the_highest_value(exported) -> None:
    pipe, critic = _loaded("tiny-unet", exported)
    n = 3
    best = _steer(pipe, critic, "best_of_n", candidates=n, seed=4)
    every = sample_trajectory(
        pipe,
        [p for p in PROMPTS for _ in range(n)],
        SamplerConfig(num_inference_steps=3),
        torch.Generator().manual_seed(4),
    )
    with torch.no_grad():
        values = critic.values(every.latents[:, -2], every.timesteps[-1], _cond(every))
    pick = (values * critic.weights).sum(-1).view(len(PROMPTS), n).argmax(1) + torch.arange(len(PROMPTS)) * n
    assert torch.equal(best.traj.latents, every.latents[pick]) and best.traj.prompts == PROMPTS
    torch.testing.assert_close(best.values, values[pick], atol=FP32_TOL, rtol=0)  # batch of 3 vs 9 rows
    assert best.critic_rows == n * len(PROMPTS)


def test_weight_overrides_change_the_objective_and_unknown_names_fail(exported) -> None:
    pipe, critic = _loaded("tiny-unet", exported)
    assert critic.weights_with(["jpeg_compressibility:0"]).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="toy_geneval"):
        critic.weights_with(["clip_score:1"])
    a = _steer(pipe, critic, "grad", scale=2.0, steps=[0]).traj
    b = _steer(pipe, critic, "grad", scale=2.0, steps=[0], weights=["toy_geneval:0", "jpeg_compressibility:1"]).traj
    assert not torch.allclose(a.latents[:, 1], b.latents[:, 1])


@pytest.mark.parametrize("preset,steer", [("tiny-unet", "grad"), ("tiny-dit", "rerank")])
def test_sample_cli_with_a_critic_writes_values_and_rewards(preset: str, steer: str, exported, tmp_path) -> None:
    out = tmp_path / "s"
    code = main(
        [
            "sample",
            f"model.source=preset:{preset}",
            "num_images=2",
            "sampler.num_inference_steps=3",
            f"out_dir={out}",
            "progress=false",
            "--critic",
            str(exported[preset]),
            "--steer",
            steer,
            "--scale",
            "0.5",
            "--candidates",
            "2",
        ]
    )
    assert code == 0
    record = json.loads((out / "samples.json").read_text())
    assert record["config"]["steering"]["steer"] == steer and len(record["samples"]) == 2
    for sample in record["samples"]:
        assert (out / sample["file"]).is_file()
        assert set(sample["critic_values"]) == set(sample["rewards"]) == {"toy_geneval", "jpeg_compressibility"}
        assert all(v == v for v in sample["predicted_rewards"].values())
    assert record["steering"]["steer"] == steer and "reward/toy_geneval" in record["steering"]
    assert record["steering"]["critic_rows_per_image"] == sample["critic_rows"] > 0


def test_sample_cli_loads_an_exported_policy_lora(exported, tmp_path) -> None:
    policy = exported["tiny-unet"].parent / "policy"
    runs = []
    for extra in ([], ["--policy-lora", str(policy)]):
        out = tmp_path / str(len(runs))
        assert (
            main(
                [
                    "sample",
                    "model.source=preset:tiny-unet",
                    "num_images=2",
                    "sampler.num_inference_steps=2",
                    f"out_dir={out}",
                    "progress=false",
                    *extra,
                ]
            )
            == 0
        )
        runs.append((out / "grid.png").read_bytes())
    assert runs[0] != runs[1]  # same seed: only the policy LoRA can change the images


def test_steering_without_a_critic_is_a_one_line_config_error(capsys) -> None:
    assert main(["sample", "model.source=preset:tiny-unet", "--steer", "grad"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a critic directory" in err[0]
    assert main(["sample", "--critic", "/nonexistent/critic"]) == 2
    assert "steering.critic': dir not found" in capsys.readouterr().err


# ------------------------------------------------------------------- steering as a modifier
STAYFAIR = {"name": "stayfair", "args": {"alpha": 5.0, "words": ["red", "blue"]}}
SYM_ATTN = {"name": "sym_attn", "args": {"alpha": 1.2, "beta": 2.0}}


def _reference_steered(pipe, critic, steer: str, scale: float = 0.5, m: int = 3, steps: int = 3) -> tuple:
    """Steered sampling written out step by step from the sampler's public parts, with no hook
    machinery: x_T, then per step (μ, σ) of the transition, the steering (μ + s ∇_{x_t} Σ w V, or the
    best of M candidates as a point mass), and the draw. (latents, log-probs) as the sampler stores them."""
    cfg = SamplerConfig(num_inference_steps=steps)
    gen, cand_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(99)
    x = initial_latents(pipe, len(PROMPTS), gen)
    chain, log_probs = [x], []
    transition = TRANSITIONS[transition_for(pipe.scheduler)]
    with torch.no_grad() if steer == "grad" else torch.inference_mode():
        embeds = encode_prompts(pipe, PROMPTS, cfg.negative_prompt, cfg.guidance_scale)
        cond = {k: embeds[k] for k in ("prompt_embeds", "pooled_prompt_embeds")}
        set_schedule(pipe, steps, x)
        timesteps = pipe.scheduler.timesteps
        for i, t in enumerate(timesteps):
            out = predict(pipe, x, t, embeds, cfg.guidance_scale)
            mean, std = transition.distribution(pipe.scheduler, out, i, x, getattr(cfg, transition.scale_key))
            if steer == "grad":
                with torch.enable_grad():
                    x_t = x.detach().clone().requires_grad_(True)
                    (grad,) = torch.autograd.grad((critic.values(x_t, t, cond) * critic.weights.to(x_t)).sum(), x_t)
                mean = mean + scale * grad.to(mean.dtype)
            elif i + 1 < len(timesteps):  # rerank: never the last step
                noise = randn_tensor((m, *mean.shape), generator=cand_gen, dtype=mean.dtype)
                cands = mean[None] + std * noise
                rep = {k: None if v is None else v.repeat(m, *[1] * (v.ndim - 1)) for k, v in cond.items()}
                score = (critic.values(cands.flatten(0, 1), timesteps[i + 1], rep) * critic.weights).sum(-1).view(m, -1)
                mean, std = cands[score.argmax(0), torch.arange(len(PROMPTS))], torch.zeros_like(torch.as_tensor(std))
            step = take_step(mean, std, generator=gen, reduce=cfg.logprob_reduce, dtype=x.dtype)
            x = step.prev_sample
            chain.append(x)
            log_probs.append(step.log_prob)
    return torch.stack(chain, 1), torch.stack(log_probs, 1)


@pytest.mark.parametrize("steer", ["grad", "rerank"])
@pytest.mark.parametrize("preset", PRESETS)
def test_steering_as_a_modifier_equals_the_step_by_step_reference_bit_for_bit(
    preset: str, steer: str, exported
) -> None:
    """Steering alone, as a modifier of the stack: the same trajectory as the steps written out."""
    pipe, critic = _loaded(preset, exported)
    steered = _steer(pipe, critic, steer, scale=0.5, candidates=3).traj
    latents, log_probs = _reference_steered(pipe, critic, steer)
    assert torch.equal(steered.latents, latents) and torch.equal(steered.log_probs, log_probs)
    assert steered.modifiers == []  # steering holds a live critic: made in code, not recorded


def _grad_at(critic, x_t: torch.Tensor, t: torch.Tensor, traj) -> torch.Tensor:
    """∇_{x_t} Σ_k w_k V_k(x_t, t, c), outside sampling (stock attention)."""
    x = x_t.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((critic.values(x, t, _cond(traj)) * critic.weights).sum(), x)
    return grad


@pytest.mark.parametrize("modifier", [STAYFAIR, SYM_ATTN], ids=["stayfair", "sym_attn"])
@pytest.mark.parametrize("preset", PRESETS)
def test_grad_steering_combines_with_a_modifier(preset: str, modifier: dict, exported) -> None:
    """--steer grad with stayfair or sym_attn: it runs, differs from unsteered sampling with and without
    the modifier and from steering alone, and its first step is the modifier's step shifted by exactly
    s ∇V at x_T, with the critic reading stock attention (the gradient is taken outside sampling)."""
    pipe, critic = _loaded(preset, exported)
    s = 0.5
    plain = _steer(pipe, critic, "none").traj
    steered_alone = _steer(pipe, critic, "grad", scale=s).traj
    modified = _steer(pipe, critic, "none", modifiers=[modifier]).traj
    both = _steer(pipe, critic, "grad", scale=s, modifiers=[modifier])
    for other in (plain, steered_alone, modified):
        assert not torch.allclose(both.traj.latents[:, 1:], other.latents[:, 1:])
    assert both.critic_rows == 3 * len(PROMPTS) and both.traj.modifiers == canonical_specs([modifier])
    first = _steer(pipe, critic, "grad", scale=s, steps=[0], modifiers=[modifier]).traj
    grad = _grad_at(critic, modified.latents[:, 0], modified.timesteps[0], modified)
    assert grad.abs().max() > 0 and torch.equal(first.latents[:, 0], modified.latents[:, 0])
    torch.testing.assert_close(first.latents[:, 1] - modified.latents[:, 1], s * grad, atol=FP32_TOL, rtol=1e-4)


@pytest.mark.parametrize("preset", PRESETS)
def test_rerank_combines_with_stayfair_and_sym_attn(preset: str, exported) -> None:
    """--steer rerank over [stayfair, sym_attn]: the kept step is the best of the candidates drawn
    around the modified step's (μ, σ), scored by the critic on stock attention; a point mass."""
    pipe, critic = _loaded(preset, exported)
    mods, m = [STAYFAIR, SYM_ATTN], 3
    probe = _Probe()
    modified = sample_trajectory(
        pipe,
        PROMPTS,
        SamplerConfig(num_inference_steps=3, modifiers=mods),
        torch.Generator().manual_seed(0),
        modifiers=build_modifiers(mods).extended(probe),
    )
    reranked = _steer(pipe, critic, "rerank", candidates=m, steps=[0], modifiers=mods)
    mean, std = probe.seen[0]
    noise = randn_tensor((m, *mean.shape), generator=torch.Generator().manual_seed(99), dtype=mean.dtype)
    cands = mean[None] + std * noise
    cond = {k: None if v is None else v.repeat(m, *[1] * (v.ndim - 1)) for k, v in _cond(modified).items()}
    with torch.no_grad():
        score = (critic.values(cands.flatten(0, 1), modified.timesteps[1], cond) * critic.weights).sum(-1).view(m, -1)
    best = cands[score.argmax(0), torch.arange(len(PROMPTS))]
    torch.testing.assert_close(reranked.traj.latents[:, 1], best, atol=0, rtol=0)
    assert not torch.allclose(reranked.traj.latents[:, 1], modified.latents[:, 1])
    assert torch.equal(reranked.traj.log_probs[:, 0], torch.zeros(len(PROMPTS)))
    assert reranked.traj.modifiers == canonical_specs(mods)


@pytest.mark.parametrize("preset,steer", [("tiny-unet", "grad"), ("tiny-dit", "rerank")])
def test_sample_cli_steers_together_with_stayfair_and_sym_attn(preset: str, steer: str, exported, tmp_path) -> None:
    """`align sample --steer grad|rerank` with sampler.modifiers (formerly refused): the steered images
    differ from the modifiers-only ones of the same seed."""
    grids = []
    for extra in ([], ["--critic", str(exported[preset]), "--steer", steer, "--scale", "20", "--candidates", "3"]):
        out = tmp_path / str(len(grids))
        args = [
            "sample",
            f"model.source=preset:{preset}",
            "num_images=2",
            "sampler.num_inference_steps=3",
            "sampler.modifiers=[{name: stayfair, args: {alpha: 5}}, {name: sym_attn, args: {alpha: 1.2}}]",
            f"out_dir={out}",
            "progress=false",
        ]
        assert main(args + extra) == 0
        grids.append((out / "grid.png").read_bytes())
        record = json.loads((out / "samples.json").read_text())
        assert [m["name"] for m in record["config"]["sampler"]["modifiers"]] == ["stayfair", "sym_attn"]
    assert record["steering"]["steer"] == steer and record["steering"]["critic_rows_per_image"] > 0
    assert grids[0] != grids[1]


@pytest.mark.parametrize(
    "modifiers, override, message",
    [
        ("[{name: stayfair, args: {alpha: 5}}]", "sampler.guidance_scale=1", "needs sampler.guidance_scale > 1"),
        ("[{name: sym_attn, args: {alpha: 1.2}}, {name: sym_attn, args: {alpha: 1.1}}]", "seed=0", "both change"),
    ],
    ids=["stayfair-without-cfg", "two-claims-on-one-layer"],
)
def test_invalid_modifier_stacks_under_steering_are_one_line_errors(
    modifiers: str, override: str, message: str, exported, tmp_path, capsys
) -> None:
    args = [
        "sample",
        "model.source=preset:tiny-unet",
        "num_images=1",
        "sampler.num_inference_steps=2",
        f"sampler.modifiers={modifiers}",
        override,
        f"out_dir={tmp_path}",
        "progress=false",
        "--critic",
        str(exported["tiny-unet"]),
        "--steer",
        "grad",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]

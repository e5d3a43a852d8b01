"""The modifier protocol: config syntax, errors, identity settings bit-for-bit, composition order,
log-prob consistency under the modified transition, `align sample` and `align train` with modifiers."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from align.backbones.lora import attach_lora
from align.config import load_config
from align.modifiers.protocol import Modifier, ModifierStack, build_modifiers, canonical_specs
from align.modifiers.sym_attn import SymSelfAttnProcessor
from align.sample_job import SampleJobConfig, run_sample_job
from align.sampling import SamplerConfig, Trajectory, recompute_log_probs, sample_trajectory
from align.train_config import TrainConfig

PROMPTS = ["two red circles on the left", "one blue square on the top"]
CLI = "sampler.modifiers=[stayfair: {alpha: 5}, sym_attn: {alpha: 1.05, beta: 3}]"
TYPED = [{"name": "stayfair", "args": {"alpha": 5}}, {"name": "sym_attn", "args": {"alpha": 1.05, "beta": 3}}]


def _cfg(*modifiers, **kw) -> SamplerConfig:
    base = dict(num_inference_steps=3, guidance_scale=3.0, output_type="latent", modifiers=list(modifiers))
    return SamplerConfig(**{**base, **kw})


def _sample(pipe, cfg: SamplerConfig, seed: int = 0) -> Trajectory:
    return sample_trajectory(pipe, PROMPTS, cfg, torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------- config
@pytest.mark.parametrize("schema", [SampleJobConfig, TrainConfig])
def test_command_line_list_of_mappings_parses_for_sample_and_train(schema) -> None:
    cfg = load_config(schema, None, [CLI])
    assert canonical_specs(cfg.sampler.modifiers) == TYPED


def test_compact_issue_syntax_parses_too() -> None:
    """``[stayfair:{alpha:5},...]`` is not valid YAML flow (no space after ':'); the config loader
    inserts the spaces for such a value, and only then."""
    cfg = load_config(TrainConfig, None, ["sampler.modifiers=[stayfair:{alpha:5},sym_attn:{alpha:1.05,beta:3}]"])
    assert canonical_specs(cfg.sampler.modifiers) == TYPED
    assert load_config(SampleJobConfig, None, ["out_dir=http://x:8/y"]).out_dir == "http://x:8/y"


def test_quoted_string_items_parse_like_mappings() -> None:
    cfg = load_config(SampleJobConfig, None, ['sampler.modifiers=["stayfair:{alpha:5,words:[red,blue]}",sym_attn]'])
    assert canonical_specs(cfg.sampler.modifiers) == [
        {"name": "stayfair", "args": {"alpha": 5, "words": ["red", "blue"]}},
        {"name": "sym_attn", "args": {}},
    ]


@pytest.mark.parametrize(
    "override, message",
    [
        ("sampler.modifiers=[fairness]", "unknown modifier 'fairness'; valid modifiers: .*stayfair.*sym_attn"),
        ("sampler.modifiers=[sym_attn: {gamma: 2}]", "modifier 'sym_attn' has no arg.* gamma; valid args: alpha, beta"),
        (
            "sampler.modifiers=[sym_attn: {variant: slow}]",
            "modifier 'sym_attn': variant 'slow' is not valid; choose one",
        ),
        ("sampler.modifiers=[stayfair: {words: [a]}]", "modifier 'stayfair': words must be two"),
        ('sampler.modifiers=["stayfair:alpha=5"]', "does not read 'name' or 'name:"),
        ("sampler.modifiers=[a:{b: c: d}]", "override 'sampler.modifiers=.*': the value is not valid YAML"),
    ],
)
def test_bad_modifier_config_fails_in_one_line_before_loading_a_model(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        load_config(SampleJobConfig, None, [override])
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------- identity settings
IDENTITY = ["stayfair:{alpha:0,words:[red,blue]}", "sym_attn:{alpha:1,beta:3}", "sym_attn:{alpha:1,eta_mode:dev}"]


@pytest.mark.parametrize("fixture", ["tiny_unet_pipe", "tiny_dit_pipe"])
def test_identity_settings_reproduce_the_unmodified_sampler_bit_for_bit(request, fixture: str) -> None:
    pipe = request.getfixturevalue(fixture)
    identity = [
        IDENTITY[0] if fixture == "tiny_unet_pipe" else "stayfair:{alpha:0,words:[red,blue],base:empty}",
        IDENTITY[1],
    ]
    stock = _sample(pipe, _cfg())
    mod = _sample(pipe, _cfg(*identity))
    for key in ("latents", "log_probs", "prompt_embeds", "negative_prompt_embeds"):
        assert torch.equal(getattr(stock, key), getattr(mod, key)), key
    assert not build_modifiers(identity).changes_log_probs(pipe)


def test_identity_stack_installs_no_processor_and_adds_no_hook(tiny_unet_pipe) -> None:
    stack = build_modifiers(IDENTITY)
    hooks = stack.hooks(tiny_unet_pipe, PROMPTS)
    assert hooks.prompt_embeds is None and hooks.transition is None and hooks.extra_branch is None
    before = dict(tiny_unet_pipe.unet.attn_processors)
    with stack.attention(tiny_unet_pipe):
        assert all(p is before[k] for k, p in tiny_unet_pipe.unet.attn_processors.items())


# ------------------------------------------------------------------ modified log-prob consistency
UNET_MODS = [
    "stayfair:{alpha:4,words:[red,blue]}",
    "stayfair:{alpha:4,words:[red,blue],w_fair:2}",
    "sym_attn:{alpha:1.2,beta:3}",
    "sym_attn:{alpha:1.2,beta:3,variant:exact,eta_mode:dev,eta_beta:true}",
]


@pytest.mark.parametrize("spec", UNET_MODS)
def test_stored_and_recomputed_log_probs_agree_under_the_modified_transition_unet(tiny_unet_pipe, spec: str) -> None:
    attach_lora(tiny_unet_pipe, "policy", rank=4, init_lora_weights=False)  # a trained-looking policy
    stock = _sample(tiny_unet_pipe, _cfg())
    traj = _sample(tiny_unet_pipe, _cfg(spec))
    assert not torch.equal(traj.latents, stock.latents), "the modifier had no effect"
    assert build_modifiers([spec]).changes_log_probs(tiny_unet_pipe)
    new = recompute_log_probs(tiny_unet_pipe, traj)  # under autograd, as the learner calls it
    ratio = torch.exp(new - traj.log_probs)
    assert (ratio - 1).abs().max() < 1e-5
    plain = dataclasses.replace(traj, modifiers=[], negative_prompt_embeds=stock.negative_prompt_embeds)
    unmodified = recompute_log_probs(tiny_unet_pipe, plain)  # stock policy on the same steps
    assert (unmodified - traj.log_probs).abs().max() > 1e-4, "recomputation ignored the modifier"


@pytest.mark.parametrize(
    "spec",
    [
        "stayfair:{alpha:4,words:[red,blue]}",
        "stayfair:{alpha:4,words:[red,blue],w_fair:2}",
        "sym_attn:{alpha:1.2,beta:3}",
    ],
)
def test_stored_and_recomputed_log_probs_agree_under_the_modified_transition_dit(tiny_dit_pipe, spec: str) -> None:
    traj = _sample(tiny_dit_pipe, _cfg(spec))
    ratio = torch.exp(recompute_log_probs(tiny_dit_pipe, traj) - traj.log_probs)
    assert (ratio - 1).abs().max() < 1e-5


def test_stayfair_changes_only_the_null_branch(tiny_unet_pipe) -> None:
    stock, mod = _sample(tiny_unet_pipe, _cfg()), _sample(tiny_unet_pipe, _cfg("stayfair:{alpha:4,words:[red,blue]}"))
    assert torch.equal(stock.prompt_embeds, mod.prompt_embeds)
    assert not torch.equal(stock.negative_prompt_embeds, mod.negative_prompt_embeds)


def test_stayfair_needs_cfg(tiny_unet_pipe) -> None:
    with pytest.raises(ValueError, match="stayfair.*guidance_scale > 1"):
        _sample(tiny_unet_pipe, _cfg("stayfair:{alpha:4}", guidance_scale=1.0))


def test_saved_trajectory_keeps_its_modifiers_for_recomputation(tiny_unet_pipe, tmp_path) -> None:
    traj = _sample(tiny_unet_pipe, _cfg("sym_attn:{alpha:1.2,beta:3}"))
    traj.save(tmp_path / "traj")
    loaded = Trajectory.load(tmp_path / "traj")
    assert loaded.modifiers == [{"name": "sym_attn", "args": {"alpha": 1.2, "beta": 3}}]
    assert (recompute_log_probs(tiny_unet_pipe, loaded) - traj.log_probs).abs().max() < 1e-5


def test_attention_processors_are_restored_after_sampling_and_on_error(tiny_unet_pipe) -> None:
    before = dict(tiny_unet_pipe.unet.attn_processors)
    _sample(tiny_unet_pipe, _cfg("sym_attn:{alpha:1.2}"))
    stack = build_modifiers(["sym_attn:{alpha:1.2}"])
    with pytest.raises(RuntimeError, match="boom"):
        with stack.attention(tiny_unet_pipe):
            assert any(isinstance(p, SymSelfAttnProcessor) for p in tiny_unet_pipe.unet.attn_processors.values())
            raise RuntimeError("boom")
    assert all(type(p) is type(before[k]) for k, p in tiny_unet_pipe.unet.attn_processors.items())


def test_a_stack_built_from_other_specs_than_sampler_modifiers_is_refused(tiny_unet_pipe) -> None:
    other = build_modifiers(["sym_attn:{alpha:1.1}"])
    with pytest.raises(ValueError, match="not from sampler.modifiers"):
        sample_trajectory(tiny_unet_pipe, PROMPTS, _cfg("sym_attn:{alpha:1.2}"), torch.Generator(), modifiers=other)


def test_the_caller_builds_the_stack_and_nothing_is_cached_on_the_pipeline(tiny_unet_pipe) -> None:
    """One stack passed to several calls gives what a stack built per call (from config) gives; the
    pipeline's attributes are the same before and after."""
    before = set(vars(tiny_unet_pipe))
    cfg = _cfg("stayfair:{alpha:4,words:[red,blue]}", "sym_attn:{alpha:1.2}")
    stack = build_modifiers(cfg.modifiers)
    passed = [
        sample_trajectory(tiny_unet_pipe, PROMPTS, cfg, torch.Generator().manual_seed(s), modifiers=stack)
        for s in (0, 1)
    ]
    built = [_sample(tiny_unet_pipe, cfg, seed=s) for s in (0, 1)]
    for a, b in zip(passed, built):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
        assert a.modifiers == b.modifiers == canonical_specs(cfg.modifiers)
    assert set(vars(tiny_unet_pipe)) == before
    torch.testing.assert_close(recompute_log_probs(tiny_unet_pipe, passed[0], modifiers=stack), passed[0].log_probs)


# ----------------------------------------------------------------------------- composition
@dataclasses.dataclass
class _Add(Modifier):
    value: float = 1.0
    name = "add"

    def embeds(self, pipe, embeds, prompts):
        return {**embeds, "negative_prompt_embeds": embeds["negative_prompt_embeds"] + self.value}

    def transition(self, pipe):
        return lambda mean, std, ctx: (mean + self.value, std)


@dataclasses.dataclass
class _Scale(Modifier):
    value: float = 2.0
    name = "scale"

    def embeds(self, pipe, embeds, prompts):
        return {**embeds, "negative_prompt_embeds": embeds["negative_prompt_embeds"] * self.value}

    def transition(self, pipe):
        return lambda mean, std, ctx: (mean * self.value, std)

    def guidance(self):
        return lambda u, c, w: c


def test_embeds_and_transition_hooks_compose_in_list_order(tiny_unet_pipe) -> None:
    one = torch.ones(1, 2)
    hooks = ModifierStack([_Add(1.0), _Scale(2.0)]).hooks(tiny_unet_pipe, PROMPTS)
    assert torch.equal(hooks.prompt_embeds({"negative_prompt_embeds": one})["negative_prompt_embeds"], one * 4)
    assert torch.equal(hooks.transition(one, one, None)[0], one * 4)
    hooks = ModifierStack([_Scale(2.0), _Add(1.0)]).hooks(tiny_unet_pipe, PROMPTS)
    assert torch.equal(hooks.transition(one, one, None)[0], one * 3)


def test_two_guidance_replacements_or_two_claims_on_one_layer_are_errors(tiny_unet_pipe) -> None:
    with pytest.raises(ValueError, match="at most one may"):
        ModifierStack([_Scale(), _Scale()]).hooks(tiny_unet_pipe, PROMPTS)
    with pytest.raises(ValueError, match="both change attention layer"):
        with build_modifiers(["sym_attn:{alpha:1.2}", "sym_attn:{alpha:1.1}"]).attention(tiny_unet_pipe):
            pass


@dataclasses.dataclass
class _SeesProcessors(Modifier):
    """Records the denoiser's attention-processor types each time its transition hook runs."""

    stock: bool = False
    name = "sees_processors"

    def __post_init__(self) -> None:
        self.seen: list[set[str]] = []

    @property
    def stock_attention(self) -> bool:
        return self.stock

    def transition(self, pipe):
        def hook(mean, std, ctx):
            self.seen.append({type(p).__name__ for p in pipe.unet.attn_processors.values()})
            return mean, std

        return hook


@pytest.mark.parametrize("stock", [False, True])
def test_a_stock_attention_modifier_runs_its_hook_with_the_stock_processors(tiny_unet_pipe, stock: bool) -> None:
    """A critic on the shared denoiser (steering) must read stock features while sym_attn is installed;
    after its hook the stack's processors are back (the chain is the sym_attn one, bit for bit)."""
    cfg = _cfg("sym_attn:{alpha:1.2}")
    probe = _SeesProcessors(stock)
    traj = sample_trajectory(
        tiny_unet_pipe,
        PROMPTS,
        cfg,
        torch.Generator().manual_seed(0),
        modifiers=build_modifiers(cfg.modifiers).extended(probe),
    )
    assert len(probe.seen) == cfg.num_inference_steps
    assert all(("SymSelfAttnProcessor" in seen) != stock for seen in probe.seen)
    assert torch.equal(traj.latents, _sample(tiny_unet_pipe, cfg).latents)
    assert traj.modifiers == canonical_specs(cfg.modifiers)  # the code-made probe is not recorded


# ------------------------------------------------------------------------ jobs with modifiers
def test_align_sample_with_modifiers_writes_images_and_records_them(tmp_path) -> None:
    cfg = load_config(
        SampleJobConfig,
        None,
        [
            "model.source=preset:tiny-unet",
            "sampler.num_inference_steps=2",
            "prompts=[two red circles on the left]",
            "progress=false",
            f"out_dir={tmp_path}",
            "sampler.modifiers=[stayfair: {alpha: 3, words: [red, blue]}, sym_attn: {alpha: 1.05, beta: 3}]",
        ],
    )
    run_sample_job(cfg)
    record = json.loads((tmp_path / "samples.json").read_text())
    assert record["config"]["sampler"]["modifiers"][1] == {"name": "sym_attn", "args": {"alpha": 1.05, "beta": 3}}
    assert (tmp_path / "images" / "0000.png").is_file()


@pytest.mark.parametrize(
    "modifier",
    ["{name: stayfair, args: {alpha: 3, words: [red, blue]}}", "{name: sym_attn, args: {alpha: 1.1, beta: 3}}"],
)
def test_two_iteration_ecg_run_trains_with_a_modifier(tiny_train_cfg, tmp_path, modifier: str) -> None:
    from align.train import train

    cfg = tiny_train_cfg(
        "trainer.iterations=2",
        "trainer.timestep_fraction=1.0",
        "rewards=[{name: jpeg_compressibility}]",
        f"sampler.modifiers=[{modifier}]",
    )
    lines: list[str] = []
    state = train(cfg, log=lines.append)
    assert state.policy_updates == 2
    for rec in state.history:  # PPO on the first epoch is on-policy: ratio 1 ⇒ nothing clipped, KL ≈ 0
        assert rec["policy_loss"] == rec["policy_loss"] and abs(rec["approx_kl"]) < 1e-3
        assert rec["clip_frac"] == 0.0
    assert json.loads((tmp_path / "config.json").read_text())["sampler"]["modifiers"]


def test_classifier_guidance_variant_shifts_the_mean_and_recomputes(tiny_unet_pipe, tmp_path) -> None:
    """stayfair_cg: μ ← μ + s σ² ∇ log σ(aᵀx + b); it needs autograd inside sampling (``needs_grad``)."""
    from align.checkpoint import save_tensors

    dim = 4 * tiny_unet_pipe.unet.config.sample_size**2
    save_tensors(
        tmp_path / "clf.safetensors",
        {"weight": torch.randn(dim, generator=torch.Generator().manual_seed(0)), "bias": torch.zeros(())},
    )
    spec = {"stayfair_cg": {"classifier": str(tmp_path / "clf.safetensors"), "scale": 2.0}}
    stock, traj = _sample(tiny_unet_pipe, _cfg()), _sample(tiny_unet_pipe, _cfg(spec))
    assert not torch.equal(stock.latents, traj.latents)
    assert (torch.exp(recompute_log_probs(tiny_unet_pipe, traj) - traj.log_probs) - 1).abs().max() < 1e-5
    with pytest.raises(ValueError, match="classifier file not found"):
        build_modifiers([{"stayfair_cg": {"classifier": str(tmp_path / "missing"), "scale": 1.0}}])

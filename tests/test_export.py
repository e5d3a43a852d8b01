"""Exports: the critic round trip (bit for bit), the policy LoRA in plain diffusers, base checks, `align export`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import critics
from align.backbones import attach_lora, build_pipeline, denoiser
from align.backbones.lora import active_adapters
from align.policy import export_run
from align.sampling import SamplerConfig, encode_prompts, sample_trajectory
from critics.value_model import LatentCritic, critic_target_modules

PROMPTS = ["two red circles on the left", "one blue square on the top"]
REWARDS = {"toy_geneval": 1.0, "jpeg_compressibility": 0.25}
NORMS = {
    "toy_geneval": {"mean": 0.6, "var": 0.04, "count": 64.0},
    "jpeg_compressibility": {"mean": -3.0, "var": 0.25, "count": 64.0},
}
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def trained_like(preset: str, adapter: str = "separate", seed: int = 0):
    """A tiny pipeline with non-trivial policy and critic adapters and random heads (as after training)."""
    pipe = build_pipeline(f"preset:{preset}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        attach_lora(pipe, "policy", rank=4, alpha=2.0, init_lora_weights=False)
        name = "policy"
        if adapter == "separate":
            attach_lora(pipe, "critic", rank=2, target_modules=critic_target_modules(pipe), init_lora_weights=False)
            name = "critic"
        critic = LatentCritic(pipe, list(REWARDS), adapter=name, hidden=16)
        with torch.no_grad():
            critic.heads.query.normal_()
    return pipe, critic


def export(pipe, critic, out: Path, preset: str, adapter: str = "separate") -> Path:
    return critics.export_pipeline(
        pipe,
        critic,
        out,
        base_model=f"preset:{preset}",
        reward_weights=REWARDS,
        normalisers=NORMS,
        metrics={"explained_variance": 0.5},
        adapter_source=adapter,
    )


def fixed_inputs(pipe, batch: int = 2):
    gen = torch.Generator().manual_seed(3)
    net = denoiser(pipe)
    x = torch.randn(batch, net.config.in_channels, net.config.sample_size, net.config.sample_size, generator=gen)
    with torch.no_grad():
        embeds = encode_prompts(pipe, PROMPTS[:batch])
    return x, torch.tensor(601), {k: embeds[k] for k in ("prompt_embeds", "pooled_prompt_embeds")}


@pytest.mark.parametrize(
    "preset,adapter",
    [("tiny-unet", "separate"), ("tiny-unet", "shared"), ("tiny-sdxl", "separate"), ("tiny-dit", "separate")],
)
def test_export_then_load_gives_identical_values_bit_for_bit(preset: str, adapter: str, tmp_path) -> None:
    pipe, critic = trained_like(preset, adapter)
    out = export(pipe, critic, tmp_path / "export", preset, adapter)
    assert sorted(os.listdir(out / "critic")) == ["README.md", "config.json", "model.safetensors"]
    fresh = build_pipeline(f"preset:{preset}")
    loaded = critics.load(out / "critic", fresh)
    assert active_adapters(fresh) == []  # the critic's adapter must not change plain sampling
    x, t, embeds = fixed_inputs(pipe)
    with torch.no_grad():
        expected = critic(x, t, embeds)
        got = loaded.values(x, t, embeds)
    assert torch.equal(got, expected) and got.shape == (2, 2)
    assert loaded.rows == 2 and loaded.reward_names == list(REWARDS)
    assert loaded.weights.tolist() == list(REWARDS.values())
    torch.testing.assert_close(
        loaded.predicted_rewards(torch.ones(1, 2)),
        torch.tensor([[0.6 + 0.2 + 1e-8, -3.0 + 0.5 + 1e-8]]),
        rtol=0,
        atol=1e-6,
    )
    config = json.loads((out / "critic" / "config.json").read_text())
    assert config["schema_version"] == 1 and config["adapter"]["source"] == adapter
    assert config["base_model"]["fingerprint"] == critics.base_fingerprint(fresh)
    assert "toy_geneval" in (out / "critic" / "README.md").read_text()


def test_a_critic_on_another_feature_layer_round_trips(tmp_path) -> None:
    pipe = build_pipeline("preset:tiny-unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        attach_lora(pipe, "policy", rank=2)
        attach_lora(
            pipe, "critic", rank=2, target_modules=critic_target_modules(pipe, "up_blocks.0"), init_lora_weights=False
        )
        critic = LatentCritic(pipe, list(REWARDS), adapter="critic", hidden=16, feature_layer="up_blocks.0")
    out = export(pipe, critic, tmp_path / "e", "tiny-unet")
    assert json.loads((out / "critic" / "config.json").read_text())["feature_layer"] == "up_blocks.0"
    loaded = critics.load(out / "critic", build_pipeline("preset:tiny-unet"))
    assert loaded.module.feature_layer == "up_blocks.0"
    x, t, embeds = fixed_inputs(pipe)
    with torch.no_grad():
        assert torch.equal(loaded.values(x, t, embeds), critic(x, t, embeds))


def test_sampling_with_a_loaded_critic_attached_is_unchanged(tiny_unet_pipe, tmp_path) -> None:
    pipe, critic = trained_like("tiny-unet")
    out = export(pipe, critic, tmp_path / "e", "tiny-unet")
    cfg = SamplerConfig(num_inference_steps=3)
    plain = sample_trajectory(tiny_unet_pipe, PROMPTS, cfg, torch.Generator().manual_seed(1))
    critics.load(out / "critic", tiny_unet_pipe)
    with_critic = sample_trajectory(tiny_unet_pipe, PROMPTS, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(plain.latents, with_critic.latents)


def test_fingerprint_ignores_adapters_and_sees_weight_changes() -> None:
    a, b = build_pipeline("preset:tiny-unet"), build_pipeline("preset:tiny-unet")
    before = critics.base_fingerprint(a)
    attach_lora(a, "policy", rank=2, init_lora_weights=False)
    assert critics.base_fingerprint(a) == before == critics.base_fingerprint(b)
    with torch.no_grad():
        b.unet.conv_in.bias[0] += 1e-3
    assert critics.base_fingerprint(b) != before and before.startswith("sha256:")


def test_loading_onto_another_base_names_both_fingerprints_unless_forced(tmp_path) -> None:
    pipe, critic = trained_like("tiny-unet")
    out = export(pipe, critic, tmp_path / "e", "tiny-unet")
    other = build_pipeline("preset:tiny-unet", seed=1)
    with pytest.raises(critics.CriticLoadError) as err:
        critics.load(out / "critic", other)
    message = str(err.value)
    assert critics.base_fingerprint(pipe) in message and critics.base_fingerprint(other) in message
    assert "force" in message and len(message.splitlines()) == 1
    forced = critics.load(out / "critic", other, force=True)
    x, t, embeds = fixed_inputs(other)
    assert torch.isfinite(forced.values(x, t, embeds)).all()
    with pytest.raises(critics.CriticLoadError, match="unet backbone .* this pipeline is a dit"):
        critics.load(out / "critic", build_pipeline("preset:tiny-dit"), force=True)


def test_bad_critic_directories_fail_clearly(tmp_path) -> None:
    pipe, critic = trained_like("tiny-unet")
    out = export(pipe, critic, tmp_path / "e", "tiny-unet")
    with pytest.raises(critics.CriticLoadError, match="needs config.json and model.safetensors"):
        critics.load(tmp_path, build_pipeline("preset:tiny-unet"))
    config = json.loads((out / "critic" / "config.json").read_text())
    (out / "critic" / "config.json").write_text(json.dumps({**config, "schema_version": 99}))
    with pytest.raises(critics.CriticLoadError, match="schema_version 99"):
        critics.load(out / "critic", build_pipeline("preset:tiny-unet"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a previous export"):
        export(pipe, critic, tmp_path / "mine", "tiny-unet")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


_PLAIN_DIFFUSERS = textwrap.dedent("""
    import importlib.util, os, sys
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]  # pip install -e
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != {root!r}]
    for name in ("align", "critics", "rewards"):
        assert importlib.util.find_spec(name) is None, name + " is importable"
    import torch
    from diffusers import {cls}
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    pipe = {cls}.from_pretrained({base!r}{extra})
    pipe.load_lora_weights({lora!r})
    images = pipe({prompts!r}, num_inference_steps=4, guidance_scale=4.5, output_type="pt",
                  generator=torch.Generator().manual_seed(0){eta}).images
    save_file({{"images": images.contiguous()}}, {out!r})
    assert not [m for m in sys.modules if m.split(".")[0] in ("align", "critics", "rewards")]
""")


@pytest.mark.parametrize("preset", ["tiny-unet", "tiny-sdxl", "tiny-dit"])
def test_exported_policy_lora_gives_the_same_images_in_plain_diffusers(preset: str, tmp_path) -> None:
    """The policy export loads with ``pipe.load_lora_weights`` in a process without project code,
    and gives our sampler's images for the same seed (DDIM η = 1; DiT: the ODE, as the raw call)."""
    pipe = build_pipeline(f"preset:{preset}")
    pipe.save_pretrained(tmp_path / "base")  # the base, before any adapter wraps its layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        attach_lora(pipe, "policy", rank=4, alpha=2.0, init_lora_weights=False)  # alpha ≠ rank: scale must survive
    out = critics.export_pipeline(
        pipe, None, tmp_path / "export", base_model="local", reward_weights={}, normalisers={}
    )
    ours = sample_trajectory(
        pipe, PROMPTS, SamplerConfig(num_inference_steps=4, eta=1.0, noise_level=0.0), torch.Generator().manual_seed(0)
    ).images
    is_unet = preset != "tiny-dit"  # DDIM, η = 1
    script = _PLAIN_DIFFUSERS.format(
        root=str(PROJECT_ROOT),
        cls=type(pipe).__name__,
        base=str(tmp_path / "base"),
        lora=str(out / "policy"),
        extra="" if is_unet else ", text_encoder_3=None, tokenizer_3=None",
        prompts=PROMPTS,
        eta=", eta=1.0" if is_unet else "",
        out=str(tmp_path / "images.safetensors"),
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = load_file(str(tmp_path / "images.safetensors"))["images"]
    assert not torch.allclose(
        ours,
        sample_trajectory(
            build_pipeline(f"preset:{preset}"),
            PROMPTS,
            SamplerConfig(num_inference_steps=4, eta=1.0, noise_level=0.0),
            torch.Generator().manual_seed(0),
        ).images,
        atol=1e-3,
    )
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)  # fp32 round-off, as tests/test_sampling.py


def test_align_train_exports_and_align_export_rebuilds_the_same_files(tmp_path, capsys, tiny_train_cfg) -> None:
    from align.cli import main
    from align.train import train

    run = tmp_path / "run"
    cfg = tiny_train_cfg(
        f"run_dir={run}",
        "trainer.iterations=1",
        "rewards=[{name: toy_geneval}, {name: jpeg_compressibility, weight: 0.5}]",
    )
    state = train(cfg, log=lambda *_: None)
    config = json.loads((run / "export" / "critic" / "config.json").read_text())
    assert [(r["name"], r["weight"]) for r in config["rewards"]] == [
        ("toy_geneval", 1.0),
        ("jpeg_compressibility", 0.5),
    ]
    assert {r["name"]: r["norm"]["mean"] for r in config["rewards"]} == {
        n: s["mean"] for n, s in state.normalisers.items()
    }
    assert config["metrics"]["iterations"] == 1 and config["base_model"]["id"] == "preset:tiny-unet"
    assert main(["export", str(run), "--out", str(tmp_path / "again")]) == 0
    assert "exported" in capsys.readouterr().out
    again = tmp_path / "again"
    assert json.loads((again / "critic" / "config.json").read_text()) == config
    for rel in ("critic/model.safetensors", "policy/pytorch_lora_weights.safetensors"):
        a, b = load_file(str(run / "export" / rel)), load_file(str(again / rel))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    assert main(["export", str(tmp_path / "nope")]) == 2


def test_export_of_a_run_without_critic_writes_only_the_policy(tmp_path, tiny_train_cfg) -> None:
    from align.train import train

    run = tmp_path / "run"
    train(tiny_train_cfg(f"run_dir={run}", "trainer.iterations=1", "algo=grpo"), log=lambda *_: None)
    out = export_run(run, tmp_path / "out")
    assert sorted(os.listdir(out)) == ["export.json", "policy"]
    assert json.loads((out / "export.json").read_text())["critic"] is None

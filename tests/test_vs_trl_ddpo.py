"""benchmarks/vs_trl_ddpo.py: the shared tiny pipeline, our overrides and TRL's spec describe one shape, the
per-iteration phase arithmetic, and the table. The trl venv is needed only by the ``slow`` case."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import trl_venv  # noqa: E402
import vs_trl_ddpo as bench  # noqa: E402

from align.backbones.model_config import ModelConfig, load_model  # noqa: E402
from align.cli import DEFAULT_TRAIN_CONFIG  # noqa: E402
from align.config import load_config  # noqa: E402
from align.train_config import TrainConfig  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return bench.save_tiny_pipeline(tmp_path_factory.mktemp("bench") / "tiny_sd")


def test_tiny_pipeline_has_the_issues_shape_and_loads_through_model_source(model_dir: Path) -> None:
    pipe = load_model(ModelConfig(source=str(model_dir)))
    assert pipe.unet.config.sample_size == 8 and pipe.unet.config.in_channels == 4
    assert tuple(pipe.unet.config.block_out_channels) == (32, 64)
    assert pipe.vae_scale_factor == 8 and pipe.text_encoder.config.num_hidden_layers == 2
    assert (model_dir / "tokenizer" / "vocab.json").is_file() and (model_dir / "tokenizer" / "merges.txt").is_file()
    images = pipe(
        ["a red circle"],
        num_inference_steps=2,
        guidance_scale=5.0,
        eta=1.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 3, 64, 64)


def test_our_overrides_and_trl_spec_describe_the_same_shape(model_dir: Path, tmp_path: Path) -> None:
    shape = bench.Shape()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    cfg = load_config(
        TrainConfig,
        DEFAULT_TRAIN_CONFIG,
        bench.our_overrides(shape, model_dir, prompts, tmp_path / "run", rollout_workers=0),
    )
    spec = bench.trl_spec(shape, model_dir, ["a red circle"])
    t, s = cfg.trainer, cfg.sampler
    assert cfg.algo == "ddpo" and cfg.ray.num_rollout_workers == 0 and cfg.ray.num_reward_workers == 0
    assert (s.num_inference_steps, s.eta, s.guidance_scale) == (spec["steps"], spec["eta"], spec["guidance"])
    assert s.logprob_reduce == "mean"  # TRL's per-step log-prob is the mean over latent elements
    assert cfg.lora.rank == spec["lora_rank"] == 4 and cfg.lora.alpha == 4.0  # TRL: r=4, lora_alpha=4
    assert t.prompts_per_iteration * t.samples_per_prompt == spec["samples"] == 8
    assert t.minibatch_size == cfg.ray.chunk_size == spec["batch"] == 4
    assert (t.timestep_fraction, t.step_window, t.epochs) == (1.0, 1.0, 1)
    assert (t.lr, t.clip_range, t.adv_clip, t.max_grad_norm) == (
        spec["lr"],
        spec["clip"],
        spec["adv_clip"],
        spec["max_grad_norm"],
    )
    assert [(r.name, r.weight, r.args) for r in cfg.rewards] == [("jpeg_compressibility", 1.0, {"quality": 95})]
    assert t.num_threads == spec["threads"] and spec["model_dir"] == str(model_dir)
    assert s.sde_window == [] and s.sde_window_size == 0  # every step stochastic and trained, as TRL
    assert t.checkpoint_every == shape.iterations  # one checkpoint, at the end (TRL's side saves none)
    with_ray = load_config(
        TrainConfig,
        DEFAULT_TRAIN_CONFIG,
        bench.our_overrides(shape, model_dir, prompts, tmp_path / "run", rollout_workers=2),
    )
    assert with_ray.ray.num_rollout_workers == 2


def test_shape_refuses_samples_that_do_not_split_into_batches() -> None:
    with pytest.raises(ValueError, match="multiple of batch"):
        bench.Shape(samples=6, batch=4).validate()
    with pytest.raises(ValueError, match="warmup"):
        bench.Shape(iterations=2, warmup=2).validate()


def test_our_iteration_is_the_period_between_log_lines_and_training_is_the_rest() -> None:
    history = [
        {"seconds": 1.0, "timing/rollout": 0.375, "timing/reward": 0.025},
        {"seconds": 1.5, "timing/rollout": 0.375, "timing/reward": 0.125},
        {"seconds": 2.0, "timing/rollout": 0.5, "timing/reward": 0.25},
    ]
    its = bench.ours_iterations(history, log_times=[10.0, 12.0, 14.5], cpu_times=[1.0, 2.5, 4.5])
    assert [i["seconds"] for i in its] == [2.0, 2.5]
    assert [i["sampling"] for i in its] == [0.5, 0.75] and [i["training"] for i in its] == [1.5, 1.75]
    assert [i["after_record"] for i in its] == [0.5, 0.5] and [i["cpu_seconds"] for i in its] == [1.5, 2.0]
    med = bench.median_phases(its, samples=8)
    assert med["seconds"] == 2.25 and med["samples_per_s"] == 8 / 2.25
    assert med["best_seconds"] == 2.0 and med["best_samples_per_s"] == 4.0  # the fastest iteration
    # collected ahead (learner.max_policy_lag=1): sampling is what the learner still waited
    assert bench.ours_sampling({"timing/rollout": 0.5, "timing/reward": 0.25, "timing/rollout_wait": 0.125}) == 0.125


def test_the_paired_ratio_compares_each_run_of_ours_with_the_trl_run_before_it() -> None:
    runs = [
        {"name": "TRL DDPOTrainer #1", "samples_per_s": 4.0},
        {"name": "ours in-process #1", "samples_per_s": 5.0},
        {"name": "TRL DDPOTrainer #2", "samples_per_s": 2.0},
        {"name": "ours in-process #2", "samples_per_s": 3.0},
        {"name": "ours, 2 Ray rollout actors #1", "samples_per_s": 9.0},
    ]
    assert bench.paired_ratios(runs) == [1.25, 1.5]


def test_lockstep_summary_gives_the_median_of_the_adjacent_rounds_and_the_floor() -> None:
    rec = {"TRL": {"seconds": 2.0, "cpu_seconds": 2.0, "sampling": 0.5, "training": 1.5}}
    rec["ours"] = {"seconds": 1.6, "cpu_seconds": 1.5, "sampling": 0.4, "training": 1.2}
    lock = {"rounds": 3, "ratios": [1.0, 1.25, 1.5], "records": {k: [v] * 3 for k, v in rec.items()}}
    result = {
        "runs": [],
        "lockstep": lock,
        "shape": {"samples": 8},
        "floor": {"sampling": 0.5, "forward": 0.25, "sampling_how": "one batch of 8"},
    }
    text = bench.summary(result)
    assert "| ours (lockstep, median of 3) | 5.00 | 0.400 | 1.200 | 1.600 | 1.500 | 1.25 |" in text
    assert "median over 3 adjacent rounds: 1.25" in text and "NOT met" in text
    assert "| ours (lockstep) | 1.600 | 1.60 | 1.28 |" in text  # 1.6 / (0.5 + 2·0.25), 1.6 / (0.5 + 3·0.25)


def test_trl_training_is_the_step_minus_sampling_and_reward() -> None:
    its = bench.trl_iterations([{"seconds": 2.0, "cpu_seconds": 1.75, "sampling": 0.5, "reward": 0.25, "update": 1.0}])
    assert its == [{"seconds": 2.0, "cpu_seconds": 1.75, "sampling": 0.75, "training": 1.25, "update": 1.0}]


def test_table_gives_each_run_its_ratio_to_trl() -> None:
    rows = [
        {"name": "TRL", "samples_per_s": 4.0, "sampling": 0.5, "training": 1.5, "seconds": 2.0, "cpu_seconds": 2.0},
        {"name": "ours", "samples_per_s": 5.0, "sampling": 0.4, "training": 1.2, "seconds": 1.6, "cpu_seconds": 1.5},
    ]
    lines = bench.format_table(rows, trl_sps=4.0).splitlines()
    assert lines[2].startswith("| TRL | 4.00 |") and lines[2].endswith("| 1.00 |")
    assert lines[3].startswith("| ours | 5.00 | 0.400 | 1.200 | 1.600 | 1.500 |") and lines[3].endswith("| 1.25 |")
    floor = bench.format_floor({"sampling": 0.5, "forward": 0.25, "sampling_how": "batches of 4"}, {"ours": 2.0})
    assert "| ours | 2.000 | 2.00 | 1.60 |" in floor  # 2.0 / (0.5 + 2·0.25), 2.0 / (0.5 + 3·0.25)


def test_venv_counts_as_complete_only_with_the_same_pins(tmp_path: Path) -> None:
    assert not trl_venv.is_complete(tmp_path)
    (tmp_path / trl_venv.MARKER).write_text(json.dumps({"pins": list(trl_venv.PINS)}))
    assert trl_venv.is_complete(tmp_path)
    assert not trl_venv.is_complete(tmp_path, pins=("trl==0.20.0",))


@pytest.mark.slow
def test_trl_side_trains_two_epochs_with_rank4_lora(model_dir: Path, tmp_path: Path) -> None:
    """Creates the trl venv if missing (minutes, PyPI); then TRL's DDPOTrainer runs on the local pipeline."""
    python = trl_venv.ensure_venv()["python"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(bench.trl_spec(bench.Shape(iterations=2, threads=1), model_dir, ["a red circle"])))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    subprocess.run(
        [
            python,
            str(ROOT / "benchmarks" / "trl_ddpo_side.py"),
            "--spec",
            str(spec),
            "--out",
            str(tmp_path / "out.json"),
        ],
        check=True,
        env=env,
        timeout=900,
    )
    out = json.loads((tmp_path / "out.json").read_text())
    assert len(out["epochs"]) == 2 and out["global_step"] == 4  # 8 samples / minibatch 4, per epoch
    assert out["lora"]["rank_matches"] and out["versions"]["trl"] == "0.21.0"


@pytest.mark.slow
def test_trl_venv_reads_the_same_text_encoder_weights_as_ours(model_dir: Path) -> None:
    """transformers 4.55 would re-initialise the transformers-5 save; the TRL side's strict reload makes the
    prompt embeddings agree (float32, same ops: tolerance of a few ulps of O(1) values)."""
    python = trl_venv.ensure_venv()["python"]
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[2]); import trl_ddpo_side as t; "
        "from diffusers import StableDiffusionPipeline; p = StableDiffusionPipeline.from_pretrained(sys.argv[1]); "
        "t.reload_text_encoder(p.text_encoder, sys.argv[1]); "
        "ids = p.tokenizer(['a red circle'], padding='max_length', max_length=16, return_tensors='pt').input_ids; "
        "print(json.dumps({'ids': ids[0].tolist(), 'emb': p.text_encoder(ids)[0][0].tolist()}))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [python, "-c", code, str(model_dir), str(ROOT / "benchmarks")],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=300,
    )
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    pipe = load_model(ModelConfig(source=str(model_dir)))
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    assert ids[0].tolist() == theirs["ids"]
    with torch.no_grad():
        ours = pipe.text_encoder(ids)[0][0]
    torch.testing.assert_close(torch.tensor(theirs["emb"]), ours, rtol=1e-5, atol=1e-5)

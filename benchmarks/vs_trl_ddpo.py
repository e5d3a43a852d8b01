"""Ours vs TRL's ``DDPOTrainer`` at the same shape (issue 16 §2), alternating runs, with the physical floor.

Both sides load one tiny SD pipeline, built here from configs and saved to a local directory (a UNet with
8×8×4 latents and channels (32, 64), a VAE with factor 8 so 64 px images, a 2-layer CLIP text encoder and
the toy tokenizer). The shape is TRL's DDPO defaults scaled down: 10 DDIM steps, η = 1, CFG 5, LoRA r = 4
on to_q/k/v/out.0, 8 samples per iteration sampled in batches of 4 and trained in minibatches of 4, every
timestep trained, lr 3e-4, clip 1e-4, JPEG compressibility at quality 95, torch on 2 threads.

- TRL: trl 0.21.0 in its own venv (``benchmarks/trl_venv.py``), ``benchmarks/trl_ddpo_side.py`` there.
- Ours: ``align train algo=ddpo`` (the CLI's default config plus the overrides of :func:`our_overrides`:
  every step stochastic, no window; one checkpoint, at the end, as TRL's side saves none), in a subprocess
  of this interpreter calling :func:`align.train.train`, in-process rollouts (``ray.num_rollout_workers=0``),
  and once with the default 2 Ray rollout actors (``--ray-runs``).

Runs alternate TRL, ours, TRL, ours (``--pairs``); each run does ``--iterations`` iterations of which the
first ``--warmup`` are dropped, and reports the median (and the fastest) over the rest. Then the lockstep
comparison (``--lockstep`` rounds): both sides loaded at once in two processes that take turns, one iteration
each, the idle one blocked on a pipe, so that adjacent iterations see about the same load of a shared machine
(whole runs, tens of seconds apart, do not); its ratio is the median over rounds. An iteration is the full period:
ours from one iteration's log line to the next (its checkpoint, if any, included), TRL's one
``trainer.step``. "sampling" is the rollouts with their reward, "training" the rest of the iteration.

Physical floor (same process, same pipeline with the LoRA attached): sampling cannot beat a raw
diffusers ``pipe()`` call for the 8 samples; training cannot beat 2–3× a forward pass (with grad) over the
trained steps (CFG batch, every step, every sample).

    python benchmarks/vs_trl_ddpo.py [--pairs 2] [--lockstep 20] [--iterations 5] [--ray-runs 1] [--threads 2]
        [--checkpoint-every 0] [--venv DIR] [--out DIR] [--profile]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.3  # ours ≥ 1.3× TRL's samples/s (issue 16 §2)


@dataclasses.dataclass(frozen=True)
class Shape:
    """The benchmark's shape, shared by both sides."""

    steps: int = 10
    eta: float = 1.0
    guidance: float = 5.0
    lora_rank: int = 4
    samples: int = 8  # per iteration
    batch: int = 4  # sampling batch and training minibatch
    prompts_per_iteration: int = 2
    lr: float = 3e-4
    clip: float = 1e-4
    adv_clip: float = 5.0
    max_grad_norm: float = 1.0
    jpeg_quality: int = 95
    threads: int = 2
    iterations: int = 5
    warmup: int = 1
    seed: int = 0
    checkpoint_every: int = 0  # ours: trainer.checkpoint_every (0: only the last iteration, as TRL saves none)

    def validate(self) -> None:
        if self.samples % self.batch or self.samples % self.prompts_per_iteration:
            raise ValueError(
                f"samples ({self.samples}) must be a multiple of batch ({self.batch}) and of "
                f"prompts_per_iteration ({self.prompts_per_iteration})"
            )
        if not 0 <= self.warmup < self.iterations:
            raise ValueError(f"warmup must be in [0, iterations), got {self.warmup} of {self.iterations}")


def build_tiny_pipeline(seed: int = 0):
    """SD1.5-class pipeline for this shape: UNet (32, 64) on 8×8×4 latents, 4-block VAE (factor 8: 64 px),
    2-layer CLIP text encoder of width 32, the toy tokenizer, DDIM with SD1.5's schedule."""
    import torch

    from align.backbones.presets import clip_text_encoder, sd_pipeline, tiny_sd_unet, tiny_vae
    from align.backbones.tokenizer import toy_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = toy_tokenizer()
        unet = tiny_sd_unet(sample_size=8)
        vae = tiny_vae((16, 16, 16, 16), sample_size=64)
        return sd_pipeline(unet, vae, clip_text_encoder(tokenizer, 32), tokenizer, "epsilon")


def save_tiny_pipeline(directory: Path, seed: int = 0) -> Path:
    """``save_pretrained`` of :func:`build_tiny_pipeline`, with the tokenizer's BPE files for transformers 4.x."""
    from align.backbones.tokenizer import copy_bpe_files

    build_tiny_pipeline(seed).save_pretrained(directory)
    copy_bpe_files(Path(directory) / "tokenizer")
    return Path(directory)


def our_overrides(
    shape: Shape, model_dir: Path, prompts_file: Path, run_dir: Path, rollout_workers: int = 0
) -> list[str]:
    """``align train algo=ddpo`` overrides for the shape (on top of the CLI's default config)."""
    ray = (
        ["ray.num_rollout_workers=0", "ray.num_reward_workers=0"]
        if rollout_workers == 0
        else [f"ray.num_rollout_workers={rollout_workers}"]
    )
    return [
        "algo=ddpo",
        f"model.source={model_dir}",
        f"trainer.prompts={prompts_file}",
        f"sampler.num_inference_steps={shape.steps}",
        f"sampler.eta={shape.eta}",
        f"sampler.guidance_scale={shape.guidance}",
        "sampler.logprob_reduce=mean",
        "sampler.sde_window=[]",  # every step stochastic and trained, as TRL (the CLI default has a 2-step window)
        "sampler.sde_window_size=0",
        f"lora.rank={shape.lora_rank}",
        f"lora.alpha={float(shape.lora_rank)}",
        f"trainer.iterations={shape.iterations}",
        f"trainer.prompts_per_iteration={shape.prompts_per_iteration}",
        f"trainer.samples_per_prompt={shape.samples // shape.prompts_per_iteration}",
        f"trainer.minibatch_size={shape.batch}",
        f"ray.chunk_size={shape.batch}",
        "trainer.epochs=1",
        "trainer.timestep_fraction=1.0",
        "trainer.step_window=1.0",
        f"trainer.lr={shape.lr}",
        f"trainer.clip_range={shape.clip}",
        f"trainer.adv_clip={shape.adv_clip}",
        f"trainer.max_grad_norm={shape.max_grad_norm}",
        "trainer.kl_coef=0.0",
        f"trainer.num_threads={shape.threads}",
        f"trainer.seed={shape.seed}",
        # TRL saves nothing here (save_freq past the last epoch); ours saves only the last iteration
        f"trainer.checkpoint_every={shape.checkpoint_every or shape.iterations}",
        f"rewards=[{{name: jpeg_compressibility, weight: 1.0, args: {{quality: {shape.jpeg_quality}}}}}]",
        "eval_every=0",
        "final_eval_prompts=0",
        f"run_dir={run_dir}",
        *ray,
    ]


def trl_spec(shape: Shape, model_dir: Path, prompts: list[str]) -> dict:
    """The JSON that ``benchmarks/trl_ddpo_side.py`` reads."""
    return {**dataclasses.asdict(shape), "model_dir": str(model_dir), "prompts": list(prompts)}


def median_phases(iterations: list[dict], samples: int) -> dict:
    """Median seconds per iteration of each phase, and samples/s from the median full iteration; ``best_*``:
    the fastest iteration (the least disturbed by other jobs on a shared machine: contention only adds)."""
    keys = iterations[0].keys()
    med = {k: statistics.median(it[k] for it in iterations) for k in keys}
    best = min(it["seconds"] for it in iterations)
    return {
        **med,
        "samples_per_s": samples / med["seconds"],
        "best_seconds": best,
        "best_samples_per_s": samples / best,
    }


def paired_ratios(runs: list[dict], ours: str = "ours in-process", trl: str = "TRL DDPOTrainer") -> list[float]:
    """ours / TRL samples/s of each pair ``#p`` (the runs alternate, so a pair saw about the same load)."""
    by_name = {r["name"]: r for r in runs}
    return [
        by_name[f"{ours} #{p}"]["samples_per_s"] / by_name[f"{trl} #{p}"]["samples_per_s"]
        for p in range(1, len(runs) + 1)
        if f"{ours} #{p}" in by_name and f"{trl} #{p}" in by_name
    ]


def ours_sampling(record: dict) -> float:
    """Seconds the iteration spent on its samples: ``timing/rollout`` + ``timing/reward``, or, when the batch
    was collected ahead (``learner.max_policy_lag=1``), only what the learner still waited
    (``timing/rollout_wait``)."""
    if "timing/rollout_wait" in record:
        return record["timing/rollout_wait"]
    return record.get("timing/rollout", 0.0) + record.get("timing/reward", 0.0)


def ours_iterations(history: list[dict], log_times: list[float], cpu_times: list[float]) -> list[dict]:
    """Per-iteration phases of our run: the full period between consecutive log lines (the iteration's own
    checkpoint, if it saves one, included), sampling = :func:`ours_sampling`, training = the rest."""
    out = []
    for k in range(1, len(history)):
        period = log_times[k] - log_times[k - 1]
        sampling = ours_sampling(history[k])
        out.append(
            {
                "seconds": period,
                "cpu_seconds": cpu_times[k] - cpu_times[k - 1],
                "sampling": sampling,
                "training": period - sampling,
                "after_record": period - history[k]["seconds"],
                **{key: v for key, v in history[k].items() if key.startswith("timing/")},
            }
        )
    return out


def trl_iterations(epochs: list[dict]) -> list[dict]:
    """Per-epoch phases of TRL's run: sampling = ``_generate_samples`` + ``compute_rewards``, training = rest."""
    return [
        {
            "seconds": e["seconds"],
            "cpu_seconds": e["cpu_seconds"],
            "sampling": e["sampling"] + e["reward"],
            "training": e["seconds"] - e["sampling"] - e["reward"],
            "update": e["update"],
        }
        for e in epochs
    ]


def format_table(rows: list[dict], trl_sps: Optional[float]) -> str:
    """Markdown table: one row per run, ``{"name", "samples_per_s", "sampling", "training", "seconds"}``."""
    lines = [
        "| run | samples/s | sampling s/it | training s/it | iteration s | CPU s/it (this process) "
        "| vs TRL samples/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['samples_per_s'] / trl_sps:.2f}" if trl_sps else "–"
        lines.append(
            f"| {r['name']} | {r['samples_per_s']:.2f} | {r['sampling']:.3f} | {r['training']:.3f} | "
            f"{r['seconds']:.3f} | {r['cpu_seconds']:.3f} | {ratio} |"
        )
    return "\n".join(lines)


def format_floor(floor: dict, iteration_s: dict[str, float]) -> str:
    """The floor lines and, per side, iteration time ÷ floor (with the 2× and the 3× forward training floor)."""
    f2, f3 = floor["sampling"] + 2 * floor["forward"], floor["sampling"] + 3 * floor["forward"]
    lines = [
        f"physical floor: sampling {floor['sampling']:.3f} s (raw pipe(), {floor['sampling_how']}), "
        f"training 2–3× forward {2 * floor['forward']:.3f}–{3 * floor['forward']:.3f} s "
        f"(forward with grad over the trained steps {floor['forward']:.3f} s); iteration floor "
        f"{f2:.3f}–{f3:.3f} s",
        "| side | iteration s | ÷ floor (2× fwd) | ÷ floor (3× fwd) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {s:.3f} | {s / f2:.2f} | {s / f3:.2f} |" for name, s in iteration_s.items()]
    return "\n".join(lines)


def _ours_worker(spec_file: str, out_file: str) -> None:
    """Child process: one ``align train`` run, timed; writes history + log timestamps as JSON."""
    spec = json.loads(Path(spec_file).read_text())
    from align.cli import DEFAULT_TRAIN_CONFIG
    from align.config import load_config
    from align.train import train
    from align.train_config import TrainConfig

    cfg = load_config(TrainConfig, DEFAULT_TRAIN_CONFIG, spec["overrides"])
    log_times: list[float] = []
    cpu_times: list[float] = []

    def log(line: str) -> None:
        if line.startswith("it "):
            log_times.append(time.perf_counter())
            cpu_times.append(time.process_time())

    if spec.get("profile"):  # cProfile of the whole run (the caller prints the update path's top entries)
        import cProfile

        profiler = cProfile.Profile()
        state = profiler.runcall(train, cfg, log=log)
        profiler.dump_stats(spec["profile"])
    else:
        state = train(cfg, log=log)
    Path(out_file).write_text(json.dumps({"history": state.history, "log_times": log_times, "cpu_times": cpu_times}))


def run_ours(
    shape: Shape,
    model_dir: Path,
    prompts_file: Path,
    work: Path,
    tag: str,
    rollout_workers: int,
    profile: Optional[Path] = None,
) -> dict:
    spec, out = work / f"{tag}.spec.json", work / f"{tag}.json"
    overrides = our_overrides(shape, model_dir, prompts_file, work / f"{tag}.run", rollout_workers)
    spec.write_text(json.dumps({"overrides": overrides, "profile": str(profile) if profile else None}))
    _child([sys.executable, __file__, "--ours-worker", str(spec), str(out)], shape.threads)
    data = json.loads(out.read_text())
    its = ours_iterations(data["history"], data["log_times"], data["cpu_times"])
    return median_phases(its[shape.warmup - 1 :] if shape.warmup else its, shape.samples)


def run_trl(shape: Shape, python: str, model_dir: Path, prompts: list[str], work: Path, tag: str) -> dict:
    spec, out = work / f"{tag}.spec.json", work / f"{tag}.json"
    spec.write_text(json.dumps(trl_spec(shape, model_dir, prompts)))
    _child(
        [python, str(ROOT / "benchmarks" / "trl_ddpo_side.py"), "--spec", str(spec), "--out", str(out)],
        shape.threads,
        pythonpath=False,
    )
    data = json.loads(out.read_text())
    result = median_phases(trl_iterations(data["epochs"])[shape.warmup :], shape.samples)
    return {**result, "lora": data["lora"], "versions": data["versions"]}


def _child_env(threads: int, pythonpath: bool = True) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = str(ROOT)
    return env


def _child(cmd: list[str], threads: int, pythonpath: bool = True) -> None:
    subprocess.run(cmd, check=True, env=_child_env(threads, pythonpath), cwd=ROOT)


def measure_floor(shape: Shape, model_dir: Path, prompts: list[str], repeats: int = 3) -> dict:
    """Raw ``pipe()`` for the iteration's samples (batches of ``batch`` and all at once: the faster counts)
    and one forward pass with grad over every trained step of every sample (CFG batch), LoRA attached."""
    import torch

    from align.backbones.lora import attach_lora
    from align.backbones.model_config import ModelConfig, load_model

    torch.set_num_threads(shape.threads)
    pipe = load_model(ModelConfig(source=str(model_dir)))
    attach_lora(pipe, "policy", rank=shape.lora_rank, alpha=float(shape.lora_rank))
    lora_params = sum(p.numel() for p in pipe.unet.parameters() if p.requires_grad)
    pipe.set_progress_bar_config(disable=True)
    batch_prompts = [prompts[i % len(prompts)] for i in range(shape.samples)]

    def sample(size: int) -> None:
        for s in range(0, shape.samples, size):
            pipe(
                batch_prompts[s : s + size],
                num_inference_steps=shape.steps,
                guidance_scale=shape.guidance,
                eta=shape.eta,
                output_type="pt",
                generator=torch.Generator().manual_seed(s),
            )

    emb, neg = pipe.encode_prompt(batch_prompts[: shape.batch], "cpu", 1, True)
    cond = torch.cat([neg, emb]).detach()
    pipe.scheduler.set_timesteps(shape.steps)
    latents = torch.randn(shape.batch, 4, 8, 8)

    def forward() -> None:
        for _ in range(shape.samples // shape.batch):
            for t in pipe.scheduler.timesteps:
                with torch.enable_grad():
                    pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=cond).sample.sum()

    timings: dict[str, list[float]] = {"batched": [], "whole": [], "forward": []}
    for _ in range(repeats + 1):  # the first round warms up
        for key, fn in (
            ("batched", lambda: sample(shape.batch)),
            ("whole", lambda: sample(shape.samples)),
            ("forward", forward),
        ):
            start = time.perf_counter()
            fn()
            timings[key].append(time.perf_counter() - start)
    med = {k: statistics.median(v[1:]) for k, v in timings.items()}
    how = f"batches of {shape.batch}" if med["batched"] <= med["whole"] else f"one batch of {shape.samples}"
    return {
        "sampling": min(med["batched"], med["whole"]),
        "sampling_how": how,
        "forward": med["forward"],
        "lora_params": lora_params,
        **{f"{k}_seconds": v for k, v in med.items()},
    }


def print_profile(path: Path, top: int = 25) -> None:
    """The run's top functions by cumulative time, restricted to the update path (learner, algos, train)."""
    import pstats

    print(f"cProfile of one in-process run ({path}); top {top} by cumulative time in align/:", flush=True)
    pstats.Stats(str(path)).sort_stats("cumulative").print_stats(r"align[/\\]", top)


def _floor_child(shape: Shape, model_dir: Path, prompts: list[str], work: Path, tag: str) -> dict:
    """:func:`measure_floor` in a child process with the shape's thread count (as each side's runs)."""
    spec, out = work / f"{tag}.spec.json", work / f"{tag}.json"
    spec.write_text(json.dumps({"shape": dataclasses.asdict(shape), "model_dir": str(model_dir), "prompts": prompts}))
    _child([sys.executable, __file__, "--floor-worker", str(spec), str(out)], shape.threads)
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------ lockstep
# Both sides loaded at once, in two processes that take turns one iteration at a time (the idle one blocks on
# a pipe): consecutive iterations of the two see about the same load of the machine, where whole runs, tens
# of seconds apart, do not. Only one of them computes at any moment (in-process, equal threads).


def _lockstep_wait() -> None:
    """Block until the parent says go (a line on stdin)."""
    if not sys.stdin.readline():
        raise SystemExit("lockstep: the parent closed the pipe")


def _ours_lockstep_worker(spec_file: str, out_file: str, done_fd: int) -> None:
    """Child: ``align train`` whose log callback reports each iteration (wall and CPU seconds since the go) on
    ``done_fd`` and waits for the next go. Iteration 1 is the warm-up ("ready"), 2 … n+1 are measured, and
    the last one (n+2: the final checkpoint) runs free."""
    spec = json.loads(Path(spec_file).read_text())
    from align.cli import DEFAULT_TRAIN_CONFIG
    from align.config import load_config
    from align.train import train
    from align.train_config import TrainConfig

    cfg = load_config(TrainConfig, DEFAULT_TRAIN_CONFIG, spec["overrides"])
    n, done = spec["lockstep"], os.fdopen(done_fd, "w", buffering=1)
    clock = {"k": 0, "t": 0.0, "c": 0.0}

    def log(line: str) -> None:
        if not line.startswith("it "):
            return
        now, cpu, k = time.perf_counter(), time.process_time(), clock["k"]
        clock["k"] += 1
        if k == 0:
            done.write("ready\n")
        elif k <= n:
            done.write(json.dumps({"seconds": now - clock["t"], "cpu_seconds": cpu - clock["c"]}) + "\n")
        if k < n:
            _lockstep_wait()
            clock["t"], clock["c"] = time.perf_counter(), time.process_time()

    state = train(cfg, log=log)
    Path(out_file).write_text(json.dumps({"history": state.history}))


def _trl_lockstep_worker(spec_file: str, out_file: str, done_fd: int) -> None:
    """Child, in the trl venv: ``DDPOTrainer.step`` per go (epoch 0 is the warm-up), with the phases of
    ``benchmarks/trl_ddpo_side.py``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    import trl_ddpo_side as side

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    trainer, pipe = side.build_trainer(spec, str(Path(out_file).parent / "trl_logs"))
    phases: dict = {}
    for method, key in (("_generate_samples", "sampling"), ("compute_rewards", "reward")):
        setattr(trainer, method, side.timed(phases, key, getattr(trainer, method)))
    done, global_step, epochs = os.fdopen(done_fd, "w", buffering=1), 0, []
    for epoch in range(spec["iterations"]):
        if epoch:
            _lockstep_wait()
        phases.clear()
        start, cpu = time.perf_counter(), time.process_time()
        global_step = trainer.step(epoch, global_step)
        record = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu, **phases}
        epochs.append(record)
        done.write("ready\n" if epoch == 0 else json.dumps(record) + "\n")
    Path(out_file).write_text(json.dumps({"epochs": epochs, "versions": side.versions()}))


class _Turn:
    """One lockstep child: ``go()`` starts its next iteration, ``wait()`` reads what it reports."""

    def __init__(self, name: str, cmd: list[str], threads: int, pythonpath: bool, log: Path) -> None:
        read, write = os.pipe()
        self.name, self.log = name, log
        with open(log, "w") as fh:
            self.proc = subprocess.Popen(
                [*cmd, str(write)],
                stdin=subprocess.PIPE,
                stdout=fh,
                stderr=subprocess.STDOUT,
                text=True,
                env=_child_env(threads, pythonpath),
                cwd=ROOT,
                pass_fds=(write,),
            )
        os.close(write)
        self.done = os.fdopen(read)

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def wait(self) -> str:
        line = self.done.readline()
        if not line:
            raise RuntimeError(f"lockstep: {self.name} exited early (exit {self.proc.wait()}); see {self.log}")
        return line.strip()

    def finish(self) -> None:
        self.proc.stdin.close()
        if self.proc.wait() != 0:
            raise RuntimeError(f"lockstep: {self.name} failed (exit {self.proc.returncode}); see {self.log}")


def run_lockstep(
    shape: Shape, python: str, model_dir: Path, prompts: list[str], prompts_file: Path, work: Path, n: int
):
    """``n`` rounds, each one iteration of TRL and one of ours, adjacent (the order alternates per round);
    returns each side's per-iteration records and the per-round ratios TRL seconds / ours seconds."""
    ours_shape = dataclasses.replace(shape, iterations=n + 2)
    trl_shape = dataclasses.replace(shape, iterations=n + 1)
    ours_spec, trl_spec_file = work / "lock_ours.spec.json", work / "lock_trl.spec.json"
    overrides = our_overrides(ours_shape, model_dir, prompts_file, work / "lock_ours.run")
    ours_spec.write_text(json.dumps({"overrides": overrides, "lockstep": n}))
    trl_spec_file.write_text(json.dumps(trl_spec(trl_shape, model_dir, prompts)))
    me = [sys.executable, __file__]
    trl = _Turn(
        "TRL",
        [python, __file__, "--trl-lockstep-worker", str(trl_spec_file), str(work / "lock_trl.json")],
        shape.threads,
        False,
        work / "lock_trl.log",
    )
    ours = _Turn(
        "ours",
        [*me, "--ours-lockstep-worker", str(ours_spec), str(work / "lock_ours.json")],
        shape.threads,
        True,
        work / "lock_ours.log",
    )
    for side in (trl, ours):  # both warm up at once (not measured)
        if side.wait() != "ready":
            raise RuntimeError(f"lockstep: {side.name} did not start")
    records: dict[str, list[dict]] = {"TRL": [], "ours": []}
    for k in range(n):
        for side in (trl, ours) if k % 2 == 0 else (ours, trl):
            side.go()
            records[side.name].append(json.loads(side.wait()))
    for side in (trl, ours):
        side.finish()
    history = json.loads((work / "lock_ours.json").read_text())["history"][1 : n + 1]
    for rec, h in zip(records["ours"], history, strict=True):
        rec["sampling"] = ours_sampling(h)
        rec["training"] = rec["seconds"] - rec["sampling"]
    for rec in records["TRL"]:
        rec["sampling"] = rec.pop("sampling") + rec.pop("reward")
        rec["training"] = rec["seconds"] - rec["sampling"]
    ratios = [t["seconds"] / o["seconds"] for t, o in zip(records["TRL"], records["ours"], strict=True)]
    return {"rounds": n, "records": records, "ratios": ratios}


def format_lockstep(lock: dict, samples: int) -> str:
    """Per-side medians of the lockstep iterations and the ratio ours/TRL samples/s (median over rounds)."""
    rows = [
        {"name": f"{name} (lockstep, median of {lock['rounds']})", **median_phases(recs, samples)}
        for name, recs in lock["records"].items()
    ]
    r = sorted(lock["ratios"])
    q1, q3 = r[len(r) // 4], r[(3 * len(r)) // 4]
    return "\n".join(
        [
            format_table(rows, rows[0]["samples_per_s"]),
            f"lockstep ours / TRL samples/s, median over {len(r)} adjacent rounds: {statistics.median(r):.2f} "
            f"(quartiles {q1:.2f}–{q3:.2f}; target >= {TARGET}: "
            f"{'met' if statistics.median(r) >= TARGET else 'NOT met'})",
        ]
    )


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_all(shape: Shape, args: argparse.Namespace) -> dict:
    """Venv, pipeline, floor, the alternating runs; returns every measurement (also written as JSON)."""
    import numpy as np
    from trl_venv import ensure_venv

    from align.prompts import draw_prompts

    venv = ensure_venv(args.venv)
    print(
        f"trl venv: {venv['python']} ({'created in' if venv['created'] else 'reused, checked in'} "
        f"{venv['seconds']:.1f} s)",
        flush=True,
    )
    work = Path(args.out or tempfile.mkdtemp(prefix="vs_trl_ddpo_"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = save_tiny_pipeline(work / "tiny_sd", shape.seed)
    prompts = list(dict.fromkeys(draw_prompts("toy", 16, np.random.default_rng(shape.seed))))
    prompts_file = work / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    runs: list[dict] = []

    def record(name: str, fn) -> None:
        before = _loadavg()
        result = fn()
        runs.append({"name": name, **result, "loadavg_before": before, "loadavg_after": _loadavg()})
        print(
            f"{name}: {result['samples_per_s']:.2f} samples/s, sampling {result['sampling']:.3f} s, "
            f"training {result['training']:.3f} s, iteration {result['seconds']:.3f} s "
            f"(load {before} -> {_loadavg()})",
            flush=True,
        )

    floors = []
    for p in range(args.pairs):  # A B A B, the floor measured after each pair (the load drifts)
        record(f"TRL DDPOTrainer #{p + 1}", lambda: run_trl(shape, venv["python"], model_dir, prompts, work, f"trl{p}"))
        record(f"ours in-process #{p + 1}", lambda: run_ours(shape, model_dir, prompts_file, work, f"ours{p}", 0))
        floors.append(_floor_child(shape, model_dir, prompts, work, f"floor{p}"))
    lockstep = None
    if args.lockstep:
        before = _loadavg()
        lockstep = run_lockstep(shape, venv["python"], model_dir, prompts, prompts_file, work, args.lockstep)
        lockstep.update(loadavg_before=before, loadavg_after=_loadavg())
        print(f"lockstep, {args.lockstep} rounds (load {before} -> {_loadavg()}):", flush=True)
        print(format_lockstep(lockstep, shape.samples), flush=True)
    if not floors:
        floors.append(_floor_child(shape, model_dir, prompts, work, "floor"))
    for p in range(args.ray_runs):
        record(
            f"ours, 2 Ray rollout actors #{p + 1}", lambda: run_ours(shape, model_dir, prompts_file, work, f"ray{p}", 2)
        )
    if args.profile:
        profile = work / "ours.prof"
        run_ours(shape, model_dir, prompts_file, work, "profile", 0, profile=profile)
        print_profile(profile)
    floor = {
        k: (statistics.median(f[k] for f in floors) if isinstance(floors[0][k], float) else floors[0][k])
        for k in floors[0]
    }
    floor["sampling_how"] = "min of batches of 4 and one batch of 8"
    result = {
        "shape": dataclasses.asdict(shape),
        "venv": venv,
        "runs": runs,
        "floor": floor,
        "floors": floors,
        "lockstep": lockstep,
        "work": str(work),
    }
    (work / "results.json").write_text(json.dumps(result, indent=1))
    return result


def summary(result: dict) -> str:
    """The whole printout: per-run table, per-side medians, the floor (for the medians and for each side's fastest
    iteration), the ratio ours/TRL (of the sides' medians, per pair, of the fastest iterations) and the lockstep
    comparison with its floor."""
    runs, out = result["runs"], []
    if runs:
        out += _runs_summary(result)
    lock = result.get("lockstep")
    if lock:
        samples = result["shape"]["samples"]
        medians = {
            f"{name} (lockstep)": median_phases(recs, samples)["seconds"] for name, recs in lock["records"].items()
        }
        out += [
            "",
            "lockstep (TRL and ours loaded at once, taking turns one iteration each):",
            format_lockstep(lock, samples),
            "",
            format_floor(result["floor"], medians),
        ]
    return "\n".join(out).lstrip("\n")


def _runs_summary(result: dict) -> list[str]:
    runs = result["runs"]
    sides: dict[str, list[dict]] = {}
    for r in runs:
        sides.setdefault(r["name"].split(" #")[0], []).append(r)
    trl_key = next((k for k in sides if k.startswith("TRL")), None)
    trl_sps = statistics.median(r["samples_per_s"] for r in sides[trl_key]) if trl_key else None
    pooled = [
        {
            "name": f"{k} (median of {len(v)})",
            **{
                f: statistics.median(r[f] for r in v)
                for f in ("samples_per_s", "sampling", "training", "seconds", "cpu_seconds")
            },
        }
        for k, v in sides.items()
    ]
    out = [
        "per run (median over each run's measured iterations):",
        format_table(runs, trl_sps),
        "",
        "per side:",
        format_table(pooled, trl_sps),
        "",
        format_floor(result["floor"], {p["name"].split(" (")[0]: p["seconds"] for p in pooled}),
    ]
    best = {k: min(r["best_seconds"] for r in v) for k, v in sides.items()}
    floors = result.get("floors") or [result["floor"]]
    best_floor = {
        **result["floor"],
        "sampling": min(f["sampling"] for f in floors),
        "forward": min(f["forward"] for f in floors),
    }
    out += [
        "",
        "fastest iteration of each side (min over all its runs' measured iterations) against the fastest floor:",
        format_floor(best_floor, best),
    ]
    trl_lora = next((r["lora"] for r in runs if "lora" in r), None)
    if trl_lora:
        out.append(
            f"\ntrainable LoRA parameters: ours {result['floor']['lora_params']}, TRL "
            f"{trl_lora['trainable_params']} (TRL's ranks {trl_lora['lora_ranks']}); TRL "
            f"{next(r['versions'] for r in runs if 'versions' in r)}"
        )
    ours = next((p for p in pooled if p["name"].startswith("ours in-process")), None)
    if ours and trl_sps:
        ratio = ours["samples_per_s"] / trl_sps
        paired = paired_ratios(runs)
        out.append(
            f"\nours in-process / TRL samples/s = {ratio:.2f} (medians of the sides; target >= {TARGET}: "
            f"{'met' if ratio >= TARGET else 'NOT met'}); per pair "
            f"{', '.join(f'{x:.2f}' for x in paired)} (median {statistics.median(paired):.2f}); "
            f"fastest iterations {best[trl_key] / best['ours in-process']:.2f}"
        )
    return out


def main(argv: Optional[list[str]] = None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # trl_venv beside this file
    from trl_venv import DEFAULT_VENV

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=2, help="TRL/ours pairs, alternating A B A B")
    ap.add_argument("--ray-runs", type=int, default=1, help="runs of ours with the default 2 Ray rollout actors")
    ap.add_argument("--iterations", type=int, default=Shape.iterations, help="iterations per run")
    ap.add_argument("--warmup", type=int, default=Shape.warmup, help="first iterations of each run not counted")
    ap.add_argument("--threads", type=int, default=Shape.threads, help="torch threads of each side")
    ap.add_argument(
        "--checkpoint-every",
        type=int,
        default=Shape.checkpoint_every,
        help="ours: trainer.checkpoint_every (0: only the last iteration saves; TRL's side saves nothing)",
    )
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the trl 0.21 venv (created if missing)")
    ap.add_argument("--out", type=Path, default=None, help="work directory (pipeline, runs, results.json)")
    ap.add_argument("--profile", action="store_true", help="also one run of ours under cProfile (printed)")
    ap.add_argument(
        "--lockstep",
        type=int,
        default=20,
        help="rounds of the lockstep comparison (both sides loaded, one iteration each in turn; 0: off)",
    )
    ap.add_argument("--ours-lockstep-worker", nargs=3, metavar=("SPEC", "OUT", "FD"), help=argparse.SUPPRESS)
    ap.add_argument("--trl-lockstep-worker", nargs=3, metavar=("SPEC", "OUT", "FD"), help=argparse.SUPPRESS)
    ap.add_argument("--ours-worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--floor-worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ours_worker:
        _ours_worker(*args.ours_worker)
        return
    if args.ours_lockstep_worker:
        _ours_lockstep_worker(*args.ours_lockstep_worker[:2], int(args.ours_lockstep_worker[2]))
        return
    if args.trl_lockstep_worker:
        _trl_lockstep_worker(*args.trl_lockstep_worker[:2], int(args.trl_lockstep_worker[2]))
        return
    if args.floor_worker:
        spec = json.loads(Path(args.floor_worker[0]).read_text())
        floor = measure_floor(Shape(**spec["shape"]), Path(spec["model_dir"]), spec["prompts"])
        Path(args.floor_worker[1]).write_text(json.dumps(floor))
        return
    shape = Shape(
        iterations=args.iterations, warmup=args.warmup, threads=args.threads, checkpoint_every=args.checkpoint_every
    )
    shape.validate()
    if args.pairs < 0 or args.lockstep < 0 or args.pairs + args.lockstep == 0:
        ap.error(f"--pairs and --lockstep must be >= 0 and not both 0, got {args.pairs} and {args.lockstep}")
    print(summary(run_all(shape, args)))


if __name__ == "__main__":
    main()

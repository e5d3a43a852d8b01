"""`align train`: the RL recipe (ECG by default; GRPO and DDPO on the same parts).

One iteration, top to bottom:
  1. prompts for this iteration (seeded by iteration: the data position is the iteration index);
  2. rollouts with the policy LoRA (Ray rollout actors, or in-process) → ``Trajectory``;
  3. rewards (reward actors; validated: a bad plugin stops here, before any update) → scores (B, K);
     learner rank 0 is the driver: it alone rolls out and scores, the other ranks get their shards;
  4. per-reward running normalisation → value targets; advantages by algorithm;
  5. learner update (value-only while ECG's value pretraining runs), then weight sync: the policy
     LoRA (only) goes to the rollout actors with a new version;
  6. log line, TensorBoard, evaluation grids, atomic checkpoint.
At the end: reward-curve plot and exports (policy LoRA in diffusers format, critic).
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from align import checkpoint as ckpt
from align.algos.advantages import ADVANTAGES
from align.algos.core import PerPromptStatTracker, RunningMeanStd, explained_variance
from align.backbones.lora import attach_lora
from align.backbones.model_config import load_model
from align.distributed import assert_ranks_agree, make_accelerator, share_batch, share_path, shard_slice
from align.learner import Learner
from align.prompts import draw_prompts, evaluation_prompts
from align.rollout import RolloutWorker, start_workers
from align.run_identity import (append_resume_log, check_same_base, resolve_resume, run_identity,  # [resume-errors 0]
                                stored_identity)
from align.train_config import TrainConfig
from critics.export import base_fingerprint  # [resume-errors 0]
from critics.value_model import LatentCritic, critic_target_modules
from rewards import RewardError, build_rewards, parse_reward_specs


def chain_explained_variance(values: torch.Tensor, targets: torch.Tensor, first_step: int = 0) -> float:
    """Explained variance of V_k(s_i) against G_k over every (sample, step ≥ ``first_step``) pair,
    averaged over heads; measured on values predicted *before* the update, i.e. on held-out rollouts.
    Early states carry irreducible noise (the rest of the chain is still random), so the late half
    of the chain (``first_step = T // 2``) is where a critic can and must explain most variance."""
    values = values[:, first_step:]
    evs = [explained_variance(values[..., k].flatten(), targets[:, k, None].expand_as(values[..., k]).flatten())
           for k in range(targets.shape[1])]
    return float(np.nanmean(evs)) if not all(np.isnan(evs)) else float("nan")


def iteration_prompts(cfg: TrainConfig, iteration: int) -> list[str]:
    """``prompts_per_iteration`` prompts of ``trainer.prompts``, each repeated G times (grouped), seeded by
    iteration."""
    rng = np.random.default_rng([cfg.trainer.seed, iteration])
    base = draw_prompts(cfg.trainer.prompts, cfg.trainer.prompts_per_iteration, rng)
    return [p for p in base for _ in range(cfg.trainer.samples_per_prompt)]


@dataclasses.dataclass
class RunState:
    """Everything besides tensors that a resume needs (JSON)."""
    iteration: int = 0
    policy_started: bool = False
    policy_updates: int = 0
    normalisers: dict = dataclasses.field(default_factory=dict)
    tracker: dict = dataclasses.field(default_factory=dict)
    history: list = dataclasses.field(default_factory=list)
    skipped_batches: int = 0
    identity: dict = dataclasses.field(default_factory=dict)  # [resume-errors 0] run settings + base fingerprint


def build(cfg: TrainConfig):
    """Pipeline with the policy (and critic) adapters, the critic, rewards, worker and learner."""
    torch.manual_seed(cfg.trainer.seed)
    accelerator = make_accelerator(cfg)  # first: on GPUs it selects this process's device
    pipe = load_model(cfg.model)
    attach_lora(pipe, "policy", rank=cfg.lora.rank, alpha=cfg.lora.alpha)
    critic = None
    if cfg.algo == "ecg":
        adapter = "policy" if cfg.critic.adapter == "shared" else "critic"
        if adapter == "critic":
            attach_lora(pipe, "critic", rank=cfg.critic.rank,
                        target_modules=critic_target_modules(pipe, cfg.critic.feature_layer))
        critic = LatentCritic(pipe, [s.name for s in parse_reward_specs(cfg.rewards)], adapter=adapter,
                              hidden=cfg.critic.hidden, feature_layer=cfg.critic.feature_layer)
    specs = parse_reward_specs(cfg.rewards)
    reward_fns = build_rewards(specs, cfg.reward_args) if cfg.ray.num_reward_workers == 0 else []  # else: actors
    weights = torch.tensor([s.weight for s in specs], dtype=torch.float32)
    learner = Learner(pipe, critic, cfg, accelerator)
    worker = RolloutWorker(pipe, cfg.sampler)
    return pipe, critic, reward_fns, weights, learner, worker


def train(cfg: TrainConfig, resume: bool = False, stop_after: Optional[int] = None, log=print,
          force: bool = False) -> RunState:  # [resume-errors 0] force
    """Run the recipe; ``stop_after`` ends after that many iterations as an interruption would.
    ``resume``: continue from the newest complete checkpoint, refused if it is another run's unless
    ``force`` (align/run_identity.py)."""
    run = Path(cfg.run_dir)
    # [resume-errors 1] the newest complete checkpoint; its settings are checked before any model loads
    resume_from = resolve_resume(run, cfg, force) if resume else None
    run.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.num_threads > 0:
        torch.set_num_threads(cfg.trainer.num_threads)
    pipe, critic, reward_fns, weights, learner, worker = build(cfg)
    identity = run_identity(cfg, base_fingerprint(pipe))  # [resume-errors 2] settings + base fingerprint
    names = [s.name for s in parse_reward_specs(cfg.rewards)]
    accelerator, driver = learner.accelerator, learner.accelerator.is_main_process
    norms = {n: RunningMeanStd() for n in names}
    tracker = PerPromptStatTracker() if cfg.algo == "ddpo" else None
    state = RunState(policy_started=cfg.algo != "ecg" or cfg.critic.pretrain_iterations == 0)
    if resume_from is not None:
        check_same_base(stored_identity(resume_from), identity, run, force)  # [resume-errors 3] before loading
        state = _load(resume_from, learner, norms, tracker)
        learner.version = state.policy_updates
        log(f"resumed {run} at iteration {state.iteration} (from {resume_from.name})")
    state.identity = identity  # [resume-errors 4] stored in every checkpoint's state.json
    if not driver:
        log = _quiet
    if driver and resume_from is None:
        ckpt.write_json(run / "config.json", dataclasses.asdict(cfg))
    elif driver:  # [resume-errors 5] config.json stays the run's own; the resume's changes are appended
        append_resume_log(run, cfg, resume_from, state.iteration, force)
    writer = _tensorboard(run) if driver else None
    with start_workers(cfg, worker, reward_fns) if driver else contextlib.nullcontext() as workers:
        first = _sync(learner, workers)
        if driver and cfg.ray.num_rollout_workers:
            log(f"ray: {cfg.ray.num_rollout_workers} rollout actor(s), {cfg.ray.num_reward_workers} reward actor(s); "
                f"weight sync: {int(first['sync_bytes']):,} bytes (policy LoRA) "
                f"in {1000 * first['sync_seconds']:.1f} ms")
        state = _loop(cfg, state, learner, workers, norms, tracker, weights, names, writer, log, stop_after, run)
        if stop_after is not None and state.iteration >= stop_after:
            return state
        if driver:
            _eval_grid(workers.rollouts, cfg, run, state.iteration)
    if accelerator.num_processes > 1:
        n = assert_ranks_agree(accelerator, learner.policy_params + learner.critic_params)
        log(f"ranks agree: {accelerator.num_processes} learner processes hold bit-identical trainable weights "
            f"({n} values)")
    if driver:
        _plot_rewards(state.history, names, run / "reward_curve.png")
        _export(pipe, critic, cfg, state, run / "export")
        log(f"done: {state.iteration} iterations; exports in {run / 'export'}")
        writer.close()
    if accelerator.num_processes > 1:  # a process group left alive aborts a rank at exit ("terminate called")
        accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()
    return state


def _loop(cfg: TrainConfig, state: RunState, learner: Learner, workers, norms: dict, tracker, weights: torch.Tensor,
          names: list[str], writer, log, stop_after: Optional[int], run: Path) -> RunState:
    """Iterations ``state.iteration`` … ``trainer.iterations`` (or ``stop_after``), as in the module docstring."""
    accelerator, driver, critic = learner.accelerator, learner.accelerator.is_main_process, learner.critic
    bar = tqdm(range(state.iteration, cfg.trainer.iterations), desc=f"train {cfg.algo}", unit="it",
               initial=state.iteration, total=cfg.trainer.iterations, file=sys.stderr, disable=not driver)
    for it in bar:
        t0 = time.time()
        prompts = iteration_prompts(cfg, it)
        traj = raw = err = None
        if driver:
            traj = workers.rollouts.rollout(prompts, seed=cfg.trainer.seed * 100_003 + it)
            try:
                raw = workers.rewards.score(traj.images, prompts)  # raises RewardError before any update
            except RewardError as error:
                if cfg.reward_on_error == "raise":
                    raise
                traj, err = None, error
            traj = traj and dataclasses.replace(traj, images=None)  # the learner needs no pixels
        t_rollout = time.time() - t0
        traj, raw = share_batch(accelerator, traj, raw)  # this rank's shard, all scores; None: batch skipped
        if traj is None:
            state.skipped_batches, state.iteration = state.skipped_batches + 1, it + 1  # no update on this batch
            log(f"it {it + 1:>3} [skipped batch] {err} | skipped batches: {state.skipped_batches}")
            if driver:
                writer.add_scalar("skipped_batches", state.skipped_batches, it + 1)
            _save(run / "checkpoint", learner, state, norms, tracker)
            continue
        for k, n in enumerate(names):
            norms[n].update(raw[:, k])
        targets = _normalised(norms, names, raw)
        values = accelerator.gather(learner.values(traj)) if critic is not None else None  # (B, T, K), all ranks
        groups = torch.arange(len(prompts)) // cfg.trainer.samples_per_prompt
        adv = ADVANTAGES[cfg.algo](targets, weights, traj.num_steps, values=values, gae_lambda=cfg.critic.gae_lambda,
                                   group_ids=groups, prompts=prompts, tracker=tracker)
        ev = chain_explained_variance(values, targets) if values is not None else float("nan")
        train_policy = state.policy_started
        mine = shard_slice(accelerator, len(prompts))
        if critic is not None and not train_policy and cfg.critic.pretrain_replay > 0:  # refit on every batch so far
            learner.value_replay.add(traj, raw[mine])
            fit, fit_targets = learner.value_replay.batch(
                lambda r: _normalised(norms, names, r))
            stats = learner.update(fit, torch.zeros(fit.batch_size, fit.num_steps), fit_targets, None, False)
        else:
            stats = learner.update(traj, adv[mine], targets[mine] if critic is not None else None,
                                   values[mine] if values is not None else None, train_policy)
        state.policy_updates += int(train_policy)
        stats.update(_sync(learner, workers) if train_policy else {})
        if not state.policy_started and (ev >= cfg.critic.pretrain_ev_threshold
                                         or it + 1 >= cfg.critic.pretrain_iterations):
            state.policy_started = True
            learner.value_replay.clear()
            log(f"value pretraining done after {it + 1} iterations (explained variance {ev:.3f}); "
                "policy updates start")
        record = {"iteration": it + 1, "phase": "policy" if train_policy else "value-pretrain",
                  "samples_seen": (it + 1) * len(prompts), "explained_variance": ev,
                  "explained_variance_late": chain_explained_variance(values, targets, traj.num_steps // 2)
                  if values is not None else float("nan"),
                  "seconds": time.time() - t0, "rollout_seconds": t_rollout,
                  **{f"reward/{n}": float(raw[:, k].mean()) for k, n in enumerate(names)},
                  "reward/weighted": float((raw @ weights).mean()), **stats}
        state.history.append(record)
        state.iteration = it + 1
        if driver:
            _log_iteration(log, writer, record)
            if cfg.eval_every and state.iteration % cfg.eval_every == 0:
                _eval_grid(workers.rollouts, cfg, run, state.iteration)
        _save(run / "checkpoint", learner, state, norms, tracker)
        if stop_after is not None and state.iteration >= stop_after:
            break
    return state


def _sync(learner: Learner, workers) -> dict[str, float]:
    """Weight sync: every rank gathers the policy LoRA (a collective under ZeRO-3); the driver puts it
    once in the object store with the learner's version and the rollout workers load it."""
    policy = learner.policy_state()
    if workers is None:
        return {}
    sync = workers.rollouts.set_policy(policy, learner.version)
    return {"sync_bytes": float(sync.bytes), "sync_seconds": sync.seconds}


def _quiet(*_args, **_kwargs) -> None:
    """Log of the ranks other than the driver."""


def _normalised(norms: dict, names: list[str], raw: torch.Tensor) -> torch.Tensor:
    """Raw scores (B, K) → each reward's running-normalised value target (B, K)."""
    return torch.stack([norms[n].normalise(raw[:, k]) for k, n in enumerate(names)], dim=1).float()


def _log_iteration(log, writer, record: dict) -> None:
    parts = [f"it {record['iteration']:>3} [{record['phase']}]"]
    parts += [f"{k.split('/', 1)[1]} {v:.3f}" for k, v in record.items() if k.startswith("reward/")]
    for key, label in (("value_loss", "vloss"), ("explained_variance", "EV"), ("explained_variance_late", "EV-late"),
                       ("approx_kl", "kl"),
                       ("clip_frac", "clip"), ("policy_loss", "pg")):
        if key in record and record[key] == record[key]:
            parts.append(f"{label} {record[key]:.4f}")
    parts.append(f"{record['seconds']:.1f}s")
    log(" | ".join(parts))
    for key, val in record.items():
        if isinstance(val, (int, float)) and key != "iteration" and val == val:
            writer.add_scalar(key, val, record["iteration"])


def _tensorboard(run: Path):
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=str(run / "tensorboard"))


def _eval_grid(rollouts, cfg: TrainConfig, run: Path, iteration: int) -> None:
    """PNG grid of the fixed evaluation prompts (fixed seed), one per evaluation."""
    from torchvision.utils import make_grid, save_image

    prompts = evaluation_prompts(cfg.trainer.prompts, cfg.eval_prompts, seed=cfg.trainer.seed + 1234)
    traj = rollouts.rollout(prompts, seed=4321)
    (run / "grids").mkdir(exist_ok=True)
    save_image(make_grid(traj.images, nrow=8, padding=2, pad_value=0.5), run / "grids" / f"iter_{iteration:04d}.png")


def _plot_rewards(history: list[dict], names: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [h["samples_seen"] for h in history]
    for n in names + ["weighted"]:
        ax.plot(x, [h[f"reward/{n}"] for h in history], label=n)
    starts = [h["samples_seen"] for h in history if h["phase"] == "policy"]
    if starts:
        ax.axvline(starts[0], color="grey", ls="--", lw=0.8, label="policy updates start")
    ax.set_xlabel("samples seen")
    ax.set_ylabel("mean reward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _save(directory: Path, learner: Learner, state: RunState, norms: dict, tracker) -> None:
    """Atomic checkpoint; every rank calls: rank 0 writes the shared state, each rank its own
    optimiser partition (DeepSpeed) into rank 0's temp dir before it is renamed into place."""
    state.normalisers = {n: r.state_dict() for n, r in norms.items()}
    state.tracker = tracker.state_dict() if tracker is not None else {}
    main = learner.accelerator.is_main_process
    # [resume-errors 6] complete_marker=True (align/checkpoint.py: resume finds the newest complete checkpoint)
    with ckpt.atomic_directory(directory, complete_marker=True) if main else contextlib.nullcontext() as tmp:
        tmp = Path(share_path(learner.accelerator, str(tmp) if main else None))
        learner.save_partition(tmp)
        learner.accelerator.wait_for_everyone()
        if main:
            learner.save(tmp)
            rng_t, rng_meta = ckpt.rng_state()
            ckpt.save_tensors(tmp / "rng.safetensors", rng_t)
            ckpt.write_json(tmp / "state.json", {**dataclasses.asdict(state), "rng": rng_meta})


def _load(directory: Path, learner: Learner, norms: dict, tracker) -> RunState:
    raw = ckpt.read_json(directory / "state.json")
    rng_meta = raw.pop("rng")
    state = RunState(**raw)
    learner.load(directory)
    ckpt.restore_rng_state(ckpt.load_tensors(directory / "rng.safetensors"), rng_meta)
    for n, r in norms.items():
        r.load_state_dict(state.normalisers[n])
    if tracker is not None:
        tracker.load_state_dict(state.tracker)
    return state


def _export(pipe, critic: Optional[LatentCritic], cfg: TrainConfig, state: RunState, out: Path) -> None:
    """Policy LoRA in diffusers' format and the critic as an HF-style directory (critics/export.py;
    ``state.normalisers`` is current: every iteration's checkpoint refreshes it)."""
    from critics.export import export_pipeline, run_export_kwargs
    export_pipeline(pipe, critic, out, **run_export_kwargs(cfg, dataclasses.asdict(state)))


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m align.train [CONFIG] [key=value ...] [--resume RUN_DIR]``: ``align train``, in the form
    that ``accelerate launch -m align.train ...`` starts on every learner process."""
    from align.cli import main as cli_main
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

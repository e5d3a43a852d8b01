"""`align train`: the RL recipe (ECG by default; GRPO and DDPO on the same parts).

One iteration, top to bottom, over one record (align/algos/batch.py ``Batch``):
  1. collect: prompts for this iteration (seeded by iteration: the data position is the iteration
     index); rollouts with the policy LoRA (Ray rollout actors, or in-process) → ``Trajectory``;
  2. score: rewards (reward actors; validated: a bad plugin stops here, before any update) → raw (B, K);
     learner rank 0 is the driver: it alone rolls out and scores, the other ranks get their shards;
     per-reward running normalisation → value targets;
  3. estimate: the critic's values (if the algorithm has one) and the algorithm's advantages (B, T);
  4. update: the algorithm's update through the learner (policy PPO, critic regression);
  5. sync: the policy LoRA (only) goes to the rollout actors with a new version;
  6. log line, TensorBoard, evaluation grids, atomic checkpoint.
The algorithm (align/algos/registry.py) decides each iteration's phase (ECG: value pretraining, then
policy); every algorithm runs ``trainer.iterations`` policy iterations. At the end: reward-curve plot
and exports (policy LoRA in diffusers format, critic).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from align import checkpoint as ckpt
from align import snapshots
from align.algos.batch import Batch
from align.algos.core import RunningMeanStd, explained_variance
from align.algos.registry import POLICY, VALUE_PRETRAIN, Algorithm, make_algorithm
from align.distributed import (
    assert_ranks_agree,
    gathered_model,
    init_trackers,
    make_accelerator,
    sampling_pipe,
    shard_slice,
    share_batch,
    share_path,
)
from align.learner import Learner
from align.policy import build_critic, build_policy
from align.prompts import draw_prompts, evaluation_prompts, has_records, prompt_metadata
from align.rollout import RolloutWorker, start_workers
from align.rollout.overlap import RolloutsAhead
from align.run_identity import append_resume_log, check_same_base, resolve_resume, run_identity, stored_identity
from align.sampling import Trajectory
from align.train_config import TrainConfig
from critics.export import base_fingerprint
from critics.value_model import LatentCritic
from rewards import RewardError, build_rewards


def chain_explained_variance(values: torch.Tensor, targets: torch.Tensor, first_step: int = 0) -> float:
    """Explained variance of V_k(s_i) against G_k over every (sample, step ≥ ``first_step``) pair,
    averaged over heads; measured on values predicted *before* the update, i.e. on held-out rollouts.
    Early states carry irreducible noise (the rest of the chain is still random), so the late half
    of the chain (``first_step = T // 2``) is where a critic can and must explain most variance."""
    values = values[:, first_step:]
    evs = [
        explained_variance(values[..., k].flatten(), targets[:, k, None].expand_as(values[..., k]).flatten())
        for k in range(targets.shape[1])
    ]
    return float(np.nanmean(evs)) if not all(np.isnan(evs)) else float("nan")


def per_step_explained_variance(values: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """EV of V_k(s_i) against G_k at each step i (averaged over heads): values (B, T, K), targets (B, K) → T."""
    return [chain_explained_variance(values[:, i : i + 1], targets) for i in range(values.shape[1])]


def iteration_prompts(cfg: TrainConfig, iteration: int) -> list[str]:
    """``prompts_per_iteration`` prompts of ``trainer.prompts``, each repeated G times (grouped), seeded by
    iteration."""
    rng = np.random.default_rng([cfg.trainer.seed, iteration])
    base = draw_prompts(cfg.trainer.prompts, cfg.trainer.prompts_per_iteration, rng)
    return [p for p in base for _ in range(cfg.trainer.samples_per_prompt)]


@dataclasses.dataclass
class RunState:
    """Everything besides tensors that a resume needs (JSON)."""

    iteration: int = 0  # iterations done (the data position), value pretraining included
    policy_started: bool = False
    policy_updates: int = 0
    value_iterations: int = 0  # iterations spent in value pretraining (ECG)
    normalisers: dict = dataclasses.field(default_factory=dict)
    algorithm: dict = dataclasses.field(default_factory=dict)  # the algorithm's JSON state (DDPO's tracker)
    history: list = dataclasses.field(default_factory=list)
    skipped_batches: int = 0
    consecutive_skipped: int = 0
    identity: dict = dataclasses.field(default_factory=dict)  # run-defining settings + base fingerprint
    # learner.max_policy_lag=1: the policy version sampling the next batch when the checkpoint was written
    # (its LoRA is behaviour_lora.safetensors), so that a resume samples that batch as the run did
    behaviour_version: Optional[int] = None


def build(cfg: TrainConfig):
    """Pipeline with the policy (and critic) adapters, the critic, rewards, worker and learner."""
    torch.manual_seed(cfg.trainer.seed)
    accelerator = make_accelerator(cfg)  # first: on GPUs it selects this process's device
    pipe = build_policy(cfg)  # as the rollout actors and export build it (align/policy.py)
    specs = cfg.reward_specs()
    critic = build_critic(pipe, cfg, [s.name for s in specs]) if make_algorithm(cfg).needs_critic else None
    reward_fns = build_rewards(specs) if cfg.ray.num_reward_workers == 0 else []  # else: actors
    weights = torch.tensor([s.weight for s in specs], dtype=torch.float32)
    learner = Learner(pipe, critic, cfg, accelerator)
    worker = RolloutWorker(pipe, cfg.sampler)
    return pipe, critic, reward_fns, weights, learner, worker


def train(
    cfg: TrainConfig, resume: bool = False, stop_after: Optional[int] = None, log=print, force: bool = False
) -> RunState:
    """Run the recipe; ``stop_after`` ends after that many iterations as an interruption would.
    ``resume``: continue from the newest complete checkpoint, refused if it is another run's unless
    ``force`` (align/run_identity.py)."""
    run = Path(cfg.run_dir)
    # the newest complete checkpoint; its settings are checked before any model loads
    resume_from = resolve_resume(run, cfg, force) if resume else None
    run.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.num_threads > 0:
        torch.set_num_threads(cfg.trainer.num_threads)
    pipe, critic, reward_fns, weights, learner, worker = build(cfg)
    with gathered_model(learner):  # ZeRO-3 partitions the base: every rank gathers it to hash it
        identity = run_identity(cfg, base_fingerprint(pipe))  # run-defining settings + base fingerprint
    algo = make_algorithm(cfg)
    names = [s.name for s in cfg.reward_specs()]
    accelerator, driver = learner.accelerator, learner.accelerator.is_main_process
    norms = {n: RunningMeanStd() for n in names}
    state = RunState(policy_started=not algo.pretrains_value())
    if resume_from is not None:
        check_same_base(stored_identity(resume_from), identity, run, force)  # before any state is loaded
        state = _load(resume_from, learner, norms, algo)
        learner.version = state.policy_updates
        log(f"resumed {run} at iteration {state.iteration} (from {resume_from.name})")
    state.identity = identity  # stored in every checkpoint's state.json
    if not driver:
        log = _quiet
    if driver and resume_from is None:
        ckpt.write_json(run / "config.json", dataclasses.asdict(cfg))
    elif driver:  # config.json stays the run's own; the resume's changes are appended
        append_resume_log(run, cfg, resume_from, state.iteration, force)
    with _tracking(accelerator, cfg):  # accelerate's trackers (main process only), ended on every path
        with start_workers(cfg, worker, reward_fns) if driver else contextlib.nullcontext() as workers:
            first = _sync(learner, workers)
            if driver and cfg.ray.num_rollout_workers:
                log(
                    f"ray: {cfg.ray.num_rollout_workers} rollout actor(s), "
                    f"{cfg.ray.num_reward_workers} reward actor(s); "
                    f"weight sync: {int(first['sync_bytes']):,} bytes (policy LoRA) "
                    f"in {1000 * first['sync_seconds']:.1f} ms"
                )
            state = _loop(
                cfg,
                state,
                algo,
                learner,
                workers,
                norms,
                weights,
                names,
                accelerator,
                log,
                stop_after,
                run,
                resume_from,
            )
            if stop_after is not None and state.iteration >= stop_after:
                return state
            if driver:
                _eval_grid(workers.rollouts, cfg, run, state.iteration, accelerator.trackers)
        if cfg.final_eval_prompts and has_records(cfg.trainer.prompts):
            eval_pipe = sampling_pipe(cfg, learner, pipe)  # every rank; under ZeRO-3 a copy with the gathered LoRA
            if driver:
                _final_evaluation(eval_pipe, cfg, run, log)
        with gathered_model(learner):  # under ZeRO-3 every rank gathers the whole weights for the check and export
            if accelerator.num_processes > 1:
                n = assert_ranks_agree(accelerator, learner.policy_params + learner.critic_params)
                log(
                    f"ranks agree: {accelerator.num_processes} learner processes hold bit-identical trainable "
                    f"weights ({n} values)"
                )
            if driver:
                _plot_rewards(state.history, names, run / "reward_curve.png")
                _export(pipe, critic, cfg, state, run / "export")
                log(f"done: {state.iteration} iterations; exports in {run / 'export'}")
    if accelerator.num_processes > 1:  # a process group left alive aborts a rank at exit ("terminate called")
        accelerator.wait_for_everyone()
        accelerator.end_training()  # the trackers are finished (_tracking): this destroys the process group
    return state


def _finished(cfg: TrainConfig, state: RunState) -> bool:
    """Every algorithm runs ``trainer.iterations`` policy iterations, after any value pretraining."""
    return state.policy_started and state.iteration - state.value_iterations >= cfg.trainer.iterations


@dataclasses.dataclass
class _Loop:
    """The parts every iteration reads: fixed for the run."""

    cfg: TrainConfig
    algo: Algorithm
    learner: Learner
    workers: object
    norms: dict
    weights: torch.Tensor
    names: list[str]
    tracker: object  # the Accelerator: its log() reaches the trackers, on the main process only
    log: object
    run: Path
    ahead: Optional[RolloutsAhead]  # learner.max_policy_lag=1: the next batch, collected while this one trains


def _loop(
    cfg: TrainConfig,
    state: RunState,
    algo: Algorithm,
    learner: Learner,
    workers,
    norms: dict,
    weights: torch.Tensor,
    names: list[str],
    tracker,
    log,
    stop_after: Optional[int],
    run: Path,
    resumed_from: Optional[Path] = None,
) -> RunState:
    """Iterations from ``state.iteration`` until :func:`_finished` (or ``stop_after``), as in the module docstring."""
    driver = learner.accelerator.is_main_process
    planned = cfg.trainer.iterations + (
        state.value_iterations if state.policy_started else max(cfg.critic.pretrain_iterations, state.value_iterations)
    )
    bar = tqdm(
        desc=f"train {cfg.algo}", unit="it", initial=state.iteration, total=planned, file=sys.stderr, disable=not driver
    )
    overlap = driver and cfg.learner.max_policy_lag >= 1  # the next batch is sampled while this one trains
    ahead = RolloutsAhead(functools.partial(_rollout_and_score, cfg, workers)) if overlap else None
    loop = _Loop(cfg, algo, learner, workers, norms, weights, names, tracker, log, run, ahead)
    behaviour = _resumed_behaviour(state, workers, resumed_from) if overlap else None
    try:
        while not _finished(cfg, state) and (stop_after is None or state.iteration < stop_after):
            behaviour = _iteration(loop, state, behaviour)
            bar.update(1)
    finally:
        if ahead is not None:
            ahead.close()  # a batch collected ahead for an iteration that does not come is dropped
    bar.close()
    return state


def _iteration(loop: _Loop, state: RunState, behaviour):
    """One iteration, top to bottom (the module docstring). ``behaviour``: ``(handle, LoRA state)`` of the
    policy that sampled this iteration's batch ahead (None: sample it now with the current policy); returns
    that of the next iteration's batch, if it is now being collected ahead."""
    cfg, algo, learner, workers, norms, weights, names = (
        loop.cfg,
        loop.algo,
        loop.learner,
        loop.workers,
        loop.norms,
        loop.weights,
        loop.names,
    )
    accelerator, driver = learner.accelerator, learner.accelerator.is_main_process
    normalise = functools.partial(_normalised, norms, names)  # raw (B, K) → value targets (B, K)
    t0, it, phase, timing = time.time(), state.iteration, algo.phase(state), {}
    prompts = iteration_prompts(cfg, it)
    # 1-2. rollouts, rewards (with max_policy_lag=1: collected while the previous batch trained)
    traj, raw, error = _collect(cfg, workers, accelerator, it, timing, loop.ahead, behaviour and behaviour[0])
    behaviour = None
    if traj is None:
        _skip_batch(cfg, state, algo, learner, norms, phase, error, loop.tracker, loop.log, loop.run)
        return None
    lag = learner.version - traj.policy_version
    if loop.ahead is not None and not _last_iteration(cfg, state):  # sample it + 1 while this batch trains
        behaviour = (workers.rollouts.current_policy(), learner.policy_state())
        loop.ahead.start(it + 1, behaviour[0])
    for k, n in enumerate(names):
        norms[n].update(raw[:, k])
    groups = torch.arange(len(prompts)) // cfg.trainer.samples_per_prompt
    batch = Batch(
        traj=traj,
        prompts=prompts,
        group_ids=groups,
        raw=raw,
        targets=normalise(raw),
        shard=shard_slice(accelerator, len(prompts)),
    )
    with _timed(timing, "values"):  # 3. estimate
        if algo.needs_critic:
            batch.values = accelerator.gather(learner.values(traj))  # (B, T, K), all ranks
        batch.advantages = algo.advantages(batch, weights)
    with _timed(timing, "update"):  # 4. update
        stats = algo.update(learner, batch, phase, normalise)
    with _timed(timing, "sync"):  # 5. sync
        if phase == POLICY:
            state.policy_updates += 1
            stats.update(_sync(learner, workers, push=loop.ahead is None))
            if driver and snapshots.due(cfg.trainer.snapshot_every, state.policy_updates):
                snapshots.save_snapshot(loop.run, state.policy_updates, learner.policy_state())
    state.iteration, state.consecutive_skipped = it + 1, 0  # 6. log, checkpoint
    state.value_iterations += phase == VALUE_PRETRAIN
    with _timed(timing, "eval"):
        if driver and cfg.eval_every and state.iteration % cfg.eval_every == 0:
            _eval_grid(workers.rollouts, cfg, loop.run, state.iteration, accelerator.trackers)
    record = _record(batch, weights, names, phase, it, t0, timing, {**stats, "policy_lag": float(lag)})
    state.history.append(record)
    algo.end_iteration(state, record, loop.log)
    with _timed(timing, "checkpoint"):
        if state.iteration % cfg.trainer.checkpoint_every == 0 or _finished(cfg, state):
            _save(loop.run / "checkpoint", learner, state, norms, algo, behaviour)
    if driver:  # (the checkpoint's own seconds are logged, not part of the record it saved)
        _log_iteration(loop.log, loop.tracker, {**record, "timing/checkpoint": timing["checkpoint"]})
    return behaviour


def _last_iteration(cfg: TrainConfig, state: RunState) -> bool:
    """Whether the iteration now running is certainly the run's last (ECG's switch to the policy phase is
    decided at the end of an iteration, so during value pretraining there is always a next one). ``stop_after``
    does not count: it stops a run as a kill would, with the next batch in flight."""
    return state.policy_started and state.iteration + 1 - state.value_iterations >= cfg.trainer.iterations


def _resumed_behaviour(state: RunState, workers, resumed_from: Optional[Path]):
    """After a resume of an overlapped run, the policy that sampled (in the interrupted run) the batch of the
    next iteration: the checkpoint's ``behaviour_lora``; None on a fresh run (the first batch is on-policy)."""
    if resumed_from is None or state.behaviour_version is None:
        return None
    path = resumed_from / "behaviour_lora.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the checkpoint of an overlapped run (max_policy_lag=1) is incomplete"
        )
    lora = ckpt.load_tensors(path)
    return workers.rollouts.policy_handle(lora, state.behaviour_version), lora


@contextlib.contextmanager
def _timed(timing: dict[str, float], phase: str):
    """Add the block's wall-clock seconds to ``timing[phase]`` (verl's ``timing/<phase>``)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timing[phase] = timing.get(phase, 0.0) + time.perf_counter() - t0


def _rollout_and_score(
    cfg: TrainConfig, workers, it: int, policy=None
) -> tuple[Optional[Trajectory], Optional[torch.Tensor], Optional[RewardError], dict[str, float]]:
    """The driver's part of steps 1-2: iteration ``it``'s rollouts (by ``policy``, else the rollout group's
    current one) and raw rewards (B, K), with their seconds; ``(None, None, error, ...)`` when a reward failed
    and ``reward_on_error=skip_batch``. Runs in the overlap thread with ``learner.max_policy_lag=1``."""
    timing: dict[str, float] = {}
    prompts = iteration_prompts(cfg, it)
    group = cfg.trainer.samples_per_prompt if cfg.trainer.shared_group_noise else 0
    raw = err = None
    with _timed(timing, "rollout"):
        extra = {} if policy is None else {"policy": policy}
        traj = workers.rollouts.rollout(prompts, seed=cfg.trainer.seed * 100_003 + it, group_size=group, **extra)
    records = prompt_metadata(cfg.trainer.prompts, prompts)  # GenEval-format clauses per sample (or None)
    with _timed(timing, "reward"):
        try:
            raw = workers.rewards.score(traj.images, prompts, prompt_metadata=records)  # before any update
        except RewardError as error:
            if cfg.reward_on_error == "raise":
                raise
            traj, err = None, error
    traj = traj and dataclasses.replace(traj, images=None)  # the learner needs no pixels
    return traj, raw, err, timing


def _collect(
    cfg: TrainConfig, workers, accelerator, it: int, timing: dict[str, float], ahead=None, policy=None
) -> tuple[Optional[Trajectory], Optional[torch.Tensor], Optional[RewardError]]:
    """Rollouts and raw rewards on the driver (from ``ahead`` when it collected them while the last batch
    trained: ``timing/rollout_wait`` is how long the learner still waited), then this rank's shard of the
    trajectory and all the scores."""
    traj = raw = err = None
    if accelerator.is_main_process:
        if ahead is not None:
            with _timed(timing, "rollout_wait"):
                traj, raw, err, seconds = ahead.take(it, policy)
        else:
            traj, raw, err, seconds = _rollout_and_score(cfg, workers, it)
        timing.update(seconds)
    with _timed(timing, "share"):
        traj, raw = share_batch(accelerator, traj, raw)  # this rank's shard, all scores; None: batch skipped
    return traj, raw, err


def _skip_batch(
    cfg: TrainConfig,
    state: RunState,
    algo: Algorithm,
    learner: Learner,
    norms: dict,
    phase: str,
    error: Optional[RewardError],
    tracker,
    log,
    run: Path,
) -> None:
    """No update on a batch whose reward failed; it still uses its iteration. ``max_consecutive_skipped``
    skipped in a row stop the run (a reward that always fails would otherwise train nothing and exit 0)."""
    state.skipped_batches, state.consecutive_skipped = state.skipped_batches + 1, state.consecutive_skipped + 1
    state.iteration += 1
    state.value_iterations += phase == VALUE_PRETRAIN
    log(f"it {state.iteration:>3} [skipped batch] {error} | skipped batches: {state.skipped_batches}")
    tracker.log({"skipped_batches": state.skipped_batches}, step=state.iteration)
    algo.end_iteration(state, {"explained_variance_late": float("nan")}, log)
    _save(run / "checkpoint", learner, state, norms, algo)
    if state.consecutive_skipped >= cfg.trainer.max_consecutive_skipped:
        raise RewardError(
            f"trainer.max_consecutive_skipped: {state.consecutive_skipped} batches in a row were skipped "
            f"(reward_on_error=skip_batch); the last error: {error}"
        )


def _record(
    batch: Batch,
    weights: torch.Tensor,
    names: list[str],
    phase: str,
    it: int,
    t0: float,
    timing: dict[str, float],
    stats: dict,
) -> dict:
    """The iteration's history entry: rewards, critic EV (overall, late half, per step), per-step advantage
    variance, the learner's statistics, per-phase seconds (``timing/<phase>``) and samples/s."""
    raw, values, targets = batch.raw, batch.values, batch.targets
    seconds = time.time() - t0
    critic = {}
    if values is not None:
        critic = {
            "explained_variance": chain_explained_variance(values, targets),
            "explained_variance_late": chain_explained_variance(values, targets, batch.num_steps // 2),
            "explained_variance_per_step": per_step_explained_variance(values, targets),
        }
    return {
        "iteration": it + 1,
        "phase": phase,
        "samples_seen": (it + 1) * len(batch.prompts),
        "explained_variance": float("nan"),
        "explained_variance_late": float("nan"),
        **critic,
        "advantage_var_per_step": [float(v) for v in batch.advantages.var(dim=0, unbiased=False)],
        "advantage_mean_per_step": [float(v) for v in batch.advantages.mean(dim=0)],
        "seconds": seconds,
        "samples_per_s": len(batch.prompts) / seconds,
        **{f"timing/{k}": v for k, v in timing.items()},
        **{f"reward/{n}": float(raw[:, k].mean()) for k, n in enumerate(names)},
        "reward/weighted": float((raw @ weights).mean()),
        **stats,
    }


def _sync(learner: Learner, workers, push: bool = True) -> dict[str, float]:
    """Weight sync: every rank gathers the policy LoRA (a collective under ZeRO-3); the driver puts it
    once in the object store with the learner's version and the rollout workers load it (``push=False``:
    each actor loads it with its next request, as the overlapped loop needs)."""
    policy = learner.policy_state()
    if workers is None:
        return {}
    sync = workers.rollouts.set_policy(policy, learner.version, **({} if push else {"push": False}))
    return {"sync_bytes": float(sync.bytes), "sync_seconds": sync.seconds}


def _quiet(*_args, **_kwargs) -> None:
    """Log of the ranks other than the driver."""


def _normalised(norms: dict, names: list[str], raw: torch.Tensor) -> torch.Tensor:
    """Raw scores (B, K) → each reward's running-normalised value target (B, K)."""
    return torch.stack([norms[n].normalise(raw[:, k]) for k, n in enumerate(names)], dim=1).float()


def _log_iteration(log, tracker, record: dict) -> None:
    """The console line, and the record's numbers to the trackers (``tracker.log``: an Accelerator's)."""
    parts = [f"it {record['iteration']:>3} [{record['phase']}]"]
    parts += [f"{k.split('/', 1)[1]} {v:.3f}" for k, v in record.items() if k.startswith("reward/")]
    for key, label in (
        ("value_loss", "vloss"),
        ("explained_variance", "EV"),
        ("explained_variance_late", "EV-late"),
        ("approx_kl", "kl"),
        ("clip_frac", "clip"),
        ("policy_loss", "pg"),
        ("grad_norm_policy", "|g|pi"),
        ("grad_norm_critic", "|g|V"),
    ):
        if key in record and record[key] == record[key]:
            parts.append(f"{label} {record[key]:.4f}")
    if "explained_variance_per_step" in record:
        parts.append("EV/step " + ",".join(f"{e:.2f}" for e in record["explained_variance_per_step"]))
    timing = " ".join(
        f"{k.split('/', 1)[1]} {v:.1f}" for k, v in record.items() if k.startswith("timing/") and v >= 0.05
    )
    parts.append(f"{record['seconds']:.1f}s ({timing}) {record['samples_per_s']:.1f} samples/s")
    log(" | ".join(parts))
    scalars = {
        key: val for key, val in record.items() if isinstance(val, (int, float)) and key != "iteration" and val == val
    }
    tracker.log(scalars, step=record["iteration"])


@contextlib.contextmanager
def _tracking(accelerator, cfg: TrainConfig):
    """accelerate's trackers of ``cfg.log_with`` (align/distributed.py), started here and finished however
    the run ends (an error, ``stop_after``, done). The tracker half of ``accelerator.end_training()``: its
    other half destroys the process group, which a ``stop_after`` return leaves up (train() destroys it at
    the end of a finished multi-process run)."""
    init_trackers(accelerator, cfg)
    try:
        yield
    finally:
        trackers, accelerator.trackers = list(accelerator.trackers), []
        for tracker in trackers:
            tracker.finish()


def _log_grid(trackers, grid: torch.Tensor, iteration: int) -> None:
    """The evaluation grid (C, H, W in [0, 1]) as the image ``eval/grid`` of each tracker."""
    from PIL import Image

    chw = grid.detach().float().clamp(0, 1).cpu().numpy()
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"eval/grid": chw[None]}, step=iteration, dataformats="NCHW")
        elif tracker.name == "wandb":
            hwc = (chw.transpose(1, 2, 0) * 255).round().astype(np.uint8)
            tracker.log_images({"eval/grid": [Image.fromarray(hwc)]}, step=iteration)


def _eval_grid(rollouts, cfg: TrainConfig, run: Path, iteration: int, trackers=()) -> None:
    """PNG grid of the fixed evaluation prompts (fixed seed), one per evaluation; also an image of each
    of ``trackers`` (the Accelerator's)."""
    from torchvision.utils import make_grid, save_image

    prompts = evaluation_prompts(cfg.trainer.prompts, cfg.eval_prompts, seed=cfg.trainer.seed + 1234)
    traj = rollouts.rollout(prompts, seed=4321)
    (run / "grids").mkdir(exist_ok=True)
    grid = make_grid(traj.images, nrow=8, padding=2, pad_value=0.5)
    save_image(grid, run / "grids" / f"iter_{iteration:04d}.png")
    _log_grid(trackers, grid, iteration)


def _final_evaluation(pipe, cfg: TrainConfig, run: Path, log) -> dict:
    """``RUN_DIR/eval.json``: the base (adapters disabled) and the trained policy on the same fixed prompts
    and noise, scored GenEval's way (align/eval.py ``paired_evaluation``: strict accuracy, mean over tags,
    paired gain with its standard error, per tag; ``final_eval_prompts`` tag-balanced (prompt, noise) pairs)."""
    from align.eval import balanced_items, paired_evaluation

    items = balanced_items(cfg.trainer.prompts, cfg.final_eval_prompts)
    result = paired_evaluation(
        pipe,
        cfg.trainer.prompts,
        cfg.sampler,
        geneval_args=cfg.reward_args_of("geneval"),
        items=items,
        seed=cfg.trainer.seed,
        batch_size=32,  # ~15 % faster than 8 on the toy (noise is per item; a drawn SDE window per call)
    )
    ckpt.write_json(run / "eval.json", result)
    log(
        f"eval ({result['num_images']} images of {result['num_prompts']} prompts, fixed noise): base "
        f"{result['base']:.3f} -> final {result['final']:.3f}, paired gain {result['paired_gain']:+.3f} "
        f"± {result['paired_se']:.3f} | per tag: "
        + ", ".join(f"{t} {v['base']:.2f}->{v['final']:.2f}" for t, v in result["per_tag"].items())
    )
    return result


#: batches in the running mean of the reward curve
SMOOTHING = 8


def _plot_rewards(history: list[dict], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [h["samples_seen"] for h in history]
    for n in names + ["weighted"] if len(names) > 1 else names:
        y = np.array([h[f"reward/{n}"] for h in history])
        (line,) = ax.plot(x, y, alpha=0.35, lw=0.8, label=f"{n} (batch)")
        if len(y) >= SMOOTHING:  # each batch has a few prompts: its mean follows the prompt mix, so also
            kernel = np.ones(SMOOTHING) / SMOOTHING  # the running mean of the last SMOOTHING batches
            ax.plot(
                x[SMOOTHING - 1 :],
                np.convolve(y, kernel, mode="valid"),
                color=line.get_color(),
                lw=1.8,
                label=f"{n} (mean of {SMOOTHING} batches)",
            )
    starts = [h["samples_seen"] for h in history if h["phase"] == "policy"]
    if starts:
        ax.axvline(starts[0], color="grey", ls="--", lw=0.8, label="policy updates start")
    ax.set_xlabel("samples seen")
    ax.set_ylabel("mean reward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _save(directory: Path, learner: Learner, state: RunState, norms: dict, algo: Algorithm, behaviour=None) -> None:
    """Atomic checkpoint; every rank calls: rank 0 writes the shared state, each rank its own
    optimiser partition (DeepSpeed: accelerate's save_state, align/distributed.py) and its part of the
    algorithm's state (ECG's replay) into rank 0's temp dir before it is renamed into place; no pickle.
    ``behaviour``: (handle, LoRA) of the policy sampling the next batch ahead (``learner.max_policy_lag=1``),
    so a resume samples that batch with the same weights."""
    state.normalisers = {n: r.state_dict() for n, r in norms.items()}
    state.algorithm = algo.state_dict()
    state.behaviour_version = None if behaviour is None else behaviour[0].version
    main = learner.accelerator.is_main_process
    # complete_marker: resume finds the newest complete checkpoint (align/checkpoint.py)
    with ckpt.atomic_directory(directory, complete_marker=True) if main else contextlib.nullcontext() as tmp:
        tmp = Path(share_path(learner.accelerator, str(tmp) if main else None))
        learner.save(tmp)  # every rank: collectives under DeepSpeed
        algo.save(learner.partition_dir(tmp))
        learner.accelerator.wait_for_everyone()
        if main:
            if behaviour is not None:
                ckpt.save_tensors(tmp / "behaviour_lora.safetensors", behaviour[1])
            rng_t, rng_meta = ckpt.rng_state()
            ckpt.save_tensors(tmp / "rng.safetensors", rng_t)
            ckpt.write_json(tmp / "state.json", {**dataclasses.asdict(state), "rng": rng_meta})
            ckpt.assert_no_pickle(tmp)


def _load(directory: Path, learner: Learner, norms: dict, algo: Algorithm) -> RunState:
    raw = ckpt.read_json(directory / "state.json")
    rng_meta = raw.pop("rng")
    state = RunState(**raw)
    learner.load(directory)
    ckpt.restore_rng_state(ckpt.load_tensors(directory / "rng.safetensors"), rng_meta)
    for n, r in norms.items():
        r.load_state_dict(state.normalisers[n])
    algo.load_state_dict(state.algorithm)
    algo.load(learner.partition_dir(directory))
    return state


def _export(pipe, critic: Optional[LatentCritic], cfg: TrainConfig, state: RunState, out: Path) -> None:
    """Policy LoRA in diffusers' format and the critic as an HF-style directory (critics/export.py;
    ``state.normalisers`` is current: every iteration's checkpoint refreshes it)."""
    from align.policy import run_export_kwargs
    from critics.export import export_pipeline

    export_pipeline(pipe, critic, out, **run_export_kwargs(cfg, dataclasses.asdict(state)))


if __name__ == "__main__":  # the older `python -m align.train ...` form; the CLI is `python -m align train ...`
    from align.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))

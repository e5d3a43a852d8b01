"""Learner-side distribution (never imports Ray): DeepSpeed through accelerate, batch sharding over
torch.distributed, gathering ZeRO-3's partitioned weights, and the learner's checkpoints.

Rank 0 is the driver: it alone talks to the rollout/reward actors. After scoring it sends every
rank the batch's shared fields (schedule, settings, prompts, scores) with ``broadcast_object_list``
and each rank its contiguous shard of the per-sample tensors by scatter, so rank r trains on samples
``[r·B/N, (r+1)·B/N)``. DeepSpeed averages the gradients, so an optimiser step sees the same
global minibatch as one process would.

Checkpoints (:func:`save_learner`, every rank, inside align/train.py's atomic temp dir; the layout is in
docs/cluster.md §Checkpoints). Under DeepSpeed (ZeRO 1, 2 or 3) the engine's state is saved by
``accelerator.save_state`` and loaded by ``accelerator.load_state``: DeepSpeed's own ``save_checkpoint``
/ ``load_checkpoint``, so each rank writes and reads its own ZeRO partition (fp32 master weights and Adam
moments; under ZeRO-3 also its slice of the trainable weights); nothing here reads DeepSpeed's optimiser
state (training touches one ZeRO-3 buffer: :func:`clear_stale_gradients`). What accelerate 1.x writes
there is pickle in several places, and the rule is no pickle, so:

- DeepSpeed serialises through its pluggable checkpoint engine: :func:`prepare_deepspeed` installs
  :func:`safetensors_engine`, which writes each state DeepSpeed hands it as one safetensors file
  (structure as JSON in the header, objects only of :data:`DEEPSPEED_CLASSES`) under DeepSpeed's
  own file names (``accelerate/pytorch_model/*_states.pt``, ``accelerate/latest``);
- accelerate's ``random_states_{rank}.pkl`` (torch.save) is deleted after the save (its load is
  allowed to fail), as are DeepSpeed's ``zero_to_fp32.py``/``zero_to_torch.py``, which read pickles;
  the RNGs are align/train.py's ``rng.safetensors`` + ``state.json``;
- ``register_for_checkpointing`` is not used: accelerate torch.saves registered objects to
  ``custom_checkpoint_{i}.pkl`` and reloads them with ``weights_only=False``. The run state stays
  align/train.py's JSON ``state.json``;
- without DeepSpeed accelerate would torch.save the optimisers (``optimizer.bin``), so the plain
  AdamW states are safetensors + JSON here (``optimizer_{group}.safetensors``, ``optimizer.json``).

Every rank also gives rank 0 the trainable weights, whole (gathered under ZeRO-3), as readable
``policy_lora`` / ``critic_lora`` / ``critic_heads`` safetensors; align/checkpoint.py's
``assert_no_pickle`` checks each checkpoint written and read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from align import checkpoint as ckpt
from align.errors import CheckpointError
from align.sampling import Trajectory
from align.sampling.trajectory import PER_SAMPLE, SETTINGS, SHARED

if TYPE_CHECKING:
    from align.learner import Learner

#: accelerator.save_state's directory inside a checkpoint (DeepSpeed only)
ENGINE_DIR = "accelerate"
#: the classes a DeepSpeed checkpoint state may hold besides tensors and JSON values
DEEPSPEED_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
#: what accelerate and DeepSpeed write besides the engine state, removed after a save (see above)
_DROPPED = ("random_states_{rank}.pkl", "zero_to_fp32.py", "zero_to_torch.py")


def make_accelerator(cfg) -> Accelerator:
    """Accelerator for ``cfg``: plain, or DeepSpeed from ``learner.deepspeed`` (a JSON path) or from the
    ``accelerate launch`` config. gloo when running on CPU (DeepSpeed would pick its own otherwise)."""
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, ProjectConfiguration

    launched_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    kwargs = {"cpu": cfg.model.device == "cpu" and not launched_ds}  # cpu=True disables DeepSpeed (accelerate/state.py)
    if cfg.model.device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    if cfg.learner.deepspeed:
        if not os.path.isfile(cfg.learner.deepspeed):
            raise ValueError(f"learner.deepspeed: no such DeepSpeed JSON: {cfg.learner.deepspeed}")
        with open(cfg.learner.deepspeed) as fh:
            kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=json.load(fh))
        kwargs["cpu"] = False
    run_dir = str(cfg.run_dir)
    accelerator = Accelerator(
        log_with=trackers(cfg) or None,
        project_config=ProjectConfiguration(project_dir=run_dir, logging_dir=run_dir),
        **kwargs,
    )
    check_zero3(cfg, accelerator)
    if accelerator.num_processes > 1 and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise ValueError(
            f"{accelerator.num_processes} learner processes need DeepSpeed: set learner.deepspeed="
            "launch/deepspeed/zero2.json or launch with launch/accelerate/multi_gpu.yaml"
        )
    return accelerator


#: the W&B project of every run (its run name is the run directory's name)
WANDB_PROJECT = "align"


def trackers(cfg) -> list:
    """``cfg.log_with`` for accelerate: ``"tensorboard"`` as is (:func:`init_trackers` names it so that it
    writes RUN_DIR/tensorboard), wandb as a tracker of project :data:`WANDB_PROJECT` whose files go to
    RUN_DIR/wandb (accelerate's own would take the project name from ``init_trackers``); the W&B mode
    comes from WANDB_MODE (offline: no network). Nothing is started here."""
    from accelerate.tracking import WandBTracker

    name = Path(cfg.run_dir).resolve().name
    return [WandBTracker(WANDB_PROJECT, dir=str(cfg.run_dir), name=name) if t == "wandb" else t for t in cfg.log_with]


def init_trackers(accelerator: Accelerator, cfg) -> None:
    """Start ``accelerator``'s trackers (main process only) with the config's scalars as their hyperparameters:
    TensorBoard events in RUN_DIR/tensorboard, W&B's run in RUN_DIR/wandb."""
    accelerator.init_trackers("tensorboard", config=flat_scalars(dataclasses.asdict(cfg)))


def flat_scalars(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [..]}`` → ``{"a.b": 1}``: the int, float, str and bool leaves, dotted keys."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_scalars(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            out[f"{prefix}{key}"] = value
    return out


def check_zero3(cfg, accelerator: Accelerator) -> None:
    """Under ZeRO-3 every forward pass is a collective over partitioned weights, so rank 0 cannot sample
    from the learner's pipeline alone (measured: in-process rollouts deadlock): refuse them in one line,
    before any model loads. Rollout actors sample from their own whole copy."""
    if zero_stage(accelerator) == 3 and cfg.ray.num_rollout_workers == 0:
        raise ValueError(
            "DeepSpeed ZeRO-3 partitions the learner's weights, so rank 0 cannot sample from them alone "
            "(in-process rollouts deadlock): set ray.num_rollout_workers >= 1, or use ZeRO-2"
        )


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int:
    """The DeepSpeed ZeRO stage (0 without DeepSpeed)."""
    return int(accelerator.state.deepspeed_plugin.zero_stage) if is_deepspeed(accelerator) else 0


def policy_step_window(cfg) -> int:
    """The policy trains the first ⌈trainer.step_window · T⌉ denoising steps (at least one)."""
    import math

    return max(1, math.ceil(cfg.trainer.step_window * cfg.sampler.num_inference_steps - 1e-9))


def policy_steps(cfg, traj) -> list[int]:
    """The steps the policy trains on a trajectory: its stochastic window's steps (align/sampling/window.py),
    or, when every step is stochastic, the first :func:`policy_step_window` of the chain."""
    if traj.sde_steps is not None:
        return traj.trainable_steps()
    return traj.trainable_steps(stop=min(traj.num_steps, policy_step_window(cfg)))


def steps_per_update(cfg) -> int:
    """Denoising steps trained per minibatch = backward passes per optimiser step (policy and critic alike):
    ``timestep_fraction`` of the policy's steps (the stochastic window's, else the first ``step_window``)."""
    from align.sampling.window import window_size

    trained = window_size(cfg.sampler) or policy_step_window(cfg)
    return max(1, round(cfg.trainer.timestep_fraction * trained))


def prepare_deepspeed(
    accelerator: Accelerator, cfg, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer
):
    """Wrap the trainable modules and a torch AdamW (no fused_adam build) in a DeepSpeed engine.

    The config's batch keys follow the trainer: micro batch = minibatch_size / N per rank,
    gradient accumulation = steps per update (one backward per trained denoising step),
    clipping = trainer.max_grad_norm."""
    n = accelerator.num_processes
    if cfg.trainer.minibatch_size % n:
        raise ValueError(
            f"trainer.minibatch_size={cfg.trainer.minibatch_size} must divide by the {n} learner processes"
        )
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    micro, gas = cfg.trainer.minibatch_size // n, steps_per_update(cfg)
    ds.update(
        {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": gas,
            "train_batch_size": micro * gas * n,
            "gradient_clipping": cfg.trainer.max_grad_norm,
        }
    )
    engine, optimizer = accelerator.prepare(torch.nn.ModuleDict(modules), optimizer)
    engine.checkpoint_engine = safetensors_engine()()  # DeepSpeed's checkpoints without pickle (above)
    return engine, optimizer


def assert_ranks_agree(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> int:
    """Raise unless every rank holds bit-identical ``params`` (under ZeRO-3 call it inside
    :func:`gathered_model`: each rank then compares the gathered whole); returns how many values were compared."""
    flat = torch.cat([p.detach().float().flatten() for p in params]).to(accelerator.device)
    every = accelerator.gather(flat[None])  # (N, P)
    differ = [r for r in range(every.shape[0]) if not torch.equal(every[r], every[0])]
    if differ:
        gap = float((every[differ[0]] - every[0]).abs().max())
        raise RuntimeError(
            f"learner ranks {differ} diverged from rank 0 (max |Δ| = {gap:.3g}): gradients were not "
            "averaged over the ranks"
        )
    return flat.numel()


# ---- ZeRO-3: whole weights when they are needed ------------------------------------------------
@contextlib.contextmanager
def gathered(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Under ZeRO-3 ``params`` whole on every rank for the block (a collective: every rank enters, and the
    block must not gather them again); re-partitioned after. A no-op otherwise."""
    if zero_stage(accelerator) != 3 or not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def gathered_model(learner: Learner) -> contextlib.AbstractContextManager:
    """Every weight of the learner's engine (the denoiser, base included, and the critic heads) whole for
    the block under ZeRO-3: the base fingerprint, the final rank check and the export need them. It holds
    the full model on every rank for that while."""
    params = list(learner.engine.module.parameters()) if learner.engine is not None else []
    return gathered(learner.accelerator, params)


def lora_copy(learner: Learner, adapter: str, params: list[torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """CPU copies of ``adapter``'s LoRA tensors, whole (gathered under ZeRO-3: every rank calls)."""
    from align.backbones.lora import lora_state_dict

    with gathered(learner.accelerator, params):
        return _cpu(lora_state_dict(learner.pipe, adapter))


def sampling_pipe(cfg, learner: Learner, pipe):
    """A pipeline rank 0 may sample from alone (the final evaluation): ``pipe`` itself, or under ZeRO-3 a
    copy built as the rollout actors build theirs, with the learner's gathered policy LoRA. Every rank
    calls; the others get None under ZeRO-3."""
    if zero_stage(learner.accelerator) != 3:
        return pipe
    lora = learner.policy_state()
    if not learner.accelerator.is_main_process:
        return None
    from align.backbones.lora import load_lora_state_dict
    from align.policy import build_policy

    copy = build_policy(cfg)
    load_lora_state_dict(copy, lora, "policy")
    return copy


def clear_stale_gradients(zero) -> None:
    """Zero a ZeRO-3 optimiser's gradient partitions before an optimiser step's first backward. ZeRO-3 steps
    every trainable parameter with the gradient its buffer holds, and a parameter that gets none in this
    step (the other group of a pass) would be stepped, clipped and counted in the norm with its gradient of
    an earlier step, state no checkpoint holds (measured on the tiny UNet: the critic pass clipped at a norm
    of 29.7, the policy's last gradient, instead of 0.8, and a resumed run drifted in the third digit).
    ZeRO-1/2 take no gradient as zero; with this ZeRO-3 does too. No-op below stage 3."""
    if type(zero).__name__ != "DeepSpeedZeroOptimizer_Stage3":
        return
    buffer = getattr(zero, "grad_partitions_flat_buffer", None)
    if buffer is None:
        import deepspeed

        raise RuntimeError(
            f"DeepSpeed {deepspeed.__version__}: its ZeRO-3 optimiser has no grad_partitions_flat_buffer, "
            "which align/distributed.py clear_stale_gradients zeroes; use ZeRO-2 or DeepSpeed 0.19"
        )
    buffer.zero_()


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in tensors.items()}


# ---- checkpoints (module docstring) -----------------------------------------------------------
@functools.cache
def safetensors_engine() -> type:
    """A DeepSpeed checkpoint engine (DeepSpeed's plug-in point for how states are stored) that writes each
    state as :func:`align.checkpoint.save_tree` safetensors at the path DeepSpeed names, and reads it back
    without unpickling anything. Built on first use: importing DeepSpeed is slow."""
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    class SafetensorsCheckpointEngine(CheckpointEngine):
        def __init__(self) -> None:
            super().__init__()
            self.name = "SafetensorsCheckpointEngine"

        def create(self, info) -> None:
            pass

        def save(self, state_dict: Any, path: str) -> None:
            ckpt.save_tree(path, state_dict, DEEPSPEED_CLASSES)

        def load(self, path: str, map_location=None) -> Any:
            return ckpt.load_tree(path, DEEPSPEED_CLASSES)

        def commit(self, info) -> bool:
            return True

        def preserves_storage_sharing(self) -> bool:
            return False  # every tensor is written as its own copy

    return SafetensorsCheckpointEngine


def save_learner(learner: Learner, directory: Path) -> None:
    """The learner's checkpoint (module docstring): every rank calls (collectives under DeepSpeed)."""
    main = learner.accelerator.is_main_process
    weights = trainable_weights(learner)  # whole, on every rank
    if main:
        for name, tensors in weights.items():
            ckpt.save_tensors(directory / f"{name}.safetensors", tensors)
        ckpt.save_tensors(directory / "learner_rng.safetensors", {"steps": learner.step_generator.get_state()})
    if learner.engine is not None:
        if main:
            ckpt.write_json(directory / "optimizer.json", {"deepspeed": _launch(learner)})
        _save_engine(learner.accelerator, directory / ENGINE_DIR)
    elif main:
        metas = {}
        for g, opt in learner.optimizers.items():
            tensors, metas[g] = ckpt.optimizer_state_split(_torch_optimizer(opt))
            ckpt.save_tensors(directory / f"optimizer_{g}.safetensors", tensors)
        ckpt.write_json(directory / "optimizer.json", {"optimizers": metas})


def load_learner(learner: Learner, directory: Path) -> None:
    """Inverse of :func:`save_learner`; refused in one line if the checkpoint came from another launch
    (number of processes, DeepSpeed or not, ZeRO stage)."""
    ckpt.assert_no_pickle(directory)
    saved = ckpt.read_json(directory / "optimizer.json")
    _check_launch(learner, saved.get("deepspeed"), directory)
    if learner.engine is not None:
        _load_engine(learner.accelerator, directory / ENGINE_DIR)  # weights and optimiser partitions
    else:
        _load_weights(learner, directory)
        for g, opt in learner.optimizers.items():
            tensors = ckpt.load_tensors(directory / f"optimizer_{g}.safetensors")
            _torch_optimizer(opt).load_state_dict(ckpt.optimizer_state_join(tensors, saved["optimizers"][g]))
    learner.step_generator.set_state(ckpt.load_tensors(directory / "learner_rng.safetensors")["steps"])


def trainable_weights(learner: Learner) -> dict[str, dict[str, torch.Tensor]]:
    """CPU copies of the trainable tensors by checkpoint file: the policy LoRA, the critic's own LoRA (a
    separate adapter) and its heads; whole on every rank (a collective under ZeRO-3)."""
    from align.backbones.lora import lora_state_dict

    critic = learner.critic
    with gathered(learner.accelerator, learner.policy_params + learner.critic_params):
        out = {"policy_lora": _cpu(lora_state_dict(learner.pipe, "policy"))}
        if critic is not None and critic.adapter != "policy":
            out["critic_lora"] = _cpu(lora_state_dict(learner.pipe, critic.adapter))
        if critic is not None:
            out["critic_heads"] = _cpu(critic.heads.state_dict())
    return out


def _load_weights(learner: Learner, directory: Path) -> None:
    """The trainable tensors of :func:`trainable_weights` back into the model (without DeepSpeed)."""
    from align.backbones.lora import load_lora_state_dict

    load_lora_state_dict(learner.pipe, ckpt.load_tensors(directory / "policy_lora.safetensors"), "policy")
    critic = learner.critic
    if critic is not None and critic.adapter != "policy":
        load_lora_state_dict(learner.pipe, ckpt.load_tensors(directory / "critic_lora.safetensors"), critic.adapter)
    if critic is not None:
        critic.heads.load_state_dict(ckpt.load_tensors(directory / "critic_heads.safetensors"))


def _launch(learner: Learner) -> dict:
    return {"zero_stage": zero_stage(learner.accelerator), "num_processes": learner.accelerator.num_processes}


def _check_launch(learner: Learner, saved: Optional[dict], directory: Path) -> None:
    now = _launch(learner) if learner.engine is not None else None
    if saved != now:
        n = learner.accelerator.num_processes
        raise CheckpointError(
            f"--resume {directory}: the checkpoint was written {_said(saved)}; resume with the same launch "
            f"(now: {_said(now) if now else f'{n} process(es) without DeepSpeed'})"
        )


def _said(launch: Optional[dict]) -> str:
    if launch is None:
        return "without DeepSpeed"
    return f"by {launch['num_processes']} DeepSpeed process(es), ZeRO stage {launch['zero_stage']}"


def _save_engine(accelerator: Accelerator, directory: Path) -> None:
    """Every rank: ``accelerator.save_state`` of the DeepSpeed engine (its trainable weights and this rank's
    ZeRO partition; the frozen base is not saved), then the pickled leftovers go (module docstring)."""
    accelerator.save_state(str(directory), safe_serialization=True, exclude_frozen_parameters=True)
    for name in _DROPPED:
        (directory / name.format(rank=accelerator.process_index)).unlink(missing_ok=True)


def _load_engine(accelerator: Accelerator, directory: Path) -> None:
    """Every rank: ``accelerator.load_state`` (DeepSpeed reloads each rank's own partition; the frozen base,
    not in the checkpoint, stays as built: its fingerprint was checked before)."""
    if not directory.is_dir():
        raise CheckpointError(
            f"{directory.parent}: no {ENGINE_DIR}/ (a DeepSpeed checkpoint written before accelerate's "
            "save_state); resume it with the version that wrote it"
        )
    accelerator.load_state(str(directory), load_module_strict=False)


def _torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The AdamW under accelerate's wrapper (without DeepSpeed)."""
    return getattr(optimizer, "optimizer", optimizer)


def share_path(accelerator: Accelerator, path: Optional[str]) -> str:
    """Rank 0's ``path`` on every rank (a checkpoint's temp dir: ``run_dir`` must be on a shared filesystem)."""
    if accelerator.num_processes == 1:
        return path
    return _broadcast_object(path if accelerator.process_index == 0 else None, accelerator.device)


# ---- batch sharding ---------------------------------------------------------------------------
def share_batch(
    accelerator: Accelerator, traj: Optional[Trajectory], scores: Optional[torch.Tensor]
) -> tuple[Trajectory, torch.Tensor]:
    """Rank 0's (trajectory, scores (B, K)) → this rank's trajectory shard and the full scores; rank 0's
    ``None`` (a skipped batch) gives ``(None, None)`` everywhere.

    One process: returned as they are. Several: the batch must split evenly over the ranks."""
    n = accelerator.num_processes
    if n == 1:
        return traj, scores
    import torch.distributed as dist

    rank = accelerator.process_index
    header = None
    if rank == 0 and traj is None:
        header = {"skip": True}
    elif rank == 0:
        if traj.batch_size % n:
            raise ValueError(
                f"batch of {traj.batch_size} samples must divide by the {n} learner processes "
                "(trainer.prompts_per_iteration × samples_per_prompt)"
            )
        fields = {
            f: [list(getattr(traj, f).shape), str(getattr(traj, f).dtype).removeprefix("torch.")]
            for f in PER_SAMPLE + SHARED
            if getattr(traj, f) is not None
        }
        header = {
            "fields": fields,
            "prompts": traj.prompts,
            "settings": {k: getattr(traj, k) for k in SETTINGS},
            "scores": [list(scores.shape), str(scores.dtype).removeprefix("torch.")],
        }
    dev = accelerator.device  # nccl needs device tensors, gloo takes CPU ones
    header = _broadcast_object(header, dev)
    if header.get("skip"):
        return None, None
    shared = {
        f: _broadcast(traj and getattr(traj, f), *header["fields"][f], dev) for f in SHARED if f in header["fields"]
    }
    scores = _broadcast(scores, *header["scores"], dev)
    per = {}
    for f in PER_SAMPLE:
        if f in header["fields"]:
            shape, dtype = header["fields"][f]
            out = torch.empty([shape[0] // n, *shape[1:]], dtype=getattr(torch, dtype), device=dev)
            chunks = [c.contiguous().to(dev) for c in getattr(traj, f).chunk(n)] if rank == 0 else None
            dist.scatter(out, chunks, src=0)
            per[f] = out
    b = header["fields"]["latents"][0][0] // n
    prompts = header["prompts"][rank * b : (rank + 1) * b]
    shard = Trajectory(prompts=prompts, **per, **shared, **header["settings"])
    return shard, scores


def shard_slice(accelerator: Accelerator, batch_size: int) -> slice:
    b = batch_size // accelerator.num_processes
    return slice(accelerator.process_index * b, (accelerator.process_index + 1) * b)


def _broadcast(t: Optional[torch.Tensor], shape: list[int], dtype: str, device) -> torch.Tensor:
    import torch.distributed as dist

    buf = (
        t.to(device).contiguous().clone()
        if t is not None
        else torch.empty(shape, dtype=getattr(torch, dtype), device=device)
    )
    dist.broadcast(buf, src=0)
    return buf


def _broadcast_object(obj: Any, device) -> Any:
    """Rank 0's ``obj`` on every rank (``torch.distributed.broadcast_object_list``; the others pass None)."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]

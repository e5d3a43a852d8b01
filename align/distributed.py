"""Learner-side distribution (never imports Ray): DeepSpeed through accelerate, batch sharding over
torch.distributed, and gathering the policy LoRA for weight sync.

Rank 0 is the driver: it alone talks to the rollout/reward actors. After scoring it sends every
rank the batch's shared fields (schedule, settings, prompts, scores) by broadcast and each rank
its contiguous shard of the per-sample tensors by scatter, so rank r trains on samples
``[r·B/N, (r+1)·B/N)``. DeepSpeed averages the gradients, so an optimiser step sees the same
global minibatch as one process would.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from align.sampling import Trajectory
from align.sampling.trajectory import PER_SAMPLE, SETTINGS, SHARED


def make_accelerator(cfg) -> Accelerator:
    """Accelerator for ``cfg``: plain, or DeepSpeed from ``learner.deepspeed`` (a JSON path) or from the
    ``accelerate launch`` config. gloo when running on CPU (DeepSpeed would pick its own otherwise)."""
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    launched_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    kwargs = {"cpu": cfg.model.device == "cpu" and not launched_ds}  # cpu=True would drop DeepSpeed (STACK_NOTES)
    if cfg.model.device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    if cfg.learner.deepspeed:
        if not os.path.isfile(cfg.learner.deepspeed):
            raise ValueError(f"learner.deepspeed: no such DeepSpeed JSON: {cfg.learner.deepspeed}")
        with open(cfg.learner.deepspeed) as fh:
            kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=json.load(fh))
        kwargs["cpu"] = False
    accelerator = Accelerator(**kwargs)
    if is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3:
        # Measured (2 gloo processes, tiny UNet): with in-process rollouts rank 0 deadlocks sampling from
        # partitioned weights, and with Ray rollouts the first checkpoint fails (ZeRO-3's partitioned
        # optimiser is not saved). Refuse before any model is loaded instead of failing an iteration in.
        raise ValueError(
            "DeepSpeed ZeRO-3 is not supported by align train yet (its checkpoints are not saved); use "
            "ZeRO-2 (launch/deepspeed/zero2.json), which already shards the LoRA's optimiser state"
        )
    if accelerator.num_processes > 1 and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise ValueError(
            f"{accelerator.num_processes} learner processes need DeepSpeed: set learner.deepspeed="
            "launch/deepspeed/zero2.json or launch with launch/accelerate/multi_gpu.yaml"
        )
    return accelerator


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


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
    return engine, optimizer


def assert_ranks_agree(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> int:
    """Raise unless every rank holds bit-identical ``params`` (whole on every rank: ZeRO-3 is refused in
    :func:`make_accelerator`); returns how many values were compared."""
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


def zero_partition_state(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """This rank's ZeRO-1/2 optimiser partition as (tensors, JSON): the torch AdamW state over the flat
    fp32 partition and the fp32 master partition itself (``single_partition_of_fp32_groups``)."""
    from align import checkpoint as ckpt

    zero = optimizer.optimizer  # accelerate's DeepSpeedOptimizerWrapper → DeepSpeedZeroOptimizer (stage 1/2)
    tensors, meta = ckpt.optimizer_state_split(zero.optimizer)
    tensors.update({f"fp32_partition.{i}": t for i, t in enumerate(zero.single_partition_of_fp32_groups)})
    return tensors, meta


def load_zero_partition(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of :func:`zero_partition_state` (the model's parameters are loaded separately)."""
    from align import checkpoint as ckpt

    zero = optimizer.optimizer
    for i, part in enumerate(zero.single_partition_of_fp32_groups):
        part.data.copy_(tensors.pop(f"fp32_partition.{i}"))
    zero.optimizer.load_state_dict(ckpt.optimizer_state_join(tensors, meta))


def share_path(accelerator: Accelerator, path: Optional[str]) -> str:
    """Rank 0's ``path`` on every rank (a checkpoint's temp dir: ``run_dir`` must be on a shared filesystem)."""
    if accelerator.num_processes == 1:
        return path
    return _broadcast_json(
        path if accelerator.process_index == 0 else None, accelerator.process_index, accelerator.device
    )


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
    header = _broadcast_json(header, rank, dev)
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


def _broadcast_json(obj, rank: int, device):
    """JSON over torch.distributed: a length, then the UTF-8 bytes."""
    import torch.distributed as dist

    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(device) if rank == 0 else None
    size = torch.tensor([data.numel() if data is not None else 0], dtype=torch.long, device=device)
    dist.broadcast(size, src=0)
    buf = data if data is not None else torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.broadcast(buf, src=0)
    return json.loads(bytes(buf.cpu().tolist()).decode())

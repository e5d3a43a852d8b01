"""Policy snapshots during training: the policy LoRA after every ``trainer.snapshot_every``-th policy update,
kept beside the run's checkpoint as ``RUN_DIR/snapshots/policy_{updates:05d}.safetensors``.

The checkpoint holds only the newest state; snapshots let a benchmark score the policy *along* the run on fixed
prompts with fixed noise (reward against samples seen, e.g. "ECG reaches GRPO's final score with half the
samples": ``benchmarks/sample_efficiency.py``). Each file is written to a temporary name and renamed, so a
kill leaves either the whole snapshot or none; a resumed run rewrites the same file with the same tensors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from align import checkpoint as ckpt

SNAPSHOT_DIR = "snapshots"
_NAME = re.compile(r"^policy_(\d{5,})\.safetensors$")


def snapshot_path(run_dir: str | os.PathLike, policy_updates: int) -> Path:
    """Where the snapshot after ``policy_updates`` updates lives."""
    return Path(run_dir) / SNAPSHOT_DIR / f"policy_{policy_updates:05d}.safetensors"


def save_snapshot(run_dir: str | os.PathLike, policy_updates: int, lora: dict[str, torch.Tensor]) -> Path:
    """Atomically write the policy LoRA ``lora`` as the snapshot after ``policy_updates`` updates."""
    final = snapshot_path(run_dir, policy_updates)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    ckpt.save_tensors(tmp, lora)
    os.replace(tmp, final)
    return final


def list_snapshots(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(policy updates, path) of every snapshot of a run, oldest first (temporary files are skipped)."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def due(snapshot_every: int, policy_updates: int) -> bool:
    """Whether a snapshot is due after ``policy_updates`` updates (``snapshot_every`` 0: never)."""
    return snapshot_every > 0 and policy_updates > 0 and policy_updates % snapshot_every == 0

"""Replay of recent batches for the critic (docs/algorithms.md, "ECG's phases and the sample budget";
align/algos/ecg.py).

While only the critic trains, the policy does not move, so every earlier pretraining batch is still
an on-policy sample of the value targets G_k = R_k(x_0, c). Refitting the critic on all of them
(instead of the last 32 samples only) multiplies its data by the number of pretraining iterations.
Raw rewards are stored and re-normalised with the *current* running statistics each time, so
earlier batches and the newest share one target scale. Saved as safetensors + JSON (resume).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from align.checkpoint import load_tensors, read_json, save_tensors, write_json
from align.sampling import Trajectory


class ValueReplay:
    """The last ``capacity`` batches: trajectories (without pixels) and raw scores (B, K)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.batches: list[tuple[Trajectory, torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self.batches)

    def add(self, traj: Trajectory, raw: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        self.batches.append((traj, raw.detach().clone()))
        del self.batches[: -self.capacity]

    def batch(self, normalise: Callable[[torch.Tensor], torch.Tensor]) -> tuple[Trajectory, torch.Tensor]:
        """All stored samples as one trajectory, with targets ``normalise(raw)`` (B_total, K)."""
        if not self.batches:
            raise ValueError("ValueReplay.batch: the replay is empty")
        # value regression reads states and returns only: neither the version nor the stochastic window
        # (drawn per batch) matters to it, and cat needs them equal
        newest = self.batches[-1][0].policy_version
        traj = Trajectory.cat([dataclasses.replace(t, policy_version=newest, sde_steps=None) for t, _ in self.batches])
        return traj, normalise(torch.cat([r for _, r in self.batches]))

    def clear(self) -> None:
        self.batches = []

    def save(self, directory: Path) -> None:
        write_json(directory / "value_replay.json", {"capacity": self.capacity, "batches": len(self.batches)})
        for i, (traj, raw) in enumerate(self.batches):
            traj.save(directory / f"value_replay_{i}")
            save_tensors(directory / f"value_replay_{i}_raw.safetensors", {"raw": raw})

    def load(self, directory: Path) -> None:
        meta_path = directory / "value_replay.json"
        self.batches = []
        if not meta_path.is_file():
            return
        meta = read_json(meta_path)
        self.capacity = meta["capacity"]
        for i in range(meta["batches"]):
            raw = load_tensors(directory / f"value_replay_{i}_raw.safetensors")["raw"]
            self.batches.append((Trajectory.load(directory / f"value_replay_{i}"), raw))

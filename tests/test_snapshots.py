"""Policy snapshots along a run (``trainer.snapshot_every``, align/snapshots.py): what they hold, when they are
written, and that a resumed run writes the same ones."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from align.checkpoint import load_tensors
from align.config import ConfigError
from align.snapshots import due, list_snapshots, save_snapshot
from align.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from algos_toy import _samples_after_updates, samples_to_gain  # noqa: E402


def test_snapshots_hold_the_policy_after_every_kth_update_and_the_last_equals_the_checkpoint(
    tmp_path, tiny_train_cfg
) -> None:
    cfg = tiny_train_cfg(
        "algo=grpo", "trainer.iterations=4", "trainer.snapshot_every=2", "rewards=[jpeg_compressibility:1.0]"
    )
    train(cfg, log=lambda *_: None)
    found = list_snapshots(tmp_path)
    assert [u for u, _ in found] == [2, 4]
    last, final = load_tensors(found[-1][1]), load_tensors(tmp_path / "checkpoint" / "policy_lora.safetensors")
    assert last.keys() == final.keys()
    for key in final:
        assert torch.equal(last[key], final[key])
    first = load_tensors(found[0][1])
    assert any(not torch.equal(first[k], final[k]) for k in final)  # two more updates moved the policy


def test_a_resumed_run_writes_the_same_snapshots(tmp_path, tiny_train_cfg) -> None:
    common = ["algo=grpo", "trainer.iterations=3", "trainer.snapshot_every=1", "rewards=[jpeg_compressibility:1.0]"]
    train(tiny_train_cfg(f"run_dir={tmp_path / 'a'}", *common), log=lambda *_: None)
    split = tiny_train_cfg(f"run_dir={tmp_path / 'b'}", *common)
    train(split, stop_after=2, log=lambda *_: None)
    train(split, resume=True, log=lambda *_: None)
    a, b = list_snapshots(tmp_path / "a"), list_snapshots(tmp_path / "b")
    assert [u for u, _ in a] == [u for u, _ in b] == [1, 2, 3]
    for (_, pa), (_, pb) in zip(a, b):
        ta, tb = load_tensors(pa), load_tensors(pb)
        for key in ta:
            torch.testing.assert_close(ta[key], tb[key], atol=1e-6, rtol=0)


def test_snapshot_schedule_and_listing_skip_temporaries(tmp_path) -> None:
    assert [u for u in range(7) if due(3, u)] == [3, 6]
    assert not any(due(0, u) for u in range(7))
    save_snapshot(tmp_path, 10, {"w": torch.ones(2)})
    save_snapshot(tmp_path, 5, {"w": torch.zeros(2)})
    (tmp_path / "snapshots" / ".policy_00020.safetensors.1.tmp").write_bytes(b"partial")
    assert [u for u, _ in list_snapshots(tmp_path)] == [5, 10]


def test_negative_snapshot_every_is_a_one_line_config_error(tiny_train_cfg) -> None:
    with pytest.raises(ConfigError, match="trainer.snapshot_every"):
        train(tiny_train_cfg("trainer.snapshot_every=-1"), log=lambda *_: None)


def test_samples_to_gain_interpolates_between_snapshots() -> None:
    history = [{"phase": "value-pretrain", "samples_seen": 32}] + [
        {"phase": "policy", "samples_seen": 32 * (i + 2)} for i in range(4)
    ]
    assert _samples_after_updates(history) == {0: 32, 1: 64, 2: 96, 3: 128, 4: 160}
    rows = [{"samples": 100.0, "gain": 0.02}, {"samples": 200.0, "gain": 0.06}]
    assert samples_to_gain(rows, 0.04) == pytest.approx(150.0)
    assert samples_to_gain(rows, 0.01) == pytest.approx(50.0)  # from (0 samples, gain 0)
    assert samples_to_gain(rows, 0.07) != samples_to_gain(rows, 0.07)  # nan: never reached

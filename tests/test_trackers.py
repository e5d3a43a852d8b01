"""`log_with`: accelerate's trackers of `align train` (TensorBoard by default, W&B offline), and its config errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from align.config import ConfigError


def _scalars(run: Path) -> dict[str, list]:
    """Every scalar series of the TensorBoard event files directly under RUN_DIR/tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]} | {
        f"image:{tag}": acc.Images(tag) for tag in acc.Tags()["images"]
    }


def _quiet_offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """W&B offline, silent, no git or console capture, its settings and cache inside ``tmp_path``."""
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_tensorboard_by_default_one_value_per_iteration(tiny_train_cfg, tmp_path):
    from align.train import train

    cfg = tiny_train_cfg("trainer.iterations=2", "eval_every=1")
    assert cfg.log_with == ["tensorboard"]
    train(cfg, log=lambda *_: None)
    series = _scalars(tmp_path)
    for tag in ("reward/toy_geneval", "reward/weighted", "timing/update", "timing/checkpoint", "samples_per_s"):
        assert [e.step for e in series[tag]] == [1, 2], tag
    assert "iteration" not in series
    rewards = [e.value for e in series["reward/toy_geneval"]]
    assert all(0.0 <= r <= 1.0 for r in rewards)
    # the evaluation grid of iterations 1 and 2 (eval_every=1) and the run's end, as images
    assert {e.step for e in series["image:eval/grid"]} == {1, 2}
    assert (tmp_path / "grids" / "iter_0002.png").is_file()


def test_no_tracker_writes_no_events(tiny_train_cfg, tmp_path):
    from align.train import train

    train(tiny_train_cfg("trainer.iterations=1", "log_with=[]"), log=lambda *_: None)
    assert (tmp_path / "checkpoint").is_dir()
    assert not (tmp_path / "tensorboard").exists()
    assert not (tmp_path / "wandb").exists()


def test_wandb_offline_run_beside_tensorboard(tiny_train_cfg, tmp_path, monkeypatch):
    from align.train import train

    _quiet_offline_wandb(monkeypatch, tmp_path)
    cfg = tiny_train_cfg("trainer.iterations=2", "log_with=[tensorboard,wandb]")
    train(cfg, log=lambda *_: None)
    import wandb

    wandb.teardown()  # the W&B service may still be writing the finished run's record: stop it (as exit does)
    assert [e.step for e in _scalars(tmp_path)["reward/weighted"]] == [1, 2]
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    records = list(runs[0].glob("*.wandb"))
    assert len(records) == 1 and records[0].stat().st_size > 0
    data = records[0].read_bytes()
    for needle in (b"reward/weighted", b"timing/update", b"eval/grid", b"align"):
        assert needle in data, needle  # the history, the grid's image and the project, in the run's record
    assert list((runs[0] / "files" / "media" / "images").glob("eval/grid_*.png"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("log_with=[mlflow]", "log_with: unknown tracker(s) ['mlflow']"),
        ("log_with=[tensorboard,tb]", "log_with: unknown tracker(s) ['tb']"),
    ],
)
def test_unknown_tracker_is_one_line(tiny_train_cfg, override, message):
    with pytest.raises((ValueError, ConfigError)) as err:
        tiny_train_cfg(override)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_wandb_not_installed_is_one_line(tiny_train_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as if it were not installed
    with pytest.raises((ValueError, ConfigError)) as err:
        tiny_train_cfg("log_with=[wandb]")
    assert "log_with" in str(err.value) and "pip install wandb" in str(err.value)
    assert "\n" not in str(err.value)

"""The reward protocol: function and class plugins, config keyword args, batch_size chunking,
device placement, per-call timeouts, dtype checks, entry-point discovery and remote specs."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest
import torch

from align.config import ConfigError, load_config
from align.config_lists import RewardSpec, parse_rewards
from align.toy.world import render_batch, sample_scenes
from align.train_config import TrainConfig
from rewards import (
    RewardError,
    available_rewards,
    build_rewards,
    check_reward_specs,
    get_reward,
    register_reward,
    score,
)

CALLS: list[int] = []


@register_reward("test_mean_brightness", batch_size=3)
def mean_brightness(images, prompts, metadata, *, scale: float = 1.0):
    """Mean pixel value times ``scale`` (a function-style reward)."""
    CALLS.append(len(prompts))
    metadata["test_mean_brightness"] = {"per_image": images.mean(dim=(1, 2, 3))}
    return scale * images.mean(dim=(1, 2, 3))


@register_reward("test_device_probe")
class DeviceProbe:
    """Reports the device its images arrived on (returns zeros)."""

    name = "test_device_probe"
    device = "cpu"
    batch_size = None
    seen: list = []

    def __call__(self, images, prompts, metadata):
        DeviceProbe.seen.append(images.device.type)
        return torch.zeros(len(prompts))


class _Slow:
    name, device, batch_size = "slow", "cpu", None

    def __init__(self, release: threading.Event, timeout_s=None) -> None:
        self.release, self.timeout_s = release, timeout_s

    def __call__(self, images, prompts, metadata):
        self.release.wait(30)
        return torch.zeros(len(prompts))


def _batch(n: int = 8):
    scenes = sample_scenes(n, np.random.default_rng(1))
    return render_batch(scenes, seed=1), [s.prompt for s in scenes]


def test_function_reward_gets_its_config_kwargs_and_declared_batch_size() -> None:
    images, prompts = _batch(8)
    reward = get_reward("test_mean_brightness", scale=2.0)
    assert reward.name == "test_mean_brightness" and reward.batch_size == 3
    CALLS.clear()
    scores, meta = score([reward], images, prompts)
    assert CALLS == [3, 3, 2]
    torch.testing.assert_close(scores[:, 0], 2.0 * images.mean(dim=(1, 2, 3)), rtol=0, atol=1e-6)
    torch.testing.assert_close(meta["test_mean_brightness"]["per_image"], images.mean(dim=(1, 2, 3)))


def test_chunked_scoring_equals_one_call_and_merges_per_sample_metadata() -> None:
    images, prompts = _batch(8)
    whole, meta_whole = score([get_reward("toy_geneval")], images, prompts)
    chunked, meta_chunked = score([get_reward("toy_geneval", batch_size=3)], images, prompts)
    torch.testing.assert_close(whole, chunked, rtol=0, atol=0)
    for key, value in meta_whole["toy_geneval"].items():
        torch.testing.assert_close(meta_chunked["toy_geneval"][key], value, rtol=0, atol=0)


def test_images_are_moved_to_the_reward_device() -> None:
    DeviceProbe.seen.clear()
    score([get_reward("test_device_probe", device="meta")], torch.rand(2, 3, 8, 8), ["a", "b"])
    assert DeviceProbe.seen == ["meta"]


@register_reward("test_model_on_device")
class ModelOnDevice:
    """Places a 'model' on the device it is built with, as the CLIP/HPS rewards do."""

    name, batch_size = "test_model_on_device", None

    def __init__(self, device: str = "cpu") -> None:
        self.device, self.weight = device, torch.ones(1, device=device)

    def __call__(self, images, prompts, metadata):
        assert images.device == self.weight.device
        return torch.zeros(len(prompts))


def test_a_reward_that_takes_device_gets_it_in_its_constructor() -> None:
    reward = get_reward("test_model_on_device", device="meta", batch_size=1)
    assert reward.weight.device.type == "meta" and reward.batch_size == 1
    assert score([reward], torch.rand(2, 3, 4, 4), ["a", "b"])[0].shape == (2, 1)


def test_class_reward_kwargs_and_unknown_argument_lists_the_accepted_ones() -> None:
    assert get_reward("jpeg_compressibility", quality=50).quality == 50
    with pytest.raises(
        ValueError,
        match="reward 'jpeg_compressibility': unknown argument 'qualty'; accepted: quality, "
        "device, batch_size, timeout_s",
    ):
        get_reward("jpeg_compressibility", qualty=50)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        get_reward("toy_geneval", batch_size=0)


def test_reward_args_are_checked_when_the_config_loads(tmp_path) -> None:
    base = ["rewards=[jpeg_compressibility:1.0]", f"run_dir={tmp_path}"]
    cfg = load_config(TrainConfig, None, base + ["reward_args.jpeg_compressibility.quality=40"])
    assert build_rewards(cfg.reward_specs())[0].quality == 40
    with pytest.raises(ConfigError, match="reward_args.clip_score: 'clip_score' is not in rewards"):
        load_config(TrainConfig, None, base + ["reward_args.clip_score.model=x"])
    with pytest.raises(ConfigError, match="unknown argument 'qualty'"):
        load_config(TrainConfig, None, base + ["reward_args.jpeg_compressibility.qualty=40"])
    with pytest.raises(
        ConfigError, match="config key 'reward_on_error' = 'ignore' is not valid; choose one of: raise, skip_batch"
    ):
        load_config(TrainConfig, None, base + ["reward_on_error=ignore"])


def test_timeout_names_the_plugin_and_batch_size() -> None:
    release = threading.Event()
    try:
        start = time.perf_counter()
        with pytest.raises(RewardError, match="reward 'slow' timed out after 0.2 s on a batch of 2"):
            score([_Slow(release, timeout_s=0.2)], torch.zeros(2, 3, 4, 4), ["a", "b"])
        assert time.perf_counter() - start < 20  # far below the 30 s the plugin would block
    finally:
        release.set()


def test_integer_scores_are_rejected_naming_the_dtype() -> None:
    class IntReward:
        name, device, batch_size = "ints", "cpu", None

        def __call__(self, images, prompts, metadata):
            return torch.ones(len(prompts), dtype=torch.int64)

    with pytest.raises(RewardError, match="reward 'ints' returned dtype torch.int64 for a batch of 2"):
        score([IntReward()], torch.zeros(2, 3, 4, 4), ["a", "b"])


def test_entry_point_plugins_are_discovered_and_listed_with_their_distribution(tmp_path, monkeypatch) -> None:
    """A distribution on sys.path with an ``align.rewards`` entry point (what ``pip install`` writes)."""
    (tmp_path / "ep_plugin_mod.py").write_text(
        "import torch\n"
        "def darkness(images, prompts, metadata, *, offset=0.0):\n"
        "    return offset - images.mean(dim=(1, 2, 3))\n"
    )
    info = tmp_path / "ep_plugin-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text("[align.rewards]\ndarkness = ep_plugin_mod:darkness\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert available_rewards()["darkness"] == "entry point ep_plugin_mod:darkness (ep-plugin 1.2)"
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    scores, _ = score(build_rewards([RewardSpec("darkness", 0.5, {"offset": 1.0})]), images, ["a", "b", "c"])
    torch.testing.assert_close(scores[:, 0], 1.0 - images.mean(dim=(1, 2, 3)))
    sys.modules.pop("ep_plugin_mod", None)


def test_remote_specs_keep_the_url_and_parse_an_optional_weight() -> None:
    specs = parse_rewards(["remote:http://127.0.0.1:8123/clip_score:0.5", "remote:http://localhost:9/hpsv2"])
    check_reward_specs(specs)
    assert [(s.name, s.weight) for s in specs] == [
        ("remote:http://127.0.0.1:8123/clip_score", 0.5),
        ("remote:http://localhost:9/hpsv2", 1.0),
    ]
    with pytest.raises(ValueError, match="expected remote:http://HOST:PORT/NAME"):
        check_reward_specs(parse_rewards(["remote:http://127.0.0.1/clip_score"]))


def test_builtins_are_the_projects_own_entry_points_as_pyproject_declares_them() -> None:
    """One discovery path: the built-in rewards are diffusion-align's ``align.rewards`` entry points. The
    installed metadata must match pyproject.toml (a stale editable install fails here, naming the fix)."""
    from importlib.metadata import entry_points
    from pathlib import Path

    import tomllib

    declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["entry-points"][
        "align.rewards"
    ]
    installed = {
        ep.name: ep.value
        for ep in entry_points(group="align.rewards")
        if ep.dist is not None and ep.dist.name == "diffusion-align"
    }
    assert installed == declared, "installed metadata differs from pyproject.toml: reinstall (make install)"
    found = available_rewards()
    assert all(found[name] == "builtin" for name in declared)
    assert get_reward("jpeg_compressibility", quality=50).quality == 50  # loaded through its entry point


def test_a_plugin_that_fails_to_load_is_one_line_naming_it(tmp_path, monkeypatch) -> None:
    from align.errors import one_line
    from rewards import RewardPluginError
    from rewards.registry import describe_reward

    (tmp_path / "broken_plugin_mod.py").write_text("import no_such_module_here\n")
    info = tmp_path / "broken_plugin-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[align.rewards]\nbroken = broken_plugin_mod:Broken\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert available_rewards()["broken"] == "entry point broken_plugin_mod:Broken (broken-plugin 0.3)"
    with pytest.raises(RewardPluginError) as info_err:
        get_reward("broken")
    line = one_line(info_err.value)
    assert line == (
        "reward plugin 'broken' (entry point broken_plugin_mod:Broken of broken-plugin 0.3) failed to "
        "load: ModuleNotFoundError: No module named 'no_such_module_here'"
    )
    assert describe_reward("broken").startswith("(fails to load: reward plugin 'broken'")
    with pytest.raises(ConfigError, match="reward plugin 'broken' .* failed to load"):
        load_config(TrainConfig, None, ["rewards=[{name: broken}]", f"run_dir={tmp_path}"])

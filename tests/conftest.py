"""Shared fixtures: tiny real pipelines built from configs (seeded, fp32, CPU), never from a hub."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from align.backbones import build_pipeline  # noqa: E402

from tiny_run import TINY_TRAIN  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a small, shared CPU OpenMP's spinning
# workers make each op 20–50× slower (measured: a 64-channel 3×3 conv takes 25 ms with 2 threads
# beside one busy process, 0.5 ms with 1). ALIGN_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("ALIGN_TEST_THREADS", "1")))


# --cpu-hog N: make load-dependent flakiness visible. N busy-loop processes
# (`python -c 'while True: pass'`) run beside the tests for the whole session, so that a test that
# passes only on an idle CPU (a sleep instead of a wait, a timed assertion, a retry loop that
# races a restart) fails here rather than on a user's loaded machine. They are started by the
# session fixture `cpu_hog` and ended by their PID when the session ends (never by name: other
# pytest runs may share the machine); on Linux they also get SIGKILL if pytest itself is killed.
# They run at the lowest CPU priority (nice 19), like Ray's workers (Ray nices them by 15): at
# pytest's own priority they would take ~95 % of the CPU from the actors (measured: the Ray tests
# then crawl for > 15 min instead of 3), a starvation test, not a load test.
# Example: `pytest -m distributed tests/test_distributed.py --cpu-hog 2`.
def _hog_count(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"--cpu-hog must be >= 0, got {n}")
    return n


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--cpu-hog",
        type=_hog_count,
        default=0,
        metavar="N",
        help="run N busy-loop processes beside the tests (ended by PID at the end) to expose "
        "tests that need an idle CPU",
    )


def pytest_report_header(config) -> str:
    n = config.getoption("--cpu-hog")
    return f"cpu-hog: {n} busy-loop process(es) beside the tests" if n else ""


def _lowest_priority() -> None:
    """In the child, before exec: nice 19 (see above)."""
    os.nice(19)


def _lowest_priority_dying_with_parent() -> None:
    """As :func:`_lowest_priority`, and SIGKILL when pytest dies (Linux PR_SET_PDEATHSIG): no orphans."""
    import ctypes
    import signal

    _lowest_priority()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


# `make test` runs the suite on pytest-xdist workers (`-n auto --dist loadgroup`). Each test file is
# one unit of work, so its module fixtures are built once. Every `distributed` test (it starts Ray or
# `accelerate launch`, whose port is fixed) joins one group, run by one worker one test after another,
# and the group is put first so that the longest unit starts at once. Without xdist the marks are
# inert and only the order changes.
def pytest_collection_modifyitems(config, items) -> None:
    def is_distributed(item) -> bool:
        return item.get_closest_marker("distributed") is not None

    for item in items:
        group = "distributed" if is_distributed(item) else item.path.stem
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: not is_distributed(item))  # stable: file order kept within each part


@pytest.fixture(scope="session", autouse=True)
def cpu_hog(request):
    """The PIDs of the ``--cpu-hog`` busy loops, started for the session and ended by PID after it."""
    n = request.config.getoption("--cpu-hog")
    setup = _lowest_priority_dying_with_parent if sys.platform.startswith("linux") else _lowest_priority
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=setup) for _ in range(n)]
    try:
        yield [h.pid for h in hogs]
    finally:
        for h in hogs:
            h.kill()  # SIGKILL to this PID only
            h.wait()


@pytest.fixture
def tiny_unet_pipe():
    """Fresh SD1.5-class pipeline (ε-prediction, DDIM); tests may mutate it (building takes ~50 ms)."""
    return build_pipeline("preset:tiny-unet")


@pytest.fixture
def tiny_unet_vpred_pipe():
    """As ``tiny_unet_pipe`` with a v-prediction scheduler."""
    return build_pipeline("preset:tiny-unet", prediction_type="v_prediction")


@pytest.fixture
def tiny_dit_pipe():
    """Fresh SD3-class pipeline (MMDiT, flow matching, no T5)."""
    return build_pipeline("preset:tiny-dit")


@pytest.fixture
def tiny_sdxl_pipe():
    """Fresh SDXL-class pipeline (UNet with pooled embeddings and time ids, two CLIP encoders, DDIM)."""
    return build_pipeline("preset:tiny-sdxl")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture
def tiny_train_overrides() -> list[str]:
    """:data:`TINY_TRAIN` as a fresh list, for tests that start `align train` themselves (a subprocess)."""
    return list(TINY_TRAIN)


@pytest.fixture
def tiny_train_cfg(tmp_path):
    """``tiny_train_cfg(*overrides)``: the :data:`TINY_TRAIN` TrainConfig with ``run_dir`` in this
    test's ``tmp_path`` (``run_dir=...`` among the overrides moves it), then the overrides."""
    from align.config import load_config
    from align.train_config import TrainConfig

    def make(*overrides: str) -> TrainConfig:
        return load_config(TrainConfig, None, [*TINY_TRAIN, f"run_dir={tmp_path}", *overrides])

    return make


@pytest.fixture
def reward_registry():
    """Rewards a test registers (``register_reward``) are gone after it: the in-process registry is
    restored to what it held before the test."""
    from rewards import registry

    saved = dict(registry._REGISTERED)
    try:
        yield registry
    finally:
        registry._REGISTERED.clear()
        registry._REGISTERED.update(saved)

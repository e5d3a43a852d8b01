"""Install-level guards: the hpsv2 / protobuf / Ray conflict must not come back silently."""

from __future__ import annotations

import importlib.metadata as md
import shutil
import subprocess
import sys

import pytest


def test_protobuf_is_modern_enough_for_ray() -> None:
    major = int(md.version("protobuf").split(".")[0])
    assert major >= 4, f"protobuf {md.version('protobuf')} installed; hpsv2's pin leaked (Ray needs >=4)"


@pytest.mark.distributed
def test_ray_starts_and_hpsv2_imports_in_one_environment() -> None:
    import hpsv2  # noqa: F401  (the import itself is the check)
    import ray
    from hpsv2.src.open_clip import tokenizer as hps_tokenizer

    assert hps_tokenizer.tokenize(["a red circle"]).shape == (1, 77)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:

        @ray.remote
        def square(x: int) -> int:
            return x * x

        assert ray.get(square.remote(7)) == 49
    finally:
        ray.shutdown()


def test_console_script_lists_subcommands() -> None:
    exe = shutil.which("align") or f"{sys.prefix}/bin/align"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for sub in ("sample", "toy"):
        assert sub in out

"""benchmarks/gpu_check.py: `--tiny` runs the whole GPU check's code path on CPU and prints every row; the
full-size backbones have SD1.5's and SD3.5-Medium's denoiser sizes (counted on the meta device)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

MEMORY = ("peak", "GiB", "above-start")


def _rows(stdout: str) -> dict[tuple[str, str], str]:
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3 and not set(cells[0]) <= {"-"}:
            rows[(cells[0], cells[1])] = cells[2]
    return rows


def test_tiny_gpu_check_prints_every_row_with_a_number() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--tiny",
            "--steps",
            "2",
            "--prompts",
            "2",
            "--group",
            "2",
            "--minibatch",
            "2",
            "--repeats",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(proc.stdout)
    for backbone in ("tiny-unet", "tiny-dit"):
        for quantity in gpu_check.QUANTITIES:
            value = rows[(backbone, quantity)]
            if any(word in quantity for word in MEMORY):
                assert value == "n/a"  # torch.cuda.max_memory_allocated has no CPU counterpart
                continue
            number = float(value)
            assert math.isfinite(number) and number >= 0, (backbone, quantity, value)
            if "ratio−1" not in quantity:
                assert number > 0, (backbone, quantity, value)
    assert any(b == "geneval reward" and q.startswith("geneval_color") for b, q in rows)


def test_full_size_backbones_have_sd15_and_sd35_medium_denoiser_sizes() -> None:
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**gpu_check.SD15_UNET)
        transformer = SD3Transformer2DModel(**gpu_check.SD35M_TRANSFORMER)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD1.5's UNet
    assert sum(p.numel() for p in transformer.parameters()) == 2_243_171_520  # SD3.5-M's MMDiT-X config

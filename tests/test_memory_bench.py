"""benchmarks/memory_sd15.py end to end on the tiny UNet (its real-size numbers are in docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "memory_sd15.py"


@pytest.mark.slow  # two `align train` children (about 25 s each under load)
def test_memory_benchmark_prints_one_row_per_variant_from_real_train_children(tmp_path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("memory_sd15", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (
        module.main(
            ["--tiny", "--resolution", "0", "--steps", "2", "--variants", "ecg", "ckpt_mb", "--work", str(tmp_path)]
        )
        == 0
    )
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ECG")]
    assert len(rows) == 2 and rows[0].split("|")[3].strip() == "1.00"
    for row in rows:
        peak, iteration = float(row.split("|")[2]), float(row.split("|")[4])
        assert peak > 0.1 and iteration > 0  # a real child's rusage and its own timing
    assert (tmp_path / "ckpt_mb" / "checkpoint" / "state.json").is_file()

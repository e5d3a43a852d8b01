"""`align sample` from the command line: PNGs, grid and a JSON record; config errors are one line."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from align.cli import main


def test_sample_job_writes_images_grid_and_scored_json(tmp_path, capsys) -> None:
    out = tmp_path / "s"
    code = main(
        [
            "sample",
            "model.source=preset:tiny-unet",
            "num_images=3",
            "batch_size=2",
            "sampler.num_inference_steps=2",
            f"out_dir={out}",
            "progress=false",
        ]
    )
    assert code == 0
    record = json.loads((out / "samples.json").read_text())
    assert len(record["samples"]) == 3 and (out / "grid.png").is_file()
    for sample in record["samples"]:
        assert (out / sample["file"]).is_file()
        assert set(sample["toy_checker"]) == {"strict", "score"}
    assert set(record["summary"]) == {"strict", "score"}
    assert "toy checker accuracy" in capsys.readouterr().out


def test_sample_job_with_free_prompts_and_a_dit_backbone(tmp_path) -> None:
    out = tmp_path / "d"
    assert (
        main(
            [
                "sample",
                "model.source=preset:tiny-dit",
                "model.kind=dit",
                "prompts=[a red dog,hello]",
                "sampler.num_inference_steps=2",
                f"out_dir={out}",
                "progress=false",
            ]
        )
        == 0
    )
    record = json.loads((out / "samples.json").read_text())
    assert [s["toy_checker"] for s in record["samples"]] == [None, None] and record["summary"] == {}
    assert all(torch.isfinite(torch.tensor(s["log_prob_mean"])) for s in record["samples"])


def test_bad_config_key_is_a_one_line_error_with_exit_code_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "align.cli", "sample", "sampler.guidance=3"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(
        "align: error: unknown config key 'sampler.guidance'; valid keys under 'sampler': "
        "num_inference_steps, guidance_scale, eta, noise_level"
    )


def test_overrides_after_flags_are_still_overrides(tmp_path, capsys) -> None:
    out = tmp_path / "late"
    assert (
        main(
            [
                "sample",
                "--steer",
                "none",
                "model.source=preset:tiny-unet",
                "num_images=2",
                "sampler.num_inference_steps=2",
                f"out_dir={out}",
                "progress=false",
            ]
        )
        == 0
    )
    assert len(json.loads((out / "samples.json").read_text())["samples"]) == 2
    assert main(["sample", "--steer", "none", "sampler.guidance=3"]) == 2
    assert "unknown config key 'sampler.guidance'" in capsys.readouterr().err


def test_a_stray_argument_after_flags_is_an_argparse_error() -> None:
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "num_images=2", "--steer", "none", "not-an-override"])
    assert exit_info.value.code == 2

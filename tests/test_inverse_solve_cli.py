"""`align solve`: PNG in → PNG out with metrics, sweeps with a table and D–P plot, LoRA, LPIPS, errors."""

from __future__ import annotations

import os

import pytest
import torch

from align.cli import main
from align.inverse.metrics import load_lpips
from align.inverse.operators import Inpaint, box_mask
from align.inverse.solve import write_png

FAST = [
    "model.source=preset:tiny-unet",
    "clamp_steps=2",
    "gmres_iters=2",
    "dps_steps=2",
    "stage1.anneal_iters=2",
    "stage1.final_iters=1",
    "stage1.prox_iters=2",
    "progress=false",
]


@pytest.fixture
def clean_png(tmp_path):
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    path = str(tmp_path / "clean.png")
    write_png(img, path)
    return path


@pytest.mark.parametrize(
    "task,extra",
    [("inpaint", ["--box", "4,4,8,8"]), ("sr", ["--scale", "2"]), ("deblur", ["--kernel", "aniso:5:0.8:1.6:30"])],
)
@pytest.mark.parametrize("method", ["map_rps", "clamp", "dps"])
def test_solve_writes_the_reconstruction_and_prints_metrics(task, extra, method, clean_png, tmp_path, capsys):
    out = str(tmp_path / "out.png")
    code = main(
        [
            "solve",
            *FAST,
            "--task",
            task,
            "--method",
            method,
            "--input",
            clean_png,
            "--degrade",
            "--renoise",
            "0.5",
            "--out",
            out,
            *extra,
        ]
    )
    assert code == 0 and os.path.isfile(out)
    text = capsys.readouterr().out
    assert "PSNR" in text and "SSIM" in text and "LPIPS unavailable" in text


def test_renoise_sweep_prints_a_table_and_saves_a_dp_plot(clean_png, tmp_path, capsys):
    out = str(tmp_path / "sweep.png")
    assert (
        main(
            [
                "solve",
                *FAST,
                "--task",
                "inpaint",
                "--box",
                "2,2,6,6",
                "--input",
                clean_png,
                "--degrade",
                "--renoise",
                "0,0.5,1",
                "--out",
                out,
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert text.count("| 0.5 |") == 1 and "| renoise |" in text
    for suffix in ("_r0", "_r0.5", "_r1", "_dp"):
        assert os.path.isfile(str(tmp_path / f"sweep{suffix}.png"))


def test_solve_with_local_lpips_weights_and_a_reference(clean_png, tmp_path, capsys):
    import torchvision

    weights = str(tmp_path / "alex.pth")
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), weights)
    metric = load_lpips(weights, "alex")
    img = torch.rand(1, 3, 32, 32)
    assert float(metric(img, img)) == pytest.approx(0.0, abs=1e-6)
    assert (
        main(
            [
                "solve",
                *FAST,
                "--task",
                "sr",
                "--scale",
                "2",
                "--method",
                "dps",
                "--input",
                clean_png,
                "--degrade",
                "--reference",
                clean_png,
                "--lpips-weights",
                weights,
                "--out",
                str(tmp_path / "o.png"),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "LPIPS unavailable" not in text and "LPIPS n/a" not in text and "LPIPS 0." in text


def test_solve_loads_a_diffusers_format_policy_lora(clean_png, tmp_path, tiny_unet_pipe):
    from peft.utils import get_peft_model_state_dict

    from align.backbones import attach_lora
    from align.inverse.solve import SolveConfig, run_solve

    attach_lora(tiny_unet_pipe, "policy", rank=2)
    for name, p in tiny_unet_pipe.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(0))
    type(tiny_unet_pipe).save_lora_weights(
        str(tmp_path / "policy"), unet_lora_layers=get_peft_model_state_dict(tiny_unet_pipe.unet, adapter_name="policy")
    )
    cfg = SolveConfig(
        input=clean_png,
        degrade=True,
        task="sr",
        scale=2,
        method="dps",
        dps_steps=2,
        out=str(tmp_path / "a.png"),
        progress=False,
    )
    cfg.model.source = "preset:tiny-unet"
    plain = run_solve(cfg)[0]["psnr"]
    cfg.lora, cfg.out = str(tmp_path / "policy"), str(tmp_path / "b.png")
    with_lora = run_solve(cfg)[0]["psnr"]
    assert plain != with_lora  # the adapter changes the denoiser


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--renoise", "1.5"], "every knob value must be in [0, 1]"),
        (["--renoise", "0,0.5", "--method", "clamp"], "sweep needs --method map_rps"),
        (["--task", "inpaint"], "needs --mask PNG or --box"),
        (["--task", "sr", "--scale", "3"], "not divisible by scale 3"),
        (["--task", "deblur", "--kernel", "disk:3"], "use gauss:SIZE:SIGMA"),
        (["--lora", "/nonexistent/lora"], "not a directory"),
    ],
)
def test_bad_solve_input_is_a_one_line_error(args, msg, clean_png, capsys):
    assert main(["solve", *FAST, "--input", clean_png, "--degrade", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_mask_png_of_the_wrong_size_is_refused(clean_png, tmp_path, capsys):
    mask = str(tmp_path / "mask.png")
    write_png(torch.ones(1, 3, 8, 8), mask)
    assert main(["solve", *FAST, "--task", "inpaint", "--mask", mask, "--input", clean_png, "--degrade"]) == 2
    assert "inpaint: mask is 8×8 but the image is 16×16" in capsys.readouterr().err


def test_solve_runs_on_a_dit_backbone(clean_png, tmp_path, capsys):
    out = str(tmp_path / "dit.png")
    args = [a for a in FAST if not a.startswith("model.source")]
    assert (
        main(
            [
                "solve",
                "model.source=preset:tiny-dit",
                *args,
                "--task",
                "inpaint",
                "--box",
                "4,4,8,8",
                "--input",
                clean_png,
                "--degrade",
                "--out",
                out,
            ]
        )
        == 0
    )
    assert os.path.isfile(out) and "PSNR" in capsys.readouterr().out


def test_mask_png_white_marks_the_missing_pixels(tmp_path):
    from align.inverse.solve import SolveConfig, _inpaint

    png = torch.zeros(1, 3, 16, 16)
    png[..., 2:5, 3:9] = 1.0  # white = to fill
    write_png(png, str(tmp_path / "m.png"))
    op = _inpaint(SolveConfig(mask=str(tmp_path / "m.png")), 16)
    assert float(op.mask.sum()) == 256 - 18 and float(op.mask[0, 0, 3, 4]) == 0.0 and float(op.mask[0, 0, 0, 0]) == 1.0


def test_clamp_sigma_n_defaults_to_sigma_y_and_can_be_set(tiny_unet_pipe):
    from align.inverse.solve import SolveConfig, build_solver

    op = Inpaint(box_mask(16, (4, 4, 8, 8)))
    y = torch.zeros(1, 3, 16, 16)
    cfg = SolveConfig(method="clamp", sigma_y=0.07, progress=False)
    assert build_solver(cfg, tiny_unet_pipe, op, y, 0.3).config.sigma_n == 0.07
    cfg.clamp_sigma_n = 0.01
    assert build_solver(cfg, tiny_unet_pipe, op, y, 0.3).config.sigma_n == 0.01
    cfg.method = "map_rps"
    assert build_solver(cfg, tiny_unet_pipe, op, y, 0.3).stage2.config.sigma_n == 0.01
    cfg.method, cfg.clamp_sigma_n = "dps", None
    assert build_solver(cfg, tiny_unet_pipe, op, y, 0.3).problem.sigma_y is None  # DPS's step does not use σ_y

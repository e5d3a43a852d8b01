"""`--lpips-weights FILE` is read with weights_only=True (or from safetensors): a crafted pickle that
would run code is refused with one line and its code never runs; a valid torchvision checkpoint
gives the same LPIPS as torchmetrics' own pretrained loading of the same weights."""

from __future__ import annotations

import contextlib
import os
import pickle
import pickletools
import tempfile
import zipfile

import pytest
import torch
import torchvision

from align.cli import main
from align.inverse.metrics import load_lpips


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): the stand-in for arbitrary code in a crafted .pth."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _crafted(tmp_path, name: str, how: str) -> tuple[str, str]:
    marker = str(tmp_path / f"pwned_{name}")
    path = str(tmp_path / f"{name}.pth")
    payload = {"features.0.weight": _RunsCode(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh)
    return path, marker


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_crafted_pickle_is_refused_and_its_code_never_runs(tmp_path, how):
    path, marker = _crafted(tmp_path, "evil", how)
    with pytest.raises(ValueError, match=r"--lpips-weights .*evil\.pth: refused, not a plain tensor checkpoint"):
        load_lpips(path, "alex")
    assert not os.path.exists(marker)
    # the fixture is really dangerous, shown without ever unpickling it: its stream calls os.mkdir
    assert _calls_mkdir(_pickle_stream(path))


def _pickle_stream(path: str) -> bytes:
    """The pickle bytes of a file: the whole file, or the ``data.pkl`` member of a torch.save zip."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    with open(path, "rb") as fh:
        return fh.read()


def _calls_mkdir(stream: bytes) -> bool:
    """Static read of the opcodes (pickletools, no execution): a global ``mkdir`` is pushed and REDUCE'd."""
    ops = list(pickletools.genops(stream))
    names = [op.name for op, _, _ in ops]
    strings = [arg for _, arg, _ in ops if isinstance(arg, str)]
    return "REDUCE" in names and any(a == "mkdir" or a.endswith(" mkdir") for a in strings)


def test_align_solve_refuses_a_crafted_lpips_file_in_one_line_before_the_model_loads(tmp_path, capsys):
    from align.inverse.solve import write_png

    clean = str(tmp_path / "clean.png")
    write_png(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)), clean)
    path, marker = _crafted(tmp_path, "evil_cli", "torch.save")
    # a base that passes config validation (its model_index.json) but holds no weights: loading it would fail
    empty_base = tmp_path / "no_weights"
    empty_base.mkdir()
    (empty_base / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    code = main(
        [
            "solve",
            f"model.source={empty_base}",
            "--input",
            clean,
            "--degrade",
            "--task",
            "sr",
            "--scale",
            "2",
            "--lpips-weights",
            path,
            "--out",
            str(tmp_path / "o.png"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "refused, not a plain tensor checkpoint" in err, err
    assert not os.path.exists(marker)  # and the weightless base was never loaded: LPIPS is checked first


@contextlib.contextmanager
def _hub_cache_with(path: str, filename: str):
    """torch.hub's checkpoint dir pointed at a temp dir holding ``filename`` (the reference only)."""
    old = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "checkpoints"))
        os.symlink(os.path.abspath(path), os.path.join(tmp, "checkpoints", filename))
        torch.hub.set_dir(tmp)
        try:
            yield
        finally:
            torch.hub.set_dir(old)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_valid_weights_give_torchmetrics_own_pretrained_lpips(tmp_path, fmt):
    """Reference: torchmetrics' LPIPS with its normal pretrained path, served our trusted file through
    torch.hub's cache. Same weights, same heads → equal to float rounding on random images."""
    from safetensors.torch import save_file
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    torch.manual_seed(0)
    state = torchvision.models.alexnet(weights=None).state_dict()
    pth = str(tmp_path / "alex.pth")
    torch.save(state, pth)
    path = pth
    if fmt == "safetensors":
        path = str(tmp_path / "alex.safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    ours = load_lpips(path, "alex")
    filename = torchvision.models.AlexNet_Weights.DEFAULT.url.rsplit("/", 1)[-1]
    with _hub_cache_with(pth, filename):
        ref = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).eval()
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 3, 64, 64, generator=g), torch.rand(3, 3, 64, 64, generator=g)
    with torch.no_grad():
        want, got = float(ref(a, b)), float(ours(a, b))
        assert float(ours(a, a)) == pytest.approx(0.0, abs=1e-7)
    assert want > 0 and got == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_a_checkpoint_of_the_wrong_network_is_a_one_line_error(tmp_path):
    path = str(tmp_path / "vgg_as_alex.pth")
    torch.save({"features.0.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match="not a torchvision alexnet checkpoint"):
        load_lpips(path, "alex")

"""align/checkpoint.py's no-pickle storage of nested states (what DeepSpeed's checkpoint engine hands
over, align/distributed.py): round trip, allowlisted classes only, and the pickle check."""

from __future__ import annotations

import dataclasses
import enum
import json

import pytest
import torch

from align import checkpoint as ckpt
from align.errors import CheckpointError


class Stage(int, enum.Enum):
    """Like DeepSpeed's ZeroStageEnum: an int enum."""

    gradients = 2
    weights = 3


@dataclasses.dataclass
class Address:
    """Like DeepSpeed's fragment_address: a plain dataclass."""

    numel: int
    start: int


class Built:
    """A class whose construction would be visible: no allowlist names it."""

    made = 0

    def __init__(self) -> None:
        Built.made += 1


ALLOWED = (f"{__name__}.Stage", f"{__name__}.Address")


def _state() -> dict:
    """The shapes of a ZeRO optimiser state: int keys, tuples, a Size, an enum, objects, inf, None."""
    return {
        "optimizer_state_dict": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(5)}, 1: {"exp_avg": torch.zeros(0)}},
            "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": [0], "name": "policy"}],
        },
        "zero_stage": Stage.weights,
        "param_shapes": [{"lora.weight": torch.Size([8, 4])}],
        "slices": [{"lora.weight": Address(numel=32, start=0)}],
        "steps_per_print": float("inf"),
        "frozen": None,
        "__reserved": "a key that looks like a marker",
    }


def test_a_nested_state_round_trips_with_its_types(tmp_path) -> None:
    state = _state()
    ckpt.save_tree(tmp_path / "s.pt", state, ALLOWED)
    back = ckpt.load_tree(tmp_path / "s.pt", ALLOWED)
    opt = back["optimizer_state_dict"]
    assert set(opt["state"]) == {0, 1}  # int keys stay ints
    torch.testing.assert_close(opt["state"][0]["exp_avg"], state["optimizer_state_dict"]["state"][0]["exp_avg"])
    assert opt["state"][0]["step"].shape == () and opt["state"][1]["exp_avg"].shape == (0,)
    assert opt["param_groups"][0]["betas"] == (0.9, 0.999) and isinstance(opt["param_groups"][0]["betas"], tuple)
    assert back["zero_stage"] is Stage.weights
    assert type(back["param_shapes"][0]["lora.weight"]) is torch.Size
    assert back["slices"][0]["lora.weight"] == Address(numel=32, start=0)
    assert back["steps_per_print"] == float("inf") and back["frozen"] is None
    assert back["__reserved"] == "a key that looks like a marker"
    ckpt.assert_no_pickle(tmp_path)  # one safetensors file, nothing else


def test_an_object_of_a_class_not_allowed_is_refused_when_saved(tmp_path) -> None:
    with pytest.raises(TypeError, match=r"a test_checkpoint_tree\.Built is not an allowed checkpoint class"):
        ckpt.save_tree(tmp_path / "s.pt", {"x": Built()}, ALLOWED)
    assert not (tmp_path / "s.pt").exists()


def test_a_file_naming_a_class_not_allowed_is_refused_without_building_it(tmp_path) -> None:
    """A tampered header cannot make load_tree construct (or import) a class outside the allowlist."""
    structure = {"x": {"__object__": f"{__name__}.Built", "state": {}}}
    ckpt.save_tensors(tmp_path / "s.pt", {}, {ckpt.TREE_KEY: json.dumps(structure)})
    before = Built.made
    with pytest.raises(CheckpointError, match=r"refusing to build a test_checkpoint_tree\.Built"):
        ckpt.load_tree(tmp_path / "s.pt", ALLOWED)
    assert Built.made == before


def test_a_pickle_anywhere_in_a_checkpoint_is_refused_by_name(tmp_path) -> None:
    ckpt.write_json(tmp_path / "state.json", {"iteration": 1})
    (tmp_path / "latest").write_text("pytorch_model")
    sub = tmp_path / "accelerate"
    sub.mkdir()
    ckpt.save_tensors(sub / "w.safetensors", {"a": torch.zeros(3)})
    ckpt.assert_no_pickle(tmp_path)
    torch.save({"a": torch.zeros(3)}, sub / "random_states_0.pkl")
    with pytest.raises(CheckpointError, match=r"random_states_0\.pkl: neither safetensors nor text"):
        ckpt.assert_no_pickle(tmp_path)


def test_a_safetensors_header_that_starts_like_a_pickle_is_not_mistaken_for_one(tmp_path) -> None:
    """A header length of 128 + 256k bytes makes the file's first byte 0x80, a pickle's first byte."""
    for pad in range(300):
        path = tmp_path / f"w{pad}.safetensors"
        ckpt.save_tensors(path, {"a": torch.zeros(1)}, {"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
        path.unlink()
    else:
        pytest.fail("no padding gave a header length with low byte 0x80")
    ckpt.assert_no_pickle(tmp_path)

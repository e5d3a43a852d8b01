"""The shipped GenEval prompt set (rewards/geneval/data): intact, and packaged only with its licence."""

from __future__ import annotations

import collections
from importlib import resources
from pathlib import Path

import tomllib

from rewards.geneval.data import METADATA_FILE, OBJECT_NAMES_FILE, load_metadata, object_names

ROOT = Path(__file__).resolve().parents[1]


def test_the_553_prompts_and_80_classes_are_geneval_s() -> None:
    records = load_metadata()
    assert len(records) == 553 and len(object_names()) == 80 and object_names()[:2] == ("person", "bicycle")
    assert collections.Counter(r["tag"] for r in records) == {
        "position": 100,
        "color_attr": 100,
        "two_object": 99,
        "colors": 94,
        "single_object": 80,
        "counting": 80,
    }
    assert {c["class"] for r in records for c in r["include"]} <= set(object_names())


def test_the_data_ships_as_package_data_together_with_its_mit_licence() -> None:
    files = resources.files("rewards.geneval.data")
    assert (
        "MIT License" in files.joinpath("LICENSE").read_text()
        and "Dhruba Ghosh" in files.joinpath("LICENSE").read_text()
    )
    assert "djghosh13/geneval" in files.joinpath("README.md").read_text()
    shipped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert {"LICENSE", "README.md", METADATA_FILE, OBJECT_NAMES_FILE} <= set(shipped["rewards.geneval.data"])

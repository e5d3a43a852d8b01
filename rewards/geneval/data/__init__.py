"""The shipped GenEval prompt set (MIT, see LICENSE and README.md beside this file): 553 metadata
records and the 80 COCO class names, read with importlib.resources so they work from a wheel."""

from __future__ import annotations

import functools
import json
from importlib import resources

METADATA_FILE = "evaluation_metadata.jsonl"
OBJECT_NAMES_FILE = "object_names.txt"


def _text(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _records() -> tuple[str, ...]:
    return tuple(line for line in _text(METADATA_FILE).splitlines() if line.strip())


def load_metadata() -> list[dict]:
    """The 553 GenEval records in file order (fresh dicts: callers may mutate them)."""
    return [json.loads(line) for line in _records()]


@functools.lru_cache(maxsize=1)
def object_names() -> tuple[str, ...]:
    """The 80 COCO class names of GenEval's detector, in its label order."""
    return tuple(line.strip() for line in _text(OBJECT_NAMES_FILE).splitlines() if line.strip())

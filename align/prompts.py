"""Prompt sources of `align train` and `align eval`: the prompts of each iteration, of the evaluation
grid, and each prompt's metadata record (what GenEval-style rewards score against).

``trainer.prompts`` is one of
- ``toy``: the toy world's grammar (the default); a prompt's record is ``align.toy.world.parse_prompt``;
- ``geneval``: the 553 GenEval prompts shipped in ``rewards/geneval/data`` with their records;
- a ``.jsonl`` file, one JSON object a line with a string ``prompt`` field; the whole object is that
  prompt's record (GenEval's ``evaluation_metadata.jsonl`` is such a file);
- any other UTF-8 text file, one prompt per line (blank lines and lines starting with ``#`` are
  skipped; DDPO's and Flow-GRPO's prompt sets); its prompts have no record (``None``).
Draws are seeded by (seed, iteration), so the data position of a run is its iteration index and a
resumed run sees the same prompts.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

TOY = "toy"
GENEVAL = "geneval"


@functools.lru_cache(maxsize=8)
def read_prompt_file(path: str) -> tuple[str, ...]:
    """The prompts of a prompt file (text or JSONL); a missing or empty file is a one-line error naming it."""
    if path.endswith(".jsonl"):
        return tuple(read_jsonl_records(path))
    file = _existing(path)
    prompts = tuple(
        line.strip()
        for line in file.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    if not prompts:
        raise ValueError(f"trainer.prompts: {path!r} holds no prompts")
    return prompts


def _existing(path: str) -> Path:
    file = Path(path)
    if not file.is_file():
        raise ValueError(
            f"trainer.prompts: no prompt file at {path!r} (use 'toy', 'geneval', a text file with one "
            "prompt per line, or a .jsonl file with a 'prompt' field per line)"
        )
    return file


@functools.lru_cache(maxsize=8)
def read_jsonl_records(path: str) -> dict[str, dict]:
    """prompt -> record of a JSONL prompt file, in file order; bad lines are one-line errors naming file and line."""
    records: dict[str, dict] = {}
    for number, line in enumerate(_existing(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"trainer.prompts: {path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise ValueError(f"{where}: needs a JSON object with a non-empty string 'prompt' field")
        prompt = record["prompt"].strip()
        if prompt in records and records[prompt] != record:
            raise ValueError(f"{where}: prompt {prompt!r} appears twice with different metadata")
        records[prompt] = record
    if not records:
        raise ValueError(f"trainer.prompts: {path!r} holds no prompts")
    return records


@functools.lru_cache(maxsize=1)
def _geneval_records() -> dict[str, dict]:
    from rewards.geneval.data import load_metadata

    return {r["prompt"]: r for r in load_metadata()}


def source_prompts(source: str) -> tuple[str, ...]:
    """Every prompt of a finite source in its order (the toy source: every scene of the grammar)."""
    if source == TOY:
        from align.toy.world import all_scenes

        return tuple(s.prompt for s in all_scenes())
    if source == GENEVAL:
        return tuple(_geneval_records())
    return read_prompt_file(source)


def check_prompt_source(source: str) -> None:
    """Fail early (at config load) on a bad ``trainer.prompts``."""
    if source not in (TOY, GENEVAL):
        read_prompt_file(source)


def draw_prompts(source: str, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` prompts from ``source``: toy scenes from the grammar, or file / GenEval prompts drawn uniformly
    (without replacement while the source has at least ``n``)."""
    if source == TOY:
        from align.toy.world import sample_scenes

        return [s.prompt for s in sample_scenes(n, rng)]
    pool = source_prompts(source)
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=len(pool) < n)]


def evaluation_prompts(source: str, n: int, seed: int) -> list[str]:
    """The fixed prompts of the evaluation grids (the same ``n`` at every evaluation of a run)."""
    return draw_prompts(source, n, np.random.default_rng(seed))


def prompt_metadata(source: str, prompts: Sequence[str]) -> list[Optional[dict]]:
    """Each prompt's metadata record (a fresh dict), ``None`` for a plain text file's prompts. A prompt
    that the source does not hold is a one-line error naming it and the source."""
    if source == TOY:
        from align.toy.world import parse_prompt

        return [parse_prompt(p) for p in prompts]
    if source == GENEVAL or source.endswith(".jsonl"):
        table = _geneval_records() if source == GENEVAL else read_jsonl_records(source)
        missing = next((p for p in prompts if p not in table), None)
        if missing is not None:
            raise ValueError(f"prompt {missing!r} is not in the prompt source {source!r}")
        return [json.loads(json.dumps(table[p])) for p in prompts]
    read_prompt_file(source)
    return [None] * len(prompts)


def has_records(source: str) -> bool:
    """Whether every prompt of ``source`` has a metadata record (what GenEval-style evaluation needs)."""
    return source in (TOY, GENEVAL) or source.endswith(".jsonl")


def spread_over_tags(prompts: Sequence[str], records: Sequence[Optional[dict]], n: Optional[int]) -> list[int]:
    """Indices of ``n`` prompts taken round-robin over the records' tags (first tag first, each tag in
    source order), so a small evaluation still covers every tag; all indices when ``n`` is None."""
    if n is None or n >= len(prompts):
        return list(range(len(prompts)))
    by_tag: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_tag.setdefault((record or {}).get("tag", ""), []).append(i)
    queues, picked = list(by_tag.values()), []
    while len(picked) < n:
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return sorted(picked)

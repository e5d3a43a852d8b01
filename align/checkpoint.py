"""Atomic checkpoints in safetensors + JSON (never pickle).

A checkpoint is a directory written next to its final place and renamed into it in one step
(``os.replace`` of a directory on the same filesystem), so a crash leaves either the previous
checkpoint or the new one, never a half-written one. Optimizer states and RNG states are split
into tensors (safetensors) and plain structure (JSON).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp dir beside ``final``; on success replace ``final`` with it atomically."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors save of contiguous CPU clones (shared storage is not allowed by the format)."""
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def optimizer_state_split(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``opt.state_dict()`` into ``(tensors, json_structure)`` for safetensors + JSON."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state_meta: dict[str, dict[str, Any]] = {}
    for pid, entries in sd["state"].items():
        state_meta[str(pid)] = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value
                state_meta[str(pid)][name] = {"tensor": f"{pid}.{name}"}
            else:
                state_meta[str(pid)][name] = {"value": value}
    return tensors, {"state": state_meta, "param_groups": sd["param_groups"]}


def optimizer_state_join(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of :func:`optimizer_state_split`: a dict for ``opt.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for pid, entries in meta["state"].items():
        state[int(pid)] = {name: tensors[e["tensor"]] if "tensor" in e else e["value"]
                           for name, e in entries.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state(generators: dict[str, torch.Generator] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Capture torch's global CPU RNG and named generators as tensors, plus numpy's as JSON-able."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    for name, gen in (generators or {}).items():
        tensors[f"gen.{name}"] = gen.get_state()
    return tensors, {"numpy_global": _np_state_to_json(np.random.get_state())}


def restore_rng_state(tensors: dict[str, torch.Tensor], meta: dict,
                      generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    for name, gen in (generators or {}).items():
        gen.set_state(tensors[f"gen.{name}"])
    np.random.set_state(_np_state_from_json(meta["numpy_global"]))


def _np_state_to_json(state: tuple) -> list:
    kind, keys, pos, has_gauss, cached = state
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _np_state_from_json(state: list) -> tuple:
    kind, keys, pos, has_gauss, cached = state
    return (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    if torch.is_tensor(obj) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")

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
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import numpy as np

from align.errors import CheckpointError

if TYPE_CHECKING:  # torch and safetensors are imported where used: resume checks run before torch
    import torch

#: written last into a checkpoint directory: its files and sizes; a directory without it is incomplete
COMPLETE_FILE = ".complete.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _honour_umask(path: Path, mode: int) -> None:
    """Give ``path`` the permissions every other tool gives (``mode & ~umask``): mkdtemp makes 0700
    directories and safetensors 0600 files."""
    os.chmod(path, mode & ~_umask())


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, complete_marker: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside ``final``; on success replace ``final`` with it (two renames).

    With ``complete_marker`` (training checkpoints) the temp dir gets :data:`COMPLETE_FILE` (its
    files and their sizes) before the renames, so a kill at any point leaves at least one complete
    checkpoint on disk, found by :func:`latest_complete`: the previous ``final``, a renamed-away
    ``.final.old-*``, or a complete ``.final.tmp-*``; once the new ``final`` is in place, every stale
    sibling is removed. Without it (exports, pipelines) only this call's own old copy is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    _honour_umask(tmp, 0o777)
    old = None
    try:
        yield tmp
        if complete_marker:
            mark_complete(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if complete_marker:
        remove_stale(final)
    elif old is not None:
        shutil.rmtree(old, ignore_errors=True)


def mark_complete(directory: Path) -> None:
    """Write :data:`COMPLETE_FILE`: every file under ``directory`` with its size (checked on resume)."""
    files = {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != COMPLETE_FILE
    }
    write_json(directory / COMPLETE_FILE, {"files": files, "written_ns": time.time_ns()})


def is_complete(directory: Path) -> bool:
    """Has :data:`COMPLETE_FILE` and every file it lists, with that size. A checkpoint written before
    markers existed counts as complete if it has a readable ``state.json``."""
    marker = directory / COMPLETE_FILE
    if not marker.is_file():
        return (
            directory.is_dir()
            and not directory.name.startswith(".")
            and _readable_json(directory / "state.json") is not None
        )
    info = _readable_json(marker)
    if not isinstance(info, dict) or not isinstance(info.get("files"), dict):
        return False
    return all(
        (directory / name).is_file() and (directory / name).stat().st_size == size
        for name, size in info["files"].items()
    )


def _readable_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def candidates(final: str | os.PathLike) -> list[Path]:
    """``final`` and its ``.final.old-*`` / ``.final.tmp-*`` siblings that exist."""
    final = Path(final)
    found = [final] if final.is_dir() else []
    if final.parent.is_dir():
        found += sorted(p for p in final.parent.glob(f".{final.name}.old-*") if p.is_dir())
        found += sorted(p for p in final.parent.glob(f".{final.name}.tmp-*") if p.is_dir())
    return found


def _age_key(directory: Path) -> tuple:
    """Newest first: the iteration in ``state.json``, then when the marker was written."""
    state = _readable_json(directory / "state.json")
    marker = _readable_json(directory / COMPLETE_FILE)
    iteration = state.get("iteration", -1) if isinstance(state, dict) else -1
    written = marker.get("written_ns", 0) if isinstance(marker, dict) else 0
    return (iteration, written, not directory.name.startswith("."))


def latest_complete(final: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint among ``final`` and its old/tmp siblings; ``None`` if there is none."""
    complete = [d for d in candidates(final) if is_complete(d)]
    return max(complete, key=_age_key) if complete else None


def remove_stale(final: str | os.PathLike) -> list[Path]:
    """Remove the ``.final.old-*`` / ``.final.tmp-*`` siblings of a complete ``final`` (markers first,
    so a kill during removal never leaves a half-deleted directory that looks complete)."""
    final = Path(final)
    if not is_complete(final):
        return []
    stale = [d for d in candidates(final) if d != final]
    for d in stale:
        with contextlib.suppress(FileNotFoundError):
            (d / COMPLETE_FILE).unlink()
        shutil.rmtree(d, ignore_errors=True)
    return stale


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    """JSON from ``path``; a missing, truncated or corrupt file is a :class:`CheckpointError` naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: truncated or corrupt JSON ({err})") from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors save of contiguous CPU clones (shared storage is not allowed by the format)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path))
    _honour_umask(Path(path), 0o666)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; missing, truncated or corrupt is a :class:`CheckpointError` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({str(err).splitlines()[0]})") from None


def optimizer_state_split(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``opt.state_dict()`` into ``(tensors, json_structure)`` for safetensors + JSON."""
    import torch

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
        state[int(pid)] = {name: tensors[e["tensor"]] if "tensor" in e else e["value"] for name, e in entries.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state(generators: dict[str, torch.Generator] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Capture torch's global CPU RNG and named generators as tensors, plus numpy's as JSON-able."""
    import torch

    tensors = {"torch_cpu": torch.get_rng_state()}
    for name, gen in (generators or {}).items():
        tensors[f"gen.{name}"] = gen.get_state()
    return tensors, {"numpy_global": _np_state_to_json(np.random.get_state())}


def restore_rng_state(
    tensors: dict[str, torch.Tensor], meta: dict, generators: dict[str, torch.Generator] | None = None
) -> None:
    import torch

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
    torch = __import__("sys").modules.get("torch")
    if torch is not None and torch.is_tensor(obj) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")

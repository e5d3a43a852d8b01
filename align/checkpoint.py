"""Atomic checkpoints in safetensors + JSON (never pickle).

A checkpoint is a directory written next to its final place and renamed into it in one step
(``os.replace`` of a directory on the same filesystem), so a crash leaves either the previous
checkpoint or the new one, never a half-written one. Optimizer states and RNG states are split
into tensors (safetensors) and plain structure (JSON). :func:`save_tree` does the same for any nested
state (DeepSpeed's, align/distributed.py): one safetensors file whose header holds the structure as JSON,
objects only of allowlisted classes. :func:`assert_no_pickle` refuses a directory holding a pickle.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
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


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None
) -> None:
    """safetensors save of contiguous CPU clones (shared storage is not allowed by the format)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path), metadata)
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


#: safetensors header key holding :func:`save_tree`'s structure
TREE_KEY = "align.tree"


def save_tree(path: str | os.PathLike, obj: Any, allowed: tuple[str, ...] = ()) -> None:
    """Nested dicts, lists, tuples, scalars and tensors as one safetensors file: the tensors, and the
    structure as JSON in its header. Objects only of the ``allowed`` classes ("module.QualName"; their
    ``vars``, or an enum's value); anything else is a TypeError naming it, so nothing is pickled."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(obj, tensors, allowed)
    save_tensors(path, tensors, {TREE_KEY: json.dumps(structure)})


def load_tree(path: str | os.PathLike, allowed: tuple[str, ...] = ()) -> Any:
    """Inverse of :func:`save_tree` (tensors on the CPU); builds objects only of the ``allowed`` classes."""
    from safetensors import safe_open

    tensors = load_tensors(path)
    with safe_open(str(path), "pt") as fh:
        header = (fh.metadata() or {}).get(TREE_KEY)
    if header is None:
        raise CheckpointError(f"{path}: not a save_tree file (no {TREE_KEY!r} in its header)")
    return _decode(json.loads(header), tensors, allowed)


def _class_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _allowed_class(name: str, allowed: tuple[str, ...]) -> type:
    if name not in allowed:
        raise CheckpointError(f"refusing to build a {name} (not an allowed checkpoint class: {allowed})")
    module, _, qualname = name.rpartition(".")
    return getattr(importlib.import_module(module), qualname)


def _encode(obj: Any, tensors: dict, allowed: tuple[str, ...]) -> Any:
    """JSON for ``obj``; its tensors go into ``tensors`` (referenced by key)."""
    import torch

    if torch.is_tensor(obj):
        key = f"t{len(tensors)}"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, enum.Enum) and _class_name(obj) in allowed:  # before int: IntEnum is an int
        return {"__enum__": _class_name(obj), "value": obj.value}
    if obj is None or isinstance(obj, (bool, int, float, str)) and not isinstance(obj, enum.Enum):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (list, tuple)):  # torch.Size is a tuple
        items = [_encode(v, tensors, allowed) for v in obj]
        return items if type(obj) is list else {"__tuple__": items, "size": isinstance(obj, torch.Size)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, allowed) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, allowed), _encode(v, tensors, allowed)] for k, v in obj.items()]}
    if _class_name(obj) in allowed:
        return {"__object__": _class_name(obj), "state": _encode(vars(obj), tensors, allowed)}
    raise TypeError(f"save_tree: a {_class_name(obj)} is not an allowed checkpoint class ({allowed})")


def _decode(node: Any, tensors: dict, allowed: tuple[str, ...]) -> Any:
    """Inverse of :func:`_encode`."""
    import torch

    if isinstance(node, list):
        return [_decode(v, tensors, allowed) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__tuple__" in node:
        items = tuple(_decode(v, tensors, allowed) for v in node["__tuple__"])
        return torch.Size(items) if node["size"] else items
    if "__items__" in node:
        return {_decode(k, tensors, allowed): _decode(v, tensors, allowed) for k, v in node["__items__"]}
    if "__enum__" in node:
        return _allowed_class(node["__enum__"], allowed)(node["value"])
    if "__object__" in node:
        obj = object.__new__(_allowed_class(node["__object__"], allowed))
        obj.__dict__.update(_decode(node["state"], tensors, allowed))
        return obj
    return {k: _decode(v, tensors, allowed) for k, v in node.items()}


def assert_no_pickle(directory: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` naming the first file under ``directory`` that is neither a
    safetensors file nor UTF-8 text (JSON, DeepSpeed's ``latest``): a pickle or a torch.save archive
    is neither. Checked on every checkpoint written and read."""
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        if not (_is_safetensors(path) or _is_text(path)):
            raise CheckpointError(f"{path}: neither safetensors nor text (a pickle?); checkpoints hold no pickle")


def _is_safetensors(path: Path) -> bool:
    """An 8-byte little-endian header length, then that many bytes of a JSON object."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 2 <= size <= min(100_000_000, path.stat().st_size - 8):
            return False
        header = fh.read(size)
    try:
        return isinstance(json.loads(header), dict)
    except (UnicodeDecodeError, ValueError):
        return False


def _is_text(path: Path) -> bool:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in data


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

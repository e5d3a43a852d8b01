"""Validated multi-reward scoring: B images → a (B, K) score matrix, one column per reward.

Each reward is called on chunks of at most ``reward.batch_size`` images moved to ``reward.device``,
optionally under a ``timeout_s`` per call. A plugin that raises, times out, or returns a wrong
shape, a non-float dtype or non-finite values stops scoring with a :class:`RewardError` naming it,
its input batch size and the bad values — so no update can ever see a partial or NaN batch.
"""

from __future__ import annotations

import threading
from typing import Any, Optional, Sequence

import torch

from rewards.registry import Reward, RewardError

#: metadata key of the per-sample prompt records (list[dict | None], one per image; GenEval's format)
PROMPT_METADATA = "prompt_metadata"


def score(
    rewards: Sequence[Reward],
    images: torch.Tensor,
    prompts: list[str],
    metadata: Optional[dict[str, Any]] = None,
    *,
    prompt_metadata: Optional[Sequence[Optional[dict]]] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run every reward; returns scores (B, K) (float32, CPU) and the metadata the rewards added.
    ``prompt_metadata`` (one record per image) reaches each reward as ``metadata["prompt_metadata"]``,
    cut to the reward's chunk; a batch whose size differs from its prompts or records is refused here."""
    metadata = {} if metadata is None else metadata
    if prompt_metadata is not None:
        metadata[PROMPT_METADATA] = list(prompt_metadata)
    if images.shape[0] != len(prompts):
        raise RewardError(f"scoring got {images.shape[0]} images but {len(prompts)} prompts")
    check_prompt_metadata(metadata, images.shape[0])
    columns = [score_one(reward, images, prompts, metadata) for reward in rewards]
    return torch.stack(columns, dim=1), metadata


def check_prompt_metadata(metadata: dict[str, Any], n: int) -> None:
    """``metadata["prompt_metadata"]``, when present, is a list of exactly ``n`` records (one per image)."""
    records = metadata.get(PROMPT_METADATA)
    if records is not None and (not isinstance(records, (list, tuple)) or len(records) != n):
        got = f"{len(records)} records" if isinstance(records, (list, tuple)) else type(records).__name__
        raise RewardError(f"scoring got {n} images but {got} in metadata['{PROMPT_METADATA}']")


def score_one(reward: Reward, images: torch.Tensor, prompts: list[str], metadata: dict[str, Any]) -> torch.Tensor:
    """One reward over the batch in chunks of ``reward.batch_size``; per-sample tensors the reward
    adds to the metadata are concatenated across chunks (each chunk sees its slice of the prompt records)."""
    n = len(prompts)
    check_prompt_metadata(metadata, n)
    size = getattr(reward, "batch_size", None) or n or 1
    device = getattr(reward, "device", None) or "cpu"
    if size >= n:
        return validate_scores(reward.name, _call(reward, images.to(device), prompts, metadata), n)
    parts, added = [], []
    for start in range(0, n, size):
        chunk_meta = dict(metadata)
        stop = min(start + size, n)
        if metadata.get(PROMPT_METADATA) is not None:
            chunk_meta[PROMPT_METADATA] = metadata[PROMPT_METADATA][start:stop]
        values = _call(reward, images[start:stop].to(device), prompts[start:stop], chunk_meta)
        parts.append(validate_scores(reward.name, values, stop - start))
        added.append(
            {
                k: v
                for k, v in chunk_meta.items()
                if k != PROMPT_METADATA and (k not in metadata or chunk_meta[k] is not metadata[k])
            }
        )
    for key in added[0]:
        metadata[key] = _concat([a[key] for a in added])
    return torch.cat(parts)


def _concat(values: list[Any]) -> Any:
    """Per-chunk metadata → one value: tensors concatenated on dim 0, dicts key by key, else the list."""
    if all(torch.is_tensor(v) and v.ndim > 0 for v in values):
        return torch.cat([v.cpu() for v in values])
    if all(isinstance(v, dict) for v in values):
        return {k: _concat([v[k] for v in values]) for k in values[0]}
    return values


def _call(reward: Reward, images: torch.Tensor, prompts: list[str], metadata: dict[str, Any]) -> Any:
    """``reward(images, prompts, metadata)`` with its errors (and timeout) re-raised naming it."""
    timeout = getattr(reward, "timeout_s", None)
    try:
        if timeout is None or getattr(reward, "handles_timeout", False):
            return reward(images, prompts, metadata)
        return _call_with_timeout(reward, images, prompts, metadata, float(timeout))
    except RewardError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with the plugin's name
        raise RewardError(
            f"reward {reward.name!r} raised on a batch of {len(prompts)}: {type(err).__name__}: {err}"
        ) from err


def _call_with_timeout(reward: Reward, images, prompts, metadata, timeout: float) -> Any:
    """Run the call in a daemon thread and give up after ``timeout`` seconds. Python cannot kill
    the thread: a hung in-process reward keeps running in the background (a remote reward's HTTP
    timeout does not have this limit)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = reward(images, prompts, metadata)
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            box["error"] = err

    thread = threading.Thread(target=target, name=f"reward-{reward.name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise RewardError(f"reward {reward.name!r} timed out after {timeout:g} s on a batch of {len(prompts)}")
    if "error" in box:
        raise box["error"]
    return box["value"]


def validate_scores(name: str, values: Any, batch_size: int) -> torch.Tensor:
    """A float Tensor of shape (batch_size,) with finite values, returned as a float32 CPU copy (a reward may
    return the very tensor it stored in the metadata; the remote wire refuses shared memory)."""
    if not torch.is_tensor(values):
        raise RewardError(
            f"reward {name!r} returned {type(values).__name__}, expected a Tensor of shape ({batch_size},)"
        )
    if tuple(values.shape) != (batch_size,):
        raise RewardError(
            f"reward {name!r} returned shape {tuple(values.shape)} for a batch of {batch_size}; "
            f"expected ({batch_size},)"
        )
    if not values.dtype.is_floating_point:
        raise RewardError(
            f"reward {name!r} returned dtype {values.dtype} for a batch of {batch_size}; "
            "expected a floating-point tensor"
        )
    values = values.detach().float().cpu().clone()  # never an alias of a tensor the plugin put in its metadata
    bad = ~torch.isfinite(values)
    if bad.any():
        idx = bad.nonzero().flatten().tolist()
        raise RewardError(
            f"reward {name!r} returned non-finite values on a batch of {batch_size}: "
            f"{values[bad].tolist()[:5]} at indices {idx[:5]}"
        )
    return values

"""Remote rewards: the wire format and the client ``remote:http://HOST:PORT/NAME``.

Wire format (never pickle): a request is ``POST /NAME`` whose body is safetensors bytes holding
``images`` (B,3,H,W) in [0,1] as float32, or as uint8 q = round(255·x) (``wire_dtype="uint8"``: 4×
smaller; the server scores q/255, exactly what a reward that quantises to uint8 itself sees —
clip_score, hpsv2, aesthetic, the JPEG rewards), with the prompts as JSON in the safetensors metadata; the
answer is safetensors bytes holding ``scores`` (B,) and the per-sample tensors the reward put in
its metadata (``meta/<key>`` or ``meta/<key>/<sub>``). Errors come back as JSON ``{"error": ...}``
with a 4xx/5xx status. A bearer token (env ``ALIGN_REWARD_TOKEN``) goes in ``Authorization``.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from typing import Any, Optional

import requests
import torch
from requests.adapters import HTTPAdapter
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from urllib3.util.retry import Retry

from rewards.registry import REMOTE_PREFIX, RewardError

TOKEN_ENV = "ALIGN_REWARD_TOKEN"
RETRY_STATUS = (502, 503, 504)


def parse_url(spec: str) -> tuple[str, str]:
    """``remote:http://host:port/NAME`` → (endpoint URL, NAME); a one-line error otherwise."""
    url = spec[len(REMOTE_PREFIX) :] if spec.startswith(REMOTE_PREFIX) else spec
    parts = urllib.parse.urlsplit(url)
    name = parts.path.strip("/")
    if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port or not name or "/" in name:
        raise ValueError(f"remote reward {spec!r}: expected remote:http://HOST:PORT/NAME")
    return url, name


def encode_request(images: torch.Tensor, prompts: list[str], wire_dtype: str = "float32") -> bytes:
    images = images.detach().float().cpu()
    if wire_dtype == "uint8":
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    elif wire_dtype != "float32":
        raise ValueError(f"wire_dtype must be float32 or uint8, got {wire_dtype!r}")
    return st_save({"images": images.contiguous()}, metadata={"prompts": json.dumps(prompts)})


def decode_request(body: bytes) -> tuple[torch.Tensor, list[str]]:
    """Bytes → (images, prompts), checked: 4-D 3-channel float images, one str prompt per image."""
    tensors = st_load(body)  # safetensors parses untrusted bytes without executing anything
    meta = _metadata(body)
    images = tensors.get("images")
    if (
        images is None
        or images.ndim != 4
        or images.shape[1] != 3
        or not (images.dtype.is_floating_point or images.dtype == torch.uint8)
    ):
        raise ValueError("request needs 'images': a float or uint8 tensor (B,3,H,W)")
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    prompts = json.loads(meta.get("prompts", "null"))
    if not isinstance(prompts, list) or len(prompts) != images.shape[0] or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"request needs metadata 'prompts': a JSON list of {images.shape[0]} strings")
    return images, prompts


def encode_response(scores: torch.Tensor, metadata: dict[str, Any]) -> bytes:
    tensors = {"scores": scores.float().cpu().contiguous()}
    for key, value in metadata.items():
        if torch.is_tensor(value):
            tensors[f"meta/{key}"] = value.cpu().contiguous()
        elif isinstance(value, dict):
            tensors.update({f"meta/{key}/{k}": v.cpu().contiguous() for k, v in value.items() if torch.is_tensor(v)})
    return st_save(tensors)


def decode_response(body: bytes) -> tuple[torch.Tensor, dict[str, Any]]:
    tensors = st_load(body)
    metadata: dict[str, Any] = {}
    for key, value in tensors.items():
        parts = key.split("/")
        if parts[0] == "meta" and len(parts) == 2:
            metadata[parts[1]] = value
        elif parts[0] == "meta" and len(parts) == 3:
            metadata.setdefault(parts[1], {})[parts[2]] = value
    return tensors["scores"], metadata


def _metadata(body: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (8-byte little-endian header length, JSON header)."""
    n = int.from_bytes(body[:8], "little")
    return json.loads(body[8 : 8 + n]).get("__metadata__") or {}


class RemoteReward:
    """Client of ``align rewards serve``: POSTs each batch, with ``timeout_s`` per request and at most
    ``retries`` retries on connection errors, timeouts and 502/503/504. The retries are urllib3's
    :class:`Retry` on a ``requests`` session: the first retry is immediate, retry k ≥ 2 waits
    ``backoff_s · 2^(k-1)`` s (or the server's ``Retry-After``)."""

    device = "cpu"
    batch_size: Optional[int] = None
    handles_timeout = True  # the HTTP timeout is real; scoring need not wrap the call in a thread

    def __init__(
        self, spec: str, retries: int = 2, backoff_s: float = 0.5, wire_dtype: str = "float32", timeout_s: float = 60.0
    ) -> None:
        self.url, self.remote_name = parse_url(spec)
        self.timeout_s = float(timeout_s)
        if wire_dtype not in ("float32", "uint8"):
            raise ValueError(f"reward {spec!r}: wire_dtype must be float32 or uint8, got {wire_dtype!r}")
        self.wire_dtype = wire_dtype
        self.name, self.retries, self.backoff_s = spec, int(retries), float(backoff_s)
        self.token = os.environ.get(TOKEN_ENV)
        self.session = _session(self.retries, self.backoff_s)
        self.server_info = self.info()  # fail now, before any rollout, if the server is unreachable

    def info(self) -> dict:
        """The server's description of the reward (GET); checks reachability, token and name."""
        return json.loads(self._request(None, what="info"))

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: dict[str, Any]) -> torch.Tensor:
        body, limit = encode_request(images, prompts, self.wire_dtype), self.server_info.get("max_request_bytes")
        if limit is not None and len(body) > limit:
            raise RewardError(
                f"reward {self.name!r}: a batch of {len(prompts)} is {len(body)} bytes, over the "
                f"server's limit of {limit}; set reward_args batch_size smaller"
            )
        scores, extra = decode_response(self._request(body, what=f"a batch of {len(prompts)}"))
        metadata.update(extra)
        return scores

    def _request(self, body: Optional[bytes], what: str) -> bytes:
        """One GET (``body`` None) or POST, retried by the session; a one-line :class:`RewardError` naming
        the reward's URL otherwise."""
        headers = {"Content-Type": "application/octet-stream"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        gave_up = (
            f"reward {self.name!r} on {what}: no answer after {self.retries + 1} attempts "
            f"(timeout {self.timeout_s:g} s); last error: "
        )
        try:
            resp = self.session.request(
                "POST" if body else "GET", self.url, data=body, headers=headers, timeout=self.timeout_s
            )
        except requests.RequestException as err:
            raise RewardError(gave_up + _reason(err)) from None
        if resp.ok:
            return resp.content
        message = _error_text(resp)
        if resp.status_code in RETRY_STATUS:  # the retries are spent: the session hands back the last answer
            raise RewardError(gave_up + f"HTTP {resp.status_code}: {message}")
        raise RewardError(f"reward {self.name!r} on {what}: server answered {resp.status_code}: {message}")


def _session(retries: int, backoff_s: float) -> requests.Session:
    """A session whose adapter retries connection errors, read timeouts and 502/503/504 ``retries`` times,
    POST included (scoring is idempotent); after the last 50x it returns that answer instead of raising."""
    retry = Retry(
        total=retries,
        backoff_factor=backoff_s,
        status_forcelist=RETRY_STATUS,
        allowed_methods=frozenset({"GET", "POST"}),
        raise_on_status=False,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _reason(err: requests.RequestException) -> str:
    """The innermost cause of a failed request (urllib3 wraps it in ``MaxRetryError``), as ``Type: text``."""
    reason = err.args[0] if err.args else err
    reason = getattr(reason, "reason", None) or reason
    return reason if isinstance(reason, str) else f"{type(reason).__name__}: {reason}"


def _error_text(resp: requests.Response) -> str:
    try:
        return resp.json().get("error", "")
    except (ValueError, AttributeError):
        return resp.reason or ""

"""``align rewards serve``: one reward behind a small HTTP server (stdlib ``ThreadingHTTPServer``).

Binds 127.0.0.1 unless told otherwise; bound anywhere else it refuses to start without a token.
Requests need a Content-Length no larger than ``max_request_bytes`` (checked before the body is
read). Images must be finite and in [0, 1] (HTTP 400 otherwise: NaN or inf would be scored as
black or white). A connection that sends nothing for ``read_timeout_s`` seconds is closed (a read
timeout on the socket, so idle or stalled clients cannot hold handler threads forever). Calls into
the reward are serialised by a lock (one model, one device). The reward runs through the same
validated scoring as in training, so a bad plugin answers 422 naming itself.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import torch

from rewards.registry import Reward, RewardError
from rewards.remote import decode_request, encode_response
from rewards.scoring import score_one


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(
    reward: Reward,
    host: str = "127.0.0.1",
    port: int = 0,
    token: Optional[str] = None,
    max_request_bytes: int = 64 << 20,
    quiet: bool = False,
    read_timeout_s: float = 60.0,
) -> ThreadingHTTPServer:
    """A server for ``reward`` at ``http://host:port/<reward.name>`` (port 0: a free one, see
    ``server.server_address``). Call ``serve_forever()``; ``shutdown()`` + ``server_close()`` stop it.
    ``read_timeout_s``: a socket read (request line, headers or body) that waits longer closes the
    connection."""
    if not read_timeout_s > 0:
        raise ValueError(f"align rewards serve: read_timeout_s must be > 0, got {read_timeout_s}")
    if not is_loopback(host) and not token:
        raise ValueError(
            f"align rewards serve: binding {host} (not loopback) needs a token; "
            "set ALIGN_REWARD_TOKEN (clients send it as a bearer token)"
        )
    handler = type(
        "RewardHandler",
        (_Handler,),
        {
            "reward": reward,
            "token": token,
            "max_request_bytes": int(max_request_bytes),
            "lock": threading.Lock(),
            "quiet": quiet,
            "timeout": float(read_timeout_s),
        },
    )
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def image_range_error(images: torch.Tensor) -> Optional[str]:
    """One line saying why ``images`` are not valid [0, 1] images (non-finite or out of range), or None."""
    if images.numel() == 0:
        return None
    finite = torch.isfinite(images)
    if not bool(finite.all()):
        return f"images hold {int((~finite).sum())} non-finite value(s) (NaN or inf); send finite images in [0, 1]"
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        return f"images must lie in [0, 1], got values in [{low:.6g}, {high:.6g}]"
    return None


class _Handler(BaseHTTPRequestHandler):
    reward: Reward
    token: Optional[str]
    max_request_bytes: int
    lock: threading.Lock
    quiet: bool
    timeout: float  # StreamRequestHandler sets it on the socket: reads that wait longer raise TimeoutError

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self._authorised() and self._known_path():
            r = self.reward
            self._json(
                200,
                {
                    "name": r.name,
                    "device": str(getattr(r, "device", "cpu")),
                    "batch_size": getattr(r, "batch_size", None),
                    "max_request_bytes": self.max_request_bytes,
                },
            )

    def do_POST(self) -> None:  # noqa: N802
        if not (self._authorised() and self._known_path()):
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            return self._json(411, {"error": "Content-Length required"})
        if int(length) > self.max_request_bytes:
            self.close_connection = True  # never read an oversized body
            return self._json(
                413,
                {
                    "error": f"request of {int(length)} bytes exceeds the limit of "
                    f"{self.max_request_bytes} bytes (align rewards serve --max-request-mb)"
                },
            )
        try:
            images, prompts = decode_request(self.rfile.read(int(length)))
        except Exception as err:  # noqa: BLE001 - any malformed body is the client's fault
            return self._json(400, {"error": f"bad request body: {err}"})
        problem = image_range_error(images)
        if problem:
            return self._json(400, {"error": problem})
        metadata: dict = {}
        try:
            with self.lock:
                scores = score_one(self.reward, images, prompts, metadata)
        except RewardError as err:
            return self._json(422, {"error": str(err)})
        body = encode_response(scores, metadata)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorised(self) -> bool:
        if not self.token:
            return True
        sent = self.headers.get("Authorization", "")
        if hmac.compare_digest(sent.encode(), f"Bearer {self.token}".encode()):
            return True
        self.close_connection = True
        self._json(401, {"error": "missing or wrong bearer token (ALIGN_REWARD_TOKEN)"})
        return False

    def _known_path(self) -> bool:
        if self.path.strip("/") == self.reward.name:
            return True
        self.close_connection = True
        self._json(404, {"error": f"this server serves /{self.reward.name}, not {self.path}"})
        return False

    def _json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        if not self.quiet:
            super().log_message(format, *args)

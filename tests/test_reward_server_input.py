"""The reward server refuses images that are not finite [0, 1] images (HTTP 400, one-line JSON
error, the reward never called) and closes connections that stay idle past its read timeout."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time

import pytest
import torch

from rewards import register_reward
from rewards.remote import decode_response, encode_request
from rewards.server import make_server


@register_reward("test_server_counting")
class _Counting:
    """Scores the mean pixel; counts its calls, so a refused request provably never reached it."""

    name, device, batch_size, calls = "test_server_counting", "cpu", None, 0

    def __call__(self, images, prompts, metadata):
        type(self).calls += 1
        return images.mean(dim=(1, 2, 3))


@contextlib.contextmanager
def serving(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[:2]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _post(addr, body: bytes):
    conn = http.client.HTTPConnection(*addr, timeout=30)
    try:
        conn.request("POST", "/test_server_counting", body=body, headers={"Content-Length": str(len(body))})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    "bad,what",
    [
        (float("nan"), "non-finite"),
        (float("inf"), "non-finite"),
        (-float("inf"), "non-finite"),
        (-0.25, "must lie in [0, 1]"),
        (1.5, "must lie in [0, 1]"),
    ],
)
def test_non_finite_or_out_of_range_images_get_400_and_are_never_scored(bad, what):
    images = torch.full((2, 3, 4, 4), 0.5)
    images[1, 2, 3, 1] = bad
    _Counting.calls = 0
    with serving(make_server(_Counting(), quiet=True)) as addr:
        status, body = _post(addr, encode_request(images, ["a", "b"]))
    assert status == 400
    text = body.decode()
    assert len(text.splitlines()) == 1 and what in json.loads(text)["error"]
    assert _Counting.calls == 0


def test_images_at_the_ends_of_the_unit_interval_are_scored():
    images = torch.zeros(2, 3, 4, 4)
    images[1] = 1.0
    _Counting.calls = 0
    with serving(make_server(_Counting(), quiet=True)) as addr:
        status, body = _post(addr, encode_request(images, ["a", "b"]))
    assert status == 200 and _Counting.calls == 1
    assert decode_response(body)[0].tolist() == [0.0, 1.0]


def _closed_by_peer(sock: socket.socket, bound_s: float, start: float) -> float:
    """Seconds from ``start`` until the server closes ``sock`` (recv returns b''); fails if it is
    still open after bound_s."""
    sock.settimeout(bound_s)
    try:
        data = sock.recv(1 << 16)
    except socket.timeout:
        pytest.fail(f"the server kept an idle connection open for {bound_s} s")
    # A 408-style error page may come first on some Python versions; what matters is the close.
    while data:
        data = sock.recv(1 << 16)
    return time.monotonic() - start


@pytest.mark.parametrize("partial", [b"", b"POST /test_server_counting HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc"])
def test_an_idle_or_stalled_connection_is_closed_after_the_read_timeout(partial):
    """Idle from the start, or stalled in the middle of the body: either way the server hangs up.
    The bound (30 s against a 0.5 s timeout) only guards against "never"; no speed is assumed."""
    with serving(make_server(_Counting(), quiet=True, read_timeout_s=0.5)) as addr:
        start = time.monotonic()  # before connecting: the server's wait cannot begin earlier
        with socket.create_connection(addr, timeout=30) as sock:
            sock.sendall(partial)
            waited = _closed_by_peer(sock, bound_s=30.0, start=start)
        assert waited >= 0.45  # not closed at once: it was the timeout, not a refusal
        status, _ = _post(addr, encode_request(torch.zeros(1, 3, 2, 2), ["a"]))
        assert status == 200  # the server still serves after dropping the idle client


def test_read_timeout_must_be_positive():
    with pytest.raises(ValueError, match="read_timeout_s must be > 0"):
        make_server(_Counting(), read_timeout_s=0)

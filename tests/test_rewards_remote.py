"""Remote rewards: a real HTTP server on 127.0.0.1 (free port) and the ``remote:`` client — equal
scores, tokens, request-size limits, plugin errors, bounded retries and timeouts."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from align.toy.world import render_batch, sample_scenes
from rewards import RewardError, get_reward, register_reward, score
from rewards.remote import TOKEN_ENV, encode_response
from rewards.server import make_server


@register_reward("test_remote_nan")
class _NanReward:
    name, device, batch_size = "test_remote_nan", "cpu", None

    def __call__(self, images, prompts, metadata):
        return torch.full((len(prompts),), float("nan"))


@contextlib.contextmanager
def serving(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _batch(n: int = 4):
    scenes = sample_scenes(n, np.random.default_rng(3))
    return render_batch(scenes, seed=3), [s.prompt for s in scenes]


def test_remote_scores_and_metadata_equal_local_scoring() -> None:
    images, prompts = _batch()
    local, local_meta = score([get_reward("toy_geneval")], images, prompts)
    with serving(make_server(get_reward("toy_geneval", batch_size=3), quiet=True)) as url:
        client = get_reward(f"remote:{url}/toy_geneval")
        assert client.server_info["batch_size"] == 3
        remote, meta = score([client], images, prompts)
    torch.testing.assert_close(remote, local, rtol=0, atol=0)
    for key, value in local_meta["toy_geneval"].items():
        torch.testing.assert_close(meta["toy_geneval"][key], value, rtol=0, atol=0)


def test_uint8_wire_is_exact_for_a_reward_that_quantises_itself() -> None:
    images, prompts = _batch()
    local, _ = score([get_reward("jpeg_incompressibility")], images, prompts)
    with serving(make_server(get_reward("jpeg_incompressibility"), quiet=True)) as url:
        remote, _ = score([get_reward(f"remote:{url}/jpeg_incompressibility", wire_dtype="uint8")], images, prompts)
    torch.testing.assert_close(remote, local, rtol=0, atol=0)


def test_token_is_required_off_loopback_and_checked_when_set(monkeypatch) -> None:
    with pytest.raises(ValueError, match="binding 0.0.0.0 \\(not loopback\\) needs a token; set ALIGN_REWARD_TOKEN"):
        make_server(get_reward("toy_geneval"), host="0.0.0.0")
    with serving(make_server(get_reward("toy_geneval"), token="s3cret", quiet=True)) as url:
        monkeypatch.delenv(TOKEN_ENV, raising=False)
        with pytest.raises(RewardError, match="server answered 401: missing or wrong bearer token"):
            get_reward(f"remote:{url}/toy_geneval")
        monkeypatch.setenv(TOKEN_ENV, "wrong")
        with pytest.raises(RewardError, match="401"):
            get_reward(f"remote:{url}/toy_geneval")
        monkeypatch.setenv(TOKEN_ENV, "s3cret")
        images, prompts = _batch(2)
        assert score([get_reward(f"remote:{url}/toy_geneval")], images, prompts)[0].shape == (2, 1)


def test_request_size_is_limited_before_the_body_is_read() -> None:
    images, prompts = _batch(4)
    with serving(make_server(get_reward("toy_geneval"), max_request_bytes=4096, quiet=True)) as url:
        client = get_reward(f"remote:{url}/toy_geneval")
        with pytest.raises(RewardError, match="a batch of 4 is \\d+ bytes, over the server's limit of 4096"):
            score([client], images, prompts)
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        conn.putrequest("POST", "/toy_geneval")
        conn.putheader("Content-Length", str(10**9))  # announced, never sent
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413 and "exceeds the limit of 4096 bytes" in json.loads(resp.read())["error"]
        conn.close()


def test_a_bad_plugin_on_the_server_is_named_in_the_client_error() -> None:
    with serving(make_server(get_reward("test_remote_nan"), quiet=True)) as url:
        client = get_reward(f"remote:{url}/test_remote_nan")
        with pytest.raises(
            RewardError,
            match=f"reward 'remote:{re.escape(url)}/test_remote_nan' on a batch of 2: "
            "server answered 422: reward 'test_remote_nan' returned non-finite",
        ):
            score([client], torch.zeros(2, 3, 8, 8), ["a", "b"])
        with pytest.raises(RewardError, match="server answered 404: this server serves /test_remote_nan"):
            get_reward(f"remote:{url}/other")


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 to the first ``failures`` POSTs, and sleeps ``delay`` seconds before each answer."""

    failures, delay, posts = 0, 0.0, 0

    def do_GET(self):  # noqa: N802
        self._send(200, json.dumps({"name": "flaky", "batch_size": None}).encode())

    def do_POST(self):  # noqa: N802
        type(self).posts += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(self.delay)
        if type(self).posts <= self.failures:
            return self._send(503, b'{"error": "warming up"}')
        self._send(200, encode_response(torch.arange(2, dtype=torch.float32), {}))

    def _send(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _flaky_server(failures: int, delay: float) -> ThreadingHTTPServer:
    handler = type("Flaky", (_Flaky,), {"failures": failures, "delay": delay, "posts": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    return server


def test_client_retries_transient_failures_a_bounded_number_of_times() -> None:
    server = _flaky_server(failures=2, delay=0.0)
    with serving(server) as url:
        client = get_reward(f"remote:{url}/flaky", retries=2, backoff_s=0.01)
        assert score([client], torch.zeros(2, 3, 4, 4), ["a", "b"])[0][:, 0].tolist() == [0.0, 1.0]
        assert server.RequestHandlerClass.posts == 3
    server = _flaky_server(failures=5, delay=0.0)
    with serving(server) as url:
        client = get_reward(f"remote:{url}/flaky", retries=1, backoff_s=0.01)
        with pytest.raises(RewardError, match="no answer after 2 attempts .*HTTP 503: warming up"):
            score([client], torch.zeros(2, 3, 4, 4), ["a", "b"])
        assert server.RequestHandlerClass.posts == 2


def test_client_times_out_retries_the_post_and_names_the_timeout() -> None:
    server = _flaky_server(failures=0, delay=2.0)
    with serving(server) as url:
        client = get_reward(f"remote:{url}/flaky", retries=1, backoff_s=0.01, timeout_s=0.3)
        with pytest.raises(RewardError, match="on a batch of 2: no answer after 2 attempts \\(timeout 0.3 s\\)"):
            score([client], torch.zeros(2, 3, 4, 4), ["a", "b"])
        assert server.RequestHandlerClass.posts == 2  # the timed-out POST was sent again, once


def test_unreachable_server_fails_when_the_reward_is_built() -> None:
    with serving(_flaky_server(0, 0.0)) as url:
        pass  # the port is free again: nothing listens there
    with pytest.raises(RewardError, match="on info: no answer after 1 attempts"):
        get_reward(f"remote:{url}/flaky", retries=0)


def test_align_rewards_serve_command_serves_a_reward_until_terminated() -> None:
    exe = os.path.join(os.path.dirname(sys.executable), "align")
    proc = subprocess.Popen(
        [exe, "rewards", "serve", "jpeg_compressibility", "--port", "0", "--arg", "quality=80"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        url = re.search(r"at (http://\S+)", line).group(1)
        images, prompts = _batch(3)
        remote, _ = score([get_reward(f"remote:{url}")], images, prompts)
        local, _ = score([get_reward("jpeg_compressibility", quality=80)], images, prompts)
        torch.testing.assert_close(remote, local, rtol=0, atol=0)
    finally:
        proc.terminate()
        proc.wait(10)

"""Remote reward overhead: the same reward scored in-process and through ``align rewards serve``.

One process: the server runs in a thread on 127.0.0.1 (free port), so the difference is the
wire (safetensors encode/decode, HTTP on loopback), not the network. After a warm-up that checks
the remote scores equal the local ones, the calls alternate (local, remote float32, remote uint8,
…); the table gives the median seconds per batch of each, the ratio remote/local and the request
size of each wire dtype.

    python benchmarks/reward_remote_overhead.py [--reward jpeg_compressibility] [--sizes 64 256 512]
    python benchmarks/reward_remote_overhead.py --reward hpsv2 --arg checkpoint=/w/HPS_v2.1_compressed.pt
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch
import yaml

from rewards import get_reward
from rewards.remote import encode_request
from rewards.scoring import score_one
from rewards.server import make_server

WIRES = ("float32", "uint8")


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reward", default="jpeg_compressibility")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE", help="reward keyword argument")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kwargs = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args.arg)}
    local = get_reward(args.reward, **kwargs)
    server = make_server(get_reward(args.reward, **kwargs), max_request_bytes=1 << 30, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    rewards = {
        "local": local,
        **{w: get_reward(f"remote:http://{host}:{port}/{local.name}", wire_dtype=w) for w in WIRES},
    }
    print(f"reward {args.reward}, batch {args.batch}, median of {args.repeats}, torch threads {args.threads}")
    print(
        f"{'size':>5} {'local s':>8} | {'f32 MB':>7} {'f32 s':>7} {'f32/local':>9} | {'u8 MB':>6} {'u8 s':>7} "
        f"{'u8/local':>8}"
    )
    try:
        for size in args.sizes:
            images = torch.rand(args.batch, 3, size, size, generator=torch.Generator().manual_seed(size))
            prompts = [f"prompt {i}" for i in range(args.batch)]
            reference = score_one(local, images, prompts, {})
            for key, reward in rewards.items():  # warm-up; remote scores must equal local ones
                assert torch.equal(score_one(reward, images, prompts, {}), reference), key
            times: dict[str, list[float]] = {k: [] for k in rewards}
            for _ in range(args.repeats):
                for key, reward in rewards.items():
                    times[key].append(_time(lambda: score_one(reward, images, prompts, {})))
            t = {k: statistics.median(v) for k, v in times.items()}
            mb = {w: len(encode_request(images, prompts, w)) / 1e6 for w in WIRES}
            print(
                f"{size:>5} {t['local']:>8.4f} | {mb['float32']:>7.2f} {t['float32']:>7.4f} "
                f"{t['float32'] / t['local']:>9.2f} | {mb['uint8']:>6.2f} {t['uint8']:>7.4f} "
                f"{t['uint8'] / t['local']:>8.2f}"
            )
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()

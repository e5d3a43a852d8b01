"""GenEval reward throughput: images/s of each stage, by batch size.

Columns: the rule engine alone (synthetic detections, 3 objects per image, no colour); the toy judge
(toy detector + rules, toy renders); and the ``geneval`` reward (Mask2Former + CLIP colours + rules)
on GenEval prompts, once on prompts without a colour clause (detector only) and once on colour
prompts (detector + CLIP on every matched object). Models are randomly initialised from configs
(``rewards.geneval.tiny``) and loaded through the reward's real path: ``--models tiny`` (CPU, seconds)
or ``--models full`` (Mask2Former Swin-S + ViT-L-14, the real sizes: the GPU check). The tiny
detector's class head always says "dog", so every image has detections and the colour path runs.

    python benchmarks/geneval_reward.py                                  # tiny, CPU, 64 px
    python benchmarks/geneval_reward.py --models full --device cuda --size 512 --batches 1 8 16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rewards import get_reward, score
from rewards.geneval.data import object_names
from rewards.geneval.rules import Detection, evaluate
from rewards.geneval.tiny import save_mask2former, save_open_clip


def _rate(fn, n_images: int, repeats: int) -> float:
    """Images per second: ``n_images`` over the median wall time of ``repeats`` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n_images / statistics.median(times)


def _records(tag: str, color: bool, n: int) -> list[dict]:
    clause = {"class": "dog", "count": 1, **({"color": "red"} if color else {})}
    return [{"tag": tag, "prompt": f"a photo of a {'red ' if color else ''}dog", "include": [clause]}] * n


def measure(
    models: str = "tiny", device: str = "cpu", size: int = 64, batches=(1, 4, 16), repeats: int = 5
) -> list[dict]:
    """images/s per batch size: ``rules``, ``toy``, ``geneval_plain`` (no colour clause), ``geneval_color``.
    benchmarks/gpu_check.py can add the real sizes as ``measure("full", "cuda", 512, (1, 8, 16))``."""
    import numpy as np

    from align.toy.detector import score_images
    from align.toy.render import render_batch
    from align.toy.world import sample_scenes

    root = Path(tempfile.mkdtemp(prefix="geneval_bench_"))
    save_mask2former(root / "m2f", models, favour=object_names().index("dog"), image_size=size)
    save_open_clip(root / "clip", models)
    reward = get_reward("geneval", detector_path=str(root / "m2f"), clip_path=str(root / "clip"), device=device)
    dets = [Detection("dog", (10.0 * k, 0.0, 10.0 * k + 8, 8.0), 0.95) for k in range(3)]
    rows = []
    for b in batches:
        images = torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(b))
        plain, colored = _records("single_object", False, b), _records("colors", True, b)
        scenes = sample_scenes(b, np.random.default_rng(b))
        toy_images, toy_prompts = render_batch(scenes, seed=b), [s.prompt for s in scenes]
        reward.batch_size = b
        rows.append(
            {
                "batch": b,
                "rules": _rate(lambda: [evaluate(r, dets) for r in plain], b, repeats),
                "toy": _rate(lambda: score_images(toy_images, toy_prompts), b, repeats),
                "geneval_plain": _rate(
                    lambda: score([reward], images, [r["prompt"] for r in plain], prompt_metadata=plain), b, repeats
                ),
                "geneval_color": _rate(
                    lambda: score([reward], images, [r["prompt"] for r in colored], prompt_metadata=colored), b, repeats
                ),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = measure(args.models, args.device, args.size, args.batches, args.repeats)
    print(
        f"geneval reward throughput, models {args.models}, {args.device}, {args.size} px, torch threads "
        f"{args.threads}, median of {args.repeats} (images/s)"
    )
    print(
        f"{'batch':>5} | {'rules only':>10} | {'toy judge':>9} | {'geneval, no colour':>18} | {'geneval, colour':>15}"
    )
    for r in rows:
        print(
            f"{r['batch']:>5} | {r['rules']:>10.0f} | {r['toy']:>9.1f} | {r['geneval_plain']:>18.1f} | "
            f"{r['geneval_color']:>15.1f}"
        )


if __name__ == "__main__":
    main()

"""`align eval` arguments and handler (align/cli.py registers them; the work is in align/eval.py)."""

from __future__ import annotations

import argparse

#: `align eval` flags → EvalConfig keys (the rest via dotted overrides, e.g. sampler.num_inference_steps=40)
FLAGS = {
    "prompts": "prompts",
    "policy_lora": "policy_lora",
    "critic": "steering.critic",
    "steer": "steering.steer",
    "scale": "steering.scale",
    "candidates": "steering.candidates",
    "images_per_prompt": "images_per_prompt",
    "max_prompts": "max_prompts",
    "judge": "judge",
    "out": "out_dir",
    "seed": "seed",
    "height": "sampler.height",
    "width": "sampler.width",
}


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="YAML config (optional); keys not in it keep their defaults")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides: key.sub=value")
    p.add_argument("--show-config", action="store_true", help="print every config key, default and help")
    p.add_argument("--prompts", help="toy | geneval | FILE.jsonl (GenEval records)")
    p.add_argument("--policy-lora", metavar="DIR", help="exported policy LoRA directory")
    p.add_argument("--critic", metavar="DIR", help="exported critic directory (with --steer)")
    p.add_argument("--steer", help="steering mode (= steering.steer; the registered modes: --show-config)")
    p.add_argument("--scale", help="grad steering scale")
    p.add_argument("--candidates", help="rerank: candidates per step")
    p.add_argument("--images-per-prompt", help="images per prompt (default 4)")
    p.add_argument("--max-prompts", help="this many prompts, round-robin over tags (default: all)")
    p.add_argument("--judge", help="toy | geneval (default: toy for toy prompts, else geneval)")
    p.add_argument("--out", metavar="DIR", help="output directory (= out_dir)")
    p.add_argument("--seed", help="seed of the per-(prompt, image) noise")
    p.add_argument("--height", help="image height in pixels (= sampler.height; default: the model's)")
    p.add_argument("--width", help="image width in pixels (= sampler.width; default: the model's)")


def run(ns: argparse.Namespace) -> int:
    from align.cli import _show, _split_config
    from align.config import load_config
    from align.eval import EvalConfig, run_eval

    if ns.show_config:
        return _show(EvalConfig)
    path, overrides = _split_config(ns)
    overrides += [f"{key}={getattr(ns, flag)}" for flag, key in FLAGS.items() if getattr(ns, flag) is not None]
    cfg = load_config(EvalConfig, path, overrides)
    run_eval(cfg)
    return 0

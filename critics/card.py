"""The ``README.md`` model card of an exported critic, written from its ``config.json``."""

from __future__ import annotations

import json

_METRIC_KEYS = ("iterations", "explained_variance", "value_loss", "reward/weighted", "samples_seen", "phase")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(config: dict) -> str:
    """Markdown with YAML front matter: base model, rewards and weights, final metrics, how to load."""
    base, rewards, metrics = config["base_model"], config["rewards"], config.get("metrics", {})
    lines = [
        "---",
        "library_name: diffusion-align",
        f"base_model: {json.dumps(base['id'])}",
        "tags: [diffusion, reinforcement-learning, value-model, ecg]",
        "---",
        "",
        f"# Latent critic for `{base['id']}`",
        "",
        "A state-aligned value model V_k(x_t, t, c) trained with ECG (diffusion-align): backbone features at "
        f"`{config['feature_layer']}` under its own LoRA adapter (rank {config['adapter']['rank']}, adapter "
        f"source `{config['adapter']['source']}`), one MLP head per reward. Values are normalised returns "
        "(see `rewards[].norm` in config.json).",
        "",
        f"Base: {base['pipeline_class']} / {base['denoiser_class']} ({base['dtype']}), fingerprint "
        f"`{base['fingerprint']}`. Loading onto other weights is refused unless forced.",
        "",
        "## Rewards it was trained on",
        "",
        "| reward | weight | running mean | running std |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['name']} | {_fmt(r['weight'])} | {_fmt(r['norm']['mean'])} | {_fmt(r['norm']['std'])} |" for r in rewards
    ]
    lines += ["", "## Final metrics (last training iteration)", ""]
    shown = {k: v for k, v in metrics.items() if k in _METRIC_KEYS or k.startswith("reward/")}
    if shown:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in sorted(shown.items())]
    else:
        lines.append("none recorded")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import critics",
        "critic = critics.load(DIR, pipe)  # pipe: the same base",
        "```",
        "",
        "```bash",
        "align sample --critic DIR --steer grad --scale 1.0",
        "```",
        "",
    ]
    return "\n".join(lines)

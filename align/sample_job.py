"""`align sample`: draw images with the log-prob sampler and write PNGs, a grid and a JSON record.

Prompts that belong to the toy world are also scored by toy-GenEval (toy detector + GenEval rule
engine: strict and partial score), and the mean is printed; that makes the default invocation (shipped toy
model, fixed toy prompts) a quick end-to-end check of the whole generation stack.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar, Optional

import torch
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from align.backbones.model_config import load_model
from align.checkpoint import write_json
from align.config import ConfigError, field
from align.model_source import ModelConfig
from align.modifiers.protocol import build_modifiers
from align.sampling import SamplerConfig, resolve_resolution
from critics.steering import SteeringConfig, sample_steered


@dataclasses.dataclass
class SampleJobConfig:
    """Config of `align sample`."""

    #: short top-level keys (``modifiers=[...]``) and their dotted home (align.config.load_config)
    ALIASES: ClassVar[dict[str, str]] = {"modifiers": "sampler.modifiers"}
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    prompts: list = field(default_factory=list, help="prompts; empty = fixed toy evaluation prompts")
    num_images: int = field(16, help="images when prompts is empty (toy prompts drawn with eval_seed)")
    repeats: int = field(1, help="images per prompt")
    batch_size: int = field(8, help="images per sampler call")
    seed: int = field(0, help="seed of the sampling noise")
    eval_seed: int = field(1234, help="seed that picks the toy evaluation prompts")
    out_dir: str = field("runs/sample", help="where PNGs, grid.png and samples.json go")
    progress: bool = field(True, help="show a progress bar")
    policy_lora: str = field("", path="dir", help="exported policy LoRA dir (`align export` → OUT/policy); empty: base")
    steering: SteeringConfig = field(default_factory=SteeringConfig)

    def validate(self) -> None:
        for name in ("num_images", "repeats", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.sampler.output_type != "pt":
            raise ValueError(
                f"sampler.output_type must be 'pt' for align sample (it writes PNGs), got {self.sampler.output_type!r}"
            )
        bad = [p for p in self.prompts if not isinstance(p, str) or not p.strip()]
        if bad:
            raise ValueError(f"prompts must be non-empty strings, got {bad[0]!r}")


def job_prompts(cfg: SampleJobConfig) -> list[str]:
    from align.toy.evaluate import eval_prompts

    base = list(cfg.prompts) if cfg.prompts else eval_prompts(cfg.num_images, cfg.eval_seed)
    return [p for p in base for _ in range(cfg.repeats)]


def toy_scores(images: torch.Tensor, prompts: list[str]) -> list[Optional[dict[str, float]]]:
    """toy-GenEval (``strict`` 0/1 and partial-credit ``score``) for prompts of the toy grammar,
    ``None`` for any other prompt."""
    from align.toy.detector import score_image
    from align.toy.world import parse_prompt

    out: list[Optional[dict[str, float]]] = []
    for img, prompt in zip(images, prompts):
        try:
            record = parse_prompt(prompt)
        except ValueError:
            out.append(None)
            continue
        verdict = score_image(img, prompt, record)
        out.append({"strict": verdict.strict, "score": verdict.score})
    return out


def run_sample_job(cfg: SampleJobConfig) -> dict:
    """Sample, save, score; returns the JSON record that is also written to ``samples.json``."""
    prompts = job_prompts(cfg)
    out = Path(cfg.out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    pipe = load_model(cfg.model)
    resolve_resolution(pipe, cfg.sampler.height, cfg.sampler.width)  # before any sampling
    critic, reward_fns = _steering_parts(pipe, cfg)
    modifiers = build_modifiers(cfg.sampler.modifiers)  # one stack for every batch (steering is appended to it)
    gen = torch.Generator().manual_seed(cfg.seed)
    candidate_gen = torch.Generator().manual_seed(cfg.seed + 1)  # steering's own noise (rerank candidates)
    records, all_images = [], []
    sampler_cfg = dataclasses.replace(cfg.sampler, progress=False)  # one bar over batches instead
    batches = range(0, len(prompts), cfg.batch_size)
    for start in tqdm(batches, desc="sample", unit="batch", disable=not cfg.progress):
        chunk = prompts[start : start + cfg.batch_size]
        batch = sample_steered(pipe, chunk, sampler_cfg, gen, critic, cfg.steering, candidate_gen, modifiers=modifiers)
        traj = batch.traj
        images = traj.images.float().clamp(0, 1).cpu()
        extra = _critic_records(critic, reward_fns, batch, images, chunk)
        for j, (img, score) in enumerate(zip(images, toy_scores(images, chunk))):
            idx = start + j
            save_image(img, out / "images" / f"{idx:04d}.png")
            records.append(
                {
                    "index": idx,
                    "prompt": chunk[j],
                    "file": f"images/{idx:04d}.png",
                    "log_prob_mean": float(traj.log_probs[j].mean()),
                    "toy_checker": score,
                    **extra[j],
                }
            )
        all_images.append(images)
    grid = make_grid(torch.cat(all_images), nrow=min(8, len(prompts)), padding=2, pad_value=0.5)
    save_image(grid, out / "grid.png")
    summary = _summarise([r["toy_checker"] for r in records])
    result = {"config": dataclasses.asdict(cfg), "summary": summary, "samples": records}
    if critic is not None:
        result["steering"] = {
            "steer": cfg.steering.steer,
            **_summarise([r["rewards"] for r in records if r.get("rewards")], prefix="reward/"),
            "critic_rows_per_image": sum(r["critic_rows"] for r in records) / len(records),
        }
    write_json(out / "samples.json", result)
    print(f"wrote {len(records)} images, grid.png and samples.json to {out}")
    if summary:
        print(
            "toy checker accuracy (toy-GenEval strict, partial score): "
            + json.dumps({k: round(v, 3) for k, v in summary.items()})
        )
    if "steering" in result:
        print(
            "steering: "
            + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result["steering"].items()})
        )
    return result


def _summarise(scores: list[Optional[dict[str, float]]], prefix: str = "") -> dict[str, float]:
    scored = [s for s in scores if s is not None]
    if not scored:
        return {}
    return {prefix + k: sum(s[k] for s in scored) / len(scored) for k in scored[0]}


def _steering_parts(pipe, cfg: SampleJobConfig):
    """Policy LoRA (diffusers' own loader), the exported critic, and its reward plugins (for the JSON)."""
    if cfg.policy_lora:
        check_policy_lora(pipe, cfg.policy_lora)
        pipe.load_lora_weights(cfg.policy_lora, adapter_name="policy")
    if not cfg.steering.critic:
        return None, []
    import critics
    from rewards import get_reward

    critic = critics.load(cfg.steering.critic, pipe, force=cfg.steering.force)
    critic.weights_with(cfg.steering.weights)  # a bad override fails here, before sampling
    return critic, [get_reward(n) for n in critic.reward_names] if cfg.steering.score_rewards else []


LORA_FILE = "pytorch_lora_weights.safetensors"


def check_policy_lora(pipe, directory: str) -> None:
    """A one-line :class:`ConfigError` for a policy LoRA that is missing, truncated, or made for another
    base (checked from the file's header against the denoiser's layers, before diffusers would print
    a size mismatch per layer)."""
    from safetensors import safe_open

    from align.backbones.adapter import backbone

    path = Path(directory) / LORA_FILE
    if not path.is_file():
        raise ConfigError(f"policy_lora {directory}: no {LORA_FILE} (an `align export` OUT/policy directory)")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors' SafetensorError on a cut-off header or data
        raise ConfigError(
            f"policy_lora {directory}: {path} is truncated or corrupt ({str(err).splitlines()[0]})"
        ) from None
    family = backbone(pipe)
    net, prefix = family.net, family.denoiser_attr + "."
    modules = dict(net.named_modules())
    for key, shape in shapes.items():
        name, sep, rest = key[len(prefix) :].partition(".lora_")
        if not key.startswith(prefix) or not sep or len(shape) < 2:
            continue
        layer = modules.get(name)
        if layer is None:
            raise ConfigError(
                f"policy_lora {directory} was made for another base: this {type(net).__name__} has no layer {name!r}"
            )
        base = getattr(layer, "base_layer", layer)
        want = getattr(base, "in_features", None) if rest.startswith("A") else getattr(base, "out_features", None)
        got = shape[1] if rest.startswith("A") else shape[0]
        if want is not None and want != got:
            raise ConfigError(
                f"policy_lora {directory} was made for another base: {key} has {got} features, "
                f"this {type(net).__name__}'s {name} has {want}"
            )


def _critic_records(critic, reward_fns, batch, images: torch.Tensor, prompts: list[str]) -> list[dict]:
    """Per image: the critic's values V_k at the last state, the rewards they predict, the real rewards."""
    if critic is None:
        return [{} for _ in prompts]
    from rewards import score

    predicted = critic.predicted_rewards(batch.values)
    rewards = score(reward_fns, images, prompts)[0] if reward_fns else None
    names = critic.reward_names
    return [
        {
            "critic_values": dict(zip(names, batch.values[j].tolist())),
            "predicted_rewards": dict(zip(names, predicted[j].tolist())),
            "rewards": dict(zip(names, rewards[j].tolist())) if rewards is not None else None,
            "critic_rows": batch.critic_rows / len(prompts),
        }
        for j in range(len(prompts))
    ]

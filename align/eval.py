"""`align eval`: GenEval's protocol on a model (or the toy world), and training's paired evaluation.

For every prompt of the source (or ``max_prompts`` of them, spread over the tags) it draws
``images_per_prompt`` images, each from its own noise seeded by (seed, prompt index, image index), so
two evaluations (base vs trained, with vs without steering) see the same noise image by image and
their difference is a paired one. Images go to GenEval's layout (``OUT/<prompt:05d>/samples/<i:04d>.png``
with ``OUT/<prompt:05d>/metadata.jsonl``), verdicts to ``OUT/results.jsonl`` in GenEval's format
(filename, tag, prompt, correct, reason, metadata, details; plus our partial-credit ``score``), and the
summary of GenEval's ``summary_scores.py`` to ``OUT/summary.json`` and ``OUT/summary.txt``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from align.backbones.model_config import ModelConfig
from align.config import field
from align.sampling import SamplerConfig
from critics.steering import SteeringConfig

#: verdicts of a batch: (images (B,3,H,W) in [0,1], prompts, records) -> list[Verdict]
Judge = Callable[[torch.Tensor, list, list], list]
JUDGES = ("toy", "geneval")
EVAL_STEERING = ("none", "grad", "rerank")


@dataclasses.dataclass
class EvalConfig:
    """Config of `align eval` (flags: --prompts, --policy-lora, --critic, --steer, --images-per-prompt, --out)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    steering: SteeringConfig = field(default_factory=SteeringConfig)
    prompts: str = field("toy", help="'toy', 'geneval' (the shipped 553 prompts) or a JSONL file with GenEval records")
    judge: str = field("", help="'toy' (toy detector) or 'geneval' (detector + CLIP); empty: toy for toy prompts")
    geneval: dict = field(
        default_factory=dict, help="arguments of the geneval reward: detector_path, clip_path, device"
    )
    policy_lora: str = field("", path="dir", help="exported policy LoRA dir (`align export` → OUT/policy); empty: base")
    images_per_prompt: int = field(4, help="images per prompt (GenEval's protocol: 4)")
    max_prompts: int = field(0, help="evaluate this many prompts, round-robin over tags; 0: all")
    batch_size: int = field(8, help="images per sampler call")
    seed: int = field(0, help="seed of the per-(prompt, image) noise")
    out_dir: str = field("runs/eval", help="where images, results.jsonl and summary.{json,txt} go")
    progress: bool = field(True, help="show a progress bar")

    def validate(self) -> None:
        for name in ("images_per_prompt", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_prompts < 0:
            raise ValueError(f"max_prompts must be >= 0 (0: all), got {self.max_prompts}")
        if self.judge and self.judge not in JUDGES:
            raise ValueError(f"judge must be one of {', '.join(JUDGES)} (or empty), got {self.judge!r}")
        if self.steering.steer not in EVAL_STEERING:
            raise ValueError(f"align eval steers with {' | '.join(EVAL_STEERING)}, got {self.steering.steer!r}")
        if self.sampler.output_type != "pt":
            raise ValueError(f"sampler.output_type must be 'pt' for align eval, got {self.sampler.output_type!r}")
        from align.prompts import check_prompt_source

        check_prompt_source(self.prompts)


@dataclasses.dataclass(frozen=True)
class Item:
    """One image to draw: prompt ``p`` (its index in the source) and image index ``i``."""

    p: int
    i: int
    prompt: str
    record: dict


def eval_items(source: str, images_per_prompt: int, max_prompts: Optional[int] = None) -> list[Item]:
    """The (prompt, image) pairs of an evaluation, prompt-major; every prompt needs a metadata record."""
    from align.prompts import prompt_metadata, source_prompts, spread_over_tags

    prompts = source_prompts(source)
    records = prompt_metadata(source, prompts)
    missing = next((p for p, r in zip(prompts, records) if r is None), None)
    if missing is not None:
        raise ValueError(
            f"align eval: prompt source {source!r} has no metadata record for {missing!r}; "
            "use 'toy', 'geneval' or a JSONL file of GenEval records"
        )
    picked = spread_over_tags(prompts, records, max_prompts or None)
    return [Item(p, i, prompts[p], records[p]) for p in picked for i in range(images_per_prompt)]


def noise_generator(seed: int, item: Item, device: str = "cpu") -> torch.Generator:
    """The generator of one image's noise: seeded by (seed, prompt index, image index) only."""
    state = int(np.random.SeedSequence([seed, item.p, item.i]).generate_state(1)[0])
    return torch.Generator(device).manual_seed(state)


def make_judge(kind: str, geneval_args: Optional[dict] = None) -> Judge:
    """``toy``: the toy detector and the rule engine; ``geneval``: the geneval reward's scorer."""
    if kind == "toy":
        from align.toy.detector import score_images

        return lambda images, prompts, records: score_images(images, prompts, records)
    if kind == "geneval":
        from rewards.geneval.reward import GenEvalReward

        args = {k: v for k, v in (geneval_args or {}).items() if k not in ("batch_size", "timeout_s")}  # scoring's
        scorer = GenEvalReward(**args).scorer
        return lambda images, prompts, records: scorer.verdicts(images, records)
    raise ValueError(f"unknown judge {kind!r}; available: {', '.join(JUDGES)}")


def default_judge(source: str, judge: str = "") -> str:
    return judge or ("toy" if source == "toy" else "geneval")


def evaluate_items(
    pipe,
    items: Sequence[Item],
    judge: Judge,
    sampler: SamplerConfig,
    seed: int = 0,
    batch_size: int = 8,
    out_dir: Optional[Path] = None,
    critic=None,
    steering: Optional[SteeringConfig] = None,
    progress: bool = False,
) -> list[dict]:
    """Draw and judge every item; returns GenEval result rows (and writes the images if ``out_dir``).
    (No outer ``no_grad``: the sampler picks its own mode, and grad steering needs autograd.)"""
    from tqdm.auto import tqdm

    from align.modifiers.protocol import build_modifiers
    from critics.steering import sample_steered

    steering = steering or SteeringConfig()
    sampler = dataclasses.replace(sampler, progress=False)
    modifiers = build_modifiers(sampler.modifiers)  # one stack for every batch (steering is appended to it)
    device = str(getattr(pipe, "_execution_device", "cpu"))
    rows: list[dict] = []
    for start in tqdm(range(0, len(items), batch_size), desc="eval", unit="batch", disable=not progress):
        chunk = list(items[start : start + batch_size])
        prompts = [it.prompt for it in chunk]
        gens = [noise_generator(seed, it, device) for it in chunk]
        candidates = torch.Generator(device).manual_seed(seed * 1_000_003 + start + 1)  # rerank's own noise
        images = sample_steered(
            pipe, prompts, sampler, gens, critic, steering, candidates, modifiers=modifiers
        ).traj.images
        images = images.float().clamp(0, 1).cpu()
        verdicts = judge(images, prompts, [it.record for it in chunk])
        for it, image, verdict in zip(chunk, images, verdicts):
            rows.append(result_row(it, verdict))
            if out_dir is not None:
                _save(out_dir, it, image)
    return rows


def result_row(item: Item, verdict) -> dict:
    """GenEval's results.jsonl row (metadata and details as JSON strings, as its evaluate_images.py writes)."""
    return {
        "filename": f"{item.p:05d}/samples/{item.i:04d}.png",
        "tag": item.record["tag"],
        "prompt": item.prompt,
        "correct": bool(verdict.strict),
        "reason": verdict.reason,
        "metadata": json.dumps(item.record),
        "details": json.dumps(verdict.details.get("detected", {})),
        "score": float(verdict.score),
    }


def _save(out_dir: Path, item: Item, image: torch.Tensor) -> None:
    from torchvision.utils import save_image

    folder = out_dir / f"{item.p:05d}"
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    if item.i == 0:
        (folder / "metadata.jsonl").write_text(json.dumps(item.record) + "\n", encoding="utf-8")
    save_image(image, folder / "samples" / f"{item.i:04d}.png")


def summarize(rows: Sequence[dict]) -> dict:
    """GenEval's summary_scores.py: % correct images, % prompts with any correct image (prompts keyed
    by their metadata string), per tag (in order of first appearance) the fraction correct, and the
    overall score = mean over tags."""
    by_prompt: dict[str, bool] = {}
    by_tag: dict[str, list[bool]] = {}
    for r in rows:
        by_prompt[r["metadata"]] = by_prompt.get(r["metadata"], False) or bool(r["correct"])
        by_tag.setdefault(r["tag"], []).append(bool(r["correct"]))
    tasks = {t: {"score": float(np.mean(v)), "correct": int(sum(v)), "total": len(v)} for t, v in by_tag.items()}
    return {
        "total_images": len(rows),
        "total_prompts": len(by_prompt),
        "correct_images": float(np.mean([bool(r["correct"]) for r in rows])) if rows else float("nan"),
        "correct_prompts": float(np.mean(list(by_prompt.values()))) if rows else float("nan"),
        "tasks": tasks,
        "overall": float(np.mean([t["score"] for t in tasks.values()])) if tasks else float("nan"),
    }


def format_summary(summary: dict) -> str:
    """The text summary_scores.py prints."""
    lines = [
        "Summary",
        "=======",
        f"Total images: {summary['total_images']}",
        f"Total prompts: {summary['total_prompts']}",
        f"% correct images: {summary['correct_images']:.2%}",
        f"% correct prompts: {summary['correct_prompts']:.2%}",
        "",
        "Task breakdown",
        "==============",
    ]
    lines += [f"{tag:<16} = {t['score']:.2%} ({t['correct']} / {t['total']})" for tag, t in summary["tasks"].items()]
    return "\n".join(lines + ["", f"Overall score (avg. over tasks): {summary['overall']:.5f}"]) + "\n"


def write_results(out_dir: Path, rows: Sequence[dict]) -> dict:
    """``results.jsonl``, ``summary.json`` and ``summary.txt`` in ``out_dir``; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    summary = summarize(rows)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out_dir / "summary.txt").write_text(format_summary(summary), encoding="utf-8")
    return summary


def run_eval(cfg: EvalConfig) -> dict:
    """`align eval`: load the model (+ policy LoRA, + critic), evaluate, write; returns the summary."""
    from align.backbones.model_config import load_model
    from align.config import ConfigError
    from align.sample_job import SampleJobConfig, _steering_parts

    try:  # bad model paths or records fail here, in one line, before the model loads
        items = eval_items(cfg.prompts, cfg.images_per_prompt, cfg.max_prompts)
        judge = make_judge(default_judge(cfg.prompts, cfg.judge), cfg.geneval)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    pipe = load_model(cfg.model)
    from align.sampling import resolve_resolution

    resolve_resolution(pipe, cfg.sampler.height, cfg.sampler.width)  # before any sampling
    critic, _ = _steering_parts(
        pipe,
        SampleJobConfig(policy_lora=cfg.policy_lora, steering=dataclasses.replace(cfg.steering, score_rewards=False)),
    )
    out = Path(cfg.out_dir)
    rows = evaluate_items(
        pipe, items, judge, cfg.sampler, cfg.seed, cfg.batch_size, out, critic, cfg.steering, cfg.progress
    )
    summary = write_results(out, rows)
    print(format_summary(summary), end="")
    print(f"wrote {len(rows)} images, results.jsonl and summary.{{json,txt}} to {out}")
    return summary


def paired_evaluation(
    pipe,
    source: str,
    sampler: SamplerConfig,
    *,
    judge: Optional[Judge] = None,
    geneval_args: Optional[dict] = None,
    num_prompts: Optional[int] = None,
    images_per_prompt: int = 4,
    seed: int = 0,
    batch_size: int = 8,
    out_dir: Optional[str] = None,
    items: Optional[Sequence[Item]] = None,
) -> dict:
    """Base (every adapter disabled) vs trained (the pipe as given) on the same prompts and noise.

    ``items`` (e.g. :func:`balanced_items`), else ``eval_items(source, images_per_prompt, num_prompts)``.
    Returns ``{base, final, paired_gain, paired_se, per_tag: {tag: {base, final, images}}, ...}`` as
    :func:`paired_summary` computes them."""
    from align.backbones.lora import adapters_disabled

    items = list(items) if items is not None else eval_items(source, images_per_prompt, num_prompts)
    judge = judge or make_judge(default_judge(source), geneval_args)
    with adapters_disabled(pipe):
        base = evaluate_items(pipe, items, judge, sampler, seed, batch_size)
    final = evaluate_items(pipe, items, judge, sampler, seed, batch_size)
    if out_dir is not None:
        write_results(Path(out_dir) / "base", base)
        write_results(Path(out_dir) / "final", final)
    return paired_summary(items, base, final)


def balanced_items(source: str, num_images: int) -> list[Item]:
    """``num_images`` (prompt, noise) pairs spread evenly over the source's tags (GenEval weighs tags
    equally, so each tag gets ⌊n/T⌋ or ⌈n/T⌉ images): round-robin over each tag's prompts in source
    order; a tag with fewer prompts than its share repeats them, each time with a new image index, i.e.
    new fixed noise (the toy world has 3 single-object scenes but 72 colour-attribute ones)."""
    from align.prompts import prompt_metadata, source_prompts

    prompts = source_prompts(source)
    records = prompt_metadata(source, prompts)
    if any(r is None for r in records):
        raise ValueError(f"balanced_items: prompt source {source!r} has prompts without a metadata record")
    by_tag: dict[str, list[int]] = {}
    for p, record in enumerate(records):
        by_tag.setdefault(record["tag"], []).append(p)
    items = []
    for k, pool in enumerate(by_tag.values()):
        share = num_images // len(by_tag) + (k < num_images % len(by_tag))
        picks = [(pool[j % len(pool)], j // len(pool)) for j in range(share)]
        items += [Item(p, i, prompts[p], records[p]) for p, i in picks]
    return sorted(items, key=lambda it: (it.p, it.i))


def paired_summary(items: Sequence[Item], base: Sequence[dict], final: Sequence[dict]) -> dict:
    """The paired statistics of :func:`paired_evaluation` from two row lists in ``items`` order.

    With d_j = correct_final − correct_base of image j (same prompt, same noise), the gain is
    Σ_t mean_{j∈t} d_j / T and paired_se = sqrt(Σ_t s_t² / n_t) / T, s_t² the sample variance of d over
    the n_t images of tag t. The prompts are fixed and only the noise is drawn, so the images are
    independent given the prompts; s_t² around the tag mean also holds the spread between prompts, so
    this over- rather than under-states the error. ``nan`` if a tag has fewer than two images."""
    sb, sf = summarize(base), summarize(final)
    diffs: dict[str, list[float]] = {}
    for rb, rf in zip(base, final, strict=True):
        diffs.setdefault(rb["tag"], []).append(float(rf["correct"]) - float(rb["correct"]))
    var = [np.var(d, ddof=1) / len(d) if len(d) > 1 else float("nan") for d in diffs.values()]
    return {
        "base": sb["overall"],
        "final": sf["overall"],
        "paired_gain": sf["overall"] - sb["overall"],
        "paired_se": float(np.sqrt(np.sum(var)) / len(var)) if var else float("nan"),
        "per_tag": {
            t: {"base": sb["tasks"][t]["score"], "final": sf["tasks"][t]["score"], "images": len(diffs[t])}
            for t in sb["tasks"]
        },
        "num_prompts": len({it.p for it in items}),
        "num_images": len(items),
    }

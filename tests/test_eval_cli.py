"""`align eval` (align/eval.py, align/eval_cli.py): GenEval's files and summary, fixed paired noise, and
training's paired evaluation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from align.cli import main
from align.eval import (
    Item,
    eval_items,
    evaluate_items,
    format_summary,
    make_judge,
    paired_evaluation,
    paired_summary,
    summarize,
)
from align.sampling import SamplerConfig

TINY = ["model.source=preset:tiny-unet", "sampler.num_inference_steps=2", "progress=false"]


def geneval_summary_text(path) -> str:
    """GenEval's summary_scores.py, re-done here with pandas from the results file."""
    df = pd.read_json(path, orient="records", lines=True)
    lines = [
        "Summary",
        "=======",
        f"Total images: {len(df)}",
        f"Total prompts: {len(df.groupby('metadata'))}",
        f"% correct images: {df['correct'].mean():.2%}",
        f"% correct prompts: {df.groupby('metadata')['correct'].any().mean():.2%}",
        "",
        "Task breakdown",
        "==============",
    ]
    scores = []
    for tag, task in df.groupby("tag", sort=False):
        scores.append(task["correct"].mean())
        lines.append(f"{tag:<16} = {task['correct'].mean():.2%} ({task['correct'].sum()} / {len(task)})")
    return "\n".join(lines + ["", f"Overall score (avg. over tasks): {np.mean(scores):.5f}"]) + "\n"


def test_align_eval_writes_geneval_files_whose_summary_matches_an_independent_one(tmp_path) -> None:
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--prompts",
                "toy",
                "--max-prompts",
                "12",
                "--images-per-prompt",
                "2",
                "--out",
                str(out),
                "model.source=toy",
                "sampler.num_inference_steps=8",
                "batch_size=10",
                "progress=false",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and set(rows[0]) >= {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
    assert sorted(r["tag"] for r in rows[::2]) == sorted(2 * list({r["tag"] for r in rows}))  # round-robin over 6 tags
    for r in rows:
        assert (out / r["filename"]).is_file() and json.loads(r["metadata"])["prompt"] == r["prompt"]
        assert json.loads((out / r["filename"].split("/")[0] / "metadata.jsonl").read_text()) == json.loads(
            r["metadata"]
        )
        assert isinstance(r["correct"], bool) and (r["reason"] == "") == r["correct"]
    assert (out / "summary.txt").read_text() == geneval_summary_text(out / "results.jsonl")
    df = pd.read_json(out / "results.jsonl", orient="records", lines=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["correct_images"] == pytest.approx(df["correct"].mean(), abs=1e-12)
    assert summary["overall"] == pytest.approx(np.mean([t["correct"].mean() for _, t in df.groupby("tag")]), abs=1e-12)


def test_summary_known_answers_equal_geneval_summary_scores(tmp_path) -> None:
    """Two tags; prompt A correct on 1 of 2 images, B on 0 of 2, C (other tag) on 2 of 2."""

    def row(tag, prompt, correct):
        return {
            "filename": "x.png",
            "tag": tag,
            "prompt": prompt,
            "correct": correct,
            "reason": "",
            "metadata": json.dumps({"tag": tag, "prompt": prompt}),
            "details": "{}",
        }

    rows = [
        row("counting", "A", True),
        row("counting", "A", False),
        row("counting", "B", False),
        row("counting", "B", False),
        row("colors", "C", True),
        row("colors", "C", True),
    ]
    s = summarize(rows)
    assert (s["total_images"], s["total_prompts"]) == (6, 3)
    assert s["correct_images"] == pytest.approx(3 / 6) and s["correct_prompts"] == pytest.approx(2 / 3)
    assert s["tasks"] == {
        "counting": {"score": 0.25, "correct": 1, "total": 4},
        "colors": {"score": 1.0, "correct": 2, "total": 2},
    }
    assert s["overall"] == pytest.approx((0.25 + 1.0) / 2)
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert format_summary(s) == geneval_summary_text(path)


def test_each_image_has_its_own_fixed_noise_whatever_the_batching(tmp_path, tiny_unet_pipe) -> None:
    items = eval_items("toy", 2, 3)
    judge = make_judge("toy")
    sampler = SamplerConfig(num_inference_steps=2, eta=1.0)
    a = evaluate_items(tiny_unet_pipe, items, judge, sampler, seed=7, batch_size=6, out_dir=tmp_path / "a")
    b = evaluate_items(tiny_unet_pipe, items[::-1], judge, sampler, seed=7, batch_size=1, out_dir=tmp_path / "b")
    assert [r["filename"] for r in a] == [r["filename"] for r in b][::-1]
    pixels = {d: [np.asarray(Image.open(tmp_path / d / r["filename"]), dtype=np.int16) for r in a] for d in "ab"}
    for x, y in zip(pixels["a"], pixels["b"]):
        assert np.abs(x - y).max() <= 1  # same noise; batched float sums may move a pixel by one PNG level
    first, second = (pixels["a"][0], pixels["a"][1])
    assert np.abs(first - second).max() > 1  # two images of one prompt: different noise


def test_paired_evaluation_of_an_untrained_lora_gains_exactly_nothing(tiny_unet_pipe) -> None:
    """peft initialises LoRA B to zero: the 'trained' policy is the base, and on paired noise every image
    (not only the mean) is the same, so the gain and its standard error are exactly 0."""
    from align.backbones.lora import attach_lora

    attach_lora(tiny_unet_pipe, "policy", rank=2, alpha=2)
    out = paired_evaluation(
        tiny_unet_pipe,
        "toy",
        SamplerConfig(num_inference_steps=2),
        num_prompts=12,
        images_per_prompt=2,
        seed=3,
        batch_size=8,
    )
    assert out["paired_gain"] == 0.0 and out["paired_se"] == 0.0 and out["base"] == out["final"]
    assert set(out["per_tag"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert (out["num_prompts"], out["num_images"]) == (12, 24)


def test_paired_summary_gain_and_standard_error_known_answer() -> None:
    """One tag, two prompts × two images: d per image (1, 1, 0, 0), the images the units."""
    rec = {"tag": "colors", "prompt": "p"}
    items = [Item(p, i, "p", rec) for p in (0, 1) for i in (0, 1)]

    def rows(correct):
        return [
            {"tag": "colors", "correct": c, "metadata": json.dumps({**rec, "p": it.p})} for it, c in zip(items, correct)
        ]

    out = paired_summary(items, rows([False, False, False, True]), rows([True, True, False, True]))
    # gain 0.5, se = sqrt(var([1, 1, 0, 0], ddof=1) / 4) = sqrt(1/3 / 4)
    assert out["base"] == 0.25 and out["final"] == 0.75 and out["paired_gain"] == 0.5
    assert out["paired_se"] == pytest.approx((1 / 12) ** 0.5)


def test_balanced_items_give_every_toy_tag_an_equal_share_with_new_noise_on_repeats() -> None:
    """256 images over the toy world's six tags (3 to 72 scenes each): 43 or 42 per tag; the 3
    single-object scenes repeat with new image indices (new noise), no (prompt, image) pair twice."""
    from align.eval import balanced_items

    items = balanced_items("toy", 256)
    per_tag: dict[str, int] = {}
    for it in items:
        per_tag[it.record["tag"]] = per_tag.get(it.record["tag"], 0) + 1
    assert sorted(per_tag.values()) == [42, 42, 43, 43, 43, 43]
    assert len({(it.p, it.i) for it in items}) == 256
    singles = [it for it in items if it.record["tag"] == "single_object"]
    assert len({it.p for it in singles}) == 3 and max(it.i for it in singles) == 14


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompts", "PLAIN"], "no metadata record"),
        (["--steer", "best_of_n", "--critic", "."], "align eval steers with none | grad | rerank"),
        (
            ["--prompts", "geneval", "geneval.detector_path=/nowhere/m2f", "geneval.clip_path=/nowhere/clip"],
            "reward_args.geneval.detector_path: nothing at '/nowhere/m2f'",
        ),
    ],
)
def test_bad_eval_input_is_a_one_line_error_before_any_sampling(tmp_path, capsys, args, message) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("a cat\n")
    args = [str(plain) if a == "PLAIN" else a for a in args]
    assert main(["eval", *args, "--out", str(tmp_path / "out"), *TINY]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_align_eval_on_geneval_prompts_with_the_geneval_judge(tmp_path) -> None:
    """The real judge path: tiny random Mask2Former (its class head always says "dog") + tiny CLIP."""
    from rewards.geneval.data import object_names
    from rewards.geneval.tiny import save_mask2former, save_open_clip

    save_mask2former(tmp_path / "m2f", favour=object_names().index("dog"))
    save_open_clip(tmp_path / "clip")
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--prompts",
                "geneval",
                "--max-prompts",
                "6",
                "--images-per-prompt",
                "1",
                "--out",
                str(out),
                f"geneval.detector_path={tmp_path / 'm2f'}",
                f"geneval.clip_path={tmp_path / 'clip'}",
                *TINY,
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and len({r["tag"] for r in rows}) == 6
    for r in rows:  # the detector only ever sees dogs, scored by mean mask probability: in (0.5, 1)
        found = json.loads(r["details"])
        assert set(found) <= {"dog"} and all(
            d[4] > (0.9 if r["tag"] == "counting" else 0.3) for d in found.get("dog", [])
        )
        if r["tag"] != "counting":
            assert found["dog"]
        expected = [
            f"expected {c['class']}>={c['count']}, found 0"
            for c in json.loads(r["metadata"])["include"]
            if c["class"] != "dog"
        ]
        assert r["reason"].split("\n")[: len(expected)] == expected and r["correct"] == (not expected)
    position = next(r for r in rows if r["tag"] == "position")
    assert position["prompt"] == "a photo of a dog right of a teddy bear"
    assert position["reason"].endswith("no target for dog to be right of") and position["score"] == 1 / 3
    assert (out / "summary.txt").read_text() == geneval_summary_text(out / "results.jsonl")


@pytest.fixture(scope="module")
def exported_unet(tmp_path_factory):
    """An exported tiny-unet run: a non-trivial policy LoRA and a critic (tests/test_export.py's helpers)."""
    from test_export import export, trained_like  # tests/ is on sys.path

    pipe, critic = trained_like("tiny-unet")
    return export(pipe, critic, tmp_path_factory.mktemp("run") / "export", "tiny-unet")


def _eval(tmp_path, name: str, *extra: str) -> tuple[list[dict], list[bytes]]:
    out = tmp_path / name
    assert (
        main(
            [
                "eval",
                "--prompts",
                "toy",
                "--max-prompts",
                "3",
                "--images-per-prompt",
                "2",
                "--out",
                str(out),
                *extra,
                *TINY,
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return rows, [(out / r["filename"]).read_bytes() for r in rows]


def test_policy_lora_and_critic_steering_evaluate_on_the_same_paired_images(tmp_path, exported_unet) -> None:
    base_rows, base = _eval(tmp_path, "base")
    lora_rows, lora = _eval(tmp_path, "lora", "--policy-lora", str(exported_unet / "policy"))
    assert [r["filename"] for r in lora_rows] == [r["filename"] for r in base_rows]
    assert lora != base  # same noise: only the policy LoRA changes the images
    critic = str(exported_unet / "critic")
    _, grad0 = _eval(tmp_path, "grad0", "--critic", critic, "--steer", "grad", "--scale", "0")
    assert grad0 == base  # grad steering with s = 0 is bit-identical to unsteered sampling
    rerank_rows, _ = _eval(tmp_path, "rerank", "--critic", critic, "--steer", "rerank", "--candidates", "2")
    assert len(rerank_rows) == 6

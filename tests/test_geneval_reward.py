"""The real `geneval` reward: tiny random Mask2Former and open_clip models built from configs, saved to a
temp dir and loaded through the reward's own loading path (rewards/geneval/{detector,colors,reward}.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rewards import PROMPT_METADATA, RewardError, get_reward, score
from rewards.geneval.colors import TEMPLATES, ClipColorClassifier, masked_crop
from rewards.geneval.data import object_names
from rewards.geneval.rules import GENEVAL_COLORS, Detection
from rewards.geneval.tiny import save_mask2former, save_open_clip

SIZE = 64
DOG = object_names().index("dog")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("geneval_models")
    save_mask2former(root / "mask2former", favour=DOG, image_size=SIZE)  # its class head always says "dog"
    save_open_clip(root / "clip")
    return {"detector_path": str(root / "mask2former"), "clip_path": str(root / "clip")}


@pytest.fixture(scope="module")
def reward(model_dirs):
    return get_reward("geneval", **model_dirs)


def _images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))


def _record(tag: str, include: list, prompt: str) -> dict:
    return {"tag": tag, "prompt": prompt, "include": include}


def test_reward_scores_a_batch_end_to_end_with_known_answers(reward) -> None:
    """The detector sees a dog in every image (its class head is fixed): the dog prompts hold, the cat
    prompt fails with GenEval's reason, in chunks of the reward's batch size."""
    records = [
        _record("single_object", [{"class": "dog", "count": 1}], "a photo of a dog"),
        _record("single_object", [{"class": "cat", "count": 1}], "a photo of a cat"),
        _record(
            "two_object", [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}], "a photo of a dog and a cat"
        ),
    ] * 2
    reward.batch_size = 4
    scores, meta = score([reward], _images(6), [r["prompt"] for r in records], prompt_metadata=records)
    assert scores[:, 0].tolist() == [1.0, 0.0, 0.5] * 2
    assert meta["geneval"]["strict"].tolist() == [1.0, 0.0, 0.0] * 2
    verdicts = reward.scorer.verdicts(_images(6)[:3], records[:3])
    assert verdicts[1].reason == "expected cat>=1, found 0"
    assert set(verdicts[0].details["detected"]) == {"dog"}
    assert all(d[4] > 0.3 for d in verdicts[0].details["detected"]["dog"])


def test_colour_clause_uses_the_clip_classifier_on_the_most_confident_dog(reward) -> None:
    """The reward's verdict on "a photo of a {c} dog" agrees with the classifier's own read of the top dog."""
    image = _images(1)
    top = max(reward.scorer.detector([image[0].permute(1, 2, 0).numpy()])[0], key=lambda d: d.score)
    arr = ((image[0].permute(1, 2, 0) * 255).round() / 255).numpy()
    read = reward.scorer.classify_colors(arr, [top], GENEVAL_COLORS)[0]
    for color in ("red", "blue", read):
        v = reward.scorer.verdicts(
            image, [_record("colors", [{"class": "dog", "count": 1, "color": color}], f"a photo of a {color} dog")]
        )[0]
        assert v.strict == float(color == read)


def test_records_come_from_the_geneval_source_when_the_batch_carries_none(reward) -> None:
    """What a remote server sees (prompts only): shipped GenEval prompts are looked up by their text."""
    prompts = ["a photo of a dog", "a photo of a cat"]
    assert score([reward], _images(2), prompts)[0][:, 0].tolist() == [1.0, 0.0]
    with pytest.raises(RewardError, match="'a dog on the moon' is not in the prompt source 'geneval'"):
        score([reward], _images(1), ["a dog on the moon"])


def test_a_bad_record_is_refused_naming_the_prompt_before_the_detector_runs(reward) -> None:
    calls = []
    detector = reward.scorer.detector
    reward.scorer.detector = lambda images: calls.append(len(images)) or detector(images)
    try:
        bad = _record("single_object", [{"class": "unicorn", "count": 1}], "a photo of a unicorn")
        good = _record("single_object", [{"class": "dog", "count": 1}], "a photo of a dog")
        with pytest.raises(RewardError, match="a photo of a unicorn.*unknown class 'unicorn'"):
            score([reward], _images(2), ["a photo of a dog", "a photo of a unicorn"], prompt_metadata=[good, bad])
        assert calls == []
    finally:
        reward.scorer.detector = detector


def test_clip_colour_classifier_matches_an_independent_zero_shot_computation(model_dirs) -> None:
    """Crop + grey #999 outside the mask, the three templates averaged per colour, argmax of cosine."""
    clf = ClipColorClassifier(model_dirs["clip_path"])
    rng = np.random.default_rng(0)
    image = rng.random((SIZE, SIZE, 3)).astype(np.float32)
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[10:30, 12:40] = rng.random((20, 28)) > 0.3
    dets = [Detection("dog", (12.0, 10.0, 40.0, 30.0), 0.9, mask=mask), Detection("dog", (0.0, 0.0, 64.0, 64.0), 0.8)]
    got = clf(image, dets, GENEVAL_COLORS)

    model, tok = clf.model, clf.tokenizer
    with torch.no_grad():
        text = [
            model.encode_text(tok([t.format(cls="dog").format(c) for t in TEMPLATES]), normalize=True)
            for c in GENEVAL_COLORS
        ]
        weights = torch.stack([e.mean(0) / e.mean(0).norm() for e in text], dim=1)
        expected = []
        for d in dets:
            crop = (image * 255).round().astype(np.uint8)
            if d.mask is not None:
                crop = np.where(d.mask[..., None], crop, np.uint8(0x99))
            x0, y0, x1, y1 = map(int, d.box)
            from PIL import Image

            pixels = clf.preprocess(Image.fromarray(crop[y0:y1, x0:x1]))[None]
            expected.append(GENEVAL_COLORS[int((model.encode_image(pixels, normalize=True) @ weights).argmax())])
    assert got == expected


def test_class_embeddings_are_built_once_per_class_name(model_dirs) -> None:
    clf = ClipColorClassifier(model_dirs["clip_path"])
    calls = []
    encode = clf.model.encode_text
    clf.model.encode_text = lambda *a, **k: calls.append(1) or encode(*a, **k)
    image = np.zeros((SIZE, SIZE, 3), dtype=np.float32)
    for label in ("dog", "dog", "cat", "dog"):
        clf(image, [Detection(label, (0.0, 0.0, 8.0, 8.0), 0.9)], GENEVAL_COLORS)
    assert len(calls) == 2 and set(k[0] for k in clf._classifiers) == {"dog", "cat"}


def test_masked_crop_puts_grey_999_outside_the_mask_and_crops_the_box() -> None:
    image = np.ones((8, 8, 3), dtype=np.float32)
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:4, 2:4] = True
    crop = np.asarray(masked_crop(image, Detection("dog", (1.0, 2.0, 5.0, 6.0), 0.9, mask=mask)))
    assert crop.shape == (4, 4, 3)
    assert (crop[0:2, 1:3] == 255).all() and (crop[2:, :] == 0x99).all() and (crop[:, 0] == 0x99).all()


@pytest.mark.parametrize("key", ["detector_path", "clip_path"])
def test_a_missing_model_path_is_a_one_line_error_saying_what_and_where(model_dirs, tmp_path, key) -> None:
    with pytest.raises(ValueError) as err:
        get_reward("geneval", **{**model_dirs, key: str(tmp_path / "absent")})
    text = str(err.value)
    assert f"reward_args.geneval.{key}" in text and str(tmp_path / "absent") in text and "\n" not in text
    with pytest.raises(ValueError, match=f"reward_args.geneval.{key} is not set"):
        get_reward("geneval", **{**model_dirs, key: None})


def test_serve_geneval_answers_like_the_local_reward(reward) -> None:
    """`align rewards serve geneval` is this reward behind rewards.server; the client gets the same scores."""
    import threading

    from rewards.remote import RemoteReward
    from rewards.server import make_server

    server = make_server(reward, port=0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        client = RemoteReward(f"remote:http://{host}:{port}/geneval")
        prompts = ["a photo of a dog", "a photo of a cat", "a photo of a dog"]
        remote, meta = score([client], _images(3), prompts)
        assert remote[:, 0].tolist() == score([reward], _images(3), prompts)[0][:, 0].tolist() == [1.0, 0.0, 1.0]
        assert meta["geneval"]["strict"].tolist() == [1.0, 0.0, 1.0]
    finally:
        server.shutdown()
        server.server_close()


def test_geneval_is_registered_and_listed() -> None:
    from rewards.registry import available_rewards, describe_reward

    assert available_rewards()["geneval"] == "builtin" and describe_reward("geneval").startswith("GenEval")
    assert PROMPT_METADATA == "prompt_metadata"


def test_detector_input_size_can_be_overridden_and_masks_come_back_at_image_size(model_dirs) -> None:
    from rewards.geneval.detector import Mask2FormerDetector

    detector = Mask2FormerDetector(model_dirs["detector_path"], object_names(), shortest_edge=96)
    seen = []
    forward = detector.model.forward
    detector.model.forward = lambda **kw: seen.append(tuple(kw["pixel_values"].shape)) or forward(**kw)
    dets = detector([np.random.default_rng(0).random((SIZE, SIZE, 3))])[0]
    assert seen == [(1, 3, 96, 96)]
    assert dets and all(d.mask.shape == (SIZE, SIZE) and d.label == "dog" for d in dets)
    assert all(0 <= d.box[0] < d.box[2] <= SIZE and 0 <= d.box[1] < d.box[3] <= SIZE for d in dets)


def test_throughput_benchmark_runs_at_tiny_size() -> None:
    """benchmarks/geneval_reward.py's measure() (what the GPU check calls at the real sizes) runs on CPU."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "geneval_reward.py"
    spec = importlib.util.spec_from_file_location("geneval_reward_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (row,) = module.measure("tiny", "cpu", SIZE, (2,), repeats=1)
    assert row["batch"] == 2 and all(row[k] > 0 for k in ("rules", "toy", "geneval_plain", "geneval_color"))

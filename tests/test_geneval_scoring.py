"""Per-sample prompt metadata reaches rewards (rewards/scoring.py, the in-process and Ray reward groups)."""

from __future__ import annotations

import pytest
import torch

from rewards import PROMPT_METADATA, RewardError, score


class Recorder:
    """A reward that records the prompt records of each call and scores the record's index field."""

    def __init__(self, name: str = "recorder", batch_size=None) -> None:
        self.name, self.device, self.batch_size, self.seen = name, "cpu", batch_size, []

    def __call__(self, images, prompts, metadata):
        records = metadata[PROMPT_METADATA]
        self.seen.append([r["i"] for r in records])
        metadata[self.name] = torch.tensor([float(r["i"]) for r in records])
        return torch.tensor([float(r["i"]) for r in records])


def _batch(n: int):
    return torch.rand(n, 3, 8, 8), [f"p{i}" for i in range(n)], [{"i": i} for i in range(n)]


def test_each_chunk_sees_its_slice_of_the_records_and_per_sample_outputs_concatenate() -> None:
    images, prompts, records = _batch(5)
    whole, chunked = Recorder("whole"), Recorder("chunked", batch_size=2)
    scores, meta = score([whole, chunked], images, prompts, prompt_metadata=records)
    assert whole.seen == [[0, 1, 2, 3, 4]] and chunked.seen == [[0, 1], [2, 3], [4]]
    assert torch.equal(scores, torch.arange(5.0)[:, None].repeat(1, 2))
    assert meta[PROMPT_METADATA] == records and torch.equal(meta["chunked"], torch.arange(5.0))


@pytest.mark.parametrize("records", [[{"i": 0}] * 3, [{"i": 0}] * 5])
def test_a_batch_whose_size_differs_from_its_records_is_refused_before_scoring(records) -> None:
    images, prompts, _ = _batch(4)
    reward = Recorder()
    with pytest.raises(RewardError, match=f"4 images but {len(records)} records"):
        score([reward], images, prompts, prompt_metadata=records)
    with pytest.raises(RewardError, match=f"4 images but {len(records)} records"):
        score([reward], images, prompts, {PROMPT_METADATA: records})
    assert reward.seen == []


def test_local_reward_group_and_ray_reward_actor_body_carry_the_records(reward_registry) -> None:
    """The in-process group and the body of the Ray reward actor (a plain class) pass records on."""
    from align.rollout.groups import LocalRewards
    from align.rollout.ray_group import RewardActor

    images, prompts, records = _batch(3)
    assert torch.equal(
        LocalRewards([Recorder()]).score(images, prompts, prompt_metadata=records)[:, 0], torch.arange(3.0)
    )
    reward_registry.register_reward("test_prompt_record_index")(Recorder)
    actor = RewardActor([{"name": "test_prompt_record_index"}])
    assert torch.equal(actor.score(images, prompts, records)[:, 0], torch.arange(3.0))


def test_scores_never_alias_a_tensor_the_reward_stored_in_the_metadata() -> None:
    """A reward may return the tensor it put in its metadata; the remote wire (safetensors) refuses
    shared memory, so scoring hands back a copy."""
    from rewards.scoring import score_one

    class SameTensor(Recorder):
        def __call__(self, images, prompts, metadata):
            super().__call__(images, prompts, metadata)
            return metadata[self.name]  # the stored tensor itself

    images, prompts, records = _batch(3)
    meta = {PROMPT_METADATA: records}
    values = score_one(SameTensor(), images, prompts, meta)
    assert torch.equal(values, meta["recorder"]) and values.data_ptr() != meta["recorder"].data_ptr()

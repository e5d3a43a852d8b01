"""The plugin's own tests: known answers on flat images; usable through align's registry when installed."""

from __future__ import annotations

import pytest
import torch
from align_reward_brightness import Brightness


def test_flat_images_score_minus_their_distance_to_the_target() -> None:
    images = torch.stack([torch.full((3, 8, 8), v) for v in (0.0, 0.3, 1.0)])
    scores = Brightness(target=0.3)(images, ["a", "b", "c"], {})
    torch.testing.assert_close(scores, torch.tensor([-0.3, 0.0, -0.7]))


def test_target_outside_unit_interval_is_rejected() -> None:
    with pytest.raises(ValueError, match="target must be in \\[0, 1\\]"):
        Brightness(target=2.0)


def test_found_by_name_through_the_align_entry_point() -> None:
    rewards = pytest.importorskip("rewards")  # diffusion-align installed beside the plugin
    reward = rewards.get_reward("brightness", target=0.25, batch_size=2)
    scores, _ = rewards.score([reward], torch.full((3, 3, 4, 4), 0.5), ["a", "b", "c"])
    torch.testing.assert_close(scores[:, 0], torch.full((3,), -0.25))

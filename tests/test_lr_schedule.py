"""The policy's learning-rate schedule (``trainer.lr_schedule``, align/lr_schedule.py): diffusers' own schedules,
read per policy update, applied by the learner and continued exactly by a resume."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.optimization import get_scheduler

from align.config import ConfigError
from align.lr_schedule import SCHEDULES, lr_factor
from align.train import train


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("warmup", [0, 3])
def test_factor_follows_diffusers_scheduler_stepped_on_a_real_optimizer(schedule: str, warmup: int) -> None:
    total, base = 12, 0.5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    name = "constant_with_warmup" if schedule == "constant" and warmup else schedule
    kwargs = {} if name == "constant" else {"num_warmup_steps": warmup}
    if schedule != "constant":
        kwargs["num_training_steps"] = total
    sched = get_scheduler(name, opt, **kwargs)
    factor = lr_factor(schedule, warmup, total)
    for u in range(total):
        assert base * factor(u) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        opt.step()
        sched.step()


def test_cosine_is_half_a_cosine_over_the_iterations() -> None:
    f = lr_factor("cosine", 0, 60)
    for u in (0, 10, 30, 45):
        assert f(u) == pytest.approx(0.5 * (1 + math.cos(math.pi * u / 60)), rel=1e-12)


def test_learner_applies_the_schedule_and_a_resume_continues_it(tmp_path, tiny_train_cfg) -> None:
    common = ["algo=grpo", "trainer.iterations=3", "trainer.lr_schedule=linear", "trainer.lr=0.003"]
    state = train(tiny_train_cfg(f"run_dir={tmp_path / 'a'}", *common), log=lambda *_: None)
    assert [h["lr"] for h in state.history] == pytest.approx([0.003, 0.002, 0.001], rel=1e-9)
    split = tiny_train_cfg(f"run_dir={tmp_path / 'b'}", *common)
    train(split, stop_after=1, log=lambda *_: None)
    resumed = train(split, resume=True, log=lambda *_: None)
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in state.history]


def test_unknown_schedule_or_negative_warmup_is_a_config_error(tiny_train_cfg) -> None:
    with pytest.raises(ConfigError, match="trainer.lr_schedule"):
        tiny_train_cfg("trainer.lr_schedule=exponential")
    with pytest.raises(ConfigError, match="trainer.lr_warmup"):
        train(tiny_train_cfg("trainer.lr_warmup=-1"), log=lambda *_: None)

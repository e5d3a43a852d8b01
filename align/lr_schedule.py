"""The policy's learning-rate schedule over policy updates: diffusers' schedules (``get_scheduler``), read as a
factor of ``trainer.lr`` at policy version u (updates so far).

Stateless on purpose: the factor depends only on u, which the checkpoint already holds (``policy_updates``), so
a resumed run continues the schedule exactly, under DeepSpeed too (its engine's parameter groups get the rate set
per pass). With one update per iteration, ``cosine`` is lr·½(1 + cos(π u / N)) over N = ``trainer.iterations``
(after ``trainer.lr_warmup`` updates of linear warm-up): a constant rate keeps moving the policy by a noisy step
each update to the end, a decaying one lets it settle.
"""

from __future__ import annotations

from typing import Callable

import torch

#: ``trainer.lr_schedule`` choices: diffusers' names of the schedules that are a closed-form factor of the step
SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """u ↦ factor of the base rate at policy update u (0-based), from ``diffusers.optimization.get_scheduler``
    (``constant`` with a warm-up is its ``constant_with_warmup``)."""
    from diffusers.optimization import get_scheduler

    if schedule not in SCHEDULES:
        raise ValueError(f"trainer.lr_schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    name = "constant_with_warmup" if schedule == "constant" and warmup > 0 else schedule
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)  # only its lr_lambda is used
    kwargs = {} if name == "constant" else {"num_warmup_steps": warmup}
    if schedule != "constant":
        kwargs["num_training_steps"] = total
    (factor,) = get_scheduler(name, probe, **kwargs).lr_lambdas
    return lambda u: float(factor(u))

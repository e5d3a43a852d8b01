"""Log-prob samplers: DDIM with η>0 (ε/v-prediction) and the flow-matching SDE behind one transition
API, the sampling loop over diffusers pipelines, and the ``Trajectory`` record (docs/sampling.md).

:class:`SamplerConfig` is imported eagerly (it is torch-free, so job configs load and validate
before torch); everything else is imported on first access (PEP 562), from the same names as before.
"""

from __future__ import annotations

import importlib
from typing import Any

from align.sampling.config import SamplerConfig

#: public name -> submodule that defines it (imported on first access)
_LAZY = {
    **dict.fromkeys(["SamplerHooks", "StepContext", "cfg_combine"], "hooks"),
    **dict.fromkeys(
        [
            "TRAJECTORY_EMBEDS",
            "decode",
            "encode_prompts",
            "initial_latents",
            "predict",
            "recompute_log_probs",
            "sample_trajectory",
            "set_schedule",
        ],
        "sampler",
    ),
    **dict.fromkeys(["default_resolution", "resolve_resolution"], "resolution"),
    "Trajectory": "trajectory",
    **dict.fromkeys(
        [
            "LOGPROB_REDUCTIONS",
            "TRANSITIONS",
            "StepOutput",
            "Transition",
            "ddim_distribution",
            "ddim_step_with_logprob",
            "flow_sde_distribution",
            "flow_sde_step_with_logprob",
            "gaussian_log_prob",
            "step_log_prob",
            "take_step",
            "transition_for",
        ],
        "transitions",
    ),
}

__all__ = sorted(["SamplerConfig", *_LAZY])


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'align.sampling' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"align.sampling.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

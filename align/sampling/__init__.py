"""Log-prob samplers: DDIM with η>0 (ε/v-prediction) and the flow-matching SDE behind one transition
API, the sampling loop over diffusers pipelines, and the ``Trajectory`` record (docs/sampling.md)."""
from align.sampling.hooks import SamplerHooks, StepContext, cfg_combine
from align.sampling.sampler import (EMBED_KEYS, SamplerConfig, decode, encode_prompts, initial_latents, predict,
                                    recompute_log_probs, sample_trajectory, set_schedule)
from align.sampling.trajectory import Trajectory
from align.sampling.transitions import (LOGPROB_REDUCTIONS, TRANSITIONS, StepOutput, Transition, ddim_distribution,
                                        ddim_step_with_logprob, flow_sde_distribution, flow_sde_step_with_logprob,
                                        gaussian_log_prob, step_log_prob, take_step, transition_for)

__all__ = ["EMBED_KEYS", "LOGPROB_REDUCTIONS", "SamplerConfig", "SamplerHooks", "StepContext", "StepOutput",
           "TRANSITIONS", "Trajectory", "Transition", "cfg_combine", "ddim_distribution", "ddim_step_with_logprob",
           "decode", "encode_prompts", "flow_sde_distribution", "flow_sde_step_with_logprob", "gaussian_log_prob",
           "initial_latents", "predict", "recompute_log_probs", "sample_trajectory", "set_schedule", "step_log_prob",
           "take_step", "transition_for"]

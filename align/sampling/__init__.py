"""Log-prob samplers: DDIM with η>0 (ε/v-prediction) and the flow-matching SDE, one transition API."""
from align.sampling.sampler import (SamplerConfig, SamplerHooks, cfg_combine, decode, encode_prompts, predict,
                                    recompute_log_probs, sample_trajectory)
from align.sampling.trajectory import Trajectory
from align.sampling.transitions import (TRANSITIONS, StepOutput, ddim_distribution, ddim_step_with_logprob,
                                        flow_sde_distribution, flow_sde_step_with_logprob, gaussian_log_prob,
                                        take_step, transition_for)

__all__ = ["SamplerConfig", "SamplerHooks", "StepOutput", "TRANSITIONS", "Trajectory", "cfg_combine", "decode",
           "ddim_distribution", "ddim_step_with_logprob", "encode_prompts", "flow_sde_distribution",
           "flow_sde_step_with_logprob", "gaussian_log_prob", "predict", "recompute_log_probs",
           "sample_trajectory", "take_step", "transition_for"]

"""The smallest real ``align train`` runs, as override lists shared by every test that trains: conftest's
``tiny_train_cfg`` / ``tiny_train_overrides`` fixtures and the Ray and ``accelerate launch`` tests."""

from __future__ import annotations

#: the smallest real `align train` run: tiny UNet, 3 steps, 2 prompts × 2 samples in one minibatch of
#: 4, no evaluation, no value pretraining, in-process rollouts and rewards. A test adds what it is
#: about (a later override wins: "critic.pretrain_iterations=1", "ray.num_rollout_workers=2", ...).
TINY_TRAIN = (
    "model.source=preset:tiny-unet",
    "sampler.num_inference_steps=3",
    "trainer.prompts_per_iteration=2",
    "trainer.samples_per_prompt=2",
    "trainer.minibatch_size=4",
    "eval_every=0",
    "final_eval_prompts=0",
    "eval_prompts=2",
    "critic.pretrain_iterations=0",
    "critic.hidden=16",
    "ray.num_rollout_workers=0",
    "ray.num_reward_workers=0",
)

#: :data:`TINY_TRAIN` with the default Ray fleet (2 rollout actors, 1 reward actor) and chunks of 2 requests.
TINY_RAY = (*TINY_TRAIN, "ray.num_rollout_workers=2", "ray.num_reward_workers=1", "ray.chunk_size=2")

"""Config of `align train` (ECG, GRPO, DDPO on the same sampler, rewards and learner)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

from align.config import field
from align.config_lists import RewardSpec, parse_rewards, reward_args_of
from align.model_source import ModelConfig
from align.sampling.config import SamplerConfig


def algorithm_names() -> tuple[str, ...]:
    """The keys of align.algos.registry.ALGORITHMS, once every module of align/algos is imported (each
    registers its algorithm: adding one is one file). Imports torch: checked in config phase two."""
    import importlib
    import pkgutil

    import align.algos
    from align.algos.registry import ALGORITHMS

    for module in pkgutil.iter_modules(align.algos.__path__):
        importlib.import_module(f"align.algos.{module.name}")
    return tuple(sorted(ALGORITHMS))


@dataclasses.dataclass
class LoRAConfig:
    rank: int = field(8, help="LoRA rank of the policy adapter")
    alpha: float = field(8.0, help="LoRA alpha (scale = alpha / rank)")


@dataclasses.dataclass
class CriticConfig:
    """ECG's value model (critics/value_model.py; docs/algorithms.md, "ECG's phases and the sample budget")."""

    adapter: str = field(
        "separate",
        choices=["separate", "shared"],
        help="separate: own 'critic' LoRA on the frozen base; shared: the policy's adapter + heads",
    )
    rank: int = field(8, help="LoRA rank of the critic adapter")
    hidden: int = field(128, help="width of each reward head's MLP")
    feature_layer: Optional[str] = field(
        None,
        help="UNet (SD1.5, SDXL) module whose output the critic reads: mid_block (the "
        "ECG paper's), up_blocks.N; None: up_blocks.1 (critics/value_model.py says why); "
        "DiT: norm_out only",
    )
    lr: float = field(1e-3, help="critic learning rate (adapter and heads)")
    gae_lambda: float = field(0.95, help="λ of GAE along the chain (1 = Monte Carlo with value baseline)")
    advantage_norm: str = field(
        "step",
        choices=["step", "batch"],
        help="normalise each head's GAE advantages per denoising step over the batch "
        "(removes a critic bias per step) or over all (sample, step) pairs",
    )
    value_clip: Optional[float] = field(None, help="PPO-style value clipping range (None: off)")
    max_grad_norm: float = field(
        1.0, help="gradient-norm clip of the critic's own optimiser step (the policy has trainer.max_grad_norm)"
    )
    pretrain_iterations: int = field(
        4,
        help="N_v: at most this many iterations train only the critic before the "
        "trainer.iterations policy iterations (extra samples, counted in "
        "samples_seen; docs/algorithms.md)",
    )
    pretrain_ev_threshold: float = field(
        0.5,
        help="start policy updates early once the held-out explained variance "
        "on the late half of the chain reaches this",
    )
    pretrain_epochs: int = field(
        4, help="epochs over each batch while only the critic trains (value-only passes are cheap)"
    )
    pretrain_replay: int = field(
        8,
        help="value pretraining refits the critic on the last N pretraining batches "
        "(the policy is fixed, so they stay on-policy); 0: the newest batch only",
    )
    value_epochs: int = field(
        2,
        help="policy phase: epochs of the critic's own update over the replay of recent "
        "batches after each policy update (more than trainer.epochs: it is cheap and "
        "the critic must track the moving policy)",
    )
    replay_batches: int = field(2, help="policy phase: the critic refits on the last N batches (the newest on-policy)")
    value_coef: float = field(1.0, help="weight of the value loss")
    value_batch_size: int = field(
        0,
        help="rows per critic forward when valuing a batch's chain without gradients (rollout-time values "
        "for GAE, value clipping); 0: the whole batch at once. Bounds that pass's activation memory at real sizes",
    )


@dataclasses.dataclass
class TrainerConfig:
    iterations: int = field(
        60,
        help="policy iterations (each: rollouts, rewards, update); the same for every "
        "algorithm (ECG's value pretraining runs before them)",
    )
    prompts: str = field(
        "toy",
        help="prompt source: 'toy' (the toy world's grammar) or a text file, one prompt per line (align/prompts.py)",
    )
    prompts_per_iteration: int = field(4, help="distinct prompts per iteration")
    samples_per_prompt: int = field(8, help="G: images per prompt (GRPO's group size)")
    shared_group_noise: bool = field(
        False,
        help="the G images of a prompt start from one x_T, so that they differ only by the policy's own "
        "stochastic steps (with an SDE window: one shared prefix); GRPO's group mean is then a baseline for "
        "that state (docs/algorithms.md)",
    )
    epochs: int = field(1, help="PPO epochs over each batch")
    minibatch_size: int = field(
        32,
        help="samples per optimiser step (= the batch: one step per iteration, which follows the batch's mean "
        "direction; smaller minibatches are several noisy Adam steps: docs/algorithms.md)",
    )
    timestep_fraction: float = field(1.0, help="fraction of denoising steps trained per sample (random subset)")
    step_window: float = field(
        0.8,
        help="the policy trains only the first step_window of the chain (the steps whose "
        "noise still decides the image; later steps' score gradients scale as 1/σ_t "
        "and are mostly noise: docs/algorithms.md); the critic trains every step",
    )
    lr: float = field(2e-3, help="policy LoRA learning rate")
    lr_schedule: str = field(
        "constant",
        choices=["constant", "linear", "cosine"],
        help="the policy's rate over the trainer.iterations policy updates (diffusers' schedules; "
        "align/lr_schedule.py); the critic's stays at critic.lr",
    )
    lr_warmup: int = field(0, help="policy updates of linear warm-up before trainer.lr_schedule")
    clip_range: float = field(0.2, help="PPO clip ε (DDPO uses 1e-4)")
    adv_clip: float = field(5.0, help="advantages are clipped to ±adv_clip (DDPO)")
    kl_coef: float = field(0.0, help="weight of the KL to the reference policy (adapters disabled); 0 = off")
    max_grad_norm: float = field(1.0, help="gradient clipping")
    seed: int = field(0, help="seed of prompts, sampling noise and initialisation")
    checkpoint_every: int = field(
        1,
        help="iterations between atomic checkpoints (the last one is always saved); a "
        "resume replays the iterations after the newest checkpoint exactly",
    )
    snapshot_every: int = field(
        0,
        help="policy updates between policy-LoRA snapshots in RUN_DIR/snapshots (0: none); "
        "benchmarks/sample_efficiency.py scores them along the run",
    )
    max_consecutive_skipped: int = field(
        3, help="with reward_on_error=skip_batch, this many skipped batches in a row stop the run with an error"
    )
    num_threads: int = field(
        1,
        help="torch CPU threads of the training process (0: torch's default; tiny models "
        "gain nothing from more, and OpenMP spinning oversubscribes a small CPU)",
    )


@dataclasses.dataclass
class RayConfig:
    """Rollout and reward actors (align/rollout/ray_group.py). Requests are seeded per chunk, so the
    result does not depend on how many actors serve them or which one does."""

    address: Optional[str] = field(None, help="Ray cluster address ('auto': the running cluster); None: local Ray")
    num_rollout_workers: int = field(2, help="rollout actors, each with its own policy copy (0: in-process, no Ray)")
    num_reward_workers: int = field(1, help="reward actors, separate from the rollout actors (0: score in the driver)")
    chunk_size: int = field(8, help="samples per rollout/reward request (each request has its own seed)")
    cpus_per_rollout_worker: float = field(1.0, help="CPU slots per rollout actor (also its torch threads)")
    gpus_per_rollout_worker: float = field(0.0, help="GPUs per rollout actor")
    cpus_per_reward_worker: float = field(1.0, help="CPU slots per reward actor")
    gpus_per_reward_worker: float = field(0.0, help="GPUs per reward actor (heavy reward models on their own GPUs)")
    placement_strategy: str = field(
        "PACK",
        choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
        help="placement-group strategy of each actor group",
    )
    max_restarts: int = field(3, help="restarts of a dead actor; its lost requests are re-issued")
    restart_timeout_s: float = field(
        300.0,
        help="seconds to wait for a restarting actor (its constructor, model "
        "load included) before the run fails; waiting costs no retry",
    )

    def validate(self) -> None:
        if not 0 < self.restart_timeout_s < float("inf"):
            raise ValueError(
                f"ray.restart_timeout_s must be a finite number of seconds > 0, got {self.restart_timeout_s}"
            )


@dataclasses.dataclass
class LearnerConfig:
    deepspeed: Optional[str] = field(
        None, path="file", help="DeepSpeed JSON (launch/deepspeed/zero2.json); None: the accelerate config decides"
    )
    max_policy_lag: int = field(
        0,
        help="0: synchronous (sample, then train); 1: the rollout actors sample iteration k+1 with policy "
        "version k while the learner trains on iteration k (one step off-policy; docs/cluster.md)",
    )
    gradient_checkpointing: bool = field(
        False,
        help="recompute the denoiser's activations in the backward pass instead of keeping them (diffusers' "
        "enable_gradient_checkpointing): less memory per trained step at real sizes, about one more forward",
    )


@dataclasses.dataclass
class TrainConfig:
    """`align train`: ECG by default on the embedded toy world."""

    #: short top-level keys (``modifiers=[...]``) and their dotted home (align.config.load_config)
    ALIASES: ClassVar[dict[str, str]] = {"modifiers": "sampler.modifiers"}
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(
            num_inference_steps=10, logprob_reduce="sum", sde_window_size=2, sde_window_span=0.5
        )
    )
    algo: str = field("ecg", choices=algorithm_names, help="the RL algorithm (align/algos/registry.py)")
    rewards: list = field(
        default_factory=lambda: [RewardSpec("toy_geneval")],
        help="rewards [{name, weight, args}], e.g. [{name: clip_score, weight: 0.5, args: {checkpoint: "
        "/w/clip.pt, batch_size: 16, device: cuda, timeout_s: 60}}] (docs/rewards.md); the old "
        "'name:weight' strings are still read",
    )
    reward_args: dict = field(
        default_factory=dict,
        help="deprecated: args per reward name (now rewards[].args); merged "
        "into rewards when the config loads, so reward_args.NAME.KEY=VALUE overrides still work",
    )
    reward_on_error: str = field(
        "raise",
        choices=["raise", "skip_batch"],
        help="a reward that fails (raises, NaN/inf, wrong shape, timeout): stop, or drop the "
        "whole batch from the update and count it in the log",
    )
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    eval_every: int = field(8, help="iterations between evaluation grids (0: only at the end)")
    log_with: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        help="accelerate trackers of the metric curves and evaluation grids: tensorboard (RUN_DIR/tensorboard), "
        "wandb (RUN_DIR/wandb; WANDB_MODE=offline to stay local; pip install wandb); []: none",
    )
    final_eval_prompts: int = field(
        512,
        help="(prompt, noise) pairs of the paired end-of-run evaluation written to "
        "RUN_DIR/eval.json, spread evenly over the tags (a tag with fewer prompts repeats "
        "them with new noise; align/eval.py balanced_items); base vs trained policy, "
        "GenEval's scoring; 0: off; needs a prompt source with records: toy, geneval or JSONL",
    )
    eval_prompts: int = field(16, help="fixed evaluation prompts")
    run_dir: str = field("runs/toy_ecg", help="checkpoints, logs, grids and exports")

    def __post_init__(self) -> None:
        """The one reading of the rewards list (align/config_lists.py): typed specs, old forms and
        ``reward_args`` merged in; afterwards ``reward_args`` is empty and ``rewards`` holds RewardSpecs."""
        self.rewards = parse_rewards(self.rewards, self.reward_args)
        self.reward_args = {}

    def reward_specs(self) -> list[RewardSpec]:
        """The rewards as :class:`RewardSpec` (name, weight, args), in config order."""
        return parse_rewards(self.rewards)

    def reward_args_of(self, name: str) -> dict | None:
        """The args of reward ``name`` (None if it is not listed): what ``reward_args[name]`` used to be."""
        return reward_args_of(self.reward_specs(), name)

    def validate(self) -> None:
        """Cheap checks, no torch (align/config_checks.py; docs/config.md): values that would train wrong,
        the prompt source, and the noise parameter of the backbone family that will load."""
        from align.config_checks import check_stochastic, check_values
        from align.model_source import source_kind

        check_values(self)
        check_stochastic(
            source_kind(self.model.source, self.model.allow_download), self.sampler.eta, self.sampler.noise_level
        )
        from align.prompts import check_prompt_source

        check_prompt_source(self.trainer.prompts)

    def check_registries(self) -> None:
        """Against the reward and preset registries (imports torch, loads no model)."""
        from align.config_checks import check_with_registries

        check_with_registries(self)

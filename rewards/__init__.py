"""Reward plugins: protocol, registry and entry points, built-ins, validated multi-reward scoring,
remote reward server and client."""

from rewards.registry import (
    ENTRY_POINT_GROUP,
    PROTOCOL_ARGS,
    FunctionReward,
    Reward,
    RewardError,
    RewardPluginError,
    RewardSpec,
    available_rewards,
    build_rewards,
    check_reward_specs,
    get_reward,
    register_reward,
)
from rewards.scoring import PROMPT_METADATA, score, validate_scores

__all__ = [
    "ENTRY_POINT_GROUP",
    "PROTOCOL_ARGS",
    "FunctionReward",
    "Reward",
    "RewardError",
    "RewardPluginError",
    "RewardSpec",
    "PROMPT_METADATA",
    "available_rewards",
    "build_rewards",
    "check_reward_specs",
    "get_reward",
    "register_reward",
    "score",
    "validate_scores",
]

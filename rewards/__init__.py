"""Reward plugins: protocol, registry and entry points, built-ins, validated multi-reward scoring."""
from rewards.registry import (ENTRY_POINT_GROUP, Reward, RewardError, RewardSpec, available_rewards, get_reward,
                              parse_reward_specs, register_reward, score, validate_scores)

__all__ = ["ENTRY_POINT_GROUP", "Reward", "RewardError", "RewardSpec", "available_rewards", "get_reward",
           "parse_reward_specs", "register_reward", "score", "validate_scores"]

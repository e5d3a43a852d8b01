"""Rollouts overlapped with training (``learner.max_policy_lag=1``; verl's async mode, UniRL's
AsyncDiffusionTrainer, AReaL): while the learner trains on iteration k's batch, a driver thread has the
rollout and reward actors collect iteration k+1's batch with the policy version that sampled k.

The thread only waits on Ray (``ray.wait`` releases the GIL), so the learner's update runs at full speed
beside it. Every batch is sampled by one stated policy (a :class:`~align.rollout.ray_group.PolicyHandle`
fixed when its collection starts), so the PPO ratio is taken against the behaviour policy's stored
log-probs, and the learner's ``check_fresh`` sees a lag of at most 1.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Optional


class RolloutsAhead:
    """At most one collection in flight: ``start(k, policy)`` begins iteration k's; ``take(k, policy)``
    returns it, or collects it now (with ``policy``) when none was started for k (the first iteration, a
    resume, the iteration after a skipped batch)."""

    def __init__(self, collect: Callable[[int, Any], Any]) -> None:
        self.collect = collect
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollouts-ahead")
        self.ahead: Optional[tuple[int, Any, concurrent.futures.Future]] = None

    def start(self, iteration: int, policy: Any) -> None:
        if self.ahead is not None:
            raise RuntimeError(f"rollouts ahead: iteration {self.ahead[0]}'s batch is still in flight")
        self.ahead = (iteration, policy, self.pool.submit(self.collect, iteration, policy))

    def in_flight(self) -> Optional[tuple[int, Any]]:
        """(iteration, policy) of the collection in flight, or None (what a checkpoint records)."""
        return None if self.ahead is None else self.ahead[:2]

    def take(self, iteration: int, policy: Any) -> Any:
        if self.ahead is not None and self.ahead[0] == iteration:
            future, self.ahead = self.ahead[2], None
            return future.result()
        self.drop()
        return self.collect(iteration, policy)

    def drop(self) -> None:
        """Wait for and discard a collection in flight (its actors' work is not cut off mid-request)."""
        if self.ahead is not None:
            future, self.ahead = self.ahead[2], None
            concurrent.futures.wait([future])

    def close(self) -> None:
        self.drop()
        self.pool.shutdown(wait=True)

"""Ray actor groups: rollout actors (each with its own policy copy) and reward actors, behind the same
``rollout(prompts, seed)`` / ``score(images, prompts)`` calls as the in-process path.

The driver (learner rank 0) cuts a batch into seeded requests (``requests.py``) and hands them to
idle actors. An actor that dies (``max_restarts``) loses its request; the driver re-issues it, so
the batch is always complete and nothing is duplicated, and the chunk seed makes the re-issued
trajectory identical to the lost one. Weight sync puts the policy LoRA state once in the object
store; every request also carries ``(version, [ref])``, so an actor restarted from scratch loads
the current weights before sampling. Ray is imported lazily: importing this module is cheap.
"""
from __future__ import annotations

import collections
import os
import time
from typing import Any, Callable, Optional, Sequence

import torch

from align.backbones.lora import state_num_bytes
from align.rollout.requests import Request, SyncStats, make_requests
from align.sampling import Trajectory

PLACEMENT_TIMEOUT_S = 120.0


def _quiet_loading_bars() -> None:
    """Turn off diffusers' and transformers' weight-loading progress bars in this (actor) process."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


class RolloutActor:
    """Body of a rollout actor: builds its own pipeline + policy adapter, samples requests."""

    def __init__(self, cfg, threads: float) -> None:
        from align.backbones.lora import attach_lora
        from align.backbones.model_config import load_model
        from align.rollout.worker import RolloutWorker
        torch.set_num_threads(max(1, int(threads)))
        _quiet_loading_bars()  # every actor's loading bars would interleave in the driver's console
        pipe = load_model(cfg.model)
        attach_lora(pipe, "policy", rank=cfg.lora.rank, alpha=cfg.lora.alpha)
        self.worker = RolloutWorker(pipe, cfg.sampler)
        self.worker.policy_version = -1  # nothing loaded yet: the first request or sync loads weights

    def pid(self) -> int:
        return os.getpid()

    def set_policy(self, version: int, box: list) -> int:
        """Load the state in ``box[0]`` (an ObjectRef, boxed so Ray does not fetch it unasked) if
        this actor holds another version."""
        if version != self.worker.policy_version:
            import ray
            self.worker.set_policy(ray.get(box[0]), version)
        return version

    def rollout(self, request: Request, version: int, box: list) -> Trajectory:
        self.set_policy(version, box)
        return self.worker.rollout(request.prompts, request.seed)


class RewardActor:
    """Body of a reward actor: instantiates the reward plugins by name where it runs."""

    def __init__(self, specs: Sequence[str], reward_args: dict) -> None:
        from rewards import build_rewards, parse_reward_specs
        self.rewards = build_rewards(parse_reward_specs(specs), reward_args)

    def pid(self) -> int:
        return os.getpid()

    def score(self, images: torch.Tensor, prompts: list[str], prompt_metadata: Optional[list] = None) -> torch.Tensor:
        from rewards import score
        return score(self.rewards, images, prompts, prompt_metadata=prompt_metadata)[0]


def connect(address: Optional[str], num_cpus: float) -> bool:
    """Join ``address`` or start local Ray with at least ``num_cpus`` logical CPUs; True if started here."""
    import ray
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=int(max(os.cpu_count() or 1, num_cpus + 0.999)), include_dashboard=False)
    return True


def start_actors(body: type, args: tuple, n: int, cpus: float, gpus: float, strategy: str, max_restarts: int,
                 what: str) -> tuple[list, Any]:
    """``n`` actors of ``body``, one per bundle of a placement group; waits until all are alive."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    pg = placement_group([dict(bundle) for _ in range(n)], strategy=strategy)
    try:
        ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError(f"ray: cannot place {n} {what} actors with {bundle} each ({strategy}) within "
                           f"{PLACEMENT_TIMEOUT_S:.0f} s; cluster has {ray.cluster_resources()}") from None
    remote = ray.remote(body)
    actors = [remote.options(num_cpus=cpus, num_gpus=gpus, max_restarts=max_restarts, max_task_retries=0,
                             scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
              .remote(*args) for i in range(n)]
    ray.get([a.pid.remote() for a in actors])  # surfaces a failing constructor now, with its traceback
    return actors, pg


def run_requests(actors: list, call: Callable[[Any, Any], Any], payloads: list, max_attempts: int,
                 on_dispatch: Optional[Callable[[], None]] = None) -> tuple[list, int]:
    """Serve ``payloads`` on idle actors (one in flight per actor); a payload whose actor died is
    re-issued, up to ``max_attempts`` times. Returns the results in payload order and the re-issue count."""
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError
    queue, idle = collections.deque(range(len(payloads))), collections.deque(range(len(actors)))
    pending: dict = {}
    results: list = [None] * len(payloads)
    attempts = [0] * len(payloads)
    reissued = 0

    def submit() -> None:
        while queue and idle:
            i, a = queue.popleft(), idle.popleft()
            attempts[i] += 1
            pending[call(actors[a], payloads[i])] = (i, a)

    submit()
    if on_dispatch is not None:
        on_dispatch()
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        i, a = pending.pop(ref)
        try:
            results[i] = ray.get(ref)
        except (RayActorError, ActorUnavailableError) as err:
            if attempts[i] >= max_attempts:
                raise RuntimeError(f"ray: request {i} lost {attempts[i]} times to dead actors: {err}") from err
            queue.appendleft(i)
            reissued += 1
        idle.append(a)
        submit()
    return results, reissued


class RayRollouts:
    """``num_rollout_workers`` rollout actors behind ``rollout(prompts, seed)``."""

    def __init__(self, cfg) -> None:
        r = cfg.ray
        self.chunk_size, self.max_attempts = r.chunk_size, r.max_restarts + 1
        self.actors, self.pg = start_actors(RolloutActor, (cfg, r.cpus_per_rollout_worker), r.num_rollout_workers,
                                            r.cpus_per_rollout_worker, r.gpus_per_rollout_worker,
                                            r.placement_strategy, r.max_restarts, "rollout")
        self.version, self.box = -1, None
        self.reissued = 0

    def pids(self) -> list[int]:
        return _pids(self.actors)

    def set_policy(self, state: dict[str, torch.Tensor], version: int) -> SyncStats:
        """Put the LoRA state once; every live actor loads it (a dead one loads it on its next request)."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError
        t0 = time.perf_counter()
        self.version, self.box = version, [ray.put(state)]
        for ref in [a.set_policy.remote(version, self.box) for a in self.actors]:
            try:
                ray.get(ref)
            except (RayActorError, ActorUnavailableError):
                pass  # restarting: the version check in ``rollout`` loads the weights there
        return SyncStats(version, state_num_bytes(state), time.perf_counter() - t0)

    def rollout(self, prompts: list[str], seed: int, on_dispatch: Optional[Callable[[], None]] = None) -> Trajectory:
        if self.box is None:
            raise RuntimeError("RayRollouts.rollout before set_policy: the actors hold no policy weights yet")
        requests = make_requests(prompts, seed, self.chunk_size)
        parts, reissued = run_requests(self.actors, lambda a, req: a.rollout.remote(req, self.version, self.box),
                                       requests, self.max_attempts, on_dispatch)
        self.reissued += reissued
        return Trajectory.cat(parts)

    def close(self) -> None:
        _close(self.actors, self.pg)


class RayRewards:
    """``num_reward_workers`` reward actors; a batch is scored in ``chunk_size`` requests."""

    def __init__(self, cfg) -> None:
        r = cfg.ray
        self.chunk_size, self.max_attempts = r.chunk_size, r.max_restarts + 1
        self.reissued = 0
        self.actors, self.pg = start_actors(RewardActor, (list(cfg.rewards), dict(cfg.reward_args)),
                                            r.num_reward_workers, r.cpus_per_reward_worker, r.gpus_per_reward_worker,
                                            r.placement_strategy, r.max_restarts, "reward")

    def score(self, images: torch.Tensor, prompts: list[str], on_dispatch: Optional[Callable[[], None]] = None,
              prompt_metadata: Optional[list] = None) -> torch.Tensor:
        """Scores (B, K); a plugin's ``RewardError`` is re-raised here as itself (it names the reward).
        A request lost to a dead actor is re-issued, as for rollouts. ``prompt_metadata`` (one record
        per image) travels with each chunk."""
        from ray.exceptions import RayTaskError
        n = self.chunk_size
        chunks = [(images[s:s + n], prompts[s:s + n], None if prompt_metadata is None else list(prompt_metadata[s:s + n]))
                  for s in range(0, len(prompts), n)]
        try:
            parts, reissued = run_requests(self.actors, lambda a, c: a.score.remote(*c), chunks, self.max_attempts,
                                           on_dispatch)
        except RayTaskError as err:
            raise err.cause from None
        self.reissued += reissued
        return torch.cat(parts)

    def pids(self) -> list[int]:
        return _pids(self.actors)

    def close(self) -> None:
        _close(self.actors, self.pg)


def _pids(actors: list, timeout_s: float = 120.0) -> list[int]:
    """Process ids of the actors (waits for restarting ones)."""
    import ray
    from ray.exceptions import ActorUnavailableError
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get([a.pid.remote() for a in actors])
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _close(actors: list, pg) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group
    for a in actors:
        ray.kill(a, no_restart=True)
    remove_placement_group(pg)

"""Ray actor groups: rollout actors (each with its own policy copy) and reward actors, behind the same
``rollout(prompts, seed)`` / ``score(images, prompts)`` calls as the in-process path.

The driver (learner rank 0) cuts a batch into seeded requests (``requests.py``) and hands them to
idle actors. An actor that dies loses its request; the driver re-issues it, so the batch is always
complete and nothing is duplicated, and the chunk seed makes the re-issued trajectory identical to
the lost one. While Ray restarts the actor (``max_restarts``) the driver waits for it, up to
``ray.restart_timeout_s``, without spending a retry; only an actor dead for good costs one. Weight
sync puts the policy LoRA state once in the object store; every request also carries
``(version, [ref])``, so an actor restarted from scratch loads the current weights before sampling.
Ray is imported lazily: importing this module is cheap.
"""

from __future__ import annotations

import collections
import dataclasses
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
        from align.policy import build_policy
        from align.rollout.worker import RolloutWorker

        torch.set_num_threads(max(1, int(threads)))
        _quiet_loading_bars()  # every actor's loading bars would interleave in the driver's console
        self.worker = RolloutWorker(build_policy(cfg), cfg.sampler)  # built as the learner's (align/policy.py)
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
        return self.worker.rollout(request.prompts, request.seed, request.sde_steps, request.latent_seeds)


class RewardActor:
    """Body of a reward actor: instantiates the reward plugins by name where it runs."""

    def __init__(self, specs: Sequence[dict]) -> None:
        """``specs``: the run's rewards as ``{name, weight, args}`` dicts (align/config_lists.py)."""
        from align.config_lists import parse_rewards
        from rewards import build_rewards

        self.rewards = build_rewards(parse_rewards(specs))

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


def start_actors(
    body: type, args: tuple, n: int, cpus: float, gpus: float, strategy: str, max_restarts: int, what: str
) -> tuple[list, Any]:
    """``n`` actors of ``body``, one per bundle of a placement group; waits until all are alive."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    pg = placement_group([dict(bundle) for _ in range(n)], strategy=strategy)
    try:
        ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError(
            f"ray: cannot place {n} {what} actors with {bundle} each ({strategy}) within "
            f"{PLACEMENT_TIMEOUT_S:.0f} s; cluster has {ray.cluster_resources()}"
        ) from None
    remote = ray.remote(body)
    actors = [
        remote.options(
            num_cpus=cpus,
            num_gpus=gpus,
            max_restarts=max_restarts,
            max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
        ).remote(*args)
        for i in range(n)
    ]
    ray.get([a.pid.remote() for a in actors])  # surfaces a failing constructor now, with its traceback
    return actors, pg


PROBE_BACKOFF_S = (0.1, 2.0)  # first and largest wait between two probes of a restarting actor


class _Pool:
    """The actors of one :func:`run_requests` call: idle, busy, restarting or dead.

    Ray raises ``ActorUnavailableError`` while an actor is down but will come back (its process died
    and Ray is restarting it: the in-flight call fails with it, and so does every call until the
    constructor has run again), and ``ActorDiedError`` once it is dead for good (``max_restarts``
    used up). A restarting actor is probed with its cheap ``pid`` method, with exponential backoff,
    until it answers or ``timeout_s`` has passed since it went down; a dead one gets no more work.
    """

    def __init__(self, n: int, timeout_s: float, what: str) -> None:
        self.idle: collections.deque = collections.deque(range(n))
        self.restarting: dict[int, dict] = {}  # actor -> deadline, next probe time, delay, probing
        self.dead: set[int] = set()
        self.last_death: Optional[Exception] = None
        self.timeout_s, self.what = timeout_s, what

    def back(self, a: int) -> None:
        self.restarting.pop(a, None)
        self.idle.append(a)

    def died(self, a: int, err: Exception) -> None:
        self.restarting.pop(a, None)
        self.dead.add(a)
        self.last_death = err

    def unavailable(self, a: int, err: Exception) -> None:
        """``a`` is down: (re)schedule its next probe; past its deadline, fail the run."""
        now = time.monotonic()
        state = self.restarting.setdefault(a, {"deadline": now + self.timeout_s, "delay": PROBE_BACKOFF_S[0]})
        if now >= state["deadline"]:
            raise RuntimeError(
                f"ray: {self.what} actor {a} still unavailable {self.timeout_s:.0f} s after it "
                f"went down (ray.restart_timeout_s): {err}"
            ) from err
        state.update(next=now + state["delay"], delay=min(2 * state["delay"], PROBE_BACKOFF_S[1]), probing=False)

    def probes_due(self) -> list[int]:
        now = time.monotonic()
        due = [a for a, st in self.restarting.items() if not st["probing"] and now >= st["next"]]
        for a in due:
            self.restarting[a]["probing"] = True
        return due

    def wake_in(self) -> Optional[float]:
        """Seconds until the next probe is due or a probe in flight passes its deadline (None: no wait)."""
        times = [st["deadline"] if st["probing"] else st["next"] for st in self.restarting.values()]
        return max(0.0, min(times) - time.monotonic()) if times else None

    def check_deadlines(self) -> None:
        """Fail if a probe has been in flight past its actor's deadline (a restart that hangs)."""
        now = time.monotonic()
        for a, st in self.restarting.items():
            if st["probing"] and now >= st["deadline"]:
                raise RuntimeError(
                    f"ray: {self.what} actor {a} did not come back within {self.timeout_s:.0f} s "
                    "(ray.restart_timeout_s)"
                )


def run_requests(
    actors: list,
    call: Callable[[Any, Any], Any],
    payloads: list,
    on_dispatch: Optional[Callable[[], None]] = None,
    *,
    restart_timeout_s: float,
    what: str,
) -> tuple[list, int]:
    """Serve ``payloads`` on idle actors (one in flight per actor). A payload whose actor went down is
    re-issued to the next idle one (requests are seeded, so a re-issue gives the same result). An
    actor that Ray is restarting is waited for (:class:`_Pool`); one dead for good gets no more work.
    It ends because restarts are finite (``max_restarts`` >= 0): it fails when every actor is dead for
    good, or one stays down past ``restart_timeout_s``. Returns the results in payload order and the
    re-issue count."""
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError

    pool = _Pool(len(actors), restart_timeout_s, what)
    queue = collections.deque(range(len(payloads)))
    pending: dict = {}  # ref -> (payload index, or None for a probe; actor)
    results: list = [None] * len(payloads)
    reissued = 0

    def submit() -> None:
        while queue and pool.idle:
            i, a = queue.popleft(), pool.idle.popleft()
            pending[call(actors[a], payloads[i])] = (i, a)
        for a in pool.probes_due():
            pending[actors[a].pid.remote()] = (None, a)
        if queue and not pending and not pool.restarting:
            raise RuntimeError(
                f"ray: all {len(actors)} {what} actors are dead (ray.max_restarts used up), "
                f"{len(queue)} requests unserved; last: {pool.last_death}"
            )

    submit()
    if on_dispatch is not None:
        on_dispatch()
    while pending or queue:
        if pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=pool.wake_in())
        else:  # every live actor is restarting: wait for the next probe
            ready = []
            time.sleep(pool.wake_in() or 0.0)
        for ref in ready:
            i, a = pending.pop(ref)
            try:
                value = ray.get(ref)
            except ActorUnavailableError as err:  # down, and Ray is restarting it: wait for it
                pool.unavailable(a, err)
            except RayActorError as err:  # ActorDiedError: dead for good
                pool.died(a, err)
            else:
                if i is not None:
                    results[i] = value
                pool.back(a)
                continue
            if i is not None:
                queue.appendleft(i)
                reissued += 1
        pool.check_deadlines()
        submit()
    return results, reissued


@dataclasses.dataclass(frozen=True)
class PolicyHandle:
    """A policy version and its LoRA state in the object store (boxed: Ray does not fetch it unasked)."""

    version: int
    box: Optional[list]


class RayRollouts:
    """``num_rollout_workers`` rollout actors behind ``rollout(prompts, seed)``."""

    def __init__(self, cfg) -> None:
        r = cfg.ray
        self.chunk_size, self.restart_timeout_s = r.chunk_size, r.restart_timeout_s
        self.sampler = cfg.sampler  # the batch's stochastic window is drawn here, once per batch
        self.actors, self.pg = start_actors(
            RolloutActor,
            (cfg, r.cpus_per_rollout_worker),
            r.num_rollout_workers,
            r.cpus_per_rollout_worker,
            r.gpus_per_rollout_worker,
            r.placement_strategy,
            r.max_restarts,
            "rollout",
        )
        self.version, self.box = -1, None
        self.reissued = 0

    def pids(self) -> list[int]:
        return _pids(self.actors, self.restart_timeout_s)

    def policy_handle(self, state: dict[str, torch.Tensor], version: int) -> PolicyHandle:
        """``state`` put once in the object store, with its version: what a request carries."""
        import ray

        return PolicyHandle(version, [ray.put(state)])

    def current_policy(self) -> PolicyHandle:
        return PolicyHandle(self.version, self.box)

    def set_policy(self, state: dict[str, torch.Tensor], version: int, push: bool = True) -> SyncStats:
        """Put the LoRA state once; every live actor loads it (a dead one loads it on its next request).
        ``push=False``: only the next requests carry it, and each actor loads it when it serves one (the
        overlapped loop: an actor busy sampling the next batch is not waited for)."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        t0 = time.perf_counter()
        handle = self.policy_handle(state, version)
        self.version, self.box = handle.version, handle.box
        if not push:
            return SyncStats(version, state_num_bytes(state), time.perf_counter() - t0)
        for ref in [a.set_policy.remote(version, self.box) for a in self.actors]:
            try:
                ray.get(ref)
            except (RayActorError, ActorUnavailableError):
                pass  # restarting: the version check in ``rollout`` loads the weights there
        return SyncStats(version, state_num_bytes(state), time.perf_counter() - t0)

    def rollout(
        self,
        prompts: list[str],
        seed: int,
        on_dispatch: Optional[Callable[[], None]] = None,
        group_size: int = 0,
        policy: Optional[PolicyHandle] = None,
    ) -> Trajectory:
        """As ``LocalRollouts.rollout``: the same requests, so the same trajectories, served by the actors,
        all with one policy: ``policy``, else the current one (read once, so a sync during the batch cannot
        mix two versions in it)."""
        policy = policy or self.current_policy()
        if policy.box is None:
            raise RuntimeError("RayRollouts.rollout before set_policy: the actors hold no policy weights yet")
        requests = make_requests(prompts, seed, self.chunk_size, self.sampler, group_size)
        parts, reissued = run_requests(
            self.actors,
            lambda a, req: a.rollout.remote(req, policy.version, policy.box),
            requests,
            on_dispatch,
            restart_timeout_s=self.restart_timeout_s,
            what="rollout",
        )
        self.reissued += reissued
        return Trajectory.cat(parts)

    def close(self) -> None:
        _close(self.actors, self.pg)


class RayRewards:
    """``num_reward_workers`` reward actors; a batch is scored in ``chunk_size`` requests."""

    def __init__(self, cfg) -> None:
        r = cfg.ray
        self.chunk_size, self.restart_timeout_s = r.chunk_size, r.restart_timeout_s
        self.reissued = 0
        self.actors, self.pg = start_actors(
            RewardActor,
            ([dataclasses.asdict(s) for s in cfg.reward_specs()],),
            r.num_reward_workers,
            r.cpus_per_reward_worker,
            r.gpus_per_reward_worker,
            r.placement_strategy,
            r.max_restarts,
            "reward",
        )

    def score(
        self,
        images: torch.Tensor,
        prompts: list[str],
        on_dispatch: Optional[Callable[[], None]] = None,
        prompt_metadata: Optional[list] = None,
    ) -> torch.Tensor:
        """Scores (B, K); a plugin's ``RewardError`` is re-raised here as itself (it names the reward).
        A request lost to a dead actor is re-issued, as for rollouts. ``prompt_metadata`` (one record
        per image) travels with each chunk."""
        from ray.exceptions import RayTaskError

        n = self.chunk_size
        chunks = [
            (
                images[s : s + n],
                prompts[s : s + n],
                None if prompt_metadata is None else list(prompt_metadata[s : s + n]),
            )
            for s in range(0, len(prompts), n)
        ]
        try:
            parts, reissued = run_requests(
                self.actors,
                lambda a, c: a.score.remote(*c),
                chunks,
                on_dispatch,
                restart_timeout_s=self.restart_timeout_s,
                what="reward",
            )
        except RayTaskError as err:
            raise err.cause from None
        self.reissued += reissued
        return torch.cat(parts)

    def pids(self) -> list[int]:
        return _pids(self.actors, self.restart_timeout_s)

    def close(self) -> None:
        _close(self.actors, self.pg)


def _pids(actors: list, timeout_s: float) -> list[int]:
    """Process ids of the actors; waits (with backoff, up to ``timeout_s``) for restarting ones."""
    import ray
    from ray.exceptions import ActorUnavailableError

    deadline, delay = time.monotonic() + timeout_s, PROBE_BACKOFF_S[0]
    while True:
        try:
            return ray.get([a.pid.remote() for a in actors])
        except ActorUnavailableError:
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(2 * delay, PROBE_BACKOFF_S[1])


def _close(actors: list, pg) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group

    for a in actors:
        ray.kill(a, no_restart=True)
    remove_placement_group(pg)

"""The actor pool: units pulled by actors with a bounded number in flight per actor, dead
actors replaced (the new one loads its model again) and only their units retried, units that
keep failing quarantined with their error while the rest of the job goes on. Any ``RayError`` of
a unit's task other than the task's own exception means its actor's process is gone (crashed,
killed by Ray's memory monitor or the OOM killer, its node lost): a death, told in one line. The
pool gives up only when actors die ``max_actor_restarts`` times in a row with no unit committed
or quarantined (units that kill their actor are quarantined, so they never exhaust it).

Ray sees only ``WorkUnit`` going in and ``UnitResult`` coming back; the data stays with the
actors. Actors are spread over nodes. ``HYMBA_*`` and non-secret ``AWS_*`` settings (endpoint,
region, retries) of the driver are forwarded to the actors' environment; credentials are not (the
workers use the standard AWS chain of their node).
"""

from __future__ import annotations

import os
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import ray
from ray.exceptions import RayError, RayTaskError

from hymba_batch.pipeline.shards import WorkUnit
from hymba_batch.pipeline.unit import UnitResult

from .actor import ActorConfig, InferenceActor

FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")


class PoolError(RuntimeError):
    """The pool cannot go on (actors cannot start, or keep dying)."""


@dataclass(frozen=True)
class PoolConfig:
    num_actors: int = 1
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    max_in_flight: int = 2  # units queued or running per actor
    max_attempts: int = 3  # tries per unit before it is quarantined
    max_actor_restarts: int = 10  # replacements of dead actors in a row with no unit committed or quarantined
    actor_start_timeout_s: float = 900.0  # with no actor running, how long to wait for replacements


@dataclass
class UnitFailure:
    unit_id: str
    attempts: int
    error: str


def forwarded_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith("HYMBA_")}
    env.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    return env


class ActorPool:
    """Runs units on ``num_actors`` inference actors."""

    def __init__(self, actor_cfg: ActorConfig, cfg: PoolConfig) -> None:
        if cfg.num_actors < 1 or cfg.max_in_flight < 1 or cfg.max_attempts < 1:
            raise ValueError(f"bad pool config {cfg}")
        self.actor_cfg, self.cfg = actor_cfg, cfg
        self.remote = ray.remote(InferenceActor).options(
            num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor,
            max_restarts=0, max_task_retries=0, max_concurrency=cfg.max_in_flight,
            scheduling_strategy="SPREAD", runtime_env={"env_vars": forwarded_env()})
        self.actors: list[Any] = []
        self.generation: list[int] = []
        self.restarts = 0
        self.deaths_since_progress = 0  # units that kill actors are quarantined: that is progress too
        self.retries = 0
        self.drained_at: float | None = None  # wall time the last unit was handed out (tail start)
        self.actor_info: list[dict[str, str]] = []
        self.ready: list[bool] = []  # loaded its model and may get units
        self.starting: dict[Any, tuple[int, int]] = {}  # info() of replacements -> (actor, generation)

    def _new_actor(self) -> Any:
        return self.remote.remote(self.actor_cfg)

    def start(self) -> list[dict[str, str]]:
        """Start every actor and wait until each has loaded its model; PoolError if one fails."""
        self.actors = [self._new_actor() for _ in range(self.cfg.num_actors)]
        self.generation = [0] * len(self.actors)
        self.ready = [True] * len(self.actors)
        try:
            self.actor_info = ray.get([a.info.remote() for a in self.actors])
        except RayError as e:
            self.shutdown()
            why = _first_line(e) if isinstance(e, RayTaskError) else death_reason(e)
            raise PoolError(f"an inference actor failed to start: {why}") from e
        return self.actor_info

    def _replace(self, idx: int, gen: int, why: str) -> None:
        """Replace a dead actor; the new one gets units once it has loaded its model."""
        if self.generation[idx] != gen:
            return  # already replaced after an earlier failure of the same actor
        self.restarts += 1
        self.deaths_since_progress += 1
        if self.deaths_since_progress > self.cfg.max_actor_restarts:
            raise PoolError(f"actors died {self.deaths_since_progress} times in a row with no unit committed or "
                            f"quarantined (last: {why}); giving up")
        try:
            ray.kill(self.actors[idx], no_restart=True)
        except Exception:  # noqa: BLE001 - the actor is usually already gone; nothing to undo
            pass
        self.actors[idx] = self._new_actor()
        self.generation[idx] += 1
        self.ready[idx] = False
        self.starting[self.actors[idx].info.remote()] = (idx, self.generation[idx])

    def run(self, units: list[WorkUnit], on_done: Callable[[UnitResult], None],
            on_failed: Callable[[UnitFailure], None], stop: Callable[[], bool] = lambda: False) -> None:
        """Run ``units``; calls ``on_done`` per committed unit and ``on_failed`` per quarantined one.

        A unit's failed try counts against ``max_attempts`` when it raised, or when its actor died
        while running it alone. Units that were in flight together on an actor that died are not
        charged; each is retried alone on an idle actor (so an innocent unit is never quarantined
        for sharing an actor with one that kills it). A replacement actor gets work only once it
        has loaded its model: one that cannot be placed (its node is gone, the cluster is full)
        never holds units hostage while other actors can run them.
        """
        if not self.actors:
            self.start()
        n = len(self.actors)
        queue: deque[WorkUnit] = deque(units)
        attempts: dict[str, int] = {}
        suspects: set[str] = set()  # died alongside other units: next try runs alone
        load = [0] * n
        alone = [False] * n  # running a suspect unit by itself
        inflight: dict[Any, tuple[int, int, WorkUnit]] = {}
        died: dict[tuple[int, int], int] = {}  # (actor, generation) -> units in flight when it died
        waiting_since: float | None = None

        def pick() -> tuple[int, int] | None:
            """(queue position, actor) of the next unit that can be dispatched now."""
            idle = next((i for i in range(n) if self.ready[i] and load[i] == 0), None)
            free = [i for i in range(n) if self.ready[i] and not alone[i] and load[i] < self.cfg.max_in_flight]
            plain = min(free, key=lambda i: load[i]) if free else None
            for pos, unit in enumerate(queue):
                if unit.unit_id in suspects:
                    if idle is not None:
                        return pos, idle
                elif plain is not None:
                    return pos, plain
                if idle is None and plain is None:
                    return None
            return None

        self.drained_at = None
        while queue or inflight:
            while queue and not stop():
                choice = pick()
                if choice is None:
                    break
                pos, idx = choice
                unit = queue[pos]
                del queue[pos]
                alone[idx] = unit.unit_id in suspects
                ref = self.actors[idx].process.remote(unit)
                inflight[ref] = (idx, self.generation[idx], unit)
                load[idx] += 1
            if not queue and self.drained_at is None:
                self.drained_at = time.time()  # the tail begins: no unit left to hand out
            if not inflight and (stop() or not queue):
                break  # stopped with units left, or done
            if not inflight and not self.starting:
                raise PoolError(f"no inference actor is left to run {len(queue)} unit(s)")
            if not inflight:  # only replacements that are still starting
                waiting_since = waiting_since or time.monotonic()
                if time.monotonic() - waiting_since > self.cfg.actor_start_timeout_s:
                    raise PoolError(f"no inference actor could be started in {self.cfg.actor_start_timeout_s:.0f} s "
                                    f"({len(queue)} unit(s) left)")
            else:
                waiting_since = None
            ready, _ = ray.wait(list(inflight) + list(self.starting), num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in self.starting:
                    idx, gen = self.starting.pop(ref)
                    try:
                        ray.get(ref)
                    except RayError as e:
                        self._replace(idx, gen, f"a replacement actor failed to start: {death_reason(e)}")
                        continue
                    if self.generation[idx] == gen:
                        self.ready[idx], load[idx], alone[idx] = True, 0, False
                    continue
                idx, gen, unit = inflight.pop(ref)
                if self.generation[idx] == gen:
                    load[idx] -= 1
                    alone[idx] = False
                charge = True
                try:
                    on_done(ray.get(ref))
                    self.deaths_since_progress = 0
                    suspects.discard(unit.unit_id)
                    continue
                except RayTaskError as e:
                    error = _first_line(e)
                except RayError as e:  # the actor's process is gone: crashed, OOM-killed, node lost
                    error = f"actor died: {death_reason(e)}"
                    if (idx, gen) not in died:
                        died[(idx, gen)] = 1 + sum(1 for i, g, _ in inflight.values() if (i, g) == (idx, gen))
                    if self.generation[idx] == gen:
                        self._replace(idx, gen, error)
                        load[idx], alone[idx] = 0, False
                    if died[(idx, gen)] > 1:  # not alone: which unit killed it is unknown
                        charge = False
                        suspects.add(unit.unit_id)
                if charge:
                    attempts[unit.unit_id] = attempts.get(unit.unit_id, 0) + 1
                if attempts.get(unit.unit_id, 0) >= self.cfg.max_attempts:
                    on_failed(UnitFailure(unit.unit_id, attempts[unit.unit_id], error))
                    self.deaths_since_progress = 0
                else:
                    self.retries += 1
                    queue.appendleft(unit)
                    self.drained_at = None

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - best effort at teardown; the actor may be gone
                pass
        self.actors = []
        self.starting = {}


def death_reason(e: BaseException) -> str:
    """One line for an actor's death: the error's type and its first sentence (Ray's messages run
    to dozens of lines), e.g. ``OutOfMemoryError: Task was killed due to the node running low on
    memory``; the exit detail of a crashed worker when Ray gives one."""
    raw = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    if getattr(e, "_actor_init_failed", False):  # its __init__ raised: that error is the last line
        lines = [ln.strip() for ln in raw.splitlines() if ln.strip()]
        return lines[-1][:2000] if lines else type(e).__name__
    text = " ".join(raw.split())
    first = text.split(". ")[0].rstrip(".")
    m = re.search(r"Worker exit detail: (.*?)(?:\. |$)", text)
    detail = f" ({m.group(1).rstrip('.')[:160]})" if m and m.group(1) not in first else ""
    return f"{type(e).__name__}: {first[:200]}{detail}"


def _first_line(e: RayTaskError) -> str:
    """The application error of a failed task: its type and message, no Ray traceback."""
    cause = e.cause if getattr(e, "cause", None) is not None else e
    msg = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {msg[-1] if msg else ''}"[:2000]

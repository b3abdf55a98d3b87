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

import math
import os
import re
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
from ray.exceptions import RayError, RayTaskError

from hymba_batch.pipeline.shards import WorkUnit
from hymba_batch.pipeline.unit import UnitResult

from .actor import ActorConfig, InferenceActor
from .metrics import PoolMetrics, actor_label

FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")


class PoolError(RuntimeError):
    """The pool cannot go on (actors cannot start, or keep dying)."""


@dataclass(frozen=True)
class PoolConfig:
    num_actors: int = 1
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    max_in_flight: int | None = None  # units queued or running per actor; None: auto (in_flight_limit)
    max_attempts: int = 3  # tries per unit before it is quarantined
    max_actor_restarts: int = 10  # replacements of dead actors in a row with no unit committed or quarantined
    actor_start_timeout_s: float = 900.0  # with no actor running, how long to wait for replacements
    job_id: str = ""  # the ``job`` tag of the pool's metrics


@dataclass
class UnitFailure:
    unit_id: str
    attempts: int
    error: str


MAX_AUTO_IN_FLIGHT = 16


def in_flight_limit(slots: int, unit_rows: float) -> int:
    """Units to keep in flight on an actor so that its engine never runs dry at a unit boundary:
    their rows cover twice the engine's sequence slots (a unit frees its slots one by one as its
    rows finish, and the next unit's rows must already be queued), at least 2, at most 16."""
    return max(2, min(MAX_AUTO_IN_FLIGHT, math.ceil(2 * slots / max(unit_rows, 1.0)) + 1))


def forwarded_env() -> dict[str, str]:
    """The driver's HYMBA_* and S3 settings the actors must see: all of them on a cluster someone
    else started; on a local Ray this process started, only those its workers do not already
    have (they inherit its raylet's environment). An actor with no environment of its own can
    take one of Ray's prestarted worker processes: ~0.7 s less of its start on a 2-core CPU than
    a fresh one for a runtime_env."""
    env = {k: v for k, v in os.environ.items() if k.startswith("HYMBA_")}
    env.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    workers = _local_worker_env()
    return env if workers is None else {k: v for k, v in env.items() if workers.get(k) != v}


def _local_worker_env() -> dict[str, str] | None:
    """The environment of the raylet of a local Ray this process started (its workers'), or None
    (a cluster started elsewhere, or no /proc to read it from)."""
    from ray._private import ray_constants, worker

    procs = (getattr(worker._global_node, "all_processes", None) or {}).get(ray_constants.PROCESS_TYPE_RAYLET)
    if not procs or getattr(procs[0], "process", None) is None:
        return None
    try:
        raw = Path(f"/proc/{procs[0].process.pid}/environ").read_bytes()
    except OSError:
        return None
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


class ActorPool:
    """Runs units on ``num_actors`` inference actors."""

    def __init__(self, actor_cfg: ActorConfig, cfg: PoolConfig) -> None:
        if cfg.num_actors < 1 or (cfg.max_in_flight is not None and cfg.max_in_flight < 1) or cfg.max_attempts < 1:
            raise ValueError(f"bad pool config {cfg}")
        self.actor_cfg, self.cfg = actor_cfg, cfg
        self.remote = ray.remote(InferenceActor).options(
            num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor,
            max_restarts=0, max_task_retries=0, max_concurrency=cfg.max_in_flight or MAX_AUTO_IN_FLIGHT,
            scheduling_strategy="SPREAD", **({"runtime_env": {"env_vars": env}} if (env := forwarded_env()) else {}))
        self.actors: list[Any] = []
        self.generation: list[int] = []
        self.restarts = 0
        self.deaths_since_progress = 0  # units that kill actors are quarantined: that is progress too
        self.retries = 0
        self.drained_at: float | None = None  # tail start: nothing left to hand out and an actor idle
        self.actor_info: list[dict[str, str]] = []
        self.ready: list[bool] = []  # loaded its model and may get units
        self.starting: dict[Any, tuple[int, int]] = {}  # info() of replacements -> (actor, generation)
        self.metrics = PoolMetrics(cfg.job_id)
        self.label_of: dict[tuple[int, int], str] = {}  # (actor, generation) -> its metrics tag

    def _label(self, idx: int) -> str:
        label = actor_label(self.actors[idx]._actor_id.hex())
        self.label_of[(idx, self.generation[idx])] = label
        return label

    def _new_actor(self) -> Any:
        return self.remote.remote(self.actor_cfg)

    def start(self) -> list[dict[str, str]]:
        """Start every actor and wait until each has loaded its model; PoolError if one fails."""
        self.actors = [self._new_actor() for _ in range(self.cfg.num_actors)]
        self.generation = [0] * len(self.actors)
        self.ready = [True] * len(self.actors)
        for i in range(len(self.actors)):
            self._label(i)
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
        self.metrics.restart(self.label_of.get((idx, gen), ""))
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
        self._label(idx)
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
        limit = self.cfg.max_in_flight or self._auto_limit(units)
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
            free = [i for i in range(n) if self.ready[i] and not alone[i] and load[i] < limit]
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
            if not queue and self.drained_at is None and any(self.ready[i] and load[i] == 0 for i in range(n)):
                # the tail begins: no unit left to hand out and an actor out of work (while one actor
                # still has units in flight its engine stays busy: that is steady state)
                self.drained_at = time.time()
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
                label = self.label_of.get((idx, gen), "")
                if attempts.get(unit.unit_id, 0) >= self.cfg.max_attempts:
                    self.metrics.quarantine(label)
                    on_failed(UnitFailure(unit.unit_id, attempts[unit.unit_id], error))
                    self.deaths_since_progress = 0
                else:
                    self.retries += 1
                    self.metrics.retry(label)
                    queue.appendleft(unit)
                    self.drained_at = None

    def _auto_limit(self, units: list[WorkUnit]) -> int:
        """``in_flight_limit`` for the smallest engine of the pool and this run's mean unit size."""
        slots = min((int(i.get("slots", 0)) for i in self.actor_info), default=0)
        rows = sum(u.num_rows for u in units) / max(len(units), 1)
        return in_flight_limit(slots, rows) if slots else 2

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

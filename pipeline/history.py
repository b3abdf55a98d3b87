"""A job's progress over time, bounded: ``_hymba/history.json`` beside ``status.json``.

The driver adds a point at most every ``interval_s`` seconds (10 s), and on every state change:
cumulative rows, units, tokens and row errors of the job, and per actor (``actor``: the first
12 hex digits of its Ray actor id, the tag of its metrics) the rows and tokens it committed in
this run. Past ``max_points`` points a run keeps every other point and doubles its interval, so
a run of any length fits in a few hundred points. Each run of the same job (a resume after a
cancel or a failure) is one entry of ``runs``; the last ``MAX_RUNS`` are kept. A run also
records when its actors were ready, when its tail began (no unit left to hand out and an actor
out of work) and when it ended: the time split (start, steady state, tail) of the job summary,
also for a run that is still going or was cancelled. Knows nothing of Ray or of the engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from .unit import UnitResult

HISTORY_FILE = "history.json"
MAX_RUNS = 10


def actor_label(actor_id: str) -> str:
    """An actor's short name: the first 12 hex digits of its Ray actor id (the metrics' tag)."""
    return (actor_id or "unknown")[:12]


def totals(results: Iterable[UnitResult]) -> dict[str, Any]:
    """Cumulative figures of ``results``: the job's, and per actor those this run produced."""
    out: dict[str, Any] = {"rows": 0, "units": 0, "prompt_tokens": 0, "completion_tokens": 0, "error_rows": 0}
    actors: dict[str, dict[str, int]] = {}
    for r in results:
        out["rows"] += r.rows
        out["units"] += 1
        out["prompt_tokens"] += r.prompt_tokens
        out["completion_tokens"] += r.completion_tokens
        out["error_rows"] += r.error_rows
        if not r.reused:
            a = actors.setdefault(actor_label(r.worker.get("actor_id", "")),
                                  {"rows": 0, "prompt_tokens": 0, "completion_tokens": 0})
            a["rows"] += r.rows
            a["prompt_tokens"] += r.prompt_tokens
            a["completion_tokens"] += r.completion_tokens
    out["actors"] = actors
    return out


@dataclass
class RunHistory:
    """The points of one run, and its phase times (epoch seconds)."""

    run_id: str | None
    started_at: float
    interval_s: float = 10.0
    max_points: int = 360
    points: list[dict[str, Any]] = field(default_factory=list)
    ready_at: float | None = None    # every actor has loaded its model
    drained_at: float | None = None  # no unit left to hand out and an actor idle (the tail begins)
    ended_at: float | None = None
    state: str = "running"

    def due(self, now: float) -> bool:
        """Whether a new point is due (the first one always is)."""
        return not self.points or now - self.points[-1]["t"] >= self.interval_s

    def add(self, now: float, figures: dict[str, Any], state: str) -> None:
        """Add a point (cumulative ``figures``) and keep the run within ``max_points``."""
        self.state = state
        if state != "running":
            self.ended_at = now
        point = {"t": now, **figures}
        if self.points and self.points[-1]["t"] == now:
            self.points[-1] = point
        else:
            self.points.append(point)
        if len(self.points) > self.max_points:
            self.points = self.points[:-1:2] + self.points[-1:]
            self.interval_s *= 2

    def document(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "started_at": self.started_at, "interval_s": self.interval_s,
                "ready_at": self.ready_at, "drained_at": self.drained_at, "ended_at": self.ended_at,
                "state": self.state, "points": self.points}


class History:
    """The history document of one job: earlier runs (as read back) and the current run."""

    def __init__(self, job_id: str, run_id: str | None = None, previous: dict[str, Any] | None = None,
                 interval_s: float = 10.0, max_points: int = 360, started_at: float | None = None) -> None:
        self.job_id = job_id
        old = previous.get("runs", []) if previous and previous.get("job_id") == job_id else []
        self.earlier: list[dict[str, Any]] = list(old)[-(MAX_RUNS - 1):]
        self.run = RunHistory(run_id, time.time() if started_at is None else started_at, interval_s, max_points)

    def document(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "runs": self.earlier + [self.run.document()]}

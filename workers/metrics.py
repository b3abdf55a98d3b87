"""A job's metrics, through Ray's own metrics API (``ray.util.metrics``): Ray exports them in
Prometheus format on every node's metrics export port, next to its own metrics, and its
dashboard and Grafana read them from there; no second metrics server.

Every metric carries the tags ``job`` (the job id, or an incremental run's id) and ``actor``
(the inference actor: the first 12 hex digits of its Ray actor id). The actors publish rows,
tokens, row errors and a rows/s gauge per unit, and poll their engine's plain counters
(``Engine.snapshot()``, the engine knows nothing of Ray) into the engine gauges and counters;
the pool, in the driver, publishes unit retries, quarantines and actor restarts.

``METRICS`` lists every name with its kind; the Prometheus name is ``ray_<name>`` plus
``_total`` for counters (infra/grafana/ queries those, and a test checks that it does).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from typing import Any, Callable

from ray.util.metrics import Counter, Gauge

from hymba_batch.pipeline.history import actor_label

__all__ = ["METRICS", "ActorMetrics", "PoolMetrics", "actor_label", "prometheus_name"]

TAGS = ("job", "actor")
INTERVAL_ENV = "HYMBA_METRICS_INTERVAL_S"
RATE_WINDOW_S = 60.0

# name -> (kind, description)
METRICS: dict[str, tuple[str, str]] = {
    "hymba_rows": ("counter", "rows committed (their unit's file written)"),
    "hymba_units": ("counter", "work units committed"),
    "hymba_prompt_tokens": ("counter", "prompt tokens of committed rows"),
    "hymba_completion_tokens": ("counter", "generated tokens of committed rows"),
    "hymba_row_errors": ("counter", "committed rows whose error column is set"),
    "hymba_rows_per_second": ("gauge", "rows committed per second over the last minute"),
    "hymba_engine_running_seqs": ("gauge", "sequences in the engine's continuous batch"),
    "hymba_engine_slots": ("gauge", "sequence slots of the engine's cache"),
    "hymba_engine_batch_occupancy": ("gauge", "running sequences / slots (0..1)"),
    "hymba_engine_waiting_requests": ("gauge", "requests queued in the engine for a slot"),
    "hymba_engine_cache_blocks_used": ("gauge", "paged cache blocks held by sequences"),
    "hymba_engine_cache_blocks_total": ("gauge", "paged cache blocks of the engine"),
    "hymba_engine_prefill_seconds": ("counter", "seconds the engine spent in prefill steps"),
    "hymba_engine_decode_seconds": ("counter", "seconds the engine spent in decode steps"),
    "hymba_engine_prefill_tokens": ("counter", "tokens prefilled (recomputation included)"),
    "hymba_engine_decode_tokens": ("counter", "tokens decoded"),
    "hymba_engine_preemptions": ("counter", "sequences preempted for lack of cache"),
    "hymba_unit_retries": ("counter", "unit tries that failed and were queued again"),
    "hymba_units_quarantined": ("counter", "units that failed every try and were set aside"),
    "hymba_actor_restarts": ("counter", "inference actors replaced after they died"),
}


def prometheus_name(name: str) -> str:
    """The name Ray's Prometheus export gives metric ``name``."""
    return f"ray_{name}_total" if METRICS[name][0] == "counter" else f"ray_{name}"


_made: dict[str, Any] = {}
_lock = threading.Lock()


def _metric(name: str) -> Any:
    """One metric object per name and process (Ray registers a name once per process)."""
    with _lock:
        if name not in _made:
            kind, text = METRICS[name]
            _made[name] = (Counter if kind == "counter" else Gauge)(name, description=text, tag_keys=TAGS)
        return _made[name]


_failed: set[str] = set()


def _safely(name: str, record: Callable[[Any], None]) -> None:
    """Record a metric; a failure (no Ray metrics here, say a Ray Client driver) is said once on
    stderr and never fails a unit or the job."""
    try:
        record(_metric(name))
    except Exception as e:  # noqa: BLE001 - monitoring must never take the job down
        if name not in _failed:
            _failed.add(name)
            print(f"hymba-batch: metric {name} not recorded ({type(e).__name__}: {e})", file=sys.stderr)


def _inc(name: str, value: float, tags: dict[str, str]) -> None:
    if value > 0:  # Ray's counters refuse 0
        _safely(name, lambda m: m.inc(value, tags=tags))


def _set(name: str, value: float, tags: dict[str, str]) -> None:
    _safely(name, lambda m: m.set(value, tags=tags))


def interval_s() -> float:
    """How often an actor polls its engine (``HYMBA_METRICS_INTERVAL_S``, default 2 s)."""
    return float(os.environ.get(INTERVAL_ENV, "2") or 2)


class ActorMetrics:
    """The metrics of one inference actor: ``unit_done`` per committed unit, and a daemon
    thread that polls ``snapshot`` (an engine's ``EngineStats``) every ``interval`` seconds."""

    def __init__(self, job: str, actor: str, snapshot: Callable[[], Any] | None = None,
                 interval: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.tags = {"job": job or "unknown", "actor": actor}
        self.snapshot, self.clock = snapshot, clock
        self.started = clock()
        self.interval = interval_s() if interval is None else interval
        self.recent: deque[tuple[float, int]] = deque()  # (time, rows) of units in the rate window
        self.last: Any = None
        self._rows_lock, self._poll_lock = threading.Lock(), threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if snapshot is not None:
            self.poll()
            self._thread = threading.Thread(target=self._loop, name="hymba-metrics", daemon=True)
            self._thread.start()

    def unit_done(self, rows: int, prompt_tokens: int, completion_tokens: int, error_rows: int) -> None:
        """Count a unit this actor committed."""
        t = self.tags
        _inc("hymba_units", 1, t)
        _inc("hymba_rows", rows, t)
        _inc("hymba_prompt_tokens", prompt_tokens, t)
        _inc("hymba_completion_tokens", completion_tokens, t)
        _inc("hymba_row_errors", error_rows, t)
        with self._rows_lock:
            self.recent.append((self.clock(), rows))
        self._publish_rate()

    def rows_per_second(self) -> float:
        """Rows committed per second over the last minute (or since this actor started, if sooner)."""
        now = self.clock()
        with self._rows_lock:
            while self.recent and now - self.recent[0][0] > RATE_WINDOW_S:
                self.recent.popleft()
            rows = sum(r for _, r in self.recent)
        return rows / max(min(RATE_WINDOW_S, now - self.started), 1e-3)

    def _publish_rate(self) -> None:
        _set("hymba_rows_per_second", self.rows_per_second(), self.tags)

    def poll(self) -> None:
        """Publish the engine's counters now (gauges as they are, counters by their increase)."""
        with self._poll_lock:  # the poll thread and the unit threads: each increase counted once
            try:
                self._poll()
            except Exception as e:  # noqa: BLE001 - monitoring must never fail a unit
                if "poll" not in _failed:
                    _failed.add("poll")
                    print(f"hymba-batch: engine metrics not polled ({type(e).__name__}: {e})", file=sys.stderr)

    def _poll(self) -> None:
        s = self.snapshot()  # type: ignore[misc]
        t = self.tags
        for name, value in (("hymba_engine_running_seqs", s.running), ("hymba_engine_slots", s.slots),
                            ("hymba_engine_batch_occupancy", s.occupancy),
                            ("hymba_engine_waiting_requests", s.waiting),
                            ("hymba_engine_cache_blocks_used", s.blocks_used),
                            ("hymba_engine_cache_blocks_total", s.blocks_total)):
            _set(name, float(value), t)
        old = self.last
        for name, field in (("hymba_engine_prefill_seconds", "prefill_s"), ("hymba_engine_decode_seconds", "decode_s"),
                            ("hymba_engine_prefill_tokens", "prefill_tokens"),
                            ("hymba_engine_decode_tokens", "decode_tokens"),
                            ("hymba_engine_preemptions", "preemptions")):
            _inc(name, getattr(s, field) - (getattr(old, field) if old is not None else 0), t)
        self.last = s
        self._publish_rate()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def stop(self) -> None:
        self._stop.set()


class PoolMetrics:
    """The driver side: unit retries, quarantines and actor restarts, tagged with the actor
    the failed try ran on."""

    def __init__(self, job: str) -> None:
        self.job = job or "unknown"

    def _tags(self, actor: str) -> dict[str, str]:
        return {"job": self.job, "actor": actor}

    def retry(self, actor: str) -> None:
        _inc("hymba_unit_retries", 1, self._tags(actor))

    def quarantine(self, actor: str) -> None:
        _inc("hymba_units_quarantined", 1, self._tags(actor))

    def restart(self, actor: str) -> None:
        _inc("hymba_actor_restarts", 1, self._tags(actor))

"""A running driver's heartbeat, and how ``hymba-batch status`` tells a live job from a dead one.

While a job runs, a background thread refreshes ``_hymba/status.json`` every heartbeat interval
(``HYMBA_HEARTBEAT_S``, default 5 s; the lease renews at the same pace, ``pipeline/lease.py``).
The status document then carries ``driver`` (host, pid), ``heartbeat_at`` and
``heartbeat_expires_at`` (``HEARTBEAT_MISSES`` intervals later).

A document that says ``running`` is judged by ``assess``: its heartbeat expired (or its driver
ran on this host and the process is gone) and the output's lease is gone, expired or held by a
vanished process: ``dead``; the heartbeat expired but the lease still lives: ``stale`` (the
driver is alive but not progressing, or its store writes fail). The next run takes over a dead
job's lease and resumes it. Knows nothing of Ray, units or models.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any, Callable

from hymba_batch.pipeline.lease import Lease, describe_holder, heartbeat_interval, is_stale, pid_alive

HEARTBEAT_MISSES = 6  # heartbeats a driver may miss before its status counts as expired


def heartbeat_fields(now: float | None = None) -> dict[str, Any]:
    """The status document's liveness fields, as of ``now``."""
    now = time.time() if now is None else now
    return {"driver": {"host": socket.gethostname(), "pid": os.getpid()}, "heartbeat_at": now,
            "heartbeat_expires_at": now + HEARTBEAT_MISSES * heartbeat_interval()}


class Heartbeat:
    """Calls ``beat`` every heartbeat interval from a daemon thread until stopped (errors of one
    beat, such as a store hiccup, are skipped: the next beat tries again)."""

    def __init__(self, beat: Callable[[], None], interval_s: float | None = None) -> None:
        self.beat, self.interval = beat, interval_s or heartbeat_interval()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hymba-heartbeat", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a transient write error; the next beat retries
                continue

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def assess(doc: dict[str, Any], lease: dict[str, Any] | None, now: float | None = None) -> tuple[str, str | None]:
    """(state, reason) of a status document, given the output's lease document (or None)."""
    state = doc.get("state")
    if state != "running" or "heartbeat_expires_at" not in doc:
        return state, None  # ended, or written before heartbeats existed
    now = time.time() if now is None else now
    driver = doc.get("driver") or {}
    beat = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(doc.get("heartbeat_at", 0))))
    gone = (driver.get("host") == socket.gethostname() and isinstance(driver.get("pid"), int)
            and not pid_alive(driver["pid"]))
    if not gone and float(doc["heartbeat_expires_at"]) >= now:
        return state, None
    who = f"driver (host {driver.get('host')}, pid {driver.get('pid')})"
    if lease is not None and is_stale(lease, now) is None:
        return "stale", (f"{who} last heartbeat {beat}; the output's lease is still held by "
                         f"{describe_holder(lease)}")
    why = "its process is gone" if gone else f"no heartbeat since {beat}"
    held = f"is stale ({is_stale(lease, now)})" if lease is not None else "is gone"
    return "dead", f"{who}: {why}, and its lease {held}; a new run resumes the job"


def with_liveness(uri: str, doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with ``state`` set to ``dead`` / ``stale`` (and ``state_reason``) where ``assess``
    says so; the lease of ``uri`` is read only for a document that says ``running``."""
    if doc.get("state") != "running":
        return doc
    lease, _ = Lease(uri, "status-reader", 1).read()
    state, reason = assess(doc, lease)
    if reason is None:
        return doc
    return dict(doc, state=state, state_reason=reason, reported_state=doc.get("state"))

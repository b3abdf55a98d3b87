"""The run lease of an output prefix: ``_hymba/lease.json``, held by at most one run at a time.

Acquiring is an exclusive create: locally ``open(O_CREAT | O_EXCL)``, on S3 a conditional
``PutObject`` with ``If-None-Match: *`` (the store refuses the put when the key exists). The
holder renews the lease from a background thread (its heartbeat: every ``HYMBA_HEARTBEAT_S``
seconds, default 5, or ``ttl / 3`` if that is shorter) by a compare-and-swap: on S3 a ``PutObject`` with ``If-Match: <etag of our lease>``; locally a
replace done while holding an ``fcntl`` lock on ``_hymba/lease.lock`` (released by the kernel
when a process dies, so it never goes stale itself).

A lease is stale when its ``expires_at`` has passed (the holder stopped renewing) or when its
holder ran on this host and its process is gone. A stale lease is taken over with the same
compare-and-swap, so of two runs that find the same stale lease only one wins; a lease deleted
under its holder is created again at the next renewal (exclusively). Release deletes
the lease if it is still ours. ``acquire(wait_s=...)`` waits for a live holder to finish, polling
at the heartbeat interval. Knows nothing of units, Ray or models.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from .fs import Location, resolve


HEARTBEAT_ENV = "HYMBA_HEARTBEAT_S"


def heartbeat_interval() -> float:
    """Seconds between a running job's heartbeats (lease renewal, status refresh)."""
    try:
        return max(0.05, float(os.environ.get(HEARTBEAT_ENV, "5")))
    except ValueError:
        return 5.0


class LeaseHeld(RuntimeError):
    """Another run holds the output prefix's lease (``holder``: its lease document)."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


def describe_holder(doc: dict[str, Any]) -> str:
    """``run R (host H, pid P, started 2026-12-04T18:20:01Z)`` for a lease document."""
    started = doc.get("acquired_at")
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(started))) if started else "?"
    return f"run {doc.get('run_id')} (host {doc.get('host')}, pid {doc.get('pid')}, started {when})"


class LeaseLost(RuntimeError):
    """This run's lease was taken over (it stopped renewing for longer than its ttl)."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(doc: dict[str, Any], now: float | None = None) -> str | None:
    """Why the lease ``doc`` is stale ('expired' / 'holder gone'), or None while it is live."""
    now = time.time() if now is None else now
    if float(doc.get("expires_at", 0)) < now:
        return "expired"
    if doc.get("host") == socket.gethostname() and isinstance(doc.get("pid"), int) and not pid_alive(doc["pid"]):
        return "holder gone"
    return None


class Lease:
    """The lease of the output prefix ``uri`` for the run ``run_id``."""

    def __init__(self, uri: str, run_id: str, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        if ttl_s <= 0:
            raise ValueError(f"schedule.lease_ttl must be > 0, got {ttl_s}")
        self.loc: Location = resolve(uri)
        self.run_id, self.ttl = run_id, float(ttl_s)
        self.clock = clock  # wall-clock seconds (a parameter so tests can make this host's clock jump)
        self.path = self.loc.join("_hymba", "lease.json")
        self.nonce = uuid.uuid4().hex
        self.etag: str | None = None  # S3: the etag of the object we wrote last
        self.took_over: dict[str, Any] | None = None  # the stale lease this run replaced
        self.lost = False
        self.doc: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.loc.scheme == "s3":
            import boto3

            from .fs import _s3_endpoint

            self.bucket, _, self.key = self.path.partition("/")
            self.s3 = boto3.client("s3", endpoint_url=_s3_endpoint())

    # ---- documents -------------------------------------------------------------------------

    def _doc(self) -> dict[str, Any]:
        now = self.clock()
        return {"run_id": self.run_id, "nonce": self.nonce, "host": socket.gethostname(), "pid": os.getpid(),
                "acquired_at": now, "expires_at": now + self.ttl, "ttl_s": self.ttl}

    def read(self) -> tuple[dict[str, Any] | None, str | None]:
        """(the lease document, its S3 etag) or (None, None) when no run holds the prefix."""
        if self.loc.scheme == "s3":
            try:
                r = self.s3.get_object(Bucket=self.bucket, Key=self.key)
            except self.s3.exceptions.NoSuchKey:
                return None, None
            return json.loads(r["Body"].read()), r["ETag"]
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None, None
        try:
            return json.loads(raw), None
        except json.JSONDecodeError:  # a creator died between create and write: treat as expired
            return {"expires_at": 0, "run_id": "?"}, None

    # ---- primitive operations ----------------------------------------------------------------

    def _create(self, doc: dict[str, Any]) -> bool:
        data = json.dumps(doc, indent=2).encode()
        if self.loc.scheme == "s3":
            from botocore.exceptions import ClientError

            try:
                self.etag = self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=data, IfNoneMatch="*")["ETag"]
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    return False
                raise
            return True
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def _swap(self, expect: dict[str, Any], etag: str | None, new: dict[str, Any] | None) -> bool:
        """Replace (or with ``new=None`` delete) the lease iff it is still ``expect``."""
        if self.loc.scheme == "s3":
            from botocore.exceptions import ClientError

            try:
                if new is None:
                    self.s3.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag)
                else:
                    self.etag = self.s3.put_object(Bucket=self.bucket, Key=self.key,
                                                   Body=json.dumps(new, indent=2).encode(), IfMatch=etag)["ETag"]
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "NoSuchKey",
                                                               "ConditionalRequestConflict"):
                    return False
                raise
            return True
        lock_path = os.path.join(os.path.dirname(self.path), "lease.lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current, _ = self.read()
            if current != expect:
                return False
            if new is None:
                os.remove(self.path)
            else:
                tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
                with open(tmp, "wb") as f:
                    f.write(json.dumps(new, indent=2).encode())
                os.replace(tmp, self.path)
            return True

    # ---- the lease's life ------------------------------------------------------------------

    def acquire(self, wait_s: float | None = None, say: Callable[[str], None] | None = None) -> "Lease":
        """Take the lease (taking over a stale one); LeaseHeld when a live run holds it, or with
        ``wait_s`` (seconds, ``math.inf`` for no limit) only once it was held that long: until
        then, poll at the heartbeat interval (``say`` hears once whom it waits for)."""
        deadline = None if wait_s is None else time.monotonic() + wait_s
        told = None
        while True:
            try:
                return self._acquire_once()
            except LeaseHeld as e:
                if deadline is None or time.monotonic() >= deadline:
                    raise
                holder = e.holder.get("nonce") or e.holder.get("run_id")
                if say is not None and holder != told:
                    say(f"waiting for {describe_holder(e.holder)} to release {self.loc.uri(self.path)}")
                    told = holder
                time.sleep(max(0.05, min(heartbeat_interval(), deadline - time.monotonic())))

    def _acquire_once(self) -> "Lease":
        for _ in range(5):
            mine = self._doc()
            if self._create(mine):
                self.doc = mine
                break
            current, etag = self.read()
            if current is None:
                continue  # released between our create and our read: try again
            why = is_stale(current, self.clock())
            if why is None:
                left = float(current.get("expires_at", 0)) - self.clock()
                raise LeaseHeld(f"{self.loc.uri(self.path)}: {describe_holder(current)} holds the lease "
                                f"({left:.0f} s left unless renewed); not starting an overlapping run "
                                f"(`run --wait` waits for it)", current)
            if self._swap(current, etag, mine):
                self.doc, self.took_over = mine, current | {"stale": why}
                break
        else:
            raise LeaseHeld(f"{self.loc.uri(self.path)}: the lease changed hands repeatedly; try again later", {})
        self._thread = threading.Thread(target=self._renew_loop, name="hymba-lease", daemon=True)
        self._thread.start()
        return self

    def renew(self) -> None:
        """Push ``expires_at`` forward; marks the lease lost if another run has replaced it. A
        lease deleted under us (the prefix was removed while the job ran) is created again, unless
        another run created one first."""
        current, etag = self.read()
        if current is None and self.doc is not None:
            now = self.clock()
            again = dict(self.doc, expires_at=now + self.ttl, renewed_at=now, recreated_at=now)
            if self._create(again):
                self.doc = again
            else:
                self.lost = True
            return
        if current is None or current.get("nonce") != self.nonce:
            self.lost = True
            return
        now = self.clock()
        new = dict(current, expires_at=now + self.ttl, renewed_at=now)
        if self._swap(current, etag, new):
            self.doc = new
        else:
            self.lost = True

    def _renew_loop(self) -> None:
        while not self._stop.wait(max(min(self.ttl / 3, heartbeat_interval()), 0.05)):
            try:
                self.renew()
            except Exception:  # noqa: BLE001 - a transient store error: the next renewal retries
                continue
            if self.lost:
                return

    def check(self) -> None:
        """Raise LeaseLost when another run has taken the lease over (call before committing)."""
        if self.lost:
            raise LeaseLost(f"{self.loc.uri(self.path)}: run {self.run_id} lost its lease to another run; "
                            f"not committing")

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        current, etag = self.read()
        if current is not None and current.get("nonce") == self.nonce:
            self._swap(current, etag, None)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

"""The watchdog that stops the local Ray a driver started, when that driver goes away, even by
SIGKILL (which no handler of the driver itself can catch).

``start(ray_pids, session_dir)`` spawns ``python -m hymba_batch.jobs.raywatch`` in a session of its
own (so a signal to the driver's process group does not reach it). The watchdog holds the Ray
instance's own processes (gcs_server, raylet, log monitor, dashboard, ...: the pids the Ray node
reports) and, every poll, their descendants (the raylet's dashboard agent, runtime env agent and
workers). Once the driver's pid is gone it sends SIGTERM to every one of them still alive, then
SIGKILL to those left after a grace period (the agents ignore SIGTERM), and exits. It touches no
other process: only the ones it found under this instance's pids, or whose command line names
this instance's session directory (psutil checks a pid was not reused before signalling).
Knows nothing of jobs or models; does not import Ray.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import psutil

POLL_S = 1.0
GRACE_S = 3.0


def start(ray_pids: list[int], session_dir: str, driver_pid: int | None = None) -> subprocess.Popen:
    """Spawn the watchdog of this driver (default: the calling process) and its local Ray."""
    args = [sys.executable, "-m", "hymba_batch.jobs.raywatch", "--driver-pid", str(driver_pid or os.getpid()),
            "--session-dir", session_dir, *[str(p) for p in ray_pids]]
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def _proc(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _instance(roots: dict[int, psutil.Process], session_dir: str | None) -> dict[int, psutil.Process]:
    """The instance's processes alive now: the roots, their descendants, and (with
    ``session_dir``) processes whose command line names it (left behind by a dead raylet)."""
    found = {}
    for p in roots.values():
        try:
            if p.is_running():
                found[p.pid] = p
                found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            continue
    for p in psutil.process_iter(["cmdline"]) if session_dir else ():
        try:
            if p.pid not in found and any(session_dir in a for a in (p.info["cmdline"] or [])):
                found[p.pid] = p
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return found


def stop_instance(known: dict[int, psutil.Process], session_dir: str, grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM, then after ``grace_s`` SIGKILL, every process of the instance; returns their pids."""
    procs = {**known, **_instance(known, session_dir)}
    alive = []
    for p in procs.values():
        try:
            if p.is_running():  # false for an exited process or a reused pid
                p.terminate()
                alive.append(p)
        except psutil.Error:
            continue
    left = wait_gone(alive, grace_s)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            continue
    wait_gone(left, grace_s)
    return [p.pid for p in alive]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE  # a zombie has exited; init reaps it
    except psutil.Error:
        return False


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` s for ``procs`` to exit; returns those still running."""
    deadline = time.monotonic() + timeout
    left = [p for p in procs if _alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if _alive(p)]
    return left


def watch(driver_pid: int, ray_pids: list[int], session_dir: str, poll_s: float = POLL_S) -> list[int]:
    """Wait for the driver to go, then stop the instance; returns the pids it signalled."""
    driver = _proc(driver_pid)
    roots = {pid: p for pid in ray_pids if (p := _proc(pid)) is not None}
    known: dict[int, psutil.Process] = dict(roots)
    while driver is not None and _alive(driver):
        known.update(_instance(roots, None))  # workers and agents come and go
        time.sleep(poll_s)
    return stop_instance(known, session_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hymba_batch.jobs.raywatch")
    ap.add_argument("--driver-pid", type=int, required=True)
    ap.add_argument("--session-dir", required=True)
    ap.add_argument("ray_pids", type=int, nargs="+")
    a = ap.parse_args(argv)
    watch(a.driver_pid, a.ray_pids, a.session_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

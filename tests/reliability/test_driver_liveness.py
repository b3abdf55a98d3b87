"""One run per output, a heartbeat that tells a dead driver, and a local Ray that dies with its
driver (real ``hymba-batch run`` subprocesses, tiny checkpoint, real local Ray):

- a second run on an output that a live run holds is refused (exit 2, one line naming the
  holder's host, pid and start time, nothing written); with ``--wait`` it waits for the first run,
  then finds the job done and redoes nothing;
- a driver killed by SIGKILL mid-job: the local Ray it started (raylet, gcs_server, dashboard and
  runtime-env agents, workers) is stopped by its watchdog within seconds; ``hymba-batch status``
  says ``dead``; the next run takes over the lease and resumes, doubling nothing;
- ``assess``: a running status whose heartbeat expired is ``stale`` while its lease lives and
  ``dead`` once the lease expired too (a driver on another host).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from invariants import check_output, input_rows, snapshot, status
from jobhelpers import job_dict, write_articles
from hymba_batch.jobs.cli import main
from hymba_batch.jobs.driver import run_job
from hymba_batch.jobs.heartbeat import assess
from hymba_batch.jobs.raywatch import wait_gone
from hymba_batch.jobs.spec import parse_spec

HEARTBEAT_S = "0.3"  # HYMBA_HEARTBEAT_S of these tests: expiry after 6 beats = 1.8 s


def _cli(spec_path: Path, *args: str, **env: str) -> subprocess.Popen:
    e = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    e.update({"HYMBA_HEARTBEAT_S": HEARTBEAT_S, "COLUMNS": "1000"}, **env)
    with open(spec_path.with_suffix(".err"), "w") as err:
        return subprocess.Popen([sys.executable, "-m", "hymba_batch.jobs.cli", "run", str(spec_path),
                                 "--no-progress", *args], env=e, stdout=subprocess.DEVNULL, stderr=err)


def _wait_for(what: str, cond, proc: subprocess.Popen, timeout: float = 180.0):
    """Poll ``cond`` (file reads) until it returns something truthy; fail if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        assert proc.poll() is None, (f"the driver ended before {what}: rc {proc.returncode}\n"
                                     f"{Path(proc.args[4]).with_suffix('.err').read_text()[-3000:]}")
        time.sleep(0.05)  # polling interval for files, not synchronization
    raise AssertionError(f"timed out waiting for {what}")


def _status_with(out: Path, pred):
    p = out / "_hymba" / "status.json"
    try:
        doc = json.loads(p.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return doc if pred(doc) else None


def test_a_second_run_is_refused_or_waits(ray_cluster, tiny_checkpoint, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HYMBA_HEARTBEAT_S", HEARTBEAT_S)
    src, out = tmp_path / "in", tmp_path / "out"
    write_articles(src, files=3, rows=8, row_group_size=4)  # 6 units
    spec = job_dict(tiny_checkpoint, str(src), str(out), task={"max_new_tokens": 8},
                    resources={"num_actors": 1, "max_in_flight": 1, "ray_address": ray_cluster.address})
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    first = _cli(spec_path)
    try:
        _wait_for("the first run holds the output", lambda: _status_with(out, lambda d: d["state"] == "running"), first)
        names = lambda: sorted(p.name for p in (out / "_hymba").iterdir() if p.name != "lease.lock")  # noqa: E731
        before = names()
        assert main(["run", str(spec_path), "--no-progress"]) == 2
        err = capsys.readouterr().err
        (line,) = [ln for ln in err.splitlines() if "holds the lease" in ln]
        assert f"host {socket.gethostname()}, pid {first.pid}, started 20" in line, line
        assert re.search(r"started \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\)", line) and "Traceback" not in err
        assert names() == before and not list(out.glob("part-*"))  # the refused run wrote nothing
        assert main(["run", str(spec_path), "--no-progress", "--wait"]) == 0  # waits for the first run
        err = capsys.readouterr().err
        assert f"waiting for run " in err and f"pid {first.pid}" in err, err
        assert first.wait(timeout=120) == 0
    finally:
        if first.poll() is None:
            first.kill()
        first.wait(timeout=30)
    doc = status(str(out))
    assert doc["state"] == "succeeded" and doc["lease_taken_over"] is None  # released, not taken over
    assert doc["committed_units"] == 6 and doc["committed_rows"] == 24
    check_output(str(out), input_rows(str(src)))


def _ray_instance(session_dir: str) -> dict[int, psutil.Process]:
    """Every process of the local Ray instance with this session dir (and their descendants)."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(session_dir in a for a in (p.info["cmdline"] or [])):
                found[p.pid] = p
                found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            continue
    return found


def test_driver_killed_by_sigkill_its_ray_stops_status_says_dead_and_the_next_run_resumes(
        ray_cluster, tiny_checkpoint, tmp_path, capsys) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    write_articles(src, files=5, rows=8, row_group_size=4)  # 10 units
    spec = job_dict(tiny_checkpoint, str(src), str(out), task={"max_new_tokens": 8},
                    resources={"num_actors": 1, "max_in_flight": 1, "ray_address": "local"},
                    schedule={"lease_ttl": 2})
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    proc = _cli(spec_path)  # ray_address "local": it starts a local Ray of its own
    err_path = spec_path.with_suffix(".err")
    try:
        m = _wait_for("the local Ray starts", lambda: re.search(r"local Ray (\S+) \(stopped with this process; "
                                                               r"watchdog pid (\d+)\)", err_path.read_text()), proc)
        session, watchdog = m.group(1), int(m.group(2))
        running = _wait_for("a unit commits", lambda: _status_with(out, lambda d: d["committed_units"] >= 1), proc)
        assert running["driver"] == {"host": socket.gethostname(), "pid": proc.pid}
        assert abs(running["heartbeat_expires_at"] - running["heartbeat_at"] - 6 * float(HEARTBEAT_S)) < 1e-6
        instance = _ray_instance(session)
        names = {p.name() for p in instance.values() if p.is_running()}
        assert {"raylet", "gcs_server"} <= names, names
        assert any("DashboardAgent" in n for n in names) and any("RuntimeEnvAgent" in n for n in names), names
        others = [psutil.Process(p.process.pid) for node in [ray_cluster.head_node, *ray_cluster.worker_nodes]
                  for p in node.all_processes["raylet"]]  # another Ray instance on this machine
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    alive = wait_gone(list(instance.values()), timeout=30)
    assert not alive, f"processes of the killed driver's Ray still alive: {[(p.pid, p.name()) for p in alive]}"
    try:
        assert not wait_gone([psutil.Process(watchdog)], timeout=10), "the watchdog did not exit"
    except psutil.NoSuchProcess:
        pass  # exited and reaped
    assert all(p.is_running() for p in others), "the watchdog touched another Ray instance"
    assert not _ray_instance(session)

    assert main(["status", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["state"] == "dead" and doc["reported_state"] == "running", doc
    assert f"pid {proc.pid}" in doc["state_reason"] and "resumes" in doc["state_reason"]
    committed = {k: v for k, v in snapshot(str(out)).items() if k.startswith("part-")}
    assert 1 <= len(committed) < 10

    again = run_job(parse_spec(dict(spec, resources=dict(spec["resources"], ray_address=ray_cluster.address))))
    assert again.state == "succeeded" and again.resumed_units == len(committed)
    assert again.resumed_units + again.run_units == 10
    doc = status(str(out))
    assert doc["state"] == "succeeded" and doc["lease_taken_over"] is not None  # the dead run's lease
    after = snapshot(str(out))
    assert {k: after[k] for k in committed} == committed  # committed files untouched
    check_output(str(out), input_rows(str(src)))


def test_status_of_a_driver_elsewhere_is_stale_then_dead() -> None:
    now = 1_000_000.0
    doc = {"state": "running", "driver": {"host": "another-host", "pid": 4242}, "heartbeat_at": now,
           "heartbeat_expires_at": now + 30}
    lease = {"run_id": "r1", "host": "another-host", "pid": 4242, "acquired_at": now - 60, "expires_at": now + 900}
    assert assess(doc, lease, now + 10) == ("running", None)
    state, why = assess(doc, lease, now + 31)
    assert state == "stale" and "another-host" in why and "run r1" in why
    state, why = assess(doc, lease, now + 901)
    assert state == "dead" and "no heartbeat since 1970-01-12T13:46:40Z" in why and "stale (expired)" in why
    assert assess(doc, None, now + 31)[0] == "dead"
    assert assess(dict(doc, state="succeeded"), None, now + 10_000) == ("succeeded", None)
    old = {"state": "running"}  # written before heartbeats existed: left as it is
    assert assess(old, None, now) == ("running", None)

"""Run one job on a fresh local Ray of its own whose metrics export port is known, and read the
job's metrics back from that port, Ray's Prometheus endpoint (run as a subprocess: a process
joins one Ray at a time, and the test session's cluster must not be disturbed).

    python metrics_job.py SPEC.json RESULT.json

Ray reports metrics every 200 ms here (``RAY_metrics_report_interval_ms``) and the actors poll
their engine every 200 ms (``HYMBA_METRICS_INTERVAL_S``). When the first unit commits, the
driver's progress hook polls the endpoint until the rows counter shows it (the job is still
running then: the other units wait); after the job, until the counter reaches the job's committed
rows and the driver's counters are there (each wait at most 30 s). RESULT.json gets the job
summary and both scrapes (text).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def rows_of(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("ray_hymba_rows_total{"))


def main() -> None:
    spec_path, result_path = sys.argv[1], sys.argv[2]
    os.environ.update({"RAY_metrics_report_interval_ms": "200", "HYMBA_METRICS_INTERVAL_S": "0.2",
                       "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    import ray

    from hymba_batch.jobs.driver import run_job
    from hymba_batch.jobs.spec import parse_spec

    spec = parse_spec(json.loads(Path(spec_path).read_text()))
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayo-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=port,
             _temp_dir=temp_dir)
    during: dict = {}

    class ScrapeWhileRunning:  # the driver's progress hook: the job is mid-way when it runs
        def start(self, total_rows: int, done_rows: int) -> None: ...
        def update(self, done_rows: int, new_tokens: int) -> None:
            if not during:
                during["rows"] = done_rows
                during["metrics"] = wait_for(lambda text: rows_of(text) >= done_rows)

        def stop(self) -> None: ...

    def wait_for(ok) -> str:
        deadline = time.monotonic() + 30
        text = scrape(port)
        while not ok(text) and time.monotonic() < deadline:
            time.sleep(0.2)  # polling Ray's export until the next report arrives
            text = scrape(port)
        return text

    t0 = time.monotonic()
    summary = run_job(spec, reporter=ScrapeWhileRunning())
    t1 = time.monotonic()
    text = wait_for(lambda text: rows_of(text) >= summary.committed_rows and
                    ("ray_hymba_units_quarantined_total{" in text or not summary.failed_units))
    Path(result_path).write_text(json.dumps({"summary": dataclasses.asdict(summary), "metrics": text,
                                              "port": port, "during": during, "job_s": t1 - t0, "wait_s": time.monotonic() - t1,
                                             "ports": [n["MetricsExportPort"] for n in ray.nodes()]}))
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

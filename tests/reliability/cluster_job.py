"""Run one job on a fresh multi-node local Ray cluster of its own, and optionally remove a
worker node midway (run as a subprocess: a process joins one Ray cluster at a time, and the
test session's cluster must not be disturbed).

    python cluster_job.py SPEC.json RESULT.json [--nodes N] [--cpus C] [--remove-after-units K]

The head has no CPUs, so every actor runs on a worker node. With ``--remove-after-units K``
a watcher removes the last worker node (SIGKILL of its raylet and workers, like a lost spot
instance) once K units are committed and that node's actor is mid-unit (it holds its
``HYMBA_FAULT_BUSY_DIR`` marker). RESULT.json gets the job summary, the removal record,
and the peak RSS of the driver and of the actor processes (for the soak test).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("result")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--remove-after-units", type=int, default=0)
    args = ap.parse_args()

    import psutil
    import ray
    from ray.cluster_utils import Cluster

    from hymba_batch.jobs.driver import run_job
    from hymba_batch.jobs.spec import parse_spec

    spec = parse_spec(json.loads(Path(args.spec).read_text()))
    busy_dir = Path(args.result).parent / "busy"
    if args.remove_after_units:  # set before the nodes start: their workers inherit it
        busy_dir.mkdir(exist_ok=True)
        os.environ["HYMBA_FAULT_BUSY_DIR"] = str(busy_dir)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=args.cpus) for _ in range(args.nodes)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    result: dict = {"removed": None}
    done = threading.Event()
    me = psutil.Process()
    peaks = {"driver_rss": me.memory_info().rss, "driver_rss_start": me.memory_info().rss, "actor_rss": 0}

    def watch() -> None:
        status = Path(spec.output.uri) / "_hymba" / "status.json"
        tick = 0
        while not done.wait(0.02):  # polling interval of the watcher, not a synchronization
            tick += 1
            if tick % 25 == 0:  # memory twice a second
                peaks["driver_rss"] = max(peaks["driver_rss"], me.memory_info().rss)
                for p in me.children(recursive=True):
                    try:
                        if " ".join(p.cmdline()).startswith("ray::InferenceActor"):
                            peaks["actor_rss"] = max(peaks["actor_rss"], p.memory_info().rss)
                    except (psutil.Error, OSError):
                        pass
            if args.remove_after_units and result["removed"] is None and status.exists():
                try:
                    doc = json.loads(status.read_text())
                except ValueError:
                    continue
                node = workers[-1]
                busy = busy_dir / f"busy-{node.node_id}"
                if doc["committed_units"] >= args.remove_after_units and busy.exists():
                    try:
                        pid = int(busy.read_text())
                    except (OSError, ValueError):  # the unit ended meanwhile, or the pid is not written yet
                        continue
                    result["removed"] = {"node_id": node.node_id, "committed_units": doc["committed_units"],
                                         "at": time.time()}
                    # the whole node goes at once: its busy actor first (a worker outlives its raylet
                    # for a moment and could still finish the unit), then the raylet and the rest
                    os.kill(pid, signal.SIGKILL)
                    cluster.remove_node(node, allow_graceful=False)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.time()
    try:
        summary = run_job(spec)
    finally:
        done.set()
        watcher.join(timeout=10)
    result["summary"] = dataclasses.asdict(summary)
    result["wall_s"] = time.time() - t0
    result["worker_node_ids"] = [n.node_id for n in workers]
    result.update(peaks)
    Path(args.result).write_text(json.dumps(result))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main()

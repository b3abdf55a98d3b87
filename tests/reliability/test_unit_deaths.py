"""A unit's failure never takes the job (or the driver) down, on a real local Ray:

- a real memory-monitor kill: a local Ray whose memory threshold is set just above the machine's
  current use, and a unit whose actor allocates until it is killed (Ray reports OutOfMemoryError);
- an actor killed by SIGKILL on one unit every time (what Ray's memory monitor and the kernel's
  OOM killer do to a process that grew too big), run through the real ``hymba-batch run``: the
  unit is retried, then quarantined with a one-line reason in the summary and ``status.json``;
  exit code 1, no traceback, every other row committed;
- any other ``RayError`` of a dead worker (``OutOfMemoryError``, ``WorkerCrashedError``, ...)
  becomes the same one-line ``actor died: ...`` reason;
- a row so long that even alone it cannot fit the engine's cache is that row's ``error``, not
  the unit's: through the prompt builder's limit (a job end to end), and when a prompt does get
  to an engine that cannot hold it (the engine's own rejection, through the real actor class).
"""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from ray.exceptions import OutOfMemoryError, WorkerCrashedError

from invariants import check_output, input_rows, job, status
from jobhelpers import job_dict, write_articles
from hymba_batch.jobs.driver import actor_config, plan_job, run_job
from hymba_batch.jobs.spec import parse_spec
from hymba_batch.pipeline.commit import JobOutput
from hymba_batch.workers.actor import HOG_UNIT_ENV, KILL_UNIT_ENV, InferenceActor
from hymba_batch.workers.pool import ActorPool, PoolConfig, death_reason


def test_actor_killed_on_a_unit_every_time_is_retried_then_quarantined(ray_cluster, tiny_checkpoint,
                                                                       tmp_path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    total = write_articles(src, files=2, rows=8, row_group_size=4)  # 4 units of 4 rows
    spec = job_dict(tiny_checkpoint, str(src), str(out),
                    resources={"num_actors": 1, "max_in_flight": 1, "max_attempts": 2,
                               "ray_address": ray_cluster.address})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    victim = plan_job(parse_spec(spec)).units[1].unit_id
    env = dict(os.environ, **{KILL_UNIT_ENV: victim, "COLUMNS": "1000"})
    proc = subprocess.run([sys.executable, "-m", "hymba_batch.jobs.cli", "run", str(tmp_path / "job.yaml"),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if victim in ln]
    assert len(lines) == 1 and victim in lines[0] and "after 2 tries: actor died: ActorDiedError" in lines[0], \
        proc.stdout
    doc = status(str(out))
    assert doc["state"] == "failed" and doc["committed_rows"] == total - 4 and doc["failed_rows"] == 4
    (failed,) = doc["failed_units"]
    assert failed["unit_id"] == victim and failed["attempts"] == 2
    assert failed["error"].startswith("actor died: ActorDiedError: ") and "\n" not in failed["error"]
    assert len(failed["error"]) < 400 and failed["error"] in lines[0]
    got = check_output(str(out), input_rows(str(src)), complete=False)
    assert sum(got["rows"].values()) == total - 4


def test_ray_memory_monitor_kill_is_retried_then_quarantined(tiny_checkpoint, tmp_path) -> None:
    """The real thing: ``hymba-batch run`` starts its own local Ray whose memory monitor kills a
    worker once the machine's memory use passes today's use + 3 GiB; one unit's actor allocates
    memory until it is killed. Ray reports ``OutOfMemoryError`` (not an actor error): the unit is
    retried, then quarantined with a one-line reason; exit 1, no traceback, the rest commits."""
    vm = psutil.virtual_memory()
    threshold = (vm.total - vm.available + (3 << 30)) / vm.total
    assert threshold < 0.95, f"this machine has too little free memory for the test ({vm.available >> 20} MiB)"
    src, out = tmp_path / "in", tmp_path / "out"
    total = write_articles(src, files=1, rows=12, row_group_size=4)  # 3 units
    spec = job_dict(tiny_checkpoint, str(src), str(out),
                    resources={"num_actors": 1, "max_in_flight": 1, "max_attempts": 2, "ray_address": "local"})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    victim = plan_job(parse_spec(spec)).units[1].unit_id
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({HOG_UNIT_ENV: victim, "COLUMNS": "1000", "RAY_memory_usage_threshold": f"{threshold:.4f}",
                "RAY_memory_monitor_refresh_ms": "50"})
    proc = subprocess.run([sys.executable, "-m", "hymba_batch.jobs.cli", "run", str(tmp_path / "job.yaml"),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if victim in ln]
    assert len(lines) == 1, f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
    line = lines[0]
    assert "after 2 tries: actor died: OutOfMemoryError: " in line, line
    doc = status(str(out))
    (failed,) = doc["failed_units"]
    assert failed["unit_id"] == victim and failed["error"].startswith("actor died: OutOfMemoryError: ")
    assert "\n" not in failed["error"] and doc["committed_rows"] == total - 4
    check_output(str(out), input_rows(str(src)), complete=False)


def test_units_that_kill_their_actor_never_exhaust_the_restart_limit(ray_cluster, tiny_checkpoint, tmp_path,
                                                                      monkeypatch) -> None:
    """Three units in a row kill their actor; the pool may replace actors only twice in a row
    without progress, but each quarantined unit is progress: the fourth unit still commits."""
    src, out = tmp_path / "in", tmp_path / "out"
    write_articles(src, files=1, rows=16, row_group_size=4)  # 4 units
    spec = parse_spec(job_dict(tiny_checkpoint, str(src), str(out)))
    plan = plan_job(spec)
    JobOutput(str(out), "parquet").prepare(plan.fingerprint, plan.parts, False)
    killers = [u.unit_id for u in plan.units[:3]]
    monkeypatch.setenv(KILL_UNIT_ENV, ",".join(killers))
    pool = ActorPool(actor_config(spec, "cpu", 1), PoolConfig(num_actors=1, max_in_flight=1, max_attempts=1,
                                                             max_actor_restarts=2))
    done, failed = [], []
    try:
        pool.run(plan.units, done.append, failed.append)
    finally:
        pool.shutdown()
    assert [f.unit_id for f in failed] == killers and all(f.error.startswith("actor died: ") for f in failed)
    assert [r.unit_id for r in done] == [plan.units[3].unit_id] and pool.restarts == 3


def test_any_dead_worker_error_is_one_line() -> None:
    """Ray's errors for a process that is gone run to dozens of lines; the reason is one."""
    oom = OutOfMemoryError("Task was killed due to the node running low on memory.\nMemory on the node "
                           "(IP: 10.0.0.1, ID: abc) where the task (actor ID: 1) was running was 21.5GB / "
                           "22GB (0.977), which exceeds the memory usage threshold of 0.95.\n" + "detail\n" * 40)
    assert death_reason(oom) == "OutOfMemoryError: Task was killed due to the node running low on memory"
    crashed = WorkerCrashedError()
    line = death_reason(crashed)
    assert line.startswith("WorkerCrashedError: ") and "\n" not in line and len(line) < 400


def test_a_row_too_long_for_the_cache_is_that_rows_error(ray_cluster, tiny_checkpoint, tmp_path) -> None:
    """A 3 MiB cache; ``truncation: error``: the long row becomes a row error naming the
    limit; the unit and job succeed and every other row is generated."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    long_text = " ".join(f"word{i}" for i in range(20_000))
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["short one", long_text, "short two"]}), src / "a.parquet")
    spec = parse_spec(job(tiny_checkpoint, str(src), str(out), model={"cache_budget_mb": 3},
                          task={"max_new_tokens": 2, "truncation": "error"}))
    summary = run_job(spec)
    assert summary.state == "succeeded" and summary.committed_rows == 3 and summary.error_rows == 1
    got = check_output(str(out), input_rows(str(src)))
    (t,) = got["tables"].values()
    errors = t.column("error").to_pylist()
    assert errors[0] is None and errors[2] is None
    assert errors[1].startswith("prompt is ") and "over the limit of" in errors[1], errors[1]
    assert t.column("completion_tokens").to_pylist() == [2, 0, 2]


def test_a_prompt_the_engine_cannot_hold_is_that_rows_error(ray_cluster, tiny_checkpoint, tmp_path) -> None:
    """The real actor class with a 3 MiB cache, its prompt limit lifted so that a long prompt
    reaches the engine: the engine rejects it (it can never fit the cache) and the pipeline
    writes that as the row's error; the unit commits with the other rows generated."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    long_text = " ".join(f"word{i}" for i in range(6_000))
    pq.write_table(pa.table({"id": [1, 2], "text": [long_text, "short"]}), src / "a.parquet")
    spec = parse_spec(job(tiny_checkpoint, str(src), str(out), model={"cache_budget_mb": 3},
                          task={"kind": "generate", "max_new_tokens": 2}))
    plan = plan_job(spec)
    JobOutput(str(out), "parquet").prepare(plan.fingerprint, plan.parts, False)
    actor = InferenceActor(actor_config(spec, "cpu", 1))
    limit = actor.runner.prompts.limit
    assert limit < 6_000 < actor.engine.max_prompt_tokens, (limit, actor.engine.max_prompt_tokens)
    actor.runner.prompts.limit = actor.engine.max_prompt_tokens  # as if the actor misjudged its cache
    (unit,) = plan.units
    res = actor.process(unit)
    assert res.rows == 2 and res.error_rows == 1
    t = pq.read_table(res.output_path)
    err = t.column("error").to_pylist()
    assert err[0] is not None and "cache cannot hold this request" in err[0], err
    assert err[1] is None and t.column("completion_tokens").to_pylist() == [0, 2]
    assert t.column("finish_reason").to_pylist()[0] == "error"

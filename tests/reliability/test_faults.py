"""Faults injected into real jobs (tiny checkpoint, real Ray, real S3 API on loopback), each
followed by the shared output invariants and a re-run that must change nothing:

- a worker node removed from a multi-node Ray cluster mid-job (its own cluster, in a subprocess);
- S3 throttling (503 SlowDown), 500s, connection resets and a slow endpoint, injected by the
  fault proxy in front of the S3 server: retries with backoff absorb them;
- S3 errors that outlive the retries: the unit is quarantined with an error naming the key,
  nothing committed is touched, and a later run finishes the job;
- an engine that runs out of cache memory: preemption recovers, no hang;
- poison units (one whose input is corrupt, one that kills its actor every time): quarantined
  after ``max_attempts`` tries with their errors; every other unit commits; no manifest.

Covered elsewhere (not repeated here): an actor killed mid-unit
(tests/workers/test_pool.py), the driver killed and the job resumed (tests/jobs/test_e2e.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq

from invariants import check_output, input_rows, job, snapshot, status
from jobhelpers import job_dict, write_articles
from hymba_batch.jobs.driver import JobSummary, plan_job, run_job
from hymba_batch.jobs.spec import parse_spec
from hymba_batch.workers.actor import POISON_UNIT_ENV

HERE = Path(__file__).resolve().parent


def run_bounded(spec, timeout: float = 240.0, **kw) -> JobSummary:
    """run_job, failing the test (instead of hanging the suite) if it does not end in time."""
    box: dict = {}

    def target() -> None:
        try:
            box["summary"] = run_job(spec, **kw)
        except BaseException as e:  # handed to the test thread below
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"the job did not finish within {timeout} s (a hang)"
    if "error" in box:
        raise box["error"]
    return box["summary"]


def rerun_changes_nothing(spec, uri: str, state: str = "succeeded") -> None:
    before = snapshot(uri)
    again = run_bounded(spec)
    assert again.state == state
    if state == "succeeded":
        assert again.run_units == 0 and again.resumed_units == again.total_units
    after = snapshot(uri)
    assert after == before, f"a re-run changed files: {sorted(set(after.items()) ^ set(before.items()))[:4]}"


def test_worker_node_removed_mid_job(tiny_checkpoint, tmp_path) -> None:
    """Two worker nodes of one CPU, one actor each; the second node is killed once two units
    are in. Its actor's unit is retried on the surviving actor; the replacement actor cannot be
    placed (no free CPU left), and must not hold any unit while it waits."""
    src, out = tmp_path / "in", tmp_path / "out"
    write_articles(src, files=6, rows=8, row_group_size=4)  # 12 units
    spec = job_dict(tiny_checkpoint, str(src), str(out), task={"max_new_tokens": 12},
                    resources={"num_actors": 2, "max_in_flight": 1})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(HERE / "cluster_job.py"), str(tmp_path / "spec.json"),
                           str(tmp_path / "result.json"), "--nodes", "2", "--cpus", "1",
                           "--remove-after-units", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "result.json").read_text())
    s = res["summary"]
    assert res["removed"] is not None, "the node was never removed"
    assert res["removed"]["committed_units"] < 12, "the node was removed after the job's work was done"
    assert s["state"] == "succeeded", s
    assert s["actor_restarts"] >= 1 and s["retried_units"] >= 1, s  # the removed node's actor died mid-unit
    assert res["removed"]["node_id"] in s["nodes"]  # it had committed units before it went away
    check_output(str(out), input_rows(str(src)))
    rerun_changes_nothing(parse_spec(spec), str(out))


def _upload_articles(s3, bucket: str, tmp_path: Path, files: int) -> None:
    write_articles(tmp_path / "art", files=files, rows=8, row_group_size=4)
    for f in sorted((tmp_path / "art").iterdir()):
        s3.upload_file(str(f), bucket, f"in/{f.name}")


def test_s3_throttling_errors_resets_and_slowness_are_retried(ray_cluster, tiny_checkpoint, s3_bucket, fault_proxy,
                                                              tmp_path, monkeypatch) -> None:
    s3 = boto3.client("s3")
    _upload_articles(s3, s3_bucket, tmp_path, files=2)
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.endpoint)  # driver and (forwarded) actors
    b = s3_bucket
    rules = [
        fault_proxy.add("503", "GET", rf"^/{b}/in/part-", first=3),  # footers and row groups
        fault_proxy.add("reset", "HEAD", rf"^/{b}/in/part-", first=2),  # the reader's file check
        fault_proxy.add("slow", "GET", rf"^/{b}/in/part-1", first=1, delay_s=4.0),  # past the 3 s timeout
        fault_proxy.add("500", "PUT", rf"^/{b}/out/_hymba/tmp/part-", first=2),  # unit uploads
        fault_proxy.add("503", "PUT", rf"^/{b}/out/part-", first=2),  # server-side copy to the final key
        fault_proxy.add("503", "PUT", rf"^/{b}/out/_hymba/(tmp/)?(status|job|manifest)", first=3),
        fault_proxy.add("reset", "GET", rf"^/{b}/?\?.*list-type", first=1),  # listings
    ]
    uri = f"s3://{b}/out"
    spec = parse_spec(job_dict(tiny_checkpoint, f"s3://{b}/in/", uri))
    summary = run_bounded(spec)
    assert summary.state == "succeeded" and not summary.failed_units
    assert summary.retried_units == 0  # S3 retries absorbed every fault below the unit level
    assert [r.fired for r in rules] == [3, 2, 1, 2, 2, 3, 1], [(r.kind, r.path, r.matched) for r in rules]
    fault_proxy.clear()
    check_output(uri, input_rows(f"s3://{b}/in/"))
    rerun_changes_nothing(spec, uri)


def test_s3_errors_beyond_the_retries_fail_the_unit_clearly(ray_cluster, tiny_checkpoint, s3_bucket, fault_proxy,
                                                            tmp_path, monkeypatch) -> None:
    s3 = boto3.client("s3")
    _upload_articles(s3, s3_bucket, tmp_path, files=2)
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # forwarded to the actors too
    uri = f"s3://{s3_bucket}/out"
    spec = parse_spec(job_dict(tiny_checkpoint, f"s3://{s3_bucket}/in/", uri, resources={"max_attempts": 2}))
    victim = plan_job(spec).units[1].unit_id
    rule = fault_proxy.add("503", "PUT", rf"/out/_hymba/tmp/part-{victim}", always=True)
    summary = run_bounded(spec)
    assert summary.state == "failed"
    assert [f["unit_id"] for f in summary.failed_units] == [victim]
    err = summary.failed_units[0]["error"]
    assert f"part-{victim}" in err and s3_bucket in err and "AWS Error" in err and "UploadPart" in err, err
    assert rule.fired >= 2 * 2  # two tries per request (AWS_MAX_ATTEMPTS), two tries of the unit
    doc = status(uri)
    assert doc["state"] == "failed" and doc["failed_units"][0]["unit_id"] == victim
    assert doc["failed_units"][0]["error"] == err
    fault_proxy.clear()
    expected = input_rows(f"s3://{s3_bucket}/in/")
    got = check_output(uri, expected, complete=False)
    assert sum(got["rows"].values()) == sum(expected.values()) - 4  # everything but the victim's 4 rows
    committed = {k: v for k, v in snapshot(uri).items() if k.startswith("part-")}
    healed = run_bounded(spec)  # the store is healthy again: only the failed unit runs
    assert healed.state == "succeeded" and healed.run_units == 1
    assert {k: v for k, v in snapshot(uri).items() if k in committed} == committed
    check_output(uri, expected)


def test_engine_out_of_cache_memory_recovers_by_preemption(ray_cluster, tiny_checkpoint, tmp_path) -> None:
    """8 MiB of cache: 2 sequence slots and 108 blocks of 64 tokens. Two prompts of exactly
    54 blocks fill the pool at prefill; the first decode step needs a block, so the engine
    must preempt the other sequence and recompute it later."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    texts = [" ".join(f"w{i}x{j}" for j in range(3000)) for i in range(2)]
    pq.write_table(pa.table({"id": [0, 1], "text": texts}), src / "long.parquet")
    spec = parse_spec(job(tiny_checkpoint, str(src), str(out), model={"cache_budget_mb": 8, "max_num_seqs": 2},
                               task={"kind": "generate", "max_new_tokens": 2, "max_input_tokens": 3456,
                                     "truncation": "tail"},
                               input={"rows_per_unit": 2}))
    summary = run_bounded(spec, timeout=240)
    assert summary.state == "succeeded", summary.failed_units
    got = check_output(str(out), input_rows(str(src)))
    (entry,) = got["manifest"]["files"]
    assert entry["timings"]["engine_preemptions"] >= 1, entry["timings"]
    (t,) = got["tables"].values()
    assert t.column("prompt_tokens").to_pylist() == [3456, 3456]
    assert t.column("completion_tokens").to_pylist() == [2, 2] and t.column("error").null_count == 2
    rerun_changes_nothing(spec, str(out))


def test_poison_units_are_quarantined_and_the_rest_commits(ray_cluster, tiny_checkpoint, parquet_testing,
                                                           tmp_path, monkeypatch) -> None:
    """One actor, two units in flight. A real corrupt file (its footer is fine, its dictionary
    page header is not) fails by exception; then a unit that kills its actor every time is
    dispatched next to an innocent unit: the first death takes both, the innocent one must be
    retried alone and commit, and only the poison unit is charged and quarantined."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    shutil.copy(parquet_testing / "bad_data" / "ARROW-RS-GH-6229-DICTHEADER.parquet", src / "aa-corrupt.parquet")
    for f in range(2):
        pq.write_table(pa.table({"nation_key": pa.array(range(f * 8, f * 8 + 8), pa.int32()),
                                 "name": [f"nation {i} of the world" for i in range(f * 8, f * 8 + 8)]}),
                       src / f"good-{f}.parquet", row_group_size=4)
    spec = parse_spec(job(tiny_checkpoint, str(src), str(out), task={"max_new_tokens": 8},
                          input={"text_column": "name", "id_column": None, "rows_per_unit": 32},
                          resources={"num_actors": 1, "max_in_flight": 2, "max_attempts": 2}))
    corrupt, innocent, poison = [u.unit_id for u in plan_job(spec).units]
    monkeypatch.setenv(POISON_UNIT_ENV, poison)  # every actor that starts it dies at once
    summary = run_bounded(spec)
    assert summary.state == "failed"
    failed = {f["unit_id"]: f for f in summary.failed_units}
    assert set(failed) == {corrupt, poison}, "an innocent unit was quarantined, or a poison unit was not"
    assert all(f["attempts"] == 2 for f in failed.values())
    assert failed[poison]["error"].startswith("actor died")
    assert "aa-corrupt.parquet" in failed[corrupt]["error"] and "cannot read" in failed[corrupt]["error"]
    assert summary.actor_restarts == 3  # one death with both units in flight, then two alone
    doc = status(str(out))
    assert doc["state"] == "failed" and {f["unit_id"] for f in doc["failed_units"]} == set(failed)
    assert doc["failed_rows"] == 25 + 8 and doc["committed_rows"] == 8
    expected = input_rows(str(src))
    got = check_output(str(out), expected, complete=False)
    assert sum(got["rows"].values()) == 8
    committed = snapshot(str(out))
    monkeypatch.delenv(POISON_UNIT_ENV)  # the cause is fixed: a re-run runs only the failed units
    again = run_bounded(spec)
    assert again.state == "failed" and again.run_units == 1 and [f["unit_id"] for f in again.failed_units] == [corrupt]
    after = snapshot(str(out))
    assert {k: after[k] for k in committed} == committed  # committed files untouched
    assert sum(check_output(str(out), expected, complete=False)["rows"].values()) == 16

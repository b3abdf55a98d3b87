"""Incremental runs on the real local Ray cluster: files added between runs, a changed file
(its old rows replaced, never duplicated), a run with nothing new (through the CLI's bounded
``--every`` loop), an overlapping run refused by the lease, a crashed run's lease taken over,
the lease's conditional create and a whole incremental job on the loopback S3 API (a crashed run's
orphan part removed), and the ``--every`` schedule itself."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from jobhelpers import job_dict, write_articles
from hymba_batch.jobs.cli import every_loop, main
from hymba_batch.jobs.driver import run_job
from hymba_batch.jobs.spec import SpecError, parse_duration, parse_spec
from hymba_batch.pipeline.commit import OutputConflict
from hymba_batch.pipeline.lease import Lease, LeaseHeld, is_stale


def _manifest(out: Path, run_id: str | None = None) -> dict:
    path = out / "_hymba" / ("manifest.json" if run_id is None else f"runs/{run_id}/manifest.json")
    return json.loads(path.read_text())


def _dataset(out: Path) -> pa.Table:
    return ds.dataset(str(out), format="parquet").to_table()


def _parts_on_disk(out: Path) -> set[str]:
    return {p.name for p in out.glob("part-*.parquet")}


@pytest.fixture()
def restore_sigterm():
    saved = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, saved)


def test_new_and_changed_files_across_runs(ray_cluster, tiny_checkpoint, tmp_path, restore_sigterm) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    write_articles(src, files=2, rows=8, row_group_size=4)
    spec = parse_spec(job_dict(tiny_checkpoint, str(src), str(out), schedule={"incremental": True}))

    first = run_job(spec, run_id="r1")
    assert first.state == "succeeded" and (first.new_files, first.changed_files) == (2, 0)
    assert _manifest(out, "r1")["committed_rows"] == 16 and (out / "_SUCCESS").exists()

    # a third file lands: the second run processes only it
    pq.write_table(pa.table({"id": list(range(100, 106)), "text": [f"New article {i}." for i in range(6)]}),
                   src / "part-2.parquet", row_group_size=3)
    second = run_job(spec, run_id="r2")
    m2 = _manifest(out, "r2")
    assert (second.new_files, second.unchanged_files, second.run_units) == (1, 2, 2)
    assert m2["committed_rows"] == 6 and m2["new_files"] == [str(src / "part-2.parquet")]
    assert {f["source_file"] for f in m2["files"]} == {str(src / "part-2.parquet")}
    t = _dataset(out)
    assert t.num_rows == 22 and sorted(t.column("id").to_pylist()) == list(range(16)) + list(range(100, 106))
    top = _manifest(out)
    assert top["latest_run"] == "r2" and top["committed_rows"] == 22 and top["runs"] == 2
    assert {f["path"] for f in top["files"]} == _parts_on_disk(out)

    # part-0 is rewritten with other rows: re-processed, its old rows replaced, not duplicated
    old_parts = set(json.loads((out / "_hymba" / "state.json").read_text())["files"][str(src / "part-0.parquet")]["parts"])
    pq.write_table(pa.table({"id": [500, 501, 502], "text": ["Changed one.", "Changed two.", "Changed three."]}),
                   src / "part-0.parquet")
    third = run_job(spec, run_id="r3")
    m3 = _manifest(out, "r3")
    assert (third.new_files, third.changed_files, third.unchanged_files) == (0, 1, 2)
    assert m3["committed_rows"] == 3 and set(m3["superseded_parts"]) == old_parts
    assert not old_parts & _parts_on_disk(out)
    t = _dataset(out)
    ids = sorted(t.column("id").to_pylist())
    assert ids == list(range(8, 16)) + list(range(100, 106)) + [500, 501, 502]
    pairs = list(zip(t.column("_source_file").to_pylist(), t.column("_source_row").to_pylist()))
    assert len(pairs) == len(set(pairs)) == 17
    top = _manifest(out)
    assert top["committed_rows"] == 17 and {f["path"] for f in top["files"]} == _parts_on_disk(out)

    # nothing new: one bounded iteration of the --every loop through the CLI does no work
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(job_dict(tiny_checkpoint, str(src), str(out))))
    before = _parts_on_disk(out)
    rc = main(["run", str(spec_path), "--incremental", "--every", "1h", "--max-iterations", "1", "--no-progress"])
    assert rc == 0 and _parts_on_disk(out) == before
    status = json.loads((out / "_hymba" / "status.json").read_text())
    assert status["state"] == "succeeded" and status["total_rows"] == 0 and status["unchanged_files"] == 3
    assert _manifest(out)["runs"] == 4 and _manifest(out, status["run_id"])["committed_rows"] == 0

    # a changed prompt is still a different job: refused, incremental or not
    with pytest.raises(OutputConflict, match="changed: prompt"):
        run_job(parse_spec(job_dict(tiny_checkpoint, str(src), str(out), task={"prompt": "Other."}),
                           ["schedule.incremental=true"]))


def test_overlapping_run_is_refused(tiny_checkpoint, tmp_path, restore_sigterm) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    write_articles(src, files=1, rows=4)
    spec = parse_spec(job_dict(tiny_checkpoint, str(src), str(out), schedule={"incremental": True}))
    with Lease(str(out), "running-run", ttl_s=600):
        with pytest.raises(LeaseHeld, match="running-run"):
            run_job(spec)
        spec_path = tmp_path / "job.yaml"
        spec_path.write_text(yaml.safe_dump(job_dict(tiny_checkpoint, str(src), str(out))))
        assert main(["run", str(spec_path), "--incremental", "--no-progress"]) == 3
        assert sorted(p.name for p in (out / "_hymba").iterdir()) == ["lease.json"]  # nothing else touched
    assert not (out / "_hymba" / "lease.json").exists()  # released


def test_crashed_runs_lease_is_taken_over(ray_cluster, tiny_checkpoint, tmp_path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    total = write_articles(src, files=1, rows=4)
    # a run that crashes while holding the lease (killed: no release, no cleanup)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from hymba_batch.pipeline.lease import Lease\n"
        f"Lease({str(out)!r}, 'crashed-run', 3600).acquire(); print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        holder.kill()
        holder.wait(timeout=30)
    lease_doc = json.loads((out / "_hymba" / "lease.json").read_text())
    assert lease_doc["run_id"] == "crashed-run" and is_stale(lease_doc) == "holder gone"
    spec = parse_spec(job_dict(tiny_checkpoint, str(src), str(out), schedule={"incremental": True}))
    summary = run_job(spec, run_id="after-crash")
    assert summary.state == "succeeded" and summary.committed_rows == total
    m = _manifest(out, "after-crash")
    assert m["lease_taken_over"]["run_id"] == "crashed-run" and m["lease_taken_over"]["stale"] == "holder gone"
    assert not (out / "_hymba" / "lease.json").exists()


def test_lease_expiry_and_takeover_rules(tmp_path) -> None:
    out = str(tmp_path / "out")
    now = time.time()
    assert is_stale({"expires_at": now - 1, "host": "elsewhere", "pid": 1}, now) == "expired"
    assert is_stale({"expires_at": now + 60, "host": "elsewhere", "pid": 1}, now) is None
    a = Lease(out, "a", ttl_s=0.3).acquire()
    with pytest.raises(LeaseHeld):
        Lease(out, "b", ttl_s=60).acquire()
    a._stop.set()  # a hangs: it stops renewing, so its lease expires
    a._thread.join()
    deadline = time.monotonic() + 10
    while is_stale(a.read()[0]) is None and time.monotonic() < deadline:
        time.sleep(0.05)  # waiting for the clock to pass expires_at
    b = Lease(out, "b", ttl_s=60).acquire()
    assert b.took_over["run_id"] == "a" and b.took_over["stale"] == "expired"
    a.renew()
    assert a.lost
    with pytest.raises(Exception, match="lost its lease"):
        a.check()
    a.release()  # not ours any more: must not delete b's lease
    assert b.read()[0]["run_id"] == "b"
    b.release()
    assert b.read() == (None, None)


def test_lease_on_s3_uses_conditional_puts(s3_bucket) -> None:
    uri = f"s3://{s3_bucket}/out/"
    a = Lease(uri, "a", ttl_s=600).acquire()
    with pytest.raises(LeaseHeld, match="run a"):
        Lease(uri, "b", ttl_s=600).acquire()
    etag = a.etag
    a.renew()  # compare-and-swap on the etag
    assert not a.lost and a.etag != etag and a.read()[0]["renewed_at"] > 0
    # a's lease, as found by a taker after it expired, then renewed by a in between: the swap fails
    stale, stale_etag = a.read()
    assert b_swap_fails(uri, stale | {"expires_at": 0}, stale_etag)
    a.release()
    assert a.read() == (None, None)
    c = Lease(uri, "c", ttl_s=600).acquire()
    assert c.took_over is None
    c.release()


def b_swap_fails(uri: str, seen: dict, seen_etag: str) -> bool:
    """A taker that read the lease at ``seen_etag``: after the holder renews, its swap is refused."""
    holder = Lease(uri, "holder", ttl_s=600)
    holder.nonce = seen["nonce"]
    holder.renew()  # the holder renews: the etag changes
    taker = Lease(uri, "taker", ttl_s=600)
    return taker._swap(seen, seen_etag, taker._doc()) is False and holder.read()[0]["nonce"] == seen["nonce"]


def test_every_parsing_and_schedule() -> None:
    assert [parse_duration(x) for x in ("90", "45s", "30m", "1h", "1h30m", "2d")] == [90, 45, 1800, 3600, 5400, 172800]
    for bad in ("", "0", "soon", "1y", "-5m"):
        with pytest.raises(ValueError, match="duration|zero"):
            parse_duration(bad)
    clock = [0.0]
    sleeps: list[float] = []
    durations = iter([10.0, 130.0, 5.0])  # the second run overruns two ticks

    def run_once() -> int:
        clock[0] += next(durations)
        return 0

    def sleep(s: float) -> None:
        sleeps.append(s)
        clock[0] += s

    assert every_loop(run_once, 60, max_iterations=3, sleep=sleep, clock=lambda: clock[0], say=lambda m: None) == 0
    assert sleeps == [50.0, 50.0]  # ticks at 60, then 240: the run from 60 to 190 missed 120 and 180

    def interrupted(s: float) -> None:
        raise KeyboardInterrupt

    assert every_loop(lambda: 0, 60, sleep=interrupted, clock=lambda: 0.0, say=lambda m: None) == 130
    # a failed run (an exit code, or an exception) does not end the loop: the next tick runs again
    outcomes = iter([2, RuntimeError("S3 is down"), 0])
    said: list[str] = []

    def flaky() -> int:
        o = next(outcomes)
        if isinstance(o, Exception):
            raise o
        return o

    assert every_loop(flaky, 60, max_iterations=3, sleep=sleep, clock=lambda: 0.0, say=said.append) == 0
    assert "run failed: RuntimeError: S3 is down" in said and len([m for m in said if m.startswith("next run")]) == 2


def test_every_needs_incremental_and_a_valid_duration(tiny_checkpoint, tmp_path, capsys, restore_sigterm) -> None:
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(job_dict(tiny_checkpoint, str(tmp_path / "in"), str(tmp_path / "out"))))
    assert main(["run", str(spec_path), "--every", "1h"]) == 2
    assert "--every: only for incremental runs" in capsys.readouterr().err
    assert main(["run", str(spec_path), "--incremental", "--every", "soon"]) == 2
    assert "--every: 'soon' is not a duration" in capsys.readouterr().err
    with pytest.raises(SpecError, match="schedule.window"):
        parse_spec(job_dict(tiny_checkpoint, "in", "out", schedule={"window": "hourly"}))


def test_incremental_on_s3_removes_a_crashed_runs_orphans(ray_cluster, tiny_checkpoint, s3_bucket, tmp_path) -> None:
    import boto3

    s3 = boto3.client("s3")
    local = tmp_path / "in"
    write_articles(local, files=3, rows=4)
    for name in ("part-0.parquet", "part-1.parquet"):
        s3.upload_file(str(local / name), s3_bucket, f"in/{name}")
    spec = parse_spec(job_dict(tiny_checkpoint, f"s3://{s3_bucket}/in/", f"s3://{s3_bucket}/out/",
                               schedule={"incremental": True}))
    assert run_job(spec, run_id="s1").committed_rows == 8
    # a crashed run left a part file that no committed run owns (its input has since changed)
    first_part = next(o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="out/part-")["Contents"])
    s3.copy_object(Bucket=s3_bucket, Key="out/part-0123456789abcdef0123.parquet",
                   CopySource={"Bucket": s3_bucket, "Key": first_part})
    s3.upload_file(str(local / "part-2.parquet"), s3_bucket, "in/part-2.parquet")
    second = run_job(spec, run_id="s2")
    assert (second.new_files, second.unchanged_files, second.committed_rows) == (1, 2, 4)
    m = json.loads(s3.get_object(Bucket=s3_bucket, Key="out/_hymba/runs/s2/manifest.json")["Body"].read())
    assert m["removed_orphan_parts"] == ["part-0123456789abcdef0123.parquet"]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="out/")["Contents"]}
    assert "out/_hymba/lease.json" not in keys and "out/_SUCCESS" in keys
    top = json.loads(s3.get_object(Bucket=s3_bucket, Key="out/_hymba/manifest.json")["Body"].read())
    assert {f"out/{f['path']}" for f in top["files"]} == {k for k in keys if k.startswith("out/part-")}
    assert top["committed_rows"] == 12

"""Storage that fails under a running job (tiny checkpoint, real Ray, real S3 API on loopback):

- the local disk fills up (every write of one unit fails with ENOSPC): that unit is retried, then
  quarantined with the OS's error naming the file; every other unit commits, no temporary file
  is left; once there is room again a re-run does only that unit;
- the S3 output prefix is deleted while the job runs (after its first unit committed): the run
  fails with one clear error instead of committing a manifest over missing files, and a re-run
  redoes what was lost, doubling nothing;
- the clock jumps forward past the lease's ttl on another host: that host's run may take the
  lease over; the first run sees it at its next heartbeat and refuses to commit.
"""

from __future__ import annotations

import boto3
import pytest

from invariants import check_output, input_rows, listing, snapshot, status
from jobhelpers import job_dict, write_articles
from hymba_batch.jobs.driver import plan_job, run_job
from hymba_batch.jobs.spec import parse_spec
from hymba_batch.pipeline.commit import OutputConflict
from hymba_batch.pipeline.lease import Lease, LeaseLost
from hymba_batch.workers.actor import ENOSPC_UNIT_ENV


def test_a_full_disk_quarantines_the_unit_clearly_and_loses_nothing(ray_cluster, tiny_checkpoint, tmp_path,
                                                                    monkeypatch) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    total = write_articles(src, files=2, rows=8, row_group_size=4)  # 4 units
    spec = parse_spec(job_dict(tiny_checkpoint, str(src), str(out), resources={"max_attempts": 2}))
    victim = plan_job(spec).units[2].unit_id
    monkeypatch.setenv(ENOSPC_UNIT_ENV, victim)
    summary = run_job(spec)
    assert summary.state == "failed" and [f["unit_id"] for f in summary.failed_units] == [victim]
    err = summary.failed_units[0]["error"]
    assert err == f"OSError: [Errno 28] No space left on device: 'part-{victim}'", err
    assert status(str(out))["failed_units"][0]["error"] == err
    assert not [p for p in listing(str(out)) if p.endswith(".tmp")]
    got = check_output(str(out), input_rows(str(src)), complete=False)
    assert sum(got["rows"].values()) == total - 4
    committed = snapshot(str(out))
    monkeypatch.delenv(ENOSPC_UNIT_ENV)  # room again
    again = run_job(spec)
    assert again.state == "succeeded" and again.run_units == 1
    after = snapshot(str(out))
    assert {k: after[k] for k in committed if k.startswith("part-")} == {
        k: v for k, v in committed.items() if k.startswith("part-")}
    check_output(str(out), input_rows(str(src)))


class _DeleteOutputAfterFirstUnit:
    """A progress reporter that deletes every object under the output prefix once, when the
    first unit has committed (someone runs ``aws s3 rm --recursive`` on it mid-job)."""

    def __init__(self, bucket: str, prefix: str) -> None:
        self.bucket, self.prefix, self.deleted = bucket, prefix, []

    def start(self, total_rows: int, done_rows: int) -> None:
        pass

    def update(self, done_rows: int, new_tokens: int) -> None:
        if self.deleted:
            return
        s3 = boto3.client("s3")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix).get("Contents", [])]
        for k in keys:
            s3.delete_object(Bucket=self.bucket, Key=k)
        self.deleted = keys

    def stop(self) -> None:
        pass


def test_s3_output_deleted_mid_job_is_a_clear_error_and_a_rerun_recovers(ray_cluster, tiny_checkpoint, s3_bucket,
                                                                         tmp_path) -> None:
    src = tmp_path / "in"
    total = write_articles(src, files=2, rows=8, row_group_size=4)  # 4 units
    uri = f"s3://{s3_bucket}/out"
    spec = parse_spec(job_dict(tiny_checkpoint, str(src), uri,
                               resources={"num_actors": 1, "max_in_flight": 1}))
    rep = _DeleteOutputAfterFirstUnit(s3_bucket, "out/")
    with pytest.raises(OutputConflict) as e:
        run_job(spec, reporter=rep)
    assert any(k.startswith("out/part-") for k in rep.deleted) and "out/_hymba/job.json" in rep.deleted
    msg = str(e.value)
    assert msg.startswith(f"cannot commit the job: 1 unit(s) have no output file in {uri} (first: part-"), msg
    assert "deleted while the job ran" in msg and "run the job again" in msg, msg
    assert status(uri)["state"] == "failed" and "have no output file" in status(uri)["error"]
    again = run_job(spec)  # the claim was written again: the re-run resumes, redoing only the lost unit
    assert again.state == "succeeded" and again.run_units == 1 and again.resumed_units == 3
    assert again.committed_rows == total
    check_output(uri, input_rows(str(src)))


def test_a_clock_jump_past_the_ttl_never_lets_two_runs_commit(tmp_path) -> None:
    out = str(tmp_path / "out")
    a = Lease(out, "a", ttl_s=60).acquire()
    try:
        jumped = Lease(out, "b", ttl_s=60, clock=lambda: __import__("time").time() + 3600)
        jumped.acquire()  # its clock says a's lease expired an hour ago
        assert jumped.took_over["run_id"] == "a" and jumped.took_over["stale"] == "expired"
        a.renew()  # a's next heartbeat
        with pytest.raises(LeaseLost, match="run a lost its lease"):
            a.check()
        jumped.release()
    finally:
        a.release()

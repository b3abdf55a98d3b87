"""The job history of ``_hymba/history.json``: bounded whatever the run's length, cumulative
figures per actor, phase times, earlier runs of the same job kept (and another job's dropped)."""

from __future__ import annotations

from hymba_batch.pipeline.history import MAX_RUNS, History, RunHistory, actor_label, totals
from hymba_batch.pipeline.unit import UnitResult


def _res(uid: str, actor: str, rows: int = 4, reused: bool = False) -> UnitResult:
    return UnitResult(uid, rows=rows, error_rows=1, prompt_tokens=10 * rows, completion_tokens=3 * rows,
                      worker={"actor_id": actor}, reused=reused)


def test_totals_count_the_job_and_per_actor_only_this_runs_units() -> None:
    a, b = "a" * 32, "b" * 32
    t = totals([_res("u0", a), _res("u1", b, rows=2), _res("u2", a), _res("u3", b, reused=True)])
    assert (t["rows"], t["units"], t["prompt_tokens"], t["completion_tokens"], t["error_rows"]) == (14, 4, 140, 42, 4)
    assert t["actors"] == {actor_label(a): {"rows": 8, "prompt_tokens": 80, "completion_tokens": 24},
                           actor_label(b): {"rows": 2, "prompt_tokens": 20, "completion_tokens": 6}}
    assert actor_label(a) == "a" * 12


def test_a_long_run_stays_bounded_and_keeps_its_ends() -> None:
    run = RunHistory("r", started_at=0.0, interval_s=10.0, max_points=50)
    n = 0
    for step in range(100_000):  # a week at 6 s per step
        now = 6.0 * step
        if run.due(now):
            n += 1
            run.add(now, {"rows": step}, "running")
    run.add(6.0 * 100_000, {"rows": 100_000}, "succeeded")
    assert len(run.points) <= 51 and run.interval_s >= 10.0 * 2 ** 9
    assert run.points[0]["t"] == 0.0 and run.points[-1]["rows"] == 100_000 and run.ended_at == 600_000.0
    ts = [p["t"] for p in run.points]
    assert ts == sorted(ts) and n > len(run.points)


def test_phase_times_are_in_the_document() -> None:
    run = RunHistory(None, started_at=100.0)
    run.ready_at, run.drained_at = 105.0, 120.0
    run.add(125.0, {"rows": 8}, "succeeded")
    doc = run.document()
    assert (doc["started_at"], doc["ready_at"], doc["drained_at"], doc["ended_at"]) == (100.0, 105.0, 120.0, 125.0)
    assert doc["state"] == "succeeded"


def test_runs_of_the_same_job_are_kept_another_jobs_are_not() -> None:
    h = History("job-1", started_at=1.0)
    h.run.add(2.0, {"rows": 4}, "cancelled")
    doc = h.document()
    again = History("job-1", previous=doc, started_at=3.0)
    assert [r["started_at"] for r in again.document()["runs"]] == [1.0, 3.0]
    assert History("job-2", previous=doc).document()["runs"][0]["points"] == []
    for i in range(2 * MAX_RUNS):
        doc = History("job-1", previous=doc, started_at=10.0 + i).document()
    assert len(doc["runs"]) == MAX_RUNS and doc["runs"][-1]["started_at"] == 10.0 + 2 * MAX_RUNS - 1

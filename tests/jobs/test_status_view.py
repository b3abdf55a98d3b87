"""``hymba-batch status``: the human table (local times, rows done / total, rows/s over the last
minute, ETA, errors, state) and ``--json``, for a running and a finished job read from its output
prefix (a real job on the local Ray), and for documents with a state the table does not know
(it shows whatever state the driver wrote). A submitted job's table: tests/jobs/test_submit.py."""

from __future__ import annotations

import json
import time

from rich.console import Console

from jobhelpers import job_dict, write_articles
from hymba_batch.jobs.cli import main
from hymba_batch.jobs.driver import run_job
from hymba_batch.jobs.spec import parse_spec
from hymba_batch.jobs.status_view import local_time, recent_rate, status_table


def _text(table) -> str:
    console = Console(record=True, width=160)
    console.print(table)
    return console.export_text()


def _doc(**kw) -> dict:
    doc = {"job_id": "j-1", "state": "running", "output_uri": "/out", "total_rows": 1000, "committed_rows": 400,
           "committed_units": 4, "total_units": 10, "failed_units": [], "failed_rows": 0, "error_rows": 2,
           "prompt_tokens": 5000, "completion_tokens": 800, "rows_per_s": 2.0, "eta_s": 300.0,
           "started_at": 1_000.0, "updated_at": 1_200.0, "error": None}
    return doc | kw


def test_last_minute_rate_and_eta_from_the_history() -> None:
    # 1 row/s for the first 140 s, then 5 rows/s: the table shows the last minute's 5, not the average
    points = [{"t": 1_000.0 + 10 * i, "rows": min(10 * i, 140) + 50 * max(i - 14, 0)} for i in range(20)]
    history = {"runs": [{"points": points}]}
    doc = _doc(updated_at=1_200.0, committed_rows=points[-1]["rows"] + 50)
    assert recent_rate(doc, history) == 5.0
    text = _text(status_table(doc, history, now=1_201.0))
    left = 1000 - doc["committed_rows"]
    assert "rows/s (last minute) │ 5.00" in text and "rows/s (run average) │ 2.00" in text
    assert f"{doc['committed_rows']} / 1000" in text and "ETA" in text and local_time(1_201.0 + left / 5.0) in text
    assert local_time(1_000.0) in text and "(1 s ago)" in text and "rows with an error   │ 2" in text


def test_any_state_is_shown_and_finished_jobs_have_no_eta() -> None:
    text = _text(status_table(_doc(state="stale"), None, now=1_500.0))
    assert "stale" in text and "(5m 00s ago)" in text and "ETA" not in text  # only a running job has one
    done = _text(status_table(_doc(state="failed", failed_units=[{"unit_id": "u7", "attempts": 3, "error": "boom"}],
                                   failed_rows=100), None, now=1_300.0))
    assert "failed" in done and "ETA" not in done and "u7 after 3 tries: boom" in done and "1 (100)" in done


def test_the_slowest_actors_start_is_shown_part_by_part() -> None:
    starts = [{"import_s": 1.0, "resolve_s": 0.0, "load_s": 0.5, "engine_s": 1.0, "tokenizer_s": 0.1},
              {"import_s": 4.2, "resolve_s": 0.0, "load_s": 0.7, "engine_s": 1.5, "tokenizer_s": 0.1}]
    text = _text(status_table(_doc(state="succeeded", actor_start=starts), None, now=1_500.0))
    assert "actor start" in text and "import 4.2 s, resolve 0.0 s, load 0.7 s, engine 1.5 s, tokenizer 0.1 s" in text
    assert "actor start" not in _text(status_table(_doc(), None, now=1_500.0))


def test_status_of_a_running_then_finished_job(ray_cluster, tiny_checkpoint, tmp_path, capsys) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    total = write_articles(src, files=2, rows=8)
    seen: list[str] = []

    class AskStatusWhileRunning:  # runs `hymba-batch status` from the driver while units commit
        def start(self, total_rows: int, done_rows: int) -> None: ...
        def update(self, done_rows: int, new_tokens: int) -> None:
            if not seen:
                capsys.readouterr()
                assert main(["status", str(out)]) == 0
                seen.append(capsys.readouterr().out)

        def stop(self) -> None: ...

    spec = parse_spec(job_dict(tiny_checkpoint, str(src), str(out), resources={"max_in_flight": 1}))
    summary = run_job(spec, reporter=AskStatusWhileRunning())
    assert summary.state == "succeeded"
    (running,) = seen
    assert "running" in running and f"/ {total}" in running and "ETA" in running, running

    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "succeeded" in text and f"{total} / {total} (100.0 %)" in text and "ETA" not in text
    assert "time split" in text and "steady" in text and "tail" in text
    assert main(["status", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["state"] == "succeeded" and doc["committed_rows"] == total
    assert local_time(doc["started_at"]) in text
    assert time.time() - doc["updated_at"] < 600

"""``hymba-batch report``: the HTML page of a finished job (local), a failed job with a
quarantined unit (on the loopback S3 server) and a cancelled job; its figures agree with the
manifest (or, without one, with the committed files and status.json), and the history the
driver kept (``_hymba/history.json``) agrees with both. Real local Ray, tiny checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import boto3
import pyarrow.dataset as ds
import pytest

from jobhelpers import job_dict
from observehelpers import write_corrupt, write_with_row_error
from hymba_batch.jobs.cli import main
from hymba_batch.jobs.driver import run_job
from hymba_batch.jobs.spec import parse_spec
from hymba_batch.pipeline.history import actor_label


def _figures(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="hymba-report-data">(.*?)</script>', html, re.S)
    assert m, "the page carries no figures"
    return json.loads(m.group(1).replace("<\\/", "</"))


def _check_against_rows(fig: dict, table) -> None:
    """The page's figures are those of the committed rows."""
    rows = table.to_pylist()
    errors = [r for r in rows if r["error"] is not None]
    assert fig["committed_rows"] == len(rows) and fig["error_rows"] == len(errors)
    assert fig["prompt_tokens"] == sum(r["prompt_tokens"] for r in rows)
    assert fig["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert sum(fig["finish_reasons"].values()) == len(rows)
    assert fig["completion_tokens_histogram_total"] == sum(r["completion_tokens"] for r in rows if r["error"] is None)
    assert sum(e["rows"] for e in fig["errors"]) == len(errors)


def _inputs(folder: Path, corrupt: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_with_row_error(folder / "a.parquet", 0, 8, null_at=3)
    write_with_row_error(folder / "b.parquet", 8, 8, null_at=99)
    if corrupt:
        write_corrupt(folder / "z-corrupt.parquet")


def test_report_of_a_finished_job(ray_cluster, tiny_checkpoint, tmp_path, capsys) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    _inputs(src)
    spec = parse_spec(job_dict(tiny_checkpoint, str(src), str(out)))
    summary = run_job(spec)
    assert summary.state == "succeeded"
    assert main(["report", str(out)]) == 0
    assert str(out / "_hymba" / "report.html") in capsys.readouterr().out
    html = (out / "_hymba" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4  # rates, time split, lengths, finish reasons
    fig = _figures(html)
    manifest = json.loads((out / "_hymba" / "manifest.json").read_text())
    assert fig["state"] == "succeeded" and fig["manifested"] and fig["job_id"] == summary.job_id
    for k in ("committed_rows", "error_rows", "prompt_tokens", "completion_tokens"):
        assert fig[k] == manifest[k], k
    assert fig["committed_units"] == len(manifest["files"]) == 4
    _check_against_rows(fig, ds.dataset(str(out), format="parquet").to_table())
    (err,) = fig["errors"]  # the null text of a.parquet row 3, with that row as its sample
    assert err["rows"] == 1 and err["samples"][0]["source_file"] == "a.parquet" and err["samples"][0]["source_row"] == 3
    assert fig["finish_reasons"]["error"] == 1
    ph = fig["phases"]  # the driver's own time split, as in the job summary
    assert ph["source"] == "driver" and ph["start_s"] > 0 and ph["steady_s"] >= 0 and ph["tail_s"] >= 0
    assert [ph[k] for k in ("start_s", "steady_s", "tail_s")] == \
        pytest.approx([summary.time_split[k] for k in ("start_s", "steady_s", "tail_s")])
    # the actor's own part of the start, in its info: imports, checkpoint, load, engine, tokenizer
    split = {k: float(v) for k, v in summary.actors[0].items() if k.startswith("start_")}
    assert set(split) == {"start_import_s", "start_resolve_s", "start_load_s", "start_engine_s", "start_tokenizer_s"}
    assert all(v >= 0 for v in split.values()) and 0 < sum(split.values()) < ph["start_s"]
    status = json.loads((out / "_hymba" / "status.json").read_text())
    assert status["actor_start"] == [{k.removeprefix("start_"): v for k, v in split.items()}]

    hist = json.loads((out / "_hymba" / "history.json").read_text())
    (run,) = hist["runs"]
    last = run["points"][-1]
    assert hist["job_id"] == summary.job_id and run["state"] == "succeeded"
    assert (last["rows"], last["prompt_tokens"], last["completion_tokens"]) == \
        (manifest["committed_rows"], manifest["prompt_tokens"], manifest["completion_tokens"])
    assert last["actors"] == {actor_label(summary.actors[0]["actor_id"]): {
        "rows": 16, "prompt_tokens": manifest["prompt_tokens"], "completion_tokens": manifest["completion_tokens"]}}
    assert run["started_at"] <= run["ready_at"] <= run["ended_at"]
    assert run["drained_at"] is None and ph["tail_s"] == 0  # one actor busy to its last unit: no tail


def test_report_of_a_failed_job_on_s3(ray_cluster, tiny_checkpoint, s3_bucket, tmp_path) -> None:
    """A unit that fails every try is quarantined: the job fails, the page lists the unit and
    shows the committed rows; input, output and report all on the loopback S3 server."""
    _inputs(tmp_path / "in", corrupt=True)
    s3 = boto3.client("s3")
    for f in sorted((tmp_path / "in").iterdir()):
        s3.upload_file(str(f), s3_bucket, f"in/{f.name}")
    out = f"s3://{s3_bucket}/out"
    spec = parse_spec(job_dict(tiny_checkpoint, f"s3://{s3_bucket}/in/", out,
                               resources={"num_actors": 1, "max_in_flight": 1, "max_attempts": 2}))
    summary = run_job(spec)
    assert summary.state == "failed" and len(summary.failed_units) == 1
    assert main(["report", out]) == 0
    html = s3.get_object(Bucket=s3_bucket, Key="out/_hymba/report.html")["Body"].read().decode()
    fig = _figures(html)
    status = json.loads(s3.get_object(Bucket=s3_bucket, Key="out/_hymba/status.json")["Body"].read())
    assert fig["state"] == "failed" and not fig["manifested"]
    assert [f["unit_id"] for f in fig["failed_units"]] == [summary.failed_units[0]["unit_id"]]
    assert "Quarantined units" in html and fig["failed_units"][0]["error"] in html
    for k in ("committed_rows", "error_rows", "prompt_tokens", "completion_tokens"):
        assert fig[k] == status[k], k
    assert fig["committed_rows"] == 16 and fig["total_rows"] == 20

    local = tmp_path / "copy.html"  # --out elsewhere
    assert main(["report", out, "--out", str(local)]) == 0
    assert _figures(local.read_text())["committed_rows"] == 16


def test_report_of_a_cancelled_job(ray_cluster, tiny_checkpoint, tmp_path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    _inputs(src)

    class CancelAfterFirstUnit:  # Ctrl-C as soon as one unit is committed
        def start(self, total_rows: int, done_rows: int) -> None: ...
        def update(self, done_rows: int, new_tokens: int) -> None:
            raise KeyboardInterrupt

        def stop(self) -> None: ...

    spec = parse_spec(job_dict(tiny_checkpoint, str(src), str(out), resources={"max_in_flight": 1},
                               output={"format": "arrow"}))  # the report reads Arrow IPC files too
    summary = run_job(spec, reporter=CancelAfterFirstUnit())
    assert summary.state == "cancelled"
    assert main(["report", str(out)]) == 0
    fig = _figures((out / "_hymba" / "report.html").read_text())
    status = json.loads((out / "_hymba" / "status.json").read_text())
    assert fig["state"] == "cancelled" and not fig["manifested"] and fig["total_rows"] == 16
    assert 4 <= fig["committed_rows"] == status["committed_rows"] < 16
    assert fig["committed_units"] == status["committed_units"]
    _check_against_rows(fig, ds.dataset(sorted(str(p) for p in out.glob("part-*.arrow")), format="arrow").to_table())
    run = json.loads((out / "_hymba" / "history.json").read_text())["runs"][-1]
    assert run["state"] == "cancelled" and run["points"][-1]["rows"] == fig["committed_rows"]
    ph = fig["phases"]  # no time split from the driver for a cancelled run: the history's
    assert ph["source"] == "history" and ph["start_s"] == pytest.approx(run["ready_at"] - run["started_at"])
    assert ph["start_s"] + ph["steady_s"] + ph["tail_s"] == pytest.approx(ph["total_s"])


def test_report_of_no_job_is_a_clear_error(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "no job here" in capsys.readouterr().err

"""Whole jobs on the real two-node local Ray cluster: S3 in and out through the loopback S3
API with Hive-partitioned input; results mode with Arrow output; the fingerprint refusal and
--restart; and resume after the driver process is killed midway. The output must open as one
dataset in pyarrow, pandas and duckdb, with every input row exactly once."""

import json
import os
import signal
import subprocess
import sys
import time

import boto3
import duckdb
import pandas as pd
import pyarrow.dataset as ds
import pytest
import yaml

from jobhelpers import job_dict, write_articles
from hymba_batch.jobs.driver import run_job
from hymba_batch.jobs.spec import parse_spec
from hymba_batch.pipeline.commit import OutputConflict
from hymba_batch.pipeline.fs import s3_filesystem
from hymba_batch.pipeline.writer import OUTPUT_SCHEMA


def test_s3_hive_input_to_s3_enriched_parquet(ray_cluster, tiny_checkpoint, s3_bucket, tmp_path) -> None:
    s3 = boto3.client("s3")
    total = 0
    for region in ("eu", "us"):
        d = tmp_path / f"region={region}"
        n = write_articles(d, files=1, rows=6, row_group_size=3)
        for f in d.iterdir():
            s3.upload_file(str(f), s3_bucket, f"articles/region={region}/{f.name}")
        total += n
    s3.put_object(Bucket=s3_bucket, Key="articles/_SUCCESS", Body=b"")
    spec = parse_spec(job_dict(tiny_checkpoint, f"s3://{s3_bucket}/articles/", f"s3://{s3_bucket}/out/"))
    summary = run_job(spec)
    assert summary.state == "succeeded" and summary.committed_rows == total == 12
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="out/")["Contents"]]
    assert "out/_SUCCESS" in keys and "out/_hymba/manifest.json" in keys
    manifest = json.loads(s3.get_object(Bucket=s3_bucket, Key="out/_hymba/manifest.json")["Body"].read())
    assert manifest["committed_rows"] == manifest["input_rows"] == 12
    assert {f["path"] for f in manifest["files"]} == {k.split("/")[-1] for k in keys if "/part-" in k}
    assert all("generate_s" in f["timings"] for f in manifest["files"])
    dataset = ds.dataset(f"{s3_bucket}/out", filesystem=s3_filesystem(), format="parquet")
    t = dataset.to_table()
    assert t.column_names == ["id", "text", "region"] + OUTPUT_SCHEMA.names
    assert sorted(t.column("id").to_pylist()) == sorted(list(range(6)) * 2)
    assert sorted(set(t.column("region").to_pylist())) == ["eu", "us"]
    assert all(t.column("completion_tokens").to_pylist()) and t.column("error").null_count == 12
    df = pd.read_parquet(f"{s3_bucket}/out", filesystem=s3_filesystem())
    assert len(df) == 12 and df.groupby("region").size().to_dict() == {"eu": 6, "us": 6}
    con = duckdb.connect()
    con.register("out", dataset)
    assert con.execute("select count(*), count(distinct (_source_file, _source_row)) from out").fetchone() == (12, 12)
    again = run_job(spec)  # same job again: everything is already committed, nothing is redone
    assert again.state == "succeeded" and again.resumed_units == summary.total_units and again.run_units == 0


def test_results_mode_arrow_output_and_fingerprint_refusal(ray_cluster, tiny_checkpoint, tmp_path) -> None:
    src = tmp_path / "in"
    total = write_articles(src, files=2, rows=5, row_group_size=5)
    out = tmp_path / "out"
    base = job_dict(tiny_checkpoint, str(src), str(out), output={"format": "arrow", "mode": "results"},
                    task={"kind": "template", "template": "Headline for: {{ text }}", "chat": True})
    assert run_job(parse_spec(base)).state == "succeeded"
    dataset = ds.dataset(str(out), format="arrow")
    t = dataset.to_table()
    assert t.column_names == ["id"] + OUTPUT_SCHEMA.names
    assert sorted(t.column("id").to_pylist()) == list(range(total))
    assert len(t.to_pandas()) == total
    assert duckdb.connect().execute("select count(distinct id) from dataset").fetchone() == (total,)
    before = sorted(os.listdir(out))
    changed = parse_spec(base, ["task.template=Summary of: {{ text }}"])
    with pytest.raises(OutputConflict, match="changed: prompt"):
        run_job(changed)
    assert sorted(os.listdir(out)) == before  # refused before touching anything
    restarted = run_job(changed, restart=True)
    assert restarted.state == "succeeded" and restarted.resumed_units == 0
    assert ds.dataset(str(out), format="arrow").count_rows() == total


def test_resume_after_driver_killed_midway(ray_cluster, tiny_checkpoint, tmp_path) -> None:
    src = tmp_path / "in"
    total = write_articles(src, files=5, rows=8, row_group_size=4)  # 10 units
    out = tmp_path / "out"
    spec_dict = job_dict(tiny_checkpoint, str(src), str(out), task={"max_new_tokens": 8},
                         resources={"num_actors": 1, "max_in_flight": 1})
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict))
    proc = subprocess.Popen([sys.executable, "-m", "hymba_batch.jobs.cli", "run", str(spec_path), "--no-progress",
                             "--set", f"resources.ray_address={ray_cluster.address}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    status_path = out / "_hymba" / "status.json"
    deadline = time.monotonic() + 180
    status = {}
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if status_path.exists():
                status = json.loads(status_path.read_text())
                if status["committed_units"] >= 2:
                    break
            time.sleep(0.05)  # polling interval for the status file, not synchronization
        assert proc.poll() is None, f"driver exited early: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert 2 <= status["committed_units"] < status["total_units"] == 10
    assert not (out / "_SUCCESS").exists()
    summary = run_job(parse_spec(spec_dict))
    assert summary.state == "succeeded"
    assert summary.resumed_units >= 2 and summary.resumed_units + summary.run_units == 10
    rel = duckdb.connect().execute(
        f"select count(*), count(distinct (_source_file, _source_row)) from read_parquet('{out}/part-*.parquet')")
    assert rel.fetchone() == (total, total)
    final = json.loads(status_path.read_text())
    assert final["state"] == "succeeded" and final["committed_rows"] == total

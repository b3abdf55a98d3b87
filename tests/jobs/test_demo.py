"""``hymba-batch demo`` end to end, as a user runs it (its own local Ray and loopback S3)."""

import json
import subprocess
import sys

import pyarrow.dataset as ds


def test_demo_runs_end_to_end(tmp_path) -> None:
    work = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "hymba_batch.jobs.cli", "demo", "--workdir", str(work),
                           "--rows", "60"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "s3://hymba-demo/summaries/" in proc.stdout and "succeeded" in proc.stdout
    # quiet: the S3 server's request log goes to a file, Ray's start-up notices are turned down
    log = (work / "s3-server.log").read_text()
    assert '"PUT /hymba-demo/' in log and '"GET /hymba-demo' in log
    printed = proc.stdout + proc.stderr
    assert "HTTP/1.1" not in printed and "Token authentication" not in printed and "Started a local Ray" not in printed
    assert len(printed.splitlines()) < 60, printed
    out = work / "summaries"
    manifest = json.loads((out / "_hymba" / "manifest.json").read_text())
    assert manifest["committed_rows"] == manifest["input_rows"] == 60
    assert (out / "_SUCCESS").exists()
    t = ds.dataset(str(out), format="parquet").to_table()
    assert sorted(t.column("id").to_pylist()) == list(range(60))
    assert {"title", "category", "text", "generated_text"} <= set(t.column_names)
    assert t.column("error").null_count == 60

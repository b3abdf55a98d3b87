"""``hymba-batch demo``: the whole product on one machine in a minute.

Makes a sample dataset (synthetic short articles in three Parquet files) and a tiny
random-weight checkpoint, starts an S3 API server on loopback (moto) and local Ray, uploads
both, runs a summarize job from ``s3://`` to ``s3://`` through the S3 API, copies the output to
a local folder, and prints where it is and a few rows. The S3 server's request log goes to
``<workdir>/s3-server.log``, not the terminal. The tiny model's words are random: the
demo shows the pipeline, not the model's quality.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

BUCKET = "hymba-demo"
_TOPICS = ["the harbour", "a new bridge", "the city council", "solar farms", "the local library",
           "a robotics club", "river cleanup", "the night market", "school lunches", "a jazz festival"]
_VERBS = ["announced", "debated", "opened", "postponed", "celebrated", "reviewed", "funded", "expanded"]


def make_articles(rows: int, seed: int = 0) -> pa.Table:
    """Deterministic synthetic news articles: id, title, category, text."""
    rng = random.Random(seed)
    ids, titles, cats, texts = [], [], [], []
    for i in range(rows):
        topic, verb = rng.choice(_TOPICS), rng.choice(_VERBS)
        sents = [f"Officials {verb} plans for {topic} on day {rng.randint(1, 28)}.",
                 f"About {rng.randint(10, 900)} residents attended the meeting.",
                 f"Critics said {rng.choice(_TOPICS)} mattered more this year.",
                 f"A final decision on {topic} is expected next month."]
        ids.append(i)
        titles.append(f"{topic.capitalize()} {verb}")
        cats.append(rng.choice(["news", "local", "culture"]))
        texts.append(" ".join(sents[: rng.randint(2, 4)]))
    return pa.table({"id": ids, "title": titles, "category": cats, "text": texts})


def write_dataset(folder: Path, rows: int, files: int = 3) -> list[Path]:
    """Split the articles over ``files`` Parquet files (row groups of 40 rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    table = make_articles(rows)
    per = -(-rows // files)
    out = []
    for i in range(files):
        p = folder / f"part-{i:05d}.parquet"
        pq.write_table(table.slice(i * per, per), p, row_group_size=40)
        out.append(p)
    (folder / "_SUCCESS").write_bytes(b"")  # as Spark leaves it; the job skips it
    return out


def _upload(s3, folder: Path, prefix: str) -> None:
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), BUCKET, f"{prefix}/{f.relative_to(folder).as_posix()}")


def run_demo(workdir: str | None = None, rows: int = 300, console: Console | None = None) -> int:
    """Run the demo; returns the process exit code."""
    import boto3
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs
    import ray
    from moto.server import ThreadedMotoServer

    from hymba_batch.model.checkpoints import tiny_config, write_checkpoint

    from .driver import run_job
    from .progress import RichReporter, summary_table
    from .spec import parse_spec

    console = console or Console()
    work = Path(workdir or tempfile.mkdtemp(prefix="hymba-demo-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]hymba-batch demo[/] in {work}")
    write_dataset(work / "articles", rows)
    write_checkpoint(work / "tiny-model", tiny_config(), seed=0)

    s3_log = logging.getLogger("werkzeug")  # the S3 server's access log: one line per request
    log_file = logging.FileHandler(work / "s3-server.log")
    s3_log.addHandler(log_file)  # a handler of its own: werkzeug adds no terminal handler then
    s3_log.setLevel(logging.INFO)
    s3_log.propagate = False
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "demo",
                       "AWS_SECRET_ACCESS_KEY": "demo", "AWS_REGION": "us-east-1",
                       "HYMBA_CACHE": str(work / "cache")})
    started_ray = False
    try:
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        _upload(s3, work / "articles", "articles")
        _upload(s3, work / "tiny-model", "models/tiny")
        console.print(f"S3 API on http://{host}:{port}: s3://{BUCKET}/articles/ ({rows} rows, 3 files), "
                      f"s3://{BUCKET}/models/tiny/ (request log: {work / 's3-server.log'})", soft_wrap=True)
        spec = parse_spec({
            "name": "demo-summarize",
            "model": {"path": f"s3://{BUCKET}/models/tiny/", "cache_budget_mb": 64, "max_num_seqs": 64},
            "input": {"uri": f"s3://{BUCKET}/articles/", "text_column": "text", "id_column": "id",
                      "rows_per_unit": 40},
            "task": {"kind": "summarize", "max_new_tokens": 12},
            "output": {"uri": f"s3://{BUCKET}/summaries/", "format": "parquet", "mode": "enrich"},
            "resources": {"num_actors": 2 if (os.cpu_count() or 1) >= 2 else 1, "cpus_per_actor": 1},
        }, source="demo")
        if not ray.is_initialized():  # its own local Ray, which inherits the loopback S3 settings
            ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                     log_to_driver=False)
            started_ray = True
        summary = run_job(spec, reporter=RichReporter(console=console))
        console.print(summary_table(summary))
        if summary.state != "succeeded":
            return 1
        local = work / "summaries"
        pafs.copy_files(f"{BUCKET}/summaries", str(local), source_filesystem=pafs.S3FileSystem(
            endpoint_override=f"http://{host}:{port}", scheme="http", region="us-east-1"))
        table = ds.dataset(str(local), format="parquet").to_table().sort_by("id")
        show = Table(title=f"first rows of {local} (copied from s3://{BUCKET}/summaries/)")
        for col in ("id", "title", "generated_text", "finish_reason", "completion_tokens"):
            show.add_column(col, overflow="fold")
        for r in table.slice(0, 5).to_pylist():
            show.add_row(str(r["id"]), r["title"], repr(r["generated_text"]), r["finish_reason"],
                         str(r["completion_tokens"]))
        console.print(show)
        console.print(f"output: s3://{BUCKET}/summaries/ on the demo's S3 server (stopped when the demo exits); "
                      f"a local copy with its manifest is in {local}/ ({table.num_rows} rows). "
                      f"The tiny model has random weights, so its words are random.")
        return 0
    finally:
        if started_ray:
            ray.shutdown()
        server.stop()
        s3_log.removeHandler(log_file)
        log_file.close()

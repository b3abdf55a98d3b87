"""Enrichment jobs through the whole product on the real local Ray cluster (tiny random model):
a JSON-schema job from a schema file (typed ``structured`` column, every row valid, logprobs)
and a classify job (``label`` / ``label_probs``), each committed with its manifest."""

import json
import math

import jsonschema
import pyarrow as pa
import pyarrow.dataset as ds

from jobhelpers import job_dict, write_articles
from hymba_batch.jobs.driver import run_job
from hymba_batch.jobs.spec import parse_spec

SCHEMA = {"type": "object", "properties": {
    "topic": {"enum": ["parks", "roads", "budget"]},
    "votes": {"type": "integer", "minimum": 0, "maximum": 99},
    "passed": {"type": "boolean"}}, "required": ["topic", "votes", "passed"]}


def test_json_schema_and_classify_jobs(ray_cluster, tiny_checkpoint, tmp_path) -> None:
    n = write_articles(tmp_path / "in", files=1, rows=6, row_group_size=3)
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    spec = parse_spec(job_dict(tiny_checkpoint, str(tmp_path / "in"), str(tmp_path / "json"),
                               task={"max_new_tokens": 40, "json_schema_file": str(schema_file), "logprobs": True,
                                     "temperature": 0.8}))
    summary = run_job(spec)
    assert summary.state == "succeeded" and summary.committed_rows == n
    t = ds.dataset(str(tmp_path / "json"), format="parquet").to_table()
    assert t.schema.field("structured").type == pa.struct([
        pa.field("topic", pa.string(), False), pa.field("votes", pa.int64(), False),
        pa.field("passed", pa.bool_(), False)])
    for row in t.to_pylist():
        assert row["error"] is None
        jsonschema.validate(json.loads(row["generated_text"]), SCHEMA)
        assert row["structured"] == json.loads(row["generated_text"])
        assert len(row["token_logprobs"]) == row["completion_tokens"]

    labels = ["parks", "roads", "budget"]
    spec = parse_spec(job_dict(tiny_checkpoint, str(tmp_path / "in"), str(tmp_path / "cls"),
                               task={"kind": "classify", "labels": labels, "share_prefix": False}))
    assert run_job(spec).state == "succeeded"
    t = ds.dataset(str(tmp_path / "cls"), format="parquet").to_table()
    assert t.num_rows == n and t.column("error").null_count == n
    for row in t.to_pylist():
        assert math.isclose(sum(row["label_probs"].values()), 1.0, abs_tol=1e-9)
        assert row["label"] == max(labels, key=row["label_probs"].__getitem__)
    # each row's prompt is computed once and its label requests fork from it (no job prefix here)
    manifest = json.loads((tmp_path / "cls" / "_hymba" / "manifest.json").read_text())
    assert sum(f["timings"]["engine_forked_tokens"] for f in manifest["files"]) > 0

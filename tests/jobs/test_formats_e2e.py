"""Whole jobs in the new formats on the real local Ray cluster with the tiny checkpoint: an
OpenAI Batch file (per-request max_tokens reach the engine through the actor) and JSONL in."""

import json

from formathelpers import write_jsonl
from jobhelpers import job_dict
from hymba_batch.jobs.driver import run_job
from hymba_batch.jobs.spec import parse_spec


def test_openai_batch_job_on_ray(ray_cluster, tiny_checkpoint, tmp_path) -> None:
    reqs = [{"custom_id": f"r{i}", "body": {"messages": [{"role": "user", "content": f"Tell me about park {i}."}],
                                          "max_tokens": 1 + i % 3, "temperature": 0.7 if i % 2 else 0}}
            for i in range(9)]
    reqs.append({"custom_id": "bad", "body": {"messages": [{"role": "user", "content": "x"}], "n": 3}})
    src = write_jsonl(tmp_path / "requests.jsonl", reqs)
    spec = job_dict(tiny_checkpoint, str(src), str(tmp_path / "out"),
                    input={"format": "openai_batch", "id_column": None, "text_column": None},
                    output={"format": "openai_batch"}, task={"max_new_tokens": 4, "chat": True})
    summary = run_job(parse_spec(spec))
    assert summary.state == "succeeded" and summary.committed_rows == 10 and summary.error_rows == 1
    lines = [json.loads(ln) for ln in (tmp_path / "out" / "output.jsonl").read_text().splitlines()]
    assert [ln["custom_id"] for ln in lines] == [r["custom_id"] for r in reqs]
    for r, ln in zip(reqs[:9], lines):
        usage = ln["response"]["body"]["usage"]
        assert ln["response"]["status_code"] == 200
        assert 1 <= usage["completion_tokens"] <= r["body"]["max_tokens"]  # the request's own limit held
    assert lines[-1]["response"]["status_code"] == 400 and "body.n=3" in lines[-1]["response"]["body"]["error"]["message"]
    manifest = json.loads((tmp_path / "out" / "_hymba" / "manifest.json").read_text())
    assert manifest["published"]["lines"] == 10 and manifest["input_format"] == "openai_batch"


def test_jsonl_job_on_ray(ray_cluster, tiny_checkpoint, tmp_path) -> None:
    import pyarrow.dataset as ds

    write_jsonl(tmp_path / "in" / "a.jsonl", [{"id": i, "text": f"Article {i} about parks."} for i in range(10)])
    spec = job_dict(tiny_checkpoint, str(tmp_path / "in"), str(tmp_path / "out"))
    summary = run_job(parse_spec(spec))
    assert summary.state == "succeeded" and summary.committed_rows == 10 and summary.error_rows == 0
    t = ds.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert sorted(t.column("id").to_pylist()) == list(range(10))


def test_incremental_delta_in_delta_out_on_ray(ray_cluster, tiny_checkpoint, tmp_path) -> None:
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    src, dst = str(tmp_path / "articles"), str(tmp_path / "enriched")
    write_deltalake(src, pa.table({"id": list(range(6)), "text": [f"Story {i}." for i in range(6)]}))
    spec = parse_spec(job_dict(tiny_checkpoint, src, dst, input={"format": "delta"}, output={"format": "delta"},
                               schedule={"incremental": True}))
    first = run_job(spec)
    assert first.state == "succeeded" and first.committed_rows == 6 and first.new_files == 1
    write_deltalake(src, pa.table({"id": [6, 7, 8], "text": ["Story 6.", "Story 7.", "Story 8."]}), mode="append")
    second = run_job(spec)
    assert second.committed_rows == 3 and second.new_files == 1 and second.unchanged_files == 1  # only version 1's file
    third = run_job(spec)
    assert third.committed_rows == 0 and third.new_files == 0
    out = DeltaTable(dst)
    assert out.version() == 1  # one commit per run that had rows
    assert sorted(out.to_pyarrow_table().column("id").to_pylist()) == list(range(9))
    run = json.loads(next((tmp_path / "enriched" / "_hymba" / "runs").glob(f"{second.run_id}/manifest.json")).read_text())
    assert run["input_source"]["delta_version"] == 1 and run["published"]["delta_version"] == 1

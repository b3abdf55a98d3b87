"""Iceberg through pyiceberg with a SQL catalog on SQLite: a snapshot as input (its id in the
manifest), results appended in one snapshot per run, read back by pyiceberg and by duckdb,
every row exactly once after a crash between staging and commit or between commit and
manifest; local paths and the loopback S3 API; a table that does not exist."""

import duckdb
import pyarrow as pa
import pytest

from formathelpers import Crash, run_local, spec_for
from hymba_batch.pipeline.iceberg import list_iceberg_files, load
from hymba_batch.pipeline.shards import InputError


def _catalog(tmp_path, warehouse):
    return {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": warehouse}


def make_table(props):
    cat = load(props)
    cat.create_namespace("news")
    t = cat.create_table("news.articles", schema=pa.schema([("id", pa.int64()), ("text", pa.string())]))
    t.append(pa.table({"id": list(range(5)), "text": [f"Park {i} reopened." for i in range(5)]}))
    first = t.current_snapshot().snapshot_id
    t.append(pa.table({"id": [5, 6, 7], "text": ["Bridge 5.", "Bridge 6.", "Bridge 7."]}))
    return first, t.current_snapshot().snapshot_id


@pytest.mark.parametrize("where", ["local", "s3"])
def test_iceberg_in_iceberg_out_exactly_once_after_crashes(tmp_path, tokenizer_dir, where, request) -> None:
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        warehouse, out = f"s3://{bucket}/warehouse", f"s3://{bucket}/enriched"
    else:
        warehouse, out = f"file://{tmp_path}/warehouse", str(tmp_path / "enriched")
    props = _catalog(tmp_path, warehouse)
    _, latest = make_table(props)
    spec = spec_for(tokenizer_dir, "news.articles", out,
                    input={"format": "iceberg", "catalog": props, "id_column": "id"},
                    output={"format": "iceberg", "table": "news.summaries", "catalog": props})
    with pytest.raises(Crash):
        run_local(spec, tokenizer_dir, crash="before_publish")
    with pytest.raises(Crash):
        run_local(spec, tokenizer_dir, crash="after_publish")
    m = run_local(spec, tokenizer_dir)
    assert m["published"]["already_committed"] is True and m["committed_rows"] == 8
    assert m["input_source"] == {"iceberg_table": "news.articles", "snapshot_id": latest}
    t = load(props).load_table("news.summaries")
    assert len(t.snapshots()) == 1  # one commit for the run
    rows = t.scan().to_arrow()
    assert sorted(rows.column("id").to_pylist()) == list(range(8))  # every row exactly once
    assert rows.column("error").null_count == 8
    if where == "local":
        files = t.inspect.files().column("file_path").to_pylist()
        n = duckdb.sql(f"select count(*), count(distinct id) from read_parquet({files!r})").fetchall()[0]
        assert n == (8, 8)


def test_iceberg_snapshot_and_missing_table(tmp_path, tokenizer_dir) -> None:
    props = _catalog(tmp_path, f"file://{tmp_path}/wh")
    first, _ = make_table(props)
    files, source = list_iceberg_files("news.articles", props, first)
    assert source["snapshot_id"] == first and len(files) == 1
    m = run_local(spec_for(tokenizer_dir, "news.articles", str(tmp_path / "out"),
                           input={"format": "iceberg", "catalog": props, "snapshot_id": first}), tokenizer_dir)
    assert m["committed_rows"] == 5 and m["input_source"]["snapshot_id"] == first
    with pytest.raises(InputError, match="news.nothing: no such Iceberg table"):
        list_iceberg_files("news.nothing", props, None)
    with pytest.raises(InputError, match="no snapshot 12345"):
        list_iceberg_files("news.articles", props, 12345)


def test_catalog_secrets_stay_out_of_the_manifest(tmp_path) -> None:
    from hymba_batch.jobs.driver import spec_record

    props = {"type": "rest", "uri": "https://cat.example", "credential": "id:s3cr3t", "s3.secret-access-key": "Zq9Xw7"}
    spec = spec_for(tmp_path, "news.a", str(tmp_path / "o"), input={"format": "iceberg", "catalog": props},
                    output={"format": "iceberg", "table": "news.b", "catalog": props})
    doc = spec_record(spec)
    text = str(doc)
    assert "s3cr3t" not in text and "Zq9Xw7" not in text
    assert doc["input"]["catalog"]["uri"] == "https://cat.example"

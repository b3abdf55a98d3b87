"""Delta Lake through delta-rs: a table version as input (partition values, the version in the
manifest), a table as output with one commit per run, read back by deltalake and by duckdb,
every row exactly once after a crash between staging and commit or between commit and
manifest; local paths and the loopback S3 API; a path that is not a table."""

import json

import duckdb
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from formathelpers import Crash, S3ServerProcess, run_local, spec_for
from hymba_batch.pipeline.delta import list_delta_files, storage_options
from hymba_batch.pipeline.shards import InputError


def _articles(start, n, region):
    return pa.table({"id": list(range(start, start + n)), "text": [f"Park {i} reopened." for i in range(start, start + n)],
                     "region": [region] * n})


def make_table(uri):
    opts = storage_options(uri)
    write_deltalake(uri, _articles(0, 5, "north"), partition_by=["region"], storage_options=opts)
    write_deltalake(uri, _articles(5, 4, "south"), partition_by=["region"], mode="append", storage_options=opts)
    return 9


@pytest.fixture()
def s3_process():
    """delta-rs holds the GIL in some S3 calls: its S3 server runs in a child process."""
    server = S3ServerProcess()
    yield server
    server.close()


def _roots(where, tmp_path, request):
    if where == "s3":
        bucket = request.getfixturevalue("s3_process").bucket()
        return f"s3://{bucket}/in-table", f"s3://{bucket}/out-table"
    return str(tmp_path / "in-table"), str(tmp_path / "out-table")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_delta_in_delta_out_exactly_once_after_crashes(tmp_path, tokenizer_dir, where, request) -> None:
    src, dst = _roots(where, tmp_path, request)
    rows = make_table(src)
    spec = spec_for(tokenizer_dir, src, dst, input={"format": "delta", "id_column": "id"},
                    output={"format": "delta"})
    with pytest.raises(Crash):  # every unit staged, nothing committed
        run_local(spec, tokenizer_dir, crash="before_publish")
    from hymba_batch.pipeline.delta import try_open
    assert try_open(dst) is None
    with pytest.raises(Crash):  # committed to the table, the manifest never written
        run_local(spec, tokenizer_dir, crash="after_publish")
    m = run_local(spec, tokenizer_dir)
    assert m["published"]["already_committed"] is True
    assert m["input_source"]["delta_version"] == 1 and m["committed_rows"] == rows
    dt = DeltaTable(dst, storage_options=storage_options(dst))
    assert dt.version() == 0  # one commit for the run
    t = dt.to_pyarrow_table()
    assert sorted(t.column("id").to_pylist()) == list(range(rows))  # every row exactly once
    assert set(t.column("region").to_pylist()) == {"north", "south"}
    assert all(f.startswith(src.rstrip("/")) for f in t.column("_source_file").to_pylist())
    assert t.column("error").null_count == rows
    if where == "local":
        n = duckdb.sql(f"select count(*), count(distinct id) from read_parquet({dt.file_uris()!r})").fetchall()[0]
        assert n == (rows, rows)


def test_delta_input_version_and_bad_paths(tmp_path, tokenizer_dir) -> None:
    src = str(tmp_path / "t")
    make_table(src)
    files, source = list_delta_files(src, 0)
    assert source["delta_version"] == 0 and len(files) == 1
    assert files[0].partitions == (("region", "north", "string"),)
    m = run_local(spec_for(tokenizer_dir, src, str(tmp_path / "out"), input={"format": "delta", "version": 0}),
                  tokenizer_dir)
    assert m["committed_rows"] == 5 and m["input_source"]["delta_version"] == 0
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="plain: not a Delta table"):
        list_delta_files(str(tmp_path / "plain"), None)
    with pytest.raises(InputError, match="cannot load version 7"):
        list_delta_files(src, 7)


def test_delta_output_refuses_a_folder_that_is_not_a_table(tmp_path, tokenizer_dir) -> None:
    from hymba_batch.pipeline.commit import OutputConflict

    src = str(tmp_path / "t")
    make_table(src)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("x")
    with pytest.raises(OutputConflict, match="not a Delta table, and not empty"):
        run_local(spec_for(tokenizer_dir, src, str(tmp_path / "out"), input={"format": "delta"},
                           output={"format": "delta"}), tokenizer_dir)

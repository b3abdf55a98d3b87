"""Listing, footers, Hive partitions and deterministic work units (local files and S3)."""

import os

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hymba_batch.pipeline.reader import read_unit
from hymba_batch.pipeline.shards import (InputError, check_schema, list_input_files, plan_units, read_footer,
                                         read_footers)


def _table(n: int, start: int = 0) -> pa.Table:
    return pa.table({"id": list(range(start, start + n)), "text": [f"row {i}" for i in range(start, start + n)]})


def test_listing_skips_hidden_and_underscore_files(tmp_path) -> None:
    pq.write_table(_table(5), tmp_path / "b.parquet")
    pq.write_table(_table(5), tmp_path / "a.parquet")
    (tmp_path / "_SUCCESS").write_bytes(b"")
    (tmp_path / ".a.parquet.crc").write_bytes(b"junk")
    (tmp_path / "_temporary").mkdir()
    pq.write_table(_table(5), tmp_path / "_temporary" / "c.parquet")
    files = list_input_files(str(tmp_path))
    assert [os.path.basename(f.uri) for f in files] == ["a.parquet", "b.parquet"]
    assert all(f.size > 0 and f.mtime_ns > 0 for f in files)


def test_glob_and_single_file(tmp_path) -> None:
    pq.write_table(_table(3), tmp_path / "x.parquet")
    pq.write_table(_table(3), tmp_path / "y.parquet")
    (tmp_path / "notes.txt").write_text("hi")
    assert [os.path.basename(f.uri) for f in list_input_files(str(tmp_path / "*.parquet"))] == ["x.parquet", "y.parquet"]
    assert len(list_input_files(str(tmp_path / "y.parquet"))) == 1
    with pytest.raises(InputError, match="nothing found"):
        list_input_files(str(tmp_path / "missing"))


def test_hive_partitions_become_typed_columns(tmp_path) -> None:
    for year, lang in [(2023, "en"), (2024, "fr")]:
        d = tmp_path / f"year={year}" / f"lang={lang}"
        d.mkdir(parents=True)
        pq.write_table(_table(4), d / "part-0.parquet")
    files = list_input_files(str(tmp_path))
    assert [f.partitions for f in files] == [(("year", 2023, "int64"), ("lang", "en", "string")),
                                             (("year", 2024, "int64"), ("lang", "fr", "string"))]
    units = plan_units(files, read_footers(files), 100)
    t = read_unit(units[1])
    assert t.column("year").to_pylist() == [2024] * 4 and t.column("lang").to_pylist() == ["fr"] * 4


def test_units_pack_row_groups_and_split_large_ones(tmp_path) -> None:
    p = tmp_path / "f.parquet"
    pq.write_table(_table(10), p, row_group_size=3)   # groups of 3,3,3,1
    files = list_input_files(str(p))
    units = plan_units(files, read_footers(files), 7)
    assert [(u.row_start, u.row_end, u.row_groups) for u in units] == [(0, 6, (0, 1)), (6, 10, (2, 3))]
    q = tmp_path / "g.parquet"
    pq.write_table(_table(10), q, row_group_size=10)
    files_q = list_input_files(str(q))
    units_q = plan_units(files_q, read_footers(files_q), 4)
    assert [(u.row_start, u.row_end) for u in units_q] == [(0, 4), (4, 8), (8, 10)]
    assert read_unit(units_q[1]).column("id").to_pylist() == [4, 5, 6, 7]
    # deterministic ids; a rewritten file gets new ids
    again = plan_units(files_q, read_footers(files_q), 4)
    assert [u.unit_id for u in again] == [u.unit_id for u in units_q]
    assert len({u.unit_id for u in units_q}) == 3
    pq.write_table(_table(10), q, row_group_size=10)
    os.utime(q, ns=(1, 1))
    files_q2 = list_input_files(str(q))
    assert {u.unit_id for u in plan_units(files_q2, read_footers(files_q2), 4)}.isdisjoint({u.unit_id for u in units_q})
    with pytest.raises(InputError, match="changed since"):
        read_unit(units_q[0])


def test_bad_files_and_columns_are_named(tmp_path) -> None:
    (tmp_path / "bad.parquet").write_bytes(b"this is not parquet")
    files = list_input_files(str(tmp_path))
    with pytest.raises(InputError, match="bad.parquet: not a readable Parquet file"):
        read_footer(files[0])
    good = tmp_path / "sub"
    good.mkdir()
    pq.write_table(pa.table({"body": ["x"], "n": [1]}), good / "a.parquet")
    f = list_input_files(str(good))[0]
    with pytest.raises(InputError, match=r"a.parquet: no column 'text'.*\['body', 'n'\]"):
        check_schema(f, read_footer(f), "text", set(), set())
    with pytest.raises(InputError, match="'n' .* has type int64"):
        check_schema(f, read_footer(f), "n", set(), set())
    with pytest.raises(InputError, match="collide"):
        check_schema(f, read_footer(f), "body", set(), {"n"})


def test_s3_listing_and_reading(s3_bucket, tmp_path) -> None:
    s3 = boto3.client("s3")
    p = tmp_path / "a.parquet"
    pq.write_table(_table(6), p, row_group_size=2)
    s3.upload_file(str(p), s3_bucket, "in/k=1/a.parquet")
    s3.put_object(Bucket=s3_bucket, Key="in/_SUCCESS", Body=b"")
    s3.put_object(Bucket=s3_bucket, Key="in/.hidden", Body=b"x")
    files = list_input_files(f"s3://{s3_bucket}/in/")
    assert [f.uri for f in files] == [f"s3://{s3_bucket}/in/k=1/a.parquet"]
    assert files[0].partitions == (("k", 1, "int64"),)
    units = plan_units(files, read_footers(files), 4)
    assert [u.num_rows for u in units] == [4, 2]
    assert read_unit(units[1]).column("id").to_pylist() == [4, 5]

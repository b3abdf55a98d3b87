"""JSONL and CSV input: byte-range units at line boundaries, row identity, per-row errors for
lines that do not parse, format detection, local paths and the loopback S3 API."""

import json

import boto3
import pyarrow.dataset as ds
import pytest

from hymba_batch.pipeline.formats import InputOptions, plan_input
from hymba_batch.pipeline.reader import read_unit
from hymba_batch.pipeline.shards import InputError
from hymba_batch.pipeline.textfiles import ROW_ERROR_COLUMN
from formathelpers import run_local, spec_for, write_jsonl


def _plan(uri, fmt=None, rows=3):
    return plan_input(InputOptions(uri=uri, format=fmt, rows_per_unit=rows), {"text"}, set())


def test_jsonl_units_are_line_aligned_byte_ranges(tmp_path) -> None:
    lines = [{"id": i, "text": f"row {i} " + "x" * i} for i in range(8)]
    lines.insert(3, "")  # a blank line is not a row
    write_jsonl(tmp_path / "in" / "a.jsonl", lines)
    plan = _plan(str(tmp_path / "in"))
    assert plan.format == "jsonl"
    assert [(u.row_start, u.row_end) for u in plan.units] == [(0, 3), (3, 6), (6, 8)]
    data = (tmp_path / "in" / "a.jsonl").read_bytes()
    for u in plan.units:
        assert u.span.start == 0 or data[u.span.start - 1:u.span.start] == b"\n"
    assert plan.units[-1].span.end == len(data)
    assert plan.units[1].span.first_line == 5  # line 4 is the blank one
    got = [r["id"] for u in plan.units for r in read_unit(u).to_pylist()]
    assert got == list(range(8))
    again = _plan(str(tmp_path / "in"))
    assert [u.unit_id for u in again.units] == [u.unit_id for u in plan.units]


def test_jsonl_bad_lines_are_row_errors_naming_file_and_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("hymba_batch.pipeline.textfiles.SAMPLE_LINES", 1)  # columns planned from line 1
    f = write_jsonl(tmp_path / "in.jsonl", [{"id": 0, "text": "fine"}, "{not json", "[1, 2]",
                                            {"id": 3, "text": "extra", "surprise": 1},
                                            {"id": "four", "text": "wrong type"}, {"id": 5, "text": "ok"}])
    plan = _plan(str(f), rows=10)
    t = read_unit(plan.units[0])
    errs = t.column(ROW_ERROR_COLUMN).to_pylist()
    assert errs[0] is None and errs[5] is None
    assert errs[1].startswith(f"{f} line 2: not valid JSON")
    assert errs[2] == f"{f} line 3: a JSON list, not an object"
    assert "line 4" in errs[3] and "surprise" in errs[3]
    assert errs[4].startswith(f"{f} line 5: a value does not fit")
    assert t.column("id").to_pylist() == [0, None, None, None, None, 5]


def test_csv_header_ragged_rows_and_quotes(tmp_path) -> None:
    f = tmp_path / "in.csv"
    f.write_text('id,text\n1,"hello, world"\n2\n3,"say ""hi"""\n4,a,b\n')
    plan = _plan(str(f), rows=2)
    assert plan.format == "csv" and [u.num_rows for u in plan.units] == [2, 2]
    rows = [r for u in plan.units for r in read_unit(u).to_pylist()]
    assert [r["text"] for r in rows] == ["hello, world", None, 'say "hi"', None]
    assert rows[1][ROW_ERROR_COLUMN] == f"{f} line 3: 1 fields, the header has 2"
    assert rows[3][ROW_ERROR_COLUMN] == f"{f} line 5: 3 fields, the header has 2"
    assert rows[0][ROW_ERROR_COLUMN] is None


def test_plan_errors_are_clear(tmp_path) -> None:
    (tmp_path / "a.csv").write_text("id,text\n1,a\n")
    (tmp_path / "b.csv").write_text("id,body\n1,a\n")
    with pytest.raises(InputError, match="b.csv: CSV header"):
        _plan(str(tmp_path))
    (tmp_path / "b.csv").unlink()
    with pytest.raises(InputError, match="a.csv: no column 'body'"):
        plan_input(InputOptions(uri=str(tmp_path), text_column="body"), set(), set())
    (tmp_path / "x.jsonl").write_text("{}\n")
    with pytest.raises(InputError, match="several formats"):
        _plan(str(tmp_path))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_jsonl_and_csv_jobs_round_trip(tmp_path, tokenizer_dir, where, request) -> None:
    rows = [{"id": i, "text": f"The park {i} opened."} for i in range(7)]
    write_jsonl(tmp_path / "j" / "a.jsonl", rows[:4] + ["oops"] + rows[4:])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.csv").write_text("id,text\n" + "".join(f'{r["id"]},"{r["text"]}"\n' for r in rows))
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        s3 = boto3.client("s3")
        s3.upload_file(str(tmp_path / "j" / "a.jsonl"), bucket, "in/j/a.jsonl")
        s3.upload_file(str(tmp_path / "c" / "a.csv"), bucket, "in/c/a.csv")
        base_in, base_out = f"s3://{bucket}/in", f"s3://{bucket}/out"
    else:
        base_in, base_out = str(tmp_path), str(tmp_path / "out")
    for fmt, n, bad in (("jsonl", 8, 1), ("csv", 7, 0)):
        spec = spec_for(tokenizer_dir, f"{base_in}/{fmt[0]}/", f"{base_out}/{fmt}/")
        m = run_local(spec, tokenizer_dir)
        assert m["committed_rows"] == m["input_rows"] == n and m["error_rows"] == bad
        assert m["input_format"] == fmt
        if where == "s3":
            import pyarrow.fs as pafs
            fs = pafs.S3FileSystem(endpoint_override=request.getfixturevalue("s3_endpoint"), region="us-east-1")
            t = ds.dataset(f"{bucket}/out/{fmt}/", filesystem=fs, format="parquet").to_table()
        else:
            t = ds.dataset(f"{base_out}/{fmt}/", format="parquet").to_table()
        t = t.sort_by("_source_row")
        assert t.column("_source_row").to_pylist() == list(range(n))
        assert set(t.column("_source_file").to_pylist()) == {f"{base_in}/{fmt[0]}/a.{fmt}"}
        texts = t.column("generated_text").to_pylist()
        assert sum(x is not None for x in texts) == n - bad
        assert ROW_ERROR_COLUMN not in t.column_names
        if fmt == "jsonl":
            assert t.column("error").to_pylist()[4].endswith("line 5: not valid JSON (Expecting value at column 1)")
            assert json.loads(json.dumps(t.column("id").to_pylist()))[5] == 4

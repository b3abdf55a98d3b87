"""Bad input, each with a clear error (naming the file, column or field) or a per-row error, and
nothing lost: files that are not Parquet, truncated or corrupt (Apache's real ``bad_data`` files),
odd but valid files (``data/``: binary text columns, LZ4 codecs), wrong columns and types, bad
rows (null, empty, whitespace, invalid UTF-8, 2 MB of text), zero-row files, schema drift,
duplicate / missing / hostile ids, a bad job spec, a bad checkpoint folder."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from invariants import check_output, input_rows, job
from hymba_batch.jobs.cli import main
from hymba_batch.jobs.driver import run_job
from hymba_batch.jobs.spec import SpecError, parse_spec
from hymba_batch.pipeline.reader import read_unit
from hymba_batch.pipeline.shards import InputError, list_input_files, plan_units, read_footers
from hymba_batch.workers.pool import PoolError

BAD_DATA = ["ARROW-GH-41317.parquet", "ARROW-GH-41321.parquet", "ARROW-GH-43605.parquet", "ARROW-GH-45185.parquet",
            "ARROW-GH-47662.parquet", "ARROW-RS-GH-6229-DICTHEADER.parquet", "ARROW-RS-GH-6229-LEVELS.parquet",
            "PARQUET-1481.parquet"]
READABLE = {"ARROW-GH-43605.parquet"}  # in bad_data for a reader bug, but a valid file


def test_bad_data_folder_is_what_we_expect(parquet_testing) -> None:
    assert sorted(p.name for p in (parquet_testing / "bad_data").glob("*.parquet")) == BAD_DATA


@pytest.mark.parametrize("name", BAD_DATA)
def test_real_corrupt_parquet_gives_an_error_naming_the_file(parquet_testing, tmp_path, name) -> None:
    """Planning (footers) or reading each unit raises InputError with the file's URI, never a
    crash or silently missing rows."""
    shutil.copy(parquet_testing / "bad_data" / name, tmp_path / name)
    files = list_input_files(str(tmp_path))
    try:
        metas = read_footers(files)
        rows = 0
        for u in plan_units(files, metas, 1 << 20):
            rows += read_unit(u).num_rows
    except InputError as e:
        assert name not in READABLE, f"{name} should read: {e}"
        assert str(e).startswith(f"{tmp_path / name}: "), e
        return
    assert name in READABLE, f"{name}: a corrupt file read without an error"
    assert rows == metas[0].num_rows


def _table(n: int, start: int = 0) -> pa.Table:
    return pa.table({"id": list(range(start, start + n)), "text": [f"row {i}" for i in range(start, start + n)]})


def _plan_time_case(case: str, d) -> str:
    """Write one bad input into folder ``d``; returns the file name the error must name."""
    good = d / "a-good.parquet"
    pq.write_table(_table(4), good)
    if case == "not-parquet":
        (d / "b.parquet").write_text("id,text\n1,hello\n")
    elif case == "truncated":
        pq.write_table(_table(50, 10), d / "full.tmp.parquet")
        raw = (d / "full.tmp.parquet").read_bytes()
        (d / "full.tmp.parquet").unlink()
        (d / "b.parquet").write_bytes(raw[: len(raw) // 2])
    elif case == "empty-file":
        (d / "b.parquet").write_bytes(b"")
    elif case == "missing-text-column":
        pq.write_table(pa.table({"id": [1], "body": ["x"]}), d / "b.parquet")
    elif case == "integer-text":
        pq.write_table(pa.table({"id": [1], "text": [5]}), d / "b.parquet")
    elif case == "list-text":
        pq.write_table(pa.table({"id": [1], "text": [["a", "b"]]}), d / "b.parquet")
    elif case == "struct-text":
        pq.write_table(pa.table({"id": [1], "text": [{"a": "x"}]}), d / "b.parquet")
    elif case == "missing-id-column":
        pq.write_table(pa.table({"text": ["x"]}), d / "b.parquet")
    elif case == "reserved-column":
        pq.write_table(pa.table({"id": [1], "text": ["x"], "generated_text": ["y"]}), d / "b.parquet")
    return "b.parquet"


PLAN_CASES = {
    "not-parquet": "not a readable Parquet file", "truncated": "not a readable Parquet file",
    "empty-file": "not a readable Parquet file", "missing-text-column": "no column 'text'",
    "integer-text": "has type int64", "list-text": "has type list", "struct-text": "has type struct",
    "missing-id-column": "missing column(s) ['id']", "reserved-column": "collide with the output columns",
}


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_bad_files_and_columns_fail_before_anything_is_written(tiny_checkpoint, tmp_path, case) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    name = _plan_time_case(case, src)
    with pytest.raises(InputError) as e:
        run_job(parse_spec(job(tiny_checkpoint, str(src), str(out))))
    assert f"{src / name}" in str(e.value) and PLAN_CASES[case] in str(e.value), str(e.value)
    assert not out.exists(), "a job with bad input wrote to its output"


def test_cli_reports_bad_input_and_bad_uris_with_exit_code_2(tiny_checkpoint, tmp_path, capsys) -> None:
    src = tmp_path / "in"
    src.mkdir()
    _plan_time_case("not-parquet", src)
    spec = tmp_path / "job.json"  # JSON is YAML
    spec.write_text(json.dumps(job(tiny_checkpoint, str(src), str(tmp_path / "out"))))
    assert main(["run", str(spec), "--no-progress"]) == 2
    assert "b.parquet: not a readable Parquet file" in capsys.readouterr().err
    for field, value in [("input.uri", "ftp://host/data/"), ("output.uri", "gs://bucket/out/"),
                         ("input.uri", "s3://"), ("output.uri", "s3:///key")]:
        assert main(["run", str(spec), "--no-progress", "--set", f"{field}={value}"]) == 2
        err = capsys.readouterr().err
        assert field in err and value.split("/")[0] in err, err
    assert not (tmp_path / "out").exists()


def test_bad_job_specs_name_the_field() -> None:
    base = job("m", "in/", "out/")
    cases = [
        ({"task": {**base["task"], "max_new_tokns": 4}}, "task.max_new_tokns: unknown field"),
        ({"resources": {**base["resources"], "num_actors": "many"}}, "resources.num_actors"),
        ({"task": {**base["task"], "temperature": "hot"}}, "task.temperature"),
        ({"output": {**base["output"], "format": "csv"}}, "output.format"),
        ({"input": {**base["input"], "rows_per_unit": 0}}, "input.rows_per_unit"),
        ({"name": "../../etc"}, "name"),
        ({"extra": 1}, "extra: unknown field"),
    ]
    for change, msg in cases:
        with pytest.raises(SpecError) as e:
            parse_spec({**base, **change}, source="job.yaml")
        assert msg in str(e.value) and "job.yaml" in str(e.value), (change, str(e.value))


def test_odd_but_valid_parquet_files_run(ray_cluster, tiny_checkpoint, parquet_testing, tmp_path) -> None:
    """Three files of Apache's ``data/`` with a binary text column ``c1`` and three LZ4
    flavours (Hadoop framing, raw, the old non-Hadoop one): every row comes out once."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name in ["hadoop_lz4_compressed.parquet", "lz4_raw_compressed.parquet", "non_hadoop_lz4_compressed.parquet"]:
        shutil.copy(parquet_testing / "data" / name, src / name)
    spec = parse_spec(job(tiny_checkpoint, str(src), str(out),
                          input={"text_column": "c1", "id_column": None, "rows_per_unit": 4},
                          task={"max_new_tokens": 2}))
    summary = run_job(spec)
    assert summary.state == "succeeded" and summary.committed_rows == 12
    got = check_output(str(out), input_rows(str(src)))
    for t in got["tables"].values():
        texts, errors = t.column("c1").to_pylist(), t.column("error").to_pylist()
        for text, err in zip(texts, errors):
            assert (err is None) == bool(text and text.strip()), (text, err)


def test_bad_rows_are_row_errors_and_nothing_is_lost(ray_cluster, tiny_checkpoint, tmp_path) -> None:
    """One job over: null / empty / whitespace text, invalid UTF-8 in a binary text column,
    a 2 MB text (truncated to what a 3 MiB engine cache holds), a zero-row file, schema drift
    (an extra column, the id's type, string vs binary text), duplicate and missing ids, and ids
    with '/', '..' and control characters. Output names come from unit ids only."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    big = ("The council met again. " * 90_000)[:2_000_000]
    hostile = ["../../../etc/passwd", "a/b/c", "dup", "dup", None, "ctl\x00\x1b[31m\n\r\t"]
    pq.write_table(pa.table({"id": hostile, "text": ["first row", None, "", " \n\t ", big, "last row"]}),
                   src / "a.parquet", row_group_size=3)
    pq.write_table(pa.table({"id": ["x", "y", "z"],
                             "text": pa.array([b"valid bytes", b"\xff\xfe not utf-8", None], pa.binary()),
                             "extra": [1, 2, 3]}), src / "b.parquet")
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}), src / "c.parquet")
    pq.write_table(pa.table({"id": [7, 7], "text": ["int ids", "same id twice"]}), src / "d.parquet")
    spec = parse_spec(job(tiny_checkpoint, str(src), str(out), model={"cache_budget_mb": 3},
                          task={"max_new_tokens": 2}, output={"mode": "results"}))
    summary = run_job(spec)
    assert summary.state == "succeeded" and summary.committed_rows == 11
    got = check_output(str(out), input_rows(str(src)))
    rows = {}
    for t in got["tables"].values():
        for r in t.to_pylist():
            rows[(r["_source_file"].rsplit("/", 1)[1], r["_source_row"])] = r
    assert len(rows) == 11
    assert [rows[("a.parquet", i)]["id"] for i in range(6)] == hostile  # kept verbatim, never in a path
    assert rows[("a.parquet", 1)]["error"] == "text is null (column 'text')"
    assert rows[("a.parquet", 2)]["error"] == rows[("a.parquet", 3)]["error"] == "text is empty (column 'text')"
    huge = rows[("a.parquet", 4)]
    assert huge["error"] is None and huge["truncated"] and 2000 < huge["prompt_tokens"] <= 38 * 64 - 2, huge
    assert rows[("b.parquet", 1)]["error"].startswith("text is not valid UTF-8")
    assert rows[("b.parquet", 2)]["error"] == "text is null (column 'text')"
    ok = [k for k, r in rows.items() if r["error"] is None]
    assert sorted(ok) == [("a.parquet", 0), ("a.parquet", 4), ("a.parquet", 5), ("b.parquet", 0),
                          ("d.parquet", 0), ("d.parquet", 1)]
    assert all(rows[k]["completion_tokens"] >= 1 for k in ok)
    assert got["manifest"]["error_rows"] == 5 and got["manifest"]["truncated_rows"] == 1


def _broken_checkpoint(src, dst, how: str):
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if how == "not-hymba":
        cfg = json.loads((dst / "config.json").read_text())
        cfg["model_type"] = "llama"
        (dst / "config.json").write_text(json.dumps(cfg))
        return
    sd = load_file(str(dst / "model.safetensors"))
    if how == "missing-tensor":
        sd.pop("model.layers.3.mamba.D.0")
    elif how == "wrong-shape":
        sd["model.final_layernorm.weight"] = torch.ones(7)
    elif how == "wrong-dtype":
        sd["model.final_layernorm.weight"] = sd["model.final_layernorm.weight"].to(torch.int32)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("how,msg", [("not-hymba", "not a Hymba config"),
                                     ("wrong-dtype", "'model.final_layernorm.weight' has dtype torch.int32")])
def test_bad_checkpoint_fails_fast_naming_the_problem(ray_cluster, tiny_checkpoint, tmp_path, how, msg) -> None:
    """(Missing tensors and wrong shapes: tests/model/test_loader.py, same error path.)"""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    pq.write_table(_table(4), src / "a.parquet")
    ckpt = tmp_path / "ckpt"
    _broken_checkpoint(tiny_checkpoint, ckpt, how)
    with pytest.raises(PoolError) as e:
        run_job(parse_spec(job(ckpt, str(src), str(out))))
    assert msg in str(e.value), str(e.value)[-2000:]
    assert [p.name for p in out.iterdir()] == ["_hymba"]  # only the claim and the failed status
    doc = json.loads((out / "_hymba" / "status.json").read_text())
    assert doc["state"] == "failed" and msg in doc["error"]


def test_failed_job_that_committed_nothing_does_not_pin_its_fingerprint(ray_cluster, tiny_checkpoint,
                                                                         tmp_path) -> None:
    """A job whose actors cannot load the model fails with nothing committed; the corrected job
    (another model, so another fingerprint) then runs into the same output without --restart."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    pq.write_table(_table(4), src / "a.parquet")
    ckpt = tmp_path / "ckpt"
    _broken_checkpoint(tiny_checkpoint, ckpt, "not-hymba")
    with pytest.raises(PoolError):
        run_job(parse_spec(job(ckpt, str(src), str(out))))
    assert json.loads((out / "_hymba" / "status.json").read_text())["state"] == "failed"
    summary = run_job(parse_spec(job(tiny_checkpoint, str(src), str(out))))
    assert summary.state == "succeeded" and summary.committed_rows == 4
    check_output(str(out), input_rows(str(src)))

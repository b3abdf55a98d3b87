"""Unit files, the commit protocol and resume/refusal at the output prefix (local and S3),
driven through UnitRunner with a plain deterministic generate function (no model needed)."""

import os

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from hymba_batch.pipeline.commit import JobOutput, OutputConflict
from hymba_batch.pipeline.fs import resolve
from hymba_batch.pipeline.prompts import PromptConfig
from hymba_batch.pipeline.shards import list_input_files, plan_units, read_footers
from hymba_batch.pipeline.tokenizer import load_codec
from hymba_batch.pipeline.unit import Generation, OutputConfig, SamplingConfig, UnitRunner
from hymba_batch.pipeline.writer import OUTPUT_SCHEMA


def echo_generate(prompts, seeds):
    """Returns the prompt's last three tokens then EOS: deterministic, checkable."""
    return [Generation(list(p[-3:]) + [2], "stop", len(p)) for p in prompts]


@pytest.fixture()
def units(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"id": [0, 1, 2, 3, 4], "text": ["alpha", None, "gamma", "", "epsilon"]}),
                   src / "a.parquet", row_group_size=2)
    files = list_input_files(str(src))
    return plan_units(files, read_footers(files), 2)


def _runner(codec, uri, fmt="parquet", mode="enrich", id_column="id"):
    return UnitRunner(PromptConfig(kind="generate", chat=False), OutputConfig(uri, fmt, mode, id_column),
                      SamplingConfig(max_new_tokens=4), codec, 1000, echo_generate)


@pytest.mark.parametrize("fmt,mode", [("parquet", "enrich"), ("arrow", "results")])
def test_units_commit_and_finalize(tmp_path, units, tokenizer_dir, fmt, mode) -> None:
    codec = load_codec(tokenizer_dir)
    uri = str(tmp_path / "out")
    out = JobOutput(uri, fmt)
    assert out.prepare("fp-a", {"x": 1}, restart=False) == "new"
    runner = _runner(codec, uri, fmt, mode)
    results = [runner.run(u) for u in units]
    assert sum(r.rows for r in results) == 5 and sum(r.error_rows for r in results) == 2
    assert runner.run(units[0]).reused  # a retried unit is never written twice
    manifest = out.finalize(units, {"job": "t"})
    assert manifest["committed_rows"] == manifest["input_rows"] == 5
    assert os.path.exists(f"{uri}/_SUCCESS") and not os.path.exists(f"{uri}/_hymba/tmp")
    assert not [n for n in os.listdir(uri) if n.startswith(".")]  # no temp files left
    t = ds.dataset(uri, format="parquet" if fmt == "parquet" else "arrow").to_table().sort_by("_source_row")
    expected = (["id", "text"] if mode == "enrich" else ["id"]) + OUTPUT_SCHEMA.names
    assert t.column_names == expected
    assert t.column("_source_row").to_pylist() == [0, 1, 2, 3, 4]
    assert t.column("generated_text").to_pylist() == ["alpha", None, "gamma", None, "epsilon"]
    assert t.column("error").to_pylist()[1].startswith("text is null")
    assert t.column("finish_reason").to_pylist() == ["stop", "error", "stop", "error", "stop"]


def test_finalize_refuses_missing_rows(tmp_path, units, tokenizer_dir) -> None:
    uri = str(tmp_path / "out")
    out = JobOutput(uri, "parquet")
    out.prepare("fp", {}, False)
    runner = _runner(load_codec(tokenizer_dir), uri)
    for u in units[:-1]:
        runner.run(u)
    with pytest.raises(OutputConflict, match="1 unit"):
        out.finalize(units, {})
    assert not os.path.exists(f"{uri}/_SUCCESS") and not os.path.exists(f"{uri}/_hymba/manifest.json")


def test_fingerprint_change_refused_unless_restart(tmp_path, units, tokenizer_dir) -> None:
    uri = str(tmp_path / "out")
    out = JobOutput(uri, "parquet")
    out.prepare("fp-1", {"prompt": "a", "model": "m"}, False)
    _runner(load_codec(tokenizer_dir), uri).run(units[0])
    assert out.prepare("fp-1", {"prompt": "a", "model": "m"}, False) == "resume"
    assert set(out.committed(units)) == {units[0].unit_id}
    with pytest.raises(OutputConflict, match="changed: prompt"):
        out.prepare("fp-2", {"prompt": "b", "model": "m"}, False)
    assert out.prepare("fp-2", {"prompt": "b", "model": "m"}, True) == "restart"
    assert out.committed(units) == {}


def test_fingerprint_of_a_run_that_committed_nothing_is_not_pinned(tmp_path, units, tokenizer_dir) -> None:
    """A failed run (claimed the prefix, status `failed`, committed no unit) does not hold the
    output: the corrected job starts without --restart; once a unit is committed, it does."""
    uri = str(tmp_path / "out")
    out = JobOutput(uri, "parquet")
    assert out.prepare("fp-bad", {"model": "missing"}, False) == "new"
    for running in (None, {"state": "running"}):  # a run that may still be going keeps its claim
        if running:
            out.write_status(running)
        with pytest.raises(OutputConflict, match="changed: model"):
            out.prepare("fp-good", {"model": "m"}, False)
    out.write_status({"state": "failed", "error": "no such checkpoint folder"})
    assert not out.holds_commits() and out.released()
    assert out.prepare("fp-good", {"model": "m"}, False) == "new"
    assert JobOutput(uri, "parquet").read_status() is None  # the failed run's files are gone
    _runner(load_codec(tokenizer_dir), uri).run(units[0])
    assert out.holds_commits()
    with pytest.raises(OutputConflict, match="changed: model"):
        out.prepare("fp-other", {"model": "n"}, False)
    assert set(out.committed(units)) == {units[0].unit_id}  # the refusal kept the committed unit


def test_foreign_files_in_output_are_refused(tmp_path) -> None:
    d = tmp_path / "out"
    d.mkdir()
    (d / "someone-elses.csv").write_text("a,b")
    with pytest.raises(OutputConflict, match="not this job's"):
        JobOutput(str(d), "parquet").prepare("fp", {}, restart=True)


def test_s3_unit_commit_is_atomic_and_listed(s3_bucket, units, tokenizer_dir) -> None:
    uri = f"s3://{s3_bucket}/out"
    out = JobOutput(uri, "parquet")
    out.prepare("fp", {}, False)
    runner = _runner(load_codec(tokenizer_dir), uri)
    for u in units:
        runner.run(u)
    out.finalize(units, {"job": "s3"})
    loc = resolve(uri)
    from pyarrow.fs import FileSelector, FileType
    names = sorted(i.path.split("/", 1)[1] for i in loc.fs.get_file_info(FileSelector(loc.path, recursive=True))
                   if i.type == FileType.File)
    assert [n for n in names if "tmp" in n] == []
    assert "out/_SUCCESS" in names and "out/_hymba/manifest.json" in names
    assert len([n for n in names if n.startswith("out/part-")]) == len(units)
    t = ds.dataset(f"{s3_bucket}/out", filesystem=loc.fs, format="parquet").to_table()
    assert sorted(t.column("id").to_pylist()) == [0, 1, 2, 3, 4]


def test_engine_rejected_rows_become_row_errors(tmp_path, units, tokenizer_dir) -> None:
    def picky_generate(prompts, seeds):
        return [Generation([], "error", len(p), error="prompt rejected by the engine") if i == 0
                else Generation([7, 2], "stop", len(p)) for i, p in enumerate(prompts)]

    uri = str(tmp_path / "out")
    JobOutput(uri, "parquet").prepare("fp", {}, False)
    runner = UnitRunner(PromptConfig(kind="generate", chat=False), OutputConfig(uri), SamplingConfig(),
                        load_codec(tokenizer_dir), 1000, picky_generate)
    res = runner.run(units[0])  # rows "alpha", None
    assert res.rows == 2 and res.error_rows == 2
    t = pq.read_table(f"{uri}/part-{units[0].unit_id}.parquet")
    assert t.column("error").to_pylist() == ["prompt rejected by the engine", "text is null (column 'text')"]
    assert t.column("finish_reason").to_pylist() == ["error", "error"]
    res2 = runner.run(units[2])  # row "epsilon": first prompt of that call, rejected too; the unit still commits
    assert res2.rows == 1 and os.path.exists(f"{uri}/part-{units[2].unit_id}.parquet")


def test_units_in_flight_prepare_one_at_a_time(tmp_path, tokenizer_dir) -> None:
    """An actor starts several units at once: each reads and builds its prompts in turn, so the
    first unit's prompts reach the engine after one unit's preparation, not after all of them."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"id": list(range(12)), "text": [f"row {i}" for i in range(12)]}), src / "a.parquet",
                   row_group_size=3)
    files = list_input_files(str(src))
    units = plan_units(files, read_footers(files), 3)
    spans, calls, lock = [], [], threading.Lock()

    def generate(prompts, seeds):
        with lock:
            calls.append(time.perf_counter())
        return echo_generate(prompts, seeds)

    runner = UnitRunner(PromptConfig(kind="generate", chat=False), OutputConfig(str(tmp_path / "out")),
                        SamplingConfig(max_new_tokens=4), load_codec(tokenizer_dir), 1000, generate)
    build = runner.prompts.build_batch

    def slow_build(rows):
        t = time.perf_counter()
        time.sleep(0.1)  # stands in for a unit's tokenization
        out = build(rows)
        with lock:
            spans.append((t, time.perf_counter()))
        return out

    runner.prompts.build_batch = slow_build
    with ThreadPoolExecutor(len(units)) as ex:
        results = list(ex.map(runner.run, units))
    assert len(units) == 4 and sum(r.rows for r in results) == 12 and len(calls) == 4
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # never two at once
    assert min(calls) < spans[-1][0]  # the first unit generated before the last began its prompts

"""The job's shared prompt prefix and several samples per row (issue 14 items 7 and 4):
``SharedPrefix`` against a recording engine, then whole jobs on the real local Ray cluster with
a tiny checkpoint: output with prefix sharing == without; ``task.n`` samples."""

import json

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from jobhelpers import job_dict, write_articles
from hymba_batch.jobs.driver import run_job
from hymba_batch.jobs.spec import SpecError, parse_spec
from hymba_batch.workers.prefix import SharedPrefix, common_prefix_len

FEW_SHOT = ("You label short news items with one word.\n"
            "Item: The mayor opened a new library downtown. Label: culture\n"
            "Item: The team won the final match on Sunday. Label: sport\n"
            "Item: Prices of bread rose again this month. Label: economy\n"
            "Item: {{ text }} Label:")


class _Recorder:
    def __init__(self):
        self.added, self.released = [], []

    def add_prefix(self, ids, parent=None):
        self.added.append(list(ids))
        return len(self.added) - 1

    def release_prefix(self, pid):
        self.released.append(pid)


def test_common_prefix_len():
    assert common_prefix_len([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_len([[5, 6]]) == 2 and common_prefix_len([]) == 0
    assert common_prefix_len([[1, 2], [3]]) == 0


def test_shared_prefix_shrinks_to_the_common_head_and_releases_what_it_replaced():
    eng = _Recorder()
    sp = SharedPrefix(eng, min_tokens=3)
    head = [1, 7, 7, 7, 7]
    held, rest = sp.split([head + [9, 9, 9]])  # one row: all but its last token
    assert eng.added == [head + [9, 9]] and rest == [[9]]
    held2, rest2 = sp.split([head + [9, 8, 1], head + [4]])  # diverges earlier: a shorter prefix
    assert eng.added[1] == head and rest2 == [[9, 8, 1], [4]]
    assert eng.released == []  # the first is still in use
    sp.done(held)
    assert eng.released == [0]
    held3, rest3 = sp.split([head + [2, 2]])  # same head: reused, nothing new
    assert held3 is held2 and len(eng.added) == 2 and rest3 == [[2, 2]]
    sp.done(held2), sp.done(held3)
    none, same = sp.split([[1, 7], [1, 8]])  # common part under min_tokens: no prefix, the old one stays
    assert none is None and same == [[1, 7], [1, 8]] and eng.released == [0]
    assert sp.split([head + [5]])[0] is held2


def _rows(uri: str, cols=("generated_text",)) -> list[tuple]:
    t = ds.dataset(uri, format="parquet").to_table()
    keys = ["_source_file", "_source_row", *cols]
    return sorted(zip(*(t.column(k).to_pylist() for k in keys)))


def _forked_tokens(uri: str) -> float:
    return max(json.loads(pq.read_schema(f).metadata[b"hymba.unit"])["timings"].get("engine_forked_tokens", 0)
               for f in ds.dataset(uri, format="parquet").files)


@pytest.fixture(scope="module")
def articles(tmp_path_factory):
    d = tmp_path_factory.mktemp("articles")
    return d, write_articles(d, files=2, rows=6)


def test_job_output_is_the_same_with_and_without_prefix_sharing(ray_cluster, tiny_checkpoint, articles, tmp_path):
    src, n = articles
    task = {"kind": "template", "template": FEW_SHOT, "max_new_tokens": 6}
    outs = {}
    for share in (True, False):
        out = str(tmp_path / f"share-{share}")
        spec = parse_spec(job_dict(tiny_checkpoint, str(src), out, task={**task, "share_prefix": share}))
        assert run_job(spec).state == "succeeded"
        outs[share] = out
    assert _rows(outs[True]) == _rows(outs[False]) and len(_rows(outs[True])) == n
    assert _forked_tokens(outs[True]) >= 60 * n and _forked_tokens(outs[False]) == 0


def test_n_samples_land_in_a_list_column_and_the_first_is_the_single_sample(ray_cluster, tiny_checkpoint,
                                                                           articles, tmp_path):
    src, n = articles
    task = {"kind": "template", "template": FEW_SHOT, "max_new_tokens": 5, "temperature": 1.0, "seed": 3}
    runs = {}
    for name, extra in {"n3": {"n": 3}, "n3-unshared": {"n": 3, "share_prefix": False}, "n1": {}}.items():
        out = str(tmp_path / name)
        assert run_job(parse_spec(job_dict(tiny_checkpoint, str(src), out, task={**task, **extra}))).state == "succeeded"
        runs[name] = out
    n3 = _rows(runs["n3"], ("generated_text", "samples", "completion_tokens"))
    assert n3 == _rows(runs["n3-unshared"], ("generated_text", "samples", "completion_tokens"))
    n1 = _rows(runs["n1"])
    assert len(n3) == n and all(len(r[3]) == 3 and r[2] == r[3][0] for r in n3)
    assert [r[2] for r in n3] == [r[2] for r in n1]  # sample 0 keeps the row's seed
    assert any(len(set(r[3])) > 1 for r in n3)  # the samples differ
    assert "samples" not in ds.dataset(runs["n1"], format="parquet").schema.names


def test_n_above_one_needs_temperature(tiny_checkpoint, tmp_path):
    with pytest.raises(SpecError, match="task.n is 3: several samples need task.temperature > 0"):
        parse_spec(job_dict(tiny_checkpoint, str(tmp_path), str(tmp_path / "o"), task={"n": 3}))
    with pytest.raises(SpecError, match="task.n"):
        parse_spec(job_dict(tiny_checkpoint, str(tmp_path), str(tmp_path / "o"), task={"n": 17, "temperature": 1}))

"""Long documents, ``task.long_input: map_reduce``: splitting at paragraph / sentence / word
boundaries, and whole units through UnitRunner with a recording generate function and the real
tokenizer (chunk prompts within the limit, recursion until it fits, one output row per input
row, ``chunks``), then one job on the real local Ray cluster with a tiny checkpoint."""

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from jobhelpers import job_dict
from hymba_batch.pipeline.longdoc import split_text
from hymba_batch.pipeline.prompts import PromptConfig
from hymba_batch.pipeline.shards import list_input_files, plan_units, read_footers
from hymba_batch.pipeline.tokenizer import load_codec
from hymba_batch.pipeline.unit import Generation, OutputConfig, SamplingConfig, UnitRunner



def _words(t: str) -> int:
    return len(t.split())


def _norm(t: str) -> str:
    return " ".join(t.split())


def test_split_prefers_paragraphs_then_sentences_then_words():
    paras = ["one two three. four five six.", "seven eight nine ten.", "eleven twelve."]
    text = "\n\n".join(paras)
    assert split_text(text, 6, _words) == [paras[0], "\n\n".join(paras[1:])]  # whole paragraphs, packed
    assert split_text(text, 100, _words) == [text]
    chunks = split_text(text, 3, _words)  # the first paragraph is cut at its sentence end
    assert chunks[:2] == ["one two three.", "four five six."]
    assert all(_words(c) <= 3 for c in chunks) and _norm(" ".join(chunks)) == _norm(text)
    long_word = "x" * 50
    chunks = split_text(f"a b {long_word}", 2, lambda t: max(len(t) // 10, len(t.split())))
    assert "".join(chunks).replace(" ", "") == "ab" + long_word


def _long_text(paragraphs: int, seed: int) -> str:
    return "\n\n".join(f"Paragraph {seed}-{p}: the council met about park {p} and voted on the budget. "
                       f"Residents spoke for an hour about trees, benches and lights." for p in range(paragraphs))


def _write(folder, texts):
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), folder / "part-0.parquet")
    files = list_input_files(str(folder))
    return plan_units(files, read_footers(files), 100)


def test_map_reduce_unit_cuts_long_rows_and_keeps_one_row_each(tokenizer_dir, tmp_path):
    codec = load_codec(tokenizer_dir)
    texts = ["A short note.", _long_text(3, 1), _long_text(12, 2), None]
    units = _write(tmp_path / "in", texts)
    sent: list[list[int]] = []

    def generate(prompts, seeds):
        sent.extend(prompts)
        return [Generation(codec.encode_fragment(" A short summary of it."), "stop", len(p)) for p in prompts]

    limit = 60
    runner = UnitRunner(PromptConfig(kind="summarize", chat=False, max_input_tokens=limit, long_input="map_reduce"),
                        OutputConfig(str(tmp_path / "out")), SamplingConfig(max_new_tokens=8), codec, 1000, generate)
    res = runner.run(units[0])
    t = pq.read_table(res.output_path)
    assert t.num_rows == 4 and t.column("_source_row").to_pylist() == [0, 1, 2, 3]
    chunks = t.column("chunks").to_pylist()
    assert chunks[0] == 1 and 1 < chunks[1] < chunks[2] and chunks[3] is None
    assert t.column("generated_text").to_pylist()[:3] == [" A short summary of it."] * 3
    assert t.column("error").to_pylist()[:3] == [None] * 3 and "null" in t.column("error")[3].as_py()
    assert max(map(len, sent)) <= limit
    # row 2 needed a second round: its first round's summaries did not fit together
    one_round = 1 + chunks[1] + 1 + 1 + chunks[2] + 1
    assert len(sent) > one_round
    assert t.column("truncated").to_pylist() == [False] * 4
    assert res.rows == 4 and res.error_rows == 1


def test_map_reduce_job_on_ray(ray_cluster, tiny_checkpoint, tmp_path):
    texts = [_long_text(4, i) if i % 2 else f"Short text {i}." for i in range(6)]
    pq.write_table(pa.table({"id": list(range(6)), "text": texts}), tmp_path / "in.parquet")
    from hymba_batch.jobs.driver import run_job
    from hymba_batch.jobs.spec import parse_spec

    out = str(tmp_path / "out")
    spec = parse_spec(job_dict(tiny_checkpoint, str(tmp_path / "in.parquet"), out,
                               task={"long_input": "map_reduce", "max_input_tokens": 64, "max_new_tokens": 6}))
    assert run_job(spec).state == "succeeded"
    t = ds.dataset(out, format="parquet").to_table().sort_by("_source_row")
    assert t.column("_source_row").to_pylist() == list(range(6))
    chunks = t.column("chunks").to_pylist()
    assert [c > 1 for c in chunks] == [i % 2 == 1 for i in range(6)]
    assert t.column("error").to_pylist() == [None] * 6 and all(x is not None for x in t.column("generated_text").to_pylist())


def test_map_reduce_needs_a_text_column(tiny_checkpoint, tmp_path):
    from hymba_batch.jobs.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match="task.long_input is 'map_reduce'"):
        parse_spec(job_dict(tiny_checkpoint, str(tmp_path), str(tmp_path / "o"), input={"text_column": None},
                            task={"kind": "template", "template": "{{ a }}", "long_input": "map_reduce"}))

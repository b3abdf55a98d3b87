"""Enrichment end to end through a unit, in process: a real Engine on a tiny random checkpoint
behind the actor's own request building (``request_params`` / ``generations``), the real
tokenizer, UnitRunner writing Parquet. JSON schema (every row parses and validates even with
random weights; ``structured`` has the schema's Arrow types; cut rows are row errors), classify
(probabilities sum to 1, the label is the argmax, and they agree with the model's logits), stop
strings across token boundaries, log-probabilities, chat messages and penalties."""

import json
import math

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hymba_batch.model import load_model
from hymba_batch.model.engine import Engine
from hymba_batch.pipeline.enrich import EnrichConfig
from hymba_batch.pipeline.prompts import PromptConfig
from hymba_batch.pipeline.shards import list_input_files, plan_units, read_footers
from hymba_batch.pipeline.stops import StopStrings
from hymba_batch.pipeline.tokenizer import load_codec
from hymba_batch.pipeline.unit import OutputConfig, SamplingConfig, UnitRunner
from hymba_batch.workers.actor import generations, request_params

torch.set_num_threads(1)

SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
        "urgent": {"type": "boolean"},
        "topic": {"type": "string", "maxLength": 6},
        "tags": {"type": "array", "items": {"enum": ["a", "bb"]}, "maxItems": 2},
        "weight": {"type": ["integer", "null"], "minimum": 0, "maximum": 3},
    },
    "required": ["sentiment", "score", "urgent", "topic", "tags"],
}
EXPECTED = pa.struct([
    pa.field("sentiment", pa.string(), nullable=False), pa.field("score", pa.int64(), nullable=False),
    pa.field("urgent", pa.bool_(), nullable=False), pa.field("topic", pa.string(), nullable=False),
    pa.field("tags", pa.list_(pa.field("item", pa.string(), nullable=False)), nullable=False),
    pa.field("weight", pa.int64()),
])
TEXTS = ["The council met about the park and voted.", "Rain tomorrow.", "Shares fell sharply.",
         "A new bakery opened downtown.", "The match ended in a draw.", "Prices rose again."]


@pytest.fixture(scope="module")
def setup(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    return model, Engine(model), load_codec(tiny_checkpoint)


def _run(setup, tmp_path, enrich, sampling=SamplingConfig(max_new_tokens=160), texts=TEXTS, prompt=None,
         table=None):
    model, engine, codec = setup
    src = tmp_path / "in"
    src.mkdir(parents=True)
    pq.write_table(table if table is not None else pa.table({"id": list(range(len(texts))), "text": texts}),
                   src / "a.parquet")
    files = list_input_files(str(src))
    (unit,) = plan_units(files, read_footers(files), 100)

    def gen(prompts, seeds, options=None):
        return generations(engine.generate(prompts, request_params(sampling, seeds, options, codec.eos_token_id)))

    runner = UnitRunner(prompt or PromptConfig(kind="generate", chat=False), OutputConfig(str(tmp_path / "out")),
                        sampling, codec, 1000, gen, enrich=enrich, vocab_size=model.config.vocab_size)
    res = runner.run(unit)
    return pq.read_table(res.output_path), res


def test_every_row_of_a_bounded_schema_parses_validates_and_is_typed(setup, tmp_path):
    t, res = _run(setup, tmp_path, EnrichConfig(json_schema=json.dumps(SCHEMA)))
    assert t.schema.field("structured").type == EXPECTED
    assert res.error_rows == 0
    for row in t.to_pylist():
        assert row["error"] is None and row["finish_reason"] == "stop"
        value = json.loads(row["generated_text"])
        jsonschema.validate(value, SCHEMA)
        assert " " not in row["generated_text"].replace(value["topic"], "")  # compact: no free whitespace
        assert row["structured"] == {**{"weight": None}, **value}


def test_a_value_cut_by_max_new_tokens_is_a_row_error(setup, tmp_path):
    t, res = _run(setup, tmp_path, EnrichConfig(json_schema=json.dumps(SCHEMA)), SamplingConfig(max_new_tokens=4))
    assert res.error_rows == len(TEXTS)
    for row in t.to_pylist():
        assert row["structured"] is None and row["finish_reason"] == "length"
        assert "cut by task.max_new_tokens" in row["error"] and row["generated_text"].startswith('{"')


def test_classify_scores_labels_like_the_models_logits(setup, tmp_path):
    model, _, codec = setup
    labels = ("positive", "negative", "mixed feelings", "neutral")
    t, res = _run(setup, tmp_path, EnrichConfig(kind="classify", labels=labels),
                  prompt=PromptConfig(kind="classify", chat=False, prompt="Sentiment?"), texts=TEXTS[:3])
    assert res.error_rows == 0
    assert t.schema.field("label_probs").type == pa.struct([pa.field(x, pa.float64(), nullable=False) for x in labels])
    for text, row in zip(TEXTS, t.to_pylist()):
        probs = row["label_probs"]
        assert list(probs) == list(labels) and math.isclose(sum(probs.values()), 1.0, abs_tol=1e-9)
        assert row["label"] == max(labels, key=probs.__getitem__) == row["generated_text"]
        prompt = codec.encode_prompts([f"Sentiment?\n\n{text}"], chat=False)[0]
        loglik = []
        for label in labels:
            ids = codec.encode_fragment(label)
            lp = torch.log_softmax(model.logits(torch.tensor(prompt + ids)), -1)
            loglik.append(sum(lp[len(prompt) - 1 + j, t_].item() for j, t_ in enumerate(ids)))
        ref = torch.softmax(torch.tensor(loglik, dtype=torch.float64), 0).tolist()
        assert [probs[x] for x in labels] == pytest.approx(ref, abs=1e-4)


def test_a_stop_string_split_across_two_tokens_ends_the_row(setup, tmp_path):
    _, engine, codec = setup
    free, _ = _run(setup, tmp_path / "free", EnrichConfig(), SamplingConfig(max_new_tokens=24), texts=TEXTS[:1])
    text = free.column("generated_text")[0].as_py()
    prompt = codec.encode_prompts([TEXTS[0]], chat=False)[0]
    ids = engine.generate([prompt], request_params(SamplingConfig(max_new_tokens=24), [0], None, codec.eos_token_id))[0].token_ids
    # a boundary k where both neighbouring tokens give >= 2 characters: the stop string straddles it
    found = None
    for k in range(1, len(ids) - 1):
        left, right = codec.decode_fragment(ids[:k]), codec.decode_fragment(ids[:k + 1])
        stop = right[len(left) - 2:len(left) + 2]
        if len(left) >= 2 and len(right) - len(left) >= 2 and text.startswith(right) and text.find(stop) == len(left) - 2:
            found = k, left, stop
            break
    assert found is not None, f"no boundary between two multi-character tokens in {text!r}"
    k, left, stop = found
    t, _ = _run(setup, tmp_path / "stop", EnrichConfig(stop=(stop,)), SamplingConfig(max_new_tokens=24), texts=TEXTS[:1])
    row = t.to_pylist()[0]
    assert row["generated_text"] == text[:len(left) - 2] and row["finish_reason"] == "stop"
    assert row["completion_tokens"] == k + 1  # stopped in the step the string completed


def test_stop_watcher_sees_strings_across_tokens(tokenizer_dir):
    codec = load_codec(tokenizer_dir)
    ids = codec.encode_fragment("alpha beta gamma")
    w = StopStrings(("a be",), codec.decode_fragment)
    seen = []
    for t in ids:
        w.advance(t)
        seen.append(w.is_done())
    assert seen[-1] and not seen[0] and seen.index(True) < len(ids) - 1


def test_logprobs_columns(setup, tmp_path):
    t, _ = _run(setup, tmp_path, EnrichConfig(logprobs=True), SamplingConfig(max_new_tokens=8), texts=TEXTS[:2])
    assert t.schema.field("token_logprobs").type == pa.list_(pa.float32())
    for row in t.to_pylist():
        lps = row["token_logprobs"]
        assert len(lps) == row["completion_tokens"] and all(x <= 0 for x in lps)
        assert row["logprob"] == pytest.approx(sum(lps), abs=1e-4)


def test_chat_messages_column_and_penalties(setup, tmp_path):
    _, engine, codec = setup
    chats = [[{"role": "user", "content": "hi"}], [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "Name a fruit."}]]
    table = pa.table({"id": [0, 1], "chat": chats})
    sampling = SamplingConfig(max_new_tokens=10, repetition_penalty=1.5, frequency_penalty=1.0)
    t, res = _run(setup, tmp_path, None, sampling, table=table,
                  prompt=PromptConfig(kind="generate", chat=True, text_column=None, messages_column="chat"))
    assert res.error_rows == 0
    prompts = [codec.encode_prompts([codec.chat_messages(c)], chat=True)[0] for c in chats]
    assert t.column("prompt_tokens").to_pylist() == [len(p) for p in prompts]
    direct = engine.generate(prompts, request_params(sampling, [0, 0], None, codec.eos_token_id))
    plain = engine.generate(prompts, request_params(SamplingConfig(max_new_tokens=10), [0, 0], None,
                                                    codec.eos_token_id))
    assert t.column("completion_tokens").to_pylist() == [len(o.token_ids) for o in direct]
    assert [o.token_ids for o in direct] != [o.token_ids for o in plain]  # the penalties reached the engine


def test_json_schema_with_a_stop_string(setup, tmp_path):
    """A stop string inside the JSON ends the row there (the text is cut, the value is then not
    complete JSON: a row error); rows without it close as usual."""
    free, _ = _run(setup, tmp_path / "free", EnrichConfig(json_schema=json.dumps(SCHEMA)))
    texts = free.column("generated_text").to_pylist()
    stop = '"urgent":true'
    assert any(stop in x for x in texts) and not all(stop in x for x in texts)
    t, _ = _run(setup, tmp_path / "stop", EnrichConfig(json_schema=json.dumps(SCHEMA), stop=(stop,)))
    for before, row in zip(texts, t.to_pylist()):
        if stop in before:
            assert row["generated_text"] == before[:before.index(stop)] and row["finish_reason"] == "stop"
            assert row["structured"] is None and "not valid JSON" in row["error"]
        else:
            assert row["generated_text"] == before and row["error"] is None

"""JSON schema -> Arrow types and values (pipeline/structured.py), the grammar's compile check
(pipeline/grammar.py), and the job spec's enrichment fields: every bad schema, label set or
option is a spec error naming where it is; a schema file is read (and checked) when the job is
planned; chat messages become prompts through the chat template."""

import json

import pyarrow as pa
import pytest

from hymba_batch.jobs.cli import main
from hymba_batch.jobs.driver import enrich_config
from hymba_batch.jobs.spec import SpecError, parse_spec
from hymba_batch.pipeline.grammar import json_grammar
from hymba_batch.pipeline.prompts import PromptBuilder, PromptConfig
from hymba_batch.pipeline.stops import cut_at_stop
from hymba_batch.pipeline.structured import SchemaError, arrow_type, parse_structured
from hymba_batch.pipeline.tokenizer import load_codec

BASE = {"model": {"path": "m"}, "input": {"uri": "/tmp/in"}, "output": {"uri": "/tmp/out"}}


def test_every_json_type_maps_to_its_arrow_type() -> None:
    schema = {"type": "object", "$defs": {"pt": {"type": "object", "properties": {"x": {"type": "number"}},
                                                 "required": ["x"]}},
              "properties": {"s": {"type": "string"}, "e": {"enum": ["a", "b"]}, "i": {"type": "integer"},
                             "n": {"type": "number"}, "b": {"type": "boolean"},
                             "l": {"type": "array", "items": {"type": "integer"}},
                             "p": {"$ref": "#/$defs/pt"}, "o": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
              "required": ["s", "e", "i", "n", "b", "l", "p"]}
    t = arrow_type(schema)
    assert t == pa.struct([
        pa.field("s", pa.string(), False), pa.field("e", pa.string(), False), pa.field("i", pa.int64(), False),
        pa.field("n", pa.float64(), False), pa.field("b", pa.bool_(), False),
        pa.field("l", pa.list_(pa.field("item", pa.int64(), False)), False),
        pa.field("p", pa.struct([pa.field("x", pa.float64(), False)]), False), pa.field("o", pa.string())])
    value, err = parse_structured('{"s":"x","e":"a","i":3,"n":2,"b":true,"l":[1],"p":{"x":0.5}}', t)
    assert err is None and value["n"] == 2.0 and isinstance(value["n"], float) and value["o"] is None
    assert pa.array([value, None], type=t).to_pylist()[0] == value
    assert parse_structured('{"s":', t)[1].startswith("the generated text is not valid JSON")
    assert "$.i" in parse_structured('{"i":"x"}', t)[1]


@pytest.mark.parametrize("schema,where", [
    ({"type": "object"}, "task.json_schema: an object needs properties"),
    ({"type": "object", "properties": {"a": {"type": ["string", "integer"]}}}, "task.json_schema.properties.a.type"),
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}},
     "task.json_schema.properties.a.anyOf"),
    ({"type": "object", "properties": {"a": {"type": "array", "prefixItems": [{"type": "string"}]}}},
     "task.json_schema.properties.a.items"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, "$defs": {"a": {"$ref": "#/$defs/a"}}},
     "recursive"),
    ({"type": "object", "properties": {"a": {"enum": [1, 2]}}}, "only string enums"),
])
def test_unmappable_schemas_name_the_place(schema, where) -> None:
    with pytest.raises(SchemaError, match=where.replace(".", r"\.").replace("$", r"\$")):
        arrow_type(schema)


def test_a_bad_schema_is_a_spec_error_naming_its_path() -> None:
    bad = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "object"}}}}
    with pytest.raises(SpecError, match=r"task\.json_schema\.properties\.tags\.items: an object needs properties"):
        parse_spec({**BASE, "task": {"json_schema": bad}})
    uncompilable = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(["}}}
    with pytest.raises(SpecError, match=r"task\.json_schema: cannot be compiled"):
        parse_spec({**BASE, "task": {"json_schema": uncompilable}})
    assert "x-guidance" in json_grammar({"type": "object", "properties": {"a": {"type": "boolean"}}})


def test_schema_file_is_read_and_checked_when_planned(tmp_path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}))
    e = enrich_config(parse_spec({**BASE, "task": {"json_schema_file": str(good), "logprobs": True}}))
    assert json.loads(e.json_schema)["properties"]["a"] == {"type": "boolean"}
    assert e.column_names() == ["structured", "token_logprobs", "logprob"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "null"}}}))
    with pytest.raises(SpecError, match=r"task\.json_schema_file \(.*bad\.json\)\.properties\.a"):
        enrich_config(parse_spec({**BASE, "task": {"json_schema_file": str(bad)}}))
    with pytest.raises(SpecError, match="cannot read"):
        enrich_config(parse_spec({**BASE, "task": {"json_schema_file": str(tmp_path / "missing.json")}}))
    (tmp_path / "in").mkdir()
    spec = tmp_path / "job.yaml"
    spec.write_text(f"model: {{path: m}}\ninput: {{uri: {tmp_path / 'in'}}}\noutput: {{uri: {tmp_path / 'out'}}}\n"
                    f"task: {{json_schema_file: {bad}}}\n")
    assert main(["validate", str(spec), "--plan"]) == 2  # a user error: exit 2, no traceback


@pytest.mark.parametrize("task,message", [
    ({"kind": "classify", "labels": ["only"]}, "2 to 1000 labels"),
    ({"kind": "classify", "labels": ["a", "a"]}, "duplicate labels"),
    ({"kind": "classify"}, "2 to 1000 labels"),
    ({"kind": "classify", "labels": ["a", "b"], "json_schema": {"type": "object", "properties": {"a": {"type": "boolean"}}}},
     "task.json_schema is not used with task.kind 'classify'"),
    ({"labels": ["a", "b"]}, "only used with task.kind 'classify'"),
    ({"stop": [""]}, "non-empty"),
    ({"stop": [str(i) for i in range(9)]}, "at most 8"),
    ({"min_new_tokens": 9, "max_new_tokens": 8}, "min_new_tokens must not exceed"),
    ({"presence_penalty": 3}, "task.presence_penalty"),
    ({"repetition_penalty": 0}, "task.repetition_penalty"),
])
def test_enrichment_options_are_checked(task, message) -> None:
    with pytest.raises(SpecError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_spec({**BASE, "task": task})


def test_messages_column_needs_chat() -> None:
    with pytest.raises(SpecError, match="needs task.chat"):
        parse_spec({**BASE, "input": {"uri": "/tmp/in", "messages_column": "chat"}, "task": {"chat": False}})
    ok = parse_spec({**BASE, "input": {"uri": "/tmp/in", "messages_column": "chat", "text_column": None}})
    assert ok.input.messages_column == "chat"


def test_messages_become_chat_prompts(tokenizer_dir) -> None:
    codec = load_codec(tokenizer_dir)
    b = PromptBuilder(PromptConfig(kind="generate", chat=True, text_column=None, messages_column="m",
                                   system="Be brief."), codec, 1000)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}]
    good, bad, long = b.build_batch([{"m": chat}, {"m": [{"role": "user"}]}, {"m": [{"role": "user", "content": "x " * 2000}]}])
    text = codec.decode_fragment(good.token_ids)
    assert text.startswith("<extra_id_0>System\nBe brief.") and text.endswith("<extra_id_1>Assistant\n")
    assert "User\nhi" in text and "Assistant\nyo" in text
    assert "message 0 is not a {role, content}" in bad.error
    assert "over the limit" in long.error


def test_cut_at_the_first_stop_string() -> None:
    assert cut_at_stop("abc. def\n\nghi", ("\n\n", ".")) == ("abc", True)
    assert cut_at_stop("abc", ("x",)) == ("abc", False)


def test_label_tokens_are_those_written_after_the_prompt(tokenizer_dir) -> None:
    from hymba_batch.pipeline.enrich import label_tokens

    codec = load_codec(tokenizer_dir)
    for label in ("positive", "mixed feelings"):
        head = codec.encode_prompts([codec.chat_text("Some row text.")], chat=True)[0]
        full = codec.encode_prompts([codec.chat_text("Some row text.") + label], chat=True)[0]
        assert full == head + label_tokens(codec, label, chat=True)
        assert label_tokens(codec, label, chat=False) == codec.encode_fragment(label)

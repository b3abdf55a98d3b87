"""OpenAI Batch files: request JSONL in, the Batch API's output JSONL out (local and S3),
per-request max_tokens, stop strings and JSON-schema response formats (through the real engine),
the per-row errors for what this build cannot serve yet, and the clear errors for a line without
custom_id and for duplicate custom_ids."""

import json

import boto3
import pytest

from hymba_batch.pipeline.formats import InputOptions, plan_input
from hymba_batch.pipeline.shards import InputError
from formathelpers import Crash, run_local, spec_for, write_jsonl


def req(cid, content="Say hello.", **body):
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": content}], **body}}


REQUESTS = [
    req("a"), req("b", max_tokens=2), req("c", temperature=0.5),
    req("d", response_format={"type": "xml"}), req("e", stop=["\n"]), req("f", n=2),
    req("g", response_format={"type": "text"}, n=1, stop=None),
    req("h", max_tokens=500),
    {"custom_id": "i", "body": {"messages": [{"role": "robot", "content": "x"}]}},
    req("j", [{"type": "text", "text": "Part one. "}, {"type": "text", "text": "Part two."}]),
]


def _spec(tokenizer_dir, inp, out, fmt="openai_batch"):
    return spec_for(tokenizer_dir, inp, out, input={"format": "openai_batch", "rows_per_unit": 4},
                    output={"format": fmt}, task={"max_new_tokens": 16})


@pytest.mark.parametrize("where", ["local", "s3"])
def test_batch_round_trip(tmp_path, tokenizer_dir, where, request) -> None:
    src = write_jsonl(tmp_path / "batch.jsonl", REQUESTS)
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        boto3.client("s3").upload_file(str(src), bucket, "in/batch.jsonl")
        inp, out = f"s3://{bucket}/in/batch.jsonl", f"s3://{bucket}/out"
    else:
        inp, out = str(src), str(tmp_path / "out")
    m = run_local(_spec(tokenizer_dir, inp, out), tokenizer_dir)
    assert m["committed_rows"] == len(REQUESTS) and m["published"]["lines"] == len(REQUESTS)
    if where == "s3":
        body = boto3.client("s3").get_object(Bucket=bucket, Key="out/output.jsonl")["Body"].read().decode()
    else:
        body = (tmp_path / "out" / "output.jsonl").read_text()
    lines = [json.loads(ln) for ln in body.splitlines()]
    by_id = {ln["custom_id"]: ln for ln in lines}
    assert [ln["custom_id"] for ln in lines] == [r["custom_id"] for r in REQUESTS]  # input order, once each
    ok = by_id["a"]
    assert ok["error"] is None and ok["response"]["status_code"] == 200 and ok["id"].startswith("batch_req_")
    b = ok["response"]["body"]
    assert b["object"] == "chat.completion" and b["choices"][0]["message"]["role"] == "assistant"
    assert b["choices"][0]["finish_reason"] == "stop" and isinstance(b["choices"][0]["message"]["content"], str)
    u = b["usage"]
    assert u["prompt_tokens"] > 5 and u["completion_tokens"] == 4 and u["total_tokens"] == u["prompt_tokens"] + 4
    short = by_id["b"]["response"]["body"]
    assert short["usage"]["completion_tokens"] == 2 and short["choices"][0]["finish_reason"] == "length"
    assert by_id["c"]["response"]["status_code"] == 200 and by_id["g"]["response"]["status_code"] == 200
    assert by_id["j"]["response"]["status_code"] == 200
    assert by_id["e"]["response"]["status_code"] == 200  # a request's own stop strings are served
    for cid, words in (("d", "response_format"), ("f", "body.n=2"), ("h", "max_tokens 500"), ("i", "role")):
        r = by_id[cid]["response"]
        assert r["status_code"] == 400, cid
        assert words in r["body"]["error"]["message"] and "batch.jsonl " in r["body"]["error"]["message"], cid
    assert "the type must be text, json_object or json_schema" in by_id["d"]["response"]["body"]["error"]["message"]
    assert "not supported yet" in by_id["f"]["response"]["body"]["error"]["message"]


def test_batch_output_published_once_after_crashes(tmp_path, tokenizer_dir) -> None:
    src = write_jsonl(tmp_path / "batch.jsonl", REQUESTS[:5])
    spec = _spec(tokenizer_dir, str(src), str(tmp_path / "out"))
    with pytest.raises(Crash):
        run_local(spec, tokenizer_dir, crash="before_publish")
    assert not (tmp_path / "out" / "output.jsonl").exists()
    with pytest.raises(Crash):
        run_local(spec, tokenizer_dir, crash="after_publish")
    m = run_local(spec, tokenizer_dir)
    assert m["_reused_units"] == 2  # the staged unit files were reused, not regenerated
    ids = [json.loads(ln)["custom_id"] for ln in (tmp_path / "out" / "output.jsonl").read_text().splitlines()]
    assert ids == ["a", "b", "c", "d", "e"]
    assert run_local(spec, tokenizer_dir)["committed_rows"] == 5  # the same job again: prefix accepted


def test_batch_parquet_output_keeps_custom_id(tmp_path, tokenizer_dir) -> None:
    import pyarrow.dataset as ds

    src = write_jsonl(tmp_path / "batch.jsonl", REQUESTS[:3])
    run_local(_spec(tokenizer_dir, str(src), str(tmp_path / "out"), fmt="parquet"), tokenizer_dir)
    t = ds.dataset(str(tmp_path / "out"), format="parquet").to_table().sort_by("_source_row")
    assert t.column("custom_id").to_pylist() == ["a", "b", "c"]
    assert json.loads(t.column("messages")[0].as_py())[1] == {"role": "user", "content": "Say hello."}
    assert "_hymba_max_new_tokens" not in t.column_names and "_hymba_temperature" not in t.column_names


@pytest.mark.parametrize("lines,match", [
    ([req("a"), {"method": "POST", "body": {}}], r"batch.jsonl line 2: the request has no custom_id"),
    ([req("a"), req("b"), req("a")], r"batch.jsonl line 3: custom_id 'a' is used again \(first at .*line 1\)"),
    ([req("a"), "{oops"], r"batch.jsonl line 2: not a JSON request line"),
])
def test_bad_batch_files_are_refused(tmp_path, lines, match) -> None:
    src = write_jsonl(tmp_path / "batch.jsonl", lines)
    with pytest.raises(InputError, match=match):
        plan_input(InputOptions(uri=str(src), format="openai_batch", text_column=None), set(), set())


def test_cli_refuses_duplicate_custom_ids_with_exit_2(tmp_path, tokenizer_dir, capsys) -> None:
    import yaml

    from hymba_batch.jobs.cli import main

    src = write_jsonl(tmp_path / "batch.jsonl", [req("x"), req("x")])
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"model": {"path": str(tokenizer_dir)},
                                    "input": {"uri": str(src), "format": "openai_batch"},
                                    "output": {"uri": str(tmp_path / "out"), "format": "openai_batch"}}))
    assert main(["validate", str(spec), "--plan", "--no-check"]) == 2  # the plan's check, not the model's
    err = capsys.readouterr()
    assert "batch.jsonl line 2: custom_id 'x' is used again" in err.err + err.out
    assert "Traceback" not in err.err


SCHEMA = {"type": "object", "properties": {"mood": {"enum": ["calm", "tense"]},
                                           "score": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "ok": {"type": "boolean"}},
          "required": ["mood", "score", "ok"]}


def test_request_stop_and_json_schema_through_the_engine(tmp_path, tokenizer_dir, tiny_checkpoint) -> None:
    """Each request's own response_format schema and stop strings, decoded by the real engine
    (tiny random checkpoint, sampled): every schema row is valid JSON of its schema; a stop row's
    text is cut before its stop string; a schema that cannot compile is only its row's error."""
    import jsonschema

    from hymba_batch.jobs.driver import actor_config
    from hymba_batch.model import load_model
    from hymba_batch.model.engine import Engine
    from hymba_batch.workers.actor import generations, request_params

    fmt = {"type": "json_schema", "json_schema": {"name": "m", "strict": True, "schema": SCHEMA}}
    free = [req(f"s{i}", temperature=1.0) for i in range(6)]
    lines = [req(f"j{i}", temperature=1.0, response_format=fmt) for i in range(6)] + free
    lines.append(req("bad", response_format={"type": "json_schema", "json_schema": {"schema": {"type": "frob"}}}))
    lines += [req(f"o{i}", temperature=1.0, response_format={"type": "json_object"}) for i in range(4)]
    def spec(inp, out):
        return spec_for(tokenizer_dir, str(inp), str(out), input={"format": "openai_batch", "rows_per_unit": 4},
                        output={"format": "openai_batch"}, task={"max_new_tokens": 40})

    free_spec = spec(write_jsonl(tmp_path / "a.jsonl", free), tmp_path / "free")
    sampling = actor_config(free_spec, "cpu", 1, "openai_batch").sampling
    engine = Engine(load_model(tiny_checkpoint))

    def generate(prompts, seeds, options=None):
        return generations(engine.generate(prompts, request_params(sampling, seeds, options, engine.eos)))

    run_local(free_spec, tokenizer_dir, generate=generate)  # without stops: what the free rows write
    texts = {}
    for ln in (tmp_path / "free" / "output.jsonl").read_text().splitlines():
        d = json.loads(ln)
        texts[d["custom_id"]] = d["response"]["body"]["choices"][0]["message"]["content"]
    for i, line in enumerate(lines[6:12]):  # stop at a piece of the text each writes without it
        t = texts[line["custom_id"]]
        line["body"]["stop"] = [t[len(t) // 2:len(t) // 2 + 2]] if len(t) >= 4 else ["\u0000"]
    m = run_local(spec(write_jsonl(tmp_path / "b.jsonl", lines), tmp_path / "out"), tokenizer_dir, generate=generate)
    assert m["committed_rows"] == len(lines)
    by_id = {json.loads(ln)["custom_id"]: json.loads(ln) for ln in (tmp_path / "out" / "output.jsonl").read_text().splitlines()}
    for i in range(6):
        choice = by_id[f"j{i}"]["response"]["body"]["choices"][0]
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    cut = 0
    for line in lines[6:12]:
        choice = by_id[line["custom_id"]]["response"]["body"]["choices"][0]
        stop, full = line["body"]["stop"][0], texts[line["custom_id"]]
        assert stop not in choice["message"]["content"] and full.startswith(choice["message"]["content"])
        cut += choice["finish_reason"] == "stop"
    assert cut >= 4
    for i in range(4):  # any object; it may not close within max_tokens (OpenAI cuts it the same way)
        choice = by_id[f"o{i}"]["response"]["body"]["choices"][0]
        text = choice["message"]["content"]
        assert text.startswith("{") and (choice["finish_reason"] == "length" or isinstance(json.loads(text), dict))
    bad = by_id["bad"]["response"]
    assert bad["status_code"] == 400 and "body.response_format.json_schema.schema" in bad["body"]["error"]["message"]

"""OpenAI Batch API files: the request JSONL in, the output JSONL out.

Input (``input.format: openai_batch``): one request per line, ``{"custom_id", "method", "url",
"body": {"model", "messages", "max_tokens" | "max_completion_tokens", "temperature",
"response_format", "stop", "n", ...}}``. Planning parses every line: a line that is not a JSON
object, has no string ``custom_id``, or repeats one, stops the job with an error naming the file
and line(s) (no output line could carry it). A request the job cannot serve (no messages, a
role or content it does not know, an endpoint other than chat completions, or a feature this
build does not have yet: ``n`` > 1) is that row's error. Each row carries ``custom_id``, the
messages (JSON text, formatted with the checkpoint's chat template by the prompt builder) and
the per-row request options: ``max_tokens``, ``temperature``, ``stop`` (up to 4 strings) and a
``json_schema`` or ``json_object`` response format (decoding constrained by the schema, or to
any JSON object; enrich.RowRequests).

Output (``output.format: openai_batch``): the run's unit files are staged in
``_hymba/parts/``; publishing writes ``output.jsonl`` (one line per request, input order, the
Batch API's shape: ``id``, ``custom_id``, ``response`` with ``status_code``, ``request_id`` and
a chat-completion ``body`` with ``usage``, and ``error``), atomically. A row error is a
``status_code`` 400 response whose body holds the error, as the Batch API reports a rejected
request. Knows nothing of Ray or models.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .commit import JobOutput
from .fs import resolve, write_atomic
from .shards import InputError, InputFile, WorkUnit
from .sinks import Sink
from .textfiles import plan_text_files, rows_to_table, unit_lines
from .unit import UnitResult

MESSAGES_COLUMN = "messages"  # the chat as JSON text
BATCH_SCHEMA = pa.schema([
    ("custom_id", pa.string()),
    ("model", pa.string()),
    (MESSAGES_COLUMN, pa.string()),
    ("_hymba_max_new_tokens", pa.int64()),
    ("_hymba_temperature", pa.float64()),
    ("_hymba_stop", pa.string()),         # JSON list of the request's stop strings
    ("_hymba_json_schema", pa.string()),  # its response_format JSON schema, as JSON text
])
CHAT_URL = "/v1/chat/completions"
ROLES = {"system", "developer", "user", "assistant"}
OUTPUT_NAME = "output.jsonl"
IGNORED_BODY_KEYS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "response_format",
                     "stop", "n", "user", "metadata", "store", "stream", "seed", "top_p"}


def plan_batch_files(files: list[InputFile], rows_per_unit: int) -> list[WorkUnit]:
    """Units of request files; InputError for a line without a ``custom_id`` or a repeated one."""
    seen: dict[str, str] = {}

    def check(file: InputFile, lineno: int, line: bytes) -> None:
        where = f"{file.uri} line {lineno}"
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{where}: not a JSON request line ({e})") from e
        if not isinstance(obj, dict):
            raise InputError(f"{where}: a JSON {type(obj).__name__}, not a request object")
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            raise InputError(f"{where}: the request has no custom_id (a non-empty string is required)")
        if cid in seen:
            raise InputError(f"{where}: custom_id {cid!r} is used again (first at {seen[cid]}); "
                             f"custom_ids must be unique in a batch")
        seen[cid] = where

    units, _ = plan_text_files(files, "openai_batch", rows_per_unit, schema=BATCH_SCHEMA, on_row=check)
    return [u for u in units]


def _content(value: Any, i: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for p in value:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ValueError(f"body.messages[{i}].content: only text parts are supported "
                                 f"(got {json.dumps(p)[:80]})")
            parts.append(p["text"])
        return "".join(parts)
    raise ValueError(f"body.messages[{i}].content: a string or a list of text parts is required")


def parse_request(obj: dict[str, Any]) -> dict[str, Any]:
    """The row of one request; ValueError naming the field the job cannot serve."""
    url = obj.get("url", CHAT_URL)
    if url != CHAT_URL:
        raise ValueError(f"url {url!r}: only {CHAT_URL} is served")
    if obj.get("method", "POST") != "POST":
        raise ValueError(f"method {obj.get('method')!r}: only POST is served")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise ValueError("body: a JSON object is required")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("body.messages: a non-empty list is required")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"body.messages[{i}].role: one of {sorted(ROLES)} is required")
        role = "system" if m["role"] == "developer" else m["role"]
        messages.append({"role": role, "content": _content(m.get("content"), i)})
    schema = _json_schema(body.get("response_format"))
    stops = _stops(body.get("stop"))
    if body.get("n", 1) != 1:
        raise ValueError(f"body.n={body.get('n')!r} is not supported yet by this hymba-batch build (only n=1)")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or max_tokens < 1):
        raise ValueError(f"body.max_tokens {max_tokens!r}: a positive integer is required")
    temp = body.get("temperature")
    if temp is not None and (not isinstance(temp, (int, float)) or isinstance(temp, bool) or not 0 <= temp <= 2):
        raise ValueError(f"body.temperature {temp!r}: a number from 0 to 2 is required")
    model = body.get("model")
    return {"custom_id": obj["custom_id"], "model": model if isinstance(model, str) else None,
            MESSAGES_COLUMN: json.dumps(messages), "_hymba_max_new_tokens": max_tokens,
            "_hymba_temperature": None if temp is None else float(temp),
            "_hymba_stop": None if stops is None else json.dumps(stops),
            "_hymba_json_schema": None if schema is None else json.dumps(schema)}


def _json_schema(rf: Any) -> dict[str, Any] | None:
    """The schema of ``response_format`` (None for text, any object for ``json_object``);
    ValueError for what is not served."""
    if rf is None or (isinstance(rf, dict) and rf.get("type") == "text"):
        return None
    if isinstance(rf, dict) and rf.get("type") == "json_object":
        return {"type": "object"}
    if not isinstance(rf, dict) or rf.get("type") != "json_schema":
        raise ValueError(f"body.response_format {json.dumps(rf)[:80]}: the type must be text, json_object or "
                         "json_schema")
    js = rf.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
        raise ValueError("body.response_format.json_schema.schema: a JSON schema object is required")
    return js["schema"]


def _stops(stop: Any) -> list[str] | None:
    """``stop`` as a list of 1 to 4 strings (None when absent); ValueError otherwise."""
    if stop in (None, [], ""):
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or any(not isinstance(x, str) or not x for x in stops):
        raise ValueError(f"body.stop {json.dumps(stop)[:80]}: a non-empty string or a list of up to 4 is required")
    return stops


def read_batch_unit(unit: WorkUnit) -> pa.Table:
    """The requests of one unit as rows; a request the job cannot serve is that row's error."""
    rows: list[dict[str, Any] | None] = []
    errors: list[str | None] = []
    labels: list[str] = []
    for lineno, line in unit_lines(unit):
        where = f"{unit.file.uri} line {lineno}"
        labels.append(where)
        obj = json.loads(line)  # planning checked every line
        try:
            rows.append(parse_request(obj))
            errors.append(None)
        except ValueError as e:
            rows.append({"custom_id": obj["custom_id"]})
            errors.append(f"{where}: {e}")
    return rows_to_table(rows, errors, BATCH_SCHEMA, labels)


def _ident(prefix: str, *keys: str) -> str:
    return prefix + hashlib.sha256("\0".join(keys).encode()).hexdigest()[:24]


def output_line(row: dict[str, Any], model: str, created: int) -> dict[str, Any]:
    """One line of the Batch API's output file from one output row."""
    cid = str(row.get("custom_id"))
    req = _ident("req_", cid, str(row["_source_file"]), str(row["_source_row"]))
    if row.get("error") is not None:
        body: dict[str, Any] = {"error": {"message": row["error"], "type": "invalid_request_error",
                                          "param": None, "code": None}}
        status = 400
    else:
        status = 200
        body = {
            "id": _ident("chatcmpl-", req, "completion"), "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": row["generated_text"],
                                                 "refusal": None},
                         "logprobs": None, "finish_reason": row["finish_reason"]}],
            "usage": {"prompt_tokens": row["prompt_tokens"], "completion_tokens": row["completion_tokens"],
                      "total_tokens": row["prompt_tokens"] + row["completion_tokens"]},
        }
    return {"id": _ident("batch_req_", req), "custom_id": cid,
            "response": {"status_code": status, "request_id": req, "body": body}, "error": None}


class OpenAIBatchSink(Sink):
    """Stages Parquet unit files in ``_hymba/parts/``; publishes ``output.jsonl``."""

    published = (OUTPUT_NAME,)

    @property
    def staging_uri(self) -> str:
        loc = resolve(self.opts.uri)
        return loc.uri(loc.join("_hymba", "parts"))

    def publish(self, out: JobOutput, pairs: list[tuple[WorkUnit, UnitResult]]) -> dict[str, Any]:
        parts = out.parts()
        created = int(time.time())
        lines = 0

        def write(stream: Any) -> None:
            nonlocal lines
            for unit, _ in pairs:
                with out.parts_loc.fs.open_input_file(parts[unit.unit_id]) as f:
                    table = pq.read_table(f)
                id_col = "custom_id" if "custom_id" in table.column_names else self.opts.id_column
                if id_col is None or id_col not in table.column_names:
                    raise InputError(f"{unit.file.uri}: output.format openai_batch needs a custom_id per row "
                                     f"(input.format openai_batch, or input.id_column naming it)")
                for row in table.to_pylist():
                    row["custom_id"] = row[id_col]
                    stream.write((json.dumps(output_line(row, self.opts.model_name, created)) + "\n").encode())
                    lines += 1

        path = out.loc.join(OUTPUT_NAME)
        write_atomic(out.loc, path, write, out.tmp)
        return {"output_file": out.loc.uri(path), "lines": lines}

"""The output file of one work unit: its columns, its name, and its atomic write.

Columns (design.md §1): every input column in ``enrich`` mode, or just the id column in
``results`` mode, then ``generated_text, finish_reason, prompt_tokens, completion_tokens,
truncated, error, _source_file, _source_row``. One file per unit, named from the unit id only
(never from row data): ``part-<unit_id>.parquet`` or ``.arrow`` (Arrow IPC file format). The
unit's result (counts, tokens, timings) rides in the file's schema metadata, so the file is its
own commit record. Knows nothing of prompts, models or Ray.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from .fs import Location, write_atomic
from .shards import WorkUnit

UNIT_META_KEY = b"hymba.unit"
OUTPUT_SCHEMA = pa.schema([
    ("generated_text", pa.string()),
    ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int32()),
    ("completion_tokens", pa.int32()),
    ("truncated", pa.bool_()),
    ("error", pa.string()),
    ("_source_file", pa.string()),
    ("_source_row", pa.int64()),
])
# columns some tasks add after OUTPUT_SCHEMA's (task.n > 1: samples; task.long_input map_reduce: chunks)
EXTRA_COLUMNS = {"samples": pa.list_(pa.string()), "chunks": pa.int32()}
RESERVED_COLUMNS = frozenset(OUTPUT_SCHEMA.names)
EXTENSIONS = {"parquet": "parquet", "arrow": "arrow"}


@dataclass
class RowResult:
    """What the job produced for one row."""

    generated_text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated: bool = False
    error: str | None = None
    samples: list[str] | None = None  # task.n > 1
    chunks: int | None = None         # task.long_input map_reduce: pieces the text was cut into


def part_name(unit_id: str, fmt: str) -> str:
    """The deterministic file name of a unit's output."""
    if fmt not in EXTENSIONS:
        raise ValueError(f"output.format: {fmt!r} is not parquet or arrow")
    return f"part-{unit_id}.{EXTENSIONS[fmt]}"


def unit_id_of(name: str) -> str | None:
    """The unit id in an output file name, or None if it is not one of ours."""
    base = posixpath.basename(name)
    if not base.startswith("part-"):
        return None
    stem, _, ext = base[len("part-"):].partition(".")
    return stem if ext in EXTENSIONS.values() and stem else None


def output_table(inputs: pa.Table, results: list[RowResult], unit: WorkUnit, mode: str,
                 id_column: str | None, extra: dict[str, pa.Array] | None = None,
                 row_fields: tuple[str, ...] = ()) -> pa.Table:
    """The unit's output rows: identity or input columns, then the generated columns, then the
    ``row_fields`` (names in EXTRA_COLUMNS, from the RowResult field of that name), then the
    ``extra`` columns of the job's enrichment (pipeline/enrich.py: structured, label, ...)."""
    if len(results) != inputs.num_rows:
        raise ValueError(f"{len(results)} results for {inputs.num_rows} rows of unit {unit.unit_id}")
    if mode == "enrich":
        base = inputs
    elif mode == "results":
        base = inputs.select([id_column]) if id_column else pa.table({})
    else:
        raise ValueError(f"output.mode: {mode!r} is not enrich or results")
    n = inputs.num_rows
    cols = {
        "generated_text": [r.generated_text for r in results],
        "finish_reason": [r.finish_reason for r in results],
        "prompt_tokens": [r.prompt_tokens for r in results],
        "completion_tokens": [r.completion_tokens for r in results],
        "truncated": [r.truncated for r in results],
        "error": [r.error for r in results],
        "_source_file": [unit.file.uri] * n,
        "_source_row": list(range(unit.row_start, unit.row_end)),
    }
    fields = list(OUTPUT_SCHEMA) + [pa.field(name, EXTRA_COLUMNS[name]) for name in row_fields]
    for name in row_fields:
        cols[name] = [getattr(r, name) for r in results]
    arrays = [pa.array(cols[f.name], type=f.type) for f in fields]
    if base.num_columns == 0:
        out = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    else:
        out = base
        for f, a in zip(fields, arrays):
            out = out.append_column(f, a)
    for name, a in (extra or {}).items():
        out = out.append_column(pa.field(name, a.type), a)
    return out


def write_part(loc: Location, table: pa.Table, unit_id: str, fmt: str, unit_meta: dict[str, Any]) -> str:
    """Write the unit's file atomically; returns its path inside ``loc``."""
    meta = dict(table.schema.metadata or {})
    meta[UNIT_META_KEY] = json.dumps(unit_meta, sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    final = loc.join(part_name(unit_id, fmt))

    def write(out: Any) -> None:
        if fmt == "parquet":
            pq.write_table(table, out, compression="zstd")
        else:
            with ipc.new_file(out, table.schema) as w:
                w.write_table(table)

    write_atomic(loc, final, write, tmp_dir=loc.join("_hymba", "tmp"))
    return final


def read_part_info(loc: Location, path: str) -> tuple[int, dict[str, Any]]:
    """Row count and unit metadata of a committed output file."""
    with loc.fs.open_input_file(path) as f:
        if path.endswith(".parquet"):
            md = pq.ParquetFile(f).metadata
            rows, kv = md.num_rows, md.metadata or {}
        else:
            r = ipc.open_file(f)
            rows, kv = r.count_rows(), r.schema.metadata or {}
    raw = kv.get(UNIT_META_KEY)
    if raw is None:
        raise ValueError(f"{loc.uri(path)}: an output file without hymba unit metadata")
    return rows, json.loads(raw)

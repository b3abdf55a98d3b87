"""Input formats: the one place a job's ``input.format`` is chosen and dispatched.

An input format answers two questions, behind ``plan_input`` and ``read_format_unit``:

- plan: which files, which work units (each unit names its ``format``), which columns, and
  what snapshot of the source the plan saw (a Delta version, an Iceberg snapshot id), which
  goes into the job's fingerprint and manifest;
- read: one unit's rows as an Arrow table, with ``_source_file`` / ``_source_row`` identity
  coming from the unit (the output writer adds them), and per-row parse errors in
  ``textfiles.ROW_ERROR_COLUMN``.

Formats: ``parquet`` (``shards.py`` / ``reader.py``), ``jsonl`` and ``csv`` (``textfiles.py``),
``openai_batch`` (``openai_batch.py``), ``delta`` and ``iceberg`` (their modules list a table
snapshot's Parquet data files, which are then planned and read as Parquet). With no format
given, the files' extension decides (``.jsonl``/``.ndjson``, ``.csv``, else Parquet).
Knows nothing of prompts, models or the output.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from .shards import InputError, InputFile, WorkUnit, check_schema, list_input_files, plan_units, read_footers
from .textfiles import plan_text_files, read_text_unit

INPUT_FORMATS = ("parquet", "jsonl", "csv", "openai_batch", "delta", "iceberg")
TEXT_FORMATS = ("jsonl", "csv", "openai_batch")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class InputOptions:
    """The input side of a job (a plain copy of the spec's ``input`` section)."""

    uri: str
    format: str | None = None
    rows_per_unit: int = 4096
    text_column: str | None = "text"
    version: int | None = None  # delta: table version (None: latest)
    snapshot_id: int | None = None  # iceberg: snapshot (None: current)
    catalog: tuple[tuple[str, str], ...] = ()  # iceberg: catalog properties (uri is namespace.table)


@dataclass
class InputPlan:
    """What planning found: the files, the units, and the source snapshot (for the manifest)."""

    format: str
    files: list[InputFile]
    units: list[WorkUnit]
    source: dict[str, Any] = field(default_factory=dict)


def detect_format(files: list[InputFile], uri: str) -> str:
    """The format the listed files' extensions name (Parquet when they name none)."""
    found = set()
    for f in files:
        ext = posixpath.splitext(f.uri.lower())[1]
        found.add(_EXTENSIONS.get(ext, "parquet"))
    if len(found) > 1:
        raise InputError(f"input.uri {uri}: files of several formats ({sorted(found)}); "
                         f"set input.format or point input.uri at one kind")
    return found.pop() if found else "parquet"


def list_input(opts: InputOptions) -> tuple[str, list[InputFile], dict[str, Any]]:
    """(format, data files, source snapshot) of the input; tables list a snapshot's data files."""
    fmt = opts.format
    if fmt == "delta":
        from .delta import list_delta_files

        files, source = list_delta_files(opts.uri, opts.version)
        return fmt, files, source
    if fmt == "iceberg":
        from .iceberg import list_iceberg_files

        files, source = list_iceberg_files(opts.uri, dict(opts.catalog), opts.snapshot_id)
        return fmt, files, source
    files = list_input_files(opts.uri)
    return fmt or detect_format(files, opts.uri), files, {}


def check_columns(uri: str, schema: pa.Schema, text_column: str | None, required: set[str],
                  reserved: set[str]) -> None:
    """The columns the job uses exist and none collides with an output column."""
    names = set(schema.names)
    if text_column is not None and text_column not in names:
        raise InputError(f"{uri}: no column {text_column!r} (input.text_column); columns are {sorted(names)}")
    missing = sorted(required - names)
    if missing:
        raise InputError(f"{uri}: missing column(s) {missing} that the job uses; columns are {sorted(names)}")
    clash = sorted(names & reserved)
    if clash:
        raise InputError(f"{uri}: column(s) {clash} collide with the output columns the job adds")


def plan_input(opts: InputOptions, required: set[str], reserved: set[str],
               files: list[InputFile] | None = None, fmt: str | None = None,
               source: dict[str, Any] | None = None) -> InputPlan:
    """Plan the input (or the given ``files`` of it, of format ``fmt``): units and checks."""
    if files is None:
        fmt, files, source = list_input(opts)
    fmt = fmt or opts.format or detect_format(files, opts.uri)
    source = dict(source or {})
    if not files:
        return InputPlan(fmt, [], [], source)
    if fmt in ("parquet", "delta", "iceberg"):
        metas = read_footers(files)
        for f, m in zip(files, metas):
            check_schema(f, m, opts.text_column, required, reserved)
        return InputPlan(fmt, files, plan_units(files, metas, opts.rows_per_unit), source)
    if fmt == "openai_batch":
        from .openai_batch import plan_batch_files

        units = plan_batch_files(files, opts.rows_per_unit)
        return InputPlan(fmt, files, units, source)
    if fmt in ("jsonl", "csv"):
        units, schema = plan_text_files(files, fmt, opts.rows_per_unit)
        check_columns(files[0].uri, schema, opts.text_column, required, reserved)
        return InputPlan(fmt, files, units, source)
    raise InputError(f"input.format: {fmt!r} is not one of {', '.join(INPUT_FORMATS)}")


def read_format_unit(unit: WorkUnit) -> pa.Table:
    """The rows of a unit of a line-oriented format (Parquet units go through ``reader.py``)."""
    if unit.format == "openai_batch":
        from .openai_batch import read_batch_unit

        return read_batch_unit(unit)
    if unit.format in ("jsonl", "csv"):
        return read_text_unit(unit)
    raise InputError(f"{unit.file.uri}: no reader for input format {unit.format!r}")

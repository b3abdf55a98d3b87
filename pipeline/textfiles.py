"""Line-oriented inputs: JSONL and CSV files, planned into units by byte ranges at line
boundaries and read back one unit at a time.

Planning streams each file once (it must count rows to number them): every non-blank line is a
row (a CSV file's first non-blank line is its header), ``_source_row`` counts rows from 0 in
the file, and a unit is the byte range of up to ``rows_per_unit`` rows, starting at a line
start. The columns are planned once for the whole input: a CSV file's header (every value a
string, all files must have the same columns), or the union of the keys and Arrow types of the
first ``SAMPLE_LINES`` JSON objects of each JSONL file. Reading a unit reads only its byte range
(one ranged GET on S3). A line that does not parse (not JSON, not an object, a key or a type
the plan does not have, a CSV row with the wrong number of fields) becomes a row whose columns
are null and whose ``ROW_ERROR_COLUMN`` names the file and line: a per-row error, never a unit
failure. A CSV record must fit on one line (quoted fields with line breaks are not split-safe).

Knows nothing of prompts, models or the output.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pyarrow as pa

from .fs import resolve
from .shards import InputError, InputFile, TextSpan, WorkUnit, unit_id

ROW_ERROR_COLUMN = "_hymba_row_error"
SAMPLE_LINES = 1000
_CHUNK = 8 << 20


def iter_lines(file: InputFile, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line without its newline) of every line in ``[start, end)`` of ``file``;
    ``start`` must be a line start."""
    loc = resolve(file.uri)
    end = file.size if end is None else end
    try:
        with loc.fs.open_input_file(loc.path) as f:
            pos, carry, carry_at = start, b"", start
            while pos < end:
                chunk = f.read_at(min(_CHUNK, end - pos), pos)
                if not chunk:
                    break
                pos += len(chunk)
                buf = carry + chunk
                lines = buf.split(b"\n")
                carry = lines.pop()
                off = carry_at
                for line in lines:
                    yield off, line
                    off += len(line) + 1
                carry_at = off
            if carry:
                yield carry_at, carry
    except OSError as e:
        raise InputError(f"{file.uri}: cannot read the file ({e})") from e


def _blank(line: bytes) -> bool:
    return not line.strip()


def parse_csv_line(line: bytes) -> list[str]:
    """The fields of one CSV line (RFC 4180 quoting, UTF-8; a BOM is dropped)."""
    text = line.decode("utf-8").removeprefix("\ufeff").rstrip("\r")
    rows = list(csv.reader([text], strict=True))
    return rows[0] if rows else []


@dataclass
class _Scan:
    """What planning learned about one file: unit starts and the rows' column sample."""

    file: InputFile
    starts: list[tuple[int, int, int]] = field(default_factory=list)  # (byte, line number, row index)
    rows: int = 0
    header: list[str] | None = None
    sample: list[dict[str, Any]] = field(default_factory=list)


def _scan(file: InputFile, fmt: str, rows_per_unit: int,
          on_row: Callable[[int, bytes], None] | None = None) -> _Scan:
    scan = _Scan(file)
    for lineno, (off, line) in enumerate(iter_lines(file), start=1):
        if _blank(line):
            continue
        if fmt == "csv" and scan.header is None:
            try:
                scan.header = parse_csv_line(line)
            except (UnicodeDecodeError, csv.Error) as e:
                raise InputError(f"{file.uri} line {lineno}: the CSV header does not parse ({e})") from e
            _check_header(file, scan.header)
            continue
        if scan.rows % rows_per_unit == 0:
            scan.starts.append((off, lineno, scan.rows))
        if fmt == "jsonl" and len(scan.sample) < SAMPLE_LINES:
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                obj = None
            if isinstance(obj, dict):
                scan.sample.append(obj)
        if on_row is not None:
            on_row(lineno, line)
        scan.rows += 1
    if fmt == "csv" and scan.header is None:
        raise InputError(f"{file.uri}: an empty CSV file (no header line)")
    return scan


def _check_header(file: InputFile, header: list[str]) -> None:
    empty = [i + 1 for i, h in enumerate(header) if not h.strip()]
    if empty:
        raise InputError(f"{file.uri} line 1: CSV header field(s) {empty} are empty")
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise InputError(f"{file.uri}: CSV header names {dup} more than once")


def _column_type(values: list[Any]) -> pa.DataType:
    """The Arrow type of a sampled column: of all its values, or (when they disagree) of the
    first non-null one, so later disagreeing rows become row errors instead of a job error."""
    try:
        return pa.array(values).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        first = next(v for v in values if v is not None)
        return pa.array([first]).type


def _jsonl_schema(scans: list[_Scan]) -> pa.Schema:
    schemas = []
    for s in scans:
        cols: dict[str, list[Any]] = {}
        for obj in s.sample:
            for k in obj:
                cols.setdefault(k, [])
        for obj in s.sample:
            for k, vals in cols.items():
                vals.append(obj.get(k))
        if cols:
            schemas.append(pa.schema([(k, _column_type(v)) for k, v in cols.items()]))
    if not schemas:
        raise InputError(f"{scans[0].file.uri if scans else 'input'}: no line of the input is a JSON object")
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise InputError(f"input files disagree on a column's type ({e})") from e
    # a column null in every sampled line has no type yet: read it as a string
    return pa.schema([pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in schema])


def _csv_schema(scans: list[_Scan]) -> pa.Schema:
    first = scans[0]
    for s in scans[1:]:
        if s.header != first.header:
            raise InputError(f"{s.file.uri}: CSV header {s.header} differs from {first.header} "
                             f"in {first.file.uri}")
    return pa.schema([(h, pa.string()) for h in first.header or []])


def plan_text_files(files: list[InputFile], fmt: str, rows_per_unit: int,
                    schema: pa.Schema | None = None,
                    on_row: Callable[[InputFile, int, bytes], None] | None = None) -> tuple[list[WorkUnit], pa.Schema]:
    """Units of every file (file order, then row order) and the planned columns. ``schema``
    fixes the columns (a format with its own schema); ``on_row`` sees every row line."""
    if rows_per_unit < 1:
        raise ValueError(f"rows_per_unit must be >= 1, got {rows_per_unit}")
    scans = [_scan(f, fmt, rows_per_unit, (lambda n, ln, f=f: on_row(f, n, ln)) if on_row else None)
             for f in files]
    if schema is None:
        schema = _csv_schema(scans) if fmt == "csv" else _jsonl_schema(scans)
    raw = schema.serialize().to_pybytes()
    units = []
    for s in scans:
        bounds = s.starts + [(s.file.size, 0, s.rows)]
        for (b0, line0, r0), (b1, _, r1) in zip(bounds, bounds[1:]):
            units.append(WorkUnit(unit_id(s.file, r0, r1), s.file, r0, r1, (), r0, format=fmt,
                                  span=TextSpan(b0, b1, line0, raw)))
    return units, schema


def unit_schema(unit: WorkUnit) -> pa.Schema:
    assert unit.span is not None
    return pa.ipc.read_schema(pa.py_buffer(unit.span.schema))


def unit_lines(unit: WorkUnit) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of every row of a line-oriented unit."""
    span = unit.span
    assert span is not None, f"unit {unit.unit_id} has no byte range"
    lineno = span.first_line
    for _, line in iter_lines(unit.file, span.start, span.end):
        if not _blank(line):
            yield lineno, line
        lineno += 1


def rows_to_table(rows: list[dict[str, Any] | None], errors: list[str | None], schema: pa.Schema,
                  labels: list[str]) -> pa.Table:
    """A table of ``rows`` in ``schema``; a row that does not fit becomes nulls and an error
    starting with its label (file and line). Adds ``ROW_ERROR_COLUMN`` (null for good rows)."""
    empty: dict[str, Any] = {}
    clean = [r if r is not None else empty for r in rows]
    try:
        table = pa.Table.from_pylist(clean, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        parts = []
        for i, r in enumerate(clean):
            try:
                parts.append(pa.Table.from_pylist([r], schema=schema))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
                errors[i] = errors[i] or f"{labels[i]}: a value does not fit the planned column types ({e})"
                parts.append(pa.Table.from_pylist([empty], schema=schema))
        table = pa.concat_tables(parts) if parts else schema.empty_table()
    return table.append_column(ROW_ERROR_COLUMN, pa.array(errors, type=pa.string()))


def read_text_unit(unit: WorkUnit) -> pa.Table:
    """The rows of a JSONL or CSV unit, in the planned schema, with ``ROW_ERROR_COLUMN``."""
    schema = unit_schema(unit)
    names = set(schema.names)
    uri = unit.file.uri
    rows: list[dict[str, Any] | None] = []
    errors: list[str | None] = []
    labels: list[str] = []
    for lineno, line in unit_lines(unit):
        labels.append(f"{uri} line {lineno}")
        row, err = None, None
        try:
            if unit.format == "csv":
                fields = parse_csv_line(line)
                if len(fields) != len(schema.names):
                    err = f"{uri} line {lineno}: {len(fields)} fields, the header has {len(schema.names)}"
                else:
                    row = dict(zip(schema.names, fields))
            else:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    err = f"{uri} line {lineno}: a JSON {type(obj).__name__}, not an object"
                elif set(obj) - names:
                    err = (f"{uri} line {lineno}: key(s) {sorted(set(obj) - names)} are not among the columns "
                           f"planned from the input's first lines {sorted(names)}")
                else:
                    row = obj
        except UnicodeDecodeError as e:
            err = f"{uri} line {lineno}: not valid UTF-8 ({e.reason} at byte {e.start})"
        except json.JSONDecodeError as e:
            err = f"{uri} line {lineno}: not valid JSON ({e.msg} at column {e.colno})"
        except csv.Error as e:
            err = f"{uri} line {lineno}: the CSV row does not parse ({e})"
        rows.append(row)
        errors.append(err)
    if len(rows) != unit.num_rows:
        raise InputError(f"{uri}: {len(rows)} rows in bytes {unit.span.start}..{unit.span.end}, "  # type: ignore[union-attr]
                         f"planned {unit.num_rows} (the file changed?)")
    return rows_to_table(rows, errors, schema, labels)

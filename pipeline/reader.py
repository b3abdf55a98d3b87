"""Reading one work unit: its rows, with Hive partition values added as columns.

The reader checks that the file is still the one the job planned (same size and mtime), so a
file rewritten during a job gives a clear error instead of silently mixed rows. Knows nothing
of prompts, models or the output.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from .fs import Location, resolve
from .shards import InputError, WorkUnit


def _check_unchanged(unit: WorkUnit, loc: Location) -> None:
    """InputError if the unit's file is not the one the job planned (size and mtime)."""
    f = unit.file
    try:
        info = loc.fs.get_file_info(loc.path)
    except OSError as e:  # S3 errors that outlived the retries name the bucket and key
        raise InputError(f"{f.uri}: cannot read the file's information ({e})") from e
    mtime, planned = info.mtime_ns or 0, f.mtime_ns
    if loc.scheme == "s3":  # a HEAD gives whole seconds where some stores' listings give milliseconds
        mtime, planned = mtime // 1_000_000_000, planned // 1_000_000_000
    if info.size != f.size or mtime != planned:
        raise InputError(f"{f.uri}: changed since the job was planned "
                         f"(size {f.size} -> {info.size}, mtime_ns {f.mtime_ns} -> {info.mtime_ns})")


def read_unit(unit: WorkUnit, columns: list[str] | None = None) -> pa.Table:
    """The unit's rows (all columns, or ``columns``), partition columns appended; units of
    line-oriented formats are read by ``formats.read_format_unit`` after the same check."""
    f = unit.file
    loc = resolve(f.uri)
    _check_unchanged(unit, loc)
    if unit.span is not None:
        from .formats import read_format_unit

        table = read_format_unit(unit)
        return table if columns is None else table.select([c for c in columns if c in table.column_names])
    part_names = {k for k, _, _ in f.partitions}
    file_cols = None if columns is None else [c for c in columns if c not in part_names]
    try:
        with loc.fs.open_input_file(loc.path) as fh:
            table = pq.ParquetFile(fh).read_row_groups(list(unit.row_groups), columns=file_cols)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{f.uri}: cannot read row groups {list(unit.row_groups)} ({e})") from e
    offset = unit.row_start - unit.first_group_row
    if offset < 0 or offset + unit.num_rows > table.num_rows:
        raise InputError(f"{f.uri}: rows {unit.row_start}..{unit.row_end} not in row groups "
                         f"{list(unit.row_groups)} ({table.num_rows} rows)")
    table = table.slice(offset, unit.num_rows)
    n = table.num_rows
    for name, value, type_name in f.partitions:
        if columns is None or name in columns:
            table = table.append_column(name, pa.array([value] * n, type=pa.type_for_alias(type_name)))
    return table


def text_values(table: pa.Table, column: str, file_uri: str) -> list[str | None | Exception]:
    """The text column as Python strings; binary values are decoded as UTF-8, and a value
    that is not valid UTF-8 becomes an exception object (a per-row error, not a job error)."""
    if column not in table.column_names:
        raise InputError(f"{file_uri}: no column {column!r} (input.text_column)")
    col = table.column(column)
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        out: list[str | None | Exception] = []
        for v in col.to_pylist():
            if v is None:
                out.append(None)
                continue
            try:
                out.append(v.decode("utf-8"))
            except UnicodeDecodeError as e:
                out.append(ValueError(f"text is not valid UTF-8 ({e.reason} at byte {e.start})"))
        return out
    return col.to_pylist()

"""Input planning: list the input, read Parquet footers, and cut deterministic work units.

Listing follows what Spark and Hadoop writers leave behind: any path component starting with
``_`` or ``.`` (``_SUCCESS``, ``_committed_*``, ``.crc``, ``_temporary/``) is skipped. A URI may
be one file, a directory / S3 prefix (walked recursively) or a glob (``*``, ``?``, ``[``).
Hive ``key=value`` directories become partition columns (int64 when every value is an integer,
else string). A work unit is a row range of one file: consecutive whole row groups packed up to
``rows_per_unit`` rows, or a slice of a row group larger than that. Its id hashes the file's
URI, size, mtime and the row range, so the same input always gives the same units.

Owns ``InputFile`` and ``WorkUnit`` (plain frozen dataclasses: they cross the Ray boundary).
Knows nothing of prompts, models or the output layout.
"""

from __future__ import annotations

import fnmatch
import hashlib
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .fs import resolve

_GLOB = re.compile(r"[*?\[]")
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"


class InputError(ValueError):
    """The input cannot be read as the job asks; the message names the file and the column."""


@dataclass(frozen=True)
class InputFile:
    """One input Parquet file and its identity (URI + size + mtime)."""

    uri: str
    size: int
    mtime_ns: int
    partitions: tuple[tuple[str, Any, str], ...] = ()  # (column, value, arrow type name)


@dataclass(frozen=True)
class TextSpan:
    """Where a line-oriented unit (JSONL, CSV, OpenAI Batch) lies in its file: bytes
    ``[start, end)`` beginning at 1-based line ``first_line``, and the planned column schema
    (Arrow IPC bytes) every unit of the input is read into."""

    start: int
    end: int
    first_line: int
    schema: bytes = b""


@dataclass(frozen=True)
class WorkUnit:
    """Rows ``[row_start, row_end)`` of one file, read through ``row_groups`` (Parquet) or
    the byte range ``span`` (line-oriented formats, ``format`` names which)."""

    unit_id: str
    file: InputFile
    row_start: int
    row_end: int
    row_groups: tuple[int, ...]
    first_group_row: int  # file row index of the first row of row_groups[0]
    format: str = "parquet"  # the input format that reads it (pipeline/formats.py)
    span: TextSpan | None = None

    @property
    def num_rows(self) -> int:
        return self.row_end - self.row_start


def _skipped(rel: str) -> bool:
    return any(part.startswith(("_", ".")) for part in rel.split("/") if part)


def _hive_parts(rel_dir: str) -> list[tuple[str, str]]:
    out = []
    for part in rel_dir.split("/"):
        if "=" in part:
            k, _, v = part.partition("=")
            out.append((unquote(k), unquote(v)))
    return out


def _partition_values(files: list[tuple[str, list[tuple[str, str]]]]) -> list[tuple[tuple[str, Any, str], ...]]:
    keys = [k for k, _ in files[0][1]] if files else []
    for uri, parts in files:
        if [k for k, _ in parts] != keys:
            raise InputError(f"{uri}: Hive partition keys {[k for k, _ in parts]} differ from {keys} "
                             f"in {files[0][0]}")
    types = {}
    for i, k in enumerate(keys):
        vals = [p[i][1] for _, p in files if p[i][1] != HIVE_NULL]
        types[k] = "int64" if vals and all(re.fullmatch(r"-?\d{1,18}", v) for v in vals) else "string"
    out = []
    for _, parts in files:
        row = []
        for k, v in parts:
            val: Any = None if v == HIVE_NULL else (int(v) if types[k] == "int64" else v)
            row.append((k, val, types[k]))
        out.append(tuple(row))
    return out


def list_input_files(uri: str) -> list[InputFile]:
    """All data files under ``uri`` in a stable (sorted) order; raises InputError if none."""
    loc = resolve(uri)
    pattern = None
    base = loc.path
    if _GLOB.search(loc.path):
        parts = loc.path.split("/")
        first = next(i for i, p in enumerate(parts) if _GLOB.search(p))
        base, pattern = "/".join(parts[:first]), loc.path
    info = loc.fs.get_file_info(base)
    if info.type == pafs.FileType.File and pattern is None:
        infos, base = [info], posixpath.dirname(base)
    elif info.type == pafs.FileType.Directory:
        infos = loc.fs.get_file_info(pafs.FileSelector(base, recursive=True))
    else:
        raise InputError(f"input.uri: nothing found at {uri}")
    found = []
    for fi in infos:
        if fi.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(fi.path, base)
        if _skipped(rel) or (pattern is not None and not fnmatch.fnmatchcase(fi.path, pattern)):
            continue
        found.append((fi, _hive_parts(posixpath.dirname(rel))))
    if not found:
        raise InputError(f"input.uri: no data files at {uri} (files starting with '_' or '.' are skipped)")
    found.sort(key=lambda t: t[0].path)
    parts = _partition_values([(loc.uri(fi.path), p) for fi, p in found])
    return [InputFile(loc.uri(fi.path), fi.size, fi.mtime_ns or 0, pv) for (fi, _), pv in zip(found, parts)]


def read_footer(file: InputFile) -> pq.FileMetaData:
    """The Parquet footer of ``file``; InputError naming the file if it is not valid Parquet."""
    loc = resolve(file.uri)
    try:
        with loc.fs.open_input_file(loc.path) as f:
            return pq.ParquetFile(f).metadata
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{file.uri}: not a readable Parquet file ({e})") from e


def read_footers(files: list[InputFile], threads: int = 16) -> list[pq.FileMetaData]:
    """Footers of every file, read in parallel (S3 latency dominates)."""
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as ex:
        return list(ex.map(read_footer, files))


def check_schema(file: InputFile, meta: pq.FileMetaData, text_column: str | None,
                 required: set[str], reserved: set[str]) -> pa.Schema:
    """Check that ``file`` has the columns the job needs; returns its Arrow schema."""
    schema = meta.schema.to_arrow_schema()
    names = set(schema.names)
    if text_column is not None:
        if text_column not in names:
            raise InputError(f"{file.uri}: no column {text_column!r} (input.text_column); "
                             f"columns are {sorted(names)}")
        t = schema.field(text_column).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
                or pa.types.is_large_binary(t) or pa.types.is_string_view(t)):
            raise InputError(f"{file.uri}: column {text_column!r} (input.text_column) has type {t}; "
                             f"expected a string column")
    missing = sorted(required - names - {k for k, _, _ in file.partitions})
    if missing:
        raise InputError(f"{file.uri}: missing column(s) {missing} that the job uses; columns are {sorted(names)}")
    clash = sorted((names | {k for k, _, _ in file.partitions}) & reserved)
    if clash:
        raise InputError(f"{file.uri}: column(s) {clash} collide with the output columns the job adds")
    dup = sorted(names & {k for k, _, _ in file.partitions})
    if dup:
        raise InputError(f"{file.uri}: Hive partition key(s) {dup} are also columns of the file")
    return schema


def unit_id(file: InputFile, start: int, end: int) -> str:
    key = f"{file.uri}\0{file.size}\0{file.mtime_ns}\0{start}\0{end}"
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def plan_file(file: InputFile, meta: pq.FileMetaData, rows_per_unit: int) -> list[WorkUnit]:
    """Cut one file into units of at most ``rows_per_unit`` rows along row-group boundaries."""
    if rows_per_unit < 1:
        raise ValueError(f"rows_per_unit must be >= 1, got {rows_per_unit}")
    units: list[WorkUnit] = []
    pending: list[int] = []
    pending_start = pending_rows = 0
    row = 0

    def flush() -> None:
        nonlocal pending, pending_rows
        if pending:
            end = pending_start + pending_rows
            units.append(WorkUnit(unit_id(file, pending_start, end), file, pending_start, end,
                                  tuple(pending), pending_start))
        pending, pending_rows = [], 0

    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if n > rows_per_unit:
            flush()
            for s in range(row, row + n, rows_per_unit):
                e = min(s + rows_per_unit, row + n)
                units.append(WorkUnit(unit_id(file, s, e), file, s, e, (g,), row))
        elif n > 0:
            if pending_rows + n > rows_per_unit:
                flush()
            if not pending:
                pending_start = row
            pending.append(g)
            pending_rows += n
        row += n
    flush()
    return units


def plan_units(files: list[InputFile], metas: list[pq.FileMetaData], rows_per_unit: int) -> list[WorkUnit]:
    """Units of every file, in file order then row order."""
    return [u for f, m in zip(files, metas) for u in plan_file(f, m, rows_per_unit)]

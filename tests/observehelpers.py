"""Inputs for the observability tests (metrics, history, report, status): a small dataset with
a row error, and a file whose footer reads but whose data does not (a unit that fails every
try and is quarantined)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_with_row_error(path: Path, start: int = 0, rows: int = 8, null_at: int = 3) -> None:
    """``rows`` short articles; the text of row ``null_at`` is null (a per-row error)."""
    texts = [None if i == null_at else f"Article {start + i}: the council met about park {i % 5}."
             for i in range(rows)]
    pq.write_table(pa.table({"id": list(range(start, start + rows)), "text": texts}), path, row_group_size=4)


def write_corrupt(path: Path, rows: int = 4) -> None:
    """A Parquet file with a good footer and garbage where its pages are."""
    pq.write_table(pa.table({"id": list(range(1000, 1000 + rows)), "text": [f"broken {i}" for i in range(rows)]}),
                   path, compression="none", use_dictionary=False)
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    for i in range(4, len(data) - footer):
        data[i] = 0xFF
    path.write_bytes(bytes(data))

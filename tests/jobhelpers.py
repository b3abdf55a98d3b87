"""Input and spec builders shared by the pipeline, worker and job tests (not fixtures), and free
ports for the tests that start servers."""

from __future__ import annotations

import socket
from pathlib import Path


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports: every socket is held until all are bound (taken one at a
    time, the kernel may hand out a port it just gave, and Ray refuses two components on one)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_articles(folder: Path, files: int = 3, rows: int = 8, row_group_size: int = 4) -> int:
    """Small Parquet inputs: ``files`` files of ``rows`` short articles; returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for f in range(files):
        ids = list(range(n, n + rows))
        texts = [f"Article {i}: the council met about park {i % 5} and voted." for i in ids]
        pq.write_table(pa.table({"id": ids, "text": texts}), folder / f"part-{f}.parquet",
                       row_group_size=row_group_size)
        n += rows
    return n


def job_dict(model: Path | str, input_uri: str, output_uri: str, **sections) -> dict:
    """A small, fast job spec (as a dict) for tests; ``sections`` update its sections."""
    spec = {
        "name": "test-job",
        "model": {"path": str(model), "cache_budget_mb": 32, "max_num_seqs": 16},
        "input": {"uri": input_uri, "text_column": "text", "id_column": "id", "rows_per_unit": 4},
        "task": {"kind": "summarize", "chat": False, "max_new_tokens": 4},
        "output": {"uri": output_uri, "format": "parquet", "mode": "enrich"},
        "resources": {"num_actors": 1, "cpus_per_actor": 1, "max_in_flight": 2},
    }
    for k, v in sections.items():
        spec[k] = {**spec.get(k, {}), **v} if isinstance(v, dict) else v
    return spec

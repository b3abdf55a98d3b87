"""The output invariants every reliability test checks, in one place (local folders and s3://):

- every input row appears exactly once among the committed data files (by ``_source_file`` and
  ``_source_row``), and nothing else does;
- every file a reader sees (a name not starting with ``_`` or ``.``) is one of our data files,
  named only from a unit id (``part-<20 hex>.<ext>``), never from row data; no temporary file is
  left behind anywhere once the job has committed;
- the manifest (written only when the job succeeded, with ``_SUCCESS``) lists exactly the data
  files, with their row counts, source ranges and totals; a failed job has neither;
- each data file carries its unit metadata with its own row count;
- a re-run changes nothing: ``snapshot`` before and after compares every file's bytes except the
  progress documents ``_hymba/status.json`` and ``_hymba/history.json`` (a re-run is one more run).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections import Counter
from typing import Any

import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from pyarrow.fs import FileSelector, FileType

from hymba_batch.pipeline.fs import resolve
from hymba_batch.pipeline.shards import list_input_files, read_footers
from hymba_batch.pipeline.writer import UNIT_META_KEY

PART_NAME = re.compile(r"^part-[0-9a-f]{20}\.(parquet|arrow)$")


def listing(uri: str) -> dict[str, int]:
    """Every file under the output prefix: path relative to it -> size (empty if no prefix)."""
    loc = resolve(uri)
    if loc.fs.get_file_info(loc.path).type != FileType.Directory:
        return {}
    infos = loc.fs.get_file_info(FileSelector(loc.path, recursive=True, allow_not_found=True))
    return {posixpath.relpath(i.path, loc.path): i.size for i in infos if i.type == FileType.File}


def input_rows(input_uri: str) -> Counter:
    """(source file URI, row index) of every input row (each once)."""
    files = list_input_files(input_uri)
    return Counter((f.uri, r) for f, m in zip(files, read_footers(files)) for r in range(m.num_rows))


def _read(loc, path: str) -> tuple[Any, dict]:
    with loc.fs.open_input_file(path) as fh:
        if path.endswith(".parquet"):
            t = pq.read_table(fh)
        else:
            t = ipc.open_file(fh).read_all()
    meta = json.loads((t.schema.metadata or {})[UNIT_META_KEY])
    return t, meta


def check_output(uri: str, expected: Counter | None, *, complete: bool = True) -> dict[str, Any]:
    """Assert the invariants; returns the committed rows (Counter), the manifest and the tables."""
    loc = resolve(uri)
    files = listing(uri)
    visible = sorted(p for p in files if not any(s.startswith(("_", ".")) for s in p.split("/")))
    bad_names = [p for p in visible if not PART_NAME.match(p)]
    assert not bad_names, f"files visible to readers that are not ours: {bad_names}"
    temps = [p for p in files if p.endswith(".tmp") or p.startswith("_hymba/tmp/")]
    if complete:
        assert not temps, f"temporary files left after the commit: {temps}"
    else:
        assert not [p for p in temps if not any(s.startswith(("_", ".")) for s in p.split("/"))]
    rows: Counter = Counter()
    tables: dict[str, Any] = {}
    for p in visible:
        t, meta = _read(loc, loc.join(p))
        assert meta["rows"] == t.num_rows, f"{p}: unit metadata says {meta['rows']} rows, file has {t.num_rows}"
        assert PART_NAME.match(p) and p == f"part-{meta['unit_id']}.{p.rsplit('.', 1)[1]}"
        rows.update(zip(t.column("_source_file").to_pylist(), t.column("_source_row").to_pylist()))
        tables[p] = t
    dup = [k for k, n in rows.items() if n > 1]
    assert not dup, f"rows committed more than once: {dup[:5]}"
    if expected is not None:
        extra = set(rows) - set(expected)
        assert not extra, f"committed rows that are not input rows: {sorted(extra)[:5]}"
    manifest = None
    if complete:
        assert "_SUCCESS" in files and "_hymba/manifest.json" in files, sorted(files)
        with loc.fs.open_input_stream(loc.join("_hymba", "manifest.json")) as f:
            manifest = json.loads(f.read())
        listed = {f["path"]: f for f in manifest["files"]}
        assert sorted(listed) == visible, "the manifest does not list exactly the data files"
        for p, entry in listed.items():
            t = tables[p]
            assert entry["rows"] == t.num_rows
            lo, hi = entry["source_rows"]
            assert t.column("_source_row").to_pylist() == list(range(lo, hi))
            assert set(t.column("_source_file").to_pylist()) <= {entry["source_file"]}
        assert manifest["committed_rows"] == manifest["input_rows"] == sum(rows.values())
        assert manifest["error_rows"] == sum(t.num_rows - t.column("error").null_count for t in tables.values())
        if expected is not None:
            assert rows == expected, (f"{len(expected - rows)} input rows missing, "
                                      f"{len(rows - expected)} unexpected")
    else:
        assert "_SUCCESS" not in files and "_hymba/manifest.json" not in files
    return {"rows": rows, "manifest": manifest, "tables": tables, "files": files}


def snapshot(uri: str) -> dict[str, str]:
    """sha256 of every file under the prefix except the progress documents."""
    loc = resolve(uri)
    out = {}
    for p in listing(uri):
        if p in ("_hymba/status.json", "_hymba/history.json"):
            continue
        with loc.fs.open_input_stream(loc.join(p)) as f:
            out[p] = hashlib.sha256(f.read()).hexdigest()
    return out


def status(uri: str) -> dict[str, Any]:
    loc = resolve(uri)
    with loc.fs.open_input_stream(loc.join("_hymba", "status.json")) as f:
        return json.loads(f.read())


def job(model_path, input_uri: str, output_uri: str, model: dict | None = None, **sections) -> dict:
    """``jobhelpers.job_dict`` plus ``model`` overrides (its first parameter is the checkpoint)."""
    from jobhelpers import job_dict

    d = job_dict(model_path, input_uri, output_uri, **sections)
    d["model"].update(model or {})
    return d

"""Iceberg tables through ``pyiceberg``: a table snapshot as input, and results appended to a
table in one commit per run. The catalog comes from configuration: properties as pyiceberg
takes them (``type: sql`` with a SQLAlchemy ``uri`` such as ``sqlite:///catalog.db`` and a
``warehouse``; ``type: rest`` with its ``uri``; ``type: glue``), or with none given,
pyiceberg's own configuration (``~/.pyiceberg.yaml``, ``PYICEBERG_CATALOG__...``).

Input (``input.format: iceberg``, ``input.uri: namespace.table``): the data files of one
snapshot (``input.snapshot_id``, or the current one), each planned and read as Parquet (an
Iceberg data file holds every column, partition sources included). Snapshots with delete files
(merge-on-read deletes) are refused: their data files alone do not hold the table's rows.

Output (``output.format: iceberg``, ``output.table: namespace.table``): workers stage
``part-<unit>.parquet`` under ``output.uri`` (which also holds ``_hymba/``); ``publish`` adds
them with ``Table.add_files`` in one snapshot (creating the table from the files' schema when
it does not exist), after checking whether the table already holds them: a rerun after a
crash between the commit and the manifest does not add them twice. The files stay where they
were staged (Iceberg references data files by absolute path), so ``output.uri`` must not be
cleaned up while the table lives. S3: the endpoint and region come from the same environment
as ``fs.py`` unless the catalog properties set ``s3.endpoint`` / ``s3.region``.
Knows nothing of Ray, prompts or models.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow.parquet as pq

from .commit import JobOutput, OutputConflict
from .fs import resolve
from .shards import InputError, InputFile, WorkUnit
from .sinks import Sink
from .unit import UnitResult


def catalog_properties(props: dict[str, str]) -> dict[str, str]:
    """The catalog's properties with the S3 endpoint and region from the environment when unset."""
    out = dict(props)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "s3.endpoint" not in out:
        out["s3.endpoint"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region and "s3.region" not in out:
        out["s3.region"] = region
    return out


def load(props: dict[str, str]) -> Any:
    """The configured catalog (its name is ``props['name']``, default ``default``)."""
    try:
        from pyiceberg.catalog import load_catalog
    except ImportError as e:
        raise InputError("format iceberg needs the pyiceberg package: pip install 'hymba-batch[tables]'") from e
    p = catalog_properties(props)
    name = p.pop("name", "default")
    try:
        return load_catalog(name, **p)
    except Exception as e:  # pyiceberg raises many types for a bad configuration
        raise InputError(f"iceberg catalog {name!r}: cannot load it ({type(e).__name__}: {e})") from e


def _path(file_path: str) -> str:
    """A data file's path as ``fs.resolve`` takes it (``file:`` URIs become local paths)."""
    if file_path.startswith("file://"):
        return file_path[len("file://"):]
    if file_path.startswith("file:"):
        return file_path[len("file:"):]
    return file_path


def list_iceberg_files(identifier: str, props: dict[str, str],
                       snapshot_id: int | None) -> tuple[list[InputFile], dict[str, Any]]:
    """The data files of the table's snapshot (current when None) and the source record."""
    from pyiceberg.exceptions import NoSuchTableError

    catalog = load(props)
    try:
        table = catalog.load_table(identifier)
    except (NoSuchTableError, ValueError) as e:
        raise InputError(f"input.uri {identifier}: no such Iceberg table in the catalog ({e})") from e
    snap = table.snapshot_by_id(snapshot_id) if snapshot_id is not None else table.current_snapshot()
    if snapshot_id is not None and snap is None:
        raise InputError(f"input.uri {identifier}: no snapshot {snapshot_id}")
    if snap is None:
        return [], {"iceberg_table": identifier, "snapshot_id": None}
    tasks = list(table.scan(snapshot_id=snap.snapshot_id).plan_files())
    if any(t.delete_files for t in tasks):
        raise InputError(f"input.uri {identifier}: snapshot {snap.snapshot_id} has delete files, which "
                         f"hymba-batch does not apply; rewrite the table's data files first")
    files = []
    for t in tasks:
        uri = _path(t.file.file_path)
        loc = resolve(uri)
        info = loc.fs.get_file_info(loc.path)
        if info.size is None:
            raise InputError(f"input.uri {identifier}: data file {t.file.file_path} is missing")
        files.append(InputFile(loc.uri(), info.size, info.mtime_ns or 0))
    files.sort(key=lambda f: f.uri)
    return files, {"iceberg_table": identifier, "snapshot_id": snap.snapshot_id}


class IcebergSink(Sink):
    """Stages unit files under ``output.uri``; one ``add_files`` snapshot per run."""

    shared = True  # a restart must not delete files the table may reference

    def _table(self, create_from: str | None = None) -> Any:
        from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

        catalog = load(dict(self.opts.catalog))
        ident = self.opts.table
        assert ident, "output.table is required for output.format iceberg"
        try:
            return catalog.load_table(ident)
        except NoSuchTableError:
            if create_from is None:
                return None
        loc = resolve(create_from)
        with loc.fs.open_input_file(loc.path) as f:
            schema = pq.read_schema(f).remove_metadata()
        ns = ident.rsplit(".", 1)[0] if "." in ident else None
        if ns:
            try:
                catalog.create_namespace(ns)
            except Exception:  # noqa: BLE001 - it exists (each catalog says so differently)
                pass
        try:
            return catalog.create_table(ident, schema=schema)
        except NoSuchNamespaceError as e:
            raise OutputConflict(f"output.table {ident}: cannot create it ({e})") from e

    def prepare(self) -> None:
        self._table()  # a bad catalog configuration fails before any unit runs

    def publish(self, out: JobOutput, pairs: list[tuple[WorkUnit, UnitResult]]) -> dict[str, Any]:
        staged = out.parts()
        paths = [out.parts_loc.uri(staged[u.unit_id]) for u, _ in pairs]
        if not paths:
            return {"iceberg_table": self.opts.table, "files": 0}
        table = self._table(create_from=paths[0])
        have = set()
        if table.current_snapshot() is not None:
            have = {_path(p) for p in table.inspect.files().column("file_path").to_pylist()}
        done = [p for p in paths if p in have]
        if done:
            if len(done) != len(paths):
                raise OutputConflict(f"output.table {self.opts.table}: {len(done)} of this run's {len(paths)} files "
                                     f"are in the table already; a run's files are committed together")
            return {"iceberg_table": self.opts.table, "snapshot_id": table.current_snapshot().snapshot_id,
                    "files": len(paths), "already_committed": True}
        table.add_files(paths, snapshot_properties={"hymba.app": self.opts.app_id,
                                                    "hymba.rows": str(sum(r.rows for _, r in pairs))})
        return {"iceberg_table": self.opts.table, "snapshot_id": table.current_snapshot().snapshot_id,
                "files": len(paths)}

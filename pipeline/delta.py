"""Delta Lake tables, through the ``deltalake`` package (delta-rs): a table snapshot as input,
and a table as output with one atomic commit per run. No hand-written log.

Input (``input.format: delta``): the data files of one table version (``input.version``, or
the latest), with partition values from the log; each file is then planned and read as
Parquet, so ``_source_file`` is the data file. The version goes into the plan's source (the
manifest records it). Incremental runs select files by identity, and Delta data files are never
rewritten in place, so a run reads only the files that versions since the last run added.
Tables whose readers need deletion vectors or column mapping are refused (their Parquet files
alone do not hold the table's rows).

Output (``output.format: delta``): workers stage ``part-<unit>.parquet`` in the table folder
(invisible to readers until the log names them); ``publish`` adds every staged file of the
run in one ``create_write_transaction`` (or creates the table with them). It first looks for
its files in the table: after a crash between the commit and the manifest, a rerun finds them
committed and does not add them again. A staged file that was never committed is only data in
the folder (``VACUUM`` removes it once it is older than the retention).

S3: the endpoint, region and retry settings come from the same environment as ``fs.py``
(``AWS_ENDPOINT_URL`` ...), credentials from the standard AWS chain, which delta-rs reads
itself; plain-HTTP endpoints (the loopback test server) are allowed. Commits on S3 use the
store's conditional PUT (``If-None-Match``), so two writers cannot both create a version.
Knows nothing of Ray, prompts or models.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq

from .commit import JobOutput, OutputConflict
from .fs import resolve
from .shards import InputError, InputFile, WorkUnit
from .sinks import Sink
from .unit import UnitResult

_UNSUPPORTED_READER_FEATURES = {"deletionVectors", "columnMapping"}


def storage_options(uri: str) -> dict[str, str]:
    """delta-rs storage options for ``uri``: S3 endpoint and region from the environment."""
    if not uri.startswith("s3://"):
        return {}
    opts = {"conditional_put": "etag"}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["AWS_REGION"] = region
    return opts


def table_uri(uri: str) -> str:
    """The table URI as delta-rs takes it (local paths absolute, no trailing slash)."""
    return uri.rstrip("/") if uri.startswith("s3://") else resolve(uri).path


def _require() -> None:
    try:
        import deltalake  # noqa: F401
    except ImportError as e:
        raise InputError("format delta needs the deltalake package: pip install 'hymba-batch[tables]'") from e


def open_table(uri: str, version: int | None = None) -> Any:
    """The DeltaTable at ``uri``; InputError naming the path when it is not one."""
    _require()
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError, TableNotFoundError

    t = table_uri(uri)
    try:
        return DeltaTable(t, version=version, storage_options=storage_options(uri))
    except TableNotFoundError as e:
        raise InputError(f"{uri}: not a Delta table (no readable _delta_log/ there: {e})") from e
    except DeltaError as e:
        if version is not None:
            raise InputError(f"{uri}: cannot load version {version} of the Delta table ({e})") from e
        raise InputError(f"{uri}: cannot open the Delta table ({e})") from e


def try_open(uri: str) -> Any | None:
    """The DeltaTable at ``uri`` (latest version), or None when there is no table there."""
    _require()
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(table_uri(uri), storage_options=storage_options(uri))
    except TableNotFoundError:
        return None


def _partition_type(t: pa.DataType) -> str:
    return "int64" if pa.types.is_integer(t) else "string"


def list_delta_files(uri: str, version: int | None) -> tuple[list[InputFile], dict[str, Any]]:
    """The data files of the table's ``version`` (latest when None) and the source record."""
    dt = open_table(uri, version)
    features = set(dt.protocol().reader_features or [])
    bad = sorted(features & _UNSUPPORTED_READER_FEATURES)
    if bad:
        raise InputError(f"{uri}: the Delta table uses reader feature(s) {bad}, which hymba-batch does not "
                         f"read; run OPTIMIZE / REORG ... APPLY (PURGE) or copy the table first")
    schema = pa.schema(dt.schema().to_arrow())
    part_cols = list(dt.metadata().partition_columns)
    actions = pa.table(dt.get_add_actions(flatten=True)).to_pylist()
    base = table_uri(uri)
    loc = resolve(uri)
    paths = [loc.join(unquote(a["path"])) for a in actions]
    infos = loc.fs.get_file_info(paths) if paths else []
    files = []
    for a, path, info in zip(actions, paths, infos):
        parts = []
        for c in part_cols:
            raw = a.get(f"partition.{c}")
            typ = _partition_type(schema.field(c).type)
            val = None if raw is None else (int(raw) if typ == "int64" else str(raw))
            parts.append((c, val, typ))
        if info.size is None:
            raise InputError(f"{uri}: data file {a['path']} of version {dt.version()} is missing")
        files.append(InputFile(loc.uri(path), info.size, info.mtime_ns or 0, tuple(parts)))
    files.sort(key=lambda f: f.uri)
    return files, {"delta_table": base, "delta_version": dt.version()}


class DeltaSink(Sink):
    """Stages unit files in the table folder; one transaction per run adds them."""

    shared = True

    @property
    def staging_uri(self) -> str:
        return self.opts.uri

    def prepare(self) -> None:
        uri = self.opts.uri
        if try_open(uri) is not None:
            return
        loc = resolve(uri)
        import pyarrow.fs as pafs

        if loc.fs.get_file_info(loc.path).type == pafs.FileType.Directory:
            sel = pafs.FileSelector(loc.path, recursive=False)
            names = [posixpath.basename(i.path) for i in loc.fs.get_file_info(sel)]
            foreign = [n for n in names if not (n.startswith(("_", ".")) or n.startswith("part-"))]
            if foreign:
                raise OutputConflict(f"output.uri {uri}: not a Delta table, and not empty ({sorted(foreign)[:5]})")

    def publish(self, out: JobOutput, pairs: list[tuple[WorkUnit, UnitResult]]) -> dict[str, Any]:
        from deltalake import DeltaTable
        from deltalake.transaction import AddAction, CommitProperties, create_table_with_add_actions

        uri, opts = self.opts.uri, storage_options(self.opts.uri)
        t_uri = table_uri(uri)
        staged = out.parts()
        names = [posixpath.basename(staged[u.unit_id]) for u, _ in pairs]
        if not names:
            return {"delta_table": t_uri, "files": 0}
        dt = try_open(uri)
        exists = dt is not None
        if dt is not None:
            have = {unquote(p) for p in pa.table(dt.get_add_actions(flatten=True)).column("path").to_pylist()}
            done = [n for n in names if n in have]
            if done:
                if len(done) != len(names):
                    raise OutputConflict(f"{uri}: {len(done)} of this run's {len(names)} files are in the table "
                                         f"already; a run's files are committed together, so the table was "
                                         f"changed by hand")
                return {"delta_table": t_uri, "delta_version": dt.version(), "files": len(names),
                        "already_committed": True}
        loc = out.parts_loc
        infos = loc.fs.get_file_info([staged[u.unit_id] for u, _ in pairs])
        with loc.fs.open_input_file(staged[pairs[0][0].unit_id]) as f:
            schema = pq.read_schema(f).remove_metadata()
        actions = [AddAction(n, int(i.size), {}, int((i.mtime_ns or 0) // 1_000_000), True,
                             json.dumps({"numRecords": r.rows}))
                   for n, i, (_, r) in zip(names, infos, pairs)]
        props = CommitProperties(custom_metadata={"hymba.app": self.opts.app_id, "hymba.files": str(len(names)),
                                                  "hymba.rows": str(sum(r.rows for _, r in pairs))})
        if exists:
            old = pa.schema(dt.schema().to_arrow())
            if old.names != schema.names:
                raise OutputConflict(f"{uri}: the table's columns {old.names} differ from this job's output "
                                     f"columns {schema.names}")
            dt.create_write_transaction(actions, "append", old, commit_properties=props)
        else:
            from deltalake import Schema

            create_table_with_add_actions(t_uri, Schema.from_arrow(schema), actions, mode="error",
                                          storage_options=opts, commit_properties=props)
        return {"delta_table": t_uri, "delta_version": DeltaTable(t_uri, storage_options=opts).version(),
                "files": len(names)}

"""The job's commit protocol in the output prefix.

Layout: ``part-<unit>.<ext>`` data files (each committed atomically by its worker, each its own
commit record), ``_hymba/job.json`` (the fingerprint the files belong to, written before any
part), ``_hymba/status.json`` (progress, rewritten as units commit), ``_hymba/manifest.json``
and ``_SUCCESS`` (written last, in that order, only after the committed row count is checked
against the input row count). Readers trust only the files the manifest lists; names starting
with ``_`` or ``.`` are invisible to pyarrow, pandas, Spark and duckdb globs of ``part-*``.

A job fingerprint hashes model, prompt, sampling, input snapshot and output shape. Running the
same job again resumes (committed units are skipped); a different fingerprint is refused unless
the caller asks to restart, which first removes the old job's files. A prefix holding files
that are not ours is refused. Knows nothing of Ray, prompts or models.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import pyarrow.fs as pafs

from .fs import Location, delete_prefix, exists, read_json, resolve, write_json
from .shards import WorkUnit
from .unit import UnitResult
from .writer import read_part_info, unit_id_of

META_DIR = "_hymba"
# a sink's commit of a run's unit files: [(unit, its result)] -> what it committed (for the manifest)
Publish = Callable[[list[tuple[WorkUnit, UnitResult]]], dict[str, Any]]


class OutputConflict(RuntimeError):
    """The output prefix holds data this job must not mix with."""


def fingerprint(parts: dict[str, Any]) -> str:
    """A stable hash of the job's identity parts (JSON-canonical)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class JobOutput:
    """The output prefix of one job: its state files and its committed parts."""

    def __init__(self, uri: str, fmt: str, parts_uri: str | None = None, published: tuple[str, ...] = (),
                 shared: bool = False) -> None:
        """``parts_uri``: where the unit files are staged (default: the prefix itself);
        ``published``: names a sink writes in the prefix at commit (not foreign files);
        ``shared``: the prefix is a table other writers share (their files are not foreign,
        and a restart never deletes files, which the table may already reference)."""
        self.loc = resolve(uri)
        self.parts_loc = self.loc if parts_uri is None else resolve(parts_uri)
        self.published, self.shared = set(published), shared
        self.uri, self.fmt = self.loc.uri(), fmt
        self.meta = self.loc.join(META_DIR)
        self.tmp = self.loc.join(META_DIR, "tmp")
        self.job_path = self.loc.join(META_DIR, "job.json")
        self.status_path = self.loc.join(META_DIR, "status.json")
        self.manifest_path = self.loc.join(META_DIR, "manifest.json")
        self.success_path = self.loc.join("_SUCCESS")

    def _listing(self, loc: Location | None = None) -> list[pafs.FileInfo]:
        loc = loc or self.loc
        if loc.fs.get_file_info(loc.path).type != pafs.FileType.Directory:
            return []
        sel = pafs.FileSelector(loc.path, recursive=False, allow_not_found=True)
        return [i for i in loc.fs.get_file_info(sel) if i.type == pafs.FileType.File]

    def parts(self) -> dict[str, str]:
        """unit id -> path of every data file of ours in the prefix (or its staging folder)."""
        out = {}
        for info in self._listing(self.parts_loc):
            uid = unit_id_of(info.path)
            if uid is not None and info.path.endswith("." + self.fmt):
                out[uid] = info.path
        return out

    def check(self, fp: str, parts: dict[str, Any], restart: bool) -> str:
        """What claiming the prefix for this fingerprint would do ('new', 'resume', 'restart'),
        or OutputConflict; reads only (a refused run leaves the prefix untouched, lease included)."""
        old = read_json(self.loc, self.job_path)
        foreign = [] if self.shared else [
            posixpath.basename(i.path) for i in self._listing()
            if unit_id_of(i.path) is None and posixpath.basename(i.path) not in {"_SUCCESS"} | self.published
            and not posixpath.basename(i.path).startswith(".")]
        if foreign or (old is None and self.parts()):
            names = foreign or sorted(self.parts())[:5]
            raise OutputConflict(f"output.uri {self.uri} holds files that are not this job's "
                                 f"({names[:5]}); choose an empty output prefix")
        parts = json.loads(json.dumps(parts, sort_keys=True, default=str))  # as stored: tuples become lists
        if old is not None and old.get("fingerprint") != fp:
            if restart and self.shared:
                raise OutputConflict(f"output.uri {self.uri} is a table holding another job's output "
                                     f"(fingerprint {old.get('fingerprint', '?')[:12]}); a restart would delete "
                                     f"files the table references: write to a new table instead")
            if not restart and not self.released():
                changed = sorted(k for k in set(parts) | set(old.get("parts", {}))
                                 if parts.get(k) != old.get("parts", {}).get(k))
                raise OutputConflict(
                    f"output.uri {self.uri} holds another run's output (fingerprint "
                    f"{old.get('fingerprint', '?')[:12]}, this job {fp[:12]}; changed: {', '.join(changed)}). "
                    f"Re-run with --restart to delete it and start over, or choose another output.uri")
            # --restart, or a run that ended (failed, cancelled) with nothing committed: its
            # fingerprint is not pinned, the corrected spec starts over (there is nothing to lose)
            return "restart" if restart else "new"
        return "resume" if old is not None else "new"

    def prepare(self, fp: str, parts: dict[str, Any], restart: bool, keep: tuple[str, ...] = ()) -> str:
        """Claim the prefix for this fingerprint; returns 'new', 'resume' or 'restart'."""
        state = self.check(fp, parts, restart)
        if state == "restart" or (state == "new" and read_json(self.loc, self.job_path) is not None):
            self.clear(keep)  # a restart, or a released claim of another fingerprint
        if state != "resume":
            parts = json.loads(json.dumps(parts, sort_keys=True, default=str))
            write_json(self.loc, self.job_path, {"fingerprint": fp, "parts": parts,
                                                 "created_at": time.time()}, self.tmp)
        return state

    def holds_commits(self) -> bool:
        """Whether anything was ever committed here: a part file, a manifest or ``_SUCCESS``, or an
        incremental run's state (``_hymba/state.json``)."""
        return bool(self.parts()) or any(exists(self.loc, p) for p in (
            self.success_path, self.manifest_path, self.loc.join(META_DIR, "state.json")))

    def released(self) -> bool:
        """Whether the prefix's earlier job let go of it: its run ended (``failed`` or
        ``cancelled`` in the status) and nothing was ever committed. A claim whose run may still be
        going (status ``running``, or none yet) stays pinned."""
        if self.holds_commits():
            return False
        return (self.read_status() or {}).get("state") in ("failed", "cancelled")

    def reclaim(self, fp: str, parts: dict[str, Any]) -> bool:
        """Write the claim (``_hymba/job.json``) again if it vanished while this job held the
        prefix (someone deleted the prefix mid-run): the part files written since are this job's,
        and a re-run must be able to resume them. Returns whether it had to."""
        if read_json(self.loc, self.job_path) is not None:
            return False
        parts = json.loads(json.dumps(parts, sort_keys=True, default=str))
        write_json(self.loc, self.job_path, {"fingerprint": fp, "parts": parts, "created_at": time.time(),
                                             "reclaimed": True}, self.tmp)
        return True

    def clear(self, keep: tuple[str, ...] = ()) -> None:
        """Remove a previous job's files: the success marker and manifest first, then parts,
        then ``_hymba/`` except the names in ``keep`` (an incremental run keeps its lease)."""
        for p in (self.success_path, self.manifest_path, *(self.loc.join(n) for n in sorted(self.published))):
            delete_prefix(self.loc, p)
        for path in self.parts().values():
            self.parts_loc.fs.delete_file(path)
        if not keep:
            delete_prefix(self.loc, self.meta)
            return
        sel = pafs.FileSelector(self.meta, recursive=False, allow_not_found=True)
        for info in self.loc.fs.get_file_info(sel):
            if posixpath.basename(info.path) not in keep:
                delete_prefix(self.loc, info.path)

    def committed(self, units: list[WorkUnit], threads: int = 16, strays: str = "error") -> dict[str, UnitResult]:
        """Results of the units already committed in the prefix (their files' metadata). Files of
        units not in ``units`` are an error, or with ``strays='ignore'`` (an incremental run,
        whose plan covers only new files) left alone."""
        by_id = {u.unit_id: u for u in units}
        found = self.parts()
        stray = sorted(set(found) - set(by_id))
        if strays == "ignore":
            found = {uid: p for uid, p in found.items() if uid in by_id}
        elif stray:
            raise OutputConflict(f"output.uri {self.uri}: files for units not in this job's plan "
                                 f"({[posixpath.basename(found[s]) for s in stray[:3]]}); use --restart")

        def info(uid: str) -> tuple[str, UnitResult]:
            rows, meta = read_part_info(self.parts_loc, found[uid])
            if rows != by_id[uid].num_rows:
                raise OutputConflict(f"{self.parts_loc.uri(found[uid])}: {rows} rows, the unit has {by_id[uid].num_rows}")
            res = UnitResult.from_meta(meta)
            res.reused = True
            return uid, res

        if not found:
            return {}
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(found)))) as ex:
            return dict(ex.map(info, sorted(found)))

    def write_status(self, status: dict[str, Any]) -> None:
        write_json(self.loc, self.status_path, status, self.tmp)

    def read_status(self) -> dict[str, Any] | None:
        return read_json(self.loc, self.status_path)

    def read_manifest(self) -> dict[str, Any] | None:
        return read_json(self.loc, self.manifest_path) if exists(self.loc, self.success_path) else None

    def finalize(self, units: list[WorkUnit], manifest: dict[str, Any],
                 publish: Publish | None = None) -> dict[str, Any]:
        """Verify every unit is committed with its row count, then ``publish`` them (a table
        sink's one transaction; its answer joins the manifest), then write manifest and _SUCCESS."""
        results = self.committed(units)
        missing = [u.unit_id for u in units if u.unit_id not in results]
        if missing:
            raise OutputConflict(f"cannot commit the job: {len(missing)} unit(s) have no output file in {self.uri} "
                                 f"(first: part-{missing[0]}.{self.fmt}; deleted while the job ran?); "
                                 f"run the job again to redo them")
        committed_rows = sum(r.rows for r in results.values())
        input_rows = sum(u.num_rows for u in units)
        if committed_rows != input_rows:
            raise OutputConflict(f"cannot commit the job: {committed_rows} rows committed, {input_rows} input rows")
        files = []
        for u in units:
            r = results[u.unit_id]
            files.append({"path": posixpath.basename(r.output_path) or f"part-{u.unit_id}.{self.fmt}",
                          "unit_id": u.unit_id, "rows": r.rows, "source_file": u.file.uri,
                          "source_rows": [u.row_start, u.row_end], "error_rows": r.error_rows,
                          "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                          "timings": r.timings, "worker": r.worker})
        manifest = dict(manifest)
        if publish is not None:
            manifest["published"] = publish([(u, results[u.unit_id]) for u in units])
        manifest.update({
            "files": files, "format": self.fmt, "committed_rows": committed_rows, "input_rows": input_rows,
            "error_rows": sum(r.error_rows for r in results.values()),
            "truncated_rows": sum(r.truncated_rows for r in results.values()),
            "prompt_tokens": sum(r.prompt_tokens for r in results.values()),
            "completion_tokens": sum(r.completion_tokens for r in results.values()),
            "committed_at": time.time(),
        })
        write_json(self.loc, self.manifest_path, manifest, self.tmp)
        with self.loc.fs.open_output_stream(self.success_path) as f:
            f.write(b"")
        delete_prefix(self.loc, self.tmp)
        return manifest

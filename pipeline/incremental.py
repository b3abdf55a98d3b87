"""Incremental runs over one output prefix: which input files a run processes, and its commit.

State, in the output prefix (all written only by the run holding ``_hymba/lease.json``):

- ``_hymba/state.json``: every processed input file (URI -> size, mtime, the run that processed
  it, its part files, rows, tokens) and the list of committed runs. Writing it is a run's
  commit point.
- ``_hymba/runs/<run_id>/manifest.json``: what one run committed (its new and changed files,
  its part files, counts, tokens, the part files it superseded); ``status.json`` beside it.
- ``_hymba/manifest.json``: the whole dataset (every live part file of every run) and
  ``latest_run``; ``_SUCCESS``: the prefix holds exactly the manifest's part files.

A file is processed when the state has no entry for its URI, or one with another size or
modification time. A changed file's earlier part files are superseded: the new run's state
names only its new parts, then the old ones are deleted, so the dataset holds each row once.
Part files no committed run owns (left by a crashed run) are deleted at the next run, unless
that run's plan produces the same files, which it then reuses. Input files that disappear keep
their rows. Knows nothing of Ray, prompts or models.
"""

from __future__ import annotations

import posixpath
import re
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from .commit import JobOutput, OutputConflict, Publish
from .fs import delete_prefix, read_json, write_json
from .shards import InputFile, WorkUnit
from .unit import UnitResult
from .writer import part_name

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_RUN_RECORDS = 1000


def new_run_id() -> str:
    """A fresh run id: UTC time plus a random suffix (sorts by start time)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def check_run_id(run_id: str) -> str:
    if not RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r}: use letters, digits, '.', '_' and '-' (at most 128)")
    return run_id


@dataclass
class Selection:
    """The input files of one run, split by what the state knows about them."""

    new: list[InputFile] = field(default_factory=list)
    changed: list[InputFile] = field(default_factory=list)
    unchanged: list[InputFile] = field(default_factory=list)

    @property
    def todo(self) -> list[InputFile]:
        return sorted(self.new + self.changed, key=lambda f: f.uri)


class RunState:
    """The processed-files state of an incremental output prefix."""

    def __init__(self, out: JobOutput) -> None:
        self.out = out
        self.path = out.loc.join("_hymba", "state.json")
        self.doc: dict[str, Any] = read_json(out.loc, self.path) or {"version": 1, "files": {}, "runs": []}
        if not isinstance(self.doc.get("files"), dict):
            raise OutputConflict(f"{out.loc.uri(self.path)}: not a hymba-batch state document (no 'files')")

    def select(self, files: list[InputFile]) -> Selection:
        """Split the listed input into new, changed and unchanged files."""
        sel = Selection()
        for f in files:
            seen = self.doc["files"].get(f.uri)
            if seen is None:
                sel.new.append(f)
            elif (seen["size"], seen["mtime_ns"]) != (f.size, f.mtime_ns):
                sel.changed.append(f)
            else:
                sel.unchanged.append(f)
        return sel

    def live_parts(self) -> set[str]:
        """Base names of the part files committed runs own."""
        return {p for entry in self.doc["files"].values() for p in entry["parts"]}

    def remove_orphans(self, planned_units: set[str]) -> list[str]:
        """Delete part files no committed run owns and this run's plan does not produce."""
        live = self.live_parts()
        gone = []
        for uid, path in sorted(self.out.parts().items()):
            name = posixpath.basename(path)
            if name not in live and uid not in planned_units:
                self.out.loc.fs.delete_file(path)
                gone.append(name)
        return gone

    def begin(self, has_work: bool) -> None:
        """A run with work removes ``_SUCCESS`` first: the prefix is about to gain files."""
        if has_work:
            delete_prefix(self.out.loc, self.out.success_path)

    def commit(self, run_id: str, sel: Selection, units: list[WorkUnit], info: dict[str, Any],
               publish: Publish | None = None) -> dict[str, Any]:
        """Verify the run's units, write its manifest, ``publish`` them (a table sink's one
        transaction, idempotent), write the state (the commit point), the dataset manifest,
        delete superseded files and write ``_SUCCESS``; returns the run's manifest."""
        out = self.out
        results = out.committed(units, strays="ignore")
        missing = [u.unit_id for u in units if u.unit_id not in results]
        if missing:
            raise OutputConflict(f"cannot commit run {run_id}: {len(missing)} unit(s) have no output file "
                                 f"(first: {missing[0]})")
        by_file: dict[str, list[tuple[WorkUnit, UnitResult]]] = defaultdict(list)
        for u in units:
            by_file[u.file.uri].append((u, results[u.unit_id]))
        superseded = sorted(p for f in sel.changed for p in self.doc["files"][f.uri]["parts"])
        if superseded and out.shared:
            raise OutputConflict(f"cannot commit run {run_id}: input file(s) {[f.uri for f in sel.changed][:3]} "
                                 f"changed since an earlier run, and a table output keeps the rows it committed; "
                                 f"write the changed rows as new input files, or run into a new table")
        now = time.time()
        files = [{"path": part_name(u.unit_id, out.fmt), "unit_id": u.unit_id, "rows": r.rows,
                  "source_file": u.file.uri, "source_rows": [u.row_start, u.row_end], "error_rows": r.error_rows,
                  "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                  "timings": r.timings, "worker": r.worker} for u in units for r in [results[u.unit_id]]]
        manifest = dict(info)
        manifest.update({
            "run_id": run_id, "format": out.fmt, "files": files,
            "new_files": [f.uri for f in sel.new], "changed_files": [f.uri for f in sel.changed],
            "unchanged_files": len(sel.unchanged), "superseded_parts": superseded,
            "committed_rows": sum(r.rows for r in results.values()),
            "input_rows": sum(u.num_rows for u in units),
            "error_rows": sum(r.error_rows for r in results.values()),
            "truncated_rows": sum(r.truncated_rows for r in results.values()),
            "prompt_tokens": sum(r.prompt_tokens for r in results.values()),
            "completion_tokens": sum(r.completion_tokens for r in results.values()),
            "committed_at": now,
        })
        if manifest["committed_rows"] != manifest["input_rows"]:
            raise OutputConflict(f"cannot commit run {run_id}: {manifest['committed_rows']} rows committed, "
                                 f"{manifest['input_rows']} input rows")
        if publish is not None:
            manifest["published"] = publish([(u, results[u.unit_id]) for u in units])
        write_json(out.loc, out.loc.join("_hymba", "runs", run_id, "manifest.json"), manifest, out.tmp)
        for f in sel.todo:
            pairs = by_file.get(f.uri, [])
            self.doc["files"][f.uri] = {
                "size": f.size, "mtime_ns": f.mtime_ns, "run_id": run_id,
                "parts": sorted(part_name(u.unit_id, out.fmt) for u, _ in pairs),
                "rows": sum(r.rows for _, r in pairs), "error_rows": sum(r.error_rows for _, r in pairs),
                "prompt_tokens": sum(r.prompt_tokens for _, r in pairs),
                "completion_tokens": sum(r.completion_tokens for _, r in pairs)}
        self.doc["runs"] = (self.doc["runs"] + [{
            "run_id": run_id, "committed_at": now, "new_files": len(sel.new), "changed_files": len(sel.changed),
            "rows": manifest["committed_rows"]}])[-MAX_RUN_RECORDS:]
        self.doc["fingerprint"] = info.get("fingerprint")
        write_json(out.loc, self.path, self.doc, out.tmp)  # the commit point
        write_json(out.loc, out.manifest_path, self.dataset_manifest(run_id), out.tmp)
        for name in superseded:
            delete_prefix(out.loc, out.loc.join(name))
        with out.loc.fs.open_output_stream(out.success_path) as f:
            f.write(b"")
        delete_prefix(out.loc, out.tmp)
        return manifest

    def dataset_manifest(self, latest_run: str) -> dict[str, Any]:
        """The manifest of the whole prefix: every live part file of every committed run."""
        entries = self.doc["files"]
        files = [{"path": p, "source_file": uri, "run_id": e["run_id"]}
                 for uri, e in sorted(entries.items()) for p in e["parts"]]
        return {
            "incremental": True, "format": self.out.fmt, "fingerprint": self.doc.get("fingerprint"),
            "latest_run": latest_run, "runs": len(self.doc["runs"]), "files": files,
            "input_files": len(entries), "committed_rows": sum(e["rows"] for e in entries.values()),
            "error_rows": sum(e["error_rows"] for e in entries.values()),
            "prompt_tokens": sum(e["prompt_tokens"] for e in entries.values()),
            "completion_tokens": sum(e["completion_tokens"] for e in entries.values()),
            "committed_at": time.time(),
        }

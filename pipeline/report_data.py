"""What a job report shows, read from the job's output prefix (local or S3): the manifest (or,
for a job that did not finish, the committed part files and ``status.json``), the history
(``_hymba/history.json``), and the per-row columns of the committed files (token counts,
finish reasons, errors). Plain figures out; ``jobs/report.py`` draws them. Knows nothing of Ray,
models or plotting.
"""

from __future__ import annotations

import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from .commit import META_DIR, JobOutput
from .fs import read_json
from .history import HISTORY_FILE

ROW_COLUMNS = ["finish_reason", "prompt_tokens", "completion_tokens", "error", "_source_file", "_source_row"]
SAMPLES_PER_KIND = 3


class NoJob(RuntimeError):
    """The prefix holds no job (no ``_hymba/status.json``, no manifest)."""


def error_kind(message: str) -> str:
    """An error message with its particulars (numbers, quoted values) masked: errors of one kind
    share it, e.g. ``prompt is N tokens, over the limit of N ...``."""
    kind = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", message.strip().splitlines()[0] if message.strip() else "")
    kind = re.sub(r"\d+(\.\d+)?", "N", kind)
    return kind[:120] or "(empty message)"


@dataclass
class ErrorKind:
    kind: str
    rows: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)  # source file, row, message


@dataclass
class Phases:
    """The time split of a run (seconds): start (planning, Ray, actors loading their models),
    steady state (every actor busy), tail (nothing left to hand out, an actor idle), commit;
    ``source`` says whether the driver measured it (``status.json``'s ``time_split``) or the
    history shows it."""

    start_s: float | None
    steady_s: float | None
    tail_s: float | None
    total_s: float | None
    commit_s: float | None = None
    source: str = "history"


@dataclass
class ReportData:
    output_uri: str
    job_id: str
    state: str
    total_rows: int
    committed_rows: int
    error_rows: int
    prompt_tokens: int
    completion_tokens: int
    committed_units: int
    total_units: int | None
    manifested: bool
    status: dict[str, Any] | None
    history: dict[str, Any] | None
    prompt_lengths: list[int]
    completion_lengths: list[int]
    finish_reasons: dict[str, int]
    errors: list[ErrorKind]
    failed_units: list[dict[str, Any]]
    phases: Phases

    def summary(self) -> dict[str, Any]:
        """The report's figures as plain JSON (embedded in the page, checked by the tests)."""
        return {
            "output_uri": self.output_uri, "job_id": self.job_id, "state": self.state,
            "total_rows": self.total_rows, "committed_rows": self.committed_rows, "error_rows": self.error_rows,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "committed_units": self.committed_units, "total_units": self.total_units, "manifested": self.manifested,
            "finish_reasons": self.finish_reasons,
            "prompt_tokens_histogram_total": sum(self.prompt_lengths),
            "completion_tokens_histogram_total": sum(self.completion_lengths),
            "errors": [{"kind": e.kind, "rows": e.rows, "samples": e.samples} for e in self.errors],
            "failed_units": self.failed_units,
            "phases": vars(self.phases),
        }


def _read_rows(out: JobOutput, path: str, fmt: str) -> pa.Table:
    fs = out.loc.fs
    if fmt == "arrow":
        with fs.open_input_file(path) as f:
            table = ipc.open_file(f).read_all()
    else:
        with fs.open_input_file(path) as f:
            table = pq.read_table(f, columns=ROW_COLUMNS)
    return table.select(ROW_COLUMNS)


def phases(run: dict[str, Any] | None, split: dict[str, float] | None = None) -> Phases:
    """The time split: the driver's own (``split``, in status.json once a run has ended) or else
    from one run of the history (None where the run did not get there)."""
    if split:
        parts = [split.get(k) for k in ("start_s", "steady_s", "tail_s", "commit_s")]
        return Phases(parts[0], parts[1], parts[2], sum(p for p in parts if p is not None), parts[3], "driver")
    if not run:
        return Phases(None, None, None, None)
    t0, ready, drained = run.get("started_at"), run.get("ready_at"), run.get("drained_at")
    end = run.get("ended_at") or (run["points"][-1]["t"] if run.get("points") else None)
    total = end - t0 if end is not None and t0 is not None else None
    if ready is None or end is None:
        return Phases(total, None, None, total)
    drained = min(drained, end) if drained is not None else end
    return Phases(ready - t0, drained - ready, end - drained, total)


def load(uri: str) -> ReportData:
    """Everything a report shows about the job in the output prefix ``uri``."""
    job = read_json(JobOutput(uri, "parquet").loc, JobOutput(uri, "parquet").job_path)
    fmt = ((job or {}).get("parts", {}).get("output", {}) or {}).get("format", "parquet")
    out = JobOutput(uri, fmt)
    status, manifest = out.read_status(), out.read_manifest()
    if status is None and manifest is None:
        raise NoJob(f"{out.uri}: no job here (no {META_DIR}/status.json and no manifest)")
    history = read_json(out.loc, out.loc.join(META_DIR, HISTORY_FILE))
    if manifest is not None:
        paths = [out.loc.join(f["path"]) for f in manifest.get("files", [])]
    else:
        paths = [p for _, p in sorted(out.parts().items())]
    tables = [_read_rows(out, p, fmt) for p in paths]
    rows = pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.string()) for c in ROW_COLUMNS})
    cols = {c: rows.column(c).to_pylist() for c in ROW_COLUMNS}
    errors: dict[str, ErrorKind] = {}
    for msg, src, row in zip(cols["error"], cols["_source_file"], cols["_source_row"]):
        if msg is None:
            continue
        e = errors.setdefault(error_kind(msg), ErrorKind(error_kind(msg)))
        e.rows += 1
        if len(e.samples) < SAMPLES_PER_KIND:
            e.samples.append({"source_file": posixpath.basename(src or ""), "source_row": row, "error": msg})
    st = status or {}
    failed = list(st.get("failed_units", [])) if manifest is None else []
    runs = (history or {}).get("runs") or []
    ok = [i for i, m in enumerate(cols["error"]) if m is None]
    return ReportData(
        output_uri=out.uri, job_id=st.get("job_id") or (manifest or {}).get("job_id") or (manifest or {}).get("job", "?"),
        state="succeeded" if manifest is not None else st.get("state", "unknown"),
        total_rows=(manifest or {}).get("input_rows", st.get("total_rows", rows.num_rows)),
        committed_rows=rows.num_rows, error_rows=len(cols["error"]) - len(ok),
        prompt_tokens=sum(cols["prompt_tokens"]), completion_tokens=sum(cols["completion_tokens"]),
        committed_units=len(paths), total_units=st.get("total_units", len(paths) if manifest else None),
        manifested=manifest is not None, status=status, history=history,
        prompt_lengths=[cols["prompt_tokens"][i] for i in ok],
        completion_lengths=[cols["completion_tokens"][i] for i in ok],
        finish_reasons=dict(Counter(r or "none" for r in cols["finish_reason"]).most_common()),
        errors=sorted(errors.values(), key=lambda e: -e.rows), failed_units=failed,
        phases=phases(runs[-1] if runs else None, st.get("time_split")),
    )

"""``hymba-batch status`` as a person reads it: one table with local times, rows done / total,
rows/s over the last minute (from ``_hymba/history.json`` and the status document), ETA, tokens,
errors and the state, for a running or finished job, read from its output prefix or through a
Ray job server (then Ray's own state too). ``--json`` prints the raw documents instead.

The state is shown as the status document says it (``running``, ``succeeded``, ``failed``,
``cancelled``, or any state a newer driver writes), with the age of the document's last update
so that a status nobody updates any more stands out. Knows nothing of Ray or models.
"""

from __future__ import annotations

import time
from typing import Any

from rich.table import Table
from rich.text import Text

from hymba_batch.pipeline.commit import META_DIR, JobOutput
from hymba_batch.pipeline.fs import read_json
from hymba_batch.pipeline.history import HISTORY_FILE

STATE_STYLE = {"succeeded": "green", "running": "cyan", "failed": "red", "cancelled": "yellow"}
RATE_WINDOW_S = 60.0


def local_time(ts: float | None) -> str:
    """An epoch time as local date and time with the zone, or ``-``."""
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))


def duration(seconds: float | None) -> str:
    """``1h 02m``, ``3m 05s``, ``12 s``, or ``-``."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s} s"


def read_history(uri: str, run_id: str | None = None) -> dict[str, Any] | None:
    """The history of the job in ``uri`` (an incremental run's own, when ``run_id`` has one)."""
    out = JobOutput(uri, "parquet")
    try:
        if run_id:
            own = read_json(out.loc, out.loc.join(META_DIR, "runs", run_id, HISTORY_FILE))
            if own is not None:
                return own
        return read_json(out.loc, out.loc.join(META_DIR, HISTORY_FILE))
    except (OSError, ValueError):
        return None


def recent_rate(status: dict[str, Any], history: dict[str, Any] | None,
                window_s: float = RATE_WINDOW_S) -> float | None:
    """Rows per second over the last ``window_s`` seconds of the run: from the history point
    at or just before the window's start to the status document's latest figures."""
    runs = (history or {}).get("runs") or []
    points = list(runs[-1].get("points", [])) if runs else []
    t, rows = status.get("updated_at"), status.get("committed_rows")
    if t is not None and rows is not None:
        points.append({"t": t, "rows": rows})
    if len(points) < 2:
        return None
    end = points[-1]
    start = points[0]
    for p in points:
        if p["t"] <= end["t"] - window_s:
            start = p  # the last point at or before the window's start
    dt = end["t"] - start["t"]
    return (end["rows"] - start["rows"]) / dt if dt > 0 else None


def status_table(status: dict[str, Any] | None, history: dict[str, Any] | None = None,
                 ray: dict[str, Any] | None = None, now: float | None = None) -> Table:
    """The table ``hymba-batch status`` prints; ``ray``: Ray's view of a submitted job."""
    now = time.time() if now is None else now
    st = status or {}
    state = str(st.get("state", "unknown"))
    title = f"job {st.get('job_id') or (ray or {}).get('submission_id', '?')}"
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value")
    if ray is not None:
        t.add_row("Ray job", f"{ray.get('submission_id')}: {ray.get('ray_status')}"
                  + (f" ({ray['ray_message']})" if ray.get("ray_message") else ""))
        t.add_row("Ray start / end", f"{local_time(_ms(ray.get('start_time')))} / {local_time(_ms(ray.get('end_time')))}")
    if not st or "note" in st:
        t.add_row("job status", st.get("note", "no _hymba/status.json yet"))
        return t
    t.add_row("state", Text(state, style=STATE_STYLE.get(state, "bold yellow")))
    t.add_row("output", str(st.get("output_uri", "-")))
    updated = st.get("updated_at")
    t.add_row("started", local_time(st.get("started_at")))
    t.add_row("updated", f"{local_time(updated)} ({duration(now - updated) if updated else '-'} ago)")
    total, done = int(st.get("total_rows") or 0), int(st.get("committed_rows") or 0)
    pct = f" ({100 * done / total:.1f} %)" if total else ""
    t.add_row("rows done / total", f"{done} / {total}{pct}")
    t.add_row("units done / total", f"{st.get('committed_units', '-')} / {st.get('total_units', '-')}")
    rate = recent_rate(st, history)
    avg = st.get("rows_per_s")
    t.add_row("rows/s (last minute)", f"{rate:.2f}" if rate is not None else "-")
    t.add_row("rows/s (run average)", f"{avg:.2f}" if isinstance(avg, (int, float)) else "-")
    left = total - done - int(st.get("failed_rows") or 0)
    if state == "running" and left > 0:
        speed = rate if rate else avg
        eta = duration(left / speed) if speed else "-"
        t.add_row("ETA", f"{eta} ({local_time(now + left / speed)})" if speed else eta)
    t.add_row("tokens in / out", f"{st.get('prompt_tokens', 0)} / {st.get('completion_tokens', 0)}")
    failed = st.get("failed_units") or []
    t.add_row("rows with an error", str(st.get("error_rows", 0)))
    t.add_row("failed units (rows)", f"{len(failed)} ({st.get('failed_rows', 0)})")
    for f in failed[:5]:
        t.add_row("failed unit", f"{f.get('unit_id')} after {f.get('attempts')} tries: {f.get('error')}")
    split = st.get("time_split") or {}
    if split:
        t.add_row("time split", ", ".join(f"{k[:-2]} {duration(v)}" for k, v in split.items() if v is not None))
    starts = st.get("actor_start") or []
    if starts:  # the slowest actor's start, part by part
        slowest = max(starts, key=lambda a: sum(a.values()))
        t.add_row("actor start", ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in slowest.items()))
    if st.get("error"):
        t.add_row("error", Text(str(st["error"]), style="red"))
    if st.get("run_id"):
        t.add_row("run", str(st["run_id"]))
    return t


def _ms(value: Any) -> float | None:
    """Ray's job times are epoch milliseconds."""
    return value / 1000 if isinstance(value, (int, float)) and value else None

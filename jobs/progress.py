"""What the person running a job sees: a live progress bar (rows done / total, generated
tokens per second, ETA) and the final summary table, both with rich. Knows nothing of Ray or
files; the driver feeds it numbers."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .driver import JobSummary


class RichReporter:
    """The driver's Reporter as a rich progress bar."""

    def __init__(self, console: Console | None = None, label: str = "rows") -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[tps]:>8.1f} tok/s"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=self.console, transient=False)
        self.label = label
        self.task = None
        self.t0 = time.monotonic()

    def start(self, total_rows: int, done_rows: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task(self.label, total=total_rows, completed=done_rows, tps=0.0)
        self.t0 = time.monotonic()

    def update(self, done_rows: int, new_tokens: int) -> None:
        if self.task is None:
            return
        tps = new_tokens / max(time.monotonic() - self.t0, 1e-9)
        self.progress.update(self.task, completed=done_rows, tps=tps)

    def stop(self) -> None:
        self.progress.stop()


def summary_table(s: JobSummary) -> Table:
    """The final summary of a run."""
    t = Table(title=f"job {s.job_id}: {s.state}", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    rate = (s.committed_rows / s.elapsed_s) if s.elapsed_s else 0.0
    rows = [
        ("output", s.output_uri),
        ("rows committed / input", f"{s.committed_rows} / {s.total_rows}"),
        ("rows with an error", str(s.error_rows)),
        ("rows truncated", str(s.truncated_rows)),
        ("units run / resumed / total", f"{s.run_units} / {s.resumed_units} / {s.total_units}"),
        ("unit retries / actor restarts", f"{s.retried_units} / {s.actor_restarts}"),
        ("failed units", str(len(s.failed_units))),
        ("tokens in / out", f"{s.prompt_tokens} / {s.completion_tokens}"),
        ("elapsed", f"{s.elapsed_s:.1f} s ({rate:.1f} rows/s)"),
        ("actors / nodes", f"{len(s.actors)} / {len(s.nodes)}"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    for f in s.failed_units[:5]:
        t.add_row("failed unit", f"{f['unit_id']} after {f['attempts']} tries: {f['error']}")
    return t

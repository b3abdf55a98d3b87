"""Output sinks: the one place a job's ``output.format`` is chosen.

Every sink has the same two steps, so exactly-once holds the same way for all of them:

1. stage: each work unit's rows go to one file ``part-<unit>.parquet`` (or ``.arrow``),
   written atomically by its worker into ``staging_uri`` (the output prefix itself, unless the
   sink says otherwise); a retried or resumed unit finds its file and is never written twice;
2. publish: when every unit is staged and the row count checks, the driver hands the run's
   files to ``publish`` once, before the manifest: nothing for plain files, one output JSONL
   for OpenAI Batch, one transaction for Delta and Iceberg. A publish is idempotent: run again
   after a crash between it and the manifest, it finds its own commit and does not repeat it.

Sinks: ``parquet``/``arrow`` (here), ``openai_batch`` (``openai_batch.py``), ``delta``
(``delta.py``), ``iceberg`` (``iceberg.py``). Knows nothing of Ray, prompts or models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .commit import JobOutput
from .shards import WorkUnit
from .unit import UnitResult

OUTPUT_FORMATS = ("parquet", "arrow", "openai_batch", "delta", "iceberg")


@dataclass(frozen=True)
class SinkOptions:
    """The output side of a job (a plain copy of the spec's ``output`` section)."""

    uri: str
    format: str = "parquet"
    model_name: str = "hymba"  # openai_batch: the response's ``model``
    id_column: str | None = None  # openai_batch: the column holding custom_id (default: custom_id)
    table: str | None = None  # iceberg: namespace.table
    catalog: tuple[tuple[str, str], ...] = ()  # iceberg: catalog properties
    app_id: str = "hymba-batch"  # table sinks: the writer's id in the table's commit metadata


class Sink:
    """Plain unit files in the output prefix; publishing adds nothing."""

    shared = False  # the prefix is a table other writers share
    published: tuple[str, ...] = ()  # names publish writes in the prefix

    def __init__(self, opts: SinkOptions) -> None:
        self.opts = opts

    @property
    def file_format(self) -> str:
        return "arrow" if self.opts.format == "arrow" else "parquet"

    @property
    def staging_uri(self) -> str | None:
        """Where unit files go (None: the output prefix)."""
        return None

    def job_output(self) -> JobOutput:
        return JobOutput(self.opts.uri, self.file_format, self.staging_uri, self.published, self.shared)

    def prepare(self) -> None:
        """Checks before any unit runs (a table sink opens or checks its table)."""

    def publish(self, out: JobOutput, pairs: list[tuple[WorkUnit, UnitResult]]) -> dict[str, Any]:
        """Make the staged files of one run visible; returns what it committed (for the manifest)."""
        return {}


def make_sink(opts: SinkOptions) -> Sink:
    """The sink of ``opts.format``."""
    if opts.format in ("parquet", "arrow"):
        return Sink(opts)
    if opts.format == "openai_batch":
        from .openai_batch import OpenAIBatchSink

        return OpenAIBatchSink(opts)
    if opts.format == "delta":
        from .delta import DeltaSink

        return DeltaSink(opts)
    if opts.format == "iceberg":
        from .iceberg import IcebergSink

        return IcebergSink(opts)
    raise ValueError(f"output.format: {opts.format!r} is not one of {', '.join(OUTPUT_FORMATS)}")

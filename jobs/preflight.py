"""The job's pre-flight: the checks ``validate``, ``run`` and ``submit`` make before any planning
or Ray, each answering within seconds with one or two lines that say what to do.

Model (``model/precheck.py``: a Hymba checkpoint folder, or a hub repo id that is cached or that
the hub knows; an ``s3://`` checkpoint through the S3 probe, which must hold ``config.json``),
input (``pipeline/preflight.py``: exists, or its bucket answers and lists) and output (a folder
that can be written, or a bucket that takes a probe object). Imports no torch and no Ray.
"""

from __future__ import annotations

from hymba_batch.model.precheck import CheckpointSourceError, check_source
from hymba_batch.pipeline.preflight import PreflightError, check_input, check_output, check_s3_read

from .spec import JobSpec


def preflight(spec: JobSpec, model: bool = True, input: bool = True, output: bool = True) -> None:
    """Raise PreflightError for the first thing that cannot work (model, then input, then output)."""
    if model:
        try:
            if check_source(spec.model.path) == "s3":
                check_s3_read(spec.model.path, "model.path", object_key="config.json")
        except CheckpointSourceError as e:
            raise PreflightError(str(e)) from None
    if input:
        check_input(spec.input.uri)
    if output:
        check_output(spec.output.uri)

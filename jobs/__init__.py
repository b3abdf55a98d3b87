"""hymba_batch.jobs: the job spec (``spec``), the driver that plans and runs a job (``driver``),
the progress display (``progress``), the demo (``demo``) and the ``hymba-batch`` CLI (``cli``)."""

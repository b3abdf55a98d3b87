"""hymba_batch.pipeline: the CPU data plane of a batch job.

Owns listing and planning the input (``shards``), reading a work unit (``reader``), building
prompts and tokenizing them (``tokenizer``, ``prompts``), writing one output file per unit
atomically (``writer``), the per-unit flow around an injected generate function (``unit``),
and the job's commit protocol in the output prefix (``commit``). Filesystems, local and S3, come
from ``fs``. Never imports torch or ray: the engine is handed in as a plain callable.
"""

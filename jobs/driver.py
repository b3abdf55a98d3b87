"""The driver: plan a job, claim its output prefix, run its units on the actor pool, keep
``_hymba/status.json`` current, and commit (manifest + ``_SUCCESS``) when every row is in.

Only unit descriptions and unit results pass through here; rows never do. Re-running the same
job resumes from the committed files; a job whose fingerprint changed is refused unless
``restart`` is asked. Ctrl-C stops dispatching, keeps everything committed, and marks the
status ``cancelled`` (the ``run`` command turns Ray's job-stop SIGTERM into the same).

Every run holds the output prefix's lease (``pipeline/lease.py``) for its whole life: a second
run on the same output is refused (or waits, ``wait``), and a heartbeat thread keeps the lease
and ``status.json`` fresh so that ``hymba-batch status`` can tell a dead driver (``heartbeat``).
Incremental runs (``schedule.incremental`` or ``incremental=True``) hold the output prefix's
lease for their whole life, process only the input files the prefix's state does not list (or
lists with another size or mtime), and commit per run (``pipeline/incremental.py``); their
fingerprint leaves out the input snapshot, so new input files are not a changed job.
Knows nothing of prompts or tensors beyond the spec's values.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from hymba_batch.pipeline.classify import DEFAULT_CLASSIFY
from hymba_batch.pipeline.commit import META_DIR, JobOutput, fingerprint
from hymba_batch.pipeline.enrich import EnrichConfig
from hymba_batch.pipeline.fs import read_json, write_json
from hymba_batch.pipeline.history import HISTORY_FILE, History, totals
from hymba_batch.pipeline.incremental import RunState, Selection, check_run_id, new_run_id
from hymba_batch.pipeline.lease import Lease
from hymba_batch.pipeline.prompts import PromptConfig, template_variables
from hymba_batch.pipeline.formats import InputOptions, list_input, plan_input
from hymba_batch.pipeline.openai_batch import MESSAGES_COLUMN
from hymba_batch.pipeline.shards import InputFile, WorkUnit
from hymba_batch.pipeline.sinks import Sink, SinkOptions, make_sink
from hymba_batch.pipeline.unit import OutputConfig, SamplingConfig, UnitResult
from hymba_batch.pipeline.writer import RESERVED_COLUMNS

from .heartbeat import Heartbeat, heartbeat_fields
from .spec import JobSpec, SpecError, check_json_schema

if TYPE_CHECKING:
    from hymba_batch.workers.actor import ActorConfig


class Reporter(Protocol):
    def start(self, total_rows: int, done_rows: int) -> None: ...
    def update(self, done_rows: int, new_tokens: int) -> None: ...
    def stop(self) -> None: ...


@dataclass
class Plan:
    files: list[InputFile]
    units: list[WorkUnit]
    fingerprint: str
    parts: dict[str, Any]
    format: str = "parquet"  # the input format
    source: dict[str, Any] = field(default_factory=dict)  # the input's snapshot (a Delta version)

    @property
    def total_rows(self) -> int:
        return sum(u.num_rows for u in self.units)


@dataclass
class JobSummary:
    """How a run ended (also what ``hymba-batch run`` prints)."""

    job_id: str
    state: str  # succeeded | failed | cancelled
    output_uri: str
    total_rows: int = 0
    committed_rows: int = 0
    error_rows: int = 0
    truncated_rows: int = 0
    total_units: int = 0
    resumed_units: int = 0
    run_units: int = 0
    retried_units: int = 0
    actor_restarts: int = 0
    failed_units: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    actors: list[dict[str, str]] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    run_id: str | None = None  # incremental runs
    new_files: int = 0
    changed_files: int = 0
    unchanged_files: int = 0
    time_split: dict[str, float] = field(default_factory=dict)  # start / steady / tail / commit seconds


def _model_identity(path: str) -> dict[str, Any]:
    ident: dict[str, Any] = {"path": path}
    p = Path(path).expanduser()
    if p.is_dir():
        cfg = p / "config.json"
        ident["config_sha256"] = hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg.is_file() else None
        ident["weights"] = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.glob("*.safetensors"))
    return ident


def enrich_config(spec: JobSpec) -> EnrichConfig:
    """The job's enrichment extras; a schema file is read here (SpecError naming it when it
    cannot be read, mapped to a column type or compiled)."""
    from hymba_batch.pipeline.structured import SchemaError, load_json_schema

    t = spec.task
    schema = t.json_schema
    if t.json_schema_file:
        try:
            schema = load_json_schema(t.json_schema_file)
            check_json_schema(schema, f"task.json_schema_file ({t.json_schema_file})")
        except (SchemaError, ValueError) as e:
            raise SpecError(str(e)) from None
    return EnrichConfig(kind=t.kind, labels=tuple(t.labels or ()), stop=tuple(t.stop or ()), logprobs=t.logprobs,
                        json_schema=json.dumps(schema) if schema is not None else None)  # key order = column order


def _prompt_text(spec: JobSpec) -> str | None:
    t = spec.task
    if t.kind == "classify" and not t.prompt:
        return DEFAULT_CLASSIFY.format(labels=", ".join(t.labels or []))
    return t.prompt


def fingerprint_parts(spec: JobSpec, files: list[InputFile] | None) -> dict[str, Any]:
    """The job's identity: model, prompt, sampling, output shape, and the input snapshot
    (``files``), or for an incremental job (``files=None``) only the input's URI and unit size."""
    t = spec.task
    if files is None:
        inp: dict[str, Any] = {"incremental": True, "uri": spec.input.uri, "rows_per_unit": spec.input.rows_per_unit}
    else:
        snapshot = hashlib.sha256(json.dumps([(f.uri, f.size, f.mtime_ns) for f in files]).encode()).hexdigest()
        inp = {"files": len(files), "snapshot": snapshot, "rows_per_unit": spec.input.rows_per_unit}
    return {
        "model": _model_identity(spec.model.path) | {"dtype": spec.model.dtype},
        "prompt": t.model_dump(include={"kind", "prompt", "template", "system", "chat", "max_input_tokens",
                                        "truncation"}) | {"text_column": spec.input.text_column,
                                                          "id_column": spec.input.id_column}
        | ({"long_input": t.long_input} if t.long_input != "truncate" else {}),
        "sampling": t.model_dump(include={"max_new_tokens", "temperature", "top_p", "top_k", "seed"})
        | ({"n": t.n} if t.n != 1 else {}),
        "input": inp,
        "output": spec.output.model_dump(include={"format", "mode"}),
        **_enrich_parts(spec),
    }


def _enrich_parts(spec: JobSpec) -> dict[str, Any]:
    """The fingerprint of the enrichment options, only when a job uses them (older jobs keep theirs)."""
    t = spec.task
    defaults = {"min_new_tokens": 0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    used = {k: getattr(t, k) for k, v in defaults.items() if getattr(t, k) != v}
    e = enrich_config(spec)
    if e.active:
        used |= {"kind": e.kind, "labels": list(e.labels), "json_schema": e.json_schema, "stop": list(e.stop),
                 "logprobs": e.logprobs}
    if spec.input.messages_column:
        used["messages_column"] = spec.input.messages_column
    return {"enrich": used} if used else {}


def _extra_columns(spec: JobSpec) -> set[str]:
    """Output columns this job adds beyond the standard ones (an input column may not have their name)."""
    return ({"samples"} if spec.task.n > 1 else set()) | ({"chunks"} if spec.task.long_input == "map_reduce" else set())


def input_options(spec: JobSpec) -> InputOptions:
    """The plain input options of the spec (pipeline/formats.py)."""
    i = spec.input
    return InputOptions(uri=i.uri, format=i.format, rows_per_unit=i.rows_per_unit,
                        text_column=None if i.format == "openai_batch" else i.text_column,
                        version=i.version, snapshot_id=i.snapshot_id, catalog=tuple(sorted(i.catalog.items())))


_SECRET_WORDS = ("secret", "token", "password", "credential", "key")


def spec_record(spec: JobSpec) -> dict[str, Any]:
    """The spec as the manifest records it: catalog properties that look like secrets
    (``s3.secret-access-key``, ``token``, ``credential`` ...) are redacted."""
    doc = spec.model_dump(mode="json")
    for section in ("input", "output"):
        cat = doc.get(section, {}).get("catalog") or {}
        for k in cat:
            if any(w in k.lower() for w in _SECRET_WORDS):
                cat[k] = "<redacted>"
    return doc


def job_sink(spec: JobSpec) -> Sink:
    """The output sink of the spec (pipeline/sinks.py)."""
    o = spec.output
    return make_sink(SinkOptions(uri=o.uri, format=o.format, model_name=Path(spec.model.path).name or "hymba",
                                 id_column=spec.input.id_column, app_id=f"hymba-batch:{spec.name}",
                                 table=o.table, catalog=tuple(sorted(o.catalog.items()))))


def plan_job(spec: JobSpec, files: list[InputFile] | None = None, incremental: bool = False,
             source: dict[str, Any] | None = None) -> Plan:
    """List the input (or take ``files``), read footers or scan lines, check columns, cut
    units, fingerprint; the source snapshot (a Delta version) goes into the plan."""
    t = spec.task
    required = set(template_variables(t.template)) if t.kind == "template" and t.template else set()
    if spec.input.id_column:
        required.add(spec.input.id_column)
    opts = input_options(spec)
    if spec.input.messages_column:
        required.add(spec.input.messages_column)
        opts = replace(opts, text_column=None)
    reserved = set(RESERVED_COLUMNS) | set(enrich_config(spec).column_names()) | _extra_columns(spec)
    ip = plan_input(opts, required, reserved, files, source=source)
    parts = fingerprint_parts(spec, None if incremental else ip.files)
    if ip.format != "parquet":  # parquet jobs keep their earlier fingerprints
        parts["input"]["format"] = ip.format
        if ip.source and not incremental:
            parts["input"]["source"] = ip.source
    return Plan(ip.files, ip.units, fingerprint(parts), parts, ip.format, ip.source)


def actor_config(spec: JobSpec, device: str, actors_per_gpu: int, input_format: str = "parquet",
                 job_id: str = "") -> ActorConfig:
    """The plain config every actor of this job is built from."""
    from hymba_batch.workers.actor import ActorConfig

    t = spec.task
    prompt = PromptConfig(kind=t.kind, text_column=None if spec.input.messages_column else spec.input.text_column,
                          prompt=_prompt_text(spec), template=t.template, system=t.system, chat=t.chat,
                          max_input_tokens=t.max_input_tokens, truncation=t.truncation,
                          messages_column=spec.input.messages_column, long_input=t.long_input)
    if input_format == "openai_batch":  # the request's messages are the prompt
        prompt = PromptConfig(kind="messages", text_column=MESSAGES_COLUMN, chat=True,
                              max_input_tokens=t.max_input_tokens, truncation="error")
    sink = job_sink(spec)
    return ActorConfig(
        model_path=spec.model.path, dtype=spec.model.dtype, device=device,
        memory_fraction=spec.model.memory_fraction / actors_per_gpu,
        cache_budget_bytes=spec.model.cache_budget_mb << 20 if spec.model.cache_budget_mb else None,
        max_num_seqs=spec.model.max_num_seqs, max_batch_tokens=spec.model.max_batch_tokens,
        cpu_threads=max(1, int(spec.resources.cpus_per_actor)) if device == "cpu" else None,
        prompt=prompt,
        output=OutputConfig(uri=spec.output.uri, format=spec.output.format, mode=spec.output.mode,
                            id_column="custom_id" if input_format == "openai_batch" else spec.input.id_column,
                            staging_uri=sink.staging_uri),
        sampling=SamplingConfig(max_new_tokens=t.max_new_tokens, temperature=t.temperature, top_p=t.top_p,
                                top_k=t.top_k, seed=t.seed, min_new_tokens=t.min_new_tokens,
                                repetition_penalty=t.repetition_penalty, presence_penalty=t.presence_penalty,
                                frequency_penalty=t.frequency_penalty, n=t.n),
        enrich=enrich_config(spec),
        share_prefix=t.share_prefix,
        job_id=job_id,
    )


def _placement(spec: JobSpec, cluster_gpus: float) -> tuple[str, int, float, int]:
    """(device, num_actors, gpus per actor, actors per gpu) for this cluster."""
    r = spec.resources
    gpus = int(cluster_gpus) if r.num_gpus is None else min(r.num_gpus, int(cluster_gpus))
    if spec.model.device == "cuda" and gpus == 0:
        raise RuntimeError("model.device is 'cuda' but the Ray cluster has no GPUs")
    if spec.model.device == "cpu" or gpus == 0:
        return "cpu", r.num_actors or 1, 0.0, 1
    k = r.actors_per_gpu
    return "cuda", r.num_actors or gpus * k, 1.0 / k, k


_stop_signals = False


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the first one starts the orderly stop
    raise KeyboardInterrupt(f"signal {signum}")


def handle_stop_signals() -> None:
    """Treat SIGTERM (``ray job stop``, ``hymba-batch cancel``, Kubernetes) like Ctrl-C: stop
    dispatching, keep what is committed, mark the status ``cancelled`` (``ray.init`` replaces
    the handler with a plain exit, so it is installed again after connecting)."""
    global _stop_signals
    _stop_signals = True
    signal.signal(signal.SIGTERM, _on_sigterm)


def _ensure_ray(spec: JobSpec) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=spec.resources.ray_address, include_dashboard=False, log_to_driver=True)
        if _stop_signals:
            signal.signal(signal.SIGTERM, _on_sigterm)
        _watch_local_ray()


_watchers: list[Any] = []


def _watch_local_ray() -> None:
    """If ``ray.init`` started a local Ray here, start the watchdog that stops it when this
    process goes, however it goes (``raywatch.py``)."""
    import sys

    from ray._private import worker

    node = worker._global_node
    pids = [p.process.pid for procs in (getattr(node, "all_processes", None) or {}).values() for p in procs
            if getattr(p, "process", None) is not None]
    if not pids:
        return  # connected to a cluster someone else runs
    from .raywatch import start

    session = node.get_session_dir_path()
    watcher = start(pids, session)
    _watchers.append(watcher)  # held, so that no ResourceWarning says it still runs at exit
    print(f"hymba-batch: local Ray {session} (stopped with this process; watchdog pid {watcher.pid})",
          file=sys.stderr, flush=True)


class _Status:
    """Aggregates unit results into the status document and writes it (at most every 0.2 s;
    an incremental run's forced writes also go to ``_hymba/runs/<run_id>/status.json``), and
    keeps the run's bounded history (``_hymba/history.json``, a point every 10 s at most)."""

    def __init__(self, out: JobOutput, job_id: str, spec: JobSpec, plan: Plan, done: dict[str, UnitResult],
                 extra: dict[str, Any] | None = None, run_path: str | None = None):
        self.out, self.job_id, self.name, self.plan = out, job_id, spec.name, plan
        self.done = dict(done)
        self.failed: list[dict[str, Any]] = []
        self.started = time.time()
        self.resumed_rows = sum(r.rows for r in done.values())
        self.resumed_units = len(done)
        self.error: str | None = None
        self.last_write = 0.0
        self.extra, self.run_path = extra or {}, run_path
        self.pool: Any = None  # once started: its drained_at is the start of the run's tail
        self.history_path = out.loc.join(META_DIR, HISTORY_FILE)
        try:
            previous = read_json(out.loc, self.history_path)
        except (OSError, ValueError):
            previous = None  # an unreadable history is only lost history
        self.history = History(job_id, self.extra.get("run_id"), previous, started_at=self.started)
        self.lock = threading.RLock()  # the heartbeat thread writes too

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.done.values())

    @property
    def new_tokens(self) -> int:
        """Tokens generated by this run (not by an earlier one that was resumed)."""
        return sum(r.completion_tokens for r in self.done.values() if not r.reused)

    def document(self, state: str) -> dict[str, Any]:
        now = time.time()
        run_rows = self.rows - self.resumed_rows
        rate = run_rows / max(now - self.started, 1e-9)
        left = self.plan.total_rows - self.rows
        return {
            "job": self.name, "job_id": self.job_id, "state": state, "output_uri": self.out.uri,
            "total_rows": self.plan.total_rows, "total_units": len(self.plan.units),
            "committed_rows": self.rows, "committed_units": len(self.done),
            "failed_units": self.failed, "failed_rows": sum(f["rows"] for f in self.failed),
            "error_rows": sum(r.error_rows for r in self.done.values()),
            "prompt_tokens": sum(r.prompt_tokens for r in self.done.values()),
            "completion_tokens": sum(r.completion_tokens for r in self.done.values()),
            "rows_per_s": rate, "tokens_per_s": self.new_tokens / max(now - self.started, 1e-9),
            "eta_s": (left / rate) if rate > 0 else None,
            "started_at": self.started, "updated_at": now, "error": self.error,
        } | heartbeat_fields(now) | self.extra

    def write(self, state: str, force: bool = False) -> None:
        with self.lock:
            self._write(state, force)

    def _write(self, state: str, force: bool) -> None:
        if force or time.monotonic() - self.last_write >= 0.2:
            doc = self.document(state)
            self.out.write_status(doc)
            if force and self.run_path:
                write_json(self.out.loc, self.run_path, doc, self.out.tmp)
            self.last_write = time.monotonic()
            if force or self.history.run.due(doc["updated_at"]):
                self._history_point(state, doc["updated_at"], force)

    def _history_point(self, state: str, now: float, force: bool) -> None:
        self.history.run.drained_at = getattr(self.pool, "drained_at", None)
        self.history.run.add(now, totals(self.done.values()), state)
        hist = self.history.document()
        try:
            write_json(self.out.loc, self.history_path, hist, self.out.tmp)
            if force and self.run_path:
                write_json(self.out.loc, self.run_path.rsplit("/", 1)[0] + "/" + HISTORY_FILE, hist, self.out.tmp)
        except OSError:
            pass  # the history only feeds the report and status: losing a point never fails the job


CommitFn = Callable[[], dict[str, Any]]


LEASE_FILES = ("lease.json", "lease.lock")


def run_job(spec: JobSpec, restart: bool = False, reporter: Reporter | None = None,
            incremental: bool = False, run_id: str | None = None, wait: float | None = None,
            say: Callable[[str], None] | None = None) -> JobSummary:
    """Run (or resume) a job to the end; returns its summary. Raises on plan or output errors.

    Every run holds the output prefix's lease: LeaseHeld when another live run holds it, or
    with ``wait`` (seconds, ``math.inf`` for no limit) once it waited that long (``say`` hears
    whom it waits for). ``incremental`` (or ``spec.schedule.incremental``) runs only the input
    files that earlier runs into the output did not process; ``run_id`` names such a run
    (default: UTC time + random suffix).
    """
    t0 = time.time()
    sink = job_sink(spec)
    out = sink.job_output()
    sink.prepare()
    if not (incremental or spec.schedule.incremental):
        plan = plan_job(spec)
        job_id = f"{spec.name}-{plan.fingerprint[:12]}"
        out.check(plan.fingerprint, plan.parts, restart)  # refuse a prefix that is not ours before touching it
        lease = Lease(spec.output.uri, check_run_id(run_id or new_run_id()), spec.schedule.lease_ttl)
        lease.acquire(wait_s=wait, say=say)
        claimed = False
        try:
            out.prepare(plan.fingerprint, plan.parts, restart, keep=LEASE_FILES)
            claimed = True
            extra = {"run_id": run_id} if run_id else {}
            extra["lease_taken_over"] = (lease.took_over or {}).get("run_id")
            status = _Status(out, job_id, spec, plan, out.committed(plan.units), extra)

            def commit() -> dict[str, Any]:
                lease.check()
                out.reclaim(plan.fingerprint, plan.parts)
                return _committed_manifest(out, plan) or out.finalize(plan.units, {
                    "job": spec.name, "job_id": job_id, "fingerprint": plan.fingerprint,
                    "fingerprint_parts": plan.parts, "spec": spec_record(spec),
                    "input_format": plan.format, "input_source": plan.source,
                    "started_at": t0, "elapsed_s": time.time() - t0},
                    publish=lambda pairs: sink.publish(out, pairs))

            return _execute(spec, plan, out, status, t0, reporter, commit)
        finally:
            if claimed and not lease.lost:
                try:
                    out.reclaim(plan.fingerprint, plan.parts)  # a re-run resumes even after a deleted prefix
                except Exception:  # noqa: BLE001 - best effort on the way out; the run's own error is told
                    pass
            lease.release()
    run_id = check_run_id(run_id or new_run_id())
    lease = Lease(spec.output.uri, run_id, spec.schedule.lease_ttl).acquire(wait_s=wait, say=say)
    try:
        parts = fingerprint_parts(spec, None)
        out.prepare(fingerprint(parts), parts, restart, keep=LEASE_FILES)
        state = RunState(out)
        _, listed, source = list_input(input_options(spec))
        sel: Selection = state.select(listed)
        plan = plan_job(spec, sel.todo, incremental=True, source=source)
        orphans = state.remove_orphans({u.unit_id for u in plan.units})
        done = out.committed(plan.units, strays="ignore")
        extra = {"run_id": run_id, "incremental": True, "new_files": len(sel.new),
                 "changed_files": len(sel.changed), "unchanged_files": len(sel.unchanged),
                 "removed_orphan_parts": len(orphans),
                 "lease_taken_over": (lease.took_over or {}).get("run_id")}
        status = _Status(out, run_id, spec, plan, done, extra, out.loc.join("_hymba", "runs", run_id, "status.json"))
        state.begin(bool(plan.units))

        def commit() -> dict[str, Any]:
            lease.check()
            return state.commit(run_id, sel, plan.units, {
                "job": spec.name, "fingerprint": plan.fingerprint, "fingerprint_parts": plan.parts,
                "spec": spec_record(spec), "started_at": t0, "elapsed_s": time.time() - t0,
                "input_format": plan.format, "input_source": plan.source,
                "removed_orphan_parts": orphans, "lease_taken_over": lease.took_over},
                publish=lambda pairs: sink.publish(out, pairs))

        summary = _execute(spec, plan, out, status, t0, reporter, commit)
    finally:
        lease.release()
    summary.run_id = run_id
    summary.new_files, summary.changed_files, summary.unchanged_files = len(sel.new), len(sel.changed), len(sel.unchanged)
    return summary


def _committed_manifest(out: JobOutput, plan: Plan) -> dict[str, Any] | None:
    """The manifest an earlier run of this same job committed (then a re-run rewrites nothing)."""
    old = out.read_manifest()
    if old and old.get("fingerprint") == plan.fingerprint and \
            sorted(f["unit_id"] for f in old.get("files", [])) == sorted(u.unit_id for u in plan.units):
        return old
    return None


def _execute(spec: JobSpec, plan: Plan, out: JobOutput, status: _Status, t0: float,
             reporter: Reporter | None, commit: CommitFn) -> JobSummary:
    """Run the plan's uncommitted units on the actor pool, then ``commit``; the summary."""
    from hymba_batch.workers.pool import ActorPool, PoolConfig, UnitFailure

    done = status.done
    todo = [u for u in plan.units if u.unit_id not in done]
    rows_of = {u.unit_id: u.num_rows for u in plan.units}
    summary = JobSummary(status.job_id, "running", out.uri, total_rows=plan.total_rows, total_units=len(plan.units),
                         resumed_units=len(done))
    if reporter:
        reporter.start(plan.total_rows, status.rows)
    status.write("running", force=True)
    pool = None
    beat = Heartbeat(lambda: status.write("running", force=True)).__enter__()
    try:
        if todo:
            _ensure_ray(spec)
            import ray

            device, n, gpu_share, k = _placement(spec, ray.cluster_resources().get("GPU", 0))
            pool = ActorPool(actor_config(spec, device, k, plan.format, status.job_id), PoolConfig(
                num_actors=n, num_gpus_per_actor=gpu_share, num_cpus_per_actor=spec.resources.cpus_per_actor,
                max_in_flight=spec.resources.max_in_flight, max_attempts=spec.resources.max_attempts,
                job_id=status.job_id))
            summary.actors = pool.start()
            t_ready = time.time()
            # each actor's own part of the start: imports, checkpoint, load, engine, tokenizer
            status.extra["actor_start"] = [{k.removeprefix("start_"): float(v) for k, v in a.items()
                                            if k.startswith("start_")} for a in summary.actors]
            status.pool, status.history.run.ready_at = pool, t_ready

            def on_done(res: UnitResult) -> None:
                with status.lock:
                    status.done[res.unit_id] = res
                summary.run_units += 1
                status.write("running")
                if reporter:
                    reporter.update(status.rows, status.new_tokens)

            def on_failed(f: UnitFailure) -> None:
                with status.lock:
                    status.failed.append({"unit_id": f.unit_id, "attempts": f.attempts, "error": f.error,
                                          "rows": rows_of[f.unit_id]})
                status.write("running", force=True)

            pool.run(todo, on_done, on_failed)
            t_run = time.time()
            summary.retried_units, summary.actor_restarts = pool.retries, pool.restarts
            drained = pool.drained_at or t_run
            # where the time went: planning + Ray + actors loading their models; every actor busy;
            # the last units finishing while an actor sits idle, nothing left to hand it
            summary.time_split = {"start_s": t_ready - t0, "steady_s": drained - t_ready, "tail_s": t_run - drained}
        state = "failed" if status.failed else "succeeded"
        if state == "succeeded":
            t_commit = time.time()
            summary.truncated_rows = commit()["truncated_rows"]
            if summary.time_split:
                summary.time_split["commit_s"] = time.time() - t_commit
        beat.__exit__()  # no "running" heartbeat may land after the final state
        status.extra["time_split"] = summary.time_split
        status.write(state, force=True)
    except KeyboardInterrupt:
        state = "cancelled"
        beat.__exit__()
        status.write(state, force=True)
    except Exception as e:  # recorded in status.json for `hymba-batch status`, then raised as is
        status.error = f"{type(e).__name__}: {e}"
        beat.__exit__()
        status.write("failed", force=True)
        raise
    finally:
        beat.__exit__()
        if pool is not None:
            pool.shutdown()
        if reporter:
            reporter.stop()
    doc = status.document(state)
    summary.state = state
    summary.committed_rows, summary.error_rows = doc["committed_rows"], doc["error_rows"]
    summary.prompt_tokens, summary.completion_tokens = doc["prompt_tokens"], doc["completion_tokens"]
    summary.failed_units = status.failed
    summary.nodes = sorted({r.worker.get("node_id", "") for r in status.done.values() if not r.reused} - {""})
    summary.elapsed_s = time.time() - t0
    return summary

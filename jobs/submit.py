"""Ray job submission: ``hymba-batch submit | status | logs | cancel`` against a Ray job server.

``submit`` loads the spec here (``--set`` and ``${VAR}`` resolved, relative local paths made
absolute), ships it as ``job.yaml`` in the job's ``working_dir`` and ships this project's code
as a ``py_modules`` package (``hymba_batch``: model, pipeline, workers, jobs), so the cluster
runs the code of the submitting checkout; the cluster's Python provides the dependencies
(torch, pyarrow, ...; the image of ``infra/`` has them). The entrypoint is ``python -m
hymba_batch.jobs.cli run job.yaml --run-id <submission id>``, with no CPU or GPU reserved for
the driver (the inference actors ask for their own).

The submission id is ``hymba-<name>-<hash12>`` (the hash covers the resolved spec and the mode),
plus ``-<window>`` for incremental jobs (default: the current UTC window of
``schedule.window``) or when ``--window`` is given. Ray refuses a second job with the same id,
so the same job (or the same window of a scheduled job) is never submitted twice. The output
URI rides in the submission's metadata, which is how ``status`` finds ``_hymba/status.json``.

Ray's token authentication: Ray's client sends a token only when ``RAY_AUTH_MODE=token`` is set.
When the job server answers 401 (it asks for a token) and that is not set, the commands here
retry once with the local token, found where Ray keeps it (``RAY_AUTH_TOKEN``, else the file
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``, which ``ray start`` writes), sent as Ray's
client sends it (``Authorization: Bearer <token>``).
Knows nothing of models, units or the commit protocol beyond reading the status document.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .spec import JobSpec, parse_duration

SUBPACKAGES = ("model", "pipeline", "workers", "jobs")
WINDOW = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(RuntimeError):
    """A submission, or a request about a submitted job, was refused; the message says why."""


@dataclass
class Submission:
    submission_id: str
    entrypoint: str
    spec: dict[str, Any]
    metadata: dict[str, str]
    incremental: bool


def _absolute(uri: str, only_if_exists: bool = False) -> str:
    """A local path made absolute (the job runs in another folder); URIs are kept as they are."""
    if "://" in uri:
        return uri
    path = os.path.expanduser(uri)
    if only_if_exists and not os.path.exists(path):
        return uri  # e.g. a Hugging Face repo id, not a local folder
    return os.path.abspath(path)


def window_id(spec: JobSpec, now: float | None = None) -> str:
    """The current UTC schedule window of ``spec`` (``schedule.window``), e.g. ``20260101t1300``."""
    length = parse_duration(spec.schedule.window, "schedule.window")
    start = int((time.time() if now is None else now) // length * length)
    return time.strftime("%Y%m%dt%H%M", time.gmtime(start))


def plan_submission(spec: JobSpec, incremental: bool = False, window: str | None = None,
                    now: float | None = None, debug: bool = False) -> Submission:
    """The submission of ``spec``: its id, entrypoint, shipped spec and metadata (``debug``: the
    job runs with ``--debug``: tracebacks, Ray's start-up messages, where its code came from)."""
    incremental = incremental or spec.schedule.incremental
    data = spec.model_dump(mode="json")
    data["model"]["path"] = _absolute(data["model"]["path"], only_if_exists=True)
    data["input"]["uri"] = _absolute(data["input"]["uri"])
    data["output"]["uri"] = _absolute(data["output"]["uri"])
    digest = hashlib.sha256(json.dumps({"spec": data, "incremental": incremental}, sort_keys=True).encode())
    sid = f"hymba-{spec.name}-{digest.hexdigest()[:12]}"
    if window is not None and not WINDOW.match(window):
        raise SubmitError(f"--window {window!r}: use letters, digits, '.', '_' and '-' (at most 64)")
    if window is None and incremental:
        window = window_id(spec, now)
    if window:
        sid += f"-{window}"
    entry = f"python -m hymba_batch.jobs.cli run job.yaml --no-progress --run-id {sid}"
    if incremental:
        entry += " --incremental"
    if debug:
        entry += " --debug"
    meta = {"hymba_job": spec.name, "hymba_output_uri": data["output"]["uri"], "hymba_format": spec.output.format,
            "hymba_incremental": "1" if incremental else "0", "hymba_window": window or ""}
    return Submission(sid, entry, data, meta, incremental)


def stage_code(dest: Path) -> Path:
    """Copy the installed ``hymba_batch`` subpackages into ``dest/hymba_batch``; returns it."""
    pkg = dest / "hymba_batch"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results", ".*")
    for name in SUBPACKAGES:
        found = importlib.util.find_spec(f"hymba_batch.{name}")
        if found is None or not found.submodule_search_locations:
            raise SubmitError(f"hymba_batch.{name} is not importable here; install hymba-batch first")
        shutil.copytree(list(found.submodule_search_locations)[0], pkg / name, ignore=ignore)
    return pkg


def job_server_address(address: str | None) -> str:
    """``address``, else $RAY_ADDRESS; SubmitError when neither is set."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no Ray job server: pass --address http://HEAD:8265 (or set RAY_ADDRESS)")
    return address


def local_ray_token() -> tuple[str, str] | None:
    """(token, where it came from) as Ray's own client finds it: ``RAY_AUTH_TOKEN``, the file
    ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``; None when there is none."""
    env = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if env:
        return env, "RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        token = path.read_text().strip()
    except OSError:
        return None
    return (token, str(path)) if token else None


def client(address: str | None) -> Any:
    """A JobSubmissionClient for ``address`` (or $RAY_ADDRESS), with the local Ray token when the
    server asks for one; SubmitError when unreachable or refused."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = job_server_address(address)
    how = "set RAY_AUTH_TOKEN to the cluster's token (`ray get-auth-token` on its head) or keep it in ~/.ray/auth_token"
    try:
        try:
            return JobSubmissionClient(address)
        except AuthenticationError:
            token = local_ray_token()
            if token is None:
                raise SubmitError(f"--address {address}: the job server asks for Ray's auth token and none was found "
                                  f"here: {how}") from None
            try:
                return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token[0]}"})
            except AuthenticationError:
                raise SubmitError(f"--address {address}: the job server rejected the Ray auth token from {token[1]}: "
                                  f"{how}") from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SubmitError(f"--address {address}: cannot reach a Ray job server ({e})") from e


def submit(address: str | None, sub: Submission, say: Callable[[str], None] = print) -> str:
    """Submit ``sub``; returns the submission id. SubmitError when Ray refuses it."""
    c = client(address)
    with tempfile.TemporaryDirectory(prefix="hymba-submit-") as tmp:
        work = Path(tmp) / "job"
        work.mkdir()
        (work / "job.yaml").write_text(yaml.safe_dump(sub.spec, sort_keys=False))
        code = stage_code(Path(tmp) / "code")
        runtime_env = {"working_dir": str(work), "py_modules": [str(code)],
                       "env_vars": {"PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": "30"}}
        deadline = time.monotonic() + 60
        while True:
            try:
                sid = c.submit_job(entrypoint=sub.entrypoint, submission_id=sub.submission_id,
                                   runtime_env=runtime_env, metadata=sub.metadata, entrypoint_num_cpus=0,
                                   entrypoint_num_gpus=0)
                break
            except RuntimeError as e:
                if "No available agent" in str(e) and time.monotonic() < deadline:
                    time.sleep(2)  # a head that has just started: its job agent comes up shortly
                    continue
                _refused(c, sub, e)
    say(sid)
    return sid


def _refused(c: Any, sub: Submission, e: RuntimeError) -> None:
    """Raise SubmitError for a refused submission, naming the duplicate when it is one."""
    if "already exists" not in str(e):
        raise SubmitError(f"Ray refused the submission {sub.submission_id}: {e}") from e
    try:
        state = str(c.get_job_status(sub.submission_id).value)
    except RuntimeError:
        state = "unknown"
    what = f"window {sub.metadata['hymba_window']}" if sub.metadata["hymba_window"] else "this job"
    raise SubmitError(
        f"{sub.submission_id} was already submitted ({what}; Ray state {state}); Ray refuses the same "
        f"submission twice. See `hymba-batch status {sub.submission_id} --address ...`; to run it again "
        f"anyway, pass another --window") from None


def job_status(address: str | None, job_id: str) -> dict[str, Any]:
    """Ray's view of the job plus the job's ``_hymba`` status document (when readable here)."""
    c = client(address)
    try:
        info = c.get_job_info(job_id)
    except RuntimeError as e:
        raise SubmitError(f"{job_id}: no such job at the Ray job server ({e})") from e
    meta = info.metadata or {}
    doc: dict[str, Any] = {"submission_id": job_id, "ray_status": str(info.status.value),
                           "ray_message": info.message, "start_time": info.start_time, "end_time": info.end_time,
                           "entrypoint": info.entrypoint, "output_uri": meta.get("hymba_output_uri")}
    uri = meta.get("hymba_output_uri")
    if uri:
        from hymba_batch.pipeline.commit import JobOutput
        from hymba_batch.pipeline.fs import read_json

        try:
            out = JobOutput(uri, meta.get("hymba_format", "parquet"))
            status = out.read_status()
            if status is not None and status.get("run_id") != job_id:
                status = read_json(out.loc, out.loc.join("_hymba", "runs", job_id, "status.json")) or \
                    {"note": f"the output's status.json belongs to run {status.get('run_id')}, not this job"}
            doc["job"] = status
        except (OSError, ValueError) as e:
            doc["job"] = {"note": f"cannot read {uri}/_hymba/status.json from here ({e})"}
    return doc


def job_logs(address: str | None, job_id: str, follow: bool, write: Callable[[str], None]) -> None:
    """Print the job's driver log; with ``follow``, keep printing until the job ends."""
    c = client(address)
    try:
        if not follow:
            write(c.get_job_logs(job_id))
            return
        import asyncio

        async def tail() -> None:
            async for chunk in c.tail_job_logs(job_id):
                write(chunk)

        asyncio.run(tail())
    except RuntimeError as e:
        raise SubmitError(f"{job_id}: cannot read its logs ({e})") from e


def cancel(address: str | None, job_id: str, wait_s: float = 60.0,
           say: Callable[[str], None] = print) -> dict[str, Any]:
    """Stop the job (SIGTERM to its driver: committed units are kept, status ``cancelled``) and
    wait up to ``wait_s`` seconds for Ray to report it stopped; returns ``job_status``."""
    c = client(address)
    try:
        stopping = c.stop_job(job_id)
    except RuntimeError as e:
        raise SubmitError(f"{job_id}: cannot stop it ({e})") from e
    if not stopping:
        say(f"{job_id} had already ended ({c.get_job_status(job_id).value}); nothing to stop")
    deadline = time.monotonic() + wait_s
    while str(c.get_job_status(job_id).value) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)  # polling Ray's job state
    return job_status(address, job_id)

"""Builders for the format tests (not fixtures): input files in each format, and a job run
in-process through the real planner, unit runner and sink with a plain deterministic generate
function (no model, no Ray), plus a hook to crash it between staging and publishing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from hymba_batch.jobs.driver import actor_config, job_sink, plan_job
from hymba_batch.jobs.spec import JobSpec, parse_spec
from hymba_batch.pipeline.tokenizer import load_codec
from hymba_batch.pipeline.unit import Generation, UnitRunner


class Crash(RuntimeError):
    """An injected crash."""


def echo_generate(prompts, seeds, options=None):
    """The prompt's last three tokens then EOS (a request's ``max_new_tokens`` option cuts it)."""
    out = []
    for i, p in enumerate(prompts):
        ids = list(p[-3:]) + [2]
        limit = options[i].max_new_tokens if options else None
        reason = "stop"
        if limit is not None and len(ids) > limit:
            ids, reason = ids[:limit], "length"
        out.append(Generation(ids, reason, len(p)))
    return out


def spec_for(tokenizer_dir: Path, input_uri: str, output_uri: str, **sections: Any) -> JobSpec:
    spec = {
        "name": "fmt-job",
        "model": {"path": str(tokenizer_dir)},
        "input": {"uri": input_uri, "text_column": "text", "rows_per_unit": 3},
        "task": {"kind": "generate", "chat": False, "max_new_tokens": 8},
        "output": {"uri": output_uri, "format": "parquet", "mode": "enrich"},
    }
    for k, v in sections.items():
        spec[k] = {**spec.get(k, {}), **v}
    return parse_spec(spec)


def run_local(spec: JobSpec, tokenizer_dir: Path, crash: str | None = None,
              generate: Callable[..., list[Generation]] = echo_generate) -> dict[str, Any]:
    """Plan, stage every unit, publish and write the manifest, as ``run_job`` does without Ray.
    ``crash='before_publish'`` stops after staging; ``'after_publish'`` after the sink's commit."""
    sink = job_sink(spec)
    out = sink.job_output()
    sink.prepare()
    plan = plan_job(spec)
    out.prepare(plan.fingerprint, plan.parts, restart=False)
    cfg = actor_config(spec, "cpu", 1, plan.format)
    runner = UnitRunner(cfg.prompt, cfg.output, cfg.sampling, load_codec(tokenizer_dir), 4096, generate)
    results = [runner.run(u) for u in plan.units]
    if crash == "before_publish":
        raise Crash("between staging and publish")

    def publish(pairs):
        done = sink.publish(out, pairs)
        if crash == "after_publish":
            raise Crash("between publish and manifest")
        return done

    old = out.read_manifest()
    if old and old.get("fingerprint") == plan.fingerprint:
        return old
    manifest = out.finalize(plan.units, {"fingerprint": plan.fingerprint, "input_source": plan.source,
                                         "input_format": plan.format}, publish=publish)
    manifest["_reused_units"] = sum(r.reused for r in results)
    return manifest


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


class S3ServerProcess:
    """moto's S3 server in a child process on loopback, for libraries that call S3 from native
    code without releasing Python's GIL (delta-rs does in a few calls): an in-process server
    thread would then wait for the very call that waits for it. Environment as the
    ``s3_endpoint`` fixture sets it; restored on close."""

    def __init__(self) -> None:
        import os
        import socket
        import subprocess
        import sys

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        keys = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")
        self.saved = {k: os.environ.get(k) for k in keys}
        os.environ.update({"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"})
        self._wait_ready()

    def _wait_ready(self) -> None:
        import socket
        import time

        deadline = time.monotonic() + 30
        host, port = self.endpoint[len("http://"):].split(":")
        while True:  # readiness: the port accepts a connection (the child binds it once it serves)
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}")
            try:
                socket.create_connection((host, int(port)), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start in 30 s") from None
                time.sleep(0.05)

    def bucket(self) -> str:
        import uuid

        import boto3

        name = f"t-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return name

    def close(self) -> None:
        import os

        self.proc.terminate()
        self.proc.wait(timeout=30)
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

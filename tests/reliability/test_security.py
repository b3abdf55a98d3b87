"""Security: credentials come only from the environment / standard AWS chain and never reach an
output, status, manifest, error column, stdout/stderr or Ray log; templates render in a sandbox;
YAML is loaded safely; no ``trust_remote_code`` anywhere; an output prefix holding someone
else's data is refused; Ray's dashboard / job server bind to loopback or require a token."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from invariants import check_output, input_rows, job
from hymba_batch.jobs.cli import main
from hymba_batch.jobs.spec import SpecError, load_spec, parse_spec
from hymba_batch.pipeline.prompts import PromptBuilder, PromptConfig
from hymba_batch.pipeline.tokenizer import load_codec

REPO = Path(__file__).resolve().parents[2]
SECRET, AKID, TOKEN = "SECRETsentinel123", "AKIASENTINEL7Q2X9ZK4", "TOKENsentinel456"


def _grep_tree(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                data = p.read_bytes()
            except OSError:
                continue
            hits += [f"{p}: {n.decode()}" for n in needles if n in data]
    return hits


def test_credentials_never_leak(ray_cluster, tiny_checkpoint, s3_bucket, fault_proxy, tmp_path) -> None:
    """A job run by the CLI with distinctive fake credentials in its environment: the driver
    signs its S3 requests with them (the proxy sees the key id), yet no output object, status,
    manifest, error column, stdout/stderr or Ray session log of the run contains any of them."""
    import ray

    s3 = boto3.client("s3")
    local = tmp_path / "in"
    local.mkdir()
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "text": ["a fine row", None, "", "another row"]}),
                   local / "a.parquet", row_group_size=2)
    s3.upload_file(str(local / "a.parquet"), s3_bucket, "in/a.parquet")
    out = f"s3://{s3_bucket}/out"
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps(job(tiny_checkpoint, f"s3://{s3_bucket}/in/", out,
                                   resources={"ray_address": ray_cluster.address})))
    env = dict(os.environ, AWS_ACCESS_KEY_ID=AKID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_SESSION_TOKEN=TOKEN,
               AWS_ENDPOINT_URL=fault_proxy.endpoint)
    runs = [subprocess.run([sys.executable, "-m", "hymba_batch.jobs.cli", *args], capture_output=True, env=env,
                           timeout=240, cwd=tmp_path)
            for args in (["run", str(spec), "--no-progress"], ["status", out], ["run", str(spec), "--no-progress"])]
    assert runs[0].returncode == 0, runs[0].stderr.decode()[-3000:]
    assert AKID in fault_proxy.access_key_ids  # the environment's credentials really were used
    got = check_output(out, input_rows(f"s3://{s3_bucket}/in/"))
    assert got["manifest"]["error_rows"] == 2
    needles = [SECRET.encode(), AKID.encode(), TOKEN.encode()]
    leaks = [f"{name}: {n.decode()}" for r in runs for name, blob in (("stdout", r.stdout), ("stderr", r.stderr))
             for n in needles if n in blob]
    objects = s3.list_objects_v2(Bucket=s3_bucket, Prefix="out/")["Contents"]
    assert any(o["Key"].endswith("_hymba/status.json") for o in objects)
    for o in objects:
        body = s3.get_object(Bucket=s3_bucket, Key=o["Key"])["Body"].read()
        leaks += [f"s3 {o['Key']}: {n.decode()}" for n in needles if n in body]
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    assert (session / "logs").is_dir()
    leaks += _grep_tree(session / "logs", needles)
    assert not leaks, leaks


@pytest.fixture(scope="module")
def codec(tokenizer_dir):
    return load_codec(tokenizer_dir)


PAYLOADS = [
    "{{ ''.__class__.__mro__ }}",
    "{{ text.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch MARK').read() }}",
    "{{ lipsum.__globals__['os'].system('touch MARK') }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch MARK') }}",
    "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ text.format.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{% set x = text.__class__ %}{{ x }}",
    "{{ range(10**9)|list }}",
    "{{ 1 / 0 }}",
    "{{ text + 1 }}",
]


@pytest.mark.parametrize("template", PAYLOADS)
def test_templates_render_in_a_sandbox(codec, tmp_path, monkeypatch, template) -> None:
    monkeypatch.chdir(tmp_path)
    tpl = template.replace("MARK", str(tmp_path / "pwned"))
    spec = parse_spec({**job("m", "in/", "out/"), "task": {"kind": "template", "template": tpl, "chat": False}})
    assert spec.task.template == tpl  # valid syntax: it must fail when rendered, per row
    b = PromptBuilder(PromptConfig(kind="template", text_column="text", template=tpl, chat=False), codec, 1000)
    p = b.build_batch([{"text": "hello"}])[0]
    assert p.token_ids is None and p.error, p
    assert not (tmp_path / "pwned").exists(), "template code ran outside the sandbox"
    ok = PromptBuilder(PromptConfig(kind="template", text_column="text", template="Say: {{ text }}", chat=False),
                       codec, 1000).build_batch([{"text": "hello"}])[0]
    assert codec.decode(ok.token_ids) == "Say: hello"


@pytest.mark.parametrize("tag", ["!!python/object:os.system {}", "!!python/object/new:subprocess.Popen [[touch, MARK]]",
                                 "!!python/object/apply:os.system ['touch MARK']", "!!python/name:os.system"])
def test_yaml_python_tags_are_rejected(tmp_path, capsys, tag) -> None:
    mark = tmp_path / "pwned"
    p = tmp_path / "evil.yaml"
    p.write_text(f"model: {tag.replace('MARK', str(mark))}\ninput: {{uri: in/}}\noutput: {{uri: out/}}\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(p)
    assert main(["validate", str(p)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert not mark.exists()


def _code_names(path: Path) -> list[str]:
    with path.open("rb") as f:
        return [t.string for t in tokenize.tokenize(f.readline) if t.type == tokenize.NAME]


def test_no_trust_remote_code_anywhere() -> None:
    """No source file passes ``trust_remote_code`` (Python names, not docs), and no config or
    script turns it on."""
    py = [p for d in ("model", "pipeline", "workers", "jobs", "infra") for p in (REPO / d).rglob("*.py")]
    assert len(py) > 20
    assert [str(p) for p in py if "trust_remote_code" in _code_names(p)] == []
    other = [p for d in ("jobs", "infra") for p in (REPO / d).rglob("*") if p.is_file() and p.suffix != ".py"]
    other += [REPO / "ray_cluster.yaml", REPO / "pyproject.toml", REPO / "Makefile"]
    rx = re.compile(r"trust[_-]remote[_-]code", re.I)
    assert [str(p) for p in other if rx.search(p.read_text(errors="replace"))] == []
    # the detector itself works
    sample = io.BytesIO(b"tok = AutoTokenizer.from_pretrained(p, trust_remote_code=True)\n")
    assert "trust_remote_code" in [t.string for t in tokenize.tokenize(sample.readline)]


@pytest.mark.parametrize("foreign", ["spark", "plain-part", "other-hymba-job"])
def test_output_prefix_with_someone_elses_data_is_refused(tiny_checkpoint, tmp_path, capsys, foreign) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    pq.write_table(pa.table({"id": [1], "text": ["x"]}), src / "a.parquet")
    if foreign == "spark":
        (out / "_SUCCESS").write_bytes(b"")
        pq.write_table(pa.table({"v": [1]}), out / "part-00000-5c3b.snappy.parquet")
    elif foreign == "plain-part":
        pq.write_table(pa.table({"v": [1]}), out / "part-0.parquet")
    else:
        (out / "_hymba").mkdir()
        (out / "_hymba" / "job.json").write_text(json.dumps({"fingerprint": "0" * 64, "parts": {"prompt": "x"}}))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps(job(tiny_checkpoint, str(src), str(out))))
    assert main(["run", str(spec), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "output.uri" in err and ("not this job's" in err or "another run's output" in err), err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched


def test_dashboard_and_job_server_bind_to_loopback_or_require_a_token() -> None:
    """Every place we start Ray or describe its dashboard: the driver and the demo start no
    dashboard; ray_cluster.yaml binds it to 127.0.0.1; the KubeRay manifests that expose 8265
    turn on token auth; the docs say so. (Field-level checks: tests/infra.)"""
    for f in ("jobs/driver.py", "jobs/demo.py"):
        text = (REPO / f).read_text()
        assert "include_dashboard=False" in text and "include_dashboard=True" not in text, f
    files = [p for p in list((REPO / "infra").rglob("*")) + [REPO / "ray_cluster.yaml"] + list((REPO / "jobs").rglob("*.py"))
             if p.is_file()]
    for p in files:
        text = p.read_text(errors="replace")
        for host in re.findall(r"dashboard[-_]host[=:\s\"']+([0-9.]+|[A-Za-z$_{}]+)", text):
            assert host == "127.0.0.1", f"{p}: dashboard bound to {host}"
        if re.search(r"containerPort:\s*8265", text):
            assert re.search(r"authOptions:\s*\n\s*mode:\s*token", text), f"{p}: job server exposed without token auth"
    doc = (REPO / "infra" / "README.md").read_text()
    assert "loopback" in doc and "token" in doc

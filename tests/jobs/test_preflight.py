"""A new user's usual mistakes, each caught by the pre-flight of ``validate`` / ``run`` / ``submit``
before any planning or Ray: exit code 2, within 5 s, one or two lines that say what to do, and
nothing written. S3 cases run against the loopback S3 API server (moto; access denied through a
moto server of its own that enforces IAM policies), unreachable cases against a closed local port
or an unresolvable host. Also: ``--version``, help on every option, ``--debug`` tracebacks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from jobhelpers import job_dict, write_articles
from hymba_batch.jobs.cli import _parser, main
from hymba_batch.pipeline.preflight import PreflightError, check_output

LIMIT_S = 5.0
VENV_BIN = Path(sys.executable).parent


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.fixture()
def spec_path(tiny_checkpoint, tmp_path) -> Path:
    src = tmp_path / "in"
    write_articles(src, files=1, rows=2)
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(job_dict(tiny_checkpoint, str(src), str(tmp_path / "out"))))
    return p


def _fails(capsys, args: list[str], *expected: str) -> str:
    """Run the CLI: exit 2 within LIMIT_S, stderr naming every ``expected`` piece, no traceback."""
    capsys.readouterr()
    t0 = time.monotonic()
    rc = main(args)
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 2, err
    assert took < LIMIT_S, f"{took:.1f} s: {err}"
    flat = " ".join(err.split())
    for piece in expected:
        assert piece in flat, f"{piece!r} not in: {err}"
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    return flat


# ---- the model -----------------------------------------------------------------------------------

def test_model_path_that_does_not_exist(spec_path, tmp_path, capsys) -> None:
    for cmd in ("validate", "run"):
        _fails(capsys, [cmd, str(spec_path), "--set", f"model.path={tmp_path}/no-such-model"],
               f"model.path {tmp_path}/no-such-model: no such checkpoint folder")
    assert not (tmp_path / "out").exists()


def test_model_folder_that_is_not_a_hymba_checkpoint(spec_path, tiny_checkpoint, tmp_path, capsys) -> None:
    _fails(capsys, ["validate", str(spec_path), "--set", f"model.path={tmp_path / 'in'}"],
           "no config.json here", "not a Hugging Face checkpoint folder")
    llama = tmp_path / "llama"
    llama.mkdir()
    cfg = json.loads((tiny_checkpoint / "config.json").read_text()) | {"model_type": "llama"}
    (llama / "config.json").write_text(json.dumps(cfg))
    _fails(capsys, ["run", str(spec_path), "--set", f"model.path={llama}"],
           "model_type 'llama', not 'hymba'", "not a Hymba checkpoint")
    cfg["model_type"] = "hymba"
    (llama / "config.json").write_text(json.dumps(cfg))
    _fails(capsys, ["validate", str(spec_path), "--set", f"model.path={llama}"], "no model.safetensors")
    assert not (tmp_path / "out").exists()


def test_hub_unreachable_and_offline(spec_path, monkeypatch, capsys) -> None:
    repo = f"hymba-test/not-cached-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    _fails(capsys, ["validate", str(spec_path), "--set", f"model.path={repo}"],
           f"model.path {repo}: not in the local Hugging Face cache and the hub", "is unreachable",
           "set model.path to a checkpoint folder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fails(capsys, ["run", str(spec_path), "--set", f"model.path={repo}"], "HF_HUB_OFFLINE is set",
           f"huggingface-cli download {repo}")


def test_s3_model_prefix_without_a_checkpoint(spec_path, s3_bucket, capsys) -> None:
    _fails(capsys, ["validate", str(spec_path), "--set", f"model.path=s3://{s3_bucket}/models/none/"],
           f"model.path s3://{s3_bucket}/models/none/: no config.json under this prefix")


# ---- S3 input ------------------------------------------------------------------------------------

def test_s3_endpoint_unreachable_closed_port(spec_path, s3_endpoint, monkeypatch, capsys) -> None:
    port = _closed_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    _fails(capsys, ["validate", str(spec_path), "--set", "input.uri=s3://my-bucket/articles/"],
           "input.uri s3://my-bucket/articles/: cannot reach the S3 endpoint", f"127.0.0.1:{port} (AWS_ENDPOINT_URL)")


def test_s3_endpoint_host_that_does_not_resolve(spec_path, s3_endpoint, monkeypatch, capsys) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.hymba-preflight.invalid:9000")
    _fails(capsys, ["run", str(spec_path), "--set", "input.uri=s3://my-bucket/articles/"],
           "s3.hymba-preflight.invalid:9000 (AWS_ENDPOINT_URL)")


def test_s3_without_an_endpoint_names_aws_endpoint_url(spec_path, s3_endpoint, monkeypatch, capsys) -> None:
    """No AWS_ENDPOINT_URL: the request goes to AWS (offline here: not reachable; online: AWS
    refuses the test's keys or knows no such bucket); every answer names AWS_ENDPOINT_URL."""
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    _fails(capsys, ["validate", str(spec_path), "--set", f"input.uri=s3://hymba-no-{uuid.uuid4().hex[:12]}/in/"],
           "AWS_ENDPOINT_URL")


def test_s3_without_credentials(spec_path, s3_bucket, tmp_path, monkeypatch, capsys) -> None:
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # this test machine is no EC2 instance
    _fails(capsys, ["validate", str(spec_path), "--set", f"input.uri=s3://{s3_bucket}/in/"],
           "no AWS credentials found", "AWS_ACCESS_KEY_ID", "credential chain")


def test_s3_wrong_region(spec_path, s3_endpoint, monkeypatch, capsys) -> None:
    import boto3

    bucket = f"eu-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", region_name="eu-west-1").create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    _fails(capsys, ["validate", str(spec_path), "--set", f"input.uri=s3://{bucket}/in/"],
           f"bucket '{bucket}' is in eu-west-1, not AWS_REGION=us-east-1: set AWS_REGION=eu-west-1")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    capsys.readouterr()
    assert main(["validate", str(spec_path), "--set", f"input.uri=s3://{bucket}/in/"]) == 0


def test_s3_bucket_that_does_not_exist(spec_path, s3_endpoint, capsys) -> None:
    _fails(capsys, ["validate", str(spec_path), "--set", "input.uri=s3://my-bucket/articles/"],
           "input.uri s3://my-bucket/articles/: bucket 'my-bucket' does not exist at the S3 endpoint",
           "AWS_ENDPOINT_URL")
    _fails(capsys, ["run", str(spec_path), "--set", "output.uri=s3://my-bucket/summaries/"],
           "output.uri s3://my-bucket/summaries/: bucket 'my-bucket' does not exist")


def test_status_of_an_s3_output_checks_first(s3_endpoint, monkeypatch, capsys) -> None:
    _fails(capsys, ["status", "s3://my-bucket/summaries/"], "output s3://my-bucket/summaries/: bucket 'my-bucket' "
                                                             "does not exist")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    _fails(capsys, ["status", "s3://my-bucket/summaries/"], "cannot reach the S3 endpoint")


def test_every_without_an_output_set_is_one_clear_error(tiny_checkpoint, s3_endpoint, tmp_path, monkeypatch,
                                                        capsys) -> None:
    """The example spec's default output (s3://my-bucket/summaries/) with --every: exit 2 at
    once, no traceback, no loop."""
    repo = Path(__file__).resolve().parents[2]
    write_articles(tmp_path / "in", files=1, rows=2)
    monkeypatch.setenv("HYMBA_MODEL", str(tiny_checkpoint))
    monkeypatch.setenv("INPUT_URI", str(tmp_path / "in"))
    monkeypatch.delenv("OUTPUT_URI", raising=False)
    _fails(capsys, ["run", str(repo / "jobs/examples/summarize.yaml"), "--incremental", "--every", "1h"],
           "output.uri s3://my-bucket/summaries/: bucket 'my-bucket' does not exist")


# ---- access denied: a moto server of its own that enforces IAM policies --------------------------

@pytest.fixture(scope="module")
def iam_s3(tmp_path_factory):
    """A loopback S3 API that checks IAM policies after its first 4 requests (which make the
    bucket and a user allowed to read but not write); yields (endpoint, bucket, key id, secret)."""
    import boto3

    port = _closed_port()
    log = open(tmp_path_factory.mktemp("moto-iam") / "server.log", "wb")
    proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="4"))
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:  # wait for the server to listen: a TCP connect, which moto does not count
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.1)  # polling for the port, not synchronization
        kw = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "admin",
              "aws_secret_access_key": "admin"}
        bucket = "read-only-bucket"
        boto3.client("s3", **kw).create_bucket(Bucket=bucket)
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="reader")
        # moto names HEAD bucket s3:HeadBucket and, since 5.2.6, a V2 listing s3:ListObjectsV2
        # (AWS checks s3:ListBucket for both)
        iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Resource": "*", "Action": [
                "s3:ListBucket", "s3:GetObject", "s3:HeadBucket", "s3:ListObjectsV2"]}]}))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        yield endpoint, bucket, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_s3_access_denied(spec_path, iam_s3, s3_endpoint, monkeypatch, capsys) -> None:
    endpoint, bucket, key_id, secret = iam_s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    capsys.readouterr()
    assert main(["validate", str(spec_path), "--set", f"input.uri=s3://{bucket}/in/"]) == 0  # reads are allowed
    _fails(capsys, ["run", str(spec_path), "--set", f"output.uri=s3://{bucket}/out/"],
           f"output.uri s3://{bucket}/out/: access denied (writing)", "s3:PutObject", "credential chain")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    _fails(capsys, ["validate", str(spec_path), "--set", f"input.uri=s3://{bucket}/in/"],
           "rejected the credentials")
    import boto3
    assert "Contents" not in boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key_id,
                                          aws_secret_access_key=secret).list_objects_v2(Bucket=bucket)


# ---- local output (issue 12) ---------------------------------------------------------------------

def test_output_that_is_a_file_or_under_a_file(spec_path, tmp_path, capsys) -> None:
    f = tmp_path / "results.parquet"
    f.write_bytes(b"x")
    _fails(capsys, ["run", str(spec_path), "--set", f"output.uri={f}"], f"output.uri {f}: is a file, not a folder")
    _fails(capsys, ["validate", str(spec_path), "--set", f"output.uri={f}/out/"],
           f"output.uri {f}/out/: {f} is a file, so no folder can be made under it")
    assert f.read_bytes() == b"x" and sorted(p.name for p in tmp_path.iterdir()) == ["in", "job.yaml",
                                                                                       "results.parquet"]


@pytest.fixture()
def unwritable_dir(tmp_path) -> Path:
    """A folder this process cannot write to, for real: mode 0555 for a normal user; for root
    (whom mode bits do not stop) sysfs, where no one can create a file."""
    if os.geteuid() == 0:
        yield Path("/sys")
        return
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o555)
    yield d
    d.chmod(0o755)


def test_output_folder_that_cannot_be_written(spec_path, unwritable_dir, capsys) -> None:
    before = sorted(os.listdir(unwritable_dir))
    _fails(capsys, ["run", str(spec_path), "--set", f"output.uri={unwritable_dir}/out/"],
           f"output.uri {unwritable_dir}/out/: cannot write to {unwritable_dir} (where it would be created)")
    _fails(capsys, ["validate", str(spec_path), "--set", f"output.uri={unwritable_dir}"],
           f"output.uri {unwritable_dir}: cannot write to the folder")
    assert sorted(os.listdir(unwritable_dir)) == before  # nothing written


def test_output_checks_pass_for_a_good_output_and_leave_nothing(tmp_path, s3_bucket) -> None:
    check_output(str(tmp_path / "new" / "out"))
    assert list(tmp_path.iterdir()) == []  # the probe is an unnamed temporary file
    check_output(f"s3://{s3_bucket}/out/")
    import boto3
    assert "Contents" not in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)  # the probe object is gone
    with pytest.raises(PreflightError, match="is a file"):
        (tmp_path / "f").write_text("")
        check_output(str(tmp_path / "f"))


# ---- the command line itself ---------------------------------------------------------------------

def test_submit_checks_before_contacting_the_cluster(spec_path, tmp_path, capsys) -> None:
    _fails(capsys, ["submit", str(spec_path), "--address", f"http://127.0.0.1:{_closed_port()}",
                    "--set", f"model.path={tmp_path}/missing"], "no such checkpoint folder")


def test_version_and_every_option_has_help(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == "hymba-batch 0.1.0"
    ap = _parser()
    missing = []
    subs = next(a for a in ap._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sp in subs.choices.items():
        for a in sp._actions:
            if a.help is None:
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, missing
    assert all(a.help for a in ap._actions)


def test_debug_shows_the_traceback_and_the_default_does_not(spec_path, tmp_path) -> None:
    args = [sys.executable, "-m", "hymba_batch.jobs.cli", "validate", str(spec_path), "--set",
            f"model.path={tmp_path}/missing"]
    plain = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().startswith("error: model.path") and len(plain.stderr.strip().splitlines()) <= 2
    debug = subprocess.run(args + ["--debug"], capture_output=True, text=True, timeout=60)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "preflight(spec)" in debug.stderr

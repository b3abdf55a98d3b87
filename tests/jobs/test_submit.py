"""Ray job submission end to end against a REAL local Ray head with its job server, started
with ``ray start --head --block`` in its own temp dir (a separate Ray instance from the
``ray_cluster`` fixture's in-process cluster; only HTTP goes to it). Submit an incremental job,
read its status (Ray's and the job's counts) and logs (which show the job imported the code
that submit shipped), refuse a second submission of the same window, cancel a running job
(its committed units stay valid and the next submission resumes from them), and Ray's own
``ray job submit -- hymba-batch ...``. Teardown stops only this head's processes, by pid."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from jobhelpers import free_ports, job_dict, write_articles
from hymba_batch.jobs.cli import main
from hymba_batch.jobs.spec import parse_spec
from hymba_batch.jobs.submit import plan_submission, window_id

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def _wait(what: str, check, timeout: float, every: float = 0.25):
    """Poll ``check`` until it returns a truthy value; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)  # polling interval, not synchronization
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE  # a zombie is gone, just not reaped
    except psutil.NoSuchProcess:
        return False


def _stop_tree(root: psutil.Process, extra: list[psutil.Process]) -> None:
    """SIGTERM the head's processes (recorded by pid), then SIGKILL what is left after 5 s."""
    procs = [root] + extra
    try:
        procs += root.children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)  # waiting for processes to exit
    for p in procs:
        if _alive(p):
            p.kill()


@pytest.fixture(scope="module")
def ray_head():
    """A local Ray head with the dashboard / job server on 127.0.0.1; yields its HTTP address."""
    # RAY_AUTH_MODE=disabled: Ray 2.60 turns token auth on when ~/.ray/auth_token exists; this
    # head is private to the test (127.0.0.1); test_submit_sends_the_local_ray_token has its own.
    yield from _ray_head({"RAY_AUTH_MODE": "disabled"})


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """A local Ray head that requires Ray's auth token, kept in ``<home>/.ray/auth_token`` as
    ``ray start`` keeps it; yields (address, home)."""
    home = tmp_path_factory.mktemp("home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(uuid.uuid4().hex + uuid.uuid4().hex)
    for address in _ray_head({"RAY_AUTH_MODE": "token", "HOME": str(home)}):
        yield address, home


def _ray_head(env_extra: dict[str, str]):
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    names = ("port", "ray-client-server-port", "node-manager-port", "object-manager-port", "metrics-export-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")
    dash, *picked = free_ports(1 + len(names))
    ports = {f"--{k}": str(p) for k, p in zip(names, picked)}
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               **env_extra)
    env.pop("RAY_ADDRESS", None)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=2", "--num-gpus=0",
           f"--temp-dir={temp_dir}", "--disable-usage-stats"] + [f"{k}={v}" for k, v in ports.items()]
    log = open(Path(temp_dir) / "ray-start.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"

    def up() -> bool:
        assert proc.poll() is None, (Path(temp_dir) / "ray-start.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2) as r:
                return r.status == 200
        except urllib.error.HTTPError as e:
            return e.code == 401  # up, and asking for the token
        except OSError:
            return False

    root = psutil.Process(proc.pid)
    try:
        _wait("the Ray head's job server", up, timeout=120)
        yield address
    finally:
        mine = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
        _stop_tree(root, [p for p in mine if p.pid != os.getpid()])
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)  # only files of this head: nothing is running there


def _status(address: str, sid: str, capsys) -> dict:
    capsys.readouterr()
    assert main(["status", sid, "--address", address, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _ray_state(address: str, sid: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(address).get_job_status(sid).value)


def test_submit_status_logs_and_duplicate_window(ray_head, tiny_checkpoint, tmp_path, capsys) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    total = write_articles(src, files=2, rows=4)
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(job_dict(tiny_checkpoint, str(src), str(out))))
    expected = plan_submission(parse_spec(yaml.safe_load(spec_path.read_text())), incremental=True).submission_id

    assert main(["submit", str(spec_path), "--address", ray_head, "--incremental", "--debug"]) == 0
    printed = capsys.readouterr().out
    assert f"submitted {expected}" in printed and expected.startswith("hymba-test-job-")
    assert f"hymba-batch status {expected} --address {ray_head}\n" in printed  # the real address, to copy
    assert expected.endswith(window_id(parse_spec(yaml.safe_load(spec_path.read_text()))))
    state = _wait("the job to finish", lambda: (s := _ray_state(ray_head, expected)) in
                  ("SUCCEEDED", "FAILED", "STOPPED") and s, timeout=240)
    logs = subprocess.run([sys.executable, "-m", "hymba_batch.jobs.cli", "logs", expected, "--address", ray_head],
                          capture_output=True, text=True, timeout=60).stdout
    assert state == "SUCCEEDED", logs[-3000:]

    doc = _status(ray_head, expected, capsys)
    assert doc["ray_status"] == "SUCCEEDED" and doc["output_uri"] == str(out)
    job = doc["job"]
    assert job["state"] == "succeeded" and job["run_id"] == expected and job["incremental"] is True
    assert job["committed_rows"] == job["total_rows"] == total and job["completion_tokens"] > 0
    assert "eta_s" in job and job["new_files"] == 2
    assert main(["status", expected, "--address", ray_head]) == 0  # the table a person reads
    table = capsys.readouterr().out
    assert f"{expected}: SUCCEEDED" in table and f"{total} / {total} (100.0 %)" in table and "succeeded" in table

    # the job ran the code submit shipped (a py_modules package), not this checkout (--debug,
    # passed on to the job, prints where its code came from)
    code = next(line.split(": ", 1)[1] for line in logs.splitlines() if line.startswith("hymba-batch code: "))
    assert "runtime_resources" in code and "py_modules" in code and not code.startswith(str(REPO)), code
    assert f"run {expected}: 2 new" in logs

    t = ds.dataset(str(out), format="parquet").to_table()
    assert sorted(t.column("id").to_pylist()) == list(range(total))
    assert json.loads((out / "_hymba" / "runs" / expected / "manifest.json").read_text())["committed_rows"] == total

    # the same window again: Ray refuses it, we say so and exit non-zero
    assert main(["submit", str(spec_path), "--address", ray_head, "--incremental"]) == 2
    err = capsys.readouterr().err
    assert f"{expected} was already submitted" in err and "SUCCEEDED" in err


def test_cancel_keeps_committed_units_and_resubmission_resumes(ray_head, tiny_checkpoint, tmp_path, capsys) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    total = write_articles(src, files=5, rows=8, row_group_size=4)  # 10 units
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(job_dict(tiny_checkpoint, str(src), str(out), task={"max_new_tokens": 8},
                                                 resources={"num_actors": 1, "max_in_flight": 1})))
    assert main(["submit", str(spec_path), "--address", ray_head, "--window", "first"]) == 0
    sid = capsys.readouterr().out.split("submitted ")[1].split()[0]
    assert sid.endswith("-first")
    status_path = out / "_hymba" / "status.json"

    def some_committed() -> bool:
        return status_path.exists() and json.loads(status_path.read_text())["committed_units"] >= 1

    _wait("a first committed unit", some_committed, timeout=240)
    capsys.readouterr()
    assert main(["cancel", sid, "--address", ray_head]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ray_status"] == "STOPPED"
    assert doc["job"]["state"] == "cancelled" and 1 <= doc["job"]["committed_units"] < 10
    assert not (out / "_SUCCESS").exists()
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) >= doc["job"]["committed_units"]  # a unit in flight may still have landed, whole
    assert all(pq.ParquetFile(p).metadata.num_rows == 4 for p in parts)  # committed files are whole
    kept = {p.name for p in parts}

    assert main(["submit", str(spec_path), "--address", ray_head, "--window", "resume"]) == 0
    sid2 = capsys.readouterr().out.split("submitted ")[1].split()[0]
    assert _wait("the resumed job", lambda: (s := _ray_state(ray_head, sid2)) in
                 ("SUCCEEDED", "FAILED", "STOPPED") and s, timeout=240) == "SUCCEEDED"
    manifest = json.loads((out / "_hymba" / "manifest.json").read_text())
    assert manifest["committed_rows"] == total and kept <= {f["path"] for f in manifest["files"]}
    t = ds.dataset(str(out), format="parquet").to_table()
    pairs = list(zip(t.column("_source_file").to_pylist(), t.column("_source_row").to_pylist()))
    assert len(pairs) == len(set(pairs)) == total


def test_ray_job_submit_runs_the_cli(ray_head, tiny_checkpoint, tmp_path) -> None:
    """`ray job submit --working-dir DIR -- hymba-batch ...`: the CLI is on the cluster's PATH and
    the working dir ships the spec (validate --plan reads the input and cuts units)."""
    src = tmp_path / "in"
    write_articles(src, files=2, rows=4)
    work = tmp_path / "work"
    work.mkdir()
    (work / "job.yaml").write_text(yaml.safe_dump(job_dict(tiny_checkpoint, str(src), str(tmp_path / "out"))))
    proc = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head, "--working-dir", str(work),
                           "--", "hymba-batch", "validate", "job.yaml", "--plan"],
                          capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 input file(s), 8 rows, 2 unit(s)" in proc.stdout and "ok: job.yaml" in proc.stdout
    assert "succeeded" in proc.stdout.lower()


def test_status_and_submit_errors_name_the_problem(ray_head, tmp_path, capsys) -> None:
    assert main(["status", "hymba-nope-000000000000", "--address", ray_head]) == 2
    assert "hymba-nope-000000000000: no such job" in capsys.readouterr().err
    assert main(["status", "some-job-id"]) == 2  # neither a path nor an --address
    assert "pass --address" in capsys.readouterr().err
    assert main(["submit", str(tmp_path / "missing.yaml"), "--address", ray_head]) == 2
    assert "missing.yaml: cannot read the job spec" in capsys.readouterr().err
    assert main(["logs", "hymba-nope-000000000000", "--address", ray_head]) == 2
    assert "cannot read its logs" in capsys.readouterr().err


def test_commands_send_the_local_ray_token_when_the_server_asks(token_head, tmp_path) -> None:
    """A head with token auth, the token in ~/.ray/auth_token (as `ray start` leaves it) and no
    RAY_AUTH_MODE here: the commands reach the job server; without a token, or with a wrong
    one, one line says where the token goes."""
    address, home = token_head
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                                                            "RAY_ADDRESS")}

    def status(**extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hymba_batch.jobs.cli", "status", "hymba-nope-000000000000",
                               "--address", address], capture_output=True, text=True, timeout=120,
                              env={**env, "HOME": str(home), **extra})

    reached = status()
    assert reached.returncode == 2 and "hymba-nope-000000000000: no such job" in reached.stderr, reached.stderr
    none = status(HOME=str(tmp_path))
    assert none.returncode == 2 and "Traceback" not in none.stderr
    assert "asks for Ray's auth token and none was found" in none.stderr and "~/.ray/auth_token" in none.stderr
    wrong = status(RAY_AUTH_TOKEN="not-the-token")
    assert wrong.returncode == 2 and "rejected the Ray auth token from RAY_AUTH_TOKEN" in wrong.stderr, wrong.stderr

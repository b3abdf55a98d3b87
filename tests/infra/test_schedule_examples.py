"""infra/schedule/ (crontab line, Airflow DAG), infra/runtime_env.yaml and infra/README.md.

The DAG is read with `ast`, never imported: Airflow and the Ray provider are not installed here.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from infra_support import manifests  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
INCREMENTAL_RUN = re.compile(r"hymba-batch run \S+ --incremental\b")


# ---- crontab ---------------------------------------------------------------------------------

def crontab_jobs(text: str) -> list[tuple[list[str], str]]:
    """(five time fields, command) of each job line; comments and VAR=value lines skipped."""
    jobs = []
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#") or re.match(r"^[A-Za-z_][A-Za-z0-9_]*\s*=", s):
            continue
        parts = s.split(None, 5)
        jobs.append((parts[:5], parts[5] if len(parts) > 5 else ""))
    return jobs


def crontab_problems(text: str) -> list[str]:
    jobs = crontab_jobs(text)
    if not jobs:
        return ["no job line"]
    out = []
    for fields, command in jobs:
        for f, (lo, hi) in zip(fields, CRON_RANGES):
            if not re.fullmatch(r"\*|\d+(-\d+)?(,\d+(-\d+)?)*(/\d+)?|\*/\d+", f) or \
                    any(not lo <= int(n) <= hi for n in re.findall(r"\d+", f.split("/")[0])):
                out.append(f"bad time field {f!r}")
        if len(fields) < 5 or not command:
            out.append("a job line needs five time fields and a command")
            continue
        if not (re.fullmatch(r"\d+", fields[0]) and fields[1:] == ["*"] * 4):
            out.append(f"{' '.join(fields)}: not once an hour")
        m_flock = re.search(r"\bflock -n \S+", command)
        m_run = INCREMENTAL_RUN.search(command)
        if not m_run:
            out.append("the command does not run `hymba-batch run SPEC --incremental`")
        if not m_flock or (m_run and m_flock.start() > m_run.start()):
            out.append("the run is not wrapped in `flock -n LOCKFILE`")
        if "%" in command:
            out.append("an unescaped % ends a cron command")
    return out


@pytest.fixture(scope="module")
def crontab() -> str:
    return (INFRA / "schedule" / "crontab.example").read_text()


def test_crontab_runs_incremental_job_hourly_under_flock(crontab):
    assert crontab_problems(crontab) == []
    assert len(crontab_jobs(crontab)) == 1


def test_crontab_command_is_valid_bash(crontab):
    (_, command), = crontab_jobs(crontab)
    assert "SHELL=/bin/bash" in crontab
    proc = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("mutation", [
    ("flock -n \"$HOME/.hymba-batch-hourly.lock\" ", ""),
    (" --incremental", ""),
    ("0 * * * *", "61 * * * *"),
    ("0 * * * *", "0 3 * * *"),
    ("0 * * * *", "0 * * *"),
])
def test_broken_crontab_is_caught(crontab, mutation):
    broken = crontab.replace(*mutation)
    assert broken != crontab, mutation
    assert crontab_problems(broken), mutation


# ---- Airflow DAG (parsed, not imported) --------------------------------------------------------

def _const(node):
    return node.value if isinstance(node, ast.Constant) else None


def dag_problems(source: str) -> list[str]:
    tree = ast.parse(source)
    out = []
    imported = {(n.module, a.name): a.asname or a.name for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) for a in n.names}
    op = imported.get(("ray_provider.operators", "SubmitRayJob"))
    if op is None:
        out.append("SubmitRayJob is not imported from ray_provider.operators")
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    submits = [c for c in calls if op and c.func.id == op]
    if not submits:
        out.append("no SubmitRayJob task")
    for c in submits:
        kw = {k.arg: k.value for k in c.keywords}
        entry = _const(kw.get("entrypoint"))
        if not isinstance(entry, str) or not INCREMENTAL_RUN.fullmatch(entry):
            out.append(f"entrypoint {entry!r}: expected `hymba-batch run SPEC --incremental`")
        if not isinstance(_const(kw.get("conn_id")), str):
            out.append("SubmitRayJob needs a conn_id")
        if "runtime_env" not in kw:
            out.append("SubmitRayJob needs runtime_env (a required argument)")
        if _const(kw.get("wait_for_completion", ast.Constant(True))) is not True:
            out.append("the task must wait for the Ray job")
    dags = [c for c in calls if c.func.id == "DAG"]
    if len(dags) != 1:
        out.append(f"{len(dags)} DAG(...) calls")
    else:
        kw = {k.arg: _const(k.value) for k in dags[0].keywords}
        if kw.get("schedule") not in ("@hourly", "0 * * * *"):
            out.append(f"schedule {kw.get('schedule')!r}: expected hourly")
        if kw.get("catchup") is not False:
            out.append("catchup must be False (no backlog of runs for missed hours)")
        if kw.get("max_active_runs") != 1:
            out.append("max_active_runs must be 1")
    return out


@pytest.fixture(scope="module")
def dag_source() -> str:
    return (INFRA / "schedule" / "airflow_dag.py").read_text()


def test_airflow_dag_submits_the_incremental_job(dag_source, manifests):
    assert dag_problems(dag_source) == []
    compile(dag_source, "airflow_dag.py", "exec")  # valid Python, without importing Airflow
    entry = re.search(r'entrypoint="([^"]+)"', dag_source).group(1)
    assert entry == manifests[("RayCronJob", "hymba-batch-hourly")]["spec"]["jobTemplate"]["entrypoint"]
    assert "airflow" not in sys.modules and "ray_provider" not in sys.modules


@pytest.mark.parametrize("mutation", [
    ("from ray_provider.operators import SubmitRayJob", "from ray_provider.operators.ray import SubmitRayJob"),
    (" --incremental", ""),
    ('schedule="@hourly"', 'schedule="@daily"'),
    ("catchup=False", "catchup=True"),
    ("max_active_runs=1", "max_active_runs=3"),
    ('conn_id="ray_hymba"', "conn_id=None"),
    ("wait_for_completion=True", "wait_for_completion=False"),
])
def test_broken_dag_is_caught(dag_source, mutation):
    broken = dag_source.replace(*mutation)
    assert broken != dag_source, mutation
    assert dag_problems(broken), mutation


# ---- runtime_env.yaml --------------------------------------------------------------------------

def test_runtime_env_as_ray_job_submit_reads_it():
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    env = parse_runtime_env_args(runtime_env=str(INFRA / "runtime_env.yaml"))  # as `--runtime-env`
    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    RuntimeEnv(**env)  # Ray's own validation of each field
    assert env["working_dir"] == "."
    for junk in (".git/", ".venv/", ".whl/", "tests/", "jobs/bench/results/"):
        assert junk in env["excludes"], junk
    with pytest.raises(TypeError):
        RuntimeEnv(**{**env, "env_vars": {"PYTHONUNBUFFERED": 1}})


# ---- infra/README.md ---------------------------------------------------------------------------

def readme_gaps(readme: str, files: list[str]) -> list[str]:
    """Files the README does not list, and infra paths it names that do not exist."""
    missing = [f for f in files if f"`{f}`" not in readme]
    named = set(re.findall(r"\binfra/[\w./-]+\w", readme)) | set(re.findall(r"`((?:k8s|schedule|aws)/[\w./-]+)`", readme))
    dangling = [p for p in sorted(named) if not ((REPO / p).exists() or (INFRA / p).exists())]
    return missing + dangling


def test_readme_lists_every_file_and_names_only_real_ones():
    readme = (INFRA / "README.md").read_text()
    files = sorted(str(p.relative_to(INFRA)) for p in INFRA.rglob("*") if p.is_file() and p.name != "README.md"
                   and "__pycache__" not in p.parts)
    assert len(files) >= 11
    assert readme_gaps(readme, files + ["../ray_cluster.yaml", "../.dockerignore"]) == []
    assert readme_gaps(readme, files + ["k8s/extra.yaml"]) == ["k8s/extra.yaml"]
    assert readme_gaps(readme + "\nkubectl apply -f infra/k8s/nope.yaml\n", files) == ["infra/k8s/nope.yaml"]
    for cmd in ("ray up ray_cluster.yaml", "kubectl apply -f infra/k8s/raycluster.yaml",
                "docker build -f infra/Dockerfile"):
        assert cmd in readme, cmd

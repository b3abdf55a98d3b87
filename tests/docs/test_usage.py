"""docs/USAGE-jobs.md run as written: every ```bash block, in order, in one bash shell, in a fresh
copy of the checkout (its tracked and new files: no demo/, no out/), with this virtual
environment as its ``.venv``; then the files and lines the text promises are checked.

Changed, and only so that the run cannot touch anything else on a shared machine: the head's
ports (8265 and Ray's others) and moto's 5055 are free ports of this test; ``RAY_TMPDIR`` and
``HOME`` are the test's own (Ray's address file and its token live there, so ``hymba-batch run``
finds this head and no other); ``ray stop``, which would stop every Ray of the user on the
machine, stops only this head's processes (by their command lines naming ``RAY_TMPDIR``).
Also: the README's "Set up" says how to get the command on the PATH.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
from jobhelpers import free_ports

REPO = Path(__file__).resolve().parents[2]
USAGE = REPO / "docs" / "USAGE-jobs.md"
VENV = Path(sys.executable).parents[1]

STOP_HEAD = '''
import os, sys, time, psutil
tmp = sys.argv[1]
procs = [p for p in psutil.process_iter(["cmdline"]) if tmp in " ".join(p.info["cmdline"] or [])
         and p.pid != os.getpid() and p.pid != os.getppid()]
for p in list(procs):  # and their children (Ray's agents name no folder in their command lines)
    try:
        procs += [c for c in p.children(recursive=True) if c not in procs]
    except psutil.NoSuchProcess:
        pass
for p in procs:
    try:
        p.terminate()
    except psutil.NoSuchProcess:
        pass
gone, alive = psutil.wait_procs(procs, timeout=10)
for p in alive:
    p.kill()
address_file = os.path.join(tmp, "ray", "ray_current_cluster")
if os.path.exists(address_file):
    os.remove(address_file)
print(f"stopped {len(procs)} process(es) of this head")
'''


def bash_blocks(text: str) -> list[str]:
    """The ```bash fenced blocks of a Markdown text, in order."""
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def _fresh_copy(dest: Path) -> None:
    """The checkout's tracked and new (not ignored) files, as a fresh clone of this tree has them."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / ".venv").symlink_to(VENV)


def _script(blocks: list[str], ports: dict[str, int], stop_py: Path) -> str:
    ray_ports = " ".join(f"--{k}={ports[k]}" for k in (
        "port", "ray-client-server-port", "node-manager-port", "object-manager-port", "metrics-export-port",
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port"))
    body = "\n".join(blocks)
    body = body.replace("127.0.0.1:8265", f"127.0.0.1:{ports['dashboard']}")
    body = body.replace("ray start --head", f"ray start --head --dashboard-port={ports['dashboard']} {ray_ports}")
    body = body.replace("5055", str(ports["moto"]))
    preamble = (f"set -eo pipefail\n"
                f"ray() {{ if [ \"$1\" = stop ]; then python {stop_py} \"$RAY_TMPDIR\"; else command ray \"$@\"; fi; }}\n")
    return preamble + body + "\n"


def test_readme_setup_puts_the_command_on_the_path() -> None:
    readme = (REPO / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    assert "make demo" in setup and "make test" in setup and "source .venv/bin/activate" in setup
    first = bash_blocks(USAGE.read_text())[0]
    assert first.splitlines()[0].startswith("source .venv/bin/activate")


@pytest.mark.slow
def test_usage_doc_runs_as_written(tmp_path) -> None:
    blocks = bash_blocks(USAGE.read_text())
    assert len(blocks) >= 5 and any("ray job submit" in b for b in blocks)
    work = tmp_path / "checkout"
    work.mkdir()
    _fresh_copy(work)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    home = tmp_path / "home"
    home.mkdir()
    stop_py = tmp_path / "stop_head.py"
    stop_py.write_text(STOP_HEAD)
    names = ("dashboard", "moto", "port", "ray-client-server-port", "node-manager-port", "object-manager-port",
             "metrics-export-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")
    ports = dict(zip(names, free_ports(len(names))))
    script = tmp_path / "usage.sh"
    script.write_text(_script(blocks, ports, stop_py))
    drop = {"RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "HYMBA_MODEL", "INPUT_URI",
            "OUTPUT_URI", "HYMBA_CACHE", "VIRTUAL_ENV", "HYMBA_DEBUG"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("AWS_")}
    env.update(HOME=str(home), RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0",
               PATH=os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != VENV / "bin"))
    log = tmp_path / "usage.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", str(script)], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=900)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            subprocess.run([sys.executable, str(stop_py), str(ray_tmp)], capture_output=True, timeout=60)
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # what the script left in its own session (moto, on a failure)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
    text = log.read_text(errors="replace")
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert rc == 0, f"exit {rc}:\n{text[-6000:]}"
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(ray_tmp) in " ".join(p.info["cmdline"] or [])]

    # what the text says each step leaves behind
    assert re.search(r"^hymba-summarize-articles-[0-9a-f]{12}$", text, flags=re.M), text[-4000:]
    for folder in ("submitted", "ray-cli", "incremental"):
        assert (work / "out" / folder / "_SUCCESS").exists(), folder
    assert "run " in text and "1 new, 0 changed, 3 unchanged input file(s)" in text
    assert re.search(r"^160$", text, flags=re.M)
    assert "160 ['id', 'title', 'category', 'text', 'generated_text'" in text
    assert "Traceback" not in text and "hymba-batch code:" not in text
    assert len(re.findall(r"^hymba-batch \S+: (incremental )?run ", text, flags=re.M)) >= 4  # one line per run start
    assert not (work / "demo" / "s3-server.log").read_text() == ""  # the demo's S3 log went to its file
    assert "HTTP/1.1\" 200" not in text

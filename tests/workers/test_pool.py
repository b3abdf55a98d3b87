"""The actor pool on a real two-node local Ray cluster: units spread over nodes, output that
does not depend on the number of actors, where the time went (steady state, tail), and an actor
killed mid-unit."""

import json
import os

import pyarrow.dataset as ds
import pytest

from jobhelpers import job_dict, write_articles
from hymba_batch.jobs.driver import run_job
from hymba_batch.jobs.spec import parse_spec
from hymba_batch.workers.actor import CRASH_ONCE_ENV


def _rows(uri: str) -> list[tuple]:
    t = ds.dataset(uri, format="parquet").to_table()
    return sorted(zip(t.column("_source_file").to_pylist(), t.column("_source_row").to_pylist(),
                      t.column("generated_text").to_pylist(), t.column("completion_tokens").to_pylist()))


@pytest.fixture(scope="module")
def articles(tmp_path_factory):
    d = tmp_path_factory.mktemp("articles")
    n = write_articles(d, files=3, rows=8)
    return d, n


def test_one_vs_three_actors_same_output_and_units_spread_over_nodes(ray_cluster, tiny_checkpoint, articles,
                                                                        tmp_path) -> None:
    src, n = articles
    sampling = {"temperature": 0.9, "top_p": 0.95, "seed": 7}
    one = parse_spec(job_dict(tiny_checkpoint, str(src), str(tmp_path / "one"), task=sampling,
                              resources={"num_actors": 1}))
    three = parse_spec(job_dict(tiny_checkpoint, str(src), str(tmp_path / "three"), task=sampling,
                                resources={"num_actors": 3, "max_in_flight": 1}))
    s1, s3 = run_job(one), run_job(three)
    assert s1.state == s3.state == "succeeded"
    assert len(s3.actors) == 3
    assert len(s3.nodes) == 2, f"units ran on {s3.nodes}"  # SPREAD over both nodes of the cluster
    r1, r3 = _rows(str(tmp_path / "one")), _rows(str(tmp_path / "three"))
    assert len(r1) == n and [r[:2] for r in r1] == sorted({r[:2] for r in r1})
    assert r1 == r3
    assert len({r[2] for r in r1}) > 1  # sampling really varies per row
    # the tail is time with nothing left to hand out and an actor idle: one actor is busy to the end
    assert s1.time_split["tail_s"] == 0 and s1.time_split["steady_s"] > 0
    assert s3.time_split["tail_s"] > 0


def test_actor_killed_mid_unit_is_replaced_and_only_its_unit_redone(ray_cluster, tiny_checkpoint, articles,
                                                                     tmp_path, monkeypatch) -> None:
    src, n = articles
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ONCE_ENV, str(marker))
    out = tmp_path / "out"
    summary = run_job(parse_spec(job_dict(tiny_checkpoint, str(src), str(out),
                                          resources={"num_actors": 1, "max_in_flight": 1})))
    assert marker.exists(), "the fault hook never fired"
    crashed_unit = marker.read_text()
    assert summary.state == "succeeded"
    assert summary.actor_restarts == 1 and summary.retried_units == 1
    assert summary.run_units == summary.total_units == 6
    rows = _rows(str(out))
    assert len(rows) == n and len({r[:2] for r in rows}) == n
    assert (out / f"part-{crashed_unit}.parquet").exists()
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # the dead actor's temp file is gone


def test_bad_checkpoint_fails_fast_with_its_path(ray_cluster, articles, tmp_path) -> None:
    from hymba_batch.workers.pool import PoolError

    src, _ = articles
    bogus = tmp_path / "no-such-model"
    with pytest.raises(PoolError, match="no-such-model"):
        run_job(parse_spec(job_dict(bogus, str(src), str(tmp_path / "out"))))
    status = json.loads((tmp_path / "out" / "_hymba" / "status.json").read_text())
    assert status["state"] == "failed" and "no-such-model" in status["error"]


def test_engine_failure_restarts_the_actor_and_loses_nothing(ray_cluster, tiny_checkpoint, articles,
                                                             tmp_path, monkeypatch) -> None:
    from hymba_batch.workers.actor import ENGINE_ERROR_ONCE_ENV

    src, n = articles
    marker = tmp_path / "engine-failed"
    monkeypatch.setenv(ENGINE_ERROR_ONCE_ENV, str(marker))
    out = tmp_path / "out"
    summary = run_job(parse_spec(job_dict(tiny_checkpoint, str(src), str(out),
                                          resources={"num_actors": 1, "max_in_flight": 2})))
    assert marker.exists(), "the fault hook never fired"
    assert summary.state == "succeeded" and summary.actor_restarts == 1 and summary.retried_units >= 1
    rows = _rows(str(out))
    assert len(rows) == n and len({r[:2] for r in rows}) == n


def test_auto_in_flight_covers_twice_the_engine_slots():
    """Unset resources.max_in_flight: units in flight whose rows cover 2 x the engine's slots, so
    a unit boundary never leaves the engine without queued rows; bounded both ways."""
    from hymba_batch.workers.pool import MAX_AUTO_IN_FLIGHT, in_flight_limit

    assert in_flight_limit(2698, 625) == 10          # one H200 engine, 625-row units: 6,250 rows >= 5,396
    assert in_flight_limit(2698, 625) * 625 >= 2 * 2698
    assert in_flight_limit(100, 10_000) == 2         # big units: never fewer than 2
    assert in_flight_limit(4095, 4) == MAX_AUTO_IN_FLIGHT


LOCAL_RAY_ENV = r"""
import json, os, ray
os.environ["HYMBA_SAME"] = "1"
os.environ["AWS_REGION"] = "eu-west-1"
ray.init(address="local", include_dashboard=False, num_cpus=1)  # a new local Ray, whatever else runs
from hymba_batch.workers.pool import forwarded_env
os.environ["HYMBA_LATER"] = "2"      # set after Ray started: its workers do not have it
os.environ["AWS_REGION"] = "us-east-1"  # changed after: forwarded
env = forwarded_env()

@ray.remote(num_cpus=1, **({"runtime_env": {"env_vars": env}} if env else {}))
class Probe:
    def env(self):
        return {k: os.environ.get(k) for k in ("HYMBA_SAME", "HYMBA_LATER", "AWS_REGION")}

print(json.dumps({"forwarded": env, "actor": ray.get(Probe.remote().env.remote())}))
"""


def test_a_local_ray_started_here_gets_only_the_env_its_workers_lack() -> None:
    """An actor with no runtime_env can take a prestarted worker (~0.7 s less start on a 2-core
    CPU); what the workers inherited from this process is not forwarded, what changed since is,
    and the actor sees both."""
    import json
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HYMBA_") and k not in ("AWS_REGION", "RAY_ADDRESS")}  # its own local Ray
    p = subprocess.run([sys.executable, "-c", LOCAL_RAY_ENV], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["forwarded"] == {"HYMBA_LATER": "2", "AWS_REGION": "us-east-1"}
    assert out["actor"] == {"HYMBA_SAME": "1", "HYMBA_LATER": "2", "AWS_REGION": "us-east-1"}


def test_a_cluster_started_elsewhere_gets_the_whole_env(ray_cluster, monkeypatch) -> None:
    from hymba_batch.workers.pool import forwarded_env
    monkeypatch.setenv("HYMBA_PROBE", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    env = forwarded_env()
    assert env["HYMBA_PROBE"] == "x" and env["AWS_MAX_ATTEMPTS"] == "3"

"""Job metrics read back from a real local Ray's Prometheus endpoint (its metrics export port):
one small job, in a subprocess with a Ray of its own, with a per-row error and a unit that fails
every try (quarantined). Read during the job (when its first unit commits) and after it: the
counters equal the job's own counts, tagged with its job id and its actor, and the engine's
gauges and counters are there."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from jobhelpers import job_dict
from observehelpers import write_corrupt, write_with_row_error
from hymba_batch.workers.metrics import METRICS, prometheus_name

HERE = Path(__file__).resolve().parent


def _series(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus sample name -> [(labels, value)] for our metrics."""
    out: dict[str, list] = defaultdict(list)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("ray_hymba_"):
                out[s.name].append((s.labels, s.value))
    return out


def test_job_metrics_reach_rays_prometheus_endpoint(tiny_checkpoint, tmp_path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    write_with_row_error(src / "a.parquet", 0, 8, null_at=3)
    write_with_row_error(src / "b.parquet", 8, 8, null_at=99)
    write_corrupt(src / "z-corrupt.parquet")
    spec = job_dict(tiny_checkpoint, str(src), str(out), name="metrics-job",
                    resources={"num_actors": 1, "max_in_flight": 1, "max_attempts": 2})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(HERE / "metrics_job.py"), str(tmp_path / "spec.json"),
                           str(tmp_path / "result.json")], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "result.json").read_text())
    s = res["summary"]
    assert res["port"] in res["ports"]  # the node's own metrics export port, not a server of ours
    assert s["state"] == "failed" and [f["unit_id"] for f in s["failed_units"]] and s["committed_rows"] == 16

    got = _series(res["metrics"])
    job = s["job_id"]
    (actor,) = {lab["actor"] for lab, _ in got["ray_hymba_rows_total"]}
    assert len(actor) == 12 and actor == s["actors"][0]["actor_id"][:12]

    def total(name: str) -> float:
        samples = got[prometheus_name(name)]
        assert samples, f"{prometheus_name(name)} was not exported"
        assert all(lab["job"] == job for lab, _ in samples)
        return sum(v for _, v in samples)

    assert total("hymba_rows") == 16 and total("hymba_units") == 4
    assert total("hymba_prompt_tokens") == s["prompt_tokens"] > 0
    assert total("hymba_completion_tokens") == s["completion_tokens"] > 0
    assert total("hymba_row_errors") == s["error_rows"] == 1
    assert total("hymba_unit_retries") == s["retried_units"] == 1
    assert total("hymba_units_quarantined") == 1
    slots = total("hymba_engine_slots")
    assert slots >= 1 and 0 <= total("hymba_engine_cache_blocks_used") < total("hymba_engine_cache_blocks_total")
    assert 0 <= total("hymba_engine_batch_occupancy") <= 1 and total("hymba_engine_waiting_requests") >= 0
    # every generated token after a request's first comes out of a decode step
    assert total("hymba_engine_decode_tokens") == s["completion_tokens"] - 15
    assert total("hymba_engine_prefill_tokens") == s["prompt_tokens"]
    assert total("hymba_engine_prefill_seconds") > 0 and total("hymba_engine_decode_seconds") > 0
    assert 0 < total("hymba_rows_per_second") <= 16 / 0.2
    # the Grafana dashboard's names are these (infra/grafana test); every metric is exported
    assert {prometheus_name(n) for n in METRICS} - {"ray_hymba_actor_restarts_total", "ray_hymba_engine_preemptions_total"} \
        <= set(got)

    # during the job (scraped when its first unit committed, with units still to run)
    mid = _series(res["during"]["metrics"])
    assert sum(v for _, v in mid["ray_hymba_rows_total"]) == res["during"]["rows"] == 4
    assert all(lab["job"] == job for lab, _ in mid["ray_hymba_rows_total"])
    assert mid["ray_hymba_engine_slots"][0][0]["actor"] == actor and mid["ray_hymba_engine_slots"][0][1] == slots


class _Fake:
    def __init__(self) -> None:
        self.values: dict[tuple, float] = {}

    def inc(self, value: float, tags: dict) -> None:
        key = tuple(sorted(tags.items()))
        self.values[key] = self.values.get(key, 0) + value

    def set(self, value: float, tags: dict) -> None:
        self.values[tuple(sorted(tags.items()))] = value


def test_actor_metrics_arithmetic_and_failures_never_fail_a_unit(monkeypatch, capsys) -> None:
    """Counters grow by the engine's increases only (polled twice, counted once), rows/s is over
    the last minute, and a metric that cannot be recorded is reported once and skipped."""
    from types import SimpleNamespace

    import hymba_batch.workers.metrics as m

    fakes: dict[str, _Fake] = {}
    monkeypatch.setattr(m, "_metric", lambda name: fakes.setdefault(name, _Fake()))
    now = [0.0]
    snap = SimpleNamespace(running=3, waiting=1, slots=4, blocks_used=5, blocks_total=10, occupancy=0.75, steps=2,
                           prefill_tokens=100, decode_tokens=7, prefill_s=0.5, decode_s=0.25, preemptions=0)
    am = m.ActorMetrics("job-1", "actor-1", lambda: SimpleNamespace(**vars(snap)), interval=3600,
                        clock=lambda: now[0])  # a fresh snapshot per call, as Engine.snapshot() gives
    am.poll()  # a second poll of the same snapshot adds nothing
    tags = (("actor", "actor-1"), ("job", "job-1"))
    assert fakes["hymba_engine_prefill_tokens"].values[tags] == 100 and fakes["hymba_engine_batch_occupancy"].values[tags] == 0.75
    snap.decode_tokens, now[0] = 27, 30.0
    am.unit_done(rows=60, prompt_tokens=600, completion_tokens=90, error_rows=0)
    am.poll()
    assert fakes["hymba_engine_decode_tokens"].values[tags] == 27 and fakes["hymba_rows"].values[tags] == 60
    assert "hymba_row_errors" not in fakes  # Ray's counters refuse 0: nothing recorded
    assert am.rows_per_second() == 2.0  # 60 rows in the 30 s since the actor started
    now[0] = 120.0
    assert am.rows_per_second() == 0.0  # the unit is more than a minute old
    am.stop()

    def broken(name):
        raise RuntimeError("no metrics here")

    monkeypatch.setattr(m, "_metric", broken)
    am.unit_done(rows=1, prompt_tokens=1, completion_tokens=1, error_rows=1)
    am.unit_done(rows=1, prompt_tokens=1, completion_tokens=1, error_rows=1)
    m.PoolMetrics("job-1").retry("actor-1")
    err = capsys.readouterr().err
    assert err.count("metric hymba_rows not recorded (RuntimeError: no metrics here)") == 1

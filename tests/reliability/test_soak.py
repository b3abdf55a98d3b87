"""Soak: 100,000 short rows through a 3-node local Ray cluster (its own, in a subprocess) with a
tiny model (hidden 32, 2 layers, one new token a row). It must complete with every row exactly
once, the driver's and the actors' memory must stay bounded, and the throughput is reported
as one JSON line on stdout. Marked ``slow``; it runs in CI (``-m "not gpu"``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from invariants import check_output, input_rows, job

HERE = Path(__file__).resolve().parent
ROWS, FILES = 100_000, 10
MB = 1 << 20


@pytest.mark.slow
def test_soak_100k_rows_on_three_nodes(tmp_path) -> None:
    from hymba_batch.model.checkpoints import tiny_config, write_checkpoint

    ckpt = write_checkpoint(tmp_path / "model", tiny_config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
        mamba_dt_rank=4, num_memory_tokens=4, sliding_window=16, global_attn_idx=(0,), kv_reuse_group=()), seed=0)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    per = ROWS // FILES
    for f in range(FILES):
        ids = range(f * per, (f + 1) * per)
        pq.write_table(pa.table({"id": list(ids), "text": [f"Note {i}: item {i % 97} is on shelf {i % 13}." for i in ids]}),
                       src / f"part-{f:03d}.parquet", row_group_size=2500)
    spec = job(ckpt, str(src), str(out), model={"cache_budget_mb": 64, "max_num_seqs": 512},
               input={"rows_per_unit": 5000}, task={"kind": "generate", "max_new_tokens": 1},
               output={"mode": "results"}, resources={"num_actors": 3, "max_in_flight": 2, "cpus_per_actor": 1})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(HERE / "cluster_job.py"), str(tmp_path / "spec.json"),
                           str(tmp_path / "result.json"), "--nodes", "3", "--cpus", "1"],
                          capture_output=True, text=True, timeout=570)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "result.json").read_text())
    s = res["summary"]
    assert s["state"] == "succeeded" and s["committed_rows"] == ROWS, s
    assert len(s["nodes"]) == 3, s["nodes"]  # every node did work
    got = check_output(str(out), input_rows(str(src)))
    assert sum(got["rows"].values()) == ROWS
    growth = res["driver_rss"] - res["driver_rss_start"]
    report = {"soak_rows": ROWS, "nodes": 3, "actors": 3, "job_s": round(res["wall_s"], 1),
              "total_s": round(wall, 1), "rows_per_s": round(ROWS / res["wall_s"], 1),
              "driver_rss_mb": round(res["driver_rss"] / MB), "driver_rss_growth_mb": round(growth / MB),
              "actor_peak_rss_mb": round(res["actor_rss"] / MB)}
    print(json.dumps(report))
    assert growth < 500 * MB, report
    assert 0 < res["actor_rss"] < 3000 * MB, report

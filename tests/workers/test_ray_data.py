"""The Ray Data stage on the real local Ray cluster with the tiny checkpoint: a few hundred
rows through preprocess -> an actor pool holding the engine -> postprocess, every row kept
once, with per-row errors and per-row max_tokens."""

import pytest

from hymba_batch.pipeline.unit import SamplingConfig
from hymba_batch.workers.ray_data import HymbaProcessorConfig, build_hymba_processor


def test_ray_data_stage_keeps_every_row(ray_cluster, tiny_checkpoint) -> None:
    import ray

    n = 300
    ds = ray.data.from_items([{"id": i, "text": "" if i % 50 == 7 else f"Park {i} reopened."} for i in range(n)])
    config = HymbaProcessorConfig(model_source=str(tiny_checkpoint), engine_kwargs={"cache_budget_mb": 32,
                                                                                    "max_num_seqs": 32},
                                  sampling=SamplingConfig(max_new_tokens=4), concurrency=2, batch_size=40)

    def pre(row):
        if not row["text"]:
            return {"id": row["id"], "messages": None, "prompt": None}
        return {"id": row["id"], "messages": [{"role": "user", "content": row["text"]}], "prompt": None,
                "sampling_params": {"max_tokens": 1 + row["id"] % 4}}

    def post(row):
        return {"id": row["id"], "summary": row["generated_text"], "error": row["error"],
                "completion_tokens": row["completion_tokens"], "finish_reason": row["finish_reason"]}

    out = build_hymba_processor(config, preprocess=pre, postprocess=post)(ds).take_all()
    assert sorted(r["id"] for r in out) == list(range(n))  # every row, once
    bad = [r for r in out if r["error"] is not None]
    assert sorted(r["id"] for r in bad) == [i for i in range(n) if i % 50 == 7]
    assert all("neither 'messages' nor" in r["error"] and r["finish_reason"] == "error" for r in bad)
    good = [r for r in out if r["error"] is None]
    assert all(isinstance(r["summary"], str) and 1 <= r["completion_tokens"] <= 1 + r["id"] % 4 for r in good)
    assert {r["finish_reason"] for r in good} <= {"stop", "length"}


def test_config_from_job_spec(tiny_checkpoint) -> None:
    from hymba_batch.jobs.spec import parse_spec
    from jobhelpers import job_dict

    spec = parse_spec(job_dict(tiny_checkpoint, "/in", "/out", resources={"actors_per_gpu": 4},
                               task={"max_new_tokens": 9, "temperature": 0.5}))
    cfg = HymbaProcessorConfig.from_spec(spec, concurrency=3)
    assert cfg.num_gpus == 0.25 and cfg.sampling.max_new_tokens == 9 and cfg.sampling.temperature == 0.5
    assert cfg.engine_kwargs == {"cache_budget_mb": 32, "max_num_seqs": 16} and cfg.concurrency == 3
    with pytest.raises(ValueError, match="concurrency"):
        build_hymba_processor(HymbaProcessorConfig(model_source="x", concurrency=0))
